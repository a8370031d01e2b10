"""The model's own arguments: pyro_mi calls a model, and its guide, as their author does.

A model is called with the arguments its author gives it (``model(*args, **kwargs)``, a bound
method such as ``vae.model`` included); pyro_mi conditions the observed sites by name with
Pyro's handlers, whatever the author passed to ``obs=``. The arguments serve for shapes and
covariates only, with two exceptions that this module handles:

* **the data plate.** A plate that encloses every sample site, and whose size is the first dim
  of an argument that carries an observed site's values row by row (``obs=x``,
  ``obs=x.reshape(-1, 784)``), makes the model's rows independent data points: pyro_mi calls it
  on as many rows as it simulates, every argument with that first dim cycled (row i of a call
  is row ``i % n`` of the argument: data and per-point covariates alike). Without such a plate
  one call of the model is one data point.
* **the guide's input.** A guide reads x from its arguments (``encoder(x)``), so to score q(z|x)
  at simulated x pyro_mi writes each observed site's values into the argument the model reads
  them from. Where that is is found by running the model once per tensor argument with the
  argument replaced by its element indices (:func:`locate_observed`): an observed value that is
  a reshape, slice, transpose or dtype conversion of the argument reads back as indices, which
  say where each of its elements goes. An observed site no argument carries (``obs=x`` with
  ``x=None``) is passed to the guide as a keyword named after the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import pyro
import torch
from pyro import poutine

#: where an argument sits: ("arg", position) or ("kwarg", name)
Slot = tuple


@dataclass(frozen=True)
class ObservedSlot:
    """Where the model reads an observed site's values from.

    Attributes:
        slot: the argument, ``("arg", i)`` or ``("kwarg", name)``.
        index: for each element of the site's observed value (its shape), the flat index of the
            argument's element it is.
        columns: where row i of the value comes from row i of the argument, the index within
            one row (the value's shape but its first dim); else None.
    """

    slot: Slot
    index: torch.Tensor
    columns: torch.Tensor | None


def slot_name(slot: Slot, names: Sequence[str] = ()) -> str:
    """How a message names an argument: its parameter name where known, else its position."""
    kind, key = slot
    if kind == "kwarg":
        return repr(key)
    return repr(names[key]) if key < len(names) else f"#{key} (positional)"


class ModelArguments:
    """A model's arguments, bound for a batch of data points.

    Args:
        args, kwargs: the model's arguments, as its author calls it.

    Attributes:
        rows: n, the data plate's size (the rows of the per-point arguments); None when one call
            of the model is one data point.
        per_point: the slots whose first dim is the data plate's (cycled to any number of rows).
        observed: ``{site: ObservedSlot}`` where known (see :func:`locate_observed`).
    """

    def __init__(self, args: Sequence = (), kwargs: Mapping | None = None):
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.rows: int | None = None
        self.per_point: tuple[Slot, ...] = ()
        self.observed: dict[str, ObservedSlot] = {}

    def slots(self):
        """``(slot, value)`` of every argument."""
        yield from ((("arg", i), v) for i, v in enumerate(self.args))
        yield from ((("kwarg", k), v) for k, v in self.kwargs.items())

    def tensor_slots(self):
        """``(slot, value)`` of the tensor arguments."""
        return [(s, v) for s, v in self.slots() if isinstance(v, torch.Tensor)]

    def get(self, slot: Slot):
        kind, key = slot
        return self.args[key] if kind == "arg" else self.kwargs[key]

    def replaced(self, values: Mapping[Slot, Any]) -> tuple[tuple, dict]:
        """The arguments with the slots of ``values`` replaced."""
        args = [values.get(("arg", i), v) for i, v in enumerate(self.args)]
        kwargs = {k: values.get(("kwarg", k), v) for k, v in self.kwargs.items()}
        return tuple(args), kwargs

    def set_data_plate(self, rows: int) -> None:
        """Declares the data plate of ``rows`` rows: every tensor argument with that first dim is per point."""
        self.rows = rows
        self.per_point = tuple(s for s, v in self.tensor_slots() if v.dim() >= 1 and v.shape[0] == rows)

    def bind(self, points: torch.Tensor | None = None, copies: int = 1,
             observed: Mapping[str, torch.Tensor] | None = None) -> tuple[tuple, dict]:
        """The arguments for a call on the data ``points`` (their numbers: point i has row ``i % n``
        of every per-point argument), ``copies`` times over, with ``observed`` values ``{site: (M,
        *shape)}`` written where the model reads them (M = copies * len(points) rows; for a
        one-data-point model the arguments that carry them get a leading dim of M). Without a data
        plate and without ``observed`` these are the author's arguments. A site of a data-plate
        model must be carried row by row (:class:`ObservedSlot` ``columns``), which the caller checks.
        """
        values: dict = {}
        if self.rows is not None and points is not None:
            rows = (points % self.rows).repeat(copies)
            for s in self.per_point:
                v = self.get(s)
                values[s] = v.index_select(0, rows.to(v.device))  # v[rows], several times faster on CPU
        for site, x in (observed or {}).items():
            where = self.observed.get(site)
            if where is None:  # a keyword named after the site, below
                continue
            base = values.get(where.slot, self.get(where.slot))
            values[where.slot] = _write(base, where, x, rowwise=self.rows is not None)
        args, kwargs = self.replaced(values)
        for site in observed or {}:  # a site no argument carries: a keyword named after it
            if site not in self.observed:
                kwargs[site] = observed[site]
        return args, kwargs


def _write(base: torch.Tensor, where: ObservedSlot, x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """``base`` with the values ``x`` (M, *shape) written where the model reads them: into the M
    rows of a per-point argument (``rowwise``), or into M copies of a one-data-point argument."""
    M = x.shape[0]
    flat = (base.reshape(M, -1) if rowwise else base.reshape(1, -1).expand(M, -1)).clone()
    index = (where.columns if rowwise else where.index).reshape(-1).to(flat.device)
    flat[:, index] = x.reshape(M, -1).to(dtype=flat.dtype, device=flat.device)
    return flat.reshape((M,) + (base.shape[1:] if rowwise else base.shape))


def _exact_markers(value: torch.Tensor) -> torch.Tensor | None:
    """The element indices of ``value`` in its dtype, or None where the dtype cannot hold them exactly."""
    n = value.numel()
    if value.dtype == torch.bool or value.is_complex() or n == 0:
        return None
    if value.is_floating_point() and n > 2 / torch.finfo(value.dtype).eps:  # integers exact up to 2^(mantissa + 1)
        return None
    if not value.is_floating_point() and n - 1 > torch.iinfo(value.dtype).max:
        return None
    return torch.arange(n, device=value.device).to(value.dtype).reshape(value.shape)


def _observed_values(model: Callable, args: tuple, kwargs: dict, obs_sites: Sequence[str]) -> dict[str, Any]:
    """``{site: its obs= value}`` of one trace of the model as written (blocked, no gradient,
    the RNG left as it was)."""
    with torch.random.fork_rng(), torch.no_grad(), poutine.block():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return {n: s["value"] for n, s in trace.nodes.items() if n in obs_sites and s["type"] == "sample"}


def locate_observed(model: Callable, arguments: ModelArguments,
                    obs_sites: Sequence[str]) -> tuple[dict[str, ObservedSlot], dict[str, Slot]]:
    """Finds the argument each observed site's value comes from.

    Args:
        model: the model, called as ``model(*args, **kwargs)``.
        arguments: the model's arguments.
        obs_sites: the observed site names.

    Returns:
        ``(located, derived)``: ``{site: ObservedSlot}`` for the sites whose value is a
        rearrangement of one argument's elements, and ``{site: slot}`` for sites whose value
        changes with an argument in another way (``x / 255``), which pyro_mi cannot write to.
        Each tensor argument costs one model run (with Pyro's validation off; a run that
        fails tells nothing).
    """
    with pyro.validation_enabled(False):
        base = _observed_values(model, arguments.args, arguments.kwargs, obs_sites)
    located: dict[str, ObservedSlot] = {}
    derived: dict[str, Slot] = {}
    for slot, value in arguments.tensor_slots():
        todo = [s for s in obs_sites if s not in located and isinstance(base.get(s), torch.Tensor)]
        markers = _exact_markers(value)
        if not todo or markers is None:
            continue
        try:
            with pyro.validation_enabled(False):
                seen = _observed_values(model, *arguments.replaced({slot: markers}), obs_sites)
        except Exception:  # noqa: BLE001 - the model cannot run on index values: nothing learnt
            continue
        for site in todo:
            v, b = seen.get(site), base[site]
            if not isinstance(v, torch.Tensor) or v.shape != b.shape or torch.equal(v, b):
                continue
            where = _index_map(v, value)
            if where is None:
                derived[site] = slot
            else:
                located[site] = ObservedSlot(slot, *where)
    return located, derived


def _index_map(seen: torch.Tensor, arg: torch.Tensor):
    """``(index, columns)`` (see :class:`ObservedSlot`) if ``seen`` (the observed value of a run
    on ``arg``'s element indices) is a rearrangement of ``arg``'s elements, else None."""
    v = seen.detach().double()
    n = arg.numel()
    if not bool(((v == v.round()) & (v >= 0) & (v < n)).all()):
        return None
    index = v.long()
    columns = None
    if arg.dim() >= 1 and index.dim() >= 1 and index.shape[0] == arg.shape[0]:
        per_row = max(1, n // arg.shape[0])
        flat = index.reshape(index.shape[0], -1)
        row, col = flat // per_row, flat % per_row
        if bool((row == torch.arange(index.shape[0]).unsqueeze(-1)).all()) and bool((col == col[:1]).all()):
            columns = col[0].reshape(index.shape[1:])
    return index, columns
