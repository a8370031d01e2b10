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
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

_CHAINS = "_pyro_mi_chains"
_DATA = "_pyro_mi_data"


class BatchingError(ValueError):
    """A program that fails, or computes something else, when run batched over pyro_mi's plates."""


def _sample_sites(trace) -> list[dict]:
    """The sample sites of a trace, without subsample and ``pyro.deterministic`` sites."""
    return [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample" and not site_is_subsample(s) and not s["infer"].get("_deterministic", False)
    ]


def _per_point(t: torch.Tensor, num_chains: int, num_data: int, data_pos: int) -> torch.Tensor:
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

    def trace(self, fn: Callable, num_chains: int, num_data: int, x: Mapping | None, what: str = "model",
              cond: Mapping | None = None):
        """Traces ``fn(x)``, conditioned on ``cond`` ``{site: (C, 1.., N, *shape)}``, inside the
        chains plate (and, without a data plate of the model's own, pyro_mi's data plate); folded,
        on x repeated C times, without the chains plate. Site values and log densities of the
        trace are read through :meth:`unfold` and :meth:`per_point`.

        Raises :class:`BatchingError` (a ValueError), naming the last site reached, if the
        program fails when batched (typically a one-data-point model whose sites do not
        broadcast)."""
        C, N = num_chains, num_data
        if cond:
            fn = poutine.condition(fn, data={k: self.fold(v, C, N) for k, v in cond.items()})
        try:
            with poutine.trace() as tracer:
                if self.folded:
                    fn({k: v.repeat((C,) + (1,) * (v.dim() - 1)) for k, v in x.items()})
                else:
                    with pyro.plate(_CHAINS, C, dim=self.chains_dim):
                        if self.has_data_plate:
                            fn(x)
                        else:
                            with pyro.plate(_DATA, N, dim=self.data_dim):
                                fn(x)
        except (RuntimeError, ValueError, IndexError) as e:
            done = [s["name"] for s in _sample_sites(tracer.trace)]
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

    def per_point(self, t: torch.Tensor, num_chains: int, num_data: int) -> torch.Tensor:
        """A site's log density (num_chains, *batch) summed to (num_chains, num_data)."""
        return _per_point(self.unfold(t, num_chains, num_data), num_chains, num_data, self.pos)

    def point(self, value: torch.Tensor, chain: int, index: int) -> torch.Tensor:
        """The value of one (chain, data point) of a traced site, keeping every dim:
        (C, 1.., N, *shape) -> (1, 1.., 1, *shape)."""
        return value.narrow(0, chain, 1).narrow(1 + self.pos, index, 1)

    def point_shape(self, value: torch.Tensor) -> torch.Size:
        """The shape of one data point of a traced site's value: (C, 1.., N, *shape) -> shape."""
        return value.shape[1:] if self.folded else value.shape[2 + self.pos :]


def check_declared_batch_dims(sites: Iterable[dict]) -> None:
    """Refuses sites (of a trace of the bare model) with batch dims of size > 1 that no plate declares.

    pyro_mi puts its own plates left of the model's batch dims and sums every dim
    right of the data dim into one data point, so an undeclared batch dim (typically
    a batch of designs passed as a model argument) would be silently summed into one MI.

    Raises:
        ValueError: naming the first such site and its undeclared batch shape.
    """
    for s in sites:
        shape = s["fn"].batch_shape
        declared = {f.dim for f in s["cond_indep_stack"] if f.dim is not None}
        dims = [d for d in range(-len(shape), 0) if shape[d] > 1 and d not in declared]
        if dims:
            raise ValueError(
                f"site {s['name']!r} has batch shape {tuple(shape)}, of which dims {dims} (sizes "
                f"{tuple(shape[d] for d in dims)}) are not declared by any pyro.plate. pyro_mi bounds the MI "
                "of one model (one design) at a time: bound a batch of designs one design at a time. Batch "
                "dims inside the model must be declared with pyro.plate (then they are part of one data "
                "point), or moved to the event shape with .to_event()"
            )


def _find_data_dim(sites: Mapping[str, dict], obs_sites: tuple[str, ...], n: int) -> int:
    frames = [f for f in sites[obs_sites[0]]["cond_indep_stack"] if f.size == n and f.dim is not None]
    if not frames:
        raise ValueError(
            f"data was given, but observed site {obs_sites[0]!r} is not inside a plate of size "
            f"{n} (the data's first dim); a data-plate model must wrap its sites in "
            "pyro.plate('data', x.shape[0])"
        )
    frame = frames[0]
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

    Raises:
        ValueError: undeclared batch dims (see :func:`check_declared_batch_dims`);
            for a data-plate model, an observed site outside a plate of size
            ``num_template``, a site outside the data plate, or a plate left of it.
    """
    data_dim = None if num_template is None else _find_data_dim(sites, obs_sites, num_template)
    check_declared_batch_dims(sites.values())
    # our plates go left of the batch dims (plates included) of one call
    rank = max(len(s["fn"].batch_shape) for s in sites.values())
    if data_dim is None:
        data_dim = -(rank + 1)
    return PlateLayout(num_template is not None, data_dim, min(data_dim, -rank) - 1)
