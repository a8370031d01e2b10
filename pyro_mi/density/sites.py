"""What pyro_mi reads from a trace site: its log density (scaled and masked as the model's joint
has it), what kind of site it is, and the non-centring of location-scale sites."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.messenger import Messenger

from . import enumeration
from .normal import site_log_prob


class _Deterministic(Messenger):
    """Marks the named sample sites deterministic, as ``pyro.deterministic`` marks its sites: a
    site that a reparameteriser made a function of its new latent is not a latent of its own."""

    def __init__(self, names):
        super().__init__()
        self.names = frozenset(names)

    def _postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.names:
            msg["infer"]["_deterministic"] = True


def decentred(model: Callable, sites: Sequence[str]) -> Callable:
    """``model`` with ``sites`` fully non-centred by Pyro's ``LocScaleReparam`` (new latents
    ``<site>_decentered``; the original sites become deterministic functions of them)."""
    return _Deterministic(sites)(poutine.reparam(model, config={k: LocScaleReparam(centered=0.0) for k in sites}))


def base_distribution(fn):
    """The distribution beneath a site's wrappers (``Independent``, masks, expands): what its parameters are
    read from."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def is_loc_scale(fn) -> bool:
    """A location-scale family on the real line (after Independent), as Pyro's AutoReparam picks them."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return {"loc", "scale"} <= set(fn.arg_constraints) and fn.support is dist.constraints.real


def check_joint(sites: Mapping[str, dict], obs_sites: Sequence[str]) -> None:
    """Refuses, naming the site, what would make the traced densities other than the model's joint:
    a site scaled (``poutine.scale``, a subsampling plate) or masked (``poutine.mask`` with a
    False entry), and an ``obs=`` value whose shape does not broadcast to its distribution's."""
    for name, s in sites.items():
        scale, mask = s["scale"], s["mask"]
        scaled = not (isinstance(scale, (int, float)) and scale == 1.0) and not (
            isinstance(scale, torch.Tensor) and bool((scale == 1).all()))
        if scaled:
            raise ValueError(
                f"site {name!r} is scaled by {scale if isinstance(scale, (int, float)) else 'a tensor'} "
                "(poutine.scale, or a subsampling plate): its log density is then not that of the model's joint "
                "distribution, whose MI pyro_mi bounds; remove the scale (and subsampling) for pyro_mi")
        if mask is not None and not (mask is True or (isinstance(mask, torch.Tensor) and bool(mask.all()))):
            raise ValueError(
                f"site {name!r} is masked (poutine.mask with False entries): its masked elements are not part of the "
                "model's joint density, whose MI pyro_mi bounds; remove the mask, or the masked elements, for pyro_mi")
    for o in obs_sites:
        fn, given = sites[o]["fn"], (sites[o].get("infer") or {}).get("obs")
        if isinstance(given, torch.Tensor):
            shape = fn.batch_shape + fn.event_shape
            try:
                ok = torch.broadcast_shapes(given.shape, shape) == shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"observed site {o!r}: the model passes obs= of shape {tuple(given.shape)}, but its "
                                 f"distribution has shape {tuple(shape)} (batch and event): check the data you pass")


def is_discrete(fn) -> bool:
    return fn.support.is_discrete or getattr(fn, "has_enumerate_support", False)


class MissingDensityError(ValueError):
    """A site's distribution has no ``log_prob`` (a simulator): raised where its density is needed."""


def scaled_log_prob(site: dict) -> torch.Tensor:
    """A trace site's log density with its ``poutine.scale`` and ``poutine.mask`` applied.

    Raises:
        MissingDensityError: the distribution's ``log_prob`` is not implemented.
    """
    try:
        lp = site_log_prob(site["fn"], site["value"])
    except NotImplementedError:
        raise MissingDensityError(
            f"site {site['name']!r}: its distribution {type(base_distribution(site['fn'])).__name__} has no "
            "log_prob (a simulator). "
            "Methods that evaluate p(x|z) (ba, iwae, ais, im-ais, cr-ais, bdmc) cannot run on it; giwae, "
            "infonce and mine-ais need only p(z) and simulation"
        ) from None
    return scale_and_mask(lp, site["scale"], site["mask"])


def describe(name: str) -> str:
    """How a message names a key of the per-site log densities: a site, or the enumerated parts."""
    return name if name in (enumeration.LATENTS, enumeration.OBSERVED) else f"site {name!r}"


def has_density(site: dict) -> bool:
    try:
        scaled_log_prob(site)
    except MissingDensityError:
        return False
    return True


__all__ = ["MissingDensityError", "check_joint", "decentred", "describe", "has_density", "is_discrete",
           "is_loc_scale", "scaled_log_prob"]
