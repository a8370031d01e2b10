"""`ModelDensity`: a Pyro model p(z) p(x|z) as batched tensor functions of (x, z)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.inspect import get_dependencies
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.messenger import Messenger

from ..resources import is_out_of_memory
from . import enumeration, packing
from .arguments import ModelArguments, locate_observed, slot_name
from .normal import site_log_prob
from .plates import CHAINS_PLATE, DATA_PLATE, BatchingError, sample_sites, common_frame, plate_layout, undeclared_batch_dims
from .pointwise import VECTORIZE, PointwiseModel

Data = Mapping[str, torch.Tensor]

# the batch-dependence probe: a batch of this many chains x data points, of which the
# first and the last point are also evaluated alone (two points catch a reduction over
# the batch, and a dependence on a neighbour or on the first point; each costs a trace)
_PROBE_CHAINS, _PROBE_DATA = 2, 3
#: the ways of running a data-plate model, in the order ``"auto"`` tries them
_DATA_PLATE_WAYS = ("plate", "fold")
#: the reparameterisations of :class:`ModelDensity`
REPARAM = ("none", "auto")


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


def _is_loc_scale(fn) -> bool:
    """A location-scale family on the real line (after Independent), as Pyro's AutoReparam picks them."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return {"loc", "scale"} <= set(fn.arg_constraints) and fn.support is dist.constraints.real


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


def _check_joint(sites: Mapping[str, dict], obs_sites: Sequence[str]) -> None:
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


def _what(name: str) -> str:
    """How a message names a key of the per-site log densities: a site, or the enumerated parts."""
    return name if name in (enumeration.LATENTS, enumeration.OBSERVED) else f"site {name!r}"


def _has_density(site: dict) -> bool:
    try:
        _scaled_log_prob(site)
    except MissingDensityError:
        return False
    return True


