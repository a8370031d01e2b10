"""GIWAE and InfoNCE lower bounds on generative MI for models with a known prior
(Brekelmans et al. 2022, sec. 2.4, eq. 7; App. C; App. O.2).

These bounds need the prior density p(z) and the ability to simulate
(x, z) ~ p(x, z) — not the likelihood p(x|z) (it is never evaluated for the
bound; the density layer's trace computes it alongside log p(z), unused). For a
data point (x, z_1) ~ p(x, z) and K - 1 negatives z_2..z_K ~ q_θ(z|x):

    I_GIWAE(q_θ, T_φ, K) = E[log q_θ(z_1|x) - log p(z_1)]                          (BA term)
                         + E[T_φ(x, z_1) - log (1/K) sum_k e^{T_φ(x, z_k)}]         (contrastive term)

(eq. 7). The contrastive term is at most log K. With a constant critic it is
exactly 0 and GIWAE equals BA, for every K; with K = 1 it is 0 for every critic.
InfoNCE is GIWAE with q = p(z): the BA term is 0 and the bound is <= log K.
For a fixed q, GIWAE <= IWAE <= BA + log K (Cor. 2.3; equality of the first for
the optimal critic T* = log p(x, z)/q(z|x) + c(x), Cor. 2.2).

q_θ and T_φ are trained jointly (App. O.2) on fresh simulated pairs at every
step, with early stopping on a fixed simulated validation set with fixed
negatives; the reported bound is evaluated on the (x, z) passed in, which
played no part in training.

Why the default critic reads z standardised by q (:class:`ResidualCritic`):
when q is already a good (BA-fitted) Gaussian, T* - c(x) = log p(z|x) - log q(z|x)
is a fraction of a nat in size and varies on the posterior's scale (e.g. 0.1 of
the prior's on the linear VAE). An MLP on the raw [x, z] does not find it from
the noisy contrastive gradient: it stays constant in z, the contrastive term
stays 0 and early stopping keeps the start (GIWAE = BA). On
u = (z - mu_q(x)) / sigma_q(x), T* is smooth and O(1)-scaled (a quadratic for
Gaussian posteriors).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..critics import JointCritic, mlp
from ..density import Data, ModelDensity
from ..distributed import block_seed, manual_seed, seeded_global_rng
from ..critics import check_critic
from ..proposal import GaussianEncoder, PriorProposal
from ..result import MIResult
from ..runtime import Runtime
from ..training import train
from .declaration import BATCH_SIZE_FLAG, LR_FLAG, MAX_STEPS_FLAG, NUM_PARTICLES_FLAG, Bound, check_positive_int

#: (particle, data point) critic evaluations per chunk at evaluation
CHUNK_EVALS = 1 << 16
#: training batches simulated by one model run
SIMULATION_POOL = 16
#: nats: a validation gain this small does not renew early stopping's patience (InfoNCE at log K)
MIN_DELTA = 1e-3


def simulated_batches(density: ModelDensity, batch_size: int):
    """``batch(step)``: fresh simulated pairs ``({site: (batch_size, ...)}, z (batch_size, D))`` for
    training step ``step`` >= 1, simulated :data:`SIMULATION_POOL` batches per model run: one run per
    pool instead of per training step (at batch 256 on linear-vae, a run costs as much as a step).
    Each pool has its own seed, derived from one draw of torch's global RNG here, so the batch of a
    step does not depend on the steps before it (a resumed fit gets the batches it would have)."""
    seed = int(torch.randint(2**62, ()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # whose RNG the model may draw from
    pool: dict = {}

    def batch(step: int):
        p, i = divmod(step - 1, SIMULATION_POOL)
        if p not in pool:
            pool.clear()
            with torch.no_grad(), seeded_global_rng(block_seed(seed, p), device):
                pool[p] = density.sample(batch_size * SIMULATION_POOL)
        x, z = pool[p]
        lo = i * batch_size
        return {k: v[lo : lo + batch_size] for k, v in x.items()}, z[lo : lo + batch_size]

    return batch


class StandardizedCritic(nn.Module):
    """A critic T(x, z) on the model's flattened x, standardised with fixed statistics.

    Args:
        critic: T(x_std, z) with x_std (..., obs_dim) and z (..., D) -> (...,).
        x_mean, x_std: (obs_dim,) statistics of the simulated x.
    """

    def __init__(self, critic: nn.Module, x_mean: torch.Tensor, x_std: torch.Tensor):
        super().__init__()
        self.critic = critic
        self.register_buffer("x_mean", x_mean)
        self.register_buffer("x_std", x_std)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.critic((x - self.x_mean) / self.x_std, z)


class ResidualCritic(nn.Module):
    """A GIWAE critic on x and the proposal-standardised latent u = (z - mu_q(x)) / sigma_q(x).

        T(x, z) = MLP([x_std, u]) + uᵀ A u + b(x_std)ᵀ u

    The optimal GIWAE critic is T* = log p(z|x) - log q(z|x) + c(x) (Cor. 2.2). When
    q is a good Gaussian fit of the posterior, T* is a small, smooth function of
    the residual u (for a Gaussian posterior, a quadratic in u: the term uᵀ A u
    captures the posterior correlations a diagonal q misses); as a function of
    the raw z it is a narrow ridge around mu_q(x) that an MLP on [x, z] does not
    find. The linear term b(x)ᵀu (b an MLP of x) corrects q's mean: for a Gaussian
    posterior N(m(x), S), T* = uᵀ A u + b(x)ᵀ u + c(x) with b(x) = C⁻¹ (m(x) - mu_q(x)) / sigma_q(x)
    (C the posterior correlation in u), a product of x and u that an MLP on [x, u] represents
    poorly; q's mean error can carry most of BA's gap (the docs' tuning page). The last layers of both MLPs and A start at zero, so T = 0 at the start and
    GIWAE starts exactly at BA. The critic reads q's *current* mean and scale
    (q is not registered as a submodule: it is trained, saved and restored as
    the proposal); u uses only q and x, never p(x|z), so the bound stays eq. 7.

    Args:
        proposal: the :class:`~pyro_mi.proposal.GaussianEncoder` q(z|x).
        hidden_sizes: widths of the MLP's hidden layers.

    Call: ``critic(x_flat (..., obs_dim), z (..., D)) -> (...,)``, broadcasting leading dims.
    """

    def __init__(self, proposal: GaussianEncoder, hidden_sizes=(256, 256)):
        super().__init__()
        if not isinstance(proposal, GaussianEncoder):
            raise TypeError(f"proposal must be a GaussianEncoder, got {type(proposal).__name__}")
        self._proposal = (proposal,)  # a tuple hides it from nn.Module registration
        D = proposal.density.latent_dim
        self.mlp = JointCritic(proposal.density.obs_dim, D, tuple(hidden_sizes))
        last = self.mlp.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.quadratic = nn.Parameter(torch.zeros(D, D))
        self.linear = mlp((proposal.density.obs_dim, *hidden_sizes[:1], D))
        nn.init.zeros_(self.linear[-1].weight)
        nn.init.zeros_(self.linear[-1].bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = self._proposal[0]
        mu, sigma = q.loc_scale(x)
        u = (z - mu) / sigma
        xs = (x - q.x_mean) / q.x_std
        return self.mlp(xs, u) + ((u @ self.quadratic + self.linear(xs)) * u).sum(-1)


def default_giwae_critic(
    density: ModelDensity, hidden_sizes=(256, 256), num_standardize: int = 1024, proposal=None
) -> nn.Module:
    """The default GIWAE critic (App. O.2 uses a ReLU MLP of width 2000 on [x, z]).

    With a :class:`~pyro_mi.proposal.GaussianEncoder` proposal: a
    :class:`ResidualCritic` on [standardised x, (z - mu_q(x)) / sigma_q(x)] that
    starts at T = 0 (GIWAE = BA). Otherwise (the prior, i.e. InfoNCE, or a user's
    guide): a ReLU MLP on [standardised flattened x, z], the standardisation
    statistics from ``num_standardize`` simulated x. Built on the device and
    dtype of the simulated data.
    """
    with torch.no_grad():
        xf = density.flatten_data(density.sample(num_standardize)[0])
    if isinstance(proposal, GaussianEncoder):
        return ResidualCritic(proposal, hidden_sizes).to(device=xf.device, dtype=xf.dtype)
    critic = JointCritic(density.obs_dim, density.latent_dim, tuple(hidden_sizes)).to(device=xf.device, dtype=xf.dtype)
    return StandardizedCritic(critic, xf.mean(0), xf.std(0).clamp_min(1e-3))


def giwae_terms(
    density: ModelDensity,
    proposal,
    critic,
    x: Data,
    z: torch.Tensor,
    num_particles: int,
    *,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point BA and contrastive terms of GIWAE (Brekelmans et al. 2022, eq. 7).

    Args:
        density: the model's density layer (only ``log_prior`` and ``flatten_data`` are used).
        proposal: q(z|x) with ``rsample(x, K) -> (z (K,N,D), log_q)`` and ``log_prob(z, x)``.
        critic: ``critic(x_flat (..., N, obs_dim), z (..., N, D)) -> (..., N)``.
        x: observations ``{site: (N, ...)}``; z: (N, D) their simulated latents (the positives).
        num_particles: K; K - 1 negatives are drawn from the proposal per point.
        chunk: negatives per chunk (default: bounded by :data:`CHUNK_EVALS`); the
            contrastive term is accumulated by a running logsumexp.

    Returns:
        ``(ba, contrastive)``, each (N,), nats; differentiable in the proposal's
        and the critic's parameters (reparameterised negatives).
    """
    xf = density.flatten_data(x)
    N = xf.shape[0]
    ba = proposal.log_prob(z, x) - density.log_prior(z, x)
    t_pos = critic(xf, z)
    lse = t_pos
    m = num_particles - 1
    step = chunk or max(1, CHUNK_EVALS // max(N, 1))
    done = 0
    while done < m:
        k = min(step, m - done)
        z_neg, _ = proposal.rsample(x, k)
        lse = torch.logaddexp(lse, torch.logsumexp(critic(xf.unsqueeze(0), z_neg), 0))
        done += k
    return ba, t_pos - (lse - math.log(num_particles))


@dataclass(frozen=True)
class _Contrastive(Bound):
    """The options GIWAE and InfoNCE share (see :class:`GIWAE`)."""

    num_particles: int = field(default=100, metadata=NUM_PARTICLES_FLAG)
    critic: nn.Module | None = None
    max_steps: int = field(default=1000, metadata=MAX_STEPS_FLAG)
    batch_size: int = field(default=256, metadata=BATCH_SIZE_FLAG)
    lr: float = field(default=1e-2, metadata=LR_FLAG)
    train_particles: int | None = None
    hidden_sizes: tuple[int, ...] = (64, 64)
    lr_schedule: str = "cosine"
    num_val: int = 256
    eval_every: int = 100
    patience: int = 5

    def __post_init__(self):
        check_positive_int("num_particles", self.num_particles)
        check_positive_int("train_particles", self.train_particles, optional=True)
        check_positive_int("batch_size", self.batch_size)


@dataclass(frozen=True)
class GIWAE(_Contrastive):
    """GIWAE lower bound on I(x; z), trained jointly over q_θ(z|x) and the critic T_φ (eq. 7).

    The proposal: a :class:`~pyro_mi.proposal.GaussianEncoder` passed in (e.g. the
    BA-fitted default encoder of ``estimate_mi``) is *copied* and the copy is
    trained jointly with the critic (App. O.2), so the caller's encoder is left
    unchanged; any other proposal (a user's Pyro guide, the prior) is kept
    fixed and only the critic is trained (with the prior this is InfoNCE). Each
    training step simulates ``batch_size`` fresh pairs from the model and draws
    ``train_particles - 1`` negatives per pair (the optimal critic
    log p(x, z)/q(z|x) + c(x) of Cor. 2.2 does not depend on K, so a smaller
    training K with a larger batch gives less noisy gradients). Early stopping
    scores ``num_val`` simulated validation pairs with the same fixed negatives
    at every evaluation (common random numbers, so a score change is a change of
    the parameters, not of the draw); the initial parameters (critic T = 0 for
    the default critic: exactly BA) are kept unless training improves on them.
    The reported bound is evaluated with K = ``num_particles`` on the given
    (x, z), independent of training.

    The defaults were chosen by measurement on the built-in examples (the docs' tuning page); more
    capacity and steps help hard posteriors (``hidden_sizes=(256, 256), max_steps=2000``).

    Attributes:
        num_particles: K (1 gives BA exactly).
        critic: a module ``critic(x_flat (..., N, obs_dim), z (..., N, D)) -> (..., N)``;
            default :func:`default_giwae_critic`. Trained in place.
        train_proposal: train a copy of a GaussianEncoder proposal jointly (default True).
        max_steps, batch_size, lr: joint optimisation settings (Adam; ``lr`` for the critic).
        proposal_lr: Adam learning rate of the trained proposal copy (None: ``lr``); smaller
            than the critic's because the proposal arrives BA-fitted while the critic starts afresh.
        train_particles: K used in training and validation (default ``min(num_particles, 16)``).
        hidden_sizes: widths of the default critic's hidden layers.
        lr_schedule: as for :func:`~pyro_mi.training.train` (default ``"cosine"``: both learning
            rates decay to 0 over ``max_steps``).
        num_val, eval_every, patience: early stopping on simulated validation pairs (a gain
            below :data:`MIN_DELTA` nats does not renew the patience).

    Runtime: ``progress``.

    :meth:`run` returns an :class:`~pyro_mi.result.MIResult` with ``lower`` (nats, ± stderr over
    the N points), ``upper`` None; ``diagnostics``: ``ba_term``, ``contrastive_term`` (means,
    nats) and their per-point values, ``proposal`` (the trained q), ``critic``, ``training``
    (:class:`~pyro_mi.training.TrainingLog`).

    Raises:
        ValueError: K < 1, bad training settings (when declared), shape errors of the density layer.
    """

    train_proposal: bool = True
    proposal_lr: float | None = 1e-3

    @property
    def name(self) -> str:
        return "giwae"

    def run(self, density, proposal, x, z, runtime: Runtime = Runtime()) -> MIResult:
        return _giwae(self, density, proposal, x, z, runtime.progress)


@dataclass(frozen=True)
class InfoNCE(_Contrastive):
    """InfoNCE lower bound on I(x; z): GIWAE with the prior p(z) as proposal (sec. 2.4; eq. 10).

    The BA term is exactly 0, so the bound is the contrastive term alone, <= log K. The
    proposal given to :meth:`run` is ignored (the prior is used); the critic is trained on
    simulated pairs with K - 1 prior negatives per point. The options are those of
    :class:`GIWAE` that apply with a fixed proposal, with the same meaning and defaults; the
    result and errors as GIWAE's (method ``"infonce"``).
    """

    @property
    def name(self) -> str:
        return "infonce"

    def run(self, density, proposal, x, z, runtime: Runtime = Runtime()) -> MIResult:
        return _giwae(self, density, PriorProposal(density), x, z, runtime.progress)


def giwae_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``GIWAE(**options).run(...)`` with options given by name (see :func:`~pyro_mi.bounds.declare`)."""
    from . import run_method

    return run_method("giwae", density, proposal, x, z, args, options)


def infonce_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``InfoNCE(**options).run(...)`` with options given by name (see :func:`~pyro_mi.bounds.declare`)."""
    from . import run_method

    return run_method("infonce", density, proposal, x, z, args, options)


def _giwae(spec: _Contrastive, density: ModelDensity, proposal, x: Data, z: torch.Tensor, progress: bool) -> MIResult:
    """The run of :class:`GIWAE` and :class:`InfoNCE`."""
    num_particles, critic, max_steps, batch_size = spec.num_particles, spec.critic, spec.max_steps, spec.batch_size
    train_particles, num_val, _method = spec.train_particles, spec.num_val, spec.name
    train_proposal, proposal_lr = getattr(spec, "train_proposal", False), getattr(spec, "proposal_lr", None)
    K = num_particles
    K_train = min(K, 16) if train_particles is None else train_particles
    trained_q = isinstance(proposal, GaussianEncoder) and train_proposal
    q = copy.deepcopy(proposal) if trained_q else proposal
    if trained_q:
        q.prior_weight = 0.0  # GIWAE trains the Gaussian encoder itself (its own q_theta)
    if critic is None:
        critic = default_giwae_critic(density, spec.hidden_sizes, proposal=q)
    if not callable(critic):
        raise TypeError(f"critic must be a callable module critic(x, z), got {type(critic).__name__}")
    check_critic(critic, density.obs_dim, density.latent_dim)
    modules = [m for m in ((q if trained_q else None), critic) if isinstance(m, nn.Module)]
    if not trained_q and isinstance(q, nn.Module):
        q.requires_grad_(False)

    batches = simulated_batches(density, batch_size)

    def objective(step: int) -> torch.Tensor:
        xb, zb = batches(step)
        ba, con = giwae_terms(density, q, critic, xb, zb, K_train)
        return (ba + con).mean()

    with torch.no_grad():
        x_val, z_val = density.sample(num_val) if num_val else (None, None)
    # one seed for the validation negatives, drawn from the caller's stream (reproducible)
    val_seed = int(torch.randint(2**62, ()))
    val_device = z_val.device if num_val else torch.device("cpu")

    def validate() -> float:
        # fixed negatives: reparameterised draws from a fixed noise stream, restored afterwards
        with torch.random.fork_rng(devices=[val_device] if val_device.type == "cuda" else []):
            manual_seed(val_seed)
            ba, con = giwae_terms(density, q, critic, x_val, z_val, K_train)
        return float((ba + con).mean())

    try:
        log = train(
            modules, objective, validate=validate if num_val else None, max_steps=max_steps if K > 1 or trained_q else 0,
            lr=spec.lr, eval_every=spec.eval_every, patience=spec.patience, progress=progress, desc=f"fit {_method}",
            module_lrs=[proposal_lr if m is q else None for m in modules], lr_schedule=spec.lr_schedule,
            min_delta=MIN_DELTA,
        )
    finally:
        if not trained_q and isinstance(q, nn.Module):
            q.requires_grad_(True)
    for m in modules:
        m.eval()
    with torch.no_grad():
        ba, con = giwae_terms(density, q, critic, x, z, K)
    total = ba + con
    return MIResult(
        _method,
        lower_per_point=total,
        upper_per_point=None,
        settings={
            "num_particles": K,
            "train_particles": K_train,
            "max_steps": max_steps,
            "steps": log.steps,
            "batch_size": batch_size,
            "proposal_trained": trained_q,
            "log_num_particles": math.log(K),
        },
        diagnostics={
            "ba_term": float(ba.mean()),
            "contrastive_term": float(con.mean()),
            "ba_per_point": ba,
            "contrastive_per_point": con,
            "proposal": q,
            "critic": critic,
            "training": log,
        },
    )

