"""Annealing schedules 0 = beta_0 < beta_1 < ... < beta_T = 1 for the geometric path (eq. 11).

* ``linear``: beta_t = t / T (the schedule of Prop. 3.1 of Brekelmans et al. 2022,
  whose sandwich gap then shrinks as 1/T).
* ``sigmoid``: beta_t = (s(t) - s(0)) / (s(T) - s(0)) with s(t) = sigmoid(radius (2 t / T - 1)),
  the schedule of Wu et al. 2017 ("On the quantitative analysis of decoder-based
  generative models", used by Brekelmans et al. 2022, App. O.1.2); it spends more
  steps near beta = 0 and beta = 1, where the annealed densities change fastest.
"""

from __future__ import annotations

import torch

SCHEDULES = ("linear", "sigmoid")


def linear_schedule(num_steps: int) -> torch.Tensor:
    """beta_t = t / T, t = 0..T: float64 tensor (T + 1,)."""
    _check(num_steps)
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


def sigmoid_schedule(num_steps: int, radius: float = 4.0) -> torch.Tensor:
    """Normalised sigmoid schedule of Wu et al. 2017 with the given radius: float64 (T + 1,).

    Raises:
        ValueError: for ``num_steps < 1`` or ``radius <= 0``.
    """
    _check(num_steps)
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    s = torch.sigmoid(radius * torch.linspace(-1.0, 1.0, num_steps + 1, dtype=torch.float64))
    b = (s - s[0]) / (s[-1] - s[0])
    b[0], b[-1] = 0.0, 1.0
    return b


def get_schedule(schedule, num_steps: int, radius: float = 4.0) -> torch.Tensor:
    """A schedule by name (``"linear"``, ``"sigmoid"``) or given values; float64 (T + 1,).

    A given sequence must start at 0, end at 1, be non-decreasing and have
    ``num_steps + 1`` values (so that ``num_steps`` is never silently ignored).

    Raises:
        ValueError: an unknown name, an invalid sequence, or one of another length.
    """
    if isinstance(schedule, str):
        if schedule == "linear":
            return linear_schedule(num_steps)
        if schedule == "sigmoid":
            return sigmoid_schedule(num_steps, radius)
        raise ValueError(f"schedule must be one of {SCHEDULES} or a sequence of betas, got {schedule!r}")
    b = torch.as_tensor(schedule, dtype=torch.float64).flatten()
    if b.numel() < 2 or b[0] != 0 or b[-1] != 1 or bool((b[1:] < b[:-1]).any()):
        raise ValueError("a schedule given as values must be non-decreasing from 0 to 1 (T + 1 values, T >= 1)")
    if b.numel() != num_steps + 1:
        raise ValueError(f"a schedule of {b.numel()} values has {b.numel() - 1} steps, but num_steps is {num_steps}")
    return b


def _check(num_steps) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
