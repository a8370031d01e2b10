"""Record the aten operations of one eager run of a function as a ``torch.fx`` graph.

:func:`record` runs ``fn`` once on real tensors under a :class:`TorchDispatchMode`, which
sees every aten operation below autograd — the forward pass and the backward passes that
``torch.autograd.grad`` runs — and writes each as a node of a :class:`torch.fx.Graph`:
tensors in, tensors out, none of the caller's Python. It replaces
``torch.fx.experimental.proxy_tensor.make_fx``, whose first use in a process imports the
compiler stack (``torch._dynamo``), a start-up cost that short runs do not repay
(``docs/tuning.md``).

What a replay at other input values would get wrong, the recording refuses (raises
:class:`NotRecordable`), so the caller can run eagerly:

* an operation on values computed from the inputs whose result is a Python value
  (``.item()``, ``if`` on a tensor, ``torch.equal``): the Python around it may have branched
  on it;
* an operation on values computed from the inputs whose output shape depends on those
  values (``nonzero``, a boolean mask index);
* a random draw (it would draw again at each replay);
* a tensor sharing memory with a recorded one that no recorded operation made (a view the
  recording cannot name).

Python that reads values without an aten operation (``.numpy()``, ``.tolist()``) is not
seen: the caller compares the replay with an eager run at inputs other than the recorded
ones (:mod:`pyro_mi.samplers.compile`).

Tensors that no recorded operation made and that are not inputs (a model's weights, a
constant scale) are kept, detached, as buffers of the graph module: a replay uses their
values at recording time.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdRef, WeakTensorKeyDictionary


class NotRecordable(RuntimeError):
    """``fn`` does something a replay of its recorded operations would not redo faithfully."""


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _describe(node: torch.fx.Node, t: torch.Tensor) -> None:
    """Keeps what graph passes read of a value, not the value: its shape, strides and dtype (a tensor on
    the meta device, ``meta["val"]``) and its device (``meta["device"]``)."""
    node.meta["val"] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    node.meta["device"] = t.device


class _Recorder(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # the recording never runs under torch.compile: do not import it
        return False

    def __init__(self, graph: torch.fx.Graph, module: torch.nn.Module):
        super().__init__()
        self.graph, self.module = graph, module
        self.nodes = WeakTensorKeyDictionary()  # tensor -> the node that made it (or its input)
        self.storages: dict[int, object] = {}  # storage address -> a weak reference to a recorded tensor on it
        self.constants: dict[int, torch.fx.Node] = {}
        self._kept: list[torch.Tensor] = []  # constants stay alive, so their ids stay theirs

    def track(self, t: torch.Tensor, node: torch.fx.Node, fresh: bool = True) -> None:
        """Names ``t`` by ``node``; ``fresh``: its memory is new (an input, or an operation's output that
        is no view of, nor written into, an argument), so no tensor outside the recording may share it."""
        self.nodes[t] = node
        _describe(node, t)
        if fresh and t.numel():
            self.storages[_address(t)] = WeakIdRef(t)

    def node_of(self, t: torch.Tensor, func) -> torch.fx.Node:
        node = self.nodes.get(t)
        if node is not None:
            return node
        if t.numel():
            owner = self.storages.get(_address(t))
            if owner is not None and owner() is not None:
                raise NotRecordable(f"{func} reads a tensor that shares memory with a recorded one but that no "
                                    "recorded operation made")
        node = self.constants.get(id(t))
        if node is None:
            name = f"_constant{len(self.constants)}"
            self.module.register_buffer(name, t.detach())
            self._kept.append(t)
            node = self.constants[id(t)] = self.graph.get_attr(name)
            _describe(node, t)
        return node

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_node = lambda a: self.node_of(a, func) if isinstance(a, torch.Tensor) else a  # noqa: E731
        node_args, node_kwargs = tree_map(to_node, tuple(args)), tree_map(to_node, dict(kwargs))
        # what is computed from constants alone a replay recomputes alike, whatever Python did with it
        dependent = any(isinstance(n, torch.fx.Node) and n.meta.get("dependent")
                        for n in tree_flatten((node_args, node_kwargs))[0])
        tags = func.tags
        if torch.Tag.nondeterministic_seeded in tags:
            raise NotRecordable(f"{func} draws random numbers")
        if dependent and torch.Tag.data_dependent_output in tags:
            raise NotRecordable(f"{func} reads a value of a tensor into Python")
        if dependent and torch.Tag.dynamic_output_shape in tags and not (
                func is torch.ops.aten.index.Tensor
                and all(i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in args[1])):
            raise NotRecordable(f"{func} has an output shape that depends on values")
        out = func(*args, **kwargs)
        node = self.graph.call_function(func, node_args, node_kwargs)
        node.meta["dependent"] = dependent
        used = {_address(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and a.numel()}
        if isinstance(out, torch.Tensor):
            self.track(out, node, fresh=_address(out) not in used)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["dependent"] = dependent
                    self.track(o, item, fresh=_address(o) not in used)
                elif o is not None and dependent:
                    raise NotRecordable(f"{func} returns a Python value")
        elif out is not None and dependent:
            raise NotRecordable(f"{func} returns a Python value ({type(out).__name__})")
        return out


def record(fn: Callable, inputs: tuple) -> torch.fx.GraphModule:
    """The graph of the aten operations of ``fn(*inputs)``, run once eagerly.

    Args:
        fn: a function of tensors returning a tensor or a tuple of tensors; it may run autograd inside.
        inputs: its tensor arguments (the graph's placeholders, in order).

    Returns:
        A :class:`torch.fx.GraphModule` computing ``fn``'s outputs (a tuple) from the inputs, with no
        autograd (gradients that ``fn`` took are explicit operations); a node's ``meta["val"]`` holds
        its value's shape, strides and dtype as a meta tensor, ``meta["device"]`` its device.

    Raises:
        NotRecordable: see the module docstring.
    """
    module = torch.nn.Module()
    graph = torch.fx.Graph()
    recorder = _Recorder(graph, module)
    for i, t in enumerate(inputs):
        node = graph.placeholder(f"input{i}")
        node.meta["dependent"] = True
        recorder.track(t, node)
    with recorder:
        out = fn(*inputs)
    leaves, _ = tree_flatten(out)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise NotRecordable("the function returns something other than tensors")
    graph.output(tuple(recorder.node_of(t, "the output") for t in leaves))
    return torch.fx.GraphModule(module, graph)
