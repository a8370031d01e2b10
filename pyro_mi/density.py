"""The density layer: a Pyro model as batched tensor functions of (x, z).

`ModelDensity` reads log p(z), log p(x|z) and simulated (x, z) pairs from Pyro
traces; `GuideDensity` reads log q(z|x) and reparameterised samples from a Pyro
guide. Every latent site is packed into one flat vector per data point in
unconstrained space (``biject_to(support).inv``, Pyro's transforms), and the
log-Jacobian of that change of variables is added to each density, so that
importance weights p(x, z) / q(z|x) are unchanged and samplers see only flat
tensors of shape ``(..., num_data, latent_dim)``.

Two ways of writing a model are accepted:

* a model for **one data point** (no data plate; observed sites sample when
  not conditioned): pyro_mi adds a data plate and a chains plate itself;
* a model with a **data plate** that takes the observed values as keyword
  arguments named after the observed sites (``def model(x): with
  pyro.plate("data", x.shape[0]): ...``): pass ``data=`` (observed values of
  that shape, used as the template) and pyro_mi adds only a chains plate to the
  left of the model's plates.

Observed data travel as a dict ``{site: tensor of shape (num_data, *shape)}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

Data = Mapping[str, torch.Tensor]

_CHAINS = "_pyro_mi_chains"
_DATA = "_pyro_mi_data"


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


def _as_tuple(obs_sites) -> tuple[str, ...]:
    if isinstance(obs_sites, str):
        return (obs_sites,)
    obs = tuple(obs_sites)
    if not obs or not all(isinstance(s, str) for s in obs):
        raise TypeError(f"obs_sites must be a site name or a non-empty sequence of names, got {obs_sites!r}")
    return obs


def _sample_sites(trace) -> list[dict]:
    return [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample" and not site_is_subsample(s) and not s["infer"].get("_deterministic", False)
    ]


def _is_discrete(fn) -> bool:
    return fn.support.is_discrete or getattr(fn, "has_enumerate_support", False)


def _per_point(t: torch.Tensor, num_chains: int, num_data: int, data_pos: int) -> torch.Tensor:
    """Sums a (num_chains, *batch) tensor to (num_chains, num_data), keeping the data dim."""
    if t.shape == (num_chains, num_data):  # already per point (the usual case)
        return t
    t = t.movedim(1 + data_pos, 1)
    return t.expand((num_chains, num_data) + t.shape[2:]).reshape(num_chains, num_data, -1).sum(-1)


_NORMALS = (dist.Normal, torch.distributions.Normal)
_INDEPENDENTS = (dist.Independent, torch.distributions.Independent)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """The smallest view of ``t`` that broadcasts back to it: size 1 along its expanded (stride-0) dims."""
    for i, (n, st) in enumerate(zip(t.shape, t.stride())):
        if st == 0 and n > 1:
            t = t.narrow(i, 0, 1)
    return t


def _broadcast_shape(a: torch.Size, b: torch.Size) -> torch.Size:
    """Broadcast shape of two shapes (``torch.broadcast_shapes`` runs a slow Python reference path)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for i, j in zip(a, b):
        if i != j and i != 1 and j != 1:
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(j if i == 1 else i)
    return torch.Size(out)


def _sum_event(t: torch.Tensor, shape: torch.Size, event: int) -> torch.Tensor:
    """Sum over the last ``event`` dims of ``t`` broadcast to ``shape``, without materialising the broadcast."""
    if event == 0:
        return t
    t = t.reshape((1,) * (len(shape) - t.dim()) + t.shape)
    lead = len(shape) - event
    dims = [i for i in range(lead, len(shape)) if t.shape[i] != 1]
    mult = math.prod(shape[i] for i in range(lead, len(shape)) if t.shape[i] == 1)
    if dims:
        t = t.sum(dims, keepdim=True)
    t = t.reshape(t.shape[:lead])
    return t * mult if mult != 1 else t


