"""Pictures of a sandwich: where its width comes from, how its chains moved, how it closes with T.

:func:`plot` draws, from one result, the distribution of the per-point gaps with the widest
points marked (what :meth:`~pyro_mi.result.MIResult.per_point` lists), and for an AIS result
recorded with ``record=True`` (or ``--save-chains``) the forward chains' acceptance and step size
against beta along the annealing path (from its ``annealing_stats`` group, see
:mod:`pyro_mi.diagnostics`). Given a :func:`sweep` (the same simulated points bounded at
several T, as in Grosse et al. 2015 and Brekelmans et al. 2022, Fig. 7) it also draws the
sandwich against T: the plot that justifies a T. Built on matplotlib; ArviZ's own plots
(``az.plot_trace(result.to_arviz(), ...)``) show a point's chains.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .result import MIResult

#: the widest points :func:`plot` labels
LABELLED = 5


def sweep(result: MIResult, values: Sequence[int], option: str = "num_steps") -> list[MIResult]:
    """The sandwich against a budget: ``result``'s points bounded again, with the same proposal
    and random numbers, at each value of ``option`` (:meth:`MIResult.rerun`), ``result`` itself
    where a value is its own. For AIS, ``num_steps``: the plot of Grosse et al. 2015 and
    Brekelmans et al. 2022 (Fig. 7) that justifies a T; for IWAE, ``num_particles``.

    Args:
        result: a result of :func:`pyro_mi.estimate_mi`.
        values: the option's values, e.g. ``(10, 100, 1000)``.
        option: a method option whose growth tightens the sandwich.

    Returns:
        one result per value, in the order of ``values``.

    Raises:
        ValueError: a result without ``rerun`` (not made by ``estimate_mi``), or an option the
            method does not take.
    """
    if result.rerun is None:
        raise ValueError("sweep needs a result of pyro_mi.estimate_mi (it reruns the same points)")
    if option not in result.settings:
        raise ValueError(f"method {result.method!r} has no option {option!r} to sweep (its settings: "
                         f"{', '.join(sorted(result.settings))})")
    return [result if int(v) == result.settings[option] else result.rerun(**{option: int(v)}) for v in values]


def plot(result: MIResult, path=None, sweep: Sequence[MIResult] | None = None):
    """Draws the panels of the module docstring and returns the matplotlib ``Figure`` (saved to
    ``path`` if given: PNG, PDF, ... by its suffix).

    Args:
        result: a result with per-point values.
        path: a file to save the figure to.
        sweep: results of the same points at increasing T (:func:`sweep`).

    Raises:
        ValueError: a result without per-point values.
    """
    df = result.per_point()
    chains = (result.diagnostics or {}).get("chains")
    panels = ["gaps"] + (["annealing"] if chains else []) + (["sweep"] if sweep else [])
    size = (5 * len(panels), 4)
    if path is None:  # pyplot's figure, shown by notebooks and plt.show()
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size)
    else:  # no pyplot: no backend needed and nothing kept in its list of open figures
        from matplotlib.figure import Figure

        fig = Figure(figsize=size)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        {"gaps": _gaps, "annealing": _annealing, "sweep": _sweep}[panel](ax, result, df, sweep)
    fig.suptitle(f"{result.method}: [{_num(result.lower)}, {_num(result.upper)}] nats on {result.num_data} points")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _gaps(ax, result, df, sweep) -> None:
    """The per-point gaps, widest first (a symmetric-log scale: a point's sides may cross by noise),
    the widest labelled by index."""
    gap = df["gap"].dropna().sort_values(ascending=False)
    if gap.empty:
        ax.text(0.5, 0.5, "one side only: no gaps", ha="center", transform=ax.transAxes)
        return
    ax.plot(range(1, len(gap) + 1), gap.values, ".", ms=3)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(max(1e-3, float(gap.abs().median())))))
    for rank, (point, value) in enumerate(gap.head(LABELLED).items(), start=1):
        ax.annotate(str(point), (rank, value), textcoords="offset points", xytext=(4, 2), fontsize=8, color="C3")
    positive = gap.clip(lower=0.0)
    share = positive.head(max(1, len(gap) // 20)).sum() / positive.sum() if positive.sum() > 0 else float("nan")
    ax.set_title(f"per-point gap: mean {gap.mean():.3g}, median {gap.median():.3g};\n"
                 f"the widest 5% of points carry {share:.0%} of it")
    ax.set_xlabel("points, widest first")
    ax.set_ylabel("upper - lower (nats)")


def _annealing(ax, result, df, sweep) -> None:
    """The forward chains' mean acceptance and step size against beta."""
    chains = result.diagnostics["chains"]
    stats = chains["stats"]
    forward = torch.tensor([d == "forward" for d in chains["direction"]])
    betas = chains["betas"][1:].detach().cpu()
    accept = stats["accept_prob"][:, forward].nanmean((1, 2)).detach().cpu()
    step = stats["step_size"][:, forward].nanmean((1, 2)).detach().cpu()
    ax.plot(betas, accept, label="acceptance")
    ax.set_xlabel("beta")
    ax.set_ylabel("mean acceptance probability")
    ax.set_ylim(0, 1.05)
    twin = ax.twinx()
    twin.plot(betas, step, color="C1", label="step size")
    twin.set_yscale("log")
    twin.set_ylabel("mean step size", color="C1")
    ax.set_title("forward chains along the annealing path")


def _sweep(ax, result, df, sweep) -> None:
    """The two sides against the swept option, each value's gap written above it. No error bars:
    every run bounds the same points, so the sides' standard error over points (the MI's
    Monte-Carlo error, in :attr:`MIResult.interval`) is common to all and says nothing of the gap."""
    option = next(k for k in ("num_steps", "num_particles", "num_chains")
                  if len({r.settings.get(k) for r in sweep}) == len(sweep))
    steps = [r.settings[option] for r in sweep]
    drawn = []
    for side, colour in (("lower", "C0"), ("upper", "C3")):
        values = [getattr(r, side) for r in sweep]
        ok = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        ax.plot([steps[i] for i in ok], [values[i] for i in ok], color=colour, marker="o", label=side)
        drawn += [abs(values[i]) for i in ok]
    if drawn and max(drawn) > 10 * max(1.0, min(drawn)):  # an upper side far above the lower: both visible
        ax.set_yscale("symlog", linthresh=1.0)
    for t, r in zip(steps, sweep):
        if r.gap is not None:
            ax.annotate(f"{r.gap:.3g}", (t, r.upper), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel({"num_steps": "T (annealing steps)", "num_particles": "K (importance samples)"}.get(option, option))
    ax.set_ylabel("MI bound (nats)")
    ax.legend()
    ax.set_title(f"the sandwich against {option}\n(gap written above each; same points)")
