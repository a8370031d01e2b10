"""Running a one-data-point model point by point: by ``torch.func.vmap`` or by a loop.

pyro_mi runs a model batched inside its plates when the model broadcasts over
leading batch dims (see :mod:`.plates`). A one-data-point model written the usual
way, ``dist.Normal(A @ z + b, s)``, does not: it fails there, or (``z.mean()``)
computes something else. For such a model the log densities of a batch of
(chain, data point) pairs are computed from the model exactly as written for one
point:

* ``"vmap"``: ``torch.func.vmap`` over the points, one vectorised call that
  autograd differentiates through;
* ``"loop"``: a Python loop over the points, for models vmap cannot run
  (data-dependent Python control flow, ``.item()``, in-place ops on inputs).

Simulation uses vmap too (``randomness="different"``, every site drawn by
``fn.sample()``). Some torch.distributions draw through in-place random ops on fresh
tensors (``Exponential``, ``Cauchy``, ``MultivariateNormal``) or through autograd
Functions (``Beta``, ``Dirichlet``), which vmap refuses to run (it raises; it never
draws the same numbers for all points): such a site is drawn *site by site*. The vmapped
model stops at it and returns its distribution's parameters, one row per point; the
distribution rebuilt from them draws every point at once with its own batched sampler;
and the next vmapped pass runs the model with every site drawn so far held fixed. A
model with S such sites takes S + 1 vectorised passes. A model vmap cannot run at all
is drawn by a loop over points.

Discrete sites marked for enumeration are summed out of each point's log densities
(:mod:`.enumeration`), enumerated left of the model's own plates.

Values travel in pyro_mi's layout, ``{site: (C, N, *shape)}``, where ``shape`` is
the site's per-point shape in a batched trace (the one-point shape padded on the
left with 1s to the model's plate rank); each point is reshaped to the shape the
model itself gives the site.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Mapping

import pyro
import torch
from pyro import poutine
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger

from ..resources import is_out_of_memory
from . import enumeration
from .plates import sample_sites

#: the ways of running a model over pyro_mi's batch, in the order ``"auto"`` tries them
VECTORIZE = ("plate", "vmap", "loop")


def _sample_out_of_place(fn) -> torch.Tensor:
    """A draw of ``fn`` without in-place ops: torch's Gamma clamps its draw in place, an op
    vmap has no batching rule for and runs point by point (10x slower); here it is clamped
    out of place. Every other distribution draws by ``fn.sample()``."""
    base = fn
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if type(base) in (torch.distributions.Gamma, pyro.distributions.Gamma):
        shape = base.batch_shape + base.event_shape
        value = torch._standard_gamma(base.concentration.expand(shape)) / base.rate.expand(shape)
        return value.clamp(min=torch.finfo(value.dtype).tiny)
    return fn.sample()


def _same_sites(rows: list[dict]) -> list[str]:
    """The site names of runs of the model on single points, the same for every point.

    Raises:
        ValueError: a run had other sites (a latent sampled only on some branch or in a loop of
            random length), naming them.
    """
    names = set(rows[0])
    for r in rows[1:]:
        if set(r) != names:
            diff = sorted(set(r) ^ names)
            raise ValueError(f"the model's sample sites change between runs (sites {diff} are sampled on some data "
                             "points only): pyro_mi needs the same sites on every run of the model; sample every site "
                             "on every run (a loop of fixed length, or poutine.mask instead of skipping a site)")
    return list(rows[0])


class _ShapeOnlyEnum(EnumMessenger):
    """Pyro's ``poutine.enum``, able to run under vmap: after each sample site Pyro's enumerator
    reads its value's shape through ``value.data``, which vmap forbids; it is shown a stand-in
    of the same shape (on the meta device) instead."""

    def _pyro_post_sample(self, msg):
        value = msg["value"]
        if not isinstance(value, torch.Tensor):
            return super()._pyro_post_sample(msg)
        msg["value"] = torch.empty(value.shape, device="meta")
        try:
            super()._pyro_post_sample(msg)
        finally:
            msg["value"] = value


class _Stop(Exception):
    """Raised at the first site vmap cannot draw from: its name and distribution."""

    def __init__(self, name: str, fn):
        super().__init__(name)
        self.name, self.fn = name, fn


class _DrawOrStop(Messenger):
    """Draws each unobserved site by ``fn.sample()`` (torch's ``rsample`` of a Normal fills a
    fresh tensor in place, which vmap cannot make differ between points; ``sample`` draws
    out of place, no gradient flowing through the draw), and stops at a site whose draw vmap
    refuses (:class:`_Stop`)."""

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and msg["value"] is None:
            try:
                msg["value"] = _sample_out_of_place(msg["fn"])
            except RuntimeError:
                raise _Stop(msg["name"], msg["fn"]) from None


#: of parameters that say the same thing, the one a rebuilt distribution is given
_ONE_OF = (("probs", "logits"), ("covariance_matrix", "precision_matrix", "scale_tril"))


def _parameters(fn) -> tuple[type, dict, int]:
    """``(class, parameters, event dims added by Independent)`` of a site's distribution, from
    which :func:`_rebuild` makes it again with other (batched) parameter values."""
    reinterpreted = 0
    while isinstance(fn, torch.distributions.Independent):
        reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    cls, params = type(fn), {}
    for k in fn.arg_constraints:
        if k in fn.__dict__ or isinstance(getattr(cls, k, None), property):
            params[k] = getattr(fn, k)
    for group in _ONE_OF:
        if any(k in params for k in group):
            for k in group:
                params.pop(k, None)
            params[group[-1]] = getattr(fn, group[-1])
    return cls, params, reinterpreted


def _rebuild(cls: type, params: dict, batch_shape: torch.Size):
    """The distribution ``cls(**params)`` at ``batch_shape`` (one row per point first)."""
    return cls(**params, validate_args=False).expand(batch_shape)


class PointwiseModel:
    """A one-data-point model evaluated and simulated one point at a time.

    Args:
        call: the model, called with no arguments (model args bound).
        fns: ``{site: distribution}`` of each sample site in a trace of the bare model
            (one data point, outside any pyro_mi plate): its value shape and support.
        layout_shapes: ``{site: shape}`` of one point in pyro_mi's layout; same
            number of elements as ``bare_shapes``.
        how: ``"vmap"`` or ``"loop"``, the way :meth:`log_probs` runs.
        enum: for a model with discrete sites marked for enumeration, ``(rank, observed sites)``:
            the model's batch rank (enumeration goes left of it) and the observed site names.
    """

    def __init__(self, call: Callable, bare_shapes: Mapping[str, torch.Size], layout_shapes: Mapping[str, torch.Size],
                 fns: Mapping, how: str, enum: tuple | None = None):
        if how not in ("vmap", "loop"):
            raise ValueError(f"how must be 'vmap' or 'loop', got {how!r}")
        self.call, self.how, self.fns, self.enum = call, how, dict(fns), enum
        self.bare_shapes, self.layout_shapes = dict(bare_shapes), dict(layout_shapes)
        #: how :meth:`draw` runs: "vmap" until vmap fails to draw from this model once
        self.draws = how

    def _point_log_probs(self, values: Mapping[str, torch.Tensor], site_log_prob: Callable, skip: frozenset):
        """Per-site log densities (scalars, summed over the point's dims) of the model
        conditioned on one point's ``values`` (layout shapes); with enumerated sites,
        :data:`enumeration.LATENTS` and :data:`enumeration.OBSERVED`, those sites summed out."""
        program = poutine.condition(self.call, data=self._fixed(values))
        if self.enum is None:
            trace = poutine.trace(program).get_trace()
            return {s["name"]: site_log_prob(s).sum() for s in sample_sites(trace) if s["name"] not in skip}
        rank, obs = self.enum
        trace = poutine.trace(_ShapeOnlyEnum(first_available_dim=-rank - 1)(program)).get_trace()
        out = enumeration.contract(trace, obs, (), with_observed=not set(obs) <= skip)
        return {k: v.reshape(()) for k, v in out.items()}

    def log_probs(self, values: Mapping[str, torch.Tensor], site_log_prob: Callable, skip=frozenset()):
        """Per-site log densities of C x N points, each evaluated by the model alone.

        Args:
            values: ``{site: (C, N, *layout_shape)}``, every latent and observed site.
            site_log_prob: ``site -> log density`` of a trace site (scale and mask applied).
            skip: names of sites whose density is not wanted (e.g. a simulator's).

        Returns:
            ``{site: (C, N)}`` in nats, differentiable in ``values``.

        Raises:
            Whatever the model raises on one point (vmap also raises on
            data-dependent control flow and on randomness outside ``pyro.sample``).
        """
        first = next(iter(values.values()))
        C, N = first.shape[:2]
        flat = {k: v.reshape((C * N,) + v.shape[2:]) for k, v in values.items()}
        skip = frozenset(skip)
        if self.how == "vmap":
            # vmap cannot run argument checks that branch on data: the loop (and the probe) keep them
            with pyro.validation_enabled(False), enumeration.vmappable():
                out = torch.func.vmap(lambda v: self._point_log_probs(v, site_log_prob, skip))(flat)
        else:
            rows = [self._point_log_probs({k: v[b] for k, v in flat.items()}, site_log_prob, skip)
                    for b in range(C * N)]
            out = {k: torch.stack([r[k] for r in rows]) for k in _same_sites(rows)}
        return {k: v.reshape(C, N) for k, v in out.items()}

    def draw(self, num_chains: int, num_data: int, cond: Mapping | None = None,
             differentiable: bool = False) -> dict[str, torch.Tensor]:
        """Simulates C x N independent points (x, z) ~ p(x, z) of the model written for one point.

        Args:
            cond: ``{site: (C, N, *layout_shape)}`` values held fixed; the other sites are
                drawn given them.
            differentiable: loop over points and draw by ``rsample``, so that values carry
                gradients (vmap draws by ``sample``).

        Returns:
            ``{site: (C, N, *layout_shape)}`` for every sample site but ``pyro.factor`` ones.
        """
        B = num_chains * num_data
        flat_cond = {k: v.reshape((B,) + v.shape[2:]) for k, v in (cond or {}).items()}
        flat = None
        if self.draws == "vmap" and not differentiable:
            try:
                flat = self._draw_by_vmap(B, flat_cond)
            except Exception as e:  # noqa: BLE001 - a model vmap cannot draw from: loop from now on
                if is_out_of_memory(e):
                    raise
                self.draws = "loop"
        if flat is None:
            rows = [self._draw_one({k: v[b] for k, v in flat_cond.items()}) for b in range(B)]
            flat = {k: torch.stack([r[k] for r in rows]) for k in _same_sites(rows)}
        return {k: v.reshape((num_chains, num_data) + v.shape[1:]) for k, v in flat.items()}

    def _fixed(self, point: Mapping) -> dict:
        return {k: v.reshape(self.bare_shapes[k]) for k, v in point.items() if k in self.bare_shapes}

    def _draw_one(self, point: Mapping) -> dict:
        """One point drawn by the model, ``point``'s sites held fixed (layout shapes)."""
        program = poutine.condition(poutine.uncondition(self.call), data=self._fixed(point))
        trace = poutine.trace(program).get_trace()
        return {s["name"]: s["value"].reshape(self.layout_shapes[s["name"]])
                for s in sample_sites(trace) if s["name"] in self.layout_shapes}

    def _draw_by_vmap(self, B: int, fixed: dict) -> dict:
        """B points drawn by vmapped passes of the model, site by site where vmap cannot draw
        (module docstring); values (B, *layout shape)."""
        fixed = dict(fixed)
        program = poutine.uncondition(self.call)
        stopped: list = []  # the site each pass stopped at (every point stops at the same site)

        def one(point):
            with poutine.trace() as tracer, _DrawOrStop():
                try:
                    poutine.condition(program, data=self._fixed(point))()
                except _Stop as e:
                    stopped.append(e.name)
                    params = _parameters(e.fn)[1]
                else:
                    params = {}
            drawn = {s["name"]: s["value"].reshape(self.layout_shapes[s["name"]])
                     for s in sample_sites(tracer.trace) if s["name"] in self.layout_shapes}
            return drawn, params

        while True:
            stopped.clear()
            with pyro.validation_enabled(False), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="There is a performance drop")
                drawn, params = torch.func.vmap(one, randomness="different")(fixed if fixed else
                                                                             {"_": torch.arange(B)})
            fixed.update(drawn)
            if not stopped:
                return {k: v for k, v in fixed.items() if k in self.layout_shapes}
            name = stopped[0]
            fn = self.fns[name]
            cls, _, reinterpreted = _parameters(fn)
            base_batch = fn.batch_shape + fn.event_shape[:reinterpreted]
            value = _rebuild(cls, params, torch.Size((B,)) + base_batch).sample()
            fixed[name] = value.reshape((B,) + self.layout_shapes[name])

    def seconds_per_point(self, values: Mapping[str, torch.Tensor], site_log_prob: Callable, skip=frozenset()) -> float:
        """Wall time of :meth:`log_probs` with a gradient, per point, measured on ``values``."""
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in values.items()}
            start = time.perf_counter()
            out = self.log_probs(leaves, site_log_prob, skip)
            total = sum(v.sum() for v in out.values())
            grads = [v for v in leaves.values() if v.requires_grad]
            torch.autograd.grad(total, grads, allow_unused=True)
            seconds = time.perf_counter() - start
        first = next(iter(values.values()))
        return seconds / (first.shape[0] * first.shape[1])
