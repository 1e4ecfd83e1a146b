"""TensorBoard logging shared by the recipes (docs/design.md lists the tags).

Tags written here (a test reads them back):

* ``sparsity/scheduled``, ``sparsity/total``, ``sparsity/<fqn>``
* ``prune/seconds``, ``prune/rel_error``, ``prune/solver_iters``, ``prune/solver_gap``,
  ``prune/solver_seconds`` (means over tensors) and ``prune_tensor/<fqn>/rel_error``
* histograms ``weights/<fqn>`` and images ``masks/<fqn>`` at pruning steps
* ``config`` (text) and an HParams session with the final metrics
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotation only: tblog is imported lazily by the loop
    from ..pruner import Pruner

import json
from typing import Any

import torch

__all__ = ["log_pruning", "log_sparsity", "log_config", "log_hparams", "flatten_config"]

MAX_IMAGES = 16  # mask images are the largest events: cap them per pruning step


def log_sparsity(writer: Any, pruner: Pruner, step: int) -> None:
    """Scheduled vs actual sparsity, total and per tensor."""
    writer.add_scalar("sparsity/scheduled", pruner.schedule.sparsity_at(pruner.step_count), step)
    for name, value in pruner.sparsity().items():
        writer.add_scalar("sparsity/total" if name == "total" else f"sparsity/{name}", value, step)


@torch.no_grad()
def log_pruning(writer: Any, pruner: Pruner, report: dict, step: int) -> None:
    """Everything about one pruning event: solver statistics, histograms, mask images."""
    writer.add_scalar("prune/seconds", report["seconds"], step)
    writer.add_scalar("prune/stats_bytes", report.get("stats_bytes", 0), step)
    tensors = report["tensors"]
    for key in ("rel_error", "solver_iters", "solver_gap", "solver_seconds"):
        values = [info[key] for info in tensors.values() if key in info]
        if values:
            writer.add_scalar(f"prune/{key}", sum(values) / len(values), step)
    for fqn, info in tensors.items():
        if "rel_error" in info:
            writer.add_scalar(f"prune_tensor/{fqn}/rel_error", info["rel_error"], step)
    for i, t in enumerate(pruner.targets):
        w = t.weight.detach()
        writer.add_histogram(f"weights/{t.fqn}", w[w != 0].float().cpu() if (w != 0).any() else w.float().cpu(), step)
        if i < MAX_IMAGES:
            rows = t.rows(w != 0).float().cpu()
            writer.add_image(f"masks/{t.fqn}", rows.unsqueeze(0), step, dataformats="CHW")
    log_sparsity(writer, pruner, step)


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": scalar}; lists and None become strings (HParams takes scalars only)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def log_config(writer: Any, cfg: dict) -> None:
    """The resolved config as a text panel (JSON, in a code block)."""
    writer.add_text("config", "```\n" + json.dumps(cfg, indent=2, default=str) + "\n```", 0)


def log_hparams(writer: Any, cfg: dict, metrics: dict[str, float]) -> None:
    """An HParams session: the flattened config and the final metrics (sweeps compare there)."""
    scalars = {f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    writer.add_hparams(flatten_config(cfg), scalars, run_name=".")
