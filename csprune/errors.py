"""Exceptions raised by csprune."""

from __future__ import annotations

__all__ = ["CsPruneError", "CheckpointError"]


class CsPruneError(Exception):
    """Base class of every error csprune raises on purpose."""


class CheckpointError(CsPruneError):
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
