"""Output files of long runs: path checks before work starts (more in this module later)."""

from __future__ import annotations

import os


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
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{what} {path!r}: directory {folder!r} is not writable")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path!r} exists and is not writable")
