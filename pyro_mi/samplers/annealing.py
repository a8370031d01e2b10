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

with E_forward[log w] <= log p(x) <= E_reverse[log w] (the single-chain AIS ELBO and
EUBO). With T = 1 there are no transitions and log w = log gamma(z_0) - log pi0(z_0),
the importance weight of IWAE. Forward and reverse chains share the tensor; each
chain reads its own beta at every step, so both directions cost one kernel call.

The sampler layer knows only ``components(z) -> (log pi0(z), log gamma(z))`` over
flat tensors (C, N, D).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from . import hmc


class AnnealingState(NamedTuple):
    """State of a set of AIS chains after ``step`` of T annealing steps.

    Attributes:
        step: number of completed annealing steps j (0..T).
        hmc: the chains' :class:`~pyro_mi.samplers.hmc.HMCState` (positions (C, N, D), ...).
        log_weights: accumulated log importance weights (C, N), nats.
        stats: ``{"accept_prob", "step_size", "diverging", "log_weight_increment"}``,
            each (T, C, N) (row j-1 for step j; no transition at the last step: accept_prob
            nan there), or None when not recorded.
        states: thinned positions (R, C, N, D) at the steps ``record_steps``, or None.
        rng: torch RNG state(s) at the end of the step (for checkpoints), or None.
    """

    step: int
    hmc: hmc.HMCState
    log_weights: torch.Tensor
    stats: dict | None
    states: torch.Tensor | None
    rng: object


