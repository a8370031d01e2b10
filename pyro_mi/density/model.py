"""`ModelDensity`: a Pyro model p(z) p(x|z) as batched tensor functions of (x, z)."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

from . import packing
from .normal import site_log_prob
from .plates import _sample_sites, plate_layout

Data = Mapping[str, torch.Tensor]

# the batch-dependence probe: a batch of this many chains x data points, of which the
# first and the last point are also evaluated alone (two points catch a reduction over
# the batch, and a dependence on a neighbour or on the first point; each costs a trace)
_PROBE_CHAINS, _PROBE_DATA = 2, 3


def _as_tuple(obs_sites) -> tuple[str, ...]:
    if isinstance(obs_sites, str):
        return (obs_sites,)
    obs = tuple(obs_sites)
    if not obs or not all(isinstance(s, str) for s in obs):
        raise TypeError(f"obs_sites must be a site name or a non-empty sequence of names, got {obs_sites!r}")
    return obs


def _is_discrete(fn) -> bool:
    return fn.support.is_discrete or getattr(fn, "has_enumerate_support", False)


class MissingDensityError(ValueError):
    """A site's distribution has no ``log_prob`` (a simulator): raised where its density is needed."""


def _scaled_log_prob(site: dict) -> torch.Tensor:
    """A trace site's log density with its ``poutine.scale`` and ``poutine.mask`` applied.

    Raises:
        MissingDensityError: the distribution's ``log_prob`` is not implemented.
    """
    try:
        lp = site_log_prob(site["fn"], site["value"])
    except NotImplementedError:
        fn = site["fn"]
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        raise MissingDensityError(
            f"site {site['name']!r}: its distribution {type(fn).__name__} has no log_prob (a simulator). "
            "Methods that evaluate p(x|z) (ba, iwae, ais, im-ais, cr-ais, bdmc) cannot run on it; giwae, "
            "infonce and mine-ais need only p(z) and simulation"
        ) from None
    return scale_and_mask(lp, site["scale"], site["mask"])


