"""Plate handling: where pyro_mi's chains and data dims sit, and tracing a program inside them.

Every trace pyro_mi reads is made inside a chains plate (leftmost) and, for a
one-data-point model, a data plate right of it; a data-plate model brings its
own data plate. A data-plate model whose sites do not broadcast over a chains dim
(``expand(batch_shape)`` with its own batch shape) runs *folded*: no chains plate,
its C chains x N points as C·N rows of its own data plate (row c·N + i).
:class:`PlateLayout` records those dims for one model, traces programs inside them
and sums per-site log densities to one value per (chain, data point). :func:`plate_layout` finds the dims from a trace of the
bare model and refuses batch dims that no ``pyro.plate`` declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..resources import is_out_of_memory

CHAINS_PLATE = "_pyro_mi_chains"
DATA_PLATE = "_pyro_mi_data"


class BatchingError(ValueError):
    """A program that fails, or computes something else, when run batched over pyro_mi's plates."""


def sample_sites(trace) -> list[dict]:
    """The sample sites of a trace, without subsample and ``pyro.deterministic`` sites."""
    return [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample" and not site_is_subsample(s) and not s["infer"].get("_deterministic", False)
    ]


def sum_per_point(t: torch.Tensor, num_chains: int, num_data: int, data_pos: int) -> torch.Tensor:
    """Sums a (num_chains, *batch) tensor to (num_chains, num_data), keeping the data dim."""
    if t.shape == (num_chains, num_data):  # already per point (the usual case)
        return t
    t = t.movedim(1 + data_pos, 1)
    return t.expand((num_chains, num_data) + t.shape[2:]).reshape(num_chains, num_data, -1).sum(-1)


@dataclass(frozen=True)
class PlateLayout:
    """The plate dims of one model's traces.

    Attributes:
        has_data_plate: whether the model brings its own data plate.
        data_dim: the (negative) dim of the data plate.
        chains_dim: the (negative) dim of pyro_mi's chains plate, left of every other.
        folded: a data-plate model run without the chains plate, chains folded into its
            data plate.
    """

    has_data_plate: bool
    data_dim: int
    chains_dim: int
    folded: bool = False

    @property
    def pos(self) -> int:
        """Index of the data dim among the batch dims right of the chains dim."""
        return (-self.chains_dim - 1) + self.data_dim

    def trace(self, program: Callable[[int], object], num_chains: int, num_data: int, what: str = "model",
              cond: Mapping | None = None, enum: bool = False):
        """Traces ``program(copies)``, conditioned on ``cond`` ``{site: (C or 1, 1.., N, *shape)}``,
        inside the chains plate (and, without a data plate of the model's own, pyro_mi's data
        plate); ``copies`` is 1, or, folded, C: the program then runs on its data rows repeated C
        times, without the chains plate. Site values and log densities of the trace are read
        through :meth:`unfold` and :meth:`per_point`. With ``enum`` the discrete sites marked
        for enumeration are enumerated in parallel, in dims left of the chains dim.

        Raises :class:`BatchingError` (a ValueError), naming the last site reached, if the
        program fails when batched (typically a one-data-point model whose sites do not
        broadcast); out of memory is re-raised as it is (see :mod:`pyro_mi.resources`)."""
        C, N = num_chains, num_data
        fn = program
        if cond:
            fn = poutine.condition(fn, data={k: self.fold(v, C, N) for k, v in cond.items()})
        if enum:
            fn = poutine.enum(fn, first_available_dim=self.chains_dim - 1)
        try:
            with poutine.trace() as tracer:
                if self.folded:
                    fn(C)
                else:
                    with pyro.plate(CHAINS_PLATE, C, dim=self.chains_dim):
                        if self.has_data_plate:
                            fn(1)
                        else:
                            with pyro.plate(DATA_PLATE, N, dim=self.data_dim):
                                fn(1)
        except (RuntimeError, ValueError, IndexError) as e:
            if is_out_of_memory(e):
                raise
            done = [s["name"] for s in sample_sites(tracer.trace)]
            where = f"after site {done[-1]!r}" if done else "before its first sample site"
            raise BatchingError(
                f"the {what} failed {where} when pyro_mi ran it batched over {C} chains x "
                f"{N} data points: {e}. Its sites must broadcast over leading batch dims "
                "(use .to_event() for event dims, expand(batch_shape + ...) rather than expand([...]))"
            ) from e
        return tracer.trace

    def fold(self, value: torch.Tensor, num_chains: int, num_data: int) -> torch.Tensor:
        """A value in pyro_mi's layout (C or 1, 1.., N, *shape) as a trace of this layout takes it."""
        if not self.folded:
            return value
        value = value.expand((num_chains, num_data) + value.shape[2:])
        return value.reshape((num_chains * num_data,) + value.shape[2:])

    def unfold(self, value: torch.Tensor, num_chains: int, num_data: int) -> torch.Tensor:
        """A traced site value in pyro_mi's layout (C, 1.., N, *shape)."""
        return value.reshape((num_chains, num_data) + value.shape[1:]) if self.folded else value

    def values(self, trace, num_chains: int, num_data: int) -> dict[str, torch.Tensor]:
        """``{site: value (C, 1.., N, *shape)}`` of a trace's sample sites but ``pyro.factor`` ones."""
        return {s["name"]: self.unfold(s["value"], num_chains, num_data)
                for s in sample_sites(trace) if not isinstance(s["fn"], dist.Unit)}

    def per_point(self, t: torch.Tensor, num_chains: int, num_data: int) -> torch.Tensor:
        """A site's log density (num_chains, *batch) summed to (num_chains, num_data)."""
        return sum_per_point(self.unfold(t, num_chains, num_data), num_chains, num_data, self.pos)

    def point(self, value: torch.Tensor, chain: int, index: int) -> torch.Tensor:
        """The value of one (chain, data point) of a traced site, keeping every dim:
        (C, 1.., N, *shape) -> (1, 1.., 1, *shape)."""
        return value.narrow(0, chain, 1).narrow(1 + self.pos, index, 1)

    def point_shape(self, value: torch.Tensor) -> torch.Size:
        """The shape of one data point of a traced site's value: (C, 1.., N, *shape) -> shape."""
        return value.shape[1:] if self.folded else value.shape[2 + self.pos :]


