"""Checkpoint files of long runs: path checks, fingerprints, a lock, atomic writes.

A run that saves progress to a file must (1) fail at once if the file cannot be
written, not after an hour of work (:func:`check_output_path`); (2) never resume a
file written under other settings, another model or another proposal
(:func:`fingerprint` covers them all); (3) never let two processes write one file
(:class:`Checkpoint` holds an exclusive ``flock`` on ``FILE.lock`` while it runs, and
a second writer gets a clear refusal); (4) never leave a half-written file: each save
writes a temporary file named after the process and renames it over the old one.
"""

from __future__ import annotations

import hashlib
import inspect
import os

import torch

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


class Checkpoint:
    """An exclusively held checkpoint file of one run.

    Args:
        path: the file. Its directory must exist and be writable.
        fingerprint: identifies the run; a file with another fingerprint is refused.

    Raises:
        ValueError: the path cannot be written, another process holds the file, the file
            is unreadable or was written by a different run.

    ``payload`` is the saved dict (None for a fresh run); :meth:`save` writes a new one;
    :meth:`finish` removes the file at the end of the run; :meth:`release` drops the lock.
    """

    def __init__(self, path, fingerprint: str):
        self.path = os.fspath(path)
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
        self.payload = None
        if os.path.exists(self.path):
            try:
                data = torch.load(self.path, weights_only=False)
            except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
                self.release()
                raise ValueError(f"checkpoint {self.path!r} cannot be read: {e}") from e
            if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
                self.release()
                raise ValueError(
                    f"checkpoint {self.path!r} was written by a different run (the model, guide, proposal, "
                    "method, settings or seed differ); delete it or give another checkpoint file"
                )
            self.payload = data["payload"]

    def save(self, payload: dict) -> None:
        """Writes ``payload`` atomically (a per-process temporary file renamed over the old one)."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        torch.save({"fingerprint": self.fingerprint, "payload": payload}, tmp)
        os.replace(tmp, self.path)

    def finish(self) -> None:
        """Removes the file (the run is complete) and releases the lock."""
        if os.path.exists(self.path):
            os.remove(self.path)
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

    def finish(self) -> None:
        pass

    def release(self, remove_lock: bool = False) -> None:
        self.checkpoint.release(remove_lock)
