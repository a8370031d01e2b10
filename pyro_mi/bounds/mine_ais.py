"""MINE-AIS: the implicit Barber–Agakov lower bound (IBAL) of an energy-based posterior,
trained with HMC negatives and evaluated by multi-sample AIS (Brekelmans et al. 2022, sec. 4,
eq. 17–20, App. J.1, L, M).

For a model whose prior p(z) is known and which can be simulated, but whose likelihood
p(x|z) is not used, a base q_θ(z|x) and a critic T_φ(x, z) define the energy-based
posterior π(z|x) = q_θ(z|x) e^{T_φ(x, z)} / Z(x), Z(x) = E_q[e^T] (eq. 17), and

    IBAL(q, T) = E_p(x,z)[log q(z|x) - log p(z) + T(x, z)] - E_p(x)[log Z(x)] <= I(x; z)   (eq. 18)

with gap E_p(x) KL[p(z|x) || π(z|x)]; the optimal critic is log p(x|z) - log q(z|x) + c(x),
for which IBAL = I (Prop. 4.1). A constant critic gives BA(q) exactly; GIWAE(q, T, K) tends
to IBAL(q, T) as K grows (Prop. 4.2).

* **Evaluation** (App. M.2, :func:`ibal_bounds`). log Z(x) is the log normaliser of the
  path from q(z|x) to q(z|x) e^{T}: components ``(log q, log q + T)``, run by the AIS engine
  of :mod:`pyro_mi.bounds.ais` with kernels fixed before the bound-bearing chains start.
  Forward chains give a lower bound on log Z, so an upper bound on the IBAL
  (``ibal_upper``: the convergence check, not an MI bound). Reverse chains start at the
  simulated z, an exact sample of p(z|x) but not of π; their (IM-AIS, eq. 14) estimate is
  an upper bound on log Z, and so gives the reported MI ``lower``, when
  KL[p(z|x) || q_AIS(z_T|x)] >= KL[p(z|x) || π(z|x)] (Prop. M.1, eq. 195): when π, trained
  towards p(z|x), is closer to it than the forward chains' final marginal. It holds
  exactly at T = 1 (the bound is then GIWAE with K = num_chains, and BA for K = 1) and was
  met in all of the paper's runs. The result says so in ``notes``, reports a bound that
  needs no condition (``giwae_lower``: GIWAE of the same (q, T)), and warns when the
  reverse estimate of log Z falls significantly below the forward one, which the
  condition forbids.
* **The likelihood critic** (:mod:`pyro_mi.bounds.likelihood_critic`, the default where it
  applies): T = log N(x; f(z), diag s^2) + log p(z) - log q(z|x), the form of the optimal
  critic (Prop. 4.1) with a Gaussian surrogate of p(x|z), fitted by maximum likelihood on
  simulated pairs.
* **Training** (eq. 19–20, App. M.1, :func:`mine_ais_bounds`). The gradient of the IBAL in
  θ and φ is E_p(x,z)[∂(log q + T)] - E_p(x)π(z|x)[∂(log q + T)]: raise log q + T on
  simulated pairs, lower it on negatives. Negatives come from M HMC transitions targeting
  π(z|x), started at the simulated z (contrastive divergence, Hinton 2002), so they
  start where π should have its mass.

Whitened coordinates: with a Gaussian q(z|x) = N(mu(x), diag sigma(x)^2) (the fitted
:class:`~pyro_mi.proposal.GaussianEncoder`) every chain moves u = (z - mu(x)) / sigma(x)
instead of z: HMC with the diagonal mass matrix sigma(x)^-2, a fixed kernel per data point.
The Jacobian is the same for both components, so the AIS weights are unchanged, and one
step size suits all latent dimensions and data points.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields

import pyro
import torch
from torch import nn

from ..checkpoint import Checkpoint, finishing, fingerprint
from ..critics import check_critic
from ..density import Data, ModelDensity
from ..proposal import GaussianEncoder, PriorProposal, proposal_from_point
from ..result import MIResult, require_finite
from ..runtime import RUNTIME_FIELDS, Runtime, cli
from ..samplers import StepSizeAdapter, hmc
from ..training import train
from ..distributed import broadcast_module
from .ais import AIS, anneal_log_normalizer, chain_warnings, proposal_identity, resolved
from .declaration import BATCH_SIZE_FLAG, LR_FLAG, MAX_STEPS_FLAG, Bound, check_positive_int
from .giwae import default_giwae_critic, giwae_terms
from .likelihood_critic import LikelihoodCritic, fit_likelihood_critic

#: the negatives' step size is adapted between training steps towards this mean acceptance
NEGATIVE_TARGET_ACCEPT = 0.8
#: particles of the GIWAE bound reported beside the IBAL (a bound without Prop. M.1's condition)
GIWAE_PARTICLES = 100
#: the default steps of the likelihood critic's maximum-likelihood fit (:func:`mine_ais_bounds`), chosen
#: by measurement on linear-vae and digits-gan (the docs' tuning page)
LIKELIHOOD_STEPS = 2000
#: a warning when the reverse log Z estimate is below the forward one by more than this many stderrs
CROSSING_SE = 3.0
PROP_M1_NOTE = (
    "lower is the IBAL with log Z(x) bounded by reverse AIS chains started at the simulated z, exact "
    "samples of p(z|x) rather than of the energy-based posterior: a lower bound on the MI when that "
    "posterior is closer to p(z|x) than the forward chains' final marginal (Brekelmans et al. 2022, "
    "Prop. M.1); giwae_lower needs no such condition"
)


class IBALPath:
    """The AIS path of log Z(x) for fixed data: components, pi0 draws and (un)whitening.

    Args:
        density: the model's density layer (``flatten_data``, ``constrained``).
        proposal: q(z|x); a :class:`GaussianEncoder` is whitened (module docstring).
        critic: ``critic(x_flat (..., N, obs_dim), z (..., N, D)) -> (..., N)``.
        x: observations ``{site: (N, ...)}``.

    Attributes: ``components(u) -> (log q, log q + T)`` over positions u (C, N, D);
    ``to_u(z)``, ``to_z(u)``; ``draw_pi0(n) -> (n, N, D)`` positions drawn from q.
    Parameters of q and the critic are read at call time (no gradient to them is kept
    by the samplers, which detach positions).
    """

    def __init__(self, density: ModelDensity, proposal, critic, x: Data):
        self.x, self.xf, self.q, self.critic = x, density.flatten_data(x), proposal, critic
        self.gaussian = isinstance(proposal, GaussianEncoder)
        if self.gaussian:
            with torch.no_grad():
                self.mu, self.sigma = proposal(x)

    def to_z(self, u: torch.Tensor) -> torch.Tensor:
        return self.mu + self.sigma * u if self.gaussian else u

    def to_u(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mu) / self.sigma if self.gaussian else z

    def log_q(self, z: torch.Tensor) -> torch.Tensor:
        if self.gaussian:
            return GaussianEncoder.normal_log_prob(z, self.mu, self.sigma)
        return self.q.log_prob(z, self.x)

    def components(self, u: torch.Tensor):
        z = self.to_z(u)
        with pyro.validation_enabled(False):
            lq = self.log_q(z)
        return lq, lq + self.critic(self.xf, z)

    def draw_pi0(self, n: int) -> torch.Tensor:
        if self.gaussian:
            return torch.randn((n,) + self.mu.shape, dtype=self.mu.dtype, device=self.mu.device)
        return self.q.rsample(self.x, n)[0].detach()


def _evaluate(
    method: str,
    density: ModelDensity,
    proposal,
    critic,
    x: Data,
    z: torch.Tensor,
    ais: AIS,
    runtime: Runtime,
    *,
    seed: int,
    checkpoint,
    settings: dict,
    diagnostics: dict,
    giwae: bool = True,
    gather: bool = True,
) -> MIResult:
    """The AIS evaluation of IBAL(q, T) on (x, z): the shared part of both front ends."""
    path = IBALPath(density, proposal, critic, x)
    with torch.no_grad(), pyro.validation_enabled(False):
        ba = path.log_q(z) - density.log_prior(z, x)
        t_pos = critic(path.xf, z)

    def path_of(lo, hi):
        xb = {k: v[lo:hi] for k, v in x.items()}
        block = IBALPath(density.from_point(lo), proposal_from_point(proposal, lo), critic, xb)
        return block.components, block.draw_pi0

    out = anneal_log_normalizer(path_of, path.to_u(z), ais, runtime, seed=seed, checkpoint=checkpoint,
                                constrained=lambda u: density.constrained(path.to_z(u)), gather=gather)
    notes = [PROP_M1_NOTE] + out["notes"]
    log_z_lower, log_z_upper = out["lower"], out["upper"]
    require_finite(method, {"log q(z|x) - log p(z) of the simulated points": ba,
                            "the critic at the simulated points": t_pos,
                            "the log Z(x) lower bound (every forward chain has zero weight)": log_z_lower,
                            "the log Z(x) upper bound": log_z_upper})
    if giwae:
        with torch.no_grad():
            g_ba, g_con = giwae_terms(density, proposal, critic, x, z, GIWAE_PARTICLES)
        diagnostics.update(giwae_lower=float((g_ba + g_con).mean()), giwae_particles=GIWAE_PARTICLES)
    warnings = out["warnings"]
    d = (log_z_upper - log_z_lower).double()
    if float(d.mean()) < -CROSSING_SE * float(d.std()) / math.sqrt(d.numel()):
        warnings.append(
            f"the reverse chains' estimate of log Z(x) is below the forward chains' by {-float(d.mean()):.3g} nats "
            "on average (more than 3 standard errors): Prop. M.1's condition fails here, so lower may exceed "
            "the MI; report giwae_lower, or train the critic further")
    lower, ibal_upper = ba + t_pos - log_z_upper, ba + t_pos - log_z_lower
    diagnostics.update({
        "ba_term": float(ba.mean()),
        "critic_term": float(t_pos.mean()),
        "ibal_upper": float(ibal_upper.mean()),
        "ibal_upper_per_point": ibal_upper,
        "log_z_lower": log_z_lower,
        "log_z_upper": log_z_upper,
        **out["diagnostics"],
    })
    if "chains" in diagnostics:
        diagnostics["chains"]["coordinates"] = "whitened" if path.gaussian else "z"
    return MIResult(method, lower_per_point=lower, upper_per_point=None, settings=settings,
                    diagnostics=diagnostics, warnings=warnings, notes=notes, x=x, z=z, checks=(chain_warnings,))


def _finish(result: MIResult, save_chains) -> MIResult:
    if save_chains is not None:
        from ..diagnostics import write_chains

        write_chains(result, save_chains)
    return result


#: the options of :class:`AIS` that MINE-AIS's evaluation takes (it refines no points, fits no per-point
#: Gaussians, since its path runs in the critic's coordinates, and uses IM-AIS)
AIS_OPTIONS = tuple(f.name for f in fields(AIS) if f.name not in ("refine", "estimator", "precondition"))
#: MINE-AIS's evaluation: IM-AIS without refinement or per-point fits
EVALUATION = dict(refine=0.0, precondition="none")


def _ais_of(options: dict) -> tuple[AIS, dict]:
    """The IM-AIS evaluation declared by the :data:`AIS_OPTIONS` in ``options``, and the rest."""
    return (AIS(**EVALUATION, **{k: v for k, v in options.items() if k in AIS_OPTIONS}),
            {k: v for k, v in options.items() if k not in AIS_OPTIONS})


def ibal_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, critic, **options) -> MIResult:
    """Multi-sample AIS evaluation of IBAL(q, T) for a given base and critic (App. M.2).

    E.g. the (q, T) that :func:`~pyro_mi.bounds.giwae_bounds` or ``infonce_bounds`` trained
    (``result.diagnostics["proposal"]`` and ``["critic"]``): the paper's rows "AIS bound on
    IBAL (GIWAE K = 100)" and "(InfoNCE K = 100)" of Fig. 3a. log Z(x) = log E_q[e^T] is
    annealed from q(z|x) to q(z|x) e^{T(x, z)} with IM-AIS (eq. 14): K forward chains and
    one reverse chain from the simulated z per point. Never evaluates log p(x|z).

    Args:
        density: the model's :class:`~pyro_mi.density.ModelDensity`.
        proposal: the base q(z|x) (prior, guide or encoder proposal).
        x, z: simulated observations ``{site: (N, ...)}`` and their packed latents (N, D).
        critic: ``critic(x_flat (..., N, obs_dim), z (..., N, D)) -> (..., N)``, differentiable in z.
        args, options: the evaluation's :class:`~pyro_mi.bounds.ais.AIS` options (:data:`AIS_OPTIONS`,
            positional in that order or by name; it refines no points) and
            :class:`~pyro_mi.runtime.Runtime` settings, by name.

    Returns:
        :class:`~pyro_mi.result.MIResult` (method ``"ibal"``, nats): ``lower`` the IBAL lower
        bound on MI (under Prop. M.1's condition, see ``notes``), ``upper`` None;
        ``diagnostics``: ``ibal_upper`` (forward chains: an upper bound on the IBAL, not on
        the MI) and per point, ``giwae_lower`` (GIWAE of the same (q, T) with K = 100, a
        bound with no condition), ``ba_term``, ``critic_term``, ``log_z_lower`` /
        ``log_z_upper`` (N,), and the AIS chain diagnostics of ``ais_bounds``.

    Raises:
        ValueError: as :func:`~pyro_mi.bounds.ais_bounds`, and a non-finite critic or base
            density at the simulated points.
    """
    if len(args) > len(AIS_OPTIONS) or set(AIS_OPTIONS[:len(args)]) & options.keys():
        raise TypeError(f"ibal_bounds() takes at most {len(AIS_OPTIONS)} positional options ({AIS_OPTIONS}), each "
                        "given once")
    options = {**dict(zip(AIS_OPTIONS, args)), **options}
    unknown = [k for k in options if k not in AIS_OPTIONS and k not in RUNTIME_FIELDS]
    if unknown:
        raise ValueError(f"ibal_bounds takes no option {unknown[0]!r}")
    ais, rest = _ais_of(options)
    runtime = Runtime(**rest)
    if not callable(critic):
        raise TypeError(f"critic must be a callable critic(x_flat, z), got {type(critic).__name__}")
    check_critic(critic, density.obs_dim, density.latent_dim)
    run = resolved(runtime, density, z)
    x = density.check_data(x)
    seed = int(torch.randint(2**62, (1,), generator=runtime.generator))
    settings = ais.settings(runtime.compile)
    ckpt = None
    if runtime.checkpoint is not None:
        ckpt = Checkpoint(runtime.checkpoint, fingerprint(
            "ibal", settings, seed, x, z, proposal_identity(proposal), critic, density.model, density.model_args,
            density.model_kwargs, run.record, run.points_per_block))
    with finishing(ckpt):
        result = _evaluate("ibal", density, proposal, critic, x, z, ais, run, seed=seed, checkpoint=ckpt,
                           settings=settings, diagnostics={})
    return _finish(result, runtime.save_chains)


class _NegativeStepSize(nn.Module):
    """The negatives' HMC step size as a buffer: saved and restored with the critic."""

    def __init__(self, step_size: float):
        super().__init__()
        self.register_buffer("value", torch.tensor(float(step_size)))


@dataclass(frozen=True)
class MineAIS(Bound):
    """MINE-AIS lower bound on I(x; z): energy-based training of (q, T), then AIS evaluation of the IBAL
    (Brekelmans et al. 2022, sec. 4, eq. 17–20, App. M).

    Uses log p(z), log q(z|x), the critic and simulation from the model, never log p(x|z).
    The base q_θ is ``proposal``: the prior (``proposal="prior"`` in ``estimate_mi``: the
    paper's setting), a user's guide (kept fixed), or the fitted
    :class:`~pyro_mi.proposal.GaussianEncoder` (``estimate_mi``'s default).
    IBAL(p(z), log q/p + R) and IBAL(q, R) are one bound; annealing from q instead of p(z)
    makes the path shorter.

    The default critic, for a one-data-point model with the prior or a GaussianEncoder as
    base, is the :class:`~pyro_mi.bounds.likelihood_critic.LikelihoodCritic` (a Gaussian
    surrogate of p(x|z) fitted by maximum likelihood, ``likelihood_steps``; no energy-based
    steps by default). Otherwise (or with ``likelihood_steps=0``) it is GIWAE's residual
    critic on u = (z - mu_q(x)) / sigma_q(x) for a GaussianEncoder base, else an MLP on [x, z],
    both starting at T = 0, where the IBAL is BA(q) exactly, and trained as follows.

    Each training step simulates ``batch_size`` pairs, runs ``num_negative_steps`` HMC
    transitions of ``num_leapfrog`` steps on π(z|x) from each simulated z (the negatives;
    step size adapted between steps towards 80% acceptance: training needs no exact
    kernel) and ascends eq. 19–20. Every ``eval_every`` steps the IBAL lower bound of
    ``num_val`` fixed validation pairs is estimated with the evaluation's estimator (one
    forward and one reverse chain, ``val_steps`` annealing steps, fixed random numbers);
    the best parameters are kept and training stops after ``patience`` evaluations
    without improvement. The reported bound is then evaluated on (x, z), which played no
    part in training, as in :func:`ibal_bounds`.

    Attributes:
        ais: the evaluation's :class:`~pyro_mi.bounds.ais.AIS` (IM-AIS, ``refine=0``,
            ``precondition="none"``: default ``AIS(refine=0.0, precondition="none")``; training runs whole in every process, and rank 0's critic is
            evaluated); its ``num_leapfrog`` and ``step_size`` (the start) also serve the negatives
            (whose densities are never traced: the critic changes between training steps). As flat
            options (:meth:`from_options`, ``estimate_mi``) its fields are :data:`AIS_OPTIONS`.
        critic: a module ``critic(x_flat, z) -> (..., N)`` trained in place; default: the
            likelihood critic where it applies (``likelihood_steps``), else GIWAE's residual
            critic for a GaussianEncoder base or an MLP on [standardised x, z] with a zero last
            layer (both start at T = 0).
        likelihood_steps: > 0: the critic is a
            :class:`~pyro_mi.bounds.likelihood_critic.LikelihoodCritic`, a Gaussian surrogate of
            p(x|z) fitted by maximum likelihood on simulated pairs for at most this many steps
            (:func:`~pyro_mi.bounds.likelihood_critic.fit_likelihood_critic`, early-stopped);
            0: the residual critic above. None (default): :data:`LIKELIHOOD_STEPS` where the
            likelihood critic applies (no ``critic`` given, a one-data-point model, the prior or a
            GaussianEncoder base), else 0.
        train_proposal: train a copy of a GaussianEncoder base jointly (eq. 19). Off by default:
            π depends on q e^T only, so the residual critic (whose b(x)ᵀu term shifts q's mean)
            already spans what training q adds, and a jointly trained q drifted below BA on
            linear-vae (the docs' tuning page).
        max_steps: energy-based training steps (None: 0 after the likelihood critic's fit, which
            they did not improve on linear-vae; else 2000).
        batch_size, lr: simulated pairs per step and the critic's Adam learning rate, of the
            likelihood critic's fit and of the energy-based steps (batch_size None: 512 and 128).
        proposal_lr: the base's learning rate (only with ``train_proposal``; default 1e-4).
        num_negative_steps: M, HMC transitions per negative (App. M.1 uses 10; default 5); an
            error when no energy-based steps run.
        hidden_sizes: widths of the default critic's hidden layers (default (256, 256); not with ``critic``).
        num_val, val_steps, eval_every, patience: early stopping on the validation IBAL
            (``val_steps`` defaults to ``num_steps``).

    Runtime: every :class:`~pyro_mi.runtime.Runtime` setting; the ``checkpoint`` holds the training
    state and the evaluation's chains, saved every ``checkpoint_every`` seconds and on
    KeyboardInterrupt; the same call resumes training or evaluation where it stopped, with the same
    result.

    :meth:`run` returns an :class:`~pyro_mi.result.MIResult` (method ``"mine-ais"``): as
    :func:`ibal_bounds`, with ``training`` (:class:`~pyro_mi.training.TrainingLog`), ``proposal``
    and ``critic`` in ``diagnostics``.

    Raises:
        ValueError: bad training or AIS settings (naming the option, when declared); at :meth:`run`,
            an unwritable, busy or foreign checkpoint, a non-finite objective or bound.
    """

    ais: AIS = field(default_factory=lambda: AIS(**EVALUATION))
    critic: nn.Module | None = None
    likelihood_steps: int | None = field(default=None, metadata=cli(
        "> 0: MINE-AIS's critic is a Gaussian surrogate likelihood, fitted by maximum likelihood on simulated pairs "
        "for at most this many steps", type=int))
    train_proposal: bool = False
    max_steps: int | None = field(default=None, metadata=MAX_STEPS_FLAG)
    batch_size: int | None = field(default=None, metadata=BATCH_SIZE_FLAG)
    lr: float = field(default=3e-3, metadata=LR_FLAG)
    proposal_lr: float | None = None
    num_negative_steps: int | None = field(default=None, metadata=cli(
        "M, HMC transitions per MINE-AIS negative sample", type=int))
    hidden_sizes: tuple[int, ...] | None = None
    num_val: int = 128
    val_steps: int | None = None
    eval_every: int = 100
    patience: int = 5

    RUNTIME = frozenset(RUNTIME_FIELDS)

    def __post_init__(self):
        if not isinstance(self.ais, AIS) or self.ais.refine != 0 or self.ais.estimator != "im" \
                or self.ais.precondition != "none":
            raise ValueError(f"ais must be an AIS(refine=0.0, precondition='none') with the IM estimator (MINE-AIS "
                             f"refines no points and fits no per-point Gaussians), "
                             f"got {self.ais!r}")
        for name in ("batch_size", "num_negative_steps", "val_steps"):
            check_positive_int(name, getattr(self, name), optional=True)
        check_positive_int("num_val", self.num_val)
        if self.hidden_sizes is not None and self.critic is not None:
            raise ValueError("hidden_sizes shapes the default critic; it does not apply when a critic is given")
        if self.likelihood_steps is not None and (isinstance(self.likelihood_steps, bool)
                                                  or not isinstance(self.likelihood_steps, int)
                                                  or self.likelihood_steps < 0):
            raise ValueError(f"likelihood_steps must be a non-negative integer, got {self.likelihood_steps!r}")
        if self.likelihood_steps and self.critic is not None:
            raise ValueError("likelihood_steps fits the likelihood critic; it does not apply when a critic is given")

    @property
    def name(self) -> str:
        return "mine-ais"

    def options(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ais"}
        return {**{k: getattr(self.ais, k) for k in AIS_OPTIONS}, **own}

    @classmethod
    def option_fields(cls) -> dict:
        ais = {f.name: f for f in fields(AIS) if f.name in AIS_OPTIONS}
        return {**ais, **{f.name: f for f in fields(cls) if f.name != "ais"}}

    @classmethod
    def from_options(cls, **options) -> "MineAIS":
        ais, own = _ais_of(options)
        return cls(ais=ais, **own)

    def run(self, density, proposal, x, z, runtime: Runtime = Runtime()) -> MIResult:
        return _mine_ais(self, density, proposal, x, z, runtime)


def mine_ais_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``MineAIS.from_options(**options).run(...)`` with options given by name (see
    :func:`~pyro_mi.bounds.declare`)."""
    from . import run_method

    return run_method("mine-ais", density, proposal, x, z, args, options)


def _mine_ais(spec: MineAIS, density: ModelDensity, proposal, x: Data, z: torch.Tensor, runtime: Runtime) -> MIResult:
    """The run of :class:`MineAIS`."""
    critic, likelihood_steps, max_steps, num_negative_steps = (spec.critic, spec.likelihood_steps, spec.max_steps,
                                                                spec.num_negative_steps)
    batch_size, proposal_lr, hidden_sizes, val_steps, lr = (spec.batch_size, spec.proposal_lr, spec.hidden_sizes,
                                                            spec.val_steps, spec.lr)
    ais, progress, generator = spec.ais, runtime.progress, runtime.generator
    # an option that would be ignored is an error
    if proposal_lr is not None and not (spec.train_proposal and isinstance(proposal, GaussianEncoder)):
        raise ValueError("proposal_lr applies only with train_proposal=True and a GaussianEncoder proposal")
    if likelihood_steps is None:
        applies = critic is None and not density.has_data_plate and isinstance(proposal, (PriorProposal, GaussianEncoder))
        likelihood_steps = LIKELIHOOD_STEPS if applies else 0
    if max_steps is None:
        max_steps = 0 if likelihood_steps else 2000
    if num_negative_steps is not None and max_steps == 0:
        raise ValueError("num_negative_steps applies to the energy-based training, and it runs no steps (max_steps 0; "
                         "the default after the likelihood critic's fit)")
    num_negative_steps = 5 if num_negative_steps is None else num_negative_steps
    fit_batch_size = 512 if batch_size is None else batch_size
    batch_size = 128 if batch_size is None else batch_size
    proposal_lr = 1e-4 if proposal_lr is None else proposal_lr
    hidden_sizes = (256, 256) if hidden_sizes is None else tuple(hidden_sizes)
    run = resolved(runtime, density, z)
    x = density.check_data(x)
    val_steps = ais.num_steps if val_steps is None else val_steps
    trained_q = isinstance(proposal, GaussianEncoder) and spec.train_proposal
    q = copy.deepcopy(proposal) if isinstance(proposal, GaussianEncoder) else proposal
    if isinstance(q, GaussianEncoder):
        q.prior_weight = 0.0  # MINE-AIS's base is the Gaussian encoder itself (whitened, module docstring)
    likelihood_log = None
    if likelihood_steps:  # fitted below, inside the checkpoint
        critic = LikelihoodCritic(density, q, hidden_sizes).to(z.device)
    if critic is None:
        critic = default_giwae_critic(density, hidden_sizes, proposal=q)
        if not isinstance(q, GaussianEncoder):  # the MLP critic of the prior or a guide starts at T = 0 too
            nn.init.zeros_(critic.critic.net[-1].weight)
            nn.init.zeros_(critic.critic.net[-1].bias)
    if not isinstance(critic, nn.Module):
        raise TypeError(f"critic must be a torch.nn.Module (it is trained), got {type(critic).__name__}")
    check_critic(critic, density.obs_dim, density.latent_dim)
    eps = _NegativeStepSize(ais.step_size).to(z.device)
    modules = [m for m in ((q if trained_q else None), critic, eps) if m is not None]
    seed = int(torch.randint(2**62, (1,), generator=generator))
    settings = {
        **ais.settings(runtime.compile),
        "max_steps": max_steps, "batch_size": batch_size, "num_negative_steps": num_negative_steps,
        "num_val": spec.num_val, "val_steps": val_steps, "proposal_trained": trained_q,
        "likelihood_steps": likelihood_steps,
    }
    ckpt = None
    if runtime.checkpoint is not None:
        ckpt = Checkpoint(runtime.checkpoint, fingerprint(
            "mine-ais", settings, seed, lr, proposal_lr, spec.eval_every, spec.patience, hidden_sizes, x, z,
            proposal_identity(proposal), critic, density.model, density.model_args, density.model_kwargs,
            run.record, run.points_per_block))
    adapter = StepSizeAdapter("scaling", factor=2.0, target_accept=NEGATIVE_TARGET_ACCEPT)
    stats = {"accept": []}

    def objective(step: int) -> torch.Tensor:
        with torch.no_grad():
            xb, zb = density.sample(batch_size)
        path = IBALPath(density, q, critic, xb)
        state = hmc.init(path.components, path.to_u(zb).unsqueeze(0))
        accept = zb.new_zeros(())
        for _ in range(num_negative_steps):
            state, info = hmc.step(state, path.components, 1.0, eps.value, ais.num_leapfrog)
            accept = accept + info.accept_prob.mean() / num_negative_steps
        with torch.no_grad():
            eps.value.copy_(adapter.update(eps.value.view(1, 1), accept.view(1, 1)).view(()))
        stats["accept"].append(accept)
        z_neg = path.to_z(state.z[0]).detach()
        xf = path.xf
        with pyro.validation_enabled(False):
            pos = q.log_prob(zb, xb) + critic(xf, zb)
            neg = q.log_prob(z_neg, xb) + critic(xf, z_neg)
        return (pos - neg).mean()  # a surrogate whose gradient is eq. 19–20's (negatives fixed)

    with torch.no_grad():
        x_val, z_val = density.sample(spec.num_val)
    val_seed = int(torch.randint(2**62, (1,), generator=generator))

    def validate() -> float:
        try:
            r = _evaluate("mine-ais", density, q, critic, x_val, z_val,
                          ais.replace(num_chains=1, num_steps=val_steps, adapt="none", step_size=float(eps.value),
                                      pilot_chains=None, pilot_steps=None),
                          run.replace(record=False, callback=None, progress=False, compile="none"),
                          seed=val_seed, checkpoint=None, settings={}, diagnostics={}, giwae=False, gather=False)
        except ValueError:  # a non-finite critic or bound: the worst score, never the kept parameters
            return -math.inf
        return r.lower

    with finishing(ckpt):
        if likelihood_steps:
            likelihood_log = fit_likelihood_critic(
                density, critic, max_steps=likelihood_steps, batch_size=fit_batch_size, lr=lr, progress=progress,
                checkpoint=ckpt.section("likelihood") if ckpt else None, checkpoint_every=runtime.checkpoint_every)
        with pyro.validation_enabled(False):
            log = train(modules, objective, validate=validate, max_steps=max_steps, lr=lr, eval_every=spec.eval_every,
                        patience=spec.patience, progress=progress, desc="fit mine-ais",
                        module_lrs=[proposal_lr if m is q else None for m in modules],
                        checkpoint=ckpt.section("training") if ckpt else None, checkpoint_every=runtime.checkpoint_every)
        for m in modules:
            m.eval()
            broadcast_module(m)  # every rank evaluates rank 0's (q, T)
        result = _evaluate(
            "mine-ais", density, q, critic, x, z, ais, run, seed=seed,
            checkpoint=ckpt.section("evaluation") if ckpt else None,
            settings={**settings, "steps": log.steps},
            diagnostics={"training": log, "likelihood_training": likelihood_log, "proposal": q, "critic": critic,
                         "negative_step_size": float(eps.value),
                         "negative_accept_rate": float(torch.stack(stats["accept"]).mean()) if stats["accept"]
                         else None})
    if likelihood_steps:  # the surrogate may fit p(x|z) worse than q alone: BA of the base, paired per point
        with torch.no_grad(), pyro.validation_enabled(False):
            gain = (result.lower_per_point - (q.log_prob(z, x) - density.log_prior(z, x))).double()
        mean, se = float(gain.mean()), float(gain.std()) / math.sqrt(gain.numel())
        if not mean >= -3 * se:  # also NaN
            result.warnings.append(
                f"the bound is below BA of its base by {-mean:.3f} ± {se:.3f} nats (paired per point): the likelihood "
                "critic's surrogate of p(x|z) fits poorly; raise likelihood_steps, or set likelihood_steps=0 for the "
                "residual critic")
    return _finish(result, runtime.save_chains)


__all__ = ["AIS_OPTIONS", "IBALPath", "MineAIS", "ibal_bounds", "mine_ais_bounds"]
