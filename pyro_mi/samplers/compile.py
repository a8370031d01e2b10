"""Trace once, then run tensors: the HMC kernel's densities, gradients and transitions as graphs.

Every leapfrog step needs ``(log pi0(z), log gamma(z))`` and both gradients. Computed
eagerly, that is one Pyro trace of the model (poutine handlers, plates, distribution
objects, packing) plus two backward passes, and at small batches the Python of those
layers costs more than the arithmetic. The model's structure does not change along a run,
so :class:`Compiled` records the aten operations of one eager run
(:func:`pyro_mi.samplers.record.record`) and then replays that graph: tensors in, tensors
out, no poutine and none of the model's Python. Two graphs are recorded:

* a whole HMC transition (:func:`hmc.transition`: L leapfrog steps, each evaluating the
  components and both gradients, and the Metropolis test), given its random numbers,
  which :func:`hmc.step` draws from the chain's generator outside the graph (runs of at
  least :data:`WHOLE_TRANSITION_STEPS` steps; shorter ones on CPU run the leapfrog in Python
  around the next graph, recording L times less);
* one evaluation (:meth:`Compiled.evaluate`), for the step-size search, recorded at a
  shape's fourth use (``hmc.init`` evaluates once per chunk).

The recording refuses what a replay would not redo (Python control flow on a value of z:
an ``if`` on a tensor, ``.item()``; shapes that depend on values; random draws) instead of
freezing one branch; each recorded graph is then checked against the eager run at its first
real inputs and at a perturbation of z: equal accept decisions, and values and gradients
within sqrt(eps) of the dtype relative to their magnitude. A trace that fails or disagrees
falls back to the eager path for that shape and says why in :attr:`Compiled.notices`.
Graphs are kept per input shapes, dtype, device and L; a run of AIS uses a few (the chunks
and the pilot).

Modes (``benchmarks/ais_throughput.py`` and ``benchmarks/ais_gpu_scale.py`` measure them):

* ``"none"``: eager, a Pyro trace per evaluation (no start-up cost);
* ``"trace"``: the recorded graphs, replayed op by op, each operator called at its C++
  entry point: the same numbers bit for bit. Recording and checking a graph costs a few
  eager evaluations, so it pays from about a hundred leapfrog steps per chain
  (:data:`AUTO_TRACE_EVALUATIONS`);
* ``"inductor"``: the recorded graphs compiled by ``torch.compile`` into fused kernels
  (equal to rounding), on CUDA replayed as CUDA graphs. Compiling takes tens of seconds
  per shape (on CPU it needs a C++ compiler), so it pays on a GPU and for long runs.

A components function whose values depend on state that changes between calls (a critic
being trained) must not be compiled: the graph keeps the tensors it saw.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch

from . import hmc
from .record import record

COMPILE_MODES = ("none", "trace", "inductor")
#: ``"auto"`` traces a run of at least this many leapfrog steps per chain (T x L): recording and checking
#: the graphs costs a few eager transitions, which the traced evaluations' saving repays only over a
#: run this long (``benchmarks/ais_equal_work.py``)
AUTO_TRACE_EVALUATIONS = 100
#: a traced run of at least this many annealing steps records whole transitions (L leapfrog steps in
#: one graph: the least Python per step, for L times the recording); a shorter one on CPU records one
#: graph per evaluation and runs the leapfrog around it
WHOLE_TRANSITION_STEPS = 1000


class Compiled:
    """A components function with a traced evaluator of values and gradients.

    Args:
        components: ``z (C, N, D) -> (log pi0(z), log gamma(z))``, each (C, N), nats,
            differentiable in z and free of randomness.
        mode: ``"trace"`` or ``"inductor"`` (see the module docstring).
        whole_transitions: record whole transitions (True), or, with ``"trace"`` on CPU, one graph
            per evaluation with the leapfrog run around it (False: a cheaper recording for short
            runs). The numbers are the same either way.

    Calling it evaluates ``components`` eagerly (for callers that need the graph of
    autograd); :meth:`evaluate` runs the traced graph. :func:`hmc.evaluate` uses
    :meth:`evaluate` when given a ``Compiled``.

    Attributes:
        notices: why a shape fell back to the eager path (strings), if any did.

    Raises:
        ValueError: an unknown mode.
    """

    def __init__(self, components: Callable, mode: str = "trace", whole_transitions: bool = True):
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
        self.components = components
        self.mode = mode
        self.whole_transitions = whole_transitions
        self.notices: list[str] = []
        self._graphs: dict = {}
        self._seen: dict = {}

    def __call__(self, z: torch.Tensor):
        return self.components(z)

    def evaluate(self, z: torch.Tensor):
        """``(log_base, log_target, grad_base, grad_target)`` at z (C, N, D), all detached."""

        def evaluate(zz):
            return hmc.eager_evaluate(self.components, zz)

        key = (tuple(z.shape), z.dtype, z.device)
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] <= 3:  # hmc.init evaluates once per chunk: recording would not pay
            return evaluate(z)
        graph = self._graph(("evaluate",), evaluate, (z,))
        return evaluate(z) if graph is None else graph(z)

    def transition(self, state, momentum, uniform, beta, step_size, num_leapfrog: int, max_energy_error: float):
        """:func:`hmc.transition` (L leapfrog steps and the Metropolis test) as one recorded graph."""

        def transition(*tensors):
            st, info = hmc.transition(self.components, hmc.HMCState(*tensors[:5]), *tensors[5:], num_leapfrog,
                                      max_energy_error)
            return (*st, *info)

        inputs = (*state, momentum, uniform, beta, step_size)
        whole = self.whole_transitions or self.mode != "trace" or state.z.device.type != "cpu"
        graph = self._graph(("transition", num_leapfrog, max_energy_error), transition, inputs) if whole else None
        if graph is None:  # the leapfrog then evaluates through this object (a graph per evaluation)
            return hmc.transition(self, state, momentum, uniform, beta, step_size, num_leapfrog, max_energy_error)
        out = graph(*inputs)
        return hmc.HMCState(*out[:5]), hmc.HMCInfo(*out[5:])

    def _graph(self, what: tuple, fn: Callable, inputs: tuple):
        """The checked graph of ``fn`` at the shapes of ``inputs`` (built on first use), or None
        (with a notice) where it must run eagerly."""
        key = what + tuple((tuple(t.shape), t.dtype) for t in inputs) + (inputs[0].device,)
        if key not in self._graphs:
            self._graphs[key] = self._record(what[0], fn, inputs)
        return self._graphs[key]

    def _record(self, what: str, fn: Callable, inputs: tuple):
        """The graph of ``fn``, checked against eager runs at ``inputs`` and at inputs whose first (z)
        is perturbed: a value the recording could not see (Python reading a tensor without an aten
        operation) would differ there."""
        z = inputs[0]
        gen = torch.Generator(device=z.device).manual_seed(0)
        moved = z + 0.1 * torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
        checks = (inputs, (moved, *inputs[1:]))
        shape = tuple(z.shape)
        try:
            graph = _simplify(record(fn, inputs))
            graph = _inductor(graph, inputs[0].device) if self.mode == "inductor" else _direct(graph)
            where = next((w for w in (_mismatch(fn(*c), graph(*c)) for c in checks) if w is not None), None)
        except Exception as e:  # any failure to record or compile means: run eagerly
            self.notices.append(
                f"the densities could not be {'traced' if self.mode == 'trace' else 'compiled'} ({what}, shape "
                f"{shape}: {type(e).__name__}: {str(e)[:200]}); they run eagerly (a Pyro trace per evaluation), "
                "which is slower but gives the same numbers. Python control flow on latent values (an `if` on a "
                "tensor, .item()) prevents tracing")
            return None
        if where is not None:
            self.notices.append(
                f"the traced densities differ from the eager ones ({what}, shape {shape}: {where}); they run "
                "eagerly. The model likely branches on latent values or draws random numbers outside pyro.sample")
            return None
        return graph


_aten = torch.ops.aten
#: shape-only ops that are no-ops where the output has the input's shape and strides
_VIEWS = {_aten.view.default, _aten.expand.default, _aten.alias.default, _aten.detach.default,
          _aten._unsafe_view.default, _aten.reshape.default}
#: ops whose value depends only on the shape, dtype and device of their tensor arguments
_SHAPE_ONLY = {_aten.ones_like.default, _aten.zeros_like.default, _aten.new_zeros.default,
               _aten.new_ones.default, _aten.full_like.default}


def _simplify(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Removes what a replay need not redo: views that change nothing (a third of a recorded
    transition's nodes), and values computed from constants alone (log of a fixed scale, the
    backward pass's seed of ones), which are computed once here and kept. Random and in-place
    ops are never folded, nor is a graph output (the caller may keep it)."""
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in _VIEWS and isinstance(n.args[0], torch.fx.Node):
            a, b = n.meta.get("val"), n.args[0].meta.get("val")
            if a is not None and b is not None and a.shape == b.shape and a.stride() == b.stride():
                n.replace_all_uses_with(n.args[0])
                graph.erase_node(n)
    outputs = set(next(n for n in graph.nodes if n.op == "output").all_input_nodes)
    inplace = any(n.op == "call_function" and getattr(n.target, "_schema", None) is not None
                  and n.target._schema.is_mutable for n in graph.nodes)
    const: dict = {}
    for n in graph.nodes if not inplace else ():
        if n.op == "get_attr":
            const[n] = getattr(gm, n.target)
            continue
        if n.op != "call_function" or n in outputs or not isinstance(n.target, torch._ops.OpOverload) \
                or torch.Tag.nondeterministic_seeded in n.target.tags:
            continue
        if n.target in _SHAPE_ONLY:
            meta = n.args[0].meta.get("val") if isinstance(n.args[0], torch.fx.Node) else None
            if meta is None:
                continue
            like = torch.empty(meta.shape, dtype=meta.dtype, device=n.args[0].meta["device"])
            const[n] = n.target(like, *n.args[1:], **n.kwargs)
        elif all(a in const for a in n.all_input_nodes):
            const[n] = n.target(*torch.fx.node.map_arg(n.args, const.get), **torch.fx.node.map_arg(n.kwargs, const.get))
    for i, n in enumerate(n for n in const if n.op == "call_function"):
        if any(u not in const for u in n.users):
            name = f"_folded{i}"
            gm.register_buffer(name, const[n])
            with graph.inserting_before(n):
                n.replace_all_uses_with(graph.get_attr(name))
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


