"""ArviZ conversion of recorded AIS chains.

:func:`to_inference_data` turns the ``diagnostics["chains"]`` of an AIS result
(:mod:`pyro_mi.bounds.ais`) into an ArviZ ``InferenceData`` with

* ``posterior``: the latent sites under their own names, in constrained space, at
  thinned annealing steps: dims (chain, draw, data, *site dims); the draw coordinate
  is the annealing step j (a forward chain is then at beta_j, a reverse chain at
  beta_{T-j});
* ``sample_stats``: ``accept_prob``, ``step_size``, ``diverging`` and
  ``log_weight_increment`` per chain, annealing step (draw) and data point; the
  last step has no HMC transition (accept_prob nan there: use ``az.summary(..., skipna=True)``);
* attributes: the run's method, settings and bounds; the ``chain`` dim has a
  ``direction`` coordinate (forward / reverse).

All ArviZ-version specifics live in :func:`_from_dict` (the one seam to change when
ArviZ's container type changes, e.g. to ``xarray.DataTree`` in ArviZ 1.x).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .distributed import world
from .recording import STATS


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _attrs(result) -> dict[str, Any]:
    attrs: dict[str, Any] = {"method": result.method, "inference_library": "pyro_mi"}
    for k, v in {**result.settings, "lower": result.lower, "upper": result.upper, "num_data": result.num_data}.items():
        if isinstance(v, bool):
            attrs[k] = int(v)
        elif isinstance(v, (int, float, str)):
            attrs[k] = v
    for k in ("ess", "accept_rate", "divergences", "divergent_chain_fraction"):
        v = result.diagnostics.get(k)
        if isinstance(v, (int, float)):
            attrs[k] = v
    return attrs


def _from_dict(group: str, variables: dict, coords: dict, dims: dict, attrs: dict):
    """One InferenceData group from ``{var: array (chain, draw, ...)}`` by ``arviz.from_dict``:
    the compatibility seam (ArviZ 0.x here; ArviZ >= 1.0 takes ``from_dict({group: variables})``)."""
    import arviz as az

    if hasattr(az, "InferenceData"):
        idata = az.from_dict(**{group: variables}, coords=coords, dims=dims)
    else:  # pragma: no cover
        idata = az.from_dict({group: variables}, coords=coords, dims=dims)
    idata[group].attrs.update(attrs)
    return idata


def to_inference_data(result):
    """ArviZ ``InferenceData`` of the chains of an AIS :class:`~pyro_mi.result.MIResult`.

    Args:
        result: the result of an AIS method run with ``record=True`` or ``save_chains``.

    Returns:
        InferenceData with ``posterior`` and ``sample_stats`` groups as described in
        the module docstring; ``az.summary``, ``az.ess``, ``az.rhat`` and
        ``az.plot_trace`` accept it.

    Raises:
        ValueError: if the result has no recorded chains (not an AIS method, or
            ``record=False``).
    """
    chains = result.diagnostics.get("chains") if result.diagnostics else None
    if not chains:
        raise ValueError(
            f"result of method {result.method!r} has no recorded chains; to_arviz needs an AIS method "
            "(ais, im-ais, cr-ais, bdmc) run with record=True or save_chains=FILE (off by default: records grow with "
            "num_chains x num_data x num_steps)"
        )
    attrs = _attrs(result)
    stats = chains["stats"]
    T, C, N = stats["accept_prob"].shape
    base = {"chain": np.arange(C), "data": np.arange(N)}
    post_vars, post_dims, post_coords = {}, {}, {**base, "draw": np.asarray(chains["record_steps"], dtype=np.int64)}
    for name, v in chains["states"].items():  # (R, C, N, *shape)
        post_vars[name] = np.moveaxis(_numpy(v), 0, 1)
        post_dims[name] = ["data"] + [f"{name}_dim_{i}" for i in range(post_vars[name].ndim - 3)]
    idata = _from_dict("posterior", post_vars, post_coords, post_dims, attrs)
    stat_vars = {k: np.moveaxis(_numpy(stats[k]), 0, 1) for k in STATS if k in stats}
    stat_coords = {**base, "draw": np.arange(1, T + 1)}
    idata.extend(_from_dict("sample_stats", stat_vars, stat_coords, {k: ["data"] for k in stat_vars}, attrs))
    direction = ("chain", np.array(chains["direction"]))
    idata.posterior = idata.posterior.assign_coords(direction=direction)
    idata.sample_stats = idata.sample_stats.assign_coords(
        direction=direction, beta=("draw", _numpy(chains["betas"])[1:])
    )
    return idata


def write_chains(result, path) -> None:
    """:func:`save_chains`, and on failure the result keeps its numbers: the error goes to
    ``result.write_errors`` and its warnings (the command line prints the result, then the error,
    and exits with status 2)."""
    try:
        save_chains(result, path)
    except ValueError as e:
        result.write_errors.append(str(e))
        result.warnings.append(f"{e}: the bounds above are complete, the chains are not saved")


def save_chains(result, path: str) -> None:
    """Writes :func:`to_inference_data` of ``result`` to a netCDF file ``path`` (e.g. ``chains.nc``).
    Under ``torch.distributed`` only rank 0 writes (every rank holds the gathered chains).

    Raises:
        ValueError: as :func:`to_inference_data`, or if the file cannot be written.
    """
    if world()[0] != 0:
        return
    idata = to_inference_data(result)
    try:
        idata.to_netcdf(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot write chains to {str(path)!r}: {e}") from e
