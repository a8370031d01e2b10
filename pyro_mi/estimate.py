"""`estimate_mi`: the Python front end of the ``pyro-mi estimate`` command."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import torch

from .bounds import Bound, bound_class, declare
from .checkpoint import check_output_path, rank_path
from .density import Data, ModelDensity
from .distributed import broadcast, broadcast_module, manual_seed, world
from .proposal import GaussianEncoder, GuideDensity, PriorProposal, fit_guide
from .assessment import assess
from .resources import memory_guard
from .result import MIResult


def make_proposal(
    density: ModelDensity,
    proposal: "str | Callable" = "guide",
    guide: Callable | None = None,
    *,
    fit_steps: int | None = None,
    progress: bool = True,
):
    """Builds the proposal q(z|x) for a bound.

    Args:
        density: the model's :class:`ModelDensity`.
        proposal: ``"prior"`` (q = p(z)) or ``"guide"``: the user's ``guide`` if given,
            else the default :class:`GaussianEncoder` fitted by :func:`fit_guide`; or a
            function ``density -> proposal`` (e.g. :func:`pyro_mi.examples.shipped_encoder`),
            fitted further only when ``fit_steps`` is given.
        guide: a Pyro guide, see :class:`GuideDensity`.
        fit_steps: BA fitting steps for the default encoder (default 1000); for a
            user's guide, fitting happens only when ``fit_steps`` is given.

    Raises:
        ValueError: an unknown ``proposal``.
    """
    if proposal == "prior":
        return PriorProposal(density)
    if callable(proposal):
        if guide is not None:
            raise ValueError("give a guide or a proposal function, not both")
        q = proposal(density)
        if fit_steps:
            fit_guide(density, q, num_steps=fit_steps, progress=progress)
        return q
    if proposal != "guide":
        raise ValueError(f"proposal must be 'prior', 'guide' or a function of the density, got {proposal!r}")
    if guide is not None:
        q = GuideDensity(density, guide)
        if fit_steps:
            fit_guide(density, q, num_steps=fit_steps, progress=progress)
        return q
    q = GaussianEncoder(density)
    fit_guide(density, q, num_steps=1000 if fit_steps is None else fit_steps, progress=progress)
    return q


def estimate_mi(
    model: Callable,
    obs_sites: str | Sequence[str],
    *,
    bound: Bound | None = None,
    method: str = "iwae",
    guide: Callable | None = None,
    proposal: "str | Callable" = "guide",
    num_data: int = 1024,
    seed: int | None = 0,
    fit_steps: int | None = None,
    data: Data | torch.Tensor | None = None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    vectorize: str = "auto",
    reparam: str = "auto",
    preset: str = "default",
    progress: bool = True,
    **options,
) -> MIResult:
    """Lower and upper bounds on the generative MI I(x; z) of a Pyro model, in nats.

    Simulates ``num_data`` pairs (x, z) ~ p(x, z) from the model and evaluates the
    chosen bound on them (Brekelmans et al. 2022, eq. 1: I = E log p(x|z) - E log p(x)).

    Under ``torch.distributed`` (``torchrun``; :mod:`pyro_mi.distributed`) every process
    simulates and fits the proposal, rank 0's are broadcast, and the bounds that take
    ``points_per_block`` (BA, IWAE, the AIS family, MINE-AIS, IBAL) share the blocks of points
    out; every rank returns the same result.

    Args:
        model: a one-data-point Pyro model, or a data-plate model with ``data``
            given (see :class:`~pyro_mi.density.ModelDensity`).
        obs_sites: the observed site name(s) x; the other sample sites are z.
        bound: the bound, declared (:mod:`pyro_mi.bounds`: ``IWAE(num_particles=1000)``,
            ``AIS(num_chains=8, num_steps=1000)``, ``MineAIS(ais=AIS(...))`` ...); with it, ``method``,
            ``preset`` and method options are not given (runtime settings still are).
        method: the shorthand: a key of :data:`METHODS` (``"ba"``, ``"iwae"``, ...), its options
            in ``**options``.
        guide: optional Pyro guide q(z|x) used as the proposal.
        proposal: ``"guide"`` (the guide, or a fitted default encoder), ``"prior"``, or a
            function ``density -> proposal`` (see :func:`make_proposal`).
        num_data: N >= 2, simulated data points.
        seed: makes the run reproducible: the run uses torch's global RNG seeded with it
            inside ``torch.random.fork_rng`` (the caller's RNG state is left as it was),
            and samplers get a ``torch.Generator`` seeded with it. None: the global RNG.
        fit_steps: BA fitting steps for the proposal (see :func:`make_proposal`).
        data, model_args, model_kwargs, vectorize: passed to :class:`ModelDensity`
            (``vectorize``: how a one-data-point model is run over a batch, ``"auto"``
            tries ``"plate"``, then ``"vmap"``, then ``"loop"``; the way taken, when it is
            not ``"plate"``, is in the result's notes).
        reparam: ``"auto"`` (default) non-centres the hierarchical location-scale latents
            with Pyro's ``LocScaleReparam`` (see :class:`ModelDensity`), and lets ``ais`` run
            each point in the parameterisation that suits it: the model as written or
            non-centred, or, for a latent its author non-centred by hand, centred
            (:mod:`pyro_mi.density.centring`); ``"none"`` runs the model as written. With a ``guide`` the model runs as written (the guide samples
            its sites).
        preset: ``"fast"``, ``"default"`` or ``"tight"``: the method's K, T and L from
            :data:`PRESETS` (options given explicitly override them); ``"tight"`` is what a paper
            would report, ``"fast"`` a first look.
        progress: show progress bars.
        **options: method options, e.g. ``num_particles=1000`` (the fields of the method's
            declaration), and the :class:`~pyro_mi.runtime.Runtime` settings it uses
            (``checkpoint``, ``points_per_block``, ``compile`` ...); ``differentiable=True``
            (``ba``, ``iwae``) simulates by ``rsample`` and keeps the graph, so that
            ``result.lower_per_point.mean()`` is differentiable in the model's parameters.

    Returns:
        :class:`~pyro_mi.result.MIResult` with ``seconds`` set and ``x`` / ``z`` the
        simulated points it bounds.

    Raises:
        ValueError: unknown method, an option the method does not take, ``bound`` with ``method``,
            ``preset`` or a method option, N < 2, an
            unwritable ``checkpoint`` / ``save_chains`` path (checked before any work),
            ``seed=None`` under torch.distributed, and every input error of the density layer
            and the bound.
        OutOfMemory: (a MemoryError) the run asked for more memory than there is, in one line
            naming N, the allocation and what to lower.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if bound is not None:
        method, options = flatten_bound(bound, method, options, preset)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
    if fit_steps is not None and (isinstance(fit_steps, bool) or not isinstance(fit_steps, int) or fit_steps < 0):
        raise ValueError(f"fit_steps must be None or a non-negative integer, got {fit_steps!r}")
    options = {**PRESETS[preset].get(_FAMILY.get(method, method), {}), **options}
    check_method_options(method, num_data, options)
    if seed is None and world()[1] > 1:
        raise ValueError("seed=None cannot run under torch.distributed: every process must simulate the same "
                         "points; give a seed")
    start = time.perf_counter()
    progress = progress and world()[0] == 0  # one bar, rank 0's
    lower = "num_data (--num-data), points_per_block (--points-per-block), or the method's num_particles / num_chains"
    with seeded(seed, method, options), memory_guard(f"{method} on N = {num_data} simulated points", lower):
        density = ModelDensity(model, obs_sites, model_args=model_args, model_kwargs=model_kwargs, data=data,
                               vectorize=vectorize, reparam="none" if guide is not None else reparam)
        result = simulate_and_bound(density, method, proposal, guide, num_data, fit_steps, progress, options)
    described = proposal if isinstance(proposal, str) else getattr(proposal, "description", "a function of the density")
    result.settings.update({"proposal": described, "seed": seed, "fit_steps": fit_steps, "reparam": density.reparam,
                            "preset": preset})
    result.seconds = time.perf_counter() - start
    return result


def flatten_bound(bound: Bound, method: str, options: dict, preset: str = "default") -> tuple[str, dict]:
    """A declared ``bound`` as the method name and flat options of the shorthand (``options`` holding
    runtime settings only).

    Raises:
        TypeError: ``bound`` is not a declaration.
        ValueError: ``method`` (other than the default), a ``preset`` or a method option given with it.
    """
    if not isinstance(bound, Bound):
        raise TypeError(f"bound must be a bound declaration such as IWAE(...) or AIS(...), got {bound!r}")
    own = [k for k in options if k in bound.option_fields()]
    if method != "iwae" or preset != "default" or own:
        given = "method" if method != "iwae" else "preset" if preset != "default" else own[0]
        raise ValueError(f"give the bound declared ({type(bound).__name__}(...)) or by method and options, not both "
                         f"({given!r} given with bound)")
    return bound.name, {**bound.options(), **options}


#: the method options of each preset, by method family (options given explicitly override them); "tight"
#: runs AIS long for every point, so without ``refine`` (a rerun at 10 T would take minutes)
PRESETS = {
    "fast": {"iwae": dict(num_particles=50), "ba": dict(num_particles=10),
             "ais": dict(num_chains=2, num_steps=30, num_leapfrog=2)},
    "default": {},
    "tight": {"iwae": dict(num_particles=5000), "ba": dict(num_particles=100),
              "ais": dict(num_chains=8, num_steps=5000, num_leapfrog=5, refine=0.0)},
}
_FAMILY = {"im-ais": "ais", "cr-ais": "ais", "bdmc": "ais"}


def check_method_options(method: str, num_data: int, options: dict) -> None:
    """Refuses an unknown method, an option it does not take or a bad one (by declaring it,
    :func:`~pyro_mi.bounds.declare`), N < 2 and unwritable output paths, before any work.

    Raises:
        ValueError: naming the method, option or path.
    """
    bound_class(method)
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 2:
        raise ValueError(f"num_data must be an integer >= 2 (a standard error needs two points), got {num_data!r}")
    declare(method, options)
    for key in ("checkpoint", "save_chains"):
        if options.get(key) is not None:  # each rank checks the checkpoint file it will write
            check_output_path(rank_path(options[key], world()[0]) if key == "checkpoint" else options[key], key)


@contextlib.contextmanager
def seeded(seed: int | None, method: str, options: dict):
    """Runs the block on torch's global RNG seeded with ``seed`` inside ``fork_rng`` (the caller's
    RNG state is left as it was), and gives a method that takes a ``generator`` one seeded with it.
    None: the global RNG as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        manual_seed(seed)
        if "generator" in bound_class(method).RUNTIME and options.get("generator") is None:
            options["generator"] = torch.Generator().manual_seed(seed)
        yield


def simulate_and_bound(density: ModelDensity, method: str, proposal: str, guide, num_data: int,
                       fit_steps: int | None, progress: bool, options: dict, assessed: bool = True) -> MIResult:
    """Simulates ``num_data`` pairs from ``density``, builds the proposal and evaluates the bound
    ``method`` with ``options`` (:func:`~pyro_mi.bounds.declare`) on them (the body of
    :func:`estimate_mi`, on the caller's RNG).

    Returns:
        the :class:`MIResult`, with ``x``/``z``, the density's notices, ``vectorize`` and the
        proposal fit's diagnostics filled in, and assessed (:func:`~pyro_mi.assessment.assess`)
        unless ``assessed`` is False.
    """
    seen = len(density.warnings)
    x, z = density.sample(num_data, differentiable=bool(options.get("differentiable")))
    simulated = density.warnings[seen:]  # about the bounded points (a proposal's own training pairs say nothing)
    if world()[1] > 1:  # every rank simulated and fits from the same seed; rank 0's copies make sure
        x, z = broadcast((x, z))
    q = make_proposal(density, proposal, guide, fit_steps=fit_steps, progress=progress)
    broadcast_module(q)
    fit = getattr(q, "fit_log", None)
    fallback = []
    if isinstance(q, GaussianEncoder) and getattr(fit, "prior_wins", False):
        fallback.append(f"the fitted encoder's held-out BA estimate ({fit.prior_weights[0.0]:.3g} nats, and no more mixed "
                     "with the prior) is below the prior's (0): the prior is the proposal")
        q = PriorProposal(density)
    generator = options.get("generator")
    start = generator.get_state() if generator is not None else None
    global_start = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    # a rerun writes no files and records no chains unless asked to
    quiet = {k: v for k, v in (("checkpoint", None), ("save_chains", None), ("record", False))
             if k in bound_class(method).RUNTIME}

    def bound(parent: MIResult | None, changes: dict) -> MIResult:
        began = time.perf_counter()
        opts = {**options, **changes}
        if start is not None:  # each rerun draws the same random numbers as the first run
            opts["generator"] = torch.Generator(device=generator.device).set_state(start)
        with torch.random.fork_rng(enabled=parent is not None):
            if parent is not None:
                torch.set_rng_state(global_start[0])
                if global_start[1] is not None:
                    torch.cuda.set_rng_state_all(global_start[1])
            spec, runtime = declare(method, opts)
            result = spec.run(density, q, x, z, runtime.replace(progress=progress))
        if result.x is None:
            result.x, result.z = x, z
        result.settings["vectorize"] = density.vectorize
        result.notes[:0] = density.notices
        result.warnings[:0] = simulated + fallback
        if fit is not None:  # what fitting the proposal reached (the held-out BA estimate, nats) and when it stopped
            result.diagnostics.update(proposal_fit_steps=fit.steps, proposal_fit_best_step=fit.best_step,
                                      proposal_fit_ba=fit.best_value, proposal_fit_stopped_early=fit.stopped_early)
            if isinstance(q, GaussianEncoder):
                result.diagnostics["proposal_prior_weight"] = q.prior_weight
        if assessed:  # else the caller assesses the results it makes of the points (eig: one per design)
            assess(result, density.mi_ceiling(), ADVICE.get(method, ""))
        if parent is not None:
            result.settings = {**parent.settings, **result.settings}
            result.seconds = time.perf_counter() - began
        result.rerun = lambda **more: bound(result, {**quiet, **more})
        return result

    return bound(None, {})


#: what tightens each method's sandwich, for the warnings of :func:`pyro_mi.assessment.assess`
ADVICE = {
    "ba": "iwae or ais, or a proposal closer to the posterior (a fitted guide)",
    "iwae": "more num_particles, ais, or a proposal closer to the posterior (a fitted guide)",
    **{m: "more num_steps (T) or num_chains (K)" for m in ("ais", "im-ais", "cr-ais", "bdmc")},
}
