"""The ELBO with a critic-estimated mutual-information bonus (the ξ-bound).

Source: "Enhancing Variational Autoencoders with Mutual Information Neural
Estimation for Text Generation", appendix (``shared/papers/
vae_mine_text_generation_appendix.md``), eq. 1-10. With the encoding joint
q_φ(x, z) = P(x) q_φ(z|x) and its marginals q(x) = P(x), q_φ(z), a critic
(energy) f_ψ(x, z) gives, for any ξ > 0 (eq. 2)::

    I_q(x; z) ≥ E_{q_φ(x,z)}[f_ψ(x, z)] - ξ E_{q(x) q_φ(z)}[e^{f_ψ(x, z)}] + log ξ + 1,

tight at f*_ψ = log q_φ(x, z) / (q(x) q_φ(z)) - log ξ (eq. 3, Prop. 1). The
critic maximises the bound over ψ; at the optimal critic the gradient of the
bound with respect to the encoder through f*'s dependence on φ vanishes (eq.
5-10), so the encoder's gradient is taken through the reparameterised z only.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import pyro
import torch
from pyro.infer.trace_elbo import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan
from torch import nn

from ..bounds import dual
from ..critics import JointCritic
from ..density.plates import sample_sites

__all__ = ["TraceMI_ELBO", "xi_bound"]

_PARTICLES = "num_particles_vectorized"
#: mismatched pairs per data point in the training bound (see :func:`xi_bound`): fewer negatives make
#: noisier steps but cheaper ones (``benchmarks/mi_losses_cost.py --accuracy-steps``)
NUM_NEGATIVES = 4
#: hidden layers of the critic built when none is given (a :class:`~pyro_mi.critics.JointCritic`)
DEFAULT_CRITIC_HIDDEN = (128, 128)


def xi_bound(critic, x: torch.Tensor, z: torch.Tensor, xi: float = 1.0, num_negatives: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The ξ-bound on I(x; z) from B paired samples (appendix eq. 2), in nats.

    E_{q(x,z)}[f] is the mean of f(x_i, z_i); E_{q(x)q(z)}[e^f] is the mean of
    e^{f(x_i, z_j)} over the B(B-1) mismatched pairs i ≠ j of the batch, or, with
    ``num_negatives`` k < B - 1, over the B k pairs (x_i, z_{(i + r) mod B}) for k distinct shifts
    r drawn uniformly from 1..B-1 at each call: each pair is a uniform draw of the mismatched pairs,
    so the estimate of the expectation stays unbiased, also on a batch in a fixed order (the whole
    data set at every step), and costs B k critic evaluations instead of B(B - 1).

    Args:
        critic: callable ``critic(x, z)`` broadcasting over leading dims, e.g.
            :class:`pyro_mi.critics.JointCritic` or ``SeparableCritic``.
        x: (..., B, x_dim) samples of x.
        z: (..., B, z_dim) samples of z paired with x (same leading dims, or
            broadcastable).
        xi: ξ > 0.
        num_negatives: k, mismatched pairs per sample (None: all B - 1).
        generator: draws the shifts (None: torch's global RNG).

    Returns:
        A scalar tensor: the bound averaged over the leading dims (nats).

    Raises:
        ValueError: B < 2 or mismatched batch sizes.
    """
    B = x.shape[-2]
    if z.shape[-2] != B:
        raise ValueError(f"x and z must have the same batch size, got {B} and {z.shape[-2]}")
    if B < 2:
        raise ValueError(f"the ξ-bound needs a batch of at least 2 data points, got {B}")
    # One critic call scores each x_i against its own z_i and its negatives, so that a critic
    # which computes features of x apart (JointCritic's first layer) computes them once.
    if num_negatives is None or num_negatives >= B - 1:
        pairs = critic(x.unsqueeze(-2), z.unsqueeze(-3))  # (..., B, B), [i, j] = f(x_i, z_j)
        eye = torch.eye(B, dtype=torch.bool, device=pairs.device)
        joint, negatives = pairs[..., eye], pairs[..., ~eye]
    else:
        drawn = torch.randperm(B - 1, generator=generator, device=generator.device if generator else "cpu")
        shift = torch.cat([drawn.new_zeros(1), drawn[:num_negatives] + 1]).to(z.device)
        index = (torch.arange(B, device=z.device).unsqueeze(1) + shift) % B  # (B, 1 + k), [i, 0] = i
        scores = critic(x.unsqueeze(-2), z[..., index, :])  # (..., B, 1 + k)
        joint, negatives = scores[..., 0], scores[..., 1:].flatten(-2)  # (..., B), (..., B k)
    # every leading index has B joint and as many mismatched pairs as the others, so the mean
    # over the leading dims of the per-index bound is the bound on all scores pooled
    return dual.xi_bound(joint, negatives, math.log(xi))


