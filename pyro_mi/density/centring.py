"""Centring a latent that the model's author non-centred by hand (``reparam="auto"``).

Eight schools as Pyro's ``mcmc.py`` example writes it samples eta ~ N(0, 1) and observes
y ~ N(mu + tau eta, sigma): non-centred by hand. Where the data pin the effects down (a large
tau), the posterior of (mu, log tau, eta) is a thin curved ridge, eta = (y - mu) / tau to within
sigma / tau, that no Gaussian fits and no linear preconditioner straightens, while in the
centred coordinates theta = mu + tau eta it is near Gaussian (Papaspiliopoulos, Roberts &
Sköld 2007, sec. 2). Pyro's reparameterisers only non-centre (a site ``Normal(loc, scale)``
becomes ``loc + scale * N(0, 1)``); this module goes the other way.

:func:`find_centring` probes the model for a latent site u on the real line and a real parameter
p of an observed site's distribution that is affine in u element by element,
p = a(g) + b(g) u, with a scale b that depends on the other latents g (a funnel: a constant b
makes the map linear, which the per-point Gaussian fit already undoes). :class:`CentredDensity`
is the density in the coordinates (g, p): z(v) sets u = (p - a(g)) / b(g), with a(g) and b(g)
read from one model run at u = 0 and u = 1, and log |det dz/dv| = -sum log |b(g)|. It is a
bijection of the latents, so each point's p(x_i), and every per-point bound of a chain run in
it, is the same (:func:`~pyro_mi.bounds.preconditioner.precondition` chooses it point by point).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from pyro.distributions import constraints

from .model import Data, ModelDensity
from .sites import base_distribution

#: simulated points of the probe, the relative error within which p(u) must be affine in u there, and the
#: relative spread of its scale b(g) over those points that makes the map more than a linear one
PROBE_POINTS = 8
AFFINE_RTOL = 1e-4
SCALE_RTOL = 1e-3


@dataclass(frozen=True)
class Centring:
    """u = ``latent`` (a real-line latent site) enters the observed site ``observed`` through its
    distribution's real parameter ``parameter`` = a(g) + b(g) u, element by element."""

    latent: str
    observed: str
    parameter: str


def observed_parameter(density: ModelDensity, x: Data, z: torch.Tensor, centring: Centring) -> torch.Tensor:
    """The observed site's parameter at packed z (C, N, D) and observed x ``{site: (N, *shape)}``:
    (C, N, numel), differentiable in z (one model run)."""
    C, N = z.shape[:2]
    cond = {**density.unpack(z), **{o: density._obs_layout(v) for o, v in x.items()}}
    with pyro.validation_enabled(False):
        fn = density._trace(C, N, cond, sample_obs=False).nodes[centring.observed]["fn"]
    p = torch.broadcast_to(getattr(base_distribution(fn), centring.parameter), fn.shape())
    return density._plates.unfold(p, C, N).reshape(C, N, -1)


def _at(z: torch.Tensor, block: slice, values: torch.Tensor) -> torch.Tensor:
    """z with the coordinates ``block`` replaced by ``values`` (broadcast)."""
    return torch.cat([z[..., : block.start], values.expand(z.shape[:-1] + (block.stop - block.start,)),
                      z[..., block.stop:]], -1)