def _has_density(site: dict) -> bool:
    try:
        _scaled_log_prob(site)
    except MissingDensityError:
        return False
    return True


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
            site, a latent site outside the data plate, a batch dim that no
            ``pyro.plate`` declares (e.g. a batch of designs), a latent whose
            simulated values lie at the boundary of its support, or a site whose
            per-point log density depends on the other points of the batch
            (each names the site; see :meth:`_probe`).
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
        """Traces the model to learn sites, shapes and plate dims, and checks it.

        One trace of the bare model finds the sites and plates; one trace inside
        pyro_mi's plates (2 chains x 3 data points) gives the packed layout and
        the data for the checks of :meth:`_check_support` and
        :meth:`_check_pointwise`. Runs under ``fork_rng`` so that building a
        density does not move the RNG: a seed gives the same simulated data
        whichever way the model is written."""
        with torch.random.fork_rng(), torch.no_grad(), poutine.block():
            n = next(iter(self._template.values())).shape[0] if self.has_data_plate else None
            trace = poutine.trace(poutine.uncondition(self._call)).get_trace(self._template)
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
        self._plates = plate_layout(sites, self.obs_sites, n)
        self._latent_names = tuple(s["name"] for s in latents)
        C, N = _PROBE_CHAINS, _PROBE_DATA
        with torch.random.fork_rng(), torch.no_grad(), poutine.block():
            trace = self._simulate(C, N)
            values = {s["name"]: s["value"] for s in _sample_sites(trace)}
            self.latent_sites, self.latent_dim = packing.layout(latents, values, self._plates.pos)
            self.obs_shapes = {o: self._to_data(values[o]).shape[1:] for o in self.obs_sites}
            self._check_support(trace, C, N)
            self._check_pointwise(trace, C, N)

    def _check_support(self, trace, num_chains: int, num_data: int) -> None:
        """Raises ValueError naming the first latent site of a simulated trace with
        points at the boundary of its support (see :func:`packing.boundary_points`)."""
        for s in _sample_sites(trace):
            if s["name"] not in self._latent_names:
                continue
            bad = packing.boundary_points(s["fn"].support, s["value"], num_chains, num_data)
            if bad.any():
                raise ValueError(
                    f"latent site {s['name']!r} has {int(bad.sum())} of {bad.numel()} simulated points at the "
                    f"boundary of its support {s['fn'].support} (e.g. value "
                    f"{s['value'].reshape(num_chains, num_data, -1)[bad].flatten()[:4].tolist()}): "
                    "they are non-finite in unconstrained space (biject_to(support).inv), or draws that "
                    f"underflowed in {s['value'].dtype} and were clamped to the boundary, so they are not draws "
                    "of the distribution. Change its parameters, sample a transformed variable (e.g. the log) "
                    "instead, or use float64"
                )

    def _check_pointwise(self, trace, num_chains: int, num_data: int) -> None:
        """Checks that each site's per-point log density depends on that point only.

        Compares the per-site log densities of the simulated ``trace`` (all
        points at once) at its first and last (chain, data point) with the same
        (x, z) values evaluated one point at a time, within sqrt(eps) of the
        dtype times (1 + the largest |log density| of the site at those points).
        A reduction over pyro_mi's batch dims (``z.mean()``, ``x.sum()`` over
        every dim), a batch-norm layer in training mode or randomness outside
        ``pyro.sample`` makes them differ. Runs without a gradient, like the rest
        of the probe; the RNG is not used (every site is conditioned).

        Raises:
            ValueError: naming the first site (in trace order) that differs.
        """
        plates = self._plates
        # an observed site without a density (a simulator) has nothing to check
        sites = [s for s in _sample_sites(trace) if s["name"] not in self.obs_sites or _has_density(s)]
        points = ((0, 0), (num_chains - 1, num_data - 1))
        alone: dict[str, list] = {s["name"]: [] for s in sites}
        for c, i in points:
            # factor sites (Unit) are recomputed from the other values, not conditioned
            cond = {s["name"]: plates.point(s["value"], c, i) for s in _sample_sites(trace)
                    if not isinstance(s["fn"], dist.Unit)}
            x = {o: self._to_data(cond[o]) for o in self.obs_sites}
            try:
                one = plates.trace(poutine.condition(self._call, data=cond), 1, 1, x)
            except ValueError:
                if self.has_data_plate:
                    # a data-plate model that cannot run on one point (e.g. covariates sized to
                    # the data passed as arguments) cannot be split point by point: no probe
                    return
                raise
            for s in _sample_sites(one):
                if s["name"] in alone:
                    alone[s["name"]].append(plates.per_point(_scaled_log_prob(s), 1, 1)[0, 0])
        index = tuple(torch.tensor(ix) for ix in zip(*points))
        for s in sites:
            batched = plates.per_point(_scaled_log_prob(s), num_chains, num_data)[index]
            single = torch.stack(alone[s["name"]])
            finite = batched[torch.isfinite(batched)]
            scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
            tol = torch.finfo(batched.dtype).eps ** 0.5 * scale
            differ = ~torch.isclose(batched, single, rtol=0.0, atol=tol, equal_nan=True)
            if differ.any():
                k = int(differ.nonzero()[0])
                (c, i), batched, single = points[k], batched[k], single[k]
                raise ValueError(
                    f"the log density of site {s['name']!r} at one data point depends on the other points of "
                    f"the batch: evaluated on {num_chains} chains x {num_data} data points at once it is "
                    f"{float(batched):.6g} nats at (chain {c}, point {i}), evaluated alone "
                    f"{float(single):.6g}. The model likely reduces over pyro_mi's batch dims (e.g. "
                    "z.mean() or .sum() over all dims): reduce only over event dims (dim=-1, ...) and declare "
                    "vector sites with .to_event(); batch norm in training mode, or randomness outside "
                    "pyro.sample, does the same"
                )

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
        return self._plates.trace(fn, num_chains, num_data, x, what)

    def per_point_log_prob(self, trace, sites: Sequence[str], num_chains: int, num_data: int) -> torch.Tensor:
        """Sums the log densities of the named sites of a :meth:`trace_program` trace to (C, N)."""
        total = 0.0
        for s in _sample_sites(trace):
            if s["name"] in sites:
                total = total + self._plates.per_point(_scaled_log_prob(s), num_chains, num_data)
        return total

    def point_shape(self, value: torch.Tensor) -> torch.Size:
        """The shape of one data point of a site value from a :meth:`trace_program` trace:
        (C, 1.., N, *shape) -> shape."""
        return self._plates.point_shape(value)

    def _template_of(self, num_data: int) -> dict:
        idx = torch.arange(num_data) % next(iter(self._template.values())).shape[0]
        return {k: v[idx] for k, v in self._template.items()}

    def _simulate(self, num_chains: int, num_data: int):
        """A trace of (x, z) ~ p(x, z) inside pyro_mi's plates."""
        return self._trace(num_chains, num_data, {}, None, sample_obs=True)

    def _split(self, trace) -> tuple[dict, dict]:
        """The observed values ``{site: (N, *shape)}`` (first chain) and latent values of a trace."""
        values = {s["name"]: s["value"] for s in _sample_sites(trace)}
        x = {o: self._to_data(values[o]) for o in self.obs_sites}
        return x, {k: v for k, v in values.items() if k not in self.obs_sites}

    def _to_data(self, value: torch.Tensor) -> torch.Tensor:
        """(chains, 1.., num_data, *shape) value of the first chain -> (num_data, *shape)."""
        v = value[0]
        return v.reshape(v.shape[self._plates.pos :])

    # ------------------------------------------------------------ packing
    def unpack(self, z: torch.Tensor, with_log_jacobian: bool = False):
        """Maps packed unconstrained z of shape (C, N, D) to constrained site values.

        Returns ``{site: (C, 1.., N, *shape)}`` laid out for conditioning the model
        (and the summed log|det J| of shape (C, N) when ``with_log_jacobian``).
        """
        return packing.unpack(self.latent_sites, z, self._plates.pos, with_log_jacobian)

    def pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`unpack`: constrained values ``{site: (C, 1.., N, *shape)}`` -> (C, N, D)."""
        return packing.pack(self.latent_sites, values, self._plates.pos)

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

        Raises ValueError naming the site if a latent's simulated values lie at
        the boundary of its support (non-finite in unconstrained space, or
        clamped there after underflow), or if the log density at a simulated
        point is not finite.
        """
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        with torch.no_grad():
            trace = self._simulate(1, num_data)
            self._check_support(trace, 1, num_data)
            x, z_sites = self._split(trace)
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

    def _model_trace(self, x: Data, zz: torch.Tensor, with_log_jacobian: bool):
        """The model traced at observed x and packed z (C, N, D); also log|det J| (C, N) if asked."""
        N = zz.shape[1]
        unpacked = self.unpack(zz, with_log_jacobian=with_log_jacobian)
        values, ldj = unpacked if with_log_jacobian else (unpacked, None)
        cond = dict(values)
        if not self.has_data_plate:
            cond.update(x)
        return self._trace(zz.shape[0], N, cond, x, sample_obs=False), ldj

    def log_terms(self, x: Data, z: torch.Tensor, likelihood: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(log p(z), log p(x|z))`` for packed z of shape (*S, N, D), each (*S, N).
        With ``likelihood=False`` the observed sites' densities are not evaluated (log p(x|z) is 0).

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
        trace, ldj = self._model_trace(x, zz, with_log_jacobian=True)
        log_prior, log_lik = ldj, zz.new_zeros(C, N)
        for s in _sample_sites(trace):
            if s["name"] in self.obs_sites:
                if likelihood:
                    log_lik = log_lik + self._plates.per_point(_scaled_log_prob(s), C, N)
            else:
                log_prior = log_prior + self._plates.per_point(_scaled_log_prob(s), C, N)
        return log_prior.reshape(lead + (N,)), log_lik.reshape(lead + (N,))

    def log_prior(self, z: torch.Tensor, x: Data) -> torch.Tensor:
        """log p(z) of packed unconstrained z (*S, N, D) -> (*S, N), nats. Never evaluates an
        observed site's density (a simulator's likelihood may have none)."""
        return self.log_terms(x, z, likelihood=False)[0]

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
        trace, _ = self._model_trace(x, zz, with_log_jacobian=False)
        for s in _sample_sites(trace):
            if s["name"] in self.obs_sites and not _has_density(s):
                continue  # a simulator's observed site: checked where its density is needed
            lp = self._plates.per_point(_scaled_log_prob(s), zz.shape[0], N)
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