class ModelDensity:
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
        ways = _DATA_PLATE_WAYS + VECTORIZE
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

    # ------------------------------------------------------------------ probe
    def _bare_trace(self):
        """One trace of the model as its author calls it, observed sites sampled (no pyro_mi plate)."""
        with torch.random.fork_rng(), torch.no_grad(), poutine.block():
            try:
                return poutine.trace(poutine.uncondition(self._model)).get_trace(*self.arguments.args,
                                                                                 **self.arguments.kwargs)
            except TypeError as e:
                if "argument" not in str(e):
                    raise
                if self._covariates:
                    raise ValueError(f"the model does not take the covariates {list(self._covariates)} as keyword "
                                     f"arguments ({e}); covariates need a data-plate model") from e
                raise ValueError(self._arguments_message(e)) from e
            except (RuntimeError, IndexError) as e:
                if is_out_of_memory(e):
                    raise
                shapes = ", ".join(f"{slot_name(k, self._parameter_names())} {tuple(v.shape)}"
                                   for k, v in self.arguments.tensor_slots())
                raise ValueError(f"the model fails when called with the arguments given (tensor shapes: "
                                 f"{shapes or 'none'}): {str(e).splitlines()[0]}") from e

    def _arguments_message(self, e: TypeError) -> str:
        """What to do when the model cannot be called with the arguments given."""
        given = [f"{len(self.model_args)} positional"] + [repr(k) for k in self.arguments.kwargs]
        return (f"the model cannot be called with the arguments given ({', '.join(given)}): {e}. pyro_mi calls "
                "it as its author does: pass its arguments as model_args=(...) / model_kwargs={...} (on the "
                "command line --data NAME=FILE for the data, --model-arg NAME=FILE|VALUE for the others); their "
                "values serve for shapes and covariates, the observed sites are conditioned by name")

    def _probe(self, vectorize: str) -> None:
        """Traces the model to learn sites, shapes and plate dims, chooses how to
        run it over a batch, and checks it.

        One trace of the bare model finds the sites and plates, and whether a data plate
        holds the data points. Then, for each way of running a batch (``vectorize``, or each
        way in turn under ``"auto"``), 2 chains x 3 data points are simulated and give the
        packed layout and the data for the checks of :meth:`_boundary` and
        :meth:`_check_pointwise`; the first way whose batch runs and passes the
        pointwise check is kept. Runs under ``fork_rng`` so that building a
        density does not move the RNG: a seed gives the same simulated data
        whichever way the model is written."""
        trace = self._bare_trace()
        sites = {s["name"]: s for s in sample_sites(trace)}
        if self.reparam == "auto":
            decentred_sites = self._decentre(sites)
            if decentred_sites:
                self._model = decentred(self.model, decentred_sites)
                self.notices.append(
                    f"the latent sites {decentred_sites} are non-centred (reparam='auto': Pyro's LocScaleReparam), "
                    f"sampled as {[k + '_decentered' for k in decentred_sites]}: a bijection of the latents, so the MI and "
                    "each point's log p(x) are unchanged")
                trace = self._bare_trace()
                sites = {s["name"]: s for s in sample_sites(trace)}
        missing = [o for o in self.obs_sites if o not in sites]
        if missing:
            raise ValueError(
                f"observed site {missing[0]!r} is not a sample site of the model; "
                f"its sample sites are {sorted(sites)}"
            )
        _check_joint(sites, self.obs_sites)
        # pyro.factor sites (Unit) add to the joint density but are not latent variables
        latents = [s for name, s in sites.items() if name not in self.obs_sites and not isinstance(s["fn"], dist.Unit)]
        for s in latents:
            if _is_discrete(s["fn"]) and not enumeration.is_enumerated(s):
                raise ValueError(
                    f"latent site {s['name']!r} is discrete ({type(s['fn']).__name__}) and not marked for "
                    "enumeration: mark it to be summed out exactly (@pyro.infer.config_enumerate on the model, or "
                    "infer={'enumerate': 'parallel'} at the site), or marginalise it out in the model"
                )
        self.enumerated = tuple(s["name"] for s in latents if _is_discrete(s["fn"]))
        latents = [s for s in latents if s["name"] not in self.enumerated]
        if not latents:
            raise ValueError("the model has no continuous latent sample sites besides the observed sites"
                             + (f" and the enumerated {list(self.enumerated)}" if self.enumerated else ""))
        self.has_data_plate = self._find_data_plate(sites)
        n = self.arguments.rows
        self._plates = plate_layout(sites, self.obs_sites, n)
        self.undeclared = undeclared = undeclared_batch_dims(sites.values())
        if undeclared:
            listed = ", ".join(f"{k!r} {v}" for k, v in undeclared.items())
            self.notices.append(f"batch dims that no pyro.plate declares (sites {listed}) are part of one data "
                                "point, summed as Pyro's NUTS and Trace_ELBO sum them")
        if self.enumerated:
            self.notices.append(
                f"the discrete latent sites {list(self.enumerated)} are summed out exactly (Pyro's parallel "
                f"enumeration): the MI bounded is that between x and the continuous latents "
                f"{[s['name'] for s in latents]}")
        self._latent_names = tuple(s["name"] for s in latents)
        self.site_fns = {k: s["fn"] for k, s in sites.items()}
        # an observed site without a density (a simulator): evaluated only where a method needs p(x|z)
        self._no_density = frozenset(o for o in self.obs_sites if not _has_density(sites[o]))
        self._alone = None if self.has_data_plate else self._pointwise(sites, "loop")
        if vectorize == "auto":
            ways = _DATA_PLATE_WAYS if self.has_data_plate else VECTORIZE
        elif vectorize in (_DATA_PLATE_WAYS if self.has_data_plate else VECTORIZE):
            ways = (vectorize,)
        else:
            kind = "a data-plate model" if self.has_data_plate else "a one-data-point model (one call is one point)"
            raise ValueError(f"vectorize={vectorize!r} does not apply to {kind}; choose 'auto' or one of "
                             f"{_DATA_PLATE_WAYS if self.has_data_plate else VECTORIZE}")
        failures = []
        layout = self._plates
        for way in ways:
            self.vectorize = way
            self._plates = dataclasses.replace(layout, folded=way == "fold")
            self._points = None if way in _DATA_PLATE_WAYS else self._pointwise(sites, way)
            try:
                self._probe_batch()
            except BatchingError as e:
                if way == ways[-1]:
                    raise
                failures.append(f"{way}: {str(e).splitlines()[0]}")
                continue
            break
        if failures:
            self.notices.append(self._notice(failures))

    def _decentre(self, sites: Mapping[str, dict]) -> list[str]:
        """The latent sites ``reparam="auto"`` non-centres: a location-scale family on the real line
        (Normal, StudentT, Cauchy, Laplace, ...) whose location or scale depends on another
        latent site in the prior (Pyro's ``get_dependencies``): the funnel of a hierarchical
        model, whose scale and effects the samplers then see apart."""
        candidates = [k for k, s in sites.items() if k not in self.obs_sites and _is_loc_scale(s["fn"])]
        if not candidates:
            return []
        # the observed sites are hidden: prior dependencies are among latents (and a simulator has no density)
        try:
            with torch.random.fork_rng(), torch.no_grad(), poutine.block():
                deps = get_dependencies(poutine.block(self.model, hide=list(self.obs_sites)), self.arguments.args,
                                        self.arguments.kwargs)["prior_dependencies"]
        except Exception:  # noqa: BLE001 - Pyro's dependency tracing cannot run the model: leave it as written
            return []
        latents = set(sites) - set(self.obs_sites)
        return [k for k in candidates if set(deps.get(k, {})) & (latents - {k})]

    def _find_data_plate(self, sites: Mapping[str, dict]) -> bool:
        """Whether the model's rows are its data points (see the class docstring); sets the
        arguments' data plate. Given ``data`` or ``covariates`` it is the plate of their size."""
        if self._explicit_rows is not None:
            self.arguments.set_data_plate(self._explicit_rows)
            return True
        frame = common_frame(sites)
        if frame is None or not any(v.dim() >= 1 and v.shape[0] == frame.size for _, v in self.arguments.tensor_slots()):
            return False
        located = self.located_observed()
        rowwise = [o for o, where in located.items()
                   if where.columns is not None and self.arguments.get(where.slot).shape[0] == frame.size]
        if not rowwise:
            return False
        self.arguments.set_data_plate(frame.size)
        self.notices.append(
            f"plate {frame.name!r} encloses every sample site and argument {slot_name(located[rowwise[0]].slot, self._parameter_names())} "
            f"carries the values of {rowwise[0]!r} row by row: its rows are independent data points, the MI is "
            f"that of one row (one call of the model on n rows has n times it), and every argument of first dim "
            f"{frame.size} is cycled row by row")
        return True

    def _parameter_names(self) -> list[str]:
        try:
            return [p.name for p in inspect.signature(self.model).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            return []

    def located_observed(self) -> dict:
        """``{site: ObservedSlot}``: where the model reads each observed site's values from (found
        once, see :func:`~pyro_mi.density.arguments.locate_observed`); the sites no argument carries
        are absent."""
        if self._located is None:
            located, self._derived = locate_observed(self.model, self.arguments, self.obs_sites)
            self._located = located
            self.arguments.observed = located
        return self._located

    def _pointwise(self, sites: Mapping[str, dict], how: str) -> PointwiseModel:
        """A :class:`PointwiseModel` of this one-data-point model from the sites of its bare trace."""
        rank = -self._plates.data_dim - 1  # batch dims right of the data dim in a batched trace
        real = {k: s for k, s in sites.items() if not isinstance(s["fn"], dist.Unit)}
        bare = {k: s["value"].shape for k, s in real.items()}
        layout = {k: torch.Size((1,) * (rank - len(s["fn"].batch_shape)) + tuple(s["value"].shape))
                  for k, s in real.items()}
        enum = (rank, self.obs_sites) if self.enumerated else None
        return PointwiseModel(self._call, bare, layout, {k: s["fn"] for k, s in real.items()}, how,
                              enum=enum)

    def _probe_batch(self) -> None:
        """Simulates 2 chains x 3 points the current way, sets the packed layout, and checks
        supports and the per-point log densities (raises :class:`BatchingError` if the
        batch fails or differs from the points evaluated alone)."""
        C, N = _PROBE_CHAINS, _PROBE_DATA
        with torch.random.fork_rng(), torch.no_grad(), poutine.block():
            try:
                values, fns, score = self._draw(C, N)
            except BatchingError:
                raise
            except Exception as e:  # vmap and loop: the model fails on one point
                if is_out_of_memory(e):
                    raise
                raise BatchingError(f"the model failed when pyro_mi simulated it by {self.vectorize}: {e}") from e
            latents = [{"name": k, "fn": fns[k]} for k in self._latent_names]
            self.latent_sites, self.latent_dim = packing.layout(latents, values, self._plates.pos)
            self.obs_shapes = {o: self._to_data(values[o]).shape[1:] for o in self.obs_sites}
            self._boundary(values, fns, C, N, probe=True)
            self._check_pointwise(values, score, C, N)

    def _notice(self, failures: list[str]) -> str:
        """Why the model is not run batched, how it is run, and what a point costs."""
        if self.vectorize == "fold":
            return (f"the model's sites do not broadcast over pyro_mi's chains dim ({'; '.join(failures)}); its "
                    "chains run folded into its own data plate (C x N rows), as fast as batched")
        C, N = 2, 32
        with torch.random.fork_rng(), poutine.block():
            with torch.no_grad():
                values, _ = self.draw(C, N)
            values = {k: v for k, v in values.items() if k not in self.enumerated}
            seconds = self._points.seconds_per_point(values, _scaled_log_prob, self._no_density)
        how = {"vmap": "by torch.func.vmap over the model written for one point",
               "loop": "one point at a time in a Python loop"}
        draws = {"vmap": "by torch.func.vmap (distributions vmap cannot draw from drawn by their own batched "
                         "sampler, site by site)",
                 "loop": "one point at a time in a Python loop"}
        return (
            f"the model does not run batched over pyro_mi's chains and data points ({'; '.join(failures)}); its log "
            f"densities are computed {how[self.vectorize]} ({seconds * 1e6:.0f} µs per point with gradients, "
            f"measured on {C * N} points) and it is simulated {draws[self._points.draws]}. Writing it to "
            "broadcast over leading batch dims (e.g. z @ A.T for A @ z) runs it batched"
        )

    #: the fraction of simulated points with latents at the boundary of their support (draws that
    #: underflowed) from which pyro_mi refuses the model: most of its draws are not representable
    BOUNDARY_FRACTION = 0.5

    def _boundary(self, values: dict, fns: Mapping, num_chains: int, num_data: int, probe: bool = False) -> int:
        """Moves latent values at the boundary of their support (:func:`packing.boundary_points`:
        draws that underflowed in the dtype, which torch clamps to the boundary) to the nearest
        float inside it, in place in ``values``; returns how many points moved and adds a warning
        naming each site.

        Raises:
            ValueError: naming the site, when :attr:`BOUNDARY_FRACTION` of the points or more are
                at the boundary: most draws of that site are not representable in the run's dtype.
        """
        moved = torch.zeros(num_chains, num_data, dtype=torch.bool)
        for name in self._latent_names:
            value, support = values[name], fns[name].support
            bad = packing.boundary_points(support, value, num_chains, num_data)
            if not bad.any():
                continue
            if float(bad.float().mean()) >= self.BOUNDARY_FRACTION:
                dtype = value.dtype
                advice = " or use float64 (torch.set_default_dtype(torch.float64))" if dtype != torch.float64 else ""
                raise ValueError(
                    f"latent site {name!r} has {int(bad.sum())} of {bad.numel()} simulated points at the "
                    f"boundary of its support {support} (e.g. value "
                    f"{value.reshape(num_chains, num_data, -1)[bad].flatten()[:4].tolist()}): draws that "
                    f"underflowed in {dtype} (the run's dtype) and were clamped to the boundary, or are "
                    "non-finite in unconstrained space (biject_to(support).inv), so they are not draws "
                    "of the distribution. Change its parameters, or sample a transformed variable (e.g. the "
                    f"log) instead{advice}"
                )
            values[name] = packing.inside(support, value)
            moved |= bad.to(moved.device)
            if not probe:
                advice = "; float64 represents more of them" if value.dtype != torch.float64 else ""
                self.warnings.append(
                    f"latent site {name!r}: {int(bad.sum())} of {bad.numel()} simulated points drew values at the "
                    f"boundary of its support in {value.dtype} (underflow), moved to the nearest float inside it: "
                    f"those points are draws of the model only to float precision{advice}")
        return int(moved.sum())

    def _alone_log_probs(self, values: Mapping, c: int, i: int) -> dict | None:
        """Per-site log densities (scalars) of point (chain ``c``, data point ``i``) of
        ``values`` (every latent and observed site) evaluated by the model alone; None for a data-plate model that cannot
        run on one point (e.g. covariates sized to the data passed as arguments)."""
        values = {k: v for k, v in values.items() if k not in self.enumerated}
        if self._alone is not None:
            point = {k: v[c : c + 1, i : i + 1] for k, v in values.items()}
            out = self._alone.log_probs(point, _scaled_log_prob, self._no_density)
            return {k: v[0, 0] for k, v in out.items()}
        plates = self._plates
        cond = {k: plates.point(v, c, i) for k, v in values.items()}
        shifted = self.from_point(self._start + i)
        try:
            one = plates.trace(shifted._program(1), 1, 1, cond=cond, enum=bool(self.enumerated))
        except ValueError:
            return None
        return {k: v[0, 0] for k, v in self._trace_log_probs(one, 1, 1, self._no_density).items()}

    def _check_pointwise(self, values: Mapping, score: Callable[[], dict], num_chains: int, num_data: int) -> None:
        """Checks that each site's per-point log density depends on that point only.

        Compares the per-site log densities ``score()`` of the ``values`` of a simulated
        batch (every latent and observed site), computed the chosen way for
        all points at once, at the first and the last (chain, data point) with the
        same (x, z) evaluated by the model on that point alone, within sqrt(eps)
        of the dtype times (1 + the largest |log density| of the site at those
        points). A reduction over pyro_mi's batch dims (``z.mean()``, ``x.sum()``
        over every dim), a batch-norm layer in training mode or randomness outside
        ``pyro.sample`` makes them differ. Runs without a gradient, like the rest
        of the probe; the RNG is not used (every site is conditioned).

        Raises:
            BatchingError: naming the first site (in trace order) that differs.
        """
        try:
            batched = score()
        except BatchingError:
            raise
        except Exception as e:  # vmap refuses the model (e.g. .item(), data-dependent branches)
            if is_out_of_memory(e):
                raise
            raise BatchingError(f"the model failed when pyro_mi ran it by {self.vectorize}: {e}") from e
        points = ((0, 0), (num_chains - 1, num_data - 1))
        alone = [self._alone_log_probs(values, c, i) for c, i in points]
        if alone[0] is None or alone[1] is None:
            return
        index = tuple(torch.tensor(ix) for ix in zip(*points))
        for name, lp in batched.items():
            at = lp[index]
            single = torch.stack([a[name] for a in alone])
            finite = at[torch.isfinite(at)]
            scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
            tol = torch.finfo(at.dtype).eps ** 0.5 * scale
            differ = ~torch.isclose(at, single, rtol=0.0, atol=tol, equal_nan=True)
            if differ.any():
                k = int(differ.nonzero()[0])
                (c, i), at, single = points[k], at[k], single[k]
                if self.vectorize == "loop":
                    raise BatchingError(
                        f"the log density of {_what(name)} at one data point differs between two calls of the "
                        f"model on the same values: {float(at):.6g} and {float(single):.6g} nats at (chain {c}, "
                        f"point {i}). The model uses randomness outside pyro.sample (e.g. torch.randn, dropout "
                        "in training mode): draw every random number with pyro.sample"
                    )
                raise BatchingError(
                    f"the log density of {_what(name)} at one data point depends on the other points of "
                    f"the batch: evaluated on {num_chains} chains x {num_data} data points at once "
                    f"({self.vectorize}) it is {float(at):.6g} nats at (chain {c}, point {i}), evaluated alone "
                    f"{float(single):.6g}. The model likely reduces over pyro_mi's batch dims (e.g. "
                    "z.mean() or .sum() over all dims, or indexes a latent with an integer tensor: use "
                    "pyro.ops.indexing.Vindex): reduce only over event dims (dim=-1, ...) and declare "
                    "vector sites with .to_event(); batch norm in training mode, or randomness outside "
                    "pyro.sample, does the same"
                )

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

    def guide_program(self, guide: Callable, x: Data) -> Callable[[int], object]:
        """``program(copies)``: ``guide`` called as the model is, on the rows of the data points
        of ``x`` ``{site: (N, *shape)}`` (repeated ``copies`` times when folded), with each
        observed site's values written where the model reads them (into the argument that
        carries them, or as a keyword named after the site), for :meth:`trace_program`.

        Raises:
            ValueError: an observed site whose value the model computes from an argument in a way
                that cannot be written back (not a reshape, slice or selection of it).
        """
        x = self.check_data(x)
        N = next(iter(x.values())).shape[0]
        located = self.located_observed()
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
        values = self.site_values(trace, C, N)
        self._check_sites(values, "a simulation")
        if self.enumerated:
            def score():
                return self.site_log_probs(values, {}, C, N, self._no_density)
        else:
            def score():
                return {s["name"]: self._plates.per_point(_scaled_log_prob(s), C, N)
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
        """Per-site log densities ``{site: (C, N)}`` of a :meth:`trace_program` trace of the model
        (for an enumerated model, made under ``poutine.enum``: :data:`enumeration.LATENTS` and
        :data:`enumeration.OBSERVED` instead, its discrete sites summed out)."""
        C, N = num_chains, num_data
        if not self.enumerated:
            return {s["name"]: self._plates.per_point(_scaled_log_prob(s), C, N)
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
            return self._points.log_probs(both, _scaled_log_prob, skip)
        cond = {**values, **{o: self._obs_layout(v) for o, v in shared.items()}}
        trace = self._trace(C, N, cond, sample_obs=False, enum=bool(self.enumerated))
        self._check_sites(self.site_values(trace, C, N), "an evaluation")
        return self._trace_log_probs(trace, C, N, skip)

    def _obs_layout(self, value: torch.Tensor) -> torch.Tensor:
        """Observed values shared by every chain, (N, *shape), in pyro_mi's layout (1, 1.., N, *shape)."""
        return value.reshape((1,) * (1 + self._plates.pos) + value.shape)

    def trace_program(self, program: Callable[[int], object], num_chains: int, num_data: int, what: str = "model",
                      cond: Mapping | None = None):
        """Traces ``program(copies)`` (e.g. :meth:`guide_program`), conditioned on ``cond``
        ``{site: (C, 1.., N, *shape)}``, inside pyro_mi's chains plate (and, for a model without a
        data plate, its data plate), at the plate dims of this model (see
        :meth:`PlateLayout.trace`; read its values with :meth:`site_values`). Used for the model
        and for guides, so that both see the same batch layout.

        Raises :class:`BatchingError` (a ValueError), naming the last site reached, if the
        program fails when batched (typically a one-data-point model whose sites do not
        broadcast)."""
        return self._plates.trace(program, num_chains, num_data, what, cond)

    def site_values(self, trace, num_chains: int, num_data: int) -> dict[str, torch.Tensor]:
        """``{site: value (C, 1.., N, *shape)}`` of the sample sites (but ``pyro.factor`` ones) of a
        :meth:`trace_program` trace."""
        return {s["name"]: self._plates.unfold(s["value"], num_chains, num_data)
                for s in sample_sites(trace) if not isinstance(s["fn"], dist.Unit)}

    def per_point_log_prob(self, trace, sites: Sequence[str], num_chains: int, num_data: int) -> torch.Tensor:
        """Sums the log densities of the named sites of a :meth:`trace_program` trace to (C, N)."""
        total = 0.0
        for s in sample_sites(trace):
            if s["name"] in sites:
                total = total + self._plates.per_point(_scaled_log_prob(s), num_chains, num_data)
        return total

    def point_shape(self, value: torch.Tensor) -> torch.Size:
        """The shape of one data point of a site value from a :meth:`trace_program` trace:
        (C, 1.., N, *shape) -> shape."""
        return self._plates.point_shape(value)

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

    def with_values(self, model_args: tuple | None = None,
                    covariates: Mapping[str, torch.Tensor] | None = None) -> "ModelDensity | None":
        """This density with new values of its positional arguments and covariates, of the same
        shapes, dtypes and devices, keeping what the probe learnt (sites, layout, the way of running
        a batch and its checks) so that a caller evaluating many designs or inputs of one model pays
        the probe once. The model is traced once on the new values; if its sites differ from the
        probe's (names, distribution types, batch and event shapes), or a value differs in shape,
        dtype or device, the result is None and the caller builds a new density."""
        args = self.model_args if model_args is None else tuple(model_args)
        new_cov = dict(covariates or {})
        old = [*zip(self.model_args, args), *((self.arguments.kwargs[k], v) for k, v in new_cov.items()
                                              if k in self._covariates)]
        if len(args) != len(self.model_args) or set(new_cov) - set(self._covariates) or not all(
                _same_layout(a, b) for a, b in old):
            return None
        new = copy.copy(self)
        new.model_args = args
        new.arguments = copy.copy(self.arguments)
        new.arguments.args = args
        new.arguments.kwargs = {**self.arguments.kwargs, **new_cov}
        new.notices, new.warnings = list(self.notices), []
        sites = {s["name"]: s for s in sample_sites(new._bare_trace())}
        if _structure(sites) != _structure(self.site_fns):
            return None
        new.site_fns = {k: s["fn"] for k, s in sites.items()}
        if not self.has_data_plate:  # the point-by-point runners call the new density's model
            new._alone = new._pointwise(sites, "loop")
            new._points = None if self.vectorize in _DATA_PLATE_WAYS else new._pointwise(sites, self.vectorize)
        return new

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

        Raises ValueError naming the site if :attr:`BOUNDARY_FRACTION` of a latent's simulated
        values or more lie at the boundary of its support, if the log density is not finite at
        :attr:`NON_FINITE_FRACTION` of the simulated points or more, or (``differentiable``) if a site's
        distribution has no ``rsample`` (e.g. a discrete observation).
        """
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        if differentiable:
            self.check_reparameterized(self.obs_sites + self._latent_names)
        x, z, log_lik = self._sample(num_data, differentiable)
        if not log_likelihood:
            return x, z
        return x, z, log_lik if log_lik is not None else self.log_likelihood(x, z)

    #: the fraction of simulated points whose log density is not finite at their own draw from
    #: which pyro_mi refuses the model (below it they are redrawn, up to MAX_REDRAWS times)
    NON_FINITE_FRACTION = 0.05
    MAX_REDRAWS = 10

    def _sample(self, num_data: int, differentiable: bool, redraws: int = 0):
        """:meth:`sample`'s ``(x, z, log p(x|z) or None)``, points whose log density is not finite at
        their own draw redrawn (see :meth:`finite_points`)."""
        # Pyro's argument checks are off while drawing: a parameter that over- or underflows at a few
        # points (a rate of 0) is caught below, by the finiteness of the log densities, point by point
        with torch.enable_grad() if differentiable else torch.no_grad(), pyro.validation_enabled(False):
            values, fns, score = self._draw(1, num_data, differentiable=differentiable)
            moved = self._boundary(values, fns, 1, num_data)
            x = {o: self._to_data(values[o]) for o in self.obs_sites}
            z = self.pack({k: values[k] for k in self._latent_names})[0]
            # the draw's own log densities: those at (x, z) where z unpacks to the drawn values bit for bit,
            # and, for the finiteness check, where it unpacks to them within rounding (a constrained site's
            # round trip through its unconstrained value); a value moved off its support's boundary is scored anew
            log_probs = score() if not moved else None
            exact = log_probs is not None and all(torch.equal(v, values[k]) for k, v in self.unpack(z[None]).items())
        with torch.no_grad(), pyro.validation_enabled(False):
            ok, why = self.finite_points(x, z, log_probs)
        log_lik = None
        if exact and not self._no_density:
            log_lik = sum(v for k, v in log_probs.items() if k in self.obs_sites or k == enumeration.OBSERVED)[0]
        if bool(ok.all()):
            return x, z, log_lik
        bad = int((~ok).sum())
        if (redraws == 0 and bad / num_data >= self.NON_FINITE_FRACTION) or redraws >= self.MAX_REDRAWS:
            raise ValueError(f"{why}; check its distribution's parameters and support")
        self.warnings.append(
            f"{bad} of {num_data} simulated points were not representable ({why}: the sampler or the density "
            f"over- or underflowed in {z.dtype}); they were redrawn, so the points are draws of the model "
            f"conditioned on representable draws ({bad / num_data:.2%} of its mass left out)")
        x2, z2, log_lik2 = self._sample(bad, differentiable, redraws + 1)
        x = {k: torch.cat([v[ok], x2[k]]) for k, v in x.items()}
        z = torch.cat([z[ok], z2])
        if log_lik is not None and log_lik2 is not None:
            log_lik = torch.cat([log_lik[ok], log_lik2])
        else:
            log_lik = None
        return x, z, log_lik

    def check_reparameterized(self, sites: Sequence[str]) -> None:
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

    @property
    def template_rows(self) -> int:
        """R, the rows of the model's data plate (1 for a model without one): data point i of a
        simulation has the per-point arguments of row i % R."""
        return self.arguments.rows if self.has_data_plate else 1

    def shared_prior_reason(self) -> str | None:
        """Why prior draws cannot be shared by the data points of a template row
        (:meth:`shared_prior_likelihood`); None when they can."""
        obs = self.obs_sites[-1]
        if self._points is not None or self._plates.folded:
            return f"the model runs {self.vectorize}, not batched"
        if self.enumerated:
            return "it has enumerated discrete sites"
        if len(self.obs_sites) != 1 or list(self.site_fns)[-1] != obs:
            return "it needs one observed site, sampled after every other site"
        if any(isinstance(fn, dist.Unit) for fn in self.site_fns.values()) or self._no_density:
            return "it needs a model without pyro.factor and an observed site with a density"
        return None

    def shared_prior_likelihood(self, num_samples: int) -> tuple[Callable[[Data], torch.Tensor], torch.Tensor]:
        """Draws K = ``num_samples`` latents z_k ~ p(z) per template row (:attr:`template_rows`)
        and returns ``(log_lik, z)``: ``log_lik(x) -> (K, n)`` gives log p(x_i|z_k), nats, for
        observed values ``{site: (n, *shape)}`` whose point i has row i % R, and z (K, R, D) is
        the packed draws. The K draws of a row are shared by
        all its points (``nmc_eig``'s inner samples): the model runs once, on K x R points, and
        its observed site's distribution scores every point by broadcasting, so the model's own
        computation scales with K·R, not K·n. With gradients on, latents are drawn by ``rsample``.

        Raises:
            ValueError: :meth:`shared_prior_reason` is not None (the reason), or n is not a
                multiple of R.
        """
        why = self.shared_prior_reason()
        if why is not None:
            raise ValueError(f"prior draws cannot be shared by data points: {why}")
        K, R, obs, pos = num_samples, self.template_rows, self.obs_sites[0], self._plates.pos
        with pyro.validation_enabled(False):  # a draw where p(x|z) = 0 scores -inf, not an error (as in IWAE)
            trace = self._trace(K, R, {}, sample_obs=True)
        site = next(s for s in sample_sites(trace) if s["name"] == obs)
        z = self.pack({k: v for k, v in self.site_values(trace, K, R).items() if k in self._latent_names})

        def log_lik(x: Data) -> torch.Tensor:
            v = self.check_data(x)[obs]
            m = v.shape[0] // R
            if m * R != v.shape[0]:
                raise ValueError(f"{v.shape[0]} data points are not a multiple of the template's {R} rows")
            # (m, 1, 1.., R, *shape): the m points of each row, broadcast against the K draws
            value = v.reshape((m, 1) + (1,) * pos + (R,) + v.shape[1:])
            lp = scale_and_mask(site_log_prob(site["fn"], value), site["scale"], site["mask"])
            lp = lp.expand((m, K) + lp.shape[2:]).reshape((m * K,) + lp.shape[2:])
            lp = self._plates.per_point(lp, m * K, R).reshape(m, K, R)
            return lp.transpose(0, 1).reshape(K, m * R)

        return log_lik, z

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
        return {s["name"]: self._plates.per_point(_scaled_log_prob(s), K, N)
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
        """log p(x|z) summed over observed sites: (*S, N, D) -> (*S, N), nats."""
        return self.log_terms(x, z)[1]

    def log_joint(self, x: Data, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(z) + log p(x|z): (*S, N, D) -> (*S, N), nats."""
        lp, ll = self.log_terms(x, z)
        return lp + ll

    def finite_points(self, x: Data, z: torch.Tensor, log_probs: Mapping[str, torch.Tensor] | None = None):
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
                why = (f"the log density of {_what(name)} is not finite at {int(bad.sum())} of {N} simulated "
                       f"points (e.g. value {value.flatten()[:4].tolist()})")
            ok &= ~bad
        return ok, why

    def check_finite(self, x: Data, z: torch.Tensor, log_probs: Mapping[str, torch.Tensor] | None = None) -> None:
        """Raises ValueError naming the first site whose log density is not finite at (x, z).
        ``log_probs``: those per-site log densities ``{site: (*S, N)}``, if already computed."""
        ok, why = self.finite_points(x, z, log_probs)
        if why is not None:
            raise ValueError(f"{why}; check its distribution's parameters and support")

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


def _same_layout(a, b) -> bool:
    """Whether two argument values can stand for each other in a probed density: tensors of one
    shape, dtype and device, or equal non-tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device)
    try:
        return a is b or bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # e.g. an array's elementwise comparison
        return False


def _structure(sites: Mapping) -> dict:
    """``{site: (distribution type, batch shape, event shape)}`` of ``{site: fn or trace site}``."""
    fns = {k: s["fn"] if isinstance(s, dict) else s for k, s in sites.items()}
    return {k: (type(fn), tuple(fn.batch_shape), tuple(fn.event_shape)) for k, fn in fns.items()}