class _Namespace:
    """Attributes set on it; the others read from ``fallback``."""

    def __init__(self, fallback):
        self._fallback = fallback

    def __getattr__(self, name):  # only for names not set on it
        if name == "_fallback":  # not yet set (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._fallback, name)


def _direct(gm: torch.fx.GraphModule) -> Callable:
    """The graph's generated code, run with each ``torch.ops.<namespace>.<op>.<overload>`` it names
    resolved to the operator's C++ entry point (``OpOverload._op``) rather than its Python wrapper,
    which costs as much as a small CPU kernel, and its constants read as plain attributes. The same
    kernels: the same numbers (the caller checks the replay against the eager run)."""
    ops = _Namespace(torch.ops)  # a name it does not set resolves as before: slower, the same
    for n in gm.graph.nodes:
        op = n.target
        if n.op == "call_function" and isinstance(op, torch._ops.OpOverload):
            space = ops.__dict__.setdefault(op.namespace, _Namespace(getattr(torch.ops, op.namespace)))
            name = op._schema.name.split("::")[-1]
            packet = space.__dict__.setdefault(name, _Namespace(getattr(space._fallback, name)))
            setattr(packet, op._overloadname, op._op)
    names = _Namespace(torch)
    names.ops = ops
    forward = types.FunctionType(gm.forward.__code__, {**gm.forward.__globals__, "torch": names})
    # the graph's constants, read as plain attributes (an nn.Module's lookup goes through its __getattr__)
    constants = types.SimpleNamespace(**dict(gm.named_buffers(remove_duplicate=False)),
                                      **dict(gm.named_parameters(remove_duplicate=False)))
    return functools.partial(forward, constants)


