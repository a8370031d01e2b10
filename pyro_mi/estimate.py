"""`estimate_mi`: the Python front end of the ``pyro-mi estimate`` command."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import pyro
import torch

from .bounds import METHODS
from .density import Data, ModelDensity
from .proposal import GaussianEncoder, GuideDensity, PriorProposal, fit_guide
from .result import MIResult


def make_proposal(
    density: ModelDensity,
    proposal: str = "guide",
    guide: Callable | None = None,
    *,
    fit_steps: int | None = None,
    progress: bool = True,
):
    """Builds the proposal q(z|x) for a bound.

    Args:
        density: the model's :class:`ModelDensity`.
        proposal: ``"prior"`` (q = p(z)) or ``"guide"``: the user's ``guide`` if given,
            else the default :class:`GaussianEncoder` fitted by :func:`fit_guide`.
        guide: a Pyro guide, see :class:`GuideDensity`.
        fit_steps: BA fitting steps for the default encoder (default 1000); for a
            user's guide, fitting happens only when ``fit_steps`` is given.

    Raises:
        ValueError: an unknown ``proposal``.
    """
    if proposal == "prior":
        return PriorProposal(density)
    if proposal != "guide":
        raise ValueError(f"proposal must be 'prior' or 'guide', got {proposal!r}")
    if guide is not None:
        q = GuideDensity(density, guide)
        if fit_steps:
            fit_guide(density, q, num_steps=fit_steps, progress=progress)
        return q
    q = GaussianEncoder(density)
    fit_guide(density, q, num_steps=1000 if fit_steps is None else fit_steps, progress=progress)
    return q


def estimate_mi(
    model: Callable,
    obs_sites: str | Sequence[str],
    *,
    method: str = "iwae",
    guide: Callable | None = None,
    proposal: str = "guide",
    num_data: int = 256,
    seed: int | None = 0,
    fit_steps: int | None = None,
    data: Data | torch.Tensor | None = None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    progress: bool = True,
    **options,
) -> MIResult:
    """Lower and upper bounds on the generative MI I(x; z) of a Pyro model, in nats.

    Simulates ``num_data`` pairs (x, z) ~ p(x, z) from the model and evaluates the
    chosen bound on them (Brekelmans et al. 2022, eq. 1: I = E log p(x|z) - E log p(x)).

    Args:
        model: a one-data-point Pyro model, or a data-plate model with ``data``
            given (see :class:`~pyro_mi.density.ModelDensity`).
        obs_sites: the observed site name(s) x; the other sample sites are z.
        method: a key of :data:`METHODS` (``"ba"``, ``"iwae"``, ...).
        guide: optional Pyro guide q(z|x) used as the proposal.
        proposal: ``"guide"`` (the guide, or a fitted default encoder) or ``"prior"``.
        num_data: N, simulated data points.
        seed: seeds Pyro/torch for a reproducible run (None leaves the RNG alone).
        fit_steps: BA fitting steps for the proposal (see :func:`make_proposal`).
        data, model_args, model_kwargs: passed to :class:`ModelDensity`.
        progress: show progress bars.
        **options: method options, e.g. ``num_particles=1000``.

    Returns:
        :class:`~pyro_mi.result.MIResult` with ``seconds`` set.

    Raises:
        ValueError: unknown method, and every input error of the density layer.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    start = time.perf_counter()
    if seed is not None:
        pyro.set_rng_seed(seed)
    density = ModelDensity(model, obs_sites, model_args=model_args, model_kwargs=model_kwargs, data=data)
    x, z = density.sample(num_data)
    q = make_proposal(density, proposal, guide, fit_steps=fit_steps, progress=progress)
    result = METHODS[method](density, q, x, z, progress=progress, **options)
    result.settings.update({"proposal": proposal, "seed": seed})
    result.seconds = time.perf_counter() - start
    return result
