"""A vectorised Hamiltonian Monte Carlo kernel for many independent chains.

The kernel moves a tensor of chain states z of shape (num_chains, num_data, dim)
under the geometric annealed log density of Brekelmans et al. 2022, eq. 11::

    log pi_beta(z) = (1 - beta) log pi0(z) + beta log gamma(z)

where ``pi0`` is a normalised base density (the prior, or a proposal q(z|x)) and
``gamma(z) = p(x, z)`` the unnormalised target. It only sees a *components
function* ``components(z) -> (log_pi0, log_gamma)``, each of shape
(num_chains, num_data), differentiable in z.

The state holds the positions, both components and both of their gradients at
them, and nothing else: moving to a new beta needs no new evaluation, since the
gradient of the annealed log density at any beta is a linear combination of the
two. Every leapfrog step costs one :func:`evaluate` of the components and both
gradients: eagerly one model trace and two backward passes, or one run of a graph
traced once (:mod:`.compile`). Nothing synchronises with the host.

:func:`step` is a pure function of the state, the annealing parameter, the step
size, the number of leapfrog steps and a ``torch.Generator``: the kernel has no
memory, so a chain's kernel depends on nothing but its beta and the step size
passed in (step sizes are tuned in :mod:`.step_size`, before the chains whose
weights enter a bound start). Every chain has its own Metropolis accept/reject
(Neal 2011, "MCMC using Hamiltonian dynamics", eq. 5.12); a proposal whose
energy is not finite, or whose energy error exceeds ``max_energy_error``, is
rejected for that chain only and counted as divergent, never aborting the run.

Style: a functional kernel with an explicit NamedTuple state, ``init`` and
``step``, as in BlackJAX ``mcmc/hmc.py``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

Components = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


class HMCState(NamedTuple):
    """State of all chains; every tensor is detached.

    Attributes:
        z: positions, (C, N, D).
        log_base: log pi0(z), (C, N), nats.
        log_target: log gamma(z) = log p(x, z), (C, N), nats.
        grad_base: d log pi0 / dz, (C, N, D).
        grad_target: d log gamma / dz, (C, N, D).
    """

    z: torch.Tensor
    log_base: torch.Tensor
    log_target: torch.Tensor
    grad_base: torch.Tensor
    grad_target: torch.Tensor


class HMCInfo(NamedTuple):
    """Per-chain statistics of one HMC transition, each (C, N).

    Attributes:
        accept_prob: Metropolis acceptance probability min(1, exp(-dH)) (0 for divergent proposals).
        accepted: whether the proposal was accepted (bool).
        diverging: proposal energy non-finite or energy error above the threshold (bool).
        energy_error: H(proposal) - H(current), nats (nan/inf where diverging).
    """

    accept_prob: torch.Tensor
    accepted: torch.Tensor
    diverging: torch.Tensor
    energy_error: torch.Tensor


def mix(log_base: torch.Tensor, log_target: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(1 - beta) log_base + beta log_target, with 0 * (-inf) read as 0 at beta = 0 or 1.

    Shapes broadcast; ``beta`` is (C, N) or a scalar tensor. Eq. 11 of Brekelmans et al. 2022.
    """
    out = log_base + beta * (log_target - log_base)
    out = torch.where(beta == 0, log_base, out)
    return torch.where(beta == 1, log_target, out)


def evaluate(components: Components, z: torch.Tensor):
    """Components and both gradients at z (C, N, D).

    Returns ``(log_base, log_target, grad_base, grad_target)``, all detached. A
    :class:`~pyro_mi.samplers.compile.Compiled` components function runs its traced graph;
    any other is evaluated by :func:`eager_evaluate`.
    """
    compiled = getattr(components, "evaluate", None)
    return compiled(z) if compiled is not None else eager_evaluate(components, z)


def eager_evaluate(components: Components, z: torch.Tensor):
    """:func:`evaluate` by one components call and two backward passes.

    Non-finite gradients are kept (the chain's proposals will be rejected).
    """
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        lb, lt = components(zz)
        gb = _grad(lb, zz, retain=True)
        gt = _grad(lt, zz, retain=False)
    return lb.detach(), lt.detach(), gb, gt


