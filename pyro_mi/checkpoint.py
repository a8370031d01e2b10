"""Checkpoint files of long runs: path checks, fingerprints, a lock, atomic writes.

A run that saves progress to a file must (1) fail at once if the file cannot be
written, not after an hour of work (:func:`check_output_path`); (2) never resume a
file written under other settings, another model or another proposal
(:func:`fingerprint` covers them all); (3) never let two processes write one file
(:class:`Checkpoint` holds an exclusive ``flock`` on ``FILE.lock`` while it runs, and
a second writer gets a clear refusal); (4) never leave a half-written file: each save
writes a temporary file named after the process and renames it over the old one.

Under ``torch.distributed`` (:mod:`pyro_mi.distributed`) rank r writes its own file,
``FILE`` for rank 0 and ``FILE.rank<r>`` for the others, and reads every rank's file when it
starts: a run resumes with any number of processes. Parts of a payload whose name holds
``"block:"`` are blocks of points; of several copies the one with the most ``"progress"``
is kept. Every rank carries all it read into its own saves, so no finished block is lost.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import inspect
import os
import re

import torch

from .distributed import world

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the refusal below cannot happen
    fcntl = None


def check_output_path(path, what: str) -> None:
    """Raises ValueError unless ``path`` can be written: its directory exists and is writable,
    and ``path`` itself is not a directory. Called before any work starts, so that a bad
    ``--checkpoint`` or ``--save-chains`` fails at once, not after the run.

    Args:
        path: the file to be written (str or os.PathLike).
        what: how the message names it, e.g. ``"--checkpoint"``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path!r}: directory {folder!r} does not exist")
    existed = os.path.exists(path)
    try:  # open it, as os.access says yes to root even where a write will fail (e.g. /proc)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{what} {path!r} cannot be written: {e.strerror}") from None
    if not existed:
        with contextlib.suppress(FileNotFoundError):  # another process probing the same path removed it
            os.remove(path)


