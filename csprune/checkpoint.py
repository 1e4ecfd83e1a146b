"""Training checkpoints: atomic writes, ``weights_only`` loads, newest-valid discovery.

A training checkpoint is a plain dict of tensors and primitives (model, optimizer,
pruner, schedule position, RNG states, config) saved with ``torch.save`` and read
back with ``torch.load(weights_only=True)``, so nothing arbitrary is ever unpickled.
Writes go to a temporary file that is fsync'ed and renamed over the target, so a
kill mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state", "FORMAT"]

log = logging.getLogger("csprune")

FORMAT = "csprune-train-ckpt/1"
_STEP_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike, keep_last: int | None = None) -> Path:
    """Write ``state`` atomically (temp file, fsync, rename).

    Args:
        state: tensors, primitives and containers of them only.
        path: destination file.
        keep_last: when set, delete all but the newest ``keep_last`` ``ckpt-<step>.pt`` files beside it.

    Returns:
        the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(state, format=FORMAT)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if keep_last:
        for old in _step_checkpoints(path.parent)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True``.

    Raises:
        ValueError: the file is unreadable, holds non-tensor objects, or is not a csprune
            training checkpoint of a known format (the message names the file).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupt, or pickled objects refused by weights_only
        raise ValueError(f"{path}: not a readable training checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: checkpoint format {found!r}, expected {FORMAT!r}")
    return state


def _step_checkpoints(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.glob("ckpt-*.pt") if (m := _STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """Newest ``ckpt-<step>.pt`` in ``folder`` that loads; corrupt ones are skipped with a warning."""
    for path in reversed(_step_checkpoints(Path(folder))):
        try:
            return path, load_checkpoint(path)
        except ValueError as exc:
            log.warning("csprune: skipping unreadable checkpoint %s", exc)
    return None


def rng_state() -> dict[str, Any]:
    """Torch CPU (and CUDA) RNG states, as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