def find_centring(density: ModelDensity) -> Centring | None:
    """The first (latent, observed site, parameter) whose parameter is affine in the latent element by
    element with a scale that differs between simulated points (see the module), checked at
    :data:`PROBE_POINTS` points of the prior at u = 0, 1 and two random u; None where there is none, for
    a model run point by point, with enumerated sites, or unless ``reparam="auto"`` left every site as
    written."""
    if density.reparam != "auto" or density.decentred_sites or density._points is not None or density.enumerated:
        return None
    latents = [s for s in density.latent_sites if s.transform is None]
    bases = {o: base_distribution(density.site_fns[o]) for o in density.obs_sites}
    observed = [(o, k) for o, fn in bases.items() for k, c in fn.arg_constraints.items()
                if c is constraints.real and k in vars(fn)]
    if not latents or not observed:
        return None
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        try:  # a draw of its own: no warnings, no memo of the density's last sample
            values = density._draw(1, PROBE_POINTS)[0]
        except Exception:  # noqa: BLE001 - a model the probe cannot simulate is left as written
            return None
        x = {o: density._to_data(values[o]) for o in density.obs_sites}
        z = density.pack({s.name: values[s.name] for s in density.latent_sites})[0]
        for site in latents:
            block = slice(site.offset, site.offset + site.numel)
            u = torch.cat([torch.zeros(1, PROBE_POINTS, site.numel), torch.ones(1, PROBE_POINTS, site.numel),
                           3 * torch.randn(2, PROBE_POINTS, site.numel)])
            zs = _at(z.expand((4,) + z.shape), block, u.to(z))
            for o, k in observed:
                c = Centring(site.name, o, k)
                try:
                    p = observed_parameter(density, x, zs, c)
                except Exception:  # noqa: BLE001 - a parameter the probe cannot read is not a centring
                    continue
                if p.shape[-1] != site.numel or not bool(torch.isfinite(p).all()):
                    continue
                a, b = p[0], p[1] - p[0]
                affine = (p[2:] - (a + b * zs[2:, :, block])).abs() <= AFFINE_RTOL * (a.abs() + (b * zs[2:, :, block]).abs() + 1)
                scaled = bool((b != 0).all()) and bool(((b - b[:1]).abs() > SCALE_RTOL * b.abs().amax()).any())
                if bool(affine.all()) and scaled:
                    return c
    return None


class CentredDensity:
    """``density`` at the points ``x`` in the coordinates v = (g, p) of a :class:`Centring` (see the
    module): log p(z(v)) + log |det dz/dv| and log p(x | z(v)). Everything else (sizes, data checks,
    the model) is the density's; :meth:`constrained` gives the model's own sites.

    Args:
        density: the :class:`ModelDensity`; centring: from :func:`find_centring`; x: its points'
            observed values ``{site: (N, *shape)}`` (the parameter may depend on them).
    """

    def __init__(self, density: ModelDensity, centring: Centring, x: Data):
        self.density, self.centring, self.x = density, centring, x
        site = next(s for s in density.latent_sites if s.name == centring.latent)
        self.block = slice(site.offset, site.offset + site.numel)

    def _parameter(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[-2]
        return observed_parameter(self.density, {k: v[:n] for k, v in self.x.items()}, z, self.centring)

    def z_of(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (*S, n, D) of v (*S, n, D) for the first n points, and log |det dz/dv| (*S, n)."""
        vv = v.reshape((-1,) + v.shape[-2:])
        at_0, at_1 = self._parameter(torch.cat([_at(vv, self.block, vv.new_zeros(())),
                                                _at(vv, self.block, vv.new_ones(()))])).chunk(2)
        scale = at_1 - at_0  # b(g); at_0 is a(g)
        z = _at(vv, self.block, (vv[..., self.block] - at_0) / scale)
        return z.reshape(v.shape), -scale.abs().log().sum(-1).reshape(v.shape[:-1])

    def v_of(self, z: torch.Tensor) -> torch.Tensor:
        """v (*S, n, D) of z (*S, n, D), for the first n points."""
        zz = z.reshape((-1,) + z.shape[-2:])
        return _at(zz, self.block, self._parameter(zz)).reshape(z.shape)

    def log_terms(self, x: Data, v: torch.Tensor, likelihood: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(z(v)) + log |det dz/dv|, log p(x | z(v))), each (*S, n), nats."""
        z, log_det = self.z_of(v)
        lp, ll = self.density.log_terms(x, z, likelihood)
        return lp + log_det, ll

    def constrained(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """v (*S, n, D) -> the model's sites ``{site: (*S, n, *shape)}``."""
        return self.density.constrained(self.z_of(v)[0])

    def from_point(self, start: int) -> "CentredDensity":
        """The density of the points from ``start`` on."""
        return CentredDensity(self.density.from_point(start), self.centring, {k: v[start:] for k, v in self.x.items()})

    def for_points(self, index: torch.Tensor) -> "CentredDensity":
        """The density of the points ``index`` (N',), in that order."""
        return CentredDensity(self.density.for_points(index), self.centring, {k: v[index] for k, v in self.x.items()})

    def __getattr__(self, name):  # sizes, data checks and the model are the density's
        if name == "density":
            raise AttributeError(name)
        return getattr(self.density, name)