def _update(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(repr((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _update(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _update(h, v)
    elif callable(obj) and not isinstance(obj, torch.nn.Module):
        h.update(source_of(obj).encode())
    elif isinstance(obj, torch.nn.Module):
        h.update(type(obj).__qualname__.encode())
        _update(h, obj.state_dict())
    else:
        h.update(repr(obj).encode())


def source_of(fn) -> str:
    """The full text of the file that defines ``fn`` (its function source, or its repr, where
    there is no file): a checkpoint of a model is void once its file changes."""
    try:
        with open(inspect.getsourcefile(fn)) as f:
            return f.read()
    except (TypeError, OSError):
        try:
            return inspect.getsource(fn)
        except (TypeError, OSError):
            return repr(fn)


def fingerprint(*parts) -> str:
    """A SHA-1 over nested settings, tensors (their values), modules (their parameters) and
    functions (the source file that defines them)."""
    h = hashlib.sha1()
    _update(h, parts)
    return h.hexdigest()


def rank_path(path: str, rank: int) -> str:
    """The checkpoint file of ``rank``: ``path`` for rank 0, ``path.rank<r>`` for the others."""
    return path if rank == 0 else f"{path}.rank{rank}"


def rank_files(path: str) -> list[str]:
    """The existing checkpoint files of every rank of ``path``, rank 0's first."""
    others = [f for f in glob.glob(glob.escape(path) + ".rank*") if re.fullmatch(r"\.rank\d+", f[len(path):])]
    return [f for f in [path] if os.path.exists(f)] + sorted(others, key=lambda f: int(f.rsplit("rank", 1)[1]))


def merge_payloads(parts: list) -> dict | None:
    """One payload from the payloads of several ranks' files (the caller's own first): a block part
    (name holding ``"block:"``) from the copy with the greatest ``progress``, any other part from
    the first file that has it."""
    parts = [p for p in parts if isinstance(p, dict)]
    if not parts:
        return None
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            if k not in out or ("block:" in str(k) and _progress(v) > _progress(out[k])):
                out[k] = v
    return out


def _progress(part) -> tuple:
    return tuple(part.get("progress", ())) if isinstance(part, dict) else ()


class Checkpoint:
    """An exclusively held checkpoint file of one run.

    Args:
        path: the file (rank 0's; rank r > 0 writes ``path.rank<r>``). Its directory must
            exist and be writable.
        fingerprint: identifies the run; a file with another fingerprint is refused.

    Raises:
        ValueError: the path cannot be written, another process holds the file, the file
            is unreadable or was written by a different run.

    ``payload`` is the saved dict (None for a fresh run); :meth:`save` writes a new one;
    :meth:`finish` removes the file at the end of the run; :meth:`release` drops the lock.
    """

    def __init__(self, path, fingerprint: str):
        self.base = os.fspath(path)
        self.path = rank_path(self.base, world()[0])
        check_output_path(self.path, "checkpoint")
        self.fingerprint = fingerprint
        self._lock = open(self.path + ".lock", "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise ValueError(
                    f"checkpoint {self.path!r} is in use by another running process; wait for it to finish "
                    "or give this run another checkpoint file"
                ) from None
        files = rank_files(self.base)
        files.sort(key=lambda f: f != self.path)  # this rank's own file first
        self.payload = merge_payloads([self._read(f) for f in files])

    def _read(self, path: str):
        try:
            data = torch.load(path, weights_only=False)
        except FileNotFoundError:  # another rank finished and removed it meanwhile
            return None
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            self.release()
            raise ValueError(f"checkpoint {path!r} cannot be read: {e}") from e
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            self.release()
            raise ValueError(
                f"checkpoint {path!r} was written by a different run (the model, guide, proposal, "
                "method, settings or seed differ); delete it or give another checkpoint file"
            )
        return data["payload"]

    def save(self, payload: dict) -> None:
        """Writes ``payload`` atomically (a per-process temporary file renamed over the old one)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        torch.save({"fingerprint": self.fingerprint, "payload": payload}, tmp)
        os.replace(tmp, self.path)

    def finish(self) -> None:
        """Removes the file (the run is complete) and releases the lock; rank 0 also removes the files
        of ranks beyond this run's world size (left by an interrupted run with more processes)."""
        rank, size = world()
        stale = [f for f in rank_files(self.base)
                 if rank == 0 and f != self.base and int(f.rsplit("rank", 1)[1]) >= size]
        for f in [self.path] + stale:
            if os.path.exists(f):
                os.remove(f)
            if f != self.path and os.path.exists(f + ".lock"):
                os.remove(f + ".lock")
        self.release(remove_lock=True)

    def release(self, remove_lock: bool = False) -> None:
        """Drops the lock (and removes the lock file when the run is complete)."""
        if self._lock is not None and not self._lock.closed:
            if remove_lock and os.path.exists(self._lock.name):
                os.remove(self._lock.name)
            self._lock.close()

    def section(self, name: str) -> "CheckpointSection":
        """The part ``name`` of this file's payload, for one phase of a run of several phases."""
        return CheckpointSection(self, name)


@contextlib.contextmanager
def finishing(checkpoint: "Checkpoint | None"):
    """Runs the block with ``checkpoint`` held: released (kept on disk, for a resume) if the
    block raises, finished (removed) if it completes. None: nothing to do."""
    try:
        yield checkpoint
    except BaseException:
        if checkpoint is not None:
            checkpoint.release()
        raise
    if checkpoint is not None:
        checkpoint.finish()


class CheckpointSection:
    """One phase's part of a :class:`Checkpoint` (e.g. MINE-AIS's training, then its AIS
    evaluation), with the same ``payload`` / ``save`` / ``finish`` / ``release`` interface.

    ``save`` rewrites the whole file with this part replaced; ``finish`` does nothing
    (the run's owner finishes the file after its last phase); ``release`` drops the lock.
    """

    def __init__(self, checkpoint: Checkpoint, name: str):
        self.checkpoint, self.name = checkpoint, name

    @property
    def payload(self):
        return (self.checkpoint.payload or {}).get(self.name)

    def save(self, payload: dict) -> None:
        whole = dict(self.checkpoint.payload or {})
        whole[self.name] = payload
        self.checkpoint.payload = whole
        self.checkpoint.save(whole)

    def section(self, name: str) -> "CheckpointSection":
        """A part of this part, stored as the file's part ``"<this name>/<name>"``."""
        return CheckpointSection(self.checkpoint, f"{self.name}/{name}")

    def finish(self) -> None:
        pass

    def release(self, remove_lock: bool = False) -> None:
        self.checkpoint.release(remove_lock)
