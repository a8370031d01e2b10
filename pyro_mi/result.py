"""The result type shared by every MI bound, and the checks every result passes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

#: what the two kinds of numbers mean, in the words every result prints
SANDWICH_WORDS = "bounds on the MI of these {n} simulated points"
INTERVAL_WORDS = "95% interval for the model's MI"
#: how the warning of crossed sides begins
CROSSED = "the sides crossed"
#: diagnostics that list point indices (renumbered by :meth:`MIResult.select`)
POINT_INDEX_KEYS = ("refined_points", "dominant_points", "points_as_written", "points_centred")


def mean_and_stderr(values: torch.Tensor | None) -> tuple[float | None, float | None]:
    """Mean and standard error (std / sqrt(N)) of per-data-point values (N,); (None, None) for None.

    Raises:
        ValueError: fewer than 2 values (no standard error can be given).
    """
    if values is None:
        return None, None
    v = values.detach().double().flatten()
    n = v.numel()
    if n < 2:
        raise ValueError(f"a bound needs at least 2 data points for its standard error, got {n}")
    return float(v.mean()), float(v.std() / math.sqrt(n))


def jackknife_variance(left_out: torch.Tensor) -> float:
    """The jackknife variance (Efron & Stein 1981) of a mean over N points that share m random
    draws: (m-1)/m sum_j (T_(-j) - T_(.))^2, where T_(-j) is, up to a sign and a constant, the mean
    over points of ``left_out`` (m, N): each point's change of its value when draw j is left out (nats)."""
    t = left_out.detach().mean(-1).double()
    return float((t.numel() - 1) * t.var(correction=0))


def require_finite(method: str, parts: Mapping[str, torch.Tensor]) -> None:
    """Raises ValueError naming the first part (e.g. ``"log p(x|z) of the simulated points"``)
    that is not finite at some data point: a bound is never reported as inf or nan.

    Args:
        method: the bound's name, for the message.
        parts: ``{description: per-point tensor (N,)}`` in the order to check.
    """
    for what, t in parts.items():
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"{method}: {what} is not finite ({float(t.detach().flatten()[i])}) at {int(bad.sum())} of "
                f"{bad.numel()} data points (first: point {i}), so no finite bound exists there; check the "
                "model's densities and supports, or use a proposal that covers the posterior"
            )


def finite_side(method: str, side: str, values: torch.Tensor, why: str, advice: str) -> tuple[torch.Tensor | None,
                                                                                              list[str]]:
    """A side's per-point values (N,), or None with a warning where it is not finite at some point:
    there no finite bound exists (every proposal draw or chain had zero weight), so the side is
    not reported, and the warning names the points, ``why``, and ``advice``.

    Raises:
        ValueError: ``values`` is NaN somewhere (a density that could not be evaluated).
    """
    v = values.detach()
    if bool(torch.isnan(v).any()):
        require_finite(method, {f"the {side} side": values})
    bad = ~torch.isfinite(v)
    if not bool(bad.any()):
        return values, []
    where = bad.nonzero().flatten()
    listed = ", ".join(str(int(i)) for i in where[:5])
    return None, [f"the {side} side is not reported: at {int(bad.sum())} of {bad.numel()} points (first: {listed}) "
                  f"{why}, so no finite {side} bound on the MI exists there; {advice}"]


