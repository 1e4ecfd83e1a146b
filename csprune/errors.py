"""Exceptions raised by csprune."""

from __future__ import annotations

__all__ = ["CsPruneError", "ConfigError", "CheckpointError", "CheckpointNotFound", "DataError", "DistributedError",
           "NumericalError", "WriteError"]


class CsPruneError(Exception):
    """Base class of every error csprune raises on purpose."""


class ConfigError(CsPruneError, ValueError):
    """A configuration value is out of range or names nothing known; the message names the key."""


class NumericalError(CsPruneError, FloatingPointError):
    """A weight or a statistic holds NaN/Inf; the message names the tensor. Nothing was changed."""


class DistributedError(CsPruneError, RuntimeError):
    """DDP ranks disagree on something that must be identical (masks, final weights); names what differs."""


class DataError(CsPruneError, ValueError):
    """Input data is missing or malformed (a corpus, an audio file); the message names the path."""


class CheckpointError(CsPruneError, ValueError):
    """A sparse checkpoint is unreadable, corrupt, or does not match what it is loaded into.

    The message always names the file and, where one is involved, the tensor.

    Attributes:
        path: The file the error is about ("" when there is none).
        tensor: The tensor the error is about, or None for file-level problems.
    """

    def __init__(self, path: object, message: str, tensor: str | None = None) -> None:
        self.path = str(path) if path is not None else ""
        self.tensor = tensor
        where = f"{self.path}" + (f", tensor {tensor!r}" if tensor is not None else "")
        super().__init__(f"{where}: {message}" if where else message)


class WriteError(CsPruneError, OSError):
    """A file could not be written (full disk, file-size limit, permissions); the previous file is intact.

    Raised by the atomic writers (training checkpoints, exports, metrics): nothing was renamed over
    the destination and the temporary file was removed.

    Attributes:
        path: The destination that was not written.
        errno: The operating system's error number when there was one (e.g. ENOSPC, EFBIG), else None.
    """

    def __init__(self, path: object, message: str, errno: int | None = None) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.errno = errno


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A resume was asked for (``trainer.resume=true``) but the folder holds no readable checkpoint."""
