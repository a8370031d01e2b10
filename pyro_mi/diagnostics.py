"""ArviZ conversion of recorded AIS chains, and what each group answers.

:func:`to_inference_data` turns the ``diagnostics["chains"]`` of an AIS result run with
``record=True`` or ``save_chains`` (:mod:`pyro_mi.bounds.ais`) into an ArviZ
``InferenceData`` whose groups keep ArviZ's meaning:

* ``posterior``: draws of p(z|x_i) only: every forward chain, its AIS weight final, takes
  :data:`~pyro_mi.bounds.ais.POSTERIOR_DRAWS` more HMC transitions at beta = 1; dims (chain,
  draw, data, *site dims), the latent sites under their own names in constrained space.
  ``az.summary(idata)`` gives one row per latent element and data point, and ``az.rhat`` /
  ``az.ess`` across the chains say whether the annealing delivered each point's chains to the
  same posterior (the question for a wide sandwich: are its chains stuck?);
* ``sample_stats``: those transitions' ``accept_prob``, ``step_size`` and ``diverging``;
* ``log_likelihood``: log p(x_i|z) at each posterior draw (all observed sites together, as
  ``obs``): how well the draws explain their point;
* ``annealing``: the chains along the annealing path, every chain (forward and reverse, the
  ``direction`` coordinate) at thinned annealing steps (the ``draw`` coordinate is the step j;
  ``beta`` the chain's beta there): for ``az.plot_trace`` of how a point's chains moved;
* ``annealing_stats``: per chain, annealing step and point, ``accept_prob``, ``step_size``,
  ``diverging``, ``log_weight_increment`` and ``log_weight`` (the AIS log weight so far; its
  last value is the chain's weight); the last step has no transition (nan there).

Attributes of every group: the run's method, settings and bounds. All ArviZ-version specifics
live in :func:`_from_dict` (the one seam to change when ArviZ's container type changes, e.g.
to ``xarray.DataTree`` in ArviZ 1.x).
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
        InferenceData with the groups of the module docstring; ``az.summary``, ``az.ess``,
        ``az.rhat`` and ``az.plot_trace`` accept it.

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
    import warnings

    attrs = _attrs(result)
    stats = chains["stats"]
    T, C, N = stats["accept_prob"].shape
    direction = np.array(chains["direction"])
    betas = _numpy(chains["betas"])
    base = {"chain": np.arange(C), "data": np.arange(N)}
    groups = {}
    draws = chains.get("posterior")
    if draws is not None:  # (M, C_fwd, N, ...) -> (C_fwd, M, N, ...)
        M, Cf = draws["accept_prob"].shape[:2]
        coords = {"chain": np.arange(Cf), "draw": np.arange(M), "data": np.arange(N)}
        post = {name: np.moveaxis(_numpy(v), 0, 1) for name, v in draws["z"].items()}
        groups["posterior"] = (post, coords, _site_dims(post))
        sample = {k: np.moveaxis(_numpy(draws[k]), 0, 1) for k in ("accept_prob", "step_size", "diverging")}
        groups["sample_stats"] = (sample, coords, {k: ["data"] for k in sample})
        if "log_likelihood" in draws:
            ll = _numpy(draws["log_likelihood"]).reshape(M, Cf, N)
            groups["log_likelihood"] = ({"obs": np.moveaxis(ll, 0, 1)}, coords, {"obs": ["data"]})
    steps = np.asarray(chains["record_steps"], dtype=np.int64)
    states = {name: np.moveaxis(_numpy(v), 0, 1) for name, v in chains["states"].items()}  # (R, C, N, ...) -> (C, R, ...)
    groups["annealing"] = (states, {**base, "draw": steps}, _site_dims(states))
    step_stats = {k: np.moveaxis(_numpy(stats[k]), 0, 1) for k in STATS if k in stats}
    step_stats["log_weight"] = np.cumsum(step_stats["log_weight_increment"], axis=1)
    groups["annealing_stats"] = (step_stats, {**base, "draw": np.arange(1, T + 1)}, {k: ["data"] for k in step_stats})
    idata = None
    for group, (variables, coords, dims) in groups.items():
        part = _from_dict(group if group in _STANDARD else "posterior", variables, coords, dims, attrs)
        if group in _STANDARD:
            idata = part if idata is None else idata.extend(part) or idata
            continue
        ds = part.posterior  # a group of our own: chain c (of its direction) is at this beta at draw (step) s
        s_idx = ds["draw"].values
        beta = np.where(direction[:, None] == "reverse", betas[T - s_idx][None, :], betas[s_idx][None, :])
        ds = ds.assign_coords(direction=("chain", direction), beta=(("chain", "draw"), beta))
        with warnings.catch_warnings():  # ArviZ warns of groups outside its schema; these are ours
            warnings.simplefilter("ignore", UserWarning)
            if idata is None:
                import arviz as az

                idata = az.InferenceData()
            idata.add_groups({group: ds})
    return idata


_STANDARD = ("posterior", "sample_stats", "log_likelihood")


def _site_dims(variables: dict) -> dict:
    return {name: ["data"] + [f"{name}_dim_{i}" for i in range(v.ndim - 3)] for name, v in variables.items()}


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
