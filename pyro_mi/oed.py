"""Expected information gain (EIG) of experimental designs, as bounds from pyro_mi.

The EIG of a design d is a mutual information, EIG(d) = I(y; θ | d) =
E_p(θ, y | d)[log p(y|θ, d) - log p(y|d)] (Brekelmans et al. 2022, eq. 1, for the
model run at d), with y the observation sites and θ the target latents.
:func:`eig` follows ``pyro.contrib.oed.eig``'s conventions (``model(design)``,
``observation_labels``, ``target_labels``) and returns one result per design of a
design batch.

* **Every latent a target**: the EIG is the model's generative MI, bounded by any
  method of :data:`pyro_mi.bounds.METHODS`. With the prior as proposal (the default
  here, as in ``nmc_eig``), IWAE's upper bound is the nested Monte Carlo (NMC)
  estimator and its lower bound is prior contrastive estimation: the inner sum
  includes the θ that generated y (eq. 5, the EUBO). With ``share_particles`` (the option of
  :class:`~pyro_mi.bounds.IWAE`) its K prior draws are shared by a design's experiments, as
  ``nmc_eig``'s inner samples are, with the jackknife variance over them in each standard error.
* **Nuisance latents ψ** (``target_labels`` a strict subset): log p(y|θ) =
  log p(y, θ) - log p(θ) is intractable too. Both terms are bounded by importance
  sampling over ψ with the model's own conditional prior r(ψ|θ) (ψ drawn by running
  the model with θ held fixed), the lower side by the mean weight of M draws
  (eq. 5, right) and the upper side by the EUBO with the simulated ψ included
  (eq. 5, left; the simulated ψ is a draw of p(ψ|y, θ) and of p(ψ|θ)). With log p(y)
  bounded by the method,

      lower = E[ L log p(y, θ) - U log p(θ) - U log p(y) ],
      upper = E[ U log p(y, θ) - L log p(θ) - L log p(y) ],

  each a bound in expectation. When θ's prior does not depend on ψ, the log p(θ)
  bounds are equal and exact.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from .bounds import Bound
from .density import ModelDensity
from .design_density import DesignDensity
from .density.plates import sample_sites
from .density.plates import check_declared_batch_dims
from .assessment import assess
from .estimate import ADVICE, check_method_options, flatten_bound, seeded, simulate_and_bound
from .result import MIResult, require_finite
from .weights import log_mean_exp

#: methods whose results carry per-point log p(y) bounds, usable beside nuisance latents
_LOG_PX_METHODS = ("iwae", "ais", "im-ais", "cr-ais", "bdmc")


@dataclass
class EIGResult:
    """Bounds on the EIG of each design of a design batch, in nats.

    Attributes:
        lower, upper: tensors of shape ``batch_shape`` (the design batch); with
            ``differentiable=True`` they carry gradients to the design and the
            model's parameters. None where the method gives no such side.
        lower_stderr, upper_stderr: their standard errors over simulated points, same shape.
        batch_shape: the design batch shape (``()`` for one design).
        results: one :class:`~pyro_mi.result.MIResult` per design, in row-major order of
            the batch (``design.reshape(-1, ...)``).
        seconds: wall time of all designs.
    """

    lower: torch.Tensor | None
    upper: torch.Tensor | None
    lower_stderr: torch.Tensor | None
    upper_stderr: torch.Tensor | None
    batch_shape: torch.Size
    results: list[MIResult] = field(default_factory=list)
    seconds: float | None = None


def design_batch_shape(model: Callable, design: torch.Tensor) -> torch.Size:
    """The leading dims of ``design`` that index designs: those the model declares as its
    leftmost plates, each enclosing every sample site, with the sizes of design's leading
    dims in order (``pyro.contrib.oed.glmm`` and Pyro's OED tutorial declare them with
    ``plate_stack`` / ``iter_plates_to_shape``). ``()`` for a single design."""
    with torch.random.fork_rng(), torch.no_grad(), poutine.block():
        try:
            trace = poutine.trace(model).get_trace(design)
        except (RuntimeError, IndexError, ValueError) as e:
            raise ValueError(f"the model fails when called on the design of shape {tuple(design.shape)} (does its "
                             f"last dim match the model?): {str(e).splitlines()[0]}") from e
    sites = sample_sites(trace)
    common = set.intersection(*({f for f in s["cond_indep_stack"] if f.dim is not None} for s in sites))
    shape = []
    for frame in sorted(common, key=lambda f: f.dim):
        k = len(shape)
        if k < design.dim() - 1 and frame.size == design.shape[k] and frame.dim == min(f.dim for f in common) + k:
            shape.append(frame.size)
        else:
            break
    return torch.Size(shape)


def nuisance_log_bounds(density: ModelDensity, x, z: torch.Tensor, targets: Sequence[str], num_nuisance: int):
    """Importance-sampling bounds on log p(y, θ) and log p(θ) per point, over nuisance ψ.

    ψ is drawn M = ``num_nuisance`` times per point from r(ψ|θ), the model run with the
    targets θ held at the simulated values; the weights are p(y, θ, ψ) / r(ψ|θ) and
    p(θ, ψ) / r(ψ|θ), both products of the targets' (and y's) conditional densities.
    Lower sides: log of the mean weight (Brekelmans et al. 2022, eq. 5 right); upper
    sides: the EUBO, the simulated ψ in place of the last draw (eq. 5 left).

    Args:
        density: the model's density; its observed sites are y.
        x: simulated y ``{site: (N, ...)}``; z: the simulated latents (N, D), packed.
        targets: the target latent sites θ (the others are ψ).
        num_nuisance: M >= 1.

    Returns:
        ``(lower_log_p_y_theta, upper_log_p_y_theta, lower_log_p_theta, upper_log_p_theta)``,
        each (N,), nats (densities of θ in its constrained space).
    """
    M = num_nuisance
    true = density.unpack(z[None])  # {site: (1, 1.., N, ...)}
    fixed = {k: true[k].expand((M,) + true[k].shape[1:]) for k in targets}
    scored = tuple(targets) + density.obs_sites

    def weights(lps):
        log_theta = sum(lps[k] for k in targets)
        return log_theta + sum(lps[o] for o in density.obs_sites), log_theta

    # one model run draws ψ ~ r(ψ|θ) with y observed and scores θ and y; a draw where
    # p(θ|ψ) = 0 has log weight -inf, not an error (as in IWAE's draws)
    with pyro.validation_enabled(False):
        a, b = weights(density.conditional_log_probs(x, M, fixed, scored))
    at_truth = density.drawn_log_probs(x, z)  # the simulation's own, or scored anew
    a0, b0 = weights(at_truth if at_truth is not None else density.site_log_probs(true, x, 1, z.shape[0]))

    def eubo(w, w0):  # the simulated ψ in place of the last draw
        return log_mean_exp(torch.cat([w[: M - 1], w0]), 0)

    return log_mean_exp(a, 0), eubo(a, a0), log_mean_exp(b, 0), eubo(b, b0)


def _check_targets(density: ModelDensity, targets) -> tuple[str, ...]:
    latents = [s.name for s in density.latent_sites]
    if targets is None:
        return tuple(latents)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in targets if t not in latents]
    if unknown or not targets:
        raise ValueError(f"target_labels {list(targets)} must be latent sites of the model: {latents}")
    return targets


def _check_order(density: ModelDensity) -> None:
    """Nuisance bounds need every latent site before the observations (y is a leaf)."""
    seen_obs = None
    for name, fn in density.site_fns.items():
        if isinstance(fn, dist.Unit):
            raise ValueError(f"site {name!r} is a pyro.factor: nuisance latents need a model without factors")
        if name in density.obs_sites:
            seen_obs = seen_obs or name
        elif seen_obs is not None:
            raise ValueError(
                f"latent site {name!r} is sampled after observation site {seen_obs!r}: with nuisance "
                "latents, pyro_mi.eig needs every latent site before the observations")


def eig(
    model: Callable,
    design: torch.Tensor | Sequence[torch.Tensor],
    observation_labels: str | Sequence[str],
    target_labels: str | Sequence[str] | None = None,
    *,
    bound: Bound | None = None,
    method: str = "iwae",
    proposal: str = "prior",
    batch_dims: int | None = None,
    num_data: int = 1024,
    num_nuisance: int = 100,
    seed: int | None = 0,
    fit_steps: int | None = None,
    differentiable: bool = False,
    share_particles: bool = False,
    vectorize: str = "auto",
    progress: bool = False,
    **options,
) -> EIGResult:
    """Lower and upper bounds on the expected information gain of each design, in nats.

    **A design batch** of B designs runs in one of two ways, recorded in each result's
    ``settings["designs"]``:

    * ``"together"`` (when the method's per-point values depend on their own point alone:
      ``ba``, ``iwae`` and the AIS methods, with the prior proposal): one run of B·N
      simulated experiments, the model called on a batch of designs whose design plate
      serves as pyro_mi's data plate (experiment i has design i % B; checked like any
      data-plate model), then split per design. One model trace evaluates every design,
      as in ``nmc_eig``.
    * ``"one by one"`` (fitted proposals, critics, or a model whose design plates do not
      enclose every site): each design runs alone from ``seed``; the reason is in the
      results' notes.

    Either way design b's bounds are those of design b alone, with its own draws.

    Args:
        model: a Pyro model called as ``model(design)`` for one design (``model(design[b])``
            for each design of a batch), with no data plate: one call is one experiment;
            called on a batch of designs too when its plates declare the batch.
        design: a tensor; its leading ``batch_dims`` dims index designs. Or a list of single
            designs, of any shapes: those of one shape run as one design batch (as a tensor of
            them would), and the result has batch shape ``(len(design),)`` in the list's order.
        batch_dims: how many leading dims of ``design`` form the design batch; default:
            those the model declares as its leftmost plates (see :func:`design_batch_shape`).
        observation_labels: the observation site(s) y.
        target_labels: the latent sites θ whose information gain is wanted (default: every
            latent site). The others are nuisance latents ψ, marginalised by
            :func:`nuisance_log_bounds` with ``num_nuisance`` draws per point; then ``method``
            must bound log p(y) per point (``iwae`` or an AIS method).
        bound: the bound, declared (``IWAE(num_particles=100)``, ``AIS(...)``; :mod:`pyro_mi.bounds`),
            instead of ``method`` and its options.
        method: a key of :data:`pyro_mi.bounds.METHODS` (default ``"iwae"``), its options in ``**options``.
        proposal: ``"prior"`` (default, as Pyro's ``nmc_eig``) or ``"guide"`` (a BA-fitted
            encoder per design, ``fit_steps`` steps).
        num_data: N >= 2 simulated experiments per design.
        num_nuisance: M, nuisance draws per point (with nuisance latents).
        seed: the run (one by one: every design's run) starts from this seed (see
            :func:`pyro_mi.estimate_mi`).
        differentiable: ``iwae`` and ``ba`` only: simulate by ``rsample`` and keep the
            graph, so that ``lower`` and ``upper`` are differentiable in the design and the
            model's parameters (pathwise gradients; every latent and observation site must
            have ``rsample``).
        share_particles: ``iwae`` with the prior proposal only (shorthand for
            ``bound=IWAE(num_particles=K, share_particles=True)``): draw a design's K particles
            once and share them by its N experiments, as ``nmc_eig`` shares its inner samples
            (:class:`~pyro_mi.bounds.IWAE`). The model then runs on K·B draws rather than K·N·B, which is
            faster where the model's own computation dominates, and each side stays a bound in
            expectation; but the variance over the shared draws does not fall with N, so at small
            K it is the less accurate choice (measurements: the docs' tuning page). Each standard
            error adds the jackknife variance over the shared draws.
        vectorize: passed to :class:`~pyro_mi.density.ModelDensity`.
        progress: show progress bars.
        **options: method options (``num_particles``, ``num_steps``, ...).

    Returns:
        :class:`EIGResult`: ``lower``/``upper`` of shape ``batch_shape`` and one
        :class:`~pyro_mi.result.MIResult` per design. Each result's per-point values are
        EIG bounds per simulated experiment; its notes say which side bounds what.

    Raises:
        ValueError: unknown method or option, a target that is not a latent site,
            nuisance latents with a method that does not bound log p(y), or sampled after
            the observations, ``differentiable`` with a method other than iwae/ba or a site
            without rsample, ``share_particles`` where particles cannot be shared (the reason:
            another method or proposal, K < 10, nuisance latents, ``points_per_block``, a model
            run point by point or folded, an observation site that is not the last sample
            site), and every input error of :func:`pyro_mi.estimate_mi`.
    """
    if isinstance(design, (list, tuple)):
        if batch_dims is not None:
            raise ValueError("batch_dims applies to a tensor of designs; a list holds single designs")
        return _eig_of_list(list(design), lambda d: eig(
            model, d, observation_labels, target_labels, bound=bound, method=method, proposal=proposal, batch_dims=1,
            num_data=num_data, num_nuisance=num_nuisance, seed=seed, fit_steps=fit_steps, differentiable=differentiable,
            share_particles=share_particles, vectorize=vectorize, progress=progress, **options))
    if bound is not None:  # the declaration as the shorthand's method and options
        method, options = flatten_bound(bound, method, options)
        differentiable = bool(options.pop("differentiable", False)) or differentiable
        share_particles = bool(options.pop("share_particles", False)) or share_particles
    if not isinstance(design, torch.Tensor):
        raise TypeError(f"design must be a tensor or a list of tensors, got {type(design).__name__}")
    if design.numel() == 0:
        raise ValueError(f"design is empty (shape {tuple(design.shape)}): give at least one design")
    if design.is_floating_point() and not bool(torch.isfinite(design).all()):
        bad = (~torch.isfinite(design)).nonzero()[0].tolist()
        raise ValueError(f"design has a non-finite entry at index {bad} (value {float(design[tuple(bad)])}): every "
                         "design must be finite")
    if differentiable:
        if method not in ("iwae", "ba"):
            raise ValueError(f"differentiable=True supports methods 'iwae' and 'ba', not {method!r}")
        options["differentiable"] = True
    if share_particles:
        if method != "iwae" or proposal != "prior":
            raise ValueError(f"share_particles=True needs method 'iwae' with the prior proposal, not {method!r} "
                             f"with {proposal!r}")
        options["share_particles"] = True
    check_method_options(method, num_data, options)
    if not isinstance(num_nuisance, int) or num_nuisance < 1:
        raise ValueError(f"num_nuisance must be a positive integer, got {num_nuisance!r}")
    obs = (observation_labels,) if isinstance(observation_labels, str) else tuple(observation_labels)
    start = time.perf_counter()
    if batch_dims is None:
        batch_shape = design_batch_shape(model, design)
    elif isinstance(batch_dims, int) and 0 <= batch_dims < design.dim():
        batch_shape = design.shape[:batch_dims]
    else:
        raise ValueError(f"batch_dims must be an integer in [0, {design.dim() - 1}], got {batch_dims!r}")
    designs = design.reshape((-1,) + design.shape[len(batch_shape):])
    together = False
    why = _one_by_one_reason(method, proposal, vectorize) if batch_shape else None
    if batch_shape and why is None:
        try:
            results = _bound(lambda: _probed(model, ("together", obs, *_layout(designs)), dict(covariates={"design": designs}),
                                             lambda: _designs_density(model, designs, obs)), len(designs), target_labels,
                             num_nuisance, method, proposal, num_data, fit_steps, differentiable, share_particles,
                             progress, seed, options)
            together = True
        except _NotTogether as e:
            why = str(e)
    if not together:
        results = [_bound(lambda: _probed(model, ("one", obs, vectorize, *_layout(d)), dict(model_args=(d,)),
                                          lambda: DesignDensity(model, obs, model_args=(d,), vectorize=vectorize)), 1,
                          target_labels, num_nuisance, method, proposal, num_data, fit_steps, differentiable,
                          share_particles, progress, seed, options)[0] for d in designs]
    for r in results:
        r.settings["designs"] = "together" if together else "one by one"
        if batch_shape and not together:
            r.notes.append(f"the {len(designs)} designs ran one at a time: {why}")
    return _collect(results, batch_shape, time.perf_counter() - start)


#: methods whose per-point values depend on that point alone, when the proposal is the prior
_POINTWISE_METHODS = ("ba",) + _LOG_PX_METHODS


def _one_by_one_reason(method: str, proposal: str, vectorize: str) -> str | None:
    """Why a design batch must run one design at a time (None: it can run as one batch)."""
    if proposal != "prior":
        return "a fitted proposal is fitted to each design"
    if method not in _POINTWISE_METHODS:
        return f"{method} trains on each design's points"
    if vectorize not in ("auto", "plate"):
        return f"vectorize={vectorize!r} runs one design point by point"
    return None


#: the densities earlier calls probed, per model and design layout: a design optimisation calls eig hundreds
#: of times on one model, and what the probe learnt (sites, layout, the way of running a batch, its checks)
#: holds for every design of one shape (:meth:`DesignDensity.with_values` traces the model once to check)
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: layouts kept per model
_PROBED_PER_MODEL = 8


def _layout(design: torch.Tensor) -> tuple:
    return tuple(design.shape), design.dtype, design.device


def _probed(model: Callable, key: tuple, values: dict, build: Callable[[], DesignDensity]) -> DesignDensity:
    """The density of ``model`` at ``key`` probed by an earlier call, given the new ``values``
    (:meth:`DesignDensity.with_values`), or ``build()`` when there is none or its sites differ."""
    try:
        cache = _PROBED.setdefault(model, {})
    except TypeError:  # a model that takes no weak reference: probe every time
        return build()
    density = cache[key].with_values(**values) if key in cache else None
    if density is None:
        density = build()
        cache.pop(key, None)
        while len(cache) >= _PROBED_PER_MODEL:
            cache.pop(next(iter(cache)))
        cache[key] = density
    return density


class _NotTogether(Exception):
    """The design batch does not run as one data plate (the reason)."""


def _designs_density(model: Callable, designs: torch.Tensor, obs: Sequence[str]) -> DesignDensity:
    """The density of B designs x N experiments as one data-plate model: the model run on a
    batch of designs (B, ...), whose design plate then acts as the data plate, with design
    ``i % B`` at data point i (a covariate, see :class:`~pyro_mi.density.ModelDensity`).

    Raises:
        _NotTogether: the model does not run as a data-plate model on the batch (a site
            outside the design plate, sites that do not broadcast over pyro_mi's chains, or a
            point's density that depends on the other designs), with the reason.
    """
    def batched(design, **observed):
        return poutine.condition(model, data=observed)(design)

    try:  # the data template: the observations of one run on the batch
        density = DesignDensity(batched, obs, covariates={"design": designs})
    except ValueError as e:
        raise _NotTogether(f"the design batch does not run as one data plate ({str(e).splitlines()[0]})") from e
    if density.undeclared:
        raise _NotTogether(f"sites {list(density.undeclared)} have batch dims that no plate declares")
    return density


def _bound(make_density: Callable[[], ModelDensity], num_designs: int, target_labels, num_nuisance, method,
           proposal, num_data, fit_steps, differentiable, share_particles, progress, seed, options) -> list[MIResult]:
    """One seeded run of ``method`` on the density ``make_density()`` (of one design, or of a batch of
    ``num_designs`` designs as data points, design i % B at point i), ``num_data`` experiments per
    design; one result per design."""
    run_options = dict(options)  # a fresh seeded generator per run
    with seeded(seed, method, run_options):
        density = make_density()
        check_declared_batch_dims(density.undeclared)
        if density.enumerated:
            raise ValueError(f"pyro_mi.eig does not sum out enumerated discrete sites ({list(density.enumerated)}); "
                             "marginalise them out in the model")
        targets = _check_targets(density, target_labels)
        nuisance = [s.name for s in density.latent_sites if s.name not in targets]
        if nuisance:
            if method not in _LOG_PX_METHODS:
                raise ValueError(f"with nuisance latents {nuisance}, method must bound log p(y) per point: one "
                                 f"of {list(_LOG_PX_METHODS)}, not {method!r}")
            _check_order(density)
        if share_particles and nuisance:
            raise ValueError(f"share_particles=True, but the particles cannot be shared: the nuisance latents "
                             f"{nuisance} are drawn per experiment")
        result = simulate_and_bound(density, method, proposal, None, num_data * num_designs, fit_steps, progress,
                                    run_options, assessed=False)
        if nuisance:
            with torch.enable_grad() if differentiable else torch.no_grad():
                result = _with_nuisance(density, result, targets, nuisance, num_nuisance)
        # design b's experiments are the points b, b + B, ...; each design's result is judged on its own
        results = [result.select(slice(b, None, num_designs)) for b in range(num_designs)]
        for r in results:
            assess(r, density.mi_ceiling(), ADVICE.get(method, ""))
    for r in results:
        r.settings.update({"proposal": proposal, "seed": seed, "targets": list(targets),
                           "share_particles": share_particles})
    return results


def _with_nuisance(density, result: MIResult, targets, nuisance, num_nuisance) -> MIResult:
    """The EIG bounds of a full-latent ``result`` with nuisance latents marginalised."""
    lo_yt, up_yt, lo_t, up_t = nuisance_log_bounds(density, result.x, result.z, targets, num_nuisance)
    lo_y, up_y = result.diagnostics["log_p_x_lower"], result.diagnostics["log_p_x_upper"]
    lower, upper = lo_yt - up_t - up_y, up_yt - lo_t - lo_y
    require_finite("eig", {"the nuisance bounds on log p(y, θ)": lo_yt + up_yt,
                           "the nuisance bounds on log p(θ)": lo_t + up_t})
    return MIResult(
        result.method,
        lower_per_point=lower,
        upper_per_point=upper,
        settings={**result.settings, "num_nuisance": num_nuisance, "nuisance": list(nuisance)},
        diagnostics={**result.diagnostics, "log_p_y_theta_lower": lo_yt, "log_p_y_theta_upper": up_yt,
                     "log_p_theta_lower": lo_t, "log_p_theta_upper": up_t},
        warnings=result.carried()[0],
        notes=result.carried()[1] + [
            f"nuisance latents {list(nuisance)} are marginalised: lower = importance lower bound on "
            f"log p(y, θ) - EUBO on log p(θ) - {result.method}'s upper bound on log p(y); upper = EUBO on "
            f"log p(y, θ) - importance lower bound on log p(θ) - its lower bound on log p(y), with "
            f"{num_nuisance} draws of the nuisance latents per point from the model given θ; each side is "
            "a bound in expectation"],
        x=result.x,
        z=result.z,
    )


def _eig_of_list(designs: list, run: Callable[[torch.Tensor], EIGResult]) -> EIGResult:
    """:func:`eig` of a list of single designs: those of one shape, dtype and device stacked into a
    design batch and bounded by ``run(batch)``; results in the list's order."""
    if not designs or not all(isinstance(d, torch.Tensor) for d in designs):
        raise TypeError("design must be a tensor or a non-empty list of tensors (one design each)")
    start = time.perf_counter()
    groups: dict = {}
    for i, d in enumerate(designs):
        groups.setdefault(_layout(d), []).append(i)
    results: list = [None] * len(designs)
    for members in groups.values():
        batch = run(torch.stack([designs[i] for i in members]))
        for i, r in zip(members, batch.results):
            results[i] = r
    return _collect(results, torch.Size([len(designs)]), time.perf_counter() - start)


def _collect(results: list[MIResult], batch_shape: torch.Size, seconds: float) -> EIGResult:
    def stack(side):
        values = [getattr(r, f"{side}_per_point") for r in results]
        if any(v is None for v in values):
            return None, None
        means = torch.stack([v.mean() for v in values]).reshape(batch_shape)  # keeps the graph
        stderrs = torch.tensor([getattr(r, f"{side}_stderr") for r in results])
        return means, stderrs.reshape(batch_shape)

    (lower, lower_se), (upper, upper_se) = stack("lower"), stack("upper")
    return EIGResult(lower, upper, lower_se, upper_se, batch_shape, results, seconds)