def _grad(out: torch.Tensor, z: torch.Tensor, retain: bool) -> torch.Tensor:
    if not out.requires_grad:  # a component that does not depend on z
        return torch.zeros_like(z)
    (g,) = torch.autograd.grad(out.sum(), z, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(z) if g is None else g


def init(components: Components, z: torch.Tensor) -> HMCState:
    """Initial state at positions z (C, N, D): one components evaluation.

    Raises:
        ValueError: if z is not a floating tensor of rank 3.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 3 or not z.is_floating_point():
        shape = getattr(z, "shape", z)
        raise ValueError(f"z must be a floating tensor of shape (num_chains, num_data, dim), got {shape}")
    return HMCState(z.detach(), *evaluate(components, z))


def _per_chain(value, z: torch.Tensor) -> torch.Tensor:
    """A scalar, (N,), (1, N), (C, 1) or (C, N) value as a tensor of z's dtype and device that
    broadcasts to (C, N) (not expanded: a (C, 1) beta stays one number per chain)."""
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dtype != z.dtype or t.device != z.device:
        t = t.to(dtype=z.dtype, device=z.device)
    return t.reshape(1, -1) if t.dim() == 1 else t


def leapfrog(state: HMCState, components: Components, beta, step_size, num_leapfrog: int, momentum: torch.Tensor):
    """L leapfrog steps (velocity Verlet; Neal 2011, eq. 5.18–5.20) from ``state`` with initial
    momentum (C, N, D) under pi_beta, identity mass matrix.

    Written out rather than through :func:`pyro.ops.integrator.velocity_verlet`, which
    differentiates a scalar potential itself: here each point's components and both
    gradients come from one :func:`evaluate` (a traced graph when compiled), and the
    annealed gradient at any beta is their linear combination.

    Returns ``(z1, r1, (log_base, log_target, grad_base, grad_target) at z1)``.
    """
    b = _per_chain(beta, state.z).unsqueeze(-1)
    eps = _per_chain(step_size, state.z).unsqueeze(-1)
    z, gb, gt = state.z, state.grad_base, state.grad_target
    r = momentum + (0.5 * eps) * (gb + b * (gt - gb))
    for i in range(num_leapfrog):
        z = z + eps * r
        lb, lt, gb, gt = evaluate(components, z)
        kick = eps if i < num_leapfrog - 1 else 0.5 * eps
        r = r + kick * (gb + b * (gt - gb))
    return z, r, (lb, lt, gb, gt)


def step(
    state: HMCState,
    components: Components,
    beta,
    step_size,
    num_leapfrog: int,
    generator: torch.Generator | None = None,
    *,
    max_energy_error: float = 1000.0,
) -> tuple[HMCState, HMCInfo]:
    """One HMC transition of every chain, leaving pi_beta (eq. 11) invariant for each.

    The transition is a fixed, reversible Markov kernel given ``beta`` and ``step_size``:
    it keeps no adaptation state (tune step sizes with :mod:`.step_size`).

    Args:
        state: current :class:`HMCState` (components and gradients cached at ``state.z``).
        components: ``z -> (log pi0(z), log gamma(z))``, each (C, N).
        beta: annealing parameter: a scalar, (N,) or (C, N).
        step_size: leapfrog step size > 0: a scalar, (N,) or (C, N).
        num_leapfrog: L >= 1 leapfrog steps (L components evaluations).
        generator: the ``torch.Generator`` of the momenta and accept decisions
            (on z's device); None uses torch's global generator.
        max_energy_error: an energy error H' - H above this (nats) counts as divergent.

    Returns:
        ``(new_state, info)``.
    """
    z0 = state.z
    r0 = torch.randn(z0.shape, generator=generator, dtype=z0.dtype, device=z0.device)
    u = torch.rand(z0.shape[:2], generator=generator, dtype=z0.dtype, device=z0.device)
    beta, eps = _per_chain(beta, z0), _per_chain(step_size, z0)
    compiled = getattr(components, "transition", None)  # a whole transition recorded as one graph
    if compiled is not None:
        return compiled(state, r0, u, beta, eps, num_leapfrog, max_energy_error)
    return transition(components, state, r0, u, beta, eps, num_leapfrog, max_energy_error)


def transition(
    components: Components,
    state: HMCState,
    momentum: torch.Tensor,
    uniform: torch.Tensor,
    beta: torch.Tensor,
    step_size: torch.Tensor,
    num_leapfrog: int,
    max_energy_error: float,
) -> tuple[HMCState, HMCInfo]:
    """The deterministic part of :func:`step`: L leapfrog steps from ``state`` with the given
    momentum (C, N, D), then the Metropolis test of each chain against its uniform (C, N).
    ``beta`` and ``step_size`` are tensors broadcasting to (C, N). A pure tensor function, so
    that :mod:`.compile` can record it as one graph."""
    z0 = state.z
    z1, r1, (lb1, lt1, gb1, gt1) = leapfrog(state, components, beta, step_size, num_leapfrog, momentum)
    h0 = -mix(state.log_base, state.log_target, beta) + 0.5 * (momentum * momentum).sum(-1)
    h1 = -mix(lb1, lt1, beta) + 0.5 * (r1 * r1).sum(-1)
    delta = h1 - h0
    # One reduction flags a non-finite energy, position or gradient (nan and inf propagate
    # through the sum; a finite sum overflowing float range is rejected too, harmlessly).
    finite = torch.isfinite(h1 + (z1 + gb1 + gt1).sum(-1))
    # A current state of -inf density (h0 = +inf) accepts any finite proposal.
    delta = torch.where(torch.isinf(h0) & finite, -math.inf, delta)
    diverging = ~finite | (delta > max_energy_error)
    log_accept = torch.where(diverging, -math.inf, (-delta).clamp(max=0.0))
    accept_prob = log_accept.exp()
    accepted = uniform < accept_prob
    a = accepted.unsqueeze(-1)
    new_state = HMCState(
        torch.where(a, z1, z0),
        torch.where(accepted, lb1, state.log_base),
        torch.where(accepted, lt1, state.log_target),
        torch.where(a, gb1, state.grad_base),
        torch.where(a, gt1, state.grad_target),
    )
    return new_state, HMCInfo(accept_prob, accepted, diverging, delta)
