"""Annealed importance sampling chains, forward and reverse, in one tensor.

Brekelmans et al. 2022, sec. 3.1, eq. 11–12 (after Neal 2001): the geometric path
pi_t(z) ∝ pi0(z)^(1 - beta_t) gamma(z)^beta_t between a normalised base pi0 and the
unnormalised target gamma(z) = p(x, z). With states z_0, ..., z_{T-1},

* a **forward** chain starts at z_0 ~ pi0 and moves z_t ~ T_t(. | z_{t-1}), an HMC
  kernel leaving pi_{beta_t} invariant, for t = 1..T-1;
* a **reverse** chain starts at z_{T-1} = a sample of gamma's posterior p(z|x) and
  moves z_{t-1} ~ T_t(. | z_t) for t = T-1..1 (HMC is reversible, so the reverse
  kernel is the kernel itself).

Both carry the log importance weight of eq. 12,

    log w = sum_{t=1..T} (beta_t - beta_{t-1}) [log gamma(z_{t-1}) - log pi0(z_{t-1})],

with E_forward[w] = Z = p(x), so E_forward[log w] <= log p(x) <= E_reverse[log w]
(the single-chain AIS ELBO and EUBO). This holds exactly only if each kernel T_t is
fixed in advance: a step size adapted along a chain's own path makes the kernel depend
on that chain's past and biases the weights (``StepSizeAdapter`` below is therefore
for the tuning pilot of :mod:`.step_size` and for the explicitly approximate online
mode). With T = 1 there are no transitions and log w = log gamma(z_0) - log pi0(z_0),
the importance weight of IWAE. Forward and reverse chains share one tensor; each
chain reads its own beta at every step, so both directions cost one kernel call.

The loop knows only ``components(z) -> (log pi0(z), log gamma(z))`` over flat tensors
(C, N, D). It records nothing, shows no progress and writes no files: it reports each
step to an ``on_step`` callback, through which the front ends record chains, draw
progress bars and save checkpoints.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from . import hmc


class AISState(NamedTuple):
    """State of a set of AIS chains after ``step`` of T annealing steps.

    Attributes:
        step: number of completed annealing steps j (0..T).
        hmc: the chains' :class:`~pyro_mi.samplers.hmc.HMCState` (positions (C, N, D), ...).
        log_weights: accumulated log importance weights (C, N), nats.
        step_size: the chains' current step sizes (C, N): the last used with frozen
            step sizes, the adapted ones with an adapter.
    """

    step: int
    hmc: hmc.HMCState
    log_weights: torch.Tensor
    step_size: torch.Tensor


class StepInfo(NamedTuple):
    """What :func:`anneal` reports to ``on_step`` after annealing step j.

    Attributes:
        log_weight_increment: (C, N), nats, added to the log weights at this step.
        beta: (C,) the beta of this step's transition (nan at the last step, which has none).
        step_size: (C, N) the step size used by the transition (nan at the last step).
        hmc: the transition's :class:`~pyro_mi.samplers.hmc.HMCInfo`, or None at the last step.
    """

    log_weight_increment: torch.Tensor
    beta: torch.Tensor
    step_size: torch.Tensor
    hmc: hmc.HMCInfo | None


def tables(betas: torch.Tensor, reverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per annealing step j (rows j - 1) and chain: the weight coefficient beta_hi - beta_lo (T, C),
    and the beta index of the transition after step j (T, C; row T - 1 unused).

    A forward chain's step j weighs its state at beta_{j-1} by beta_j - beta_{j-1} and then
    moves under T_j; a reverse chain walks the same ladder from the top (eq. 12)."""
    T = betas.numel() - 1
    j = torch.arange(1, T + 1, device=reverse.device).unsqueeze(1)  # (T, 1)
    hi = torch.where(reverse, T - j + 1, j)
    delta = betas[hi] - betas[hi - 1]
    trans = torch.where(reverse, T - j, j).clamp(0, T)
    return delta, trans


