"""Running out of memory, said in one line: what was asked and what to lower."""

from __future__ import annotations

import contextlib
import re

import torch

_CPU = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA = re.compile(r"Tried to allocate ([\d.]+ [KMGT]i?B)")


class OutOfMemory(MemoryError):
    """A run asked for more memory than the machine has: the message names the size of the
    run, the allocation that failed and the settings that lower it."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch's (or Python's) out-of-memory error, on CPU or CUDA."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _asked(e: BaseException) -> str:
    text = str(e)
    m = _CPU.search(text)
    if m:
        return f"{int(m.group(1)) / 2**30:.3g} GiB"
    m = _CUDA.search(text)
    return m.group(1) if m else "more than is free"


@contextlib.contextmanager
def memory_guard(what: str, lower: str):
    """Re-raises an out-of-memory error inside the block as :class:`OutOfMemory` whose one line
    says ``what`` ran (e.g. "N = 100000000 simulated points"), the allocation that failed, and
    ``lower`` (the settings to lower)."""
    try:
        yield
    except OutOfMemory:
        raise
    except BaseException as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(f"out of memory: {what} asked for {_asked(e)} in one allocation; lower {lower}") from None
