"""The stages both recipes' ``run(cfg)`` share: the start, one-shot pruning, the pruning record, the export
and metrics tail, and the launch; with the helpers they use (seeding, calibration, metrics files)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..errors import ConfigError
from ..pruner import Pruner

__all__ = ["calibrate", "seed_everything", "write_json", "launch", "RunContext", "start_run", "check_checkpointing", "training_saver", "saved_so_far", "prune_oneshot",
           "finish_pruning", "export_run"]


def calibrate(pruner: Pruner, model: torch.nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any], mode: str = "eval") -> int:
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


@dataclasses.dataclass
class RunContext:
    """What every stage of a recipe run shares (made by :func:`start_run`).

    Attributes:
        cfg: the recipe's config (a Hydra DictConfig or anything with the same attributes).
        config: the resolved config as plain containers (what checkpoints and TensorBoard record).
        prune: the ``prune`` group as a dict, or None for a dense run.
        run_dir: the run folder (rank 0 writes everything there).
        rank, world, device: this process's DDP rank, the number of ranks, its device.
        writer: rank 0's TensorBoard ``SummaryWriter``; None on other ranks.
        wall_start, started_at: ``time.perf_counter()`` and ``time.time()`` at the start.
    """

    cfg: Any
    config: dict
    prune: dict | None
    run_dir: Path
    rank: int
    world: int
    device: torch.device
    writer: Any
    wall_start: float
    started_at: float

    @property
    def main_rank(self) -> bool:
        return self.rank == 0


def start_run(cfg: Any, config: dict, run_dir: Path) -> RunContext:
    """The first stage of both recipes: validate the prune config (before any work), set threads, join
    the process group, make the run folder, seed, and open rank 0's TensorBoard writer with the config.

    Args:
        cfg: the recipe config (``trainer.threads``, ``trainer.device``, ``seed`` are read).
        config: the same, resolved to plain containers.
        run_dir: the run folder (the recipe resolves Hydra's; this package never imports Hydra).
    """
    from . import tblog
    from .config import validate_prune_config
    from .ddp import init_distributed

    prune = config.get("prune")
    if prune is not None:
        validate_prune_config(prune)
    wall_start, started_at = time.perf_counter(), time.time()
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    rank, world, device = init_distributed(cfg.trainer.device)
    writer = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir))
        tblog.log_config(writer, config)
    seed_everything(cfg.seed)
    return RunContext(cfg, config, prune, run_dir, rank, world, device, writer, wall_start, started_at)


def check_checkpointing(tc: Any) -> None:
    """Training-checkpoint settings a run cannot start with (``trainer.checkpoint_every``, ``trainer.keep_last``), named."""
    if tc.checkpoint_every < 0 or tc.keep_last < 1:
        raise ConfigError(f"trainer.checkpoint_every={tc.checkpoint_every} / trainer.keep_last={tc.keep_last}: "
                          f"need checkpoint_every >= 0 and keep_last >= 1")


def training_saver(ctx: RunContext, stage: str, model: torch.nn.Module, compat: dict,
                   extra: Mapping[str, Any]) -> Callable[[dict], None]:
    """``fit``'s save callback for one stage: the whole training state (rank 0 only).

    Writes ``run_dir/checkpoints/ckpt-<step>.pt`` every ``trainer.checkpoint_every`` steps, and always on
    SIGTERM, keeping the newest ``trainer.keep_last``.

    Args:
        stage: the stage name recorded (what a resume continues).
        model: the unwrapped module whose state_dict is saved.
        compat: :func:`csprune.train.checkpoint.compat_record` of the run (checked on resume).
        extra: more entries of the checkpoint; a callable value is called at save time (``optimizer.state_dict``).
    """
    from .checkpoint import save_checkpoint

    tc = ctx.cfg.trainer

    def save(progress: dict) -> None:
        if not ctx.main_rank or not (tc.checkpoint_every or progress.get("preempted")):  # SIGTERM always checkpoints
            return
        payload = {"stage": stage, "progress": progress, "model": model.state_dict(), "compat": compat}
        payload.update({k: (v() if callable(v) else v) for k, v in extra.items()})
        save_checkpoint(payload, ctx.run_dir / "checkpoints" / f"ckpt-{progress['step']:08d}.pt", keep_last=tc.keep_last)
    return save


def saved_so_far(ctx: RunContext) -> str:
    """What rank 0 has written into the run folder that a later failure leaves intact (for error messages)."""
    found = [name for name in ("dense.pt",) if (ctx.run_dir / name).is_file()]
    ckpts = sorted((ctx.run_dir / "checkpoints").glob("ckpt-*.pt")) if (ctx.run_dir / "checkpoints").is_dir() else []
    if ckpts:
        found.append(f"the training checkpoint {ckpts[-1].name}")
    return f"rank 0's {' and '.join(found)} in {ctx.run_dir}" if found else ""


def prune_oneshot(ctx: RunContext, pruner: Pruner, model: torch.nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any],
                  step: int) -> dict:
    """Calibrate on ``batches`` (``prune.calib_mode``), prune once to ``prune.sparsity``, log the step.

    Returns:
        the pruner's report.
    """
    from . import tblog

    p = ctx.prune
    calibrate(pruner, model, batches, forward, p.get("calib_mode", "eval"))
    report = pruner.prune_to(p["sparsity"])
    if ctx.writer is not None:
        tblog.log_pruning(ctx.writer, pruner, report, step)
    return report


def finish_pruning(ctx: RunContext, pruner: Pruner, metrics: dict, seconds: float) -> None:
    """Record what the pruning stage did in ``metrics`` and leave a plain model (``pruner.finalize()``)."""
    from .config import method_label

    p = ctx.prune
    metrics.update(finetune_seconds=seconds, sparsity_actual=pruner.sparsity()["total"], method=p["method"],
                   sparsity=p["sparsity"], schedule=p["schedule"], label=method_label(p))
    if pruner.last_report:
        metrics.update(prune_stats_bytes=pruner.last_report.get("stats_bytes", 0),
                       prune_gram_bytes_peak=pruner.last_report.get("gram_bytes_peak", 0))
    pruner.finalize()


def export_run(ctx: RunContext, model: torch.nn.Module, metrics: dict, meta: dict, hparams: tuple[str, ...],
               summary: str) -> dict:
    """The last stage of both recipes (rank 0): export the sparse checkpoint, then record and print.

    Writes ``model.safetensors`` (values in ``prune.values_dtype``), adds its size, the compression
    ratio and the timings to ``metrics``, logs ``eval/<primary>`` and the HParams session, and writes
    ``metrics.json`` — in that order, so a failure leaves the training checkpoints to resume from.
    (Each recipe logs its own ``eval/*`` scalars.)

    Args:
        ctx: the run.
        model: the finalized model.
        metrics: the run's metrics so far (updated and returned).
        meta: the export's metadata (how to rebuild the model).
        hparams: metric keys shown in TensorBoard's HParams dashboard.
        summary: the first part of the final line printed (the recipe's quality numbers).
    """
    from .. import save_sparse
    from . import tblog

    ckpt = ctx.run_dir / "model.safetensors"
    save_sparse(model, ckpt, values_dtype=ctx.prune["values_dtype"] if ctx.prune else "float32", meta=meta)
    dense_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    size = ckpt.stat().st_size
    metrics.update(checkpoint_bytes=size, dense_bytes=dense_bytes, compression_ratio=dense_bytes / size,
                   wall_seconds=time.perf_counter() - ctx.wall_start, started_at=ctx.started_at, finished_at=time.time(),
                   pid=os.getpid())
    tblog.log_hparams(ctx.writer, ctx.config, {k: v for k, v in metrics.items() if k in hparams})
    ctx.writer.close()
    write_json(ctx.run_dir / "metrics.json", metrics)
    print(f"final: {summary} | sparsity {metrics.get('sparsity_actual', 0.0):.3f} | checkpoint {size / 1024:.1f} KiB "
          f"({metrics['compression_ratio']:.2f}x smaller than dense fp32) | {ctx.run_dir}", flush=True)
    return metrics


DEPLOY_MODES = ("dense", "sparse")
"""``deploy=`` of the recipes' inference modes: the exported zeros multiplied as they are, or ``csprune.deploy``'s forms."""


def load_export(ckpt: str, build: Callable[[], torch.nn.Module], deploy: str,
                example: Callable[[torch.nn.Module], Any] | None) -> torch.nn.Module:
    """The model of an exported ``model.safetensors``, loaded for inference, dense or deployed (both recipes).

    Args:
        ckpt: the export.
        build: makes its architecture (with ``deploy="sparse"`` it is built on the meta device when the model is
            large, ``csprune.deploy.build_for_load``).
        deploy: ``"dense"`` (``load_sparse``) or ``"sparse"`` (``csprune.deploy.load``: each pruned matrix in the form
            that is fastest on ``example``, every decision logged on stderr).
        example: the real workload (or a short piece of it), run once to time each matrix on its true input.

    Raises:
        ConfigError: ``deploy`` is neither.
    """
    from .. import load_sparse
    from ..errors import ConfigError

    if deploy not in DEPLOY_MODES:
        raise ConfigError(f"deploy={deploy!r}: expected one of {DEPLOY_MODES}")
    if deploy == "dense":
        model = build()
        load_sparse(ckpt, model=model)
        return model.eval()
    from ..deploy import build_for_load, load

    model = build_for_load(ckpt, build).eval()
    report = load(ckpt, model, example)
    counts = report.forms()
    print(f"deploy=sparse: {counts.get('csr', 0)} of {len(report.decisions)} weight matrices in CSR, the rest dense "
          f"(faster by measurement); {len(report.skipped)} layers below the minimum sparsity left as they are",
          file=sys.stderr, flush=True)
    for d in report.decisions:
        print(f"  {d.name}: {d.form} ({', '.join(f'{f} {t:.1f} µs' for f, t in d.micros.items())}, sparsity {d.sparsity:.2f})",
              file=sys.stderr)
    return model
