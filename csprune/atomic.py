"""Atomic file writes for everything csprune writes (exports, training checkpoints, metrics).

A write goes to a temporary file beside the destination, is fsync'ed and renamed over it, and the
folder is fsync'ed: a crash or kill leaves the old file or the new one, never half a file.
"""

from __future__ import annotations

import errno as errno_
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from .errors import WriteError

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Create or replace ``path`` atomically: ``write(f)`` fills a temp file beside it, which is fsync'ed
    and renamed over ``path`` (then the folder is fsync'ed). A crash leaves the old file or the new one,
    never half a file; on an exception the temp file is removed. A failed write (full disk, ``ulimit -f``,
    an I/O error) raises :class:`csprune.errors.WriteError` naming ``path``; other exceptions propagate."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(exc)
        if cause is not None:
            existed = "the previous file is intact" if path.exists() else "no file was created"
            raise WriteError(path, f"could not be written ({os.strerror(cause.errno) if cause.errno else cause}); "
                                   f"{existed}", errno=cause.errno) from exc
        raise
    return path


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write: itself, its cause, or the one torch.save's C++ writer reports as RuntimeError."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("write" in text.lower() or "No space" in text or "File too large" in text):
            code = errno_.ENOSPC if "No space" in text else errno_.EFBIG if "File too large" in text else None
            return OSError(code, text.splitlines()[0][:200])
        exc = exc.__cause__ or exc.__context__
    return None