def anneal(
    components: Callable,
    z_init: torch.Tensor,
    reverse: torch.Tensor,
    betas: torch.Tensor,
    step_size,
    num_leapfrog: int,
    generator: torch.Generator | None = None,
    *,
    adapter=None,
    state: AISState | None = None,
    on_step: Callable[[AISState, StepInfo], None] | None = None,
) -> AISState:
    """Runs forward and reverse AIS chains (eq. 12) to the end and returns the final state.

    Args:
        components: ``z (C, N, D) -> (log pi0(z), log gamma(z))``, each (C, N), differentiable.
        z_init: initial positions (C, N, D): draws of pi0 for forward chains, posterior
            samples for reverse chains.
        reverse: (C,) bool, True for reverse chains.
        betas: schedule (T + 1,), 0 = beta_0 <= ... <= beta_T = 1 (see :mod:`.schedules`).
        step_size: a tensor (T + 1, N) of step sizes per beta index and data point, the
            same for every chain at that beta (fixed kernels: the exact setting); or a
            float or (N,) tensor, the same at every beta (or the start of ``adapter``).
        num_leapfrog: L, leapfrog steps per HMC transition.
        generator: ``torch.Generator`` of every random number of the transitions.
        adapter: optional; after each transition ``step_size = adapter.update(step_size,
            accept_prob)`` per chain (online adaptation: the kernels then depend on the
            chains' past and the weights are only approximately unbiased).
        state: resume from this state (e.g. from a checkpoint) instead of ``z_init``.
        on_step: called as ``on_step(state, info)`` with the :class:`AISState` and
            :class:`StepInfo` after every annealing step; it may raise (e.g.
            KeyboardInterrupt) to stop the run.

    Returns:
        The final :class:`AISState` (``step == T``). No host synchronisation happens
        inside the loop.

    Raises:
        ValueError: mismatched shapes, bad step sizes, or a non-finite log density at a
            reverse chain's start.
    """
    if not isinstance(num_leapfrog, int) or num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be a positive integer, got {num_leapfrog!r}")
    C, N, _ = z_init.shape
    reverse = torch.as_tensor(reverse, dtype=torch.bool, device=z_init.device).reshape(-1)
    if reverse.numel() != C:
        raise ValueError(f"reverse has {reverse.numel()} entries for {C} chains")
    betas = betas.to(device=z_init.device, dtype=z_init.dtype)
    T = betas.numel() - 1
    delta, trans = tables(betas, reverse)
    beta_tab = betas[trans]  # (T, C)
    eps = torch.as_tensor(step_size, dtype=z_init.dtype, device=z_init.device)
    per_beta = eps.dim() == 2
    if (per_beta and (eps.shape != (T + 1, N) or adapter is not None)) or eps.dim() > 2:
        raise ValueError(
            f"step_size must be a float, (N,) or (T + 1, N) = ({T + 1}, {N}), got shape {tuple(eps.shape)}"
        )
    if not bool((eps > 0).all()):
        raise ValueError("step sizes must be positive")
    if state is None:
        st = hmc.init(components, z_init)
        if bool(reverse.any()) and not bool(torch.isfinite(st.log_target[reverse]).all()):
            raise ValueError(
                "log p(x, z) is not finite at the posterior sample that starts a reverse chain; "
                "check the model's support"
            )
        start = eps[0] if per_beta else eps
        state = AISState(0, st, z_init.new_zeros(C, N), start.expand(C, N).clone())
    nan = z_init.new_full((C, N), math.nan)
    while state.step < T:
        j = state.step + 1
        st = state.hmc
        d = delta[j - 1].unsqueeze(1)  # (C, 1)
        inc = torch.where(d == 0, 0.0, d * (st.log_target - st.log_base))
        inc = torch.nan_to_num(inc, nan=-math.inf)
        cur = state.step_size
        info = None
        if j < T:
            b = beta_tab[j - 1]
            used = eps[trans[j - 1]] if per_beta else cur
            st, info = hmc.step(st, components, b.unsqueeze(1), used, num_leapfrog, generator)
            cur = adapter.update(used, info.accept_prob) if adapter is not None else used
            report = StepInfo(inc, b, used, info)
        else:
            report = StepInfo(inc, nan[:, 0], nan, None)
        state = AISState(j, st, state.log_weights + inc, cur)
        if on_step is not None:
            on_step(state, report)
    return state
