"""Trace once, then run tensors: the HMC kernel's densities and gradients as one graph.

Every leapfrog step needs ``(log pi0(z), log gamma(z))`` and both gradients. Computed
eagerly, that is one Pyro trace of the model (poutine handlers, plates, distribution
objects, packing) plus two backward passes, and at small batches the Python of those
layers costs more than the arithmetic (issue 13: 1.96 ms of a 3.2 ms transition at
K·N = 16). The model's structure does not change along a run, so :class:`Compiled`
records the aten operations of one eager evaluation, forward and both backward passes,
with :func:`torch.fx.experimental.proxy_tensor.make_fx`, and then runs that graph: tensors
in, tensors out, no poutine and none of the model's Python.

The recording is made with fake tensors, so Python control flow on a value of z (an
``if`` on a tensor, ``.item()``) fails the trace instead of freezing one branch; the
recorded graph is then checked against the eager evaluation at two points (the first
real z and a perturbation of it): the same values and gradients within sqrt(eps) of the
dtype, relative to their magnitude. A trace that fails or disagrees falls back to the
eager path for that shape and says why in :attr:`Compiled.notices`. Graphs are kept per
(shape, dtype, device); a run of AIS uses one or two shapes (the chunks and the pilot).

Modes (measured in ``benchmarks/ais_throughput.py``):

* ``"none"``: eager, a Pyro trace per evaluation (no start-up cost);
* ``"trace"``: the recorded graph, run op by op. About 2x faster per evaluation at small
  batches; the first trace in a process imports ``torch._dynamo`` (about 2 s), so it pays
  for long runs;
* ``"inductor"``: the recorded graph compiled by ``torch.compile`` (fused kernels; on CPU
  it needs a C++ compiler and takes tens of seconds per shape to compile).

A components function whose values depend on state that changes between calls (a critic
being trained) must not be compiled: the graph keeps the tensors it saw.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import hmc

COMPILE_MODES = ("none", "trace", "inductor")
#: ``"auto"`` traces a run with at least this many leapfrog steps per chain (T x L): the first
#: trace in a process costs about 2 s (importing torch._dynamo) and tracing saves 0.3-0.5 ms per
#: evaluation at small batches (linear-vae and digits-vae, K x N = 16, one CPU thread)
AUTO_TRACE_EVALUATIONS = 4000


class Compiled:
    """A components function with a traced evaluator of values and gradients.

    Args:
        components: ``z (C, N, D) -> (log pi0(z), log gamma(z))``, each (C, N), nats,
            differentiable in z and free of randomness.
        mode: ``"trace"`` or ``"inductor"`` (see the module docstring).

    Calling it evaluates ``components`` eagerly (for callers that need the graph of
    autograd); :meth:`evaluate` runs the traced graph. :func:`hmc.evaluate` uses
    :meth:`evaluate` when given a ``Compiled``.

    Attributes:
        notices: why a shape fell back to the eager path (strings), if any did.

    Raises:
        ValueError: an unknown mode.
    """

    def __init__(self, components: Callable, mode: str = "trace"):
        if mode not in COMPILE_MODES[1:]:
            raise ValueError(f"mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
        self.components = components
        self.mode = mode
        self.notices: list[str] = []
        self._graphs: dict = {}

    def __call__(self, z: torch.Tensor):
        return self.components(z)

    def evaluate(self, z: torch.Tensor):
        """``(log_base, log_target, grad_base, grad_target)`` at z (C, N, D), all detached."""
        key = (tuple(z.shape), z.dtype, z.device)
        if key not in self._graphs:
            self._graphs[key] = self._build(z)
        graph = self._graphs[key]
        if graph is None:
            return hmc.eager_evaluate(self.components, z)
        return graph(z)

    def _build(self, z: torch.Tensor):
        """The checked graph for z's shape, or None (with a notice) to evaluate eagerly."""
        from torch.fx.experimental.proxy_tensor import make_fx  # imports torch._dynamo: only when used

        def evaluate(zz):
            return hmc.eager_evaluate(self.components, zz)

        shape = tuple(z.shape)
        gen = torch.Generator(device=z.device).manual_seed(0)
        points = (z, z + 0.1 * torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device))
        try:
            graph = make_fx(evaluate, tracing_mode="fake", _allow_non_fake_inputs=True)(z)
            graph.graph.eliminate_dead_code()
            graph.recompile()
            if self.mode == "inductor":
                graph = torch.compile(graph, dynamic=False)
            where = next((w for w in (_mismatch(evaluate(p), graph(p)) for p in points) if w is not None), None)
        except Exception as e:  # any failure to record or compile means: run eagerly
            self.notices.append(
                f"the densities could not be {'traced' if self.mode == 'trace' else 'compiled'} at shape {shape} "
                f"({type(e).__name__}: {str(e)[:200]}); they run eagerly (a Pyro trace per evaluation), which is "
                "slower but gives the same numbers. Python control flow on latent values (an `if` on a tensor, "
                ".item()) prevents tracing")
            return None
        if where is not None:
            self.notices.append(
                f"the traced densities differ from the eager ones at shape {shape} ({where}); they run eagerly. "
                "The model likely branches on latent values or draws random numbers outside pyro.sample")
            return None
        return graph


_OUTPUTS = ("log pi0", "log gamma", "grad log pi0", "grad log gamma")


def _mismatch(eager, traced) -> str | None:
    """Names the first output where traced and eager differ by more than sqrt(eps) x (1 + magnitude)."""
    for name, a, b in zip(_OUTPUTS, eager, traced):
        if a.shape != b.shape:
            return f"{name}: shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        finite = a[torch.isfinite(a)]
        scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
        tol = torch.finfo(a.dtype).eps ** 0.5 * scale
        if not torch.isclose(a, b, rtol=0.0, atol=tol, equal_nan=True).all():
            return f"{name}: largest difference {float((a - b).abs().nan_to_num(float('inf')).max()):.3g}"
    return None


def resolve_mode(mode: str, num_evaluations: int) -> str:
    """``mode``, with ``"auto"`` read as ``"trace"`` for at least :data:`AUTO_TRACE_EVALUATIONS`
    leapfrog steps per chain, else ``"none"``."""
    if mode != "auto":
        return mode
    return "trace" if num_evaluations >= AUTO_TRACE_EVALUATIONS else "none"


def compile_components(components: Callable, mode: str = "trace") -> Callable:
    """``components`` to run under ``mode``: itself for ``"none"``, else a :class:`Compiled`.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    return components if mode == "none" else Compiled(components, mode)
