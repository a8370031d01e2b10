"""What a sandwich's numbers are worth: the warnings every bound of a model's MI gets.

A bound can be valid and useless: thousands of nats wide because a few simulated points sit
where the proposal has no mass, below zero, or above what the observations can carry. Each
check below adds a warning that says what is wrong, how much, and what to change; the
points concerned are named by index in ``diagnostics``. Run on every result of
:func:`pyro_mi.estimate_mi` after its bound, and on each design's result of :func:`pyro_mi.eig`.

* **dominated**: at most 5% of the points carry half of the sandwich's total width;
* **noisy side**: a side's standard error is as large as a gap wider than 1 nat (a few points'
  extreme values set that side's mean);
* **below zero**: the lower side is below 0 (which every MI exceeds) by more than 2 standard
  errors;
* **above the ceiling**: the upper side exceeds a ceiling known from the observations'
  support: discrete observations give I(x; z) <= H(x) <= the log of the number of values
  x can take (:meth:`~pyro_mi.density.ModelDensity.mi_ceiling`); the ceiling also caps the
  interval for the model's MI. A lower side above it says nothing, and by more than 2 standard
  errors is not a bound at all: the densities the chains saw were not the model's somewhere;
* **wide**: every sandwich wider than 1 nat gets a line saying why, if none of the above did.

Crossed sides are judged in :class:`~pyro_mi.result.MIResult`: within two paired standard
errors a crossing is noise and is said to be (a note), beyond that a warning.
"""

from __future__ import annotations

import math

import torch

from .result import MIResult

#: a gap narrower than this (nats) is tight whatever its distribution over points
TIGHT = 0.1
#: the sandwich width from which a line must say why (nats)
WIDE = 1.0
#: at most this fraction of the points carrying half the total gap makes it dominated
DOMINANT_FRACTION = 0.05
#: indices of the worst points kept in ``diagnostics["dominant_points"]``
MAX_LISTED = 20


def assess(result: MIResult, ceiling: float | None = None, advice: str = "") -> None:
    """Adds the warnings of the module docstring to ``result`` (in place), and its ceiling.

    Args:
        result: a result with per-point sides (N,).
        ceiling: the known upper limit of the model's MI (nats), if any.
        advice: what to change to tighten this method's sandwich (ends each warning about width).
    """
    lo, up = result.lower_per_point, result.upper_per_point
    advice = advice or "a tighter method (ais), more num_particles / num_steps, or a proposal closer to the posterior"
    if ceiling is not None and math.isfinite(ceiling):
        result.ceiling = float(ceiling)
        if result.upper is not None and result.upper > ceiling:
            result.warnings.append(
                f"the upper side ({result.upper:.4g} nats) is above {ceiling:.4g} nats, the most the observations can "
                "carry (their entropy is at most the log of the number of values they can take): it is valid but "
                f"says nothing; the interval for the model's MI is capped there. Tighten it with {advice}")
        if result.lower is not None and result.lower > ceiling:
            beyond = result.lower - 2 * result.lower_stderr > ceiling
            result.warnings.append(
                f"the lower side ({result.lower:.4g} ± {result.lower_stderr:.2g} nats) is above {ceiling:.4g} nats, "
                "the most the observations can carry, " + (
                    "by more than 2 standard errors: it is not a bound here. At some points the log densities the "
                    "chains saw were not the model's (an over- or underflow at the edge of a prior's support, a chain "
                    "that diverged far out)" if beyond else
                    "within 2 standard errors: it says nothing (a few points' values set its mean; if they are "
                    "extreme, the log densities the chains saw there may not be the model's)")
                + "; run in float64 (torch.set_default_dtype(torch.float64)), or with a smaller step_size "
                  "(adapt='none')")
    if result.lower is not None and result.lower + 2 * result.lower_stderr < 0:
        result.warnings.append(
            f"the lower side ({result.lower:.4g} ± {result.lower_stderr:.2g} nats) is below 0 by more than 2 standard "
            "errors: every MI is at least 0, so it says nothing. The proposal misses the posterior at some simulated "
            f"points (their own latents weigh too much in the upper bound on log p(x)); use {advice}")
    if lo is None or up is None:
        return
    gap = (up - lo).detach().double()
    mean_gap = float(gap.mean())
    if mean_gap <= TIGHT:
        return
    said = _dominated(result, gap, advice)
    for side in ("lower", "upper"):
        se = getattr(result, f"{side}_stderr")
        if mean_gap > WIDE and se >= mean_gap:
            said = True
            result.warnings.append(
                f"the {side} side's standard error ({se:.3g} nats) is as large as the gap ({mean_gap:.3g}): a few "
                f"points' extreme values set its mean, which may move far between runs; use {advice}")
    if mean_gap > WIDE and not said:
        result.warnings.append(
            f"the sandwich is {mean_gap:.3g} nats wide (the median point's gap is {float(gap.median()):.3g}): the "
            f"proposal and the chains are far from the posterior at many points; use {advice}")


def _dominated(result: MIResult, gap: torch.Tensor, advice: str) -> bool:
    """Warns, and lists the points in ``diagnostics["dominant_points"]``, when at most
    :data:`DOMINANT_FRACTION` of the points carry half of the total gap; returns whether it did."""
    width = gap.clamp(min=0)
    total = float(width.sum())
    if total <= 0:
        return False
    order = width.argsort(descending=True)
    k = int((width[order].cumsum(0) < 0.5 * total).sum()) + 1
    N = gap.numel()
    if k > max(1, int(DOMINANT_FRACTION * N)):
        return False
    worst = order[:MAX_LISTED].tolist()
    result.diagnostics["dominant_points"] = worst
    share = float(width[order[:k]].sum()) / total
    listed = ", ".join(str(i) for i in worst[:5])
    result.warnings.append(
        f"{k} of {N} points carry {share:.0%} of the gap (the widest: points {listed}; up to {MAX_LISTED} in "
        f"diagnostics['dominant_points']): the sandwich's width comes from a few simulated points where the proposal "
        f"is far from the posterior (a heavy-tailed prior draws such points); the median point's gap is "
        f"{float(gap.median()):.3g} nats. Use {advice}")
    return True