class TraceMI_ELBO(Trace_ELBO):
    """ELBO minus λ times a critic's ξ-bound on the encoder's I(x; z), for :class:`pyro.infer.SVI`.

    Named in the pattern of Pyro's ``TraceMeanField_ELBO`` / ``TraceTailAdaptive_ELBO``:
    the Trace_ELBO estimator with a modification (an MI term). The loss, per
    particle, in nats::

        loss = -ELBO - λ · N · I_ξ(ψ, φ)

    where ELBO is exactly :class:`~pyro.infer.Trace_ELBO`'s (summed over the data
    plate), N the number of data points it stands for (batch size times the data
    plate's subsample scale, so that λ is per data point like the ELBO's terms) and
    I_ξ the ξ-bound (appendix eq. 2) of :func:`xi_bound` on the pairs (x_n, z_n) of
    the guide's sample, z_n ~ q_φ(z|x_n), with the product of marginals formed by
    ``num_negatives`` mismatched pairs per data point of the batch.

    Gradients (a surrogate loss; the reported value is the loss above):

    * critic ψ: ascends I_ξ at the current encoder (weight N, independent of λ > 0)
      through the term -N · I_ξ(f_ψ(x, sg(z))).
    * encoder φ: through the reparameterised z only, with the critic frozen:
      -λ N · I_ξ(f_sg(ψ)(x, z)). The remaining part of the gradient, through the
      density q_φ(z) in the optimal critic, has expectation zero (eq. 5-10).
    * model and guide: the usual ELBO gradient (Trace_ELBO's estimator).

    Both come from one evaluation of the critic (z enters with its gradient scaled by λ).
    With λ = 0 nothing but Trace_ELBO runs: the critic is neither evaluated nor trained.

    The critic is registered with ``pyro.module(critic_name, critic)`` during each
    loss evaluation, so :class:`~pyro.infer.SVI` optimises it with the model and
    guide. With :meth:`differentiable_loss` in your own loop, give the optimiser
    ``critic.parameters()`` too (a default critic exists after the first evaluation).

    Args:
        critic: a ``torch.nn.Module`` f_ψ(x, z) on per-data-point flattened x
            (all observed sites concatenated) and z (all latent sites, constrained
            values, concatenated), broadcasting over leading dims
            (:class:`pyro_mi.critics.JointCritic` or ``SeparableCritic``); None (default): a
            ``JointCritic(x_dim, z_dim, DEFAULT_CRITIC_HIDDEN)`` built at the first evaluation
            with λ > 0 from the sizes of x and z there, on their dtype and device.
        mi_weight: λ ≥ 0; with λ = 0 the loss, its gradients and its cost are Trace_ELBO's.
        xi: ξ > 0 of eq. 2 (ξ = 1: the bound E[f] - E[e^f] + 1).
        critic_name: its name in Pyro's parameter store.
        num_negatives: mismatched pairs per data point in the training bound (:func:`xi_bound`;
            default :data:`NUM_NEGATIVES`; None: all B - 1 of the batch, B² critic evaluations).
        num_particles, max_plate_nesting, vectorize_particles, ...: as for
            :class:`~pyro.infer.Trace_ELBO`.

    Attributes:
        last_mi_bound: the ξ-bound (nats per data point) of the last evaluation with λ > 0
            (None before one).

    The errors below are raised at the first loss evaluation, not at construction.

    Raises:
        TypeError: ``critic`` is neither None nor an ``nn.Module``.
        ValueError: λ < 0, ξ ≤ 0, ``num_negatives`` not a positive integer or None; the model
            has no observed sites; no plate holds every site (the data plate) or more than one
            does; a guide site is not reparameterisable while λ > 0 (named); a batch of fewer
            than 2 points.
    """

    def __init__(
        self,
        critic: nn.Module | None = None,
        mi_weight: float = 1.0,
        xi: float = 1.0,
        critic_name: str = "mi_critic",
        num_negatives: int | None = NUM_NEGATIVES,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: Optional[bool] = None,
    ):
        if critic is not None and not isinstance(critic, nn.Module):
            raise TypeError(f"critic must be None or a torch.nn.Module, got {type(critic).__name__}")
        for name, value in (("mi_weight", mi_weight), ("xi", xi)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if mi_weight < 0:
            raise ValueError(f"mi_weight must be >= 0, got {mi_weight!r}")
        if xi <= 0:
            raise ValueError(f"xi must be > 0, got {xi!r}")
        self.critic = critic
        self.mi_weight = float(mi_weight)
        self.xi = float(xi)
        self.critic_name = critic_name
        if num_negatives is not None and (isinstance(num_negatives, bool) or not isinstance(num_negatives, int)
                                          or num_negatives < 1):
            raise ValueError(f"num_negatives must be None or a positive integer, got {num_negatives!r}")
        self.num_negatives = num_negatives
        self.last_mi_bound = None
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            retain_graph=retain_graph,
        )

    # ----------------------------------------------------------------- pieces
    def _pairs(self, model_trace):
        """(x (..., B, x_dim), z (..., B, z_dim), N) from a model trace replayed on the guide."""
        sites = sample_sites(model_trace)
        observed = [s for s in sites if s["is_observed"]]
        latent = [s for s in sites if not s["is_observed"]]
        if not observed:
            raise ValueError(
                "TraceMI_ELBO: the model has no observed sites; the MI bonus needs data x observed with "
                "pyro.sample(name, dist, obs=x)"
            )
        stacks = [{f for f in s["cond_indep_stack"] if f.vectorized and f.name != _PARTICLES} for s in sites]
        common = set.intersection(*stacks)
        if len(common) != 1:
            found = sorted(f.name for f in common)
            raise ValueError(
                "TraceMI_ELBO: the MI bonus needs exactly one plate (the data plate) holding every site of "
                f"the model, found {found or 'none'}; latent sites outside the data plate (global latents) "
                "are not supported"
            )
        (frame,) = common
        x = _per_datum(observed, frame)
        z = _per_datum(latent, frame)
        scale = observed[0]["scale"]
        scale = scale if isinstance(scale, numbers.Number) else torch_item(torch.as_tensor(scale).mean())
        return x, z, frame.size * scale

    def _check_reparam(self, guide_trace):
        if self.mi_weight == 0:
            return
        for s in sample_sites(guide_trace):
            if not s["fn"].has_rsample:
                raise ValueError(
                    f"TraceMI_ELBO: guide site {s['name']!r} ({type(s['fn']).__name__}) is not "
                    "reparameterisable; the encoder's MI gradient flows through the reparameterised z"
                )

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        """(loss value as float, surrogate tensor) of one particle: -ELBO - λ N I_ξ."""
        elbo_loss, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
        if self.mi_weight == 0:  # Trace_ELBO itself, at its cost
            return elbo_loss, surrogate
        self._check_reparam(guide_trace)
        x, z, n = self._pairs(model_trace)
        if self.critic is None:
            self.critic = JointCritic(x.shape[-1], z.shape[-1], DEFAULT_CRITIC_HIDDEN).to(dtype=z.dtype,
                                                                                           device=z.device)
        critic = pyro.module(self.critic_name, self.critic)
        # One critic pass serves both gradients: the critic ascends the bound at the current
        # encoder (weight N), and the encoder ascends it through z only, the critic frozen (weight
        # λN; eq. 5-10). z_l equals z, its gradient scaled by λ; the ψ-gradient is that of z held.
        z_l = z.detach() + self.mi_weight * (z - z.detach())
        bound_t = xi_bound(critic, x.detach(), z_l, self.xi, self.num_negatives)
        bound = torch_item(bound_t)
        self.last_mi_bound = bound
        return elbo_loss - self.mi_weight * n * bound, surrogate - n * bound_t

    # -------------------------------------------------------------- interface
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -ELBO - λ N I_ξ (nats, a float)."""
        loss = 0.0
        with torch.no_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                loss_particle, _ = self._differentiable_loss_particle(model_trace, guide_trace)
                loss += loss_particle / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def mi_bound(self, model, guide, *args, **kwargs) -> float:
        """The critic's ξ-bound on the encoder's I(x; z) at one draw of the guide, with all B - 1
        mismatched pairs per data point (nats per data point).

        Raises:
            ValueError: the critic is the default one and no loss evaluation has built it yet.
        """
        if self.critic is None:
            raise ValueError("TraceMI_ELBO.mi_bound: no critic yet; the default critic is built at the first "
                             "loss evaluation with mi_weight > 0")
        bounds = []
        with torch.no_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                x, z, _ = self._pairs(model_trace)
                bounds.append(torch_item(xi_bound(self.critic, x, z, self.xi)))
        return sum(bounds) / len(bounds)


def _per_datum(sites, frame) -> torch.Tensor:
    """Concatenates the values of ``sites`` to (..., B, features), B the size of ``frame``
    (the data plate); dims left of the data dim (particles) stay as leading dims."""
    parts = []
    for s in sites:
        v = s["value"]
        batch_ndim = v.dim() - s["fn"].event_dim
        pos = batch_ndim + frame.dim
        if pos < 0 or v.shape[pos] != frame.size:
            raise ValueError(
                f"TraceMI_ELBO: site {s['name']!r} of shape {tuple(v.shape)} has no dim of the data plate "
                f"{frame.name!r} (size {frame.size}) at dim {frame.dim}"
            )
        v = v if v.is_floating_point() else v.to(torch.get_default_dtype())  # e.g. integer counts
        parts.append(v.reshape(v.shape[: pos + 1] + (-1,)))
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(lead + p.shape[-1:]) for p in parts], dim=-1)
