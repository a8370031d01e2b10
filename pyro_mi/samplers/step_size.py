"""Step-size tuning for the AIS kernels: an adapter, a pilot run, and the frozen schedule.

A step size that adapts along a chain's own path makes that chain's kernel depend on
its past, which biases AIS weights (E[w] != p(x)) and so the bounds. pyro_mi therefore
tunes step sizes in a **pilot** (:func:`pilot_step_sizes`): a few forward chains anneal
along a coarse sub-grid of the schedule, adapting one step size per data point; the
adapted values are **frozen** (:func:`freeze`) into a table (T + 1, N) of step sizes per
beta index and data point, interpolated over the full grid. The chains whose weights
enter a bound then run with those fixed kernels and fresh random numbers, so every
transition is an exact, reversible HMC kernel and the bounds hold exactly.

Two rules (:class:`StepSizeAdapter`):

* ``"multiplicative"``, the rule of Brekelmans et al. 2022 (App. O.1.2, after Neal
  2001): multiply the step size by ``factor`` (1.02) where the acceptance probability
  exceeds the target (65%), divide by it otherwise. Used per chain by the approximate
  online mode. It moves 2% a step: too slow for a pilot of a few coarse steps.
* ``"scaling"`` (the pilot's): the leapfrog energy error grows as the fourth power of
  the step size (Neal 2011, sec. 5.4.4; Beskos et al. 2013), and for a Gaussian energy
  error of mean mu the mean acceptance is 2 Phi(-sqrt(mu / 2)). The rule inverts the
  observed mean acceptance (pooled over the pilot's chains of a data point) to mu and
  rescales the step size by (mu* / mu)^(1/4), mu* the mean error of the target
  acceptance, clamped to a factor of 4 a step: it reaches the target in a step or two
  from far away and sits still near it.

The pilot aims at 90% mean acceptance, not the paper's 65%. On stiff posteriors the
acceptance of leapfrog HMC is a cliff: high up to about twice the posterior's smallest
scale, then near 0. A mean of 65% sits on the edge, where a frozen step size diverges for
many chains (the measurements: the docs' tuning page).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable

import torch

from . import hmc
from .ais import StepInfo, anneal

#: default target acceptance probability (App. O.1.2)
TARGET_ACCEPT = 0.65
#: the pilot's target mean acceptance (see :func:`pilot_step_sizes`)
PILOT_TARGET_ACCEPT = 0.9
#: the range step sizes are kept in
STEP_SIZE_BOUNDS = (1e-4, 10.0)


def _mean_energy_error(accept: torch.Tensor) -> torch.Tensor:
    """mu with 2 Phi(-sqrt(mu / 2)) = accept: the mean of a Gaussian energy error N(mu, 2 mu)
    whose mean acceptance min(1, e^-dH) is ``accept``."""
    return 2 * torch.special.ndtri(accept / 2) ** 2


class StepSizeAdapter:
    """A step-size update from the acceptance probabilities of one transition.

    Args:
        rule: ``"multiplicative"`` (Brekelmans et al. 2022, App. O.1.2) or ``"scaling"``
            (the pilot's; see the module docstring).
        factor: > 1; the multiplicative rule's factor (1.02 in the paper), or the scaling
            rule's largest change per update.
        target_accept: the target acceptance probability.
        pool_chains: use the mean acceptance over chains (dim 0) per data point, so
            that all chains of a point share one step size.
        bounds: the step sizes are clamped to this range.
    """

    def __init__(self, rule: str = "multiplicative", factor: float = 1.02, target_accept: float = TARGET_ACCEPT,
                 pool_chains: bool = False, bounds: tuple[float, float] = STEP_SIZE_BOUNDS):
        if rule not in ("multiplicative", "scaling"):
            raise ValueError(f"rule must be 'multiplicative' or 'scaling', got {rule!r}")
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        if not 0 < target_accept < 1:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
        self.rule, self.factor, self.target_accept = rule, factor, target_accept
        self.pool_chains, self.bounds = pool_chains, bounds
        self._target_error = 2 * NormalDist().inv_cdf(target_accept / 2) ** 2  # mu* (a float: no host tensor)

    def update(self, step_size: torch.Tensor, accept_prob: torch.Tensor) -> torch.Tensor:
        """New step sizes (C, N) from the ones used (C, N or broadcastable) and the acceptance (C, N)."""
        a = accept_prob.mean(0, keepdim=True) if self.pool_chains else accept_prob
        eps = step_size.expand(accept_prob.shape)
        if self.rule == "multiplicative":
            new = torch.where(a > self.target_accept, eps * self.factor, eps / self.factor)
        else:
            ratio = (self._target_error / _mean_energy_error(a.clamp(0.01, 0.99))) ** 0.25
            new = eps * ratio.clamp(1 / self.factor, self.factor)
        return new.clamp(*self.bounds)


def search_step_size(
    components: Callable,
    state: hmc.HMCState,
    beta,
    step_size,
    generator: torch.Generator | None = None,
    *,
    num_iters: int = 6,
    target_accept: float = TARGET_ACCEPT,
) -> torch.Tensor:
    """A coarse per-data-point step size at ``beta`` from positions that stay where they are.

    Each iteration draws a momentum, takes one leapfrog step per chain and doubles the
    step size where the acceptance probability exceeds ``target_accept``, else halves it
    (the heuristic of Hoffman & Gelman 2014, Alg. 4, per chain); the result is the
    geometric mean over chains, (N,). Costs ``num_iters`` components evaluations.
    """
    z = state.z
    beta = torch.as_tensor(beta, dtype=z.dtype, device=z.device).expand(z.shape[:2])
    eps = torch.as_tensor(step_size, dtype=z.dtype, device=z.device).expand(z.shape[:2]).clone()
    h0 = -hmc.mix(state.log_base, state.log_target, beta)
    for _ in range(num_iters):
        r0 = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        _, r1, (lb1, lt1, _, _) = hmc.leapfrog(state, components, beta, eps, 1, r0)
        delta = (-hmc.mix(lb1, lt1, beta) + 0.5 * (r1 * r1).sum(-1)) - (h0 + 0.5 * (r0 * r0).sum(-1))
        acc = torch.nan_to_num((-delta).clamp(max=0.0).exp(), nan=0.0)
        eps = torch.where(acc > target_accept, eps * 2.0, eps * 0.5).clamp(*STEP_SIZE_BOUNDS)
    return eps.log().mean(0).exp()


def freeze(indices: torch.Tensor, log_step_sizes: torch.Tensor, num_betas: int) -> torch.Tensor:
    """The frozen table (T + 1, N) of step sizes per beta index, from tuned values at some indices.

    Args:
        indices: (M,) increasing beta indices in 1..T-1 where step sizes were tuned.
        log_step_sizes: (M, N) their log step sizes.
        num_betas: T + 1.

    Returns:
        exp of the piecewise-linear interpolation in the beta index of the log step sizes,
        constant beyond the first and last tuned index: (T + 1, N).
    """
    idx = indices.to(log_step_sizes.device, log_step_sizes.dtype)
    t = torch.arange(num_betas, device=idx.device, dtype=idx.dtype)
    hi = torch.searchsorted(idx, t).clamp(1, max(idx.numel() - 1, 1))
    lo = hi - 1
    if idx.numel() == 1:
        return log_step_sizes[:1].expand(num_betas, -1).exp()
    w = ((t - idx[lo]) / (idx[hi] - idx[lo])).clamp(0, 1).unsqueeze(1)
    return torch.lerp(log_step_sizes[lo], log_step_sizes[hi], w).exp()


def pilot_grid(num_steps: int, num_pilot_steps: int) -> torch.Tensor:
    """Beta indices (P + 1,) of a coarse sub-grid 0 = i_0 < ... < i_P = T of a T-step schedule."""
    P = max(1, min(num_steps, num_pilot_steps))
    return torch.linspace(0, num_steps, P + 1, dtype=torch.float64).round().long().unique()


class PilotAdapter:
    """The pilot's step-size adaptation, as init / update / final.

    ``init`` searches a starting step size per data point at the first pilot beta
    (:func:`search_step_size`); the pilot's chains then anneal along the sub-grid :attr:`betas`
    (:func:`pilot_grid`) with :attr:`rule` (the pooled ``"scaling"`` rule of :class:`StepSizeAdapter`)
    adapting one step size per data point, ``update`` recording the step size tuned at each pilot
    beta (the geometric mean of the values before and after its update, which cancels the rule's
    oscillation); ``final`` interpolates them over all T + 1 beta indices (:func:`freeze`), the table
    every bound-bearing chain then runs with, fixed.

    Args:
        betas: the full schedule (T + 1,), T >= 2.
        num_pilot_steps: P, the pilot's annealing steps (default ceil(T / 5), at least 5).
        target_accept: the pilot's target mean acceptance (0.9; see the module docstring).
        smooth: the width of the moving average over pilot betas (1: none).
    """

    def __init__(self, betas: torch.Tensor, num_pilot_steps: int | None = None,
                 target_accept: float = PILOT_TARGET_ACCEPT, smooth: int = 5):
        self.num_betas = betas.numel()
        T = self.num_betas - 1
        P = num_pilot_steps if num_pilot_steps is not None else max(5, math.ceil(T / 5))
        self.grid = pilot_grid(T, P)
        self.betas = betas[self.grid]
        self.rule = StepSizeAdapter("scaling", 4.0, target_accept=target_accept, pool_chains=True)
        self.smooth = smooth
        self._logs: list[torch.Tensor] = []
        self._start: torch.Tensor | None = None

    def init(self, components: Callable, state: hmc.HMCState, step_size, generator=None) -> torch.Tensor:
        """The starting step sizes (N,): a search from ``step_size`` at the first pilot beta."""
        self._start = search_step_size(components, state, self.betas[1], step_size, generator)
        return self._start

    def update(self, state, info: StepInfo) -> None:
        """Records the step size of a pilot transition (an ``on_step`` observer of the pilot's anneal)."""
        if info.hmc is not None:
            self._logs.append(state.step_size.log().mean(0))

    def final(self) -> torch.Tensor:
        """The frozen table (T + 1, N) of step sizes."""
        if not self._logs:
            return self._start.expand(self.num_betas, -1).clone()
        trans = self.grid[1:-1]  # the pilot's transitions: at fine indices grid[1] .. grid[P - 1]
        return freeze(trans, _moving_average(torch.stack(self._logs), self.smooth), self.num_betas)


class OnlineAdapter:
    """The online mode's step-size adaptation (approximate: Brekelmans et al. 2022, App. O.1.2), as
    init / update / final.

    :attr:`rule` (the paper's multiplicative rule, 1.02 a step) adapts each forward chain's step size
    along its own path, from ``init``'s start; ``update``, an observer ``(key, state, info)`` of
    those chains, sums the log step size used at each transition over the chains (per chunk
    ``key``, so that a checkpoint keeps it); ``final`` freezes their mean per beta index into the
    table (T + 1, N) the reverse chains run with.
    """

    #: the per-chain rule (a class attribute: the adapter's state is :attr:`data` alone)
    rule = StepSizeAdapter("multiplicative", 1.02)

    def __init__(self):
        self.data: dict = {}

    def init(self, step_size) -> float:
        """The forward chains' starting step size: ``step_size`` itself."""
        return step_size

    def update(self, key, state, info: StepInfo) -> None:
        """Adds the log step sizes of a transition of chunk ``key``."""
        if info.hmc is None:
            return
        d = self.data.setdefault(key, {})
        d[state.step] = d.get(state.step, 0) + info.step_size.log().sum(0)

    __call__ = update  # an observer of the chains

    def final(self, num_betas: int, num_chains: int) -> torch.Tensor:
        """The mean step size per beta index over the ``num_chains`` forward chains, frozen: (T + 1, N)."""
        T = num_betas - 1
        sums = [sum(d[j] for d in self.data.values()) / num_chains for j in range(1, T)]
        return freeze(torch.arange(1, T), torch.stack(sums), num_betas)


def pilot_step_sizes(
    components: Callable,
    z_init: torch.Tensor,
    betas: torch.Tensor,
    step_size,
    num_leapfrog: int,
    generator: torch.Generator | None = None,
    *,
    num_pilot_steps: int | None = None,
    target_accept: float = PILOT_TARGET_ACCEPT,
    smooth: int = 5,
    on_step: Callable | None = None,
    return_weights: bool = False,
):
    """Tunes step sizes in a cheap pilot and returns them frozen: (T + 1, N).

    The pilot's forward chains start at ``z_init`` (draws of pi0, typically a few chains
    per data point) and anneal with the adaptation of :class:`PilotAdapter`. Their weights are
    thrown away: the pilot's only output is the table.

    Args:
        components, num_leapfrog, generator: as :func:`~pyro_mi.samplers.ais.anneal`.
        z_init: (C_pilot, N, D) starting positions, draws of pi0.
        betas: the full schedule (T + 1,).
        step_size: the starting step size of the search (float).
        num_pilot_steps, target_accept, smooth: as :class:`PilotAdapter`.
        on_step: optional callback ``on_step(state, info)`` (progress bars).
        return_weights: also return the pilot chains' final log weights (C_pilot, N): how far
            from the target each point's pilot ended (their spread).

    Returns:
        (T + 1, N) step sizes, for :func:`~pyro_mi.samplers.ais.anneal` (and the log weights
        with ``return_weights``).
    """
    T = betas.numel() - 1
    N = z_init.shape[1]
    if T < 2:  # no transitions: the step size is never used
        table = z_init.new_full((T + 1, N), float(step_size))
        return (table, z_init.new_zeros(z_init.shape[:2])) if return_weights else table
    pilot = PilotAdapter(betas, num_pilot_steps, target_accept, smooth)
    eps0 = pilot.init(components, hmc.init(components, z_init), step_size, generator)

    def observe(state, info: StepInfo):
        pilot.update(state, info)
        if on_step is not None:
            on_step(state, info)

    reverse = torch.zeros(z_init.shape[0], dtype=torch.bool, device=z_init.device)
    final = anneal(components, z_init, reverse, pilot.betas, eps0, num_leapfrog, generator, adapter=pilot.rule,
                   on_step=observe)
    table = pilot.final()
    return (table, final.log_weights) if return_weights else table


def _moving_average(t: torch.Tensor, width: int) -> torch.Tensor:
    """Centred moving average of ``width`` rows of t (M, N), the end rows repeated at the edges."""
    h = width // 2
    if h == 0 or t.shape[0] < 2:
        return t
    padded = torch.cat([t[:1].expand(h, -1), t, t[-1:].expand(h, -1)])
    return sum(padded[i : i + t.shape[0]] for i in range(2 * h + 1)) / (2 * h + 1)