#: on CUDA, also replay the compiled kernels as CUDA graphs (``mode="reduce-overhead"``)
CUDA_GRAPHS = True


def _inductor(graph, device: torch.device) -> Callable:
    """``graph`` compiled by torch.compile; on CUDA with CUDA graphs, whose outputs live in
    buffers that the next replay overwrites, so they are copied out (the chains keep states
    across steps and chunks)."""
    if device.type != "cuda" or not CUDA_GRAPHS:
        return torch.compile(graph, dynamic=False)
    compiled = torch.compile(graph, dynamic=False, mode="reduce-overhead")

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in compiled(*args))

    return run


def _mismatch(eager, traced) -> str | None:
    """Names the first output where traced and eager differ: in shape, in a boolean (an accept
    decision), or by more than sqrt(eps) x (1 + magnitude)."""
    for i, (a, b) in enumerate(zip(eager, traced)):
        name = f"output {i}"
        if a.shape != b.shape:
            return f"{name}: shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"{name}: {int((a != b).sum())} values differ"
            continue
        finite = a[torch.isfinite(a)]
        scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
        tol = torch.finfo(a.dtype).eps ** 0.5 * scale
        if not torch.isclose(a, b, rtol=0.0, atol=tol, equal_nan=True).all():
            return f"{name}: largest difference {float((a - b).abs().nan_to_num(float('inf')).max()):.3g}"
    return None


def resolve_mode(mode: str, num_steps: int, num_leapfrog: int = 1) -> str:
    """``mode``, with ``"auto"`` read as ``"trace"`` for runs of at least
    :data:`AUTO_TRACE_EVALUATIONS` leapfrog steps per chain (``num_steps * num_leapfrog``), else
    ``"none"``."""
    if mode != "auto":
        return mode
    return "trace" if num_steps * num_leapfrog >= AUTO_TRACE_EVALUATIONS else "none"


def compile_components(components: Callable, mode: str = "trace", num_steps: int | None = None) -> Callable:
    """``components`` to run under ``mode``: itself for ``"none"``, else a :class:`Compiled` that
    records whole transitions unless ``num_steps`` (the run's T) is below
    :data:`WHOLE_TRANSITION_STEPS`.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return components
    return Compiled(components, mode, whole_transitions=num_steps is None or num_steps >= WHOLE_TRANSITION_STEPS)
