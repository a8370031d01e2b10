"""Barber–Agakov and IWAE bounds on generative MI (Brekelmans et al. 2022, sec. 2.2–2.3, App. B).

With (x_i, z_i) ~ p(x, z) simulated from the model, I(x; z) = E[log p(x|z)] - E[log p(x)]
(eq. 1), so every lower (upper) bound on log p(x_i) gives an upper (lower) bound on
MI. With log weights log w = log p(x, z) - log q(z|x):

* BA lower (eq. 3 left):  log q(z_i|x_i) - log p(z_i)
* BA upper (eq. 3 right): log p(x_i|z_i) - E_q[log w]
* IWAE upper (eq. 5 left, ELBO):  log p(x_i|z_i) - log (1/K) sum_{k=1..K} w_k,  z_k ~ q
* IWAE lower (eq. 5 right, EUBO): log p(x_i|z_i) - log (1/K) (w(z_i) + sum_{k=1..K-1} w_k)

The EUBO uses the simulated z_i as its one posterior sample, so it needs no extra
inference. With K = 1 the IWAE bounds equal the BA bounds on the same draw.
Samples are drawn in chunks and combined with a running logsumexp, so K = 10^5 for
64 data points runs in bounded memory. The points run in blocks of ``points_per_block``,
each drawing from torch's RNG seeded from (run seed, block), shared out across processes
under ``torch.distributed`` (:mod:`pyro_mi.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import torch
from tqdm.auto import tqdm

from ..density import Data, ModelDensity
from ..distributed import POINTS_PER_BLOCK, block_seed, check_points_per_block, map_blocks, seeded_global_rng, world
from ..proposal import GaussianEncoder, PriorProposal, proposal_from_point
from ..result import MIResult, finite_side, require_finite
from ..runtime import Runtime
from ..weights import leave_one_out_log_ratios, log_weight_sums
from .declaration import NUM_PARTICLES_FLAG, Bound, check_positive_int

#: latent and observed numbers per chunk of (particle, data point) log-weight evaluations (at
#: most 2^20 evaluations): a small model takes few, large chunks, and so few model runs
CHUNK_NUMBERS = 1 << 22
#: a warning is attached below this mean importance ESS (as for AIS)
ESS_WARNING = 1.5
#: the fewest particles shared by the points (``IWAE(share_particles=True)``): the jackknife over
#: them has K - 2 degrees of freedom
SHARED_MIN_PARTICLES = 10


def importance_log_weights(density: ModelDensity, proposal, x: Data, z: torch.Tensor):
    """log w of the simulated z (the posterior sample) and log p(x|z): both (N,).

    Also returns log q(z|x) - log p(z) (the BA lower bound per point).
    """
    if isinstance(proposal, PriorProposal):  # log w = log p(x|z): at the simulated pairs, from their own draw
        log_lik = density.log_likelihood(x, z)
        return log_lik, log_lik, torch.zeros_like(log_lik)
    log_prior, log_lik = density.log_terms(x, z)
    if isinstance(proposal, GaussianEncoder):
        log_q = proposal.log_prob(z, x, log_prior=log_prior)
    else:
        log_q = proposal.log_prob(z, x)
    return log_prior + log_lik - log_q, log_lik, log_q - log_prior


def evals_per_chunk(density: ModelDensity) -> int:
    """(particle, data point) log-weight evaluations per chunk: at most 2^20, and at most
    CHUNK_NUMBERS latent and observed numbers."""
    return min(1 << 20, CHUNK_NUMBERS // (density.latent_dim + density.obs_dim))


def default_points_per_block(density: ModelDensity, num_particles: int) -> int:
    """The default block of BA and IWAE: the points whose K particles fill one chunk, and at least
    POINTS_PER_BLOCK. Each block costs a few model runs of fixed (Python) cost, so a small model
    with few particles runs in few large blocks (1024-point blocks made 15,000 points with K = 30
    1.8 times as slow); a block stays large enough to share out under torchrun."""
    return max(POINTS_PER_BLOCK, evals_per_chunk(density) // num_particles)


def _per_block(density, proposal, x, z, points_per_block, num_particles, differentiable, terms, progress: bool,
               desc: str) -> dict:
    """``terms(density_of_block, proposal_of_block, x_block, z_block) -> {name: (n,)}`` for every
    block of points (this rank's, gathered), each block on torch's RNG seeded from (one draw of
    it, block); returns the names' (N,) values. ``points_per_block`` None: the default for
    ``num_particles`` (:func:`default_points_per_block`). One progress bar (``terms``' last
    argument) counts the log-weight evaluations of every block."""
    if points_per_block is None:
        points_per_block = default_points_per_block(density, num_particles)
    check_points_per_block(points_per_block)
    if differentiable and world()[1] > 1:
        raise ValueError("differentiable=True needs the autograd graph of every point in one process; run it "
                         "without torch.distributed")
    x = density.check_data(x)
    seed = int(torch.randint(2**62, ()))

    def block(b, lo, hi):
        whole = (lo, hi) == (0, z.shape[0])  # the simulated tensors themselves (see ModelDensity.log_likelihood)
        xb, zb = (x, z) if whole else ({k: v[lo:hi] for k, v in x.items()}, z[lo:hi])
        with seeded_global_rng(block_seed(seed, b), z.device):
            return terms(density.from_point(lo), proposal_from_point(proposal, lo), xb, zb, bar)

    with _bar(z.shape[0] * num_particles, progress, desc) as bar:
        blocks = map_blocks(block, z.shape[0], points_per_block, device=z.device)
    return {k: torch.cat([blk[k] for blk in blocks]) for k in blocks[0]}


def _bar(total: int, progress: bool, desc: str):
    """The run's one progress bar, over its (particle, data point) log-weight evaluations; shown
    when they take more than one chunk."""
    return tqdm(total=total, desc=desc, disable=not progress or total <= 1 << 20, leave=False, unit_scale=True)


def _stream(density, proposal, x, num_particles, bar):
    """Yields log weights (k, N) of proposal draws, chunk by chunk, K in all (the proposal's own
    ``log_weights`` where it has one: the prior's need one model run, not three); ``bar`` counts
    the (particle, point) evaluations."""
    N = next(iter(density.check_data(x).values())).shape[0]
    chunk = max(1, min(num_particles, evals_per_chunk(density) // max(N, 1)))
    log_weights = getattr(proposal, "log_weights", None)
    done = 0
    while done < num_particles:
        k = min(chunk, num_particles - done)
        # a draw where p(x, z) = 0 has log weight -inf: not an error
        with pyro.validation_enabled(False):
            if log_weights is not None:
                yield log_weights(x, k)
            elif isinstance(proposal, GaussianEncoder):  # its mixture needs log p(z): from the same model run
                z = proposal.draw(x, k)
                log_prior, log_lik = density.log_terms(x, z)
                yield log_prior + log_lik - proposal.log_prob(z, x, log_prior=log_prior)
            else:
                z, log_q = proposal.rsample(x, k)
                yield density.log_joint(x, z) - log_q
        done += k
        bar.update(k * N)


@dataclass(frozen=True)
class _ImportanceBound(Bound):
    """The options and run of the two importance-sampling bounds (:class:`IWAE`, :class:`BA`)."""

    num_particles: int = field(default=250, metadata=NUM_PARTICLES_FLAG)
    differentiable: bool = False

    RUNTIME = frozenset({"progress", "points_per_block"})

    def __post_init__(self):
        check_positive_int("num_particles", self.num_particles)

    def run(self, density, proposal, x, z, runtime: Runtime = Runtime()) -> MIResult:
        evaluate = {"iwae": _iwae, "ba": _ba}[self.name]
        with torch.enable_grad() if self.differentiable else torch.no_grad():
            return evaluate(density, proposal, x, z, self.num_particles, runtime.progress, runtime.points_per_block,
                            self.differentiable)


@dataclass(frozen=True)
class IWAE(_ImportanceBound):
    """IWAE lower and upper bounds on I(x; z) (Brekelmans et al. 2022, eq. 5; App. B).

    MI upper = log p(x_i|z_i) - log (1/K) sum_k w_k (the ELBO of K draws z_k ~ q(z|x_i));
    MI lower = log p(x_i|z_i) - log (1/K) (w(z_i) + sum_{k<K} w_k) (the EUBO, whose posterior
    sample is the simulated z_i), with log w = log p(x, z) - log q(z|x). K = 1 gives BA's pair.

    Attributes:
        num_particles: K, importance samples per data point (the EUBO uses the simulated z plus
            the first K-1 of them).
        differentiable: keep the autograd graph: the per-point values are differentiable in
            whatever x, z, the model and the proposal depend on (a design, model and guide
            parameters; pass x, z from ``density.sample(N, differentiable=True)``). Proposal draws
            are reparameterised (``rsample``).

        share_particles: draw K prior draws per template row (per design in :func:`pyro_mi.eig`)
            once and share them by all its points, as ``nmc_eig`` shares its inner samples
            (:func:`_shared_iwae`): the model runs on K·R draws rather than K·N. Each side stays a
            bound in expectation, and its standard error adds the jackknife variance over the shared
            draws (``diagnostics["{side}_jackknife"]``); but that variance does not fall with N, so
            at small K it is the less accurate choice. Needs the prior proposal, K >= 10, a density
            that can share its prior draws (``pyro_mi.eig``'s: one observed site sampled last, run
            batched), and no ``points_per_block``.

    Runtime: ``progress`` (one bar for the run when its K x N log weights take several chunks) and
    ``points_per_block`` (default: as many points as one chunk of 2^20 log-weight evaluations holds
    for K particles, at least 1024, :func:`default_points_per_block`).

    :meth:`run` returns an :class:`~pyro_mi.result.MIResult` with ``lower``/``upper`` in nats and the
    per-point values (N,); ``diagnostics["ess"]`` is the mean effective sample size
    (sum w)^2 / sum w^2 of the K proposal weights per data point.

    Raises:
        ValueError: K < 1, or K < 10 with ``share_particles`` (when declared); at :meth:`run`,
            mismatched shapes of x and z, ``differentiable`` under ``torch.distributed``, and
            ``share_particles`` where the particles cannot be shared (the reason).
    """

    share_particles: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.share_particles and self.num_particles < SHARED_MIN_PARTICLES:
            raise ValueError(f"share_particles=True: num_particles must be at least {SHARED_MIN_PARTICLES}, to "
                             f"estimate the variance over the shared draws, got {self.num_particles}")

    @property
    def name(self) -> str:
        return "iwae"

    def run(self, density, proposal, x, z, runtime: Runtime = Runtime()) -> MIResult:
        if not self.share_particles:
            return super().run(density, proposal, x, z, runtime)
        why = _unshared_reason(density, proposal, runtime)
        if why is not None:
            raise ValueError(f"share_particles=True, but the particles cannot be shared: {why}")
        with torch.enable_grad() if self.differentiable else torch.no_grad():
            return _shared_iwae(density, x, z, self.num_particles, runtime.progress)


def iwae_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``IWAE(**options).run(density, proposal, x, z, Runtime(**runtime options))``: the IWAE bounds of
    :class:`IWAE` with the options and runtime settings given by name (see :func:`~pyro_mi.bounds.declare`)."""
    from . import run_method

    return run_method("iwae", density, proposal, x, z, args, options)


def _iwae(density, proposal, x, z, num_particles, progress, points_per_block, differentiable) -> MIResult:
    K = num_particles

    def terms(density, proposal, xb, zb, bar):
        log_w_true, log_lik, _ = importance_log_weights(density, proposal, xb, zb)
        lse = torch.full_like(log_w_true, -math.inf)  # over all K draws
        lse_eubo = log_w_true.clone()  # the posterior sample and the first K-1 draws
        lse_sq = torch.full_like(log_w_true, -math.inf)
        nan_draws = torch.zeros_like(log_w_true)
        seen = 0
        for log_w in _stream(density, proposal, xb, K, bar):
            nan = torch.isnan(log_w)
            nan_draws = nan_draws + nan.sum(0)
            log_w = log_w.masked_fill(nan, -math.inf)  # a density that overflowed: zero weight, counted
            keep = min(log_w.shape[0], K - 1 - seen)  # every draw but the last one is in the EUBO
            head, total, total_sq = log_weight_sums(log_w, keep)
            lse_eubo = torch.logaddexp(lse_eubo, head)
            lse = torch.logaddexp(lse, total)
            lse_sq = torch.logaddexp(lse_sq, total_sq)
            seen += log_w.shape[0]
        ess = torch.exp(2 * lse - lse_sq).detach()  # pyro_mi.weights.importance_ess, accumulated over chunks
        return {"log_lik": log_lik, "elbo": lse - math.log(K), "eubo": lse_eubo - math.log(K), "ess": ess,
                "nan_draws": nan_draws}

    t = _per_block(density, proposal, x, z, points_per_block, K, differentiable, terms, progress, "IWAE")
    log_lik, elbo, eubo, ess = t["log_lik"], t["elbo"], t["eubo"], t["ess"]
    require_finite("iwae", {"log p(x|z) of the simulated points": log_lik})
    advice = "use a proposal closer to the posterior (a fitted guide), more num_particles, or ais"
    lower, no_lower = finite_side("iwae", "lower", log_lik - eubo,
                                  "the proposal's density is 0 at the simulated latents", advice)
    upper, no_upper = finite_side("iwae", "upper", log_lik - elbo, "every proposal draw has zero weight", advice)
    return MIResult(
        "iwae",
        lower_per_point=lower,
        upper_per_point=upper,
        settings={"num_particles": K},
        diagnostics={"ess": float(ess.mean()), "ess_per_point": ess, "log_p_x_lower": elbo, "log_p_x_upper": eubo,
                     "nan_draws": t["nan_draws"]},
        warnings=no_lower + no_upper,
        checks=(importance_warnings,),
        x=density.check_data(x),
        z=z,
    )


def _unshared_reason(density, proposal, runtime: Runtime) -> str | None:
    """Why K prior draws cannot be shared by the points of ``density`` (None: they can)."""
    if not hasattr(density, "shared_prior_likelihood"):
        return "pyro_mi.estimate_mi's density draws particles per point; pyro_mi.eig's shares a design's"
    if not isinstance(proposal, PriorProposal):
        return f"the proposal must be the prior, not {type(proposal).__name__}"
    if runtime.points_per_block is not None:
        return "option 'points_per_block' applies to per-point draws"
    if world()[1] > 1:
        return "under torch.distributed the points are shared out in blocks"
    return density.shared_prior_reason()


def _shared_iwae(density, x: Data, z: torch.Tensor, num_particles: int, progress: bool) -> MIResult:
    """IWAE's bounds with the prior as proposal and K prior draws z_k per template row R shared by
    the row's points (point i has row i % R; ``nmc_eig``'s inner samples): one :class:`MIResult`.

    With ℓ_k = log p(x_i|z_k) and ℓ_0 = log p(x_i|z_i) at the z_i that simulated x_i, point i's
    values are those of :class:`IWAE` with the prior as proposal (Brekelmans et al. 2022, eq. 5):
    upper (the ELBO side, nested Monte Carlo) ℓ_0 - log (1/K) Σ_{k=1..K} e^{ℓ_k}; lower (the EUBO
    side, prior contrastive estimation) ℓ_0 - log (1/K) (e^{ℓ_0} + Σ_{k=1..K-1} e^{ℓ_k}). Each has
    the expectation of its per-point draw, so each side stays a bound in expectation.

    The shared draws correlate the points, so each side's standard error adds to the variance
    over points the jackknife variance over its m shared draws (Efron & Stein 1981), from each
    point's log(S_(-j) / S) kept in ``diagnostics["{side}_jackknife"]`` (m, N) (conservative,
    where the delta method under-covered the NMC side in a 200-seed check): a selection of the
    points (one design's) has its own.
    """
    K, R = num_particles, density.template_rows
    x = density.check_data(x)
    N = next(iter(x.values())).shape[0]
    log_lik = density.log_likelihood(x, z)  # ℓ_0
    score, _ = density.shared_prior_likelihood(K)
    per_chunk = max(R, evals_per_chunk(density) // K // R * R)  # whole rows' multiples
    parts = []
    with _bar(N * K, progress, "IWAE") as bar:
        for lo in range(0, N, per_chunk):
            hi = min(N, lo + per_chunk)
            ll, ll0 = score({k: v[lo:hi] for k, v in x.items()}), log_lik[lo:hi]  # (K, n), (n,)
            head, total, total_sq = log_weight_sums(ll, K - 1)
            with_true = torch.logaddexp(ll0, head)
            with torch.no_grad():
                left_out = (leave_one_out_log_ratios(ll, total), leave_one_out_log_ratios(ll[: K - 1], with_true, ll0))
            parts.append((total, with_true, 2 * total - total_sq, *left_out))
            bar.update((hi - lo) * K)
    total, with_true, log_ess, upper_jk, lower_jk = (torch.cat(t, -1) for t in zip(*parts))
    elbo, eubo = total - math.log(K), with_true - math.log(K)
    require_finite("iwae", {"log p(x|z) of the simulated points": log_lik,
                            "the log p(x) lower bound (every prior draw has zero weight)": elbo,
                            "the log p(x) upper bound": eubo})
    ess = log_ess.exp().detach()
    return MIResult(
        "iwae",
        lower_per_point=log_lik - eubo,
        upper_per_point=log_lik - elbo,
        settings={"num_particles": K, "share_particles": True},
        diagnostics={"ess": float(ess.mean()), "ess_per_point": ess, "log_p_x_lower": elbo, "log_p_x_upper": eubo,
                     "lower_jackknife": lower_jk, "upper_jackknife": upper_jk},
        checks=(importance_warnings,),
        notes=[f"the K = {K} prior draws of each design (template row) are shared by its points (as nmc_eig's "
               "inner samples): each side is a bound in expectation, and its standard error adds the variance over "
               "the shared draws (jackknife) to the variance over points"],
        x=x,
        z=z,
    )


def importance_warnings(result: MIResult) -> list[str]:
    """IWAE's warnings derived from a result's points (one of its :attr:`~pyro_mi.result.MIResult.checks`):
    a low mean importance ESS of the K draws per point (:func:`ess_warnings`), and draws whose joint density
    could not be evaluated (``diagnostics["nan_draws"]``, per point)."""
    d = result.diagnostics
    warnings = ess_warnings(result.settings["num_particles"], d["ess_per_point"])
    nan = d.get("nan_draws")
    if nan is not None and int(nan.sum()):
        warnings.append(f"{int(nan.sum())} proposal draws (at {int((nan > 0).sum())} points) had a joint density that "
                        "could not be evaluated (NaN: an overflow in the model at extreme latents) and were given "
                        "zero weight")
    return warnings


def ess_warnings(num_particles: int, ess: torch.Tensor) -> list[str]:
    """IWAE's warning when the mean importance ESS of K draws per point, ``ess`` (N,), is below
    ESS_WARNING (none for K = 1)."""
    if num_particles == 1 or float(ess.mean()) >= ESS_WARNING:
        return []
    return [f"the importance ESS of the K = {num_particles} proposal weights is {float(ess.mean()):.2f} on average "
            f"(below {ESS_WARNING}): one draw dominates each log p(x) estimate, so the bounds may be loose; use a "
            "proposal closer to the posterior (a fitted guide) or AIS"]


@dataclass(frozen=True)
class BA(_ImportanceBound):
    """Barber–Agakov lower and upper bounds on I(x; z) (Brekelmans et al. 2022, eq. 3).

    Lower: E_p(x,z)[log q(z|x) - log p(z)] (gap E_p(x) KL[p(z|x) || q(z|x)]).
    Upper: E_p(x) E_q(z|x)[log q(z|x) - log p(x, z)] + E_p(x,z)[log p(x|z)]
    (gap E_p(x) KL[q(z|x) || p(z|x)]), its inner expectation averaged over ``num_particles``
    draws per data point. With a prior proposal the lower bound is 0.

    Attributes, runtime settings, result and errors as :class:`IWAE` (``num_particles`` default 1).
    """

    num_particles: int = field(default=1, metadata=NUM_PARTICLES_FLAG)

    @property
    def name(self) -> str:
        return "ba"


def ba_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``BA(**options).run(...)``: the Barber–Agakov bounds of :class:`BA` with options given by name
    (see :func:`~pyro_mi.bounds.declare`)."""
    from . import run_method

    return run_method("ba", density, proposal, x, z, args, options)


def _ba(density, proposal, x, z, num_particles, progress, points_per_block, differentiable) -> MIResult:
    def terms(density, proposal, xb, zb, bar):
        _, log_lik, ba_lower = importance_log_weights(density, proposal, xb, zb)
        total = torch.zeros_like(log_lik)
        for log_w in _stream(density, proposal, xb, num_particles, bar):
            total = total + log_w.sum(0)
        return {"log_lik": log_lik, "ba_lower": ba_lower, "upper": log_lik - total / num_particles}

    t = _per_block(density, proposal, x, z, points_per_block, num_particles, differentiable, terms, progress, "BA")
    log_lik, ba_lower, upper = t["log_lik"], t["ba_lower"], t["upper"]
    require_finite("ba", {"log p(x|z) of the simulated points": log_lik})
    advice = "use a proposal closer to the posterior (a fitted guide), or iwae"
    ba_lower, no_lower = finite_side("ba", "lower", ba_lower, "the proposal's density is 0 at the simulated latents",
                                     advice)
    upper, no_upper = finite_side("ba", "upper", upper, "a proposal draw has zero weight", advice)
    return MIResult(
        "ba",
        lower_per_point=ba_lower,
        upper_per_point=upper,
        warnings=no_lower + no_upper,
        settings={"num_particles": num_particles},
        x=density.check_data(x),
        z=z,
    )
