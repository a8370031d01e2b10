"""Probing a model: one trace of it as its author calls it finds its sites, shapes and plates;
the probe chooses how to run it over a batch of (chain, data point) pairs and checks that each
point's log density is its own (:class:`ModelProbe`, the part of
:class:`~pyro_mi.density.ModelDensity` that runs when it is built)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Mapping

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.inspect import get_dependencies

from ..resources import is_out_of_memory
from . import enumeration, packing
from .arguments import locate_observed, slot_name
from .plates import BatchingError, common_frame, plate_layout, sample_sites, undeclared_batch_dims
from .pointwise import VECTORIZE, PointwiseModel
from .sites import check_joint, decentred, describe, has_density, is_discrete, is_loc_scale, scaled_log_prob

# the batch-dependence probe: a batch of this many chains x data points, of which the
# first and the last point are also evaluated alone (two points catch a reduction over
# the batch, and a dependence on a neighbour or on the first point; each costs a trace)
PROBE_CHAINS, PROBE_DATA = 2, 3
#: the ways of running a data-plate model, in the order ``"auto"`` tries them
DATA_PLATE_WAYS = ("plate", "fold")
#: the fraction of simulated points with latents at the boundary of their support (draws that
#: underflowed) from which pyro_mi refuses the model: most of its draws are not representable
BOUNDARY_FRACTION = 0.5


class ModelProbe:
    """The probe and checks of :class:`~pyro_mi.density.ModelDensity` (a mixin: it reads and sets
    the density's attributes, see there)."""

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
        self.decentred_sites: tuple[str, ...] = ()
        if self.reparam == "auto":
            decentred_sites = self._decentre(sites)
            if decentred_sites:
                self.decentred_sites = tuple(decentred_sites)
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
        check_joint(sites, self.obs_sites)
        # pyro.factor sites (Unit) add to the joint density but are not latent variables
        latents = [s for name, s in sites.items() if name not in self.obs_sites and not isinstance(s["fn"], dist.Unit)]
        for s in latents:
            if is_discrete(s["fn"]) and not enumeration.is_enumerated(s):
                raise ValueError(
                    f"latent site {s['name']!r} is discrete ({type(s['fn']).__name__}) and not marked for "
                    "enumeration: mark it to be summed out exactly (@pyro.infer.config_enumerate on the model, or "
                    "infer={'enumerate': 'parallel'} at the site), or marginalise it out in the model"
                )
        self.enumerated = tuple(s["name"] for s in latents if is_discrete(s["fn"]))
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
        self._no_density = frozenset(o for o in self.obs_sites if not has_density(sites[o]))
        self._alone = None if self.has_data_plate else self._pointwise(sites, "loop")
        if vectorize == "auto":
            ways = DATA_PLATE_WAYS if self.has_data_plate else VECTORIZE
        elif vectorize in (DATA_PLATE_WAYS if self.has_data_plate else VECTORIZE):
            ways = (vectorize,)
        else:
            kind = "a data-plate model" if self.has_data_plate else "a one-data-point model (one call is one point)"
            raise ValueError(f"vectorize={vectorize!r} does not apply to {kind}; choose 'auto' or one of "
                             f"{DATA_PLATE_WAYS if self.has_data_plate else VECTORIZE}")
        failures = []
        layout = self._plates
        for way in ways:
            self.vectorize = way
            self._plates = dataclasses.replace(layout, folded=way == "fold")
            self._points = None if way in DATA_PLATE_WAYS else self._pointwise(sites, way)
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
        candidates = [k for k, s in sites.items() if k not in self.obs_sites and is_loc_scale(s["fn"])]
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
        located = self._located_observed()
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

    def _located_observed(self) -> dict:
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
        C, N = PROBE_CHAINS, PROBE_DATA
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
            seconds = self._points.seconds_per_point(values, scaled_log_prob, self._no_density)
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

    def _boundary(self, values: dict, fns: Mapping, num_chains: int, num_data: int, probe: bool = False) -> int:
        """Moves latent values at the boundary of their support (:func:`packing.boundary_points`:
        draws that underflowed in the dtype, which torch clamps to the boundary) to the nearest
        float inside it, in place in ``values``; returns how many points moved and adds a warning
        naming each site.

        Raises:
            ValueError: naming the site, when :data:`BOUNDARY_FRACTION` of the points or more are
                at the boundary: most draws of that site are not representable in the run's dtype.
        """
        moved = torch.zeros(num_chains, num_data, dtype=torch.bool)
        for name in self._latent_names:
            value, support = values[name], fns[name].support
            bad = packing.boundary_points(support, value, num_chains, num_data)
            if not bad.any():
                continue
            if float(bad.float().mean()) >= BOUNDARY_FRACTION:
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
            out = self._alone.log_probs(point, scaled_log_prob, self._no_density)
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
                        f"the log density of {describe(name)} at one data point differs between two calls of the "
                        f"model on the same values: {float(at):.6g} and {float(single):.6g} nats at (chain {c}, "
                        f"point {i}). The model uses randomness outside pyro.sample (e.g. torch.randn, dropout "
                        "in training mode): draw every random number with pyro.sample"
                    )
                raise BatchingError(
                    f"the log density of {describe(name)} at one data point depends on the other points of "
                    f"the batch: evaluated on {num_chains} chains x {num_data} data points at once "
                    f"({self.vectorize}) it is {float(at):.6g} nats at (chain {c}, point {i}), evaluated alone "
                    f"{float(single):.6g}. The model likely reduces over pyro_mi's batch dims (e.g. "
                    "z.mean() or .sum() over all dims, or indexes a latent with an integer tensor: use "
                    "pyro.ops.indexing.Vindex): reduce only over event dims (dim=-1, ...) and declare "
                    "vector sites with .to_event(); batch norm in training mode, or randomness outside "
                    "pyro.sample, does the same"
                )

