"""Stages and helpers both recipes' ``run(cfg)`` share: seeding, calibration, metrics files, the launch."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..pruner import Pruner

__all__ = ["calibrate", "seed_everything", "write_json", "launch"]


def calibrate(pruner: Pruner, model: torch.nn.Module, batches, forward: Callable[[Any], Any], mode: str = "eval") -> int:
    """Observe calibration batches for a one-shot pruning step (both recipes).

    Args:
        pruner: its statistics hooks are switched on for these forwards only.
        model: the model (its train/eval mode is set here and left in eval mode).
        batches: iterable of batches ``forward`` takes.
        forward: ``forward(batch)`` runs the model on one batch (no gradient is taken).
        mode: "eval": ``model.eval()`` (what inference sees); "train": dropout on as in fine-tuning,
            BatchNorm frozen at its running statistics (so the layer inputs are those of the model
            being fine-tuned, not of a batch-statistics variant).

    Returns:
        the number of batches observed.
    """
    if pruner.stats is None:
        return 0
    model.train(mode == "train")
    if mode == "train":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    pruner.stats.enabled = True
    count = 0
    with torch.no_grad():
        for batch in batches:
            forward(batch)
            count += 1
    pruner.stats.enabled = False
    model.eval()
    return count


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    from ..atomic import atomic_write

    text = json.dumps(data, indent=2, sort_keys=True, default=float) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def launch(run: Callable[[Any], Mapping[str, Any]], cfg: Any) -> Mapping[str, Any]:
    """The body of a recipe's ``@hydra.main``: ``run(cfg)``, then leave the process group.

    Every rank waits for rank 0's evaluation and export before exiting. A run preempted by SIGTERM
    (its checkpoint written) exits with status 143, as a terminated process would, so a scheduler
    requeues it and ``trainer.resume=auto`` continues.
    """
    from .ddp import shutdown_distributed
    from .faults import PREEMPTED_EXIT_CODE, Preempted

    try:
        metrics = run(cfg)
    except Preempted as exc:
        print(f"preempted: {exc}", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    shutdown_distributed()
    return metrics
