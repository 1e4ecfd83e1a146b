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
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..errors import CheckpointError, CheckpointNotFound, ConfigError, CsPruneError

__all__ = ["RESUME_FREE_TRAINER", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "check_compatible", "rng_state", "rng_state_full", "set_rng_state",
           "FORMAT", "FORMAT_VERSION", "CheckpointMismatch",
           "compat_record", "find_resume"]

log = logging.getLogger("csprune")

FORMAT_NAME = "csprune-train-ckpt"
FORMAT_VERSION = 1  # bump when the layout of a training checkpoint changes incompatibly
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
# trainer keys of both recipes that do not change the training trajectory: a checkpoint stays valid when they
# change (micro_batches: the shard count, DDP ranks x micro-batches, is checked instead; see compat_record).
RESUME_FREE_TRAINER = ("resume", "checkpoint_every", "keep_last", "threads", "device", "log_every", "micro_batches", "max_bad_steps")
_STEP_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
_TEMP_NAME = re.compile(r"^\..+\.tmp$")


class CheckpointMismatch(CsPruneError, ValueError):
    """A readable checkpoint that belongs to another model, config or format version (not skipped on resume)."""


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
    payload = dict(state, format=FORMAT)
    atomic_write(path, lambda f: torch.save(payload, f))
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
        raise CheckpointError(path, f"not a readable training checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        name, _, version = str(found).partition("/")
        if name == FORMAT_NAME and version.isdigit() and int(version) > FORMAT_VERSION:
            raise CheckpointMismatch(f"{path}: checkpoint format version {version} is newer than this csprune reads "
                                     f"({FORMAT_VERSION}); upgrade csprune to resume from it")
        raise CheckpointError(path, f"checkpoint format {found!r}, expected {FORMAT!r}")
    return state


def check_compatible(state: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """Refuse a checkpoint written for another model or config.

    Args:
        state: a loaded checkpoint.
        expected: ``{key: value}`` that must equal ``state["compat"][key]`` (e.g. the model config,
            the parameter shapes, the config keys that change the training trajectory).
        path: the file, for the message.

    Raises:
        CheckpointMismatch: naming the first differing key and both values (for dicts: the
            differing sub-keys).
    """
    saved = state.get("compat")
    if not isinstance(saved, dict):
        raise CheckpointMismatch(f"{path}: checkpoint has no compatibility record ('compat'); not written by this recipe")
    for key, want in expected.items():
        have = saved.get(key, "<missing>")
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            diffs = sorted(k for k in set(have) | set(want) if have.get(k, "<missing>") != want.get(k, "<missing>"))
            detail = ", ".join(f"{k}: checkpoint {have.get(k, '<missing>')!r} vs now {want.get(k, '<missing>')!r}"
                               for k in diffs[:5])
            raise CheckpointMismatch(f"{path}: checkpoint was written for another {key} ({detail}); "
                                     f"use a fresh output_dir or trainer.resume=false")
        raise CheckpointMismatch(f"{path}: checkpoint was written for another {key} (checkpoint {have!r} vs now {want!r}); "
                                 f"use a fresh output_dir or trainer.resume=false")


def _step_checkpoints(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.glob("ckpt-*.pt") if (m := _STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """Newest ``ckpt-<step>.pt`` in ``folder`` that loads; corrupt ones are skipped with a warning.

    Temporary files left by a write that was killed (``.ckpt-<step>.pt.*.tmp``) are never read;
    they are reported and removed. A checkpoint of a *newer format version* is not skipped: it
    raises :class:`CheckpointMismatch` (resuming from an older one would silently lose work).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for tmp in sorted(p for p in folder.iterdir() if _TEMP_NAME.match(p.name)):
        log.warning("csprune: removing %s, a checkpoint write that never finished", tmp)
        tmp.unlink(missing_ok=True)
    for path in reversed(_step_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointMismatch:
            raise
        except CheckpointError as exc:
            log.warning("csprune: skipping unreadable checkpoint %s", exc)
    return None


def rng_state() -> dict[str, Any]:
    """Torch CPU (and CUDA) RNG states, as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state_full() -> dict[str, Any]:
    """Torch (CPU, CUDA), Python ``random`` and NumPy RNG states, as tensors and primitives only.

    Python's state becomes a list of ints and NumPy's a uint32 tensor, so a checkpoint holding them
    still loads with ``weights_only=True``.
    """
    import random

    import numpy as np

    state = rng_state()
    version, internal, gauss = random.getstate()
    state["python"] = {"version": version, "internal": list(internal), "gauss": gauss}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` or :func:`rng_state_full` saved."""
    if "python" in state:
        import random

        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def compat_record(config: dict[str, Any], model: torch.nn.Module, model_cfg: dict,
                  resume_free: dict[str, tuple[str, ...]], shards: int = 1) -> dict[str, Any]:
    """What a training checkpoint must match to be resumed: model config, parameter shapes, config.

    Args:
        config: the resolved run config (nested dict); its "model" group is taken from ``model_cfg``.
        model: the model (its state_dict shapes are recorded).
        model_cfg: the model's config.
        resume_free: per group ("" = top level), keys that do not change the training trajectory.
        shards: shards of each global batch (DDP ranks × ``trainer.micro_batches``): a resume may change
            how they are spread over processes, not how many there are.
    """
    top_free = set(resume_free.get("", ()))
    kept = {k: v for k, v in config.items() if k not in top_free and k != "model"}
    flat: dict[str, Any] = {}
    for group, value in kept.items():
        if isinstance(value, dict):
            free = set(resume_free.get(group, ()))
            flat.update({f"{group}.{k}": v for k, v in value.items() if k not in free})
        else:
            flat[group] = value
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    return {"model": dict(model_cfg), "parameters": shapes, "config": flat,
            "shards of each global batch (DDP ranks x trainer.micro_batches)": shards}


def find_resume(mode: Any, folder: str | os.PathLike) -> tuple[Path, dict] | None:
    """The checkpoint to resume from for ``trainer.resume`` = false | true | auto."""
    mode = str(mode).lower()
    if mode in ("false", "none", "0"):
        return None
    if mode not in ("true", "auto", "1"):
        raise ConfigError(f"trainer.resume={mode!r}: expected false, true or auto")
    found = latest_checkpoint(folder)
    if found is None and mode != "auto":
        raise CheckpointNotFound(folder, "trainer.resume=true: no readable checkpoint here (use trainer.resume=auto "
                                         "to start fresh when there is none)")
    return found
