"""Checkpoint files of long runs: path checks, fingerprints, a lock, atomic writes, a safe format.

A run that saves progress to a file must (1) fail at once if the file cannot be
written, not after an hour of work (:func:`check_output_path`); (2) never resume a
file written under other settings, another model or another proposal
(:func:`fingerprint` covers them all); (3) never let two processes write one file
(:class:`Checkpoint` holds an exclusive ``flock`` on ``FILE.lock`` while it runs, and
a second writer gets a clear refusal); (4) never leave a half-written file: each save
writes a fresh temporary file (created exclusively, ``mkstemp``, beside the target) and
renames it over the old one; (5) never run code from a file: nothing is unpickled.

**The format** (:func:`write_file`, :func:`read_file`): a magic line, a JSON header line
(fingerprint, world size, SHA-256 and length of the payload), then the payload: the
tensors, saved by ``torch.save`` and read back with ``weights_only=True`` (torch's
restricted loader, which builds tensors and plain containers only), beside a JSON tree of
the rest. pyro_mi's own state types (:data:`STATE_TYPES`) are rebuilt by name from that
tree; any other type is refused when saving. The header is read and its fingerprint checked
before the payload is read, and the payload's checksum before it is loaded, so a file of
another run, a truncated or a corrupted one is refused by name.

Under ``torch.distributed`` (:mod:`pyro_mi.distributed`) rank r writes its own file,
``FILE`` for rank 0 and ``FILE.rank<r>`` for the others, and reads the rank files the writing
run's world could have written (ranks below the world size in ``FILE``'s header, or below
this run's) when it starts: a run resumes with any number of processes. Parts of a payload
whose name holds ``"block:"`` are blocks of points; of several copies the one with the most
``"progress"`` is kept. Every rank carries all it read into its own saves, so no finished
block is lost.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import tempfile

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


def rank_files(path: str, world_size: int | None = None) -> list[str]:
    """The existing checkpoint files of the ranks of ``path``, rank 0's first: every rank's, or
    with ``world_size`` those of ranks below it."""
    others = [f for f in glob.glob(glob.escape(path) + ".rank*") if re.fullmatch(r"\.rank\d+", f[len(path):])]
    if world_size is not None:
        others = [f for f in others if int(f.rsplit("rank", 1)[1]) < world_size]
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


#: the first line of every checkpoint file (the format's version is its last word)
MAGIC = b"pyro_mi checkpoint 2\n"
#: the longest header line read before the fingerprint is checked
_HEADER_BYTES = 4096
#: pyro_mi's own state types a checkpoint may hold, rebuilt by name ("module:qualname")
STATE_TYPES = (
    "pyro_mi.samplers.ais:AISState",
    "pyro_mi.samplers.hmc:HMCState",
    "pyro_mi.training:TrainingLog",
    "pyro_mi.samplers.step_size:OnlineAdapter",
)


def _state_type(name: str) -> type:
    """The class of an allowed state type name; ValueError for any other name."""
    if name not in STATE_TYPES:
        raise ValueError(f"type {name!r} is not a pyro_mi state type")
    module, qualname = name.split(":")
    return getattr(importlib.import_module(module), qualname)


def _state_name(obj) -> str | None:
    cls = type(obj)
    name = f"{cls.__module__}:{cls.__qualname__}"
    return name if name in STATE_TYPES else None


def _encode(obj, tensors: list):
    """``obj`` as a JSON tree, its tensors appended to ``tensors`` (referenced by index).

    Raises:
        TypeError: a type that is neither a plain container, a number, a string, a tensor
            nor one of :data:`STATE_TYPES`.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else {"$float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach())
        return {"$tensor": len(tensors) - 1}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    name = _state_name(obj)
    if name is not None:
        if isinstance(obj, tuple):  # a NamedTuple
            return {"$state": name, "fields": [_encode(v, tensors) for v in obj]}
        return {"$state": name, "attrs": _encode(dict(vars(obj)), tensors)}
    if isinstance(obj, torch.Size):
        return {"$size": list(obj)}
    if type(obj) is tuple:
        return {"$tuple": [_encode(v, tensors) for v in obj]}
    if type(obj) in (dict, collections.OrderedDict):  # state_dicts are OrderedDicts
        kind = "$dict" if type(obj) is dict else "$odict"
        return {kind: [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a checkpoint cannot hold a {type(obj).__qualname__}")


def _decode(tree, tensors: list):
    """The inverse of :func:`_encode`: builds containers, tensors and :data:`STATE_TYPES` only."""
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "$tensor" in tree:
        return tensors[tree["$tensor"]]
    if "$float" in tree:
        return float(tree["$float"])
    if "$size" in tree:
        return torch.Size(tree["$size"])
    if "$tuple" in tree:
        return tuple(_decode(v, tensors) for v in tree["$tuple"])
    if "$dict" in tree or "$odict" in tree:
        items = ((_decode(k, tensors), _decode(v, tensors)) for k, v in tree.get("$dict", tree.get("$odict")))
        return dict(items) if "$dict" in tree else collections.OrderedDict(items)
    cls = _state_type(tree["$state"])
    if "fields" in tree:
        return cls(*(_decode(v, tensors) for v in tree["fields"]))
    obj = cls.__new__(cls)
    obj.__dict__.update(_decode(tree["attrs"], tensors))
    return obj


def write_file(path: str, fingerprint: str, payload, world_size: int = 1) -> None:
    """Writes ``payload`` to ``path`` in the checkpoint format (module docstring), atomically: a
    temporary file created exclusively beside ``path`` (``mkstemp``: a fresh name, never a
    planted file or link), written, flushed to disk and renamed over ``path``; on failure it
    is removed.

    Raises:
        TypeError: the payload holds a type that is not allowed (see :func:`_encode`).
        ValueError: the file cannot be written (e.g. the disk is full), naming it.
    """
    tensors: list = []
    tree = _encode(payload, tensors)
    buf = io.BytesIO()
    torch.save({"tree": json.dumps(tree), "tensors": tensors}, buf)
    body = buf.getvalue()
    header = {"fingerprint": fingerprint, "world_size": world_size, "size": len(body),
              "sha256": hashlib.sha256(body).hexdigest()}
    folder, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ValueError(f"checkpoint {path!r} cannot be saved: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + json.dumps(header).encode() + b"\n" + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise ValueError(f"checkpoint {path!r} cannot be saved: {e.strerror or e}") from None
        raise


def read_header(path: str) -> dict:
    """The header of a checkpoint file (fingerprint, world_size, size, sha256), read without
    its payload.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint of this format, or a damaged header, naming the file.
    """
    with open(path, "rb") as f:
        return _header(f, path)


def _header(f, path: str) -> dict:
    if f.readline(len(MAGIC)) != MAGIC:
        raise ValueError(f"checkpoint {path!r} is not a pyro_mi checkpoint (or one written by an older version); "
                         "delete it or give another checkpoint file")
    try:
        header = json.loads(f.readline(_HEADER_BYTES))
        if not (isinstance(header, dict) and isinstance(header.get("fingerprint"), str)
                and isinstance(header.get("size"), int) and isinstance(header.get("sha256"), str)):
            raise ValueError("missing fields")
    except ValueError:
        raise ValueError(f"checkpoint {path!r} is damaged (its header cannot be read); delete it to start "
                         "afresh") from None
    return header


def read_file(path: str, fingerprint: str):
    """The payload of a checkpoint file written by the run ``fingerprint`` identifies.

    Reads the header first and refuses a file of another run before reading anything else;
    then checks the payload's length and SHA-256 against the header before loading it with
    torch's restricted loader (``weights_only=True``) and rebuilding the allowed state types.
    Nothing in the file can run code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file: not a checkpoint, written by a different run, damaged
            (truncated or altered bytes), or unreadable.
    """
    with open(path, "rb") as f:
        header = _header(f, path)
        if header["fingerprint"] != fingerprint:
            raise ValueError(
                f"checkpoint {path!r} was written by a different run (the model, guide, proposal, "
                "method, settings or seed differ); delete it or give another checkpoint file"
            )
        body = f.read(header["size"] + 1)
    if len(body) != header["size"] or hashlib.sha256(body).hexdigest() != header["sha256"]:
        raise ValueError(f"checkpoint {path!r} is damaged (its payload does not match its checksum: truncated or "
                         "altered); delete it to start afresh")
    try:
        data = torch.load(io.BytesIO(body), weights_only=True)
        return _decode(json.loads(data["tree"]), data["tensors"])
    except Exception as e:  # noqa: BLE001 - a file that passed its checksum but does not load
        raise ValueError(f"checkpoint {path!r} cannot be read: {e}") from None


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
        # the rank files the writing run's world could have written: its size is in FILE's header
        self.world_read = world()[1]
        try:
            self.world_read = max(self.world_read, int(self._safely(read_header, self.base).get("world_size", 1)))
        except FileNotFoundError:
            pass
        files = rank_files(self.base, self.world_read)
        files.sort(key=lambda f: f != self.path)  # this rank's own file first
        self.payload = merge_payloads([self._read(f) for f in files])

    def _safely(self, fn, *args):
        """``fn(*args)``, releasing the lock if it raises anything but FileNotFoundError."""
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except BaseException:
            self.release()
            raise

    def _read(self, path: str):
        try:
            return self._safely(read_file, path, self.fingerprint)
        except FileNotFoundError:  # another rank finished and removed it meanwhile
            return None

    def save(self, payload: dict) -> None:
        """Writes ``payload`` atomically (:func:`write_file`)."""
        write_file(self.path, self.fingerprint, payload, world()[1])

    def finish(self) -> None:
        """Removes the file (the run is complete) and releases the lock; rank 0 also removes the files
        of ranks beyond this run's world size (left by an interrupted run with more processes)."""
        rank, size = world()
        stale = [f for f in rank_files(self.base, self.world_read)
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
