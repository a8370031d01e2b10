"""Packing latent sites into one flat unconstrained vector per data point.

Each latent site is mapped to unconstrained space by ``biject_to(support).inv``
(Pyro's transforms) and flattened; the sites are concatenated in trace order
into z of shape (C, N, D). :func:`unpack` maps back and returns the
log|det J| of the change of variables, which the density layer adds to every
log density so that importance weights p(x, z) / q(z|x) are unchanged.

Site values are laid out as in a trace made inside pyro_mi's plates:
(C, 1.., N, *shape), where the ``1..`` dims (``pos`` of them) sit between the
chains dim and the data dim (see :class:`pyro_mi.density.plates.PlateLayout`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Sequence

import torch
from pyro.distributions.transforms import biject_to
from torch.distributions import constraints

from .plates import sum_per_point


@dataclass(frozen=True)
class LatentSite:
    """Layout of one latent site inside the packed vector.

    ``shape`` is the constrained value shape of one data point (batch dims to
    the right of the data dim, then event dims), ``unconstrained_shape`` the
    same after ``biject_to(support).inv``; the site occupies
    ``packed[..., offset:offset + numel]``.
    """

    name: str
    shape: torch.Size
    unconstrained_shape: torch.Size
    offset: int
    numel: int
    support: object

    @cached_property
    def transform(self):
        """``biject_to(support)``, built once per site; None for the identity (unconstrained support)."""
        t = biject_to(self.support)
        return None if _is_identity(t) else t


def _is_identity(t) -> bool:
    """Whether a transform from ``biject_to`` is the identity (unconstrained support)."""
    while isinstance(t, torch.distributions.transforms.IndependentTransform):
        t = t.base_transform
    return isinstance(t, torch.distributions.transforms.ComposeTransform) and not t.parts


def layout(sites: Sequence[dict], values: Mapping[str, torch.Tensor], pos: int) -> tuple[tuple[LatentSite, ...], int]:
    """The packed layout of latent ``sites`` (trace sites, whose ``fn.support`` is used).

    Args:
        sites: the latent sample sites, in packing order.
        values: their values from a trace inside pyro_mi's plates, (C, 1.., N, *shape).
        pos: the number of ``1..`` dims between the chains dim and the data dim.

    Returns:
        ``(latent_sites, latent_dim)``.
    """
    out, offset = [], 0
    for s in sites:
        v = values[s["name"]]
        support = fixed_support(s["fn"].support, s["name"])
        u = biject_to(support).inv(v)
        shape, ushape = v.shape[2 + pos :], u.shape[2 + pos :]
        numel = math.prod(ushape)
        out.append(LatentSite(s["name"], shape, ushape, offset, numel, support))
        offset += numel
    return tuple(out), offset


def fixed_support(support, name: str):
    """``support`` with tensor bounds that are one value everywhere (``Pareto(scalar_like(x, 1),
    ...)`` in a batched trace) made scalars, so that one bijection serves every point.

    Raises:
        ValueError: naming the site, a support whose bounds differ between points or elements
            (they depend on the data point or on other latents: no fixed bijection maps it).
    """
    base, wrappers = support, []
    while isinstance(base, constraints.independent):
        wrappers.append(base.reinterpreted_batch_ndims)
        base = base.base_constraint
    bounds = {k: getattr(base, k) for k in ("lower_bound", "upper_bound") if isinstance(getattr(base, k, None),
                                                                                          torch.Tensor)}
    if not bounds:
        return support
    for k, b in bounds.items():
        if b.numel() and not bool((b == b.reshape(-1)[0]).all()):
            raise ValueError(f"latent site {name!r} has a support whose {k.replace('_', ' ')} differs between points or "
                             f"elements ({support}): pyro_mi maps each latent to unconstrained space by one fixed "
                             "bijection; sample a variable of fixed support and transform it in the model")
    base = copy.copy(base)
    for k, b in bounds.items():
        setattr(base, k, float(b.reshape(-1)[0]))
    for n in reversed(wrappers):
        base = constraints.independent(base, n)
    return base


def unpack(sites: Sequence[LatentSite], z: torch.Tensor, pos: int, with_log_jacobian: bool = False):
    """Maps packed unconstrained z of shape (C, N, D) to constrained site values.

    Returns ``{site: (C, 1.., N, *shape)}`` (``pos`` dims of size 1 after C), and
    with ``with_log_jacobian`` also the summed log|det J| of shape (C, N), nats.
    """
    C, N = z.shape[:2]
    ones = (1,) * pos
    values, ldj = {}, z.new_zeros(C, N)
    for site in sites:
        u = z[..., site.offset : site.offset + site.numel].reshape((C,) + ones + (N,) + site.unconstrained_shape)
        t = site.transform
        if t is None:  # unconstrained site: identity, log|det J| = 0
            values[site.name] = u
            continue
        v = t(u)
        values[site.name] = v
        if with_log_jacobian:
            ldj = ldj + sum_per_point(t.log_abs_det_jacobian(u, v), C, N, pos)
    return (values, ldj) if with_log_jacobian else values


def pack(sites: Sequence[LatentSite], values: Mapping[str, torch.Tensor], pos: int) -> torch.Tensor:
    """Inverse of :func:`unpack`: constrained values ``{site: (C, 1.., N, *shape)}`` -> (C, N, D)."""
    parts = []
    for site in sites:
        v = values[site.name]
        u = v if site.transform is None else site.transform.inv(v)
        parts.append(u.reshape(u.shape[0], u.shape[1 + pos], site.numel))
    return torch.cat(parts, -1)


def boundary_points(support, value: torch.Tensor, num_chains: int, num_data: int) -> torch.Tensor:
    """Which points of a latent site's value lie at the boundary of its support.

    A point is at the boundary if its image under ``biject_to(support).inv`` is
    not finite (e.g. a positive draw that underflowed to 0), or if one of its
    elements is within the smallest normal float (``finfo.tiny``) of a
    ``lower_bound`` / ``upper_bound`` of the support, or (for a simplex) is at
    most ``finfo.tiny``, or is the float next to a bound at two or more points:
    torch clamps draws that underflow there (``Gamma(0.001, 1)`` to ``tiny``,
    ``Beta(1, 0.001)`` to the float below 1 in float32), so they are not draws
    of the distribution and their unconstrained values sit far from where its
    mass is. (One point next to a bound can be a fair draw: ``torch.rand``
    gives 1 - 2**-24 once in 2**24 draws; clamped draws repeat.)

    Args:
        support: the site's support (its distribution's, at the value's batch shape).
        value: the site's constrained value (C, 1.., N, *shape).
        num_chains, num_data: C and N.

    Returns:
        bool tensor (C, N).
    """

    def any_per_point(b: torch.Tensor) -> torch.Tensor:
        return b.reshape(num_chains, num_data, -1).any(-1)

    bad = any_per_point(~torch.isfinite(biject_to(support).inv(value)))
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    tiny = torch.finfo(value.dtype).tiny
    for bound in (getattr(base, "lower_bound", None), getattr(base, "upper_bound", None)):
        if bound is not None:
            b = torch.as_tensor(bound, dtype=value.dtype, device=value.device).expand(value.shape)
            bad = bad | any_per_point((value - b).abs() <= tiny)
            adjacent = any_per_point(torch.nextafter(value, b) == b)
            if adjacent.sum() >= 2:
                bad = bad | adjacent
    if isinstance(base, type(constraints.simplex)):
        bad = bad | any_per_point(value <= tiny)
    return bad


def inside(support, value: torch.Tensor) -> torch.Tensor:
    """``value`` with its elements at or beyond a bound of ``support`` moved to the nearest float
    inside it (``finfo.tiny`` above a bound of 0, one relative ``eps`` inside any other bound; a
    simplex's elements at least ``tiny``, renormalised), so that ``biject_to(support).inv`` is
    finite there. For draws that underflowed (see :func:`boundary_points`)."""
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    finfo = torch.finfo(value.dtype)
    for bound, side in ((getattr(base, "lower_bound", None), 1.0), (getattr(base, "upper_bound", None), -1.0)):
        if bound is None:
            continue
        b = torch.as_tensor(bound, dtype=value.dtype, device=value.device)
        edge = b + side * torch.clamp(b.abs() * finfo.eps, min=finfo.tiny)
        value = torch.maximum(value, edge) if side > 0 else torch.minimum(value, edge)
    if isinstance(base, type(constraints.simplex)):
        value = value.clamp_min(finfo.tiny)
        value = value / value.sum(-1, keepdim=True)
    return value
