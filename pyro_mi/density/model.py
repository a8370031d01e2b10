"""`ModelDensity`: a Pyro model p(z) p(x|z) as batched tensor functions of (x, z)."""

from __future__ import annotations

import copy
import math
import weakref
from typing import Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from . import enumeration, packing
from .arguments import ModelArguments, slot_name
from .plates import CHAINS_PLATE, DATA_PLATE, sample_sites
from .pointwise import VECTORIZE
from .guide_trace import GuideTrace
from .probe import DATA_PLATE_WAYS, ModelProbe
from .sites import describe, scaled_log_prob

Data = Mapping[str, torch.Tensor]

#: the reparameterisations of :class:`ModelDensity`
REPARAM = ("none", "auto")


#: the fraction of simulated points whose log density is not finite at their own draw from which
#: pyro_mi refuses the model (below it they are redrawn, up to MAX_REDRAWS times)
NON_FINITE_FRACTION = 0.05
MAX_REDRAWS = 10


def _as_tuple(obs_sites) -> tuple[str, ...]:
    if isinstance(obs_sites, str):
        return (obs_sites,)
    try:
        obs = tuple(obs_sites)
    except TypeError:
        obs = ()
    if not obs or not all(isinstance(s, str) for s in obs):
        raise TypeError(f"obs_sites must be a site name or a non-empty sequence of names, got {obs_sites!r}")
    twice = sorted({s for s in obs if obs.count(s) > 1})
    if twice:
        raise ValueError(f"observed site {twice[0]!r} is named more than once in obs_sites {list(obs)}")
    return obs


