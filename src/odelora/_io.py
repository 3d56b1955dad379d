"""Small file helpers."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it, so briefly and under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The file gets the mode an ordinary ``open(path, "w")`` would give: an existing file's, else
    0666 minus the umask (``mkstemp`` alone would leave it at 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DamagedFile(Exception):
    """A cached file that cannot be read; the message says which and what to do. (Not a
    SystemExit: raised in a pool's worker, that would end the worker and leave the pool waiting.)"""


def load_cached(path: Path, load=None):
    """``load(path)`` (default ``torch.load(path, weights_only=True)``) of a file the lab cached; a
    damaged one (a disk that filled up, a copy cut short) raises :class:`DamagedFile`, which the
    lab's runner reports in one line."""
    import pickle
    import zipfile

    import torch

    try:
        return load(path) if load is not None else torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DamagedFile(f"{path} is damaged ({type(exc).__name__}); delete it and run again: it is made anew") from None