def site_log_prob(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)``, with a fast path for ``Normal`` and ``Independent(Normal)``.

    torch's ``Normal.log_prob`` squares, divides by and takes the log of the scale at the
    full broadcast shape (e.g. (chains, data, obs_dim) for a scalar noise scale) and
    differentiates through all of it; here the scale terms are computed at the scale's
    un-broadcast shape and summed over event dims analytically, which roughly halves the
    cost of a Gaussian likelihood inside AIS loops. Same density (nats), same shape as
    ``fn.log_prob(value)``; differentiable in the value and the parameters. Distributions
    with argument validation on take torch's path (so that validation still runs).
    """
    base, event = fn, 0
    if type(fn) in _INDEPENDENTS:
        base, event = fn.base_dist, fn.reinterpreted_batch_ndims
    if type(base) not in _NORMALS or fn._validate_args or base._validate_args:
        return fn.log_prob(value)
    shape = _broadcast_shape(value.shape, base.batch_shape + base.event_shape)
    scale = _compact(base.scale)
    loc = base.loc
    if value.dtype == loc.dtype:
        # (value - loc)^2 in one fused kernel forward and one backward; the input that needs
        # a gradient goes first, so that its gradient needs no extra negation
        sq_shape = _broadcast_shape(value.shape, loc.shape)
        a, b = (value, loc) if value.requires_grad and not loc.requires_grad else (loc, value)
        sq = torch.nn.functional.mse_loss(a.expand(sq_shape), b.expand(sq_shape), reduction="none")
    else:
        sq = (value - loc).square()
    k = -0.5 / (scale * scale)
    if k.numel() == 1:
        quad = _sum_event(sq, shape, event) * k.reshape(())
    else:
        quad = _sum_event(sq * k, shape, event)
    const = _sum_event(scale.log() + _HALF_LOG_2PI, shape, event)
    return (quad - const).expand(shape[: len(shape) - event])


def _scaled_log_prob(site: dict) -> torch.Tensor:
    """A trace site's log density with its ``poutine.scale`` and ``poutine.mask`` applied."""
    return scale_and_mask(site_log_prob(site["fn"], site["value"]), site["scale"], site["mask"])


def _is_identity(t) -> bool:
    """Whether a transform from ``biject_to`` is the identity (unconstrained support)."""
    while isinstance(t, torch.distributions.transforms.IndependentTransform):
        t = t.base_transform
    return isinstance(t, torch.distributions.transforms.ComposeTransform) and not t.parts