def record_steps(num_steps: int, max_draws: int) -> list[int]:
    """Annealing steps j (1..T) at which positions are kept: about ``max_draws`` evenly spaced, T included."""
    thin = max(1, -(-num_steps // max(1, max_draws)))
    steps = [j for j in range(thin, num_steps + 1, thin)]
    if not steps or steps[-1] != num_steps:
        steps.append(num_steps)
    return steps


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    if device.type == "cuda":
        return (cpu, torch.cuda.get_rng_state(device))
    return (cpu, None)


def set_rng_state(rng) -> None:
    """Restores an RNG state captured by :func:`anneal` (CPU, and CUDA where present)."""
    cpu, cuda = rng
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _tables(betas: torch.Tensor, reverse: torch.Tensor):
    """Per step and chain: weight coefficient (T, C) and transition beta index (T, C)."""
    T = betas.numel() - 1
    j = torch.arange(1, T + 1, device=reverse.device).unsqueeze(1)  # (T, 1)
    hi = torch.where(reverse, T - j + 1, j)
    delta = (betas[hi] - betas[hi - 1])  # (T, C)
    trans = torch.where(reverse, T - j, j)  # beta index of the transition after step j (unused at j = T)
    return delta, trans


def anneal(
    components: Callable,
    z_init: torch.Tensor,
    reverse: torch.Tensor,
    betas: torch.Tensor,
    *,
    num_leapfrog: int = 2,
    step_size=0.1,
    adapt: bool = True,
    frozen_step_sizes: torch.Tensor | None = None,
    record: bool = True,
    max_draws: int = 100,
    state: AnnealingState | None = None,
    callback: Callable[[AnnealingState], None] | None = None,
    capture_rng: bool = False,
    progress: bool = False,
    desc: str = "AIS",
    kernel_options: dict | None = None,
    search_step_size: bool = False,
) -> AnnealingState:
    """Runs forward and reverse AIS chains (eq. 12) to the end and returns the final state.

    Args:
        components: ``z (C, N, D) -> (log pi0(z), log gamma(z))``, each (C, N), differentiable.
        z_init: initial positions (C, N, D): draws of pi0 for forward chains, posterior
            samples for reverse chains.
        reverse: (C,) bool, True for reverse chains.
        betas: schedule (T + 1,), 0 = beta_0 <= ... <= beta_T = 1 (see :mod:`.schedules`).
        num_leapfrog: L, leapfrog steps per HMC transition.
        step_size: initial step size (float or (C, N)).
        adapt: online per-chain step-size adaptation (see :func:`.hmc.step`).
        frozen_step_sizes: (T + 1, N) step sizes per beta index and data point; when given
            they are used for every chain (forward and reverse alike) and ``adapt`` is
            ignored, so every kernel is exactly reversible (the second round of two-round
            adaptation).
        record: keep per-step statistics and thinned positions (about ``max_draws``).
        state: resume from this state (from a checkpoint) instead of starting at ``z_init``.
        callback: called with the :class:`AnnealingState` after every step; it may raise
            (e.g. KeyboardInterrupt) to stop the run.
        capture_rng: store the RNG state in every state (needed for resumable checkpoints).
        progress: show a tqdm bar over annealing steps.
        kernel_options: extra keyword arguments of :func:`.hmc.step`.
        search_step_size: before the first step, run the per-chain step-size search of
            :func:`.hmc.initial_step_size` at each chain's first transition beta
            (only when adapting online and starting afresh).

    Returns:
        The final :class:`AnnealingState` (``step == T``). No host synchronisation
        happens inside the loop.

    Raises:
        ValueError: mismatched shapes, or a non-finite log density at a reverse chain's start.
    """
    if num_leapfrog < 1:
        raise ValueError(f"num_leapfrog must be >= 1, got {num_leapfrog!r}")
    C, N, D = z_init.shape
    reverse = torch.as_tensor(reverse, dtype=torch.bool, device=z_init.device).reshape(-1)
    if reverse.numel() != C:
        raise ValueError(f"reverse has {reverse.numel()} entries for {C} chains")
    betas = betas.to(device=z_init.device, dtype=z_init.dtype)
    T = betas.numel() - 1
    delta, trans = _tables(betas, reverse)
    beta_tab = betas[trans]  # (T, C): the beta of the transition after step j (row j - 1)
    kopts = dict(kernel_options or {})
    rec = record_steps(T, max_draws) if record else []
    rec_index = {j: i for i, j in enumerate(rec)}
    if state is None:
        st = hmc.init(components, z_init, step_size)
        if bool(reverse.any()):
            bad = ~torch.isfinite(st.log_target[reverse])
            if bool(bad.any()):
                raise ValueError(
                    "log p(x, z) is not finite at the posterior sample that starts a reverse chain; "
                    "check the model's support"
                )
        if search_step_size and adapt and frozen_step_sizes is None and T > 1:
            st = hmc.initial_step_size(st, components, betas[trans[0]].unsqueeze(1).expand(C, N))
        stats = None
        if record:
            stats = {
                "accept_prob": z_init.new_full((T, C, N), float("nan")),
                "step_size": z_init.new_zeros((T, C, N)),
                "diverging": torch.zeros((T, C, N), dtype=torch.bool, device=z_init.device),
                "log_weight_increment": z_init.new_zeros((T, C, N)),
            }
        states = z_init.new_zeros((len(rec), C, N, D)) if record else None
        state = AnnealingState(0, st, z_init.new_zeros(C, N), stats, states, None)
    bar = tqdm(total=T, initial=state.step, desc=desc, disable=not progress, leave=False)
    with torch.no_grad():
        while state.step < T:
            j = state.step + 1
            st = state.hmc
            d = delta[j - 1].unsqueeze(1)  # (C, 1)
            inc = torch.where(d == 0, 0.0, d * (st.log_target - st.log_base))
            inc = torch.nan_to_num(inc, nan=-math.inf)
            log_w = state.log_weights + inc
            stats = state.stats
            if j < T:
                b = beta_tab[j - 1].unsqueeze(1).expand(C, N)
                if frozen_step_sizes is not None:
                    st = st._replace(step_size=frozen_step_sizes[trans[j - 1]].to(st.z))
                used_eps = st.step_size
                st, info = hmc.step(
                    st, components, b, num_leapfrog, adapt=adapt and frozen_step_sizes is None, **kopts
                )
                if stats is not None:
                    stats["accept_prob"][j - 1] = info.accept_prob
                    stats["diverging"][j - 1] = info.diverging
                    stats["step_size"][j - 1] = used_eps
            elif stats is not None:
                stats["step_size"][j - 1] = st.step_size
            if stats is not None:
                stats["log_weight_increment"][j - 1] = inc
            states = state.states
            if states is not None and j in rec_index:
                states[rec_index[j]] = st.z
            rng = _rng_state(z_init.device) if capture_rng else None
            state = AnnealingState(j, st, log_w, stats, states, rng)
            bar.update(1)
            if callback is not None:
                callback(state)
    bar.close()
    return state