@dataclass
class MIResult:
    """Lower and upper bounds on I(x; z), in nats.

    ``lower`` and ``upper`` are means over N simulated data points (x_i, z_i) ~ p(x, z):
    they bound the MI *of these N points* (the mean of log p(x_i|z_i) - log p(x_i)),
    exactly for exact methods. The model's MI differs from that by Monte-Carlo error over
    points, usually larger than the gap: :attr:`interval` widens the bounds by 1.96
    standard errors into a 95% interval for the model's MI.

    Attributes:
        method: name of the bound (``"ba"``, ``"iwae"``, ``"ais"``, ...).
        lower, upper: the bounds (means over data points); None where the method
            gives no such side.
        lower_stderr, upper_stderr: their standard errors over data points.
        lower_per_point, upper_per_point: per-data-point values, shape (N,).
        num_data: N, the number of data points (x, z) ~ p(x, z) averaged over.
        settings: the run's settings (num_particles, num_steps, ...).
        diagnostics: method-specific statistics (chain statistics, fitted-guide losses, ...); a
            per-point one is a tensor whose last axis is the points (N), or a list of point indices
            under a key of :data:`POINT_INDEX_KEYS`; a number ``k`` beside a per-point ``k_per_point``
            is its mean. Under ``lower_jackknife`` / ``upper_jackknife``, a tensor (m, N) of each
            point's change of its side's value when one of m draws shared by every point is left
            out: that side's standard error then adds their :func:`jackknife_variance` (also in
            ``diagnostics["{side}_draws_variance"]``), for this result and each selection of it.
        warnings: reasons why a number may be loose or wrong (divergent chains, low ESS,
            crossed sides, approximate modes); empty when there are none.
        notes: conditions under which a side is a bound, where it is not one unconditionally
            (MINE-AIS's Prop. M.1); empty for the unconditional bounds.
        x: the simulated observations that were bounded, ``{site: (N, ...)}``, or None.
        z: their packed unconstrained latents (N, D), or None.
        seconds: wall time of the estimate, set by :func:`pyro_mi.estimate_mi`.
        true_mi: the true MI where known (built-in examples), else None.
        write_errors: files the run was asked to write and could not (the numbers are complete).
        rerun: set by :func:`pyro_mi.estimate_mi`: ``result.rerun(**options)`` bounds the same
            simulated points with the same proposal and random numbers, the method's options
            changed (e.g. ``num_steps=100``), writing no files and recording no chains unless
            asked; how :func:`pyro_mi.plots.sweep` draws the sandwich against T.
        ceiling: an upper limit of the model's MI known from the observations' support
            (discrete observations: the log of the number of values they can take), which
            caps :attr:`interval`; None where there is none.

    Raises:
        ValueError: fewer than 2 data points.
    """

    method: str
    lower_per_point: torch.Tensor | None = field(repr=False)
    upper_per_point: torch.Tensor | None = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    x: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    z: torch.Tensor | None = field(default=None, repr=False)
    seconds: float | None = None
    true_mi: float | None = None
    ceiling: float | None = None
    write_errors: list[str] = field(default_factory=list)
    rerun: Callable[..., "MIResult"] | None = field(default=None, repr=False, compare=False)
    #: functions ``check(result) -> list[str]`` deriving warnings from the result's per-point values and
    #: diagnostics (a bound's: a low ESS, divergent chains); run when the result is made, and again on
    #: each selection of its points (:meth:`select`)
    checks: tuple = field(default=(), repr=False, compare=False)
    #: the warnings and notes this result derived from its own points (a crossing, its checks), which a
    #: result of some of its points (:meth:`select`) derives afresh
    derived: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.lower, self.lower_stderr = mean_and_stderr(self.lower_per_point)
        self.upper, self.upper_stderr = mean_and_stderr(self.upper_per_point)
        for side in ("lower", "upper"):  # the variance over draws the points share (a shared-particle IWAE)
            d = self.diagnostics.get(f"{side}_jackknife")
            if d is not None and getattr(self, f"{side}_stderr") is not None:
                var = jackknife_variance(d)
                self.diagnostics[f"{side}_draws_variance"] = var
                setattr(self, f"{side}_stderr", math.sqrt(getattr(self, f"{side}_stderr") ** 2 + var))
        pp = self.lower_per_point if self.lower_per_point is not None else self.upper_per_point
        self.num_data = 0 if pp is None else int(pp.numel())
        if self.gap is not None and self.gap < 0:
            se = mean_and_stderr(self.upper_per_point - self.lower_per_point)[1]
            if -self.gap <= 2 * se:
                said = self.notes
                said.append(
                    f"{CROSSED} by {-self.gap:.3g} nats, within 2 standard errors of their paired difference "
                    f"({se:.2g}): Monte-Carlo noise (each side is a bound in expectation over its own draws); the "
                    "sandwich has closed")
            else:
                said = self.warnings
                said.append(
                    f"{CROSSED}: lower exceeds upper by {-self.gap:.3g} nats, more than 2 standard errors of their "
                    f"paired difference ({se:.2g}): a side is not a bound here (an approximate mode, or a proposal "
                    "that depends on the simulated latents)"
                )
            self.derived.append(said[-1])
        for check in self.checks:
            found = check(self)
            self.warnings.extend(found)
            self.derived.extend(found)

    def carried(self) -> tuple[list[str], list[str]]:
        """The warnings and notes that a result built from this one's points carries over: all but
        those this result derived from its own sides (:attr:`derived`), which a new result judges
        for itself."""
        return ([w for w in self.warnings if w not in self.derived], [n for n in self.notes if n not in self.derived])

    def select(self, index: torch.Tensor | slice) -> "MIResult":
        """The result of some of the points: ``index`` (a slice, or a LongTensor of point indices)
        applied to the per-point values, x, z and every per-point diagnostic (by the contract of
        :attr:`diagnostics`: a tensor whose last axis is the points, or a list of point indices under
        a key of :data:`POINT_INDEX_KEYS`, renumbered; a number ``k`` beside ``k_per_point`` is
        the selection's mean); its means, standard errors, crossing and :attr:`checks` are its own,
        and it carries the other warnings and notes (:meth:`carried`).

        Raises:
            ValueError: a result without per-point values.
        """
        N = self.num_data
        if not N:
            raise ValueError(f"result of method {self.method!r} has no per-point values to select from")
        def take(v):
            return v[..., index] if isinstance(v, torch.Tensor) and v.dim() and v.shape[-1] == N else v

        diagnostics = {k: take(v) for k, v in self.diagnostics.items()}
        if any(k in diagnostics for k in POINT_INDEX_KEYS):
            renumber = {i: j for j, i in enumerate(torch.arange(N)[index].tolist())}
            for k in POINT_INDEX_KEYS:
                if k in diagnostics:
                    diagnostics[k] = [renumber[i] for i in diagnostics[k] if i in renumber]
        for k, v in diagnostics.items():  # a scalar with a per-point companion is its mean
            per_point = diagnostics.get(f"{k}_per_point")
            if isinstance(v, float) and isinstance(per_point, torch.Tensor) and per_point.dim() == 1:
                diagnostics[k] = float(per_point.mean())
        warnings, notes = self.carried()
        return MIResult(
            self.method,
            lower_per_point=take(self.lower_per_point),
            upper_per_point=take(self.upper_per_point),
            settings=dict(self.settings),
            diagnostics=diagnostics,
            warnings=warnings,
            notes=notes,
            x=None if self.x is None else {k: v[index] for k, v in self.x.items()},
            z=None if self.z is None else self.z[index],
            true_mi=self.true_mi,
            checks=self.checks,
        )

    @property
    def gap(self) -> float | None:
        """upper - lower (nats), where both sides exist."""
        if self.lower is None or self.upper is None:
            return None
        return self.upper - self.lower

    def per_point(self):
        """One row per data point, as a pandas ``DataFrame``: ``lower``, ``upper``, ``gap`` (nats;
        NaN where the method gives no such side), the log p(x) bounds, and where the method has
        them ``ess`` (importance ESS of its weights), ``accept_rate`` (mean acceptance of its HMC
        transitions), ``divergent_chains`` and ``stuck_chains`` (counts), ``pilot_gap`` (how far its
        AIS pilot ended from the target), ``refined`` (rerun with more steps), ``dominant`` (among
        the widest points of a gap that a few carry) and ``warnings`` (what concerns this point).
        The point to look at first is the first row of ``df.sort_values("gap", ascending=False)``.

        Raises:
            ValueError: a result without per-point values.
        """
        import pandas as pd

        pp = self.lower_per_point if self.lower_per_point is not None else self.upper_per_point
        if pp is None:
            raise ValueError(f"result of method {self.method!r} has no per-point values")
        N = pp.numel()

        def col(t):
            return None if t is None else t.detach().double().cpu().reshape(-1).numpy()

        nan = torch.full((N,), float("nan"))
        lo, up = col(self.lower_per_point if self.lower_per_point is not None else nan), \
            col(self.upper_per_point if self.upper_per_point is not None else nan)
        df = pd.DataFrame({"lower": lo, "upper": up, "gap": up - lo})
        names = {"log_p_x_lower": "log_p_x_lower", "log_p_x_upper": "log_p_x_upper", "ess_per_point": "ess",
                 "accept_per_point": "accept_rate", "divergent_chains": "divergent_chains",
                 "stuck_chains": "stuck_chains", "pilot_gap": "pilot_gap"}
        for key, name in names.items():
            v = self.diagnostics.get(key)
            if isinstance(v, torch.Tensor) and v.numel() == N:
                df[name] = col(v)
        df["refined"] = False
        df.loc[list(self.diagnostics.get("refined_points", [])), "refined"] = True
        df["dominant"] = False
        df.loc[list(self.diagnostics.get("dominant_points", [])), "dominant"] = True
        said = []
        for i in range(N):
            row = df.iloc[i]
            tags = [text for flag, text in (
                (row["dominant"], "among the points that carry the gap"),
                (row.get("divergent_chains", 0) > 0, "divergent chains"),
                (row.get("stuck_chains", 0) > 0, "chains that never moved"),
                (row["refined"], "rerun with more annealing steps")) if flag]
            said.append("; ".join(tags))
        df["warnings"] = said
        df.index.name = "point"
        return df

    def to_arviz(self):
        """The recorded chains of an AIS result as ArviZ InferenceData (see :mod:`pyro_mi.diagnostics`).

        Raises ValueError for results without recorded chains.
        """
        from .diagnostics import to_inference_data

        return to_inference_data(self)

    @property
    def interval(self) -> tuple[float | None, float | None]:
        """(lower - 1.96 lower_stderr, upper + 1.96 upper_stderr), nats: a 95% interval for
        the model's MI (the bounds hold for the N simulated points; the standard errors are
        the Monte-Carlo error of their mean over points), its upper end capped at
        :attr:`ceiling`."""
        lo = None if self.lower is None else self.lower - 1.96 * self.lower_stderr
        up = None if self.upper is None else self.upper + 1.96 * self.upper_stderr
        if up is not None and self.ceiling is not None:
            up = min(up, self.ceiling)
        return lo, up

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-ready dict (None, never NaN or Infinity): method, lower, upper, their
        stderrs, gap, interval_95, num_data, meaning, warnings, notes, seconds, true_mi, the scalar
        settings and the scalar diagnostics."""
        out = {
            "method": self.method,
            "lower": self.lower,
            "upper": self.upper,
            "lower_stderr": self.lower_stderr,
            "upper_stderr": self.upper_stderr,
            "gap": self.gap,
            "interval_95": list(self.interval),
            "num_data": self.num_data,
            "meaning": {
                "lower_upper": SANDWICH_WORDS.format(n=self.num_data),
                "interval_95": INTERVAL_WORDS,
            },
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "seconds": self.seconds,
            "true_mi": self.true_mi,
            "ceiling": self.ceiling,
            "write_errors": list(self.write_errors),
        }
        scalar = (int, float, str, bool, type(None))
        out.update({k: v for k, v in self.settings.items() if isinstance(v, scalar) and k not in out})
        out["diagnostics"] = {k: v for k, v in self.diagnostics.items() if isinstance(v, scalar)}
        return json_safe(out)

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
        rows.append(f"              (lower, upper: {SANDWICH_WORDS.format(n=self.num_data)}; ± their standard error)")
        lo, up = self.interval
        fmt_end = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(f"95% interval  [{fmt_end(lo)}, {fmt_end(up)}]   ({INTERVAL_WORDS})")
        if self.true_mi is not None:
            rows.append(f"true MI       {self.true_mi:9.3f}")
        if self.ceiling is not None:
            rows.append(f"ceiling       {self.ceiling:9.3f}   (the most the observations can carry)")
        rows.append(f"num_data      {self.num_data:9d}")
        if self.seconds is not None:
            rows.append(f"seconds       {self.seconds:9.2f}")
        rows += [f"NOTE: {n}" for n in self.notes]
        rows += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(rows)


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by None, in dicts, lists and tuples
    recursively (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