def undeclared_batch_dims(sites: Iterable[dict]) -> dict[str, tuple[int, ...]]:
    """``{site: its batch shape}`` of the sites (of a trace of the bare model) with batch dims of
    size > 1 that no plate declares. pyro_mi puts its own plates left of them, so they are part
    of one data point, summed as Pyro's NUTS and ``Trace_ELBO`` sum them."""
    out = {}
    for s in sites:
        shape = s["fn"].batch_shape
        declared = {f.dim for f in s["cond_indep_stack"] if f.dim is not None}
        if any(shape[d] > 1 and d not in declared for d in range(-len(shape), 0)):
            out[s["name"]] = tuple(shape)
    return out


def check_declared_batch_dims(undeclared: Mapping[str, tuple]) -> None:
    """Refuses sites with undeclared batch dims (``{site: batch shape}``, see
    :func:`undeclared_batch_dims`) where a batch may be one of designs (:func:`pyro_mi.eig`).

    Raises:
        ValueError: naming the first such site, its batch shape and ``batch_dims=``.
    """
    for name, shape in undeclared.items():
        raise ValueError(
            f"site {name!r} has batch shape {shape} with dims that no pyro.plate declares. If they index "
            "designs, say how many leading dims of the design form the design batch with batch_dims= (or "
            "declare them with pyro.plate); if they belong to one experiment, declare them with pyro.plate "
            "or move them to the event shape with .to_event()"
        )


def common_frame(sites: Mapping[str, dict]):
    """The outermost vectorised plate frame that encloses every sample site, or None."""
    stacks = [{f for f in s["cond_indep_stack"] if f.dim is not None} for s in sites.values()]
    common = set.intersection(*stacks) if stacks else set()
    return min(common, key=lambda f: f.dim) if common else None


def _find_data_dim(sites: Mapping[str, dict], obs_sites: tuple[str, ...], n: int) -> int:
    frames = [f for f in sites[obs_sites[0]]["cond_indep_stack"] if f.size == n and f.dim is not None]
    if not frames:
        raise ValueError(
            f"data was given, but observed site {obs_sites[0]!r} is not inside a plate of size "
            f"{n} (the data's first dim); a data-plate model must wrap its sites in "
            "pyro.plate('data', x.shape[0])"
        )
    frame = min(frames, key=lambda f: f.dim)
    for s in sites.values():
        if frame not in s["cond_indep_stack"]:
            kind = "observed" if s["name"] in obs_sites else "latent"
            raise ValueError(
                f"{kind} site {s['name']!r} is outside the data plate {frame.name!r}; pyro_mi needs "
                "one latent vector per data point (global latent sites are not supported)"
            )
        outer = [f for f in s["cond_indep_stack"] if f.dim is not None and f.dim < frame.dim and f.size > 1]
        if outer:
            raise ValueError(
                f"site {s['name']!r} is in plate {outer[0].name!r} at dim {outer[0].dim}, left of the data "
                f"plate {frame.name!r} (dim {frame.dim}); the data plate must be the leftmost batch dim"
            )
    return frame.dim


def plate_layout(sites: Mapping[str, dict], obs_sites: tuple[str, ...], num_template: int | None) -> PlateLayout:
    """The plate dims of a model from the sample sites ``{name: site}`` of one trace of it.

    Args:
        sites: the sample sites of the bare model (outside pyro_mi's plates).
        obs_sites: the observed site names.
        num_template: for a data-plate model, the number of data points it was
            traced with (its data plate is found by that size); None for a
            one-data-point model.

    Batch dims that no plate declares are part of one data point
    (:func:`undeclared_batch_dims`).

    Raises:
        ValueError: for a data-plate model, an observed site outside a plate of size
            ``num_template``, a site outside the data plate, or a plate left of it.
    """
    data_dim = None if num_template is None else _find_data_dim(sites, obs_sites, num_template)
    # our plates go left of the batch dims (plates included) of one call
    rank = max(len(s["fn"].batch_shape) for s in sites.values())
    if data_dim is None:
        data_dim = -(rank + 1)
    return PlateLayout(num_template is not None, data_dim, min(data_dim, -rank) - 1)
