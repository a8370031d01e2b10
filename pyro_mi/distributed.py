"""Scale-out on ``torch.distributed``: the N simulated points of a bound, split across processes.

The unit of work is a **block** of ``points_per_block`` consecutive data points
(:func:`block_spans`); the blocks do not depend on the number of processes. Every random
number of a block (its proposal draws, its chains' momenta and accept decisions, its
pilot) comes from generators seeded from (run seed, block index) (:func:`block_seed`), so
a block gives the same bits whichever process runs it, alone or beside others: one
process and P processes give the same per-point values, bit for bit on CPU with the same
thread count (``torchrun`` sets ``OMP_NUM_THREADS=1``). Seeding per block rather than per
point keeps a block one vectorised tensor program, and lets proposals that draw through
Pyro's global RNG (any user guide) stay reproducible.

Rank r runs the blocks b with b mod P = r (:func:`map_blocks`); their outputs are gathered
on every rank, so that the estimators, warnings and diagnostics that follow run on all N
points unchanged, and rank 0 prints. The simulation and the proposal fit run in every
process from the same seed and rank 0's copy is broadcast (:func:`broadcast`), so every
rank bounds the same points with the same proposal.

``torchrun`` sets the environment that :func:`init` reads: gloo on CPU, NCCL on CUDA with one
GPU per rank (``LOCAL_RANK``). A rank that dies makes the others' next collective fail
within ``timeout`` seconds with a :class:`DistributedError` instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

#: default block size (the AIS family; the least for BA and IWAE): N <= 1024 is one vectorised block
POINTS_PER_BLOCK = 1024
#: default seconds a collective waits for the other ranks before the run fails
TIMEOUT = 1800.0


class DistributedError(RuntimeError):
    """A collective failed or timed out: another process died or is stuck."""


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(timeout: float | None = None) -> bool:
    """Joins the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    gloo on CPU; NCCL on CUDA, with this process on GPU ``LOCAL_RANK``. Does nothing (and
    returns False) in a single process or when a group is already initialised.

    Args:
        timeout: seconds a collective waits before failing (default :data:`TIMEOUT`); it must
            cover the time between ranks finishing their blocks.

    Returns:
        True when this call joined a group of several processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    wait = datetime.timedelta(seconds=TIMEOUT if timeout is None else float(timeout))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=wait)
    else:
        dist.init_process_group("gloo", timeout=wait)
    return True


def leave() -> None:
    """Leaves the process group :func:`init` joined (nothing otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_points_per_block(points_per_block) -> int:
    """Returns ``points_per_block`` or raises ValueError unless it is a positive integer."""
    if isinstance(points_per_block, bool) or not isinstance(points_per_block, int) or points_per_block < 1:
        raise ValueError(f"points_per_block must be a positive integer, got {points_per_block!r}")
    return points_per_block


def block_spans(num_points: int, points_per_block: int) -> list[tuple[int, int]]:
    """The blocks ``[(lo, hi), ...]`` of ``num_points`` points, ``points_per_block`` each (the last may be short)."""
    return [(lo, min(lo + points_per_block, num_points)) for lo in range(0, num_points, points_per_block)]


def block_seed(seed: int, *parts) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (a block index, a job name, ...) by SHA-1."""
    return int.from_bytes(hashlib.sha1(repr((seed,) + parts).encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """Seeds torch's global RNG inside a fork (the caller's state is restored), for code that draws
    through it (Pyro models and guides)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        manual_seed(seed)
        yield


def manual_seed(seed: int) -> None:
    """Seeds torch's CPU and CUDA generators, as ``torch.manual_seed`` does for the backends
    pyro_mi runs on. torch's own also queues lazy seeds for XPU and MTIA, each recording a
    traceback that grows with the stack, a cost paid once per block."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _collective(what: str, fn: Callable):
    try:
        return fn()
    except RuntimeError as e:
        rank, size = world()
        raise DistributedError(
            f"rank {rank} of {size}: {what} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
            "another process died or timed out; rerun the same command (with the same --checkpoint, any number "
            "of processes) to resume the finished work"
        ) from None


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to(v, device) for v in obj)
    if hasattr(obj, "_fields"):  # NamedTuple states
        return type(obj)(*(_to(v, device) for v in obj))
    return obj


def map_blocks(fn: Callable[[int, int, int], Any], num_points: int, points_per_block: int, *,
               device: torch.device, gather: bool = True) -> list:
    """Runs ``fn(block, lo, hi)`` for this rank's blocks of ``num_points`` points and returns every
    block's output in block order, on every rank.

    Args:
        fn: computes one block; its output (tensors, dicts, lists) is gathered through CPU.
        num_points, points_per_block: see :func:`block_spans`.
        device: where gathered tensors are put back.
        gather: False runs every block in this process (for work that every rank repeats,
            such as a validation inside replicated training).

    Raises:
        DistributedError: the gathering collective failed (another rank died or timed out).
    """
    spans = block_spans(num_points, points_per_block)
    rank, size = world() if gather else (0, 1)
    outs = {b: fn(b, lo, hi) for b, (lo, hi) in enumerate(spans) if b % size == rank}
    if size > 1:
        parts = [None] * size
        mine = _to(outs, torch.device("cpu"))
        _collective("gathering the blocks", lambda: dist.all_gather_object(parts, mine))
        outs = {b: _to(o, device) for part in parts for b, o in part.items()}
    return [outs[b] for b in range(len(spans))]


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (the object itself in a single process); tensors keep their device.

    Raises:
        DistributedError: the collective failed.
    """
    rank, size = world()
    if size == 1:
        return obj
    box = [_to(obj, torch.device("cpu")) if rank == 0 else None]
    _collective("broadcasting rank 0's data", lambda: dist.broadcast_object_list(box, src=0))
    return _to(box[0], _device_of(obj))


def _device_of(obj) -> torch.device:
    if isinstance(obj, torch.Tensor):
        return obj.device
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return next((d for d in map(_device_of, values) if d.type != "cpu"), torch.device("cpu"))


def broadcast_tensors(tensors) -> None:
    """Copies rank 0's values of ``tensors`` (a list, e.g. a module's parameters) into every rank's, in place."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if world()[1] == 1 or not tensors:
        return
    new = broadcast([t.detach() for t in tensors])
    with torch.no_grad():
        for t, v in zip(tensors, new):
            t.copy_(v)


def broadcast_module(module) -> None:
    """Copies rank 0's parameters and buffers of ``module`` (a ``torch.nn.Module``, or anything with
    ``parameters()``) to every rank."""
    if hasattr(module, "state_dict"):
        broadcast_tensors(list(module.state_dict().values()))
    elif hasattr(module, "parameters"):
        broadcast_tensors(list(module.parameters()))


__all__ = [
    "DistributedError", "POINTS_PER_BLOCK", "TIMEOUT", "block_seed", "block_spans", "broadcast",
    "broadcast_module", "broadcast_tensors", "check_points_per_block", "init", "leave", "map_blocks",
    "seeded_global_rng", "world",
]