class ModelDensity(ModelProbe):
    """Batched log densities and simulation of a Pyro model p(z) p(x|z).

    The model is called as its author calls it, ``model(*model_args, **model_kwargs)`` (a bound
    method such as ``vae.model`` included), and its observed sites are conditioned by name with
    Pyro's handlers, whatever the author passed to ``obs=`` (see :mod:`.arguments`). One call of
    the model is one data point, unless a plate encloses every sample site and an argument whose
    first dim is that plate's size carries an observed site's values row by row (``obs=x``,
    ``obs=x.reshape(-1, 784)``): then each row is a data point, and pyro_mi calls the model on
    as many rows as it needs, every argument of that first dim cycled (row i gets row i % n).
    Batch dims that no plate declares are part of the one data point, summed as NUTS sums them.
    Discrete latent sites marked for enumeration are summed out exactly (:mod:`.enumeration`).

    Args:
        model: a Pyro model.
        obs_sites: name or names of the observed sites x; every other sample site is a latent z
            and must be continuous, or discrete and marked for enumeration.
        model_args, model_kwargs: the model's arguments, as its author calls it: for shapes and
            covariates (the observed values are conditioned, not read from them).
        data: observed values ``{site: (n, *shape)}`` (or one tensor if there is one observed
            site) passed as keyword arguments named after the observed sites, the convention of
            earlier versions; only their shapes are used. Makes the model a data-plate model whose
            observed sites lie in a plate of size n.
        covariates: per-data-point keyword arguments of a data-plate model ``{name: (n, ...)}``,
            row j belonging to data row j: data point i of every batch pyro_mi simulates or
            evaluates gets row i % n (e.g. a batch of designs). Given without ``data`` they make
            the model a data-plate model of n points.
        vectorize: how a batch of (chain, data point) pairs is run (see
            :mod:`pyro_mi.density.pointwise`): ``"plate"`` (the model batched inside
            pyro_mi's plates, the fastest), ``"vmap"`` (``torch.func.vmap`` over the
            model written for one point), ``"loop"`` (one call per point), or
            ``"auto"`` (default): the first of these that runs the model and gives, at
            two probed points, the same per-site log densities as the model run on
            each point alone. A data-plate model runs ``"plate"`` or ``"fold"`` (its chains
            folded into its own data plate, for sites that do not broadcast over a chains
            dim; see :mod:`.plates`); ``"auto"`` tries them in that order.
        reparam: ``"none"`` (the model as written) or ``"auto"``: the latent sites of a
            location-scale family whose location or scale depends on another latent are
            non-centred with Pyro's ``LocScaleReparam`` (see :meth:`_decentre`), which a funnel
            needs; a bijection of the latents, so the MI and each point's log p(x) are unchanged
            (the packed latents are then the decentred ones).

    Raises:
        ValueError: the model cannot be called with the arguments given (saying which
            argument it lacks), an observed site that does not exist, a discrete latent
            site not marked for enumeration, a latent site outside the data plate, a latent
            most of whose simulated values lie at the boundary of its support, a site whose
            per-point log density depends on the other points of the batch (with
            ``vectorize="plate"``, or for a data-plate model) or on the call (randomness outside
            ``pyro.sample``), each naming the site (see :meth:`_probe`); an unknown ``vectorize``.
        TypeError: bad argument types.

    Attributes:
        obs_sites: tuple of observed site names.
        latent_sites: tuple of :class:`LatentSite`, in trace order (the continuous latents).
        latent_dim: D, the length of the packed unconstrained latent vector.
        enumerated: the discrete latent sites summed out, in trace order.
        site_fns: ``{site: distribution}`` of every sample site of a trace of the bare
            model, in trace order (``pyro.factor`` sites included).
        obs_shapes: ``{site: per-data-point shape}`` of the observed values.
        arguments: the model's :class:`~pyro_mi.density.arguments.ModelArguments`.
        has_data_plate: whether the model's rows are the data points.
        vectorize: the way chosen (``"plate"``, ``"vmap"``, ``"loop"`` or ``"fold"``).
        undeclared: ``{site: batch shape}`` of the sites with batch dims that no plate declares.
        notices: sentences for a result's notes (the way chosen, when it is not
            ``"plate"``, why, and what a point costs; undeclared batch dims; enumerated sites).
        warnings: sentences for a result's warnings, added by :meth:`sample` (simulated latents
            moved off the boundary of their support).
    """

    def __init__(
        self,
        model: Callable,
        obs_sites: str | Sequence[str],
        *,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        data: Data | torch.Tensor | None = None,
        covariates: Mapping[str, torch.Tensor] | None = None,
        vectorize: str = "auto",
        reparam: str = "none",
    ):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(model_args, (tuple, list)):
            raise TypeError(f"model_args must be a tuple of the model's positional arguments, got "
                            f"{type(model_args).__name__}")
        self.model = model
        if reparam not in REPARAM:
            raise ValueError(f"reparam must be one of {REPARAM}, got {reparam!r}")
        self._model = model  # the program pyro_mi runs: the model, or it reparameterised
        self.reparam = reparam
        self.obs_sites = _as_tuple(obs_sites)
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        kwargs = dict(self.model_kwargs)
        rows = None
        if data is not None:  # observed values as keywords named after the sites
            kwargs.update(self.check_data(data, name="data"))
            rows = next(iter(kwargs[o] for o in self.obs_sites)).shape[0]
        if covariates:
            rows = self._check_covariates(covariates, rows)
            kwargs.update(covariates)
        self._covariates = tuple(covariates or ())
        self._explicit_rows = rows
        self.arguments = ModelArguments(self.model_args, kwargs)
        self._located = None
        self._start, self._index = 0, None  # its points: numbers start, start + 1, ... (or index[...] of them)
        self.notices: list[str] = []
        self.warnings: list[str] = []
        # the last sample's per-site log densities and log p(x|z) (its own trace's), and its z, log p(x|z), x:
        # (weakref, version)
        self._drawn = None
        ways = DATA_PLATE_WAYS + VECTORIZE
        if vectorize != "auto" and vectorize not in ways:
            raise ValueError(f"vectorize must be 'auto' or one of {ways}; got {vectorize!r}")
        self._probe(vectorize)

    def _check_covariates(self, covariates, rows: int | None) -> int:
        """Checks ``covariates`` ``{name: (n, ...)}``; returns n."""
        first = next(iter(covariates.values()))
        n = rows if rows is not None else (first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else None)
        for k, v in covariates.items():
            if k in self.obs_sites or not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n:
                raise ValueError(f"covariate {k!r} must be a tensor with one row per data point ({n}, as many as "
                                 "data has, or the first covariate without data), named unlike an observed site")
        return n

    # ------------------------------------------------------------- model calls
    def _call(self):
        """One call of a model without a data plate, with its author's arguments."""
        return self._model(*self.arguments.args, **self.arguments.kwargs)

    def _program(self, num_data: int, sample_obs: bool = False) -> Callable[[int], object]:
        """``program(copies)``: the model on ``num_data`` rows from this density's first point
        (one call for a model without a data plate), its observed sites sampled with
        ``sample_obs``; uncondition innermost, so that only the model's own observations are
        released."""
        model = poutine.uncondition(self._model) if sample_obs else self._model

        def program(copies: int):
            args, kwargs = self.arguments.bind(self._point_numbers(num_data), copies) if self.has_data_plate \
                else (self.arguments.args, self.arguments.kwargs)
            return model(*args, **kwargs)

        return program

    def trace_guide(self, guide: Callable, x: Data, num_samples: int, cond: Mapping | None = None) -> GuideTrace:
        """Runs ``guide`` K = ``num_samples`` times on each data point of ``x`` ``{site: (N, *shape)}``,
        called as the model is (on the rows of those points), each observed site's values written where
        the model reads them (into the argument that carries them, or as a keyword named after the
        site), inside pyro_mi's chains plate at the model's plate dims, so that guide and model see one
        batch layout; latent sites in ``cond`` ``{site: (K, 1.., N, *shape)}`` are held there.

        Raises:
            ValueError: an observed site whose value the model computes from an argument in a way
                that cannot be written back (not a reshape, slice or selection of it);
                :class:`~pyro_mi.density.plates.BatchingError` (a ValueError), naming the last site
                reached, if the guide fails when batched.
        """
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        trace = self._plates.trace(self._guide_program(guide, x), num_samples, N, "guide", cond)
        return GuideTrace(trace, self._plates, num_samples, N)

    def _guide_program(self, guide: Callable, x: Data) -> Callable[[int], object]:
        """``program(copies)`` of :meth:`trace_guide`: the guide on the rows of the data points of ``x``
        (repeated ``copies`` times when folded), the observed values written where the model reads them."""
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        located = self._located_observed()
        for o in self.obs_sites:
            if self.has_data_plate and o in located and located[o].columns is None:
                raise ValueError(
                    f"the guide reads x from the model's arguments, but observed site {o!r} comes from argument "
                    f"{slot_name(located[o].slot, self._parameter_names())}, which is not one row per data point: "
                    "pyro_mi cannot give the guide other values of it; let pyro_mi fit its own encoder (no guide)")
            if o in self._derived:
                raise ValueError(
                    f"the guide reads x from the model's arguments, but observed site {o!r} is computed from "
                    f"argument {slot_name(self._derived[o], self._parameter_names())} in a way pyro_mi cannot "
                    "invert (not a reshape, slice or selection of it), so the guide cannot be given other "
                    "values of it: observe the argument itself (obs=x), or let pyro_mi fit its own encoder "
                    "(no guide)")

        def program(copies: int):
            observed = {o: v.repeat((copies,) + (1,) * (v.dim() - 1)) for o, v in x.items()}
            args, kwargs = self.arguments.bind(self._point_numbers(N), copies, observed) if self.has_data_plate \
                else self.arguments.bind(observed=observed)
            return guide(*args, **kwargs)

        return program

    def _trace(self, num_chains: int, num_data: int, cond: dict, sample_obs: bool, enum: bool = False):
        return self._plates.trace(self._program(num_data, sample_obs), num_chains, num_data, cond=cond, enum=enum)

    def draw(self, num_chains: int, num_data: int, cond: Mapping | None = None,
             differentiable: bool = False) -> tuple[dict, dict]:
        """Simulates (x, z) ~ p(x, z) for C x N points the chosen way (a data-plate model on the rows
        of its data points from this density's first).

        Args:
            cond: ``{latent site: value (C, 1.., N, *shape)}`` held fixed: the other sites are
                drawn from the model given them (ancestral sampling).
            differentiable: draw by ``rsample`` (a loop over points for a model run point by
                point), so that the values carry gradients.

        Returns:
            ``({site: value (C, 1.., N, *shape)}, {site: its distribution})`` for every
            latent and observed site (enumerated discrete sites included, drawn).
        """
        values, fns, _ = self._draw(num_chains, num_data, cond, differentiable)
        return values, fns

    def _draw(self, num_chains: int, num_data: int, cond: Mapping | None = None,
              differentiable: bool = False) -> tuple[dict, dict, Callable[[], dict]]:
        """:meth:`draw`, and ``score``: a function giving the per-site log densities ``{site: (C, N)}``
        at the drawn values (every site but a simulator's), as :meth:`site_log_probs` does; run
        batched, from the draw's own trace, with no second model run (an enumerated model is
        scored by a run of its own, its discrete sites summed out)."""
        C, N = num_chains, num_data
        cond = dict(cond or {})
        if self._points is not None:
            values = self._points.draw(C, N, cond, differentiable)
            self._check_sites(values, "a simulation")
            return values, self._points.fns, lambda: self.site_log_probs(values, {}, C, N, self._no_density)
        trace = self._trace(C, N, cond, sample_obs=True)
        sites = sample_sites(trace)
        values = self._plates.values(trace, C, N)
        self._check_sites(values, "a simulation")
        if self.enumerated:
            def score():
                return self.site_log_probs(values, {}, C, N, self._no_density)
        else:
            def score():
                return {s["name"]: self._plates.per_point(scaled_log_prob(s), C, N)
                        for s in sites if s["name"] not in self._no_density}

        fns = {s["name"]: s["fn"] for s in sites if not isinstance(s["fn"], dist.Unit)}
        return values, fns, score

    def _check_sites(self, names, what: str) -> None:
        """Raises ValueError if the sample sites ``names`` of a run (``what``) differ from those of the
        model's first run: pyro_mi needs the same sites on every run (a latent sampled in a loop of
        random length, or only on some branch, has none)."""
        expected = {k for k, fn in self.site_fns.items() if not isinstance(fn, dist.Unit)}
        names = set(names)
        if names != expected:
            extra, missing = sorted(names - expected), sorted(expected - names)
            said = "; ".join(p for p in (f"sites {extra} appeared" if extra else "",
                                         f"sites {missing} did not" if missing else "") if p)
            raise ValueError(
                f"the model's sample sites change between runs ({what}: {said}): pyro_mi needs the same sites on "
                "every run of the model; sample every site on every run (a loop of fixed length, or "
                "poutine.mask instead of skipping a site)")

    def _trace_log_probs(self, trace, num_chains: int, num_data: int, skip=frozenset()) -> dict:
        """Per-site log densities ``{site: (C, N)}`` of a trace of the model (:meth:`_trace`)
        (for an enumerated model, made under ``poutine.enum``: :data:`enumeration.LATENTS` and
        :data:`enumeration.OBSERVED` instead, its discrete sites summed out)."""
        C, N = num_chains, num_data
        if not self.enumerated:
            return {s["name"]: self._plates.per_point(scaled_log_prob(s), C, N)
                    for s in sample_sites(trace) if s["name"] not in skip}
        keep = [CHAINS_PLATE, DATA_PLATE] if not self.has_data_plate else [CHAINS_PLATE, self._data_frame_name(trace)]
        with_observed = not (set(self.obs_sites) <= set(skip))
        out = enumeration.contract(trace, self.obs_sites, keep, with_observed)
        rank = -(self._plates.data_dim if self._plates.folded else self._plates.chains_dim)
        return {k: self._plates.per_point(v.reshape((1,) * (rank - v.dim()) + v.shape), C, N) for k, v in out.items()}

    def _data_frame_name(self, trace) -> str:
        site = trace.nodes[self.obs_sites[0]]
        dim = self._plates.data_dim
        return next(f.name for f in site["cond_indep_stack"] if f.dim == dim)

    def site_log_probs(self, values: Mapping, x: Data, num_chains: int, num_data: int, skip=frozenset()) -> dict:
        """Per-site log densities ``{site: (C, N)}`` (nats) of the model conditioned on
        ``values`` ``{site: (C, 1.., N, *shape)}`` (every latent site; observed sites too, if
        each chain has its own) and observed ``x`` ``{site: (N, *shape)}`` (the observed
        values not in ``values``), computed the chosen way; the sites named in ``skip`` are left
        out. For a model with enumerated discrete sites (whose values in ``values`` are ignored)
        the keys are :data:`enumeration.LATENTS` and :data:`enumeration.OBSERVED`."""
        C, N = num_chains, num_data
        values = {k: v for k, v in values.items() if k not in self.enumerated}
        shared = {o: x[o] for o in self.obs_sites if o not in values}
        if self._points is not None:
            both = dict(values)
            both.update({o: v.expand((C,) + v.shape) for o, v in shared.items()})
            return self._points.log_probs(both, scaled_log_prob, skip)
        cond = {**values, **{o: self._obs_layout(v) for o, v in shared.items()}}
        trace = self._trace(C, N, cond, sample_obs=False, enum=bool(self.enumerated))
        self._check_sites(self._plates.values(trace, C, N), "an evaluation")
        return self._trace_log_probs(trace, C, N, skip)

    def _obs_layout(self, value: torch.Tensor) -> torch.Tensor:
        """Observed values shared by every chain, (N, *shape), in pyro_mi's layout (1, 1.., N, *shape)."""
        return value.reshape((1,) * (1 + self._plates.pos) + value.shape)

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

    def as_written(self) -> "ModelDensity | None":
        """This density of the model as its author wrote it (``reparam="none"``), run the same way on the
        same points, where ``reparam="auto"`` non-centred some site; None otherwise, for a model run
        point by point (whose traces do not keep a non-centred site's value), and where the model as
        written fails the probe run the same way. :meth:`written_z` maps z to it."""
        if not self.decentred_sites or self._points is not None:
            return None
        written = copy.copy(self)
        written._model, written.reparam, written.notices, written.warnings = self.model, "none", [], []
        try:
            written._probe(self.vectorize)
        except ValueError:  # the probe's errors (BatchingError among them): run non-centred only
            return None
        return written

    def written_z(self, written: "ModelDensity", z: torch.Tensor) -> torch.Tensor:
        """Packed z (*S, N, D) of this density -> the same latents packed as the density ``written``
        (:meth:`as_written`) packs them: a non-centred site's value is the one the model computes from its
        ``_decentered`` latent (LocScaleReparam's bijection), read from a trace."""
        zz = z.reshape((-1,) + z.shape[-2:])
        C, N = zz.shape[:2]
        values = self.unpack(zz)
        devices = [z.device] if z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # x is drawn too: with no run's numbers
            trace = self._trace(C, N, values, sample_obs=True)
        values.update({k: self._plates.unfold(trace.nodes[k]["value"], C, N) for k in self.decentred_sites})
        return written.pack({s.name: values[s.name] for s in written.latent_sites}).reshape(z.shape[:-1] + (-1,))

    # ------------------------------------------------------------ checks
    def from_point(self, start: int) -> "ModelDensity":
        """This density for data points ``start, start + 1, ...`` (of its own numbering): the same
        model, with its rows (per-point arguments: data, covariates, e.g. design ``i % B`` of a
        design batch) counted from ``start``, for evaluating a block of points on its own. ``self``
        for a model without a data plate."""
        if not self.has_data_plate or start == self._start:
            return self
        shifted = copy.copy(self)
        shifted._start = start
        return shifted

    def for_points(self, index: torch.Tensor) -> "ModelDensity":
        """This density for the data points ``index`` (of its own numbering), numbered 0, 1, ...:
        point k gets the rows of point ``index[k]``. ``self`` for a model without a data plate."""
        if not self.has_data_plate:
            return self
        sub = copy.copy(self)
        sub._index, sub._start = self._point_numbers(int(index.max()) + 1)[index.cpu()], 0
        return sub

    def _point_numbers(self, num_data: int) -> torch.Tensor:
        """The numbers of this density's first ``num_data`` points (rows ``i % n`` of the arguments)."""
        here = self._start + torch.arange(num_data)
        return here if self._index is None else self._index[here]

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
    def sample(self, num_data: int, differentiable: bool = False, log_likelihood: bool = False):
        """Simulates ``num_data`` pairs (x, z) ~ p(x, z) from the model.

        Args:
            num_data: N, the number of pairs.
            differentiable: draw every site by ``rsample`` with gradients on, so that x
                and z are differentiable in the model's arguments (a design) and
                parameters (pathwise gradients).
            log_likelihood: also return log p(x|z) at the pairs, (N,) nats (from the draw's
                own trace where it can, so with no second model run).

        Returns ``(x, z)`` with ``x = {site: (num_data, *shape)}`` and packed
        unconstrained ``z`` of shape ``(num_data, latent_dim)``; ``(x, z, log p(x|z))``
        with ``log_likelihood``.

        A latent value at the boundary of its support (a draw that underflowed in the dtype,
        clamped there by torch) is moved to the nearest float inside it, and a warning naming the
        site and the count is added to :attr:`warnings`.

        A point whose log density is not finite at its own draw (the sampler or the density
        over- or underflowed: a Poisson count past int64, a rate that underflowed to 0) is not a
        draw of the model the dtype can hold: it is redrawn, and a warning gives the fraction.

        Raises ValueError naming the site if ``BOUNDARY_FRACTION`` (of :mod:`~pyro_mi.density.probe`)
        of a latent's simulated values or more lie at the boundary of its support, if the log density
        is not finite at ``NON_FINITE_FRACTION`` of the simulated points or more, or (``differentiable``)
        if a site's distribution has no ``rsample`` (e.g. a discrete observation).
        """
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        if differentiable:
            self._check_reparameterized(self.obs_sites + self._latent_names)
        x, z, log_lik, log_probs = self._sample(num_data, differentiable)
        if log_lik is not None and not log_lik.requires_grad:  # each tensor with its version: changed in place, it misses
            self._drawn = (log_probs, log_lik, [(weakref.ref(t), t._version) for t in (z, log_lik, *x.values())])
        if not log_likelihood:
            return x, z
        return x, z, log_lik if log_lik is not None else self.log_likelihood(x, z)

    def _sample(self, num_data: int, differentiable: bool, redraws: int = 0):
        """:meth:`sample`'s ``(x, z, log p(x|z) or None, {site: (1, N)} or None)``, the last two the draw's
        own log densities (None where z does not unpack to the drawn values within rounding), points
        whose log density is not finite at their own draw redrawn (see :meth:`_finite_points`)."""
        # Pyro's argument checks are off while drawing: a parameter that over- or underflows at a few
        # points (a rate of 0) is caught below, by the finiteness of the log densities, point by point
        with torch.enable_grad() if differentiable else torch.no_grad(), pyro.validation_enabled(False):
            values, fns, score = self._draw(1, num_data, differentiable=differentiable)
            moved = self._boundary(values, fns, 1, num_data)
            x = {o: self._to_data(values[o]) for o in self.obs_sites}
            z = self.pack({k: values[k] for k in self._latent_names})[0]
            # the draw's own log densities: those at (x, z) where z unpacks to the drawn values within rounding
            # (a constrained site's round trip through its unconstrained value: the drawn value, not its round
            # trip, is the one x was drawn given); a value moved off its support's boundary is scored anew
            log_probs = score() if not moved else None
            exact = log_probs is not None and all(_round_trip(v, values[k]) for k, v in self.unpack(z[None]).items())
        with torch.no_grad(), pyro.validation_enabled(False):
            ok, why = self._finite_points(x, z, log_probs)
        log_lik = None
        if exact and not self._no_density:
            log_lik = sum(v for k, v in log_probs.items() if k in self.obs_sites or k == enumeration.OBSERVED)[0]
        else:
            log_probs = None
        if bool(ok.all()):
            return x, z, log_lik, log_probs
        bad = int((~ok).sum())
        if (redraws == 0 and bad / num_data >= NON_FINITE_FRACTION) or redraws >= MAX_REDRAWS:
            raise ValueError(f"{why}; check its distribution's parameters and support")
        self.warnings.append(
            f"{bad} of {num_data} simulated points were not representable ({why}: the sampler or the density "
            f"over- or underflowed in {z.dtype}); they were redrawn, so the points are draws of the model "
            f"conditioned on representable draws ({bad / num_data:.2%} of its mass left out)")
        x2, z2, log_lik2, log_probs2 = self._sample(bad, differentiable, redraws + 1)
        x = {k: torch.cat([v[ok], x2[k]]) for k, v in x.items()}
        z = torch.cat([z[ok], z2])
        if log_lik is not None and log_lik2 is not None:
            log_lik = torch.cat([log_lik[ok], log_lik2])
            log_probs = {k: torch.cat([v[:, ok], log_probs2[k]], 1) for k, v in log_probs.items()}
        else:
            log_lik = log_probs = None
        return x, z, log_lik, log_probs

    def _check_reparameterized(self, sites: Sequence[str]) -> None:
        """Raises ValueError naming the first of ``sites`` whose distribution has no
        ``rsample`` (its draws cannot carry pathwise gradients)."""
        for name in sites:
            fn = self.site_fns[name]
            if not fn.has_rsample:
                raise ValueError(
                    f"site {name!r} ({type(fn).__name__}) has no rsample, so its draws carry no gradient; "
                    "differentiable bounds need reparameterisable latent and observed sites"
                )

    def sample_prior(self, num_samples: int, x: Data) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws z ~ p(z) for each data point of ``x``.

        Returns ``(z, log_prior)`` of shapes (num_samples, N, D) and (num_samples, N);
        with gradients on, z is drawn by ``rsample`` and gradients flow through it.
        """
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        values, _ = self.draw(num_samples, N, differentiable=torch.is_grad_enabled())
        z = self.pack({k: values[k] for k in self._latent_names})
        return z, self.log_prior(z, x)

    def prior_log_likelihood(self, x: Data, num_samples: int) -> torch.Tensor:
        """log p(x|z_k) for K = ``num_samples`` draws z_k ~ p(z) per data point: (K, N), nats.

        These are the importance log weights log p(x, z) - log q(z|x) of the prior proposal,
        computed by running the model once with x observed (the latents drawn as it runs),
        so log p(z) is never evaluated (nested Monte Carlo's inner term). With gradients on,
        latents are drawn by ``rsample``. For a model with enumerated discrete sites, z is drawn
        and log p(x|z) evaluated with them summed out (two runs).
        """
        if self.enumerated:
            return self.log_likelihood(x, self.sample_prior(num_samples, x)[0])
        return sum(self.conditional_log_probs(x, num_samples, sites=self.obs_sites).values())

    def conditional_log_probs(self, x: Data, num_samples: int, cond: Mapping | None = None,
                              sites: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Per-site log densities ``{site: (K, N)}`` (nats) of K = ``num_samples`` runs of the
        model per data point of ``x``, with x observed, the latents in ``cond``
        ``{site: (K, 1.., N, *shape)}`` held fixed and the others drawn from the model given
        them (ancestral sampling; by ``rsample`` with gradients on). One model trace draws
        and scores (two passes for a model run point by point). Only ``sites`` (default:
        every latent and observed site; ``pyro.factor`` sites are not scored) are scored."""
        x = self.check_data(x)
        N, K = next(iter(x.values())).shape[0], num_samples
        cond = dict(cond or {})
        wanted = set(self.obs_sites + self._latent_names if sites is None else sites)
        if self.enumerated:
            raise ValueError("conditional log densities of single sites are not defined with enumerated discrete "
                             f"sites {list(self.enumerated)}")
        if self._points is not None:
            cond.update({o: v.expand((K,) + v.shape) for o, v in x.items()})
            values = self._points.draw(K, N, cond, differentiable=torch.is_grad_enabled())
            skip = frozenset(self.obs_sites + self._latent_names) - wanted
            return self.site_log_probs(values, x, K, N, skip)
        cond.update({o: self._obs_layout(v) for o, v in x.items()})
        trace = self._trace(K, N, cond, sample_obs=False)
        return {s["name"]: self._plates.per_point(scaled_log_prob(s), K, N)
                for s in sample_sites(trace) if s["name"] in wanted}

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
        values, log_prior = self.unpack(zz, with_log_jacobian=True)
        skip = frozenset(self.obs_sites) if not likelihood else frozenset()
        log_lik = zz.new_zeros(C, N)
        for name, lp in self.site_log_probs(values, x, C, N, skip).items():
            if name in self.obs_sites or name == enumeration.OBSERVED:
                log_lik = log_lik + lp
            else:
                log_prior = log_prior + lp
        return log_prior.reshape(lead + (N,)), log_lik.reshape(lead + (N,))

    def log_prior(self, z: torch.Tensor, x: Data) -> torch.Tensor:
        """log p(z) of packed unconstrained z (*S, N, D) -> (*S, N), nats. Never evaluates an
        observed site's density (a simulator's likelihood may have none)."""
        return self.log_terms(x, z, likelihood=False)[0]

    def log_likelihood(self, x: Data, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over observed sites: (*S, N, D) -> (*S, N), nats. At the pairs the
        last :meth:`sample` returned (the same tensors), from that draw's own trace: no model run."""
        drawn = self._drawn_at(x, z)
        return drawn[1] if drawn is not None else self.log_terms(x, z)[1]

    def drawn_log_probs(self, x: Data, z: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The per-site log densities ``{site: (1, N)}`` (nats, as :meth:`site_log_probs` gives them) at
        the pairs the last :meth:`sample` returned (the same tensors, unchanged), from that draw's own
        trace; None at any other (x, z)."""
        drawn = self._drawn_at(x, z)
        return drawn[0] if drawn is not None else None

    def _drawn_at(self, x: Data, z: torch.Tensor):
        if self._drawn is None:
            return None
        log_probs, log_lik, drawn = self._drawn
        tensors = (z, log_lik, *x.values())
        if len(drawn) == len(tensors) and all(r() is t and t._version == v for (r, v), t in zip(drawn, tensors)):
            return log_probs, log_lik
        return None

    def log_joint(self, x: Data, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(z) + log p(x|z): (*S, N, D) -> (*S, N), nats."""
        lp, ll = self.log_terms(x, z)
        return lp + ll

    def _finite_points(self, x: Data, z: torch.Tensor, log_probs: Mapping[str, torch.Tensor] | None = None):
        """Which points of (x, z) (N of them) have finite log densities at every site: ``(ok (N,) bool,
        why)``, ``why`` naming the first site where some point does not (or None).
        ``log_probs``: those per-site log densities ``{site: (1, N)}``, if already computed."""
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        zz = z.reshape((-1, N, self.latent_dim))
        values = self.unpack(zz)
        if log_probs is None:  # a simulator's observed site is checked where its density is needed
            log_probs = self.site_log_probs(values, x, zz.shape[0], N, self._no_density)
        ok, why = torch.ones(N, dtype=torch.bool, device=z.device), None
        for name, lp in log_probs.items():
            bad = ~torch.isfinite(lp).reshape(-1, N).all(0)
            if bad.any() and why is None:
                value = x[name][bad] if name in self.obs_sites else values.get(name, torch.zeros(1, 0))[0][..., bad]
                why = (f"the log density of {describe(name)} is not finite at {int(bad.sum())} of {N} simulated "
                       f"points (e.g. value {value.flatten()[:4].tolist()})")
            ok &= ~bad
        return ok, why

    def mi_ceiling(self) -> float | None:
        """The most MI the observations can carry, nats: with every observed site discrete and
        finitely supported, I(x; z) <= H(x) <= log (the number of values x can take), summed over
        the sites' elements (for a data-plate model, one row's, averaged over the rows). None if an
        observed site is continuous or has infinitely many values (a Poisson count)."""
        total = 0.0
        for o in self.obs_sites:
            fn = self.site_fns[o]
            support = fn.support
            while isinstance(support, torch.distributions.constraints.independent):
                support = support.base_constraint
            shape = fn.batch_shape + fn.event_shape
            if support is torch.distributions.constraints.boolean:
                counts = torch.full(shape, 2.0)
            elif isinstance(support, type(torch.distributions.constraints.integer_interval(0, 1))):
                counts = (torch.as_tensor(support.upper_bound) - torch.as_tensor(support.lower_bound) + 1).double()
                counts = counts.expand(shape) if counts.dim() <= len(shape) else counts
            else:
                return None
            logs = counts.double().log().expand(shape)
            if self.has_data_plate:
                dim = len(fn.batch_shape) + self._plates.data_dim
                logs = logs.movedim(dim, 0).reshape(logs.shape[dim], -1).sum(-1).mean() if logs.dim() else logs
            total += float(logs.sum())
        return total

    def flatten_data(self, x: Data) -> torch.Tensor:
        """Observed values ``{site: (N, *shape)}`` -> one float tensor (N, obs_dim)."""
        x = self.check_data(x)
        return torch.cat([x[k].reshape(x[k].shape[0], -1).to(torch.get_default_dtype()) for k in self.obs_sites], -1)

    def unflatten_data(self, x_flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`flatten_data`: (N, obs_dim) -> ``{site: (N, *shape)}`` (x_flat's dtype)."""
        out, start = {}, 0
        for k in self.obs_sites:
            shape = tuple(self.obs_shapes[k])
            size = max(1, math.prod(shape))
            out[k] = x_flat[..., start : start + size].reshape(x_flat.shape[:-1] + shape)
            start += size
        return out

    @property
    def obs_dim(self) -> int:
        """Length of the flattened observed vector of one data point."""
        return sum(max(1, math.prod(s)) for s in self.obs_shapes.values())


def _round_trip(value: torch.Tensor, drawn: torch.Tensor) -> bool:
    """Whether ``value`` (a latent unpacked from its packed unconstrained value) is the ``drawn`` one to
    within the rounding of the transform's round trip (a few ulps; exactly, for integer values)."""
    if not value.is_floating_point():
        return torch.equal(value, drawn)
    eps = torch.finfo(value.dtype).eps
    return value.shape == drawn.shape and bool(torch.isclose(value, drawn, rtol=64 * eps, atol=0.0).all())
