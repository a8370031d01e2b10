"""The result type shared by every MI bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def mean_and_stderr(values: torch.Tensor | None) -> tuple[float | None, float | None]:
    """Mean and standard error (std / sqrt(N)) of per-data-point values (N,); (None, None) for None."""
    if values is None:
        return None, None
    v = values.detach().double().flatten()
    n = v.numel()
    return float(v.mean()), (float(v.std() / math.sqrt(n)) if n > 1 else float("nan"))


@dataclass
class MIResult:
    """Lower and upper bounds on I(x; z), in nats.

    Attributes:
        method: name of the bound (``"ba"``, ``"iwae"``, ``"ais"``, ...).
        lower, upper: the bounds (means over data points); None where the method
            gives no such side.
        lower_stderr, upper_stderr: their standard errors over data points.
        lower_per_point, upper_per_point: per-data-point values, shape (N,).
        num_data: N, the number of data points (x, z) ~ p(x, z) averaged over.
        settings: the run's settings (num_particles, num_steps, ...).
        diagnostics: method-specific statistics (chain statistics, fitted-guide losses, ...).
        seconds: wall time of the estimate, set by :func:`pyro_mi.estimate_mi`.
        true_mi: the true MI where known (built-in examples), else None.
    """

    method: str
    lower_per_point: torch.Tensor | None = field(repr=False)
    upper_per_point: torch.Tensor | None = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict, repr=False)
    seconds: float | None = None
    true_mi: float | None = None

    def __post_init__(self):
        self.lower, self.lower_stderr = mean_and_stderr(self.lower_per_point)
        self.upper, self.upper_stderr = mean_and_stderr(self.upper_per_point)
        pp = self.lower_per_point if self.lower_per_point is not None else self.upper_per_point
        self.num_data = 0 if pp is None else int(pp.numel())

    @property
    def gap(self) -> float | None:
        """upper - lower (nats), where both sides exist."""
        if self.lower is None or self.upper is None:
            return None
        return self.upper - self.lower

    def to_arviz(self):
        """The recorded chains of an AIS result as ArviZ InferenceData (see :mod:`pyro_mi.diagnostics`).

        Raises ValueError for results without recorded chains.
        """
        from .diagnostics import to_inference_data

        return to_inference_data(self)

    @property
    def interval(self) -> tuple[float | None, float | None]:
        """(lower - 1.96 lower_stderr, upper + 1.96 upper_stderr), nats.

        The bounds are means over N simulated data points, so they bracket the MI
        of those points exactly (up to the bounds' own slack) and the true MI up
        to Monte-Carlo error: this interval contains it with about 95% probability.
        """
        lo = None if self.lower is None else self.lower - 1.96 * self.lower_stderr
        up = None if self.upper is None else self.upper + 1.96 * self.upper_stderr
        return lo, up

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: method, lower, upper, their stderrs, gap, interval_95, num_data,
        seconds, true_mi, the scalar settings and the scalar diagnostics."""
        out = {
            "method": self.method,
            "lower": self.lower,
            "upper": self.upper,
            "lower_stderr": self.lower_stderr,
            "upper_stderr": self.upper_stderr,
            "gap": self.gap,
            "interval_95": list(self.interval),
            "num_data": self.num_data,
            "seconds": self.seconds,
            "true_mi": self.true_mi,
        }
        scalar = (int, float, str, bool, type(None))
        out.update({k: v for k, v in self.settings.items() if isinstance(v, scalar)})
        out["diagnostics"] = {k: v for k, v in self.diagnostics.items() if isinstance(v, scalar)}
        return out

    def __str__(self) -> str:
        def fmt(v, s):
            return "      n/a" if v is None else f"{v:9.3f} ± {s:.3f}"

        rows = [
            f"method        {self.method}",
            f"lower (nats)  {fmt(self.lower, self.lower_stderr)}",
            f"upper (nats)  {fmt(self.upper, self.upper_stderr)}",
        ]
        if self.gap is not None:
            rows.append(f"gap (nats)    {self.gap:9.3f}")
        lo, up = self.interval
        if lo is not None or up is not None:
            fmt_end = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            rows.append(f"95% interval  [{fmt_end(lo)}, {fmt_end(up)}]  (bounds ± Monte-Carlo error over data points)")
        if self.true_mi is not None:
            rows.append(f"true MI       {self.true_mi:9.3f}")
        rows.append(f"num_data      {self.num_data:9d}")
        if self.seconds is not None:
            rows.append(f"seconds       {self.seconds:9.2f}")
        return "\n".join(rows)