class ModelDensity:
    """Batched log densities and simulation of a Pyro model p(z) p(x|z).

    Args:
        model: a Pyro model. Either a one-data-point model (no data plate; its
            observed sites sample when not conditioned) or, with ``data``
            given, a model with its own data plate that takes the observed
            values as keyword arguments named after ``obs_sites``.
        obs_sites: name or names of the observed sites x; every other sample
            site is a latent z and must be continuous.
        model_args, model_kwargs: extra arguments passed to every call of the model.
        data: for a data-plate model, observed values ``{site: (n, *shape)}``
            (or one tensor if there is one observed site); only their shapes are
            used, as the template for simulation.

    Raises:
        ValueError: an observed site that does not exist, a discrete latent
            site, a latent site outside the data plate, non-finite log density
            at the simulated probe point.
        TypeError: bad argument types.

    Attributes:
        obs_sites: tuple of observed site names.
        latent_sites: tuple of :class:`LatentSite`, in trace order.
        latent_dim: D, the length of the packed unconstrained latent vector.
        obs_shapes: ``{site: per-data-point shape}`` of the observed values.
    """

    def __init__(
        self,
        model: Callable,
        obs_sites: str | Sequence[str],
        *,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        data: Data | torch.Tensor | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.obs_sites = _as_tuple(obs_sites)
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.has_data_plate = data is not None
        self._template = self.check_data(data, name="data") if data is not None else None
        self._probe()

    # ------------------------------------------------------------------ probe
    def _probe(self) -> None:
        """Traces the model once to learn sites, shapes and plate dims.

        Runs under ``fork_rng`` so that building a density does not move the RNG:
        a seed gives the same simulated data whichever way the model is written."""
        with torch.random.fork_rng(), torch.no_grad(), poutine.block():
            if self.has_data_plate:
                n = next(iter(self._template.values())).shape[0]
                trace = poutine.trace(poutine.uncondition(self._call)).get_trace(self._template)
            else:
                n = None
                trace = poutine.trace(poutine.uncondition(self._call)).get_trace(None)
        sites = {s["name"]: s for s in _sample_sites(trace)}
        missing = [o for o in self.obs_sites if o not in sites]
        if missing:
            raise ValueError(
                f"observed site {missing[0]!r} is not a sample site of the model; "
                f"its sample sites are {sorted(sites)}"
            )
        # pyro.factor sites (Unit) add to the joint density but are not latent variables
        latents = [s for name, s in sites.items() if name not in self.obs_sites and not isinstance(s["fn"], dist.Unit)]
        if not latents:
            raise ValueError("the model has no latent sample sites besides the observed sites")
        for s in latents:
            if _is_discrete(s["fn"]):
                raise ValueError(
                    f"latent site {s['name']!r} is discrete ({type(s['fn']).__name__}); "
                    "pyro_mi needs continuous latent sites (marginalise discrete ones out in the model)"
                )
        # Number of batch dims (plates included) of one call: our plates go left of them.
        self._rank = max(len(s["fn"].batch_shape) for s in sites.values())
        if self.has_data_plate:
            self._data_dim = self._find_data_dim(sites, latents, n)
        else:
            self._data_dim = -(self._rank + 1)
        self._chains_dim = min(self._data_dim, -self._rank) - 1
        self._latent_names = tuple(s["name"] for s in latents)
        # Re-trace inside our plates (2 chains, 2 data points) to read packed shapes.
        with torch.random.fork_rng(), torch.no_grad(), poutine.block():
            x, z_sites = self._simulate_sites(2, 2)
        layout, offset = [], 0
        for s in latents:
            v = z_sites[s["name"]]
            u = biject_to(s["fn"].support).inv(v)
            pos = self._pos()
            shape, ushape = v.shape[2 + pos :], u.shape[2 + pos :]
            numel = math.prod(ushape)
            layout.append(LatentSite(s["name"], shape, ushape, offset, numel, s["fn"].support))
            offset += numel
        self.latent_sites = tuple(layout)
        self.latent_dim = offset
        self.obs_shapes = {k: v.shape[1:] for k, v in x.items()}

    def _find_data_dim(self, sites, latents, n) -> int:
        frames = [
            f for f in sites[self.obs_sites[0]]["cond_indep_stack"] if f.size == n and f.dim is not None
        ]
        if not frames:
            raise ValueError(
                f"data was given, but observed site {self.obs_sites[0]!r} is not inside a plate of size "
                f"{n} (the data's first dim); a data-plate model must wrap its sites in "
                "pyro.plate('data', x.shape[0])"
            )
        frame = frames[0]
        for s in list(sites.values()):
            if frame not in s["cond_indep_stack"]:
                kind = "observed" if s["name"] in self.obs_sites else "latent"
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

    def _pos(self) -> int:
        """Index of the data dim among the batch dims right of the chains dim."""
        return (-self._chains_dim - 1) + self._data_dim

    # ------------------------------------------------------------- model calls
    def _call(self, x: Data | None):
        kwargs = dict(self.model_kwargs)
        if self.has_data_plate:
            kwargs.update(x)
        return self.model(*self.model_args, **kwargs)

    def _trace(self, num_chains: int, num_data: int, cond: dict, x: Data | None, sample_obs: bool):
        fn = poutine.condition(self._call, data=cond)
        if sample_obs:
            fn = poutine.uncondition(fn)
        if x is None and self.has_data_plate:
            x = self._template_of(num_data)
        return self.trace_program(fn, num_chains, num_data, x)

    def trace_program(self, fn: Callable, num_chains: int, num_data: int, x: Data | None, what: str = "model"):
        """Traces ``fn(x)`` inside pyro_mi's chains plate (and, for a one-data-point
        model, its data plate), at the plate dims of this model. Used for the model
        and for guides, so that both see the same batch layout.

        Raises ValueError, naming the last site reached, if the program fails when
        batched (typically a one-data-point model whose sites do not broadcast)."""
        try:
            with poutine.trace() as tracer, pyro.plate(_CHAINS, num_chains, dim=self._chains_dim):
                if self.has_data_plate:
                    fn(x)
                else:
                    with pyro.plate(_DATA, num_data, dim=self._data_dim):
                        fn(x)
        except (RuntimeError, ValueError, IndexError) as e:
            done = [s["name"] for s in _sample_sites(tracer.trace)]
            where = f"after site {done[-1]!r}" if done else "before its first sample site"
            raise ValueError(
                f"the {what} failed {where} when pyro_mi ran it batched over {num_chains} chains x "
                f"{num_data} data points: {e}. Its sites must broadcast over leading batch dims "
                "(use .to_event() for event dims, expand(batch_shape + ...) rather than expand([...]))"
            ) from e
        return tracer.trace

    def per_point_log_prob(self, trace, sites: Sequence[str], num_chains: int, num_data: int) -> torch.Tensor:
        """Sums the log densities of the named sites of a :meth:`trace_program` trace to (C, N)."""
        total = 0.0
        for s in _sample_sites(trace):
            if s["name"] in sites:
                total = total + _per_point(_scaled_log_prob(s), num_chains, num_data, self._pos())
        return total

    def _template_of(self, num_data: int) -> dict:
        idx = torch.arange(num_data) % next(iter(self._template.values())).shape[0]
        return {k: v[idx] for k, v in self._template.items()}

    def _simulate_sites(self, num_chains: int, num_data: int):
        trace = self._trace(num_chains, num_data, {}, None, sample_obs=True)
        values = {s["name"]: s["value"] for s in _sample_sites(trace)}
        x = {o: self._to_data(values[o], num_data) for o in self.obs_sites}
        return x, {k: v for k, v in values.items() if k not in self.obs_sites}

    def _to_data(self, value: torch.Tensor, num_data: int) -> torch.Tensor:
        """(chains, 1.., num_data, *shape) value of the first chain -> (num_data, *shape)."""
        v = value[0]
        return v.reshape(v.shape[self._pos() :])

    # ------------------------------------------------------------ packing
    def unpack(self, z: torch.Tensor, with_log_jacobian: bool = False):
        """Maps packed unconstrained z of shape (C, N, D) to constrained site values.

        Returns ``{site: (C, 1.., N, *shape)}`` laid out for conditioning the model
        (and the summed log|det J| of shape (C, N) when ``with_log_jacobian``).
        """
        C, N = z.shape[:2]
        ones = (1,) * self._pos()
        values, ldj = {}, z.new_zeros(C, N)
        for site in self.latent_sites:
            u = z[..., site.offset : site.offset + site.numel].reshape((C,) + ones + (N,) + site.unconstrained_shape)
            t = self._transform(site)
            if t is None:  # unconstrained site: identity, log|det J| = 0
                values[site.name] = u
                continue
            v = t(u)
            values[site.name] = v
            if with_log_jacobian:
                ldj = ldj + _per_point(t.log_abs_det_jacobian(u, v), C, N, self._pos())
        return (values, ldj) if with_log_jacobian else values

    def _transform(self, site: LatentSite):
        """``biject_to(site.support)``, cached per site; None for the identity."""
        cache = self.__dict__.setdefault("_transforms", {})
        if site.name not in cache:
            t = biject_to(site.support)
            cache[site.name] = None if _is_identity(t) else t
        return cache[site.name]

    def pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unpack`: constrained values ``{site: (C, 1.., N, *shape)}`` -> (C, N, D)."""
        parts = []
        for site in self.latent_sites:
            v = values[site.name]
            u = biject_to(site.support).inv(v)
            C = u.shape[0]
            N = u.shape[1 + self._pos()]
            parts.append(u.reshape(C, N, site.numel))
        return torch.cat(parts, -1)

    def constrained(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Packed z of shape (*S, N, D) -> ``{site: (*S, N, *shape)}`` in constrained space."""
        lead = z.shape[:-2]
        zz = z.reshape((-1,) + z.shape[-2:])
        values = self.unpack(zz)
        return {
            s.name: values[s.name].reshape(lead + (z.shape[-2],) + s.shape) for s in self.latent_sites
        }

    # ------------------------------------------------------------ checks
    def check_data(self, x, name: str = "x") -> dict[str, torch.Tensor]:
        """Validates observed values; returns ``{site: tensor (num_data, *shape)}``.

        Raises ValueError naming the site for missing or unknown sites, or a number
        of data points that differs between sites.
        """
        if isinstance(x, torch.Tensor):
            if len(self.obs_sites) != 1:
                raise TypeError(f"{name} must be a dict keyed by the observed sites {self.obs_sites}")
            x = {self.obs_sites[0]: x}
        if not isinstance(x, Mapping):
            raise TypeError(f"{name} must be a tensor or a dict of tensors, got {type(x).__name__}")
        unknown = set(x) - set(self.obs_sites)
        missing = [o for o in self.obs_sites if o not in x]
        if unknown or missing:
            raise ValueError(
                f"{name} has sites {sorted(x)} but the observed sites are {list(self.obs_sites)}"
            )
        out, n = {}, None
        for k in self.obs_sites:
            v = torch.as_tensor(x[k])
            if v.dim() == 0:
                raise ValueError(f"{name}[{k!r}] is a scalar; give one row per data point, shape (num_data, ...)")
            if n is not None and v.shape[0] != n:
                raise ValueError(
                    f"{name}[{k!r}] has {v.shape[0]} data points but {name}[{self.obs_sites[0]!r}] has {n}"
                )
            n = v.shape[0]
            if hasattr(self, "obs_shapes") and v.shape[1:] != self.obs_shapes[k]:
                if v.shape[1:].numel() != self.obs_shapes[k].numel():
                    raise ValueError(
                        f"{name}[{k!r}] has per-point shape {tuple(v.shape[1:])}, the model's site "
                        f"{k!r} has {tuple(self.obs_shapes[k])}"
                    )
                v = v.reshape((n,) + self.obs_shapes[k])
            out[k] = v
        return out

    def _check_z(self, z: torch.Tensor, num_data: int) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a tensor, got {type(z).__name__}")
        if z.dim() < 2 or z.shape[-1] != self.latent_dim or z.shape[-2] != num_data:
            raise ValueError(
                f"z has shape {tuple(z.shape)}; expected (..., num_data={num_data}, latent_dim={self.latent_dim})"
            )

    # ------------------------------------------------------------ public API
    def sample(self, num_data: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Simulates ``num_data`` pairs (x, z) ~ p(x, z) from the model.

        Returns ``(x, z)`` with ``x = {site: (num_data, *shape)}`` and packed
        unconstrained ``z`` of shape ``(num_data, latent_dim)``.

        Raises ValueError naming the site if the log density at a simulated
        point is not finite.
        """
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        with torch.no_grad():
            x, z_sites = self._simulate_sites(1, num_data)
            z = self.pack(z_sites)[0]
            self.check_finite(x, z)
        return x, z

    def sample_prior(self, num_samples: int, x: Data) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws z ~ p(z) for each data point of ``x``.

        Returns ``(z, log_prior)`` of shapes (num_samples, N, D) and (num_samples, N);
        gradients flow through reparameterised latent sites.
        """
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        trace = self._trace(num_samples, N, {}, x if self.has_data_plate else None, sample_obs=True)
        z = self.pack({s["name"]: s["value"] for s in _sample_sites(trace) if s["name"] in self._latent_names})
        return z, self.log_prior(z, x)

    def log_terms(self, x: Data, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(log p(z), log p(x|z))`` for packed z of shape (*S, N, D), each (*S, N).

        log p(z) is the density of the packed unconstrained z (prior plus the
        log-Jacobian of the transforms); log p(x|z) sums the observed sites. One
        model trace computes both; both are differentiable in z.
        """
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        self._check_z(z, N)
        lead = z.shape[:-2]
        zz = z.reshape((-1, N, self.latent_dim))
        C = zz.shape[0]
        values, ldj = self.unpack(zz, with_log_jacobian=True)
        cond = dict(values)
        if not self.has_data_plate:
            cond.update(x)
        trace = self._trace(C, N, cond, x, sample_obs=False)
        pos = self._pos()
        log_prior, log_lik = ldj, zz.new_zeros(C, N)
        for s in _sample_sites(trace):
            lp = _per_point(_scaled_log_prob(s), C, N, pos)
            if s["name"] in self.obs_sites:
                log_lik = log_lik + lp
            else:
                log_prior = log_prior + lp
        return log_prior.reshape(lead + (N,)), log_lik.reshape(lead + (N,))

    def log_prior(self, z: torch.Tensor, x: Data) -> torch.Tensor:
        """log p(z) of packed unconstrained z (*S, N, D) -> (*S, N), nats."""
        return self.log_terms(x, z)[0]

    def log_likelihood(self, x: Data, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over observed sites: (*S, N, D) -> (*S, N), nats."""
        return self.log_terms(x, z)[1]

    def log_joint(self, x: Data, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(z) + log p(x|z): (*S, N, D) -> (*S, N), nats."""
        lp, ll = self.log_terms(x, z)
        return lp + ll

    def check_finite(self, x: Data, z: torch.Tensor) -> None:
        """Raises ValueError naming the first site whose log density is not finite at (x, z)."""
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        zz = z.reshape((-1, N, self.latent_dim))
        values = self.unpack(zz)
        cond = dict(values)
        if not self.has_data_plate:
            cond.update(x)
        trace = self._trace(zz.shape[0], N, cond, x, sample_obs=False)
        for s in _sample_sites(trace):
            lp = _per_point(_scaled_log_prob(s), zz.shape[0], N, self._pos())
            bad = ~torch.isfinite(lp)
            if bad.any():
                raise ValueError(
                    f"the log density of site {s['name']!r} is not finite at {int(bad.sum())} of "
                    f"{bad.numel()} simulated points (e.g. value {s['value'].flatten()[:4].tolist()}); "
                    "check its distribution's parameters and support"
                )

    def flatten_data(self, x: Data) -> torch.Tensor:
        """Observed values ``{site: (N, *shape)}`` -> one float tensor (N, obs_dim)."""
        x = self.check_data(x)
        return torch.cat([x[k].reshape(x[k].shape[0], -1).to(torch.get_default_dtype()) for k in self.obs_sites], -1)

    @property
    def obs_dim(self) -> int:
        """Length of the flattened observed vector of one data point."""
        return sum(max(1, math.prod(s)) for s in self.obs_shapes.values())
