"""The training loop both recipes run: dense training and fine-tuning under a Pruner, resumable at any
batch, with faults detected by name (csprune.train.faults) and DDP shards handled exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import torch

from ..progress import progress
from ..pruner import Pruner
from ..errors import ConfigError

__all__ = ["fit", "FitConfig", "fit_config", "shard_seed", "warmup_cosine"]

log = logging.getLogger("csprune")


def _rank() -> int:
    """This process's torch.distributed rank (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shard_seed(seed: int, stage: str, step: int, shard: int) -> int:
    """The torch seed of one shard's forward: a function of the run seed, stage, step and shard only.

    Seeding each shard (not each process) makes dropout draw the same masks for the same rows whether
    the global batch is split over DDP ranks or over ``trainer.micro_batches`` in one process, and
    makes a resumed run draw what an uninterrupted one draws.
    """
    digest = hashlib.blake2b(f"{seed}/{stage}/{step}/{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclasses.dataclass
class FitConfig:
    """How one stage of :func:`fit` trains (the recipes fill it from ``trainer.*`` and ``prune.*``).

    Attributes:
        epochs: epochs to run.
        stage: tag prefix and checkpoint stage name ("train", "finetune", "greedy_m0", ...).
        max_steps: stop after this many optimizer steps in this stage (smoke runs); None: all.
        grad_clip: max gradient norm (None: no clipping).
        log_every: steps between scalar logs.
        save_every: steps between ``save`` calls (0: only after the last step, and on SIGTERM).
        seed: when given, torch's RNG is seeded per shard with :func:`shard_seed` before each forward
            (dropout identical under any split of the global batch). None: one stream per process.
        max_bad_steps: non-finite steps skipped in this stage before stopping (0: stop at the first).
        progress_every_s: seconds between progress lines with an ETA on rank 0 when stdout is not a terminal
            (a log file; on a terminal the progress bar shows the ETA); 0: none.
    """

    epochs: int
    stage: str = "train"
    max_steps: int | None = None
    grad_clip: float | None = None
    log_every: int = 20  # a scalar every 20 steps: cheap, and dense enough for AN4-sized runs
    save_every: int = 0
    seed: int | None = None
    max_bad_steps: int = 0  # a NaN stops the run at once unless the user allows skipping
    progress_every_s: float = 60.0  # a line a minute: visible in a log without flooding it


def fit_config(cfg: Any, epochs: int, stage: str) -> FitConfig:
    """The :class:`FitConfig` of one stage from a recipe config's ``trainer`` group (and its ``seed``).

    Both recipes' trainer groups share these keys: max_steps, grad_clip, log_every, max_bad_steps,
    and (ASR) checkpoint_every.
    """
    tc = cfg.trainer
    return FitConfig(epochs=epochs, stage=stage, max_steps=tc.max_steps, grad_clip=tc.grad_clip, log_every=tc.log_every,
                     save_every=tc.get("checkpoint_every", 0) or 0, seed=cfg.seed, max_bad_steps=tc.max_bad_steps)


def fit(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    config: FitConfig,
    *,
    pruner: Pruner | None = None,
    writer: Any = None,
    step: int = 0,
    save: Callable[[dict], None] | None = None,
    resume: Mapping[str, Any] | None = None,
    data_rng: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    on_step: Callable[[bool], None] | None = None,
) -> int:
    """The training loop both recipes run (dense training and fine-tuning under a Pruner).

    Resumable at any batch: ``save(progress)`` is called every ``save_every`` optimizer steps, after
    the last one, and on SIGTERM, with ``progress`` = {stage, epoch, batch (batches done in that
    epoch), step, done (steps done in this call's stage), finished, preempted, bad_steps,
    epoch_data_rng (the data pipeline's RNG at the start of the epoch, before its batches were
    drawn), data_rng (now), rng (torch/Python/NumPy RNG now), loss_total, loss_count}. Passing it back
    as ``resume`` redraws that epoch's batches from the same RNG state, skips the done ones and
    restores the RNGs, so the run continues exactly as if it had not stopped (the caller restores
    model, optimizer, scheduler and pruner).

    Faults (csprune.train.faults): a non-finite loss or gradient raises :class:`NonFiniteError` naming the
    step and the term, before any optimizer step on it (``max_bad_steps`` such steps are skipped
    first). SIGTERM finishes the current step, calls ``save`` and raises :class:`Preempted`. Under DDP
    every rank takes both decisions together.

    Args:
        model: the module trained (put in train mode here; may be a DDP wrapper).
        batches: ``batches(epoch) -> iterable`` of batches for one epoch; a batch that is a ``list``
            is a set of micro-batches (this rank's shards of the global batch) whose gradients are
            accumulated; BatchNorm running statistics become the mean of the shards' updates.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``. If it has a ``last`` dict of floats
            (its terms of the latest call), a non-finite loss is reported by those terms.
        optimizer, lr_scheduler: stepped once per batch (scheduler may be None).
        config: the stage's settings (:class:`FitConfig`).
        pruner: when given, its ``penalty()`` is added to the loss and ``step()`` follows every
            optimizer step; pruning events are logged to TensorBoard.
        writer: a ``SummaryWriter`` or None.
        step: global step of the first batch (TensorBoard x axis).
        save: checkpoint callback (None: no checkpoints).
        resume: a ``progress`` dict from a checkpoint of this stage.
        data_rng: ``(get, set)`` of the RNG state ``batches`` consumes (e.g. SpecAugment's generator).
        on_step: called after each batch with True when the optimizer stepped, False when the step
            was skipped (e.g. the codec's rate controller updates λ once per global batch here).

    Returns:
        the global step after the last batch.
    """
    from . import tblog
    from .checkpoint import rng_state_full, set_rng_state
    from .ddp import ShardBuffers, any_on_ranks
    from .faults import NonFiniteError, Preempted, PreemptionFlag, first_nonfinite_grad, nonfinite_terms

    epochs, stage, max_steps, grad_clip = config.epochs, config.stage, config.max_steps, config.grad_clip
    log_every, save_every, seed, max_bad_steps = config.log_every, config.save_every, config.seed, config.max_bad_steps
    get_data_rng, set_data_rng = data_rng if data_rng is not None else (lambda: None, lambda state: None)
    done, first_epoch, skip, bad_steps = 0, 0, 0, 0
    if resume is not None:
        if resume.get("stage", stage) != stage:
            raise ConfigError(f"fit(stage={stage!r}): resume progress belongs to stage {resume.get('stage')!r}")
        first_epoch, skip, step, done = int(resume["epoch"]), int(resume["batch"]), int(resume["step"]), int(resume["done"])
        bad_steps = int(resume.get("bad_steps", 0))
        if resume.get("finished"):
            set_data_rng(resume["data_rng"])
            set_rng_state(resume["rng"])
            return step
    norm_buffers = ShardBuffers(model)
    rank = _rank()
    eta = _ETA(stage, config.progress_every_s if rank == 0 and not sys.stdout.isatty() else 0.0, done)
    device = next(model.parameters()).device
    with PreemptionFlag() as preempt:
        for epoch in range(first_epoch, epochs):
            model.train()
            start, total, count = time.perf_counter(), 0.0, 0
            resuming = resume is not None and epoch == first_epoch
            if resuming:
                set_data_rng(resume["epoch_data_rng"])
            epoch_data_rng = get_data_rng()
            items = list(batches(epoch))
            eta.plan(len(items) * (epochs - epoch) + done - (skip if resuming else 0), max_steps)
            first = 0
            if resuming:
                first = skip
                set_rng_state(resume["rng"])
                total, count = float(resume["loss_total"]), int(resume["loss_count"])
            for index in progress(range(first, len(items)), desc=f"{stage} {epoch + 1}/{epochs}", total=len(items) - first):
                batch = items[index]
                micro = batch if isinstance(batch, list) else [batch]  # a list: micro-batches, gradients accumulated
                optimizer.zero_grad(set_to_none=True)
                if norm_buffers:
                    norm_buffers.begin()
                loss, bad_term = 0.0, None
                for j, part in enumerate(micro):
                    last = j == len(micro) - 1
                    sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                    if seed is not None:
                        torch.manual_seed(shard_seed(seed, stage, step, rank * len(micro) + j))
                    with sync:
                        task_loss = loss_fn(model, part)
                        terms = {"loss": task_loss}
                        part_loss = task_loss
                        if pruner is not None:
                            penalty = pruner.penalty()
                            part_loss = part_loss + penalty
                            terms["pruner.penalty"] = penalty
                        if len(micro) > 1:
                            part_loss = part_loss / len(micro)
                        if bad_term is None and not bool(torch.isfinite(part_loss.detach())):
                            named = dict(getattr(loss_fn, "last", None) or {}, **terms)
                            bad_term = ", ".join(nonfinite_terms(named)) or "loss"
                        part_loss.backward()  # also on a bad loss: DDP ranks must meet in the gradient all-reduce
                    if norm_buffers:
                        norm_buffers.shard_done()
                    loss = loss + part_loss.detach()
                if norm_buffers:
                    norm_buffers.finish()
                if bad_term is None:
                    bad_grad = first_nonfinite_grad(model)
                    if bad_grad is not None:
                        bad_term = f"grad:{bad_grad}"
                is_bad, stop = any_on_ranks([bad_term is not None, preempt.requested], device)
                if is_bad:
                    what = bad_term or "a non-finite loss or gradient on another rank"
                    if bad_steps >= max_bad_steps:
                        raise NonFiniteError(stage, step, what, (
                            f"{stage}: non-finite {what} at step {step} (epoch {epoch + 1}, batch {index + 1}); stopped before "
                            f"the optimizer step, so the last checkpoint written holds the last good state "
                            f"(trainer.resume=true continues from it; trainer.max_bad_steps skips such steps)"))
                    bad_steps += 1
                    log.warning("csprune: %s: skipping step %d, non-finite %s (%d of trainer.max_bad_steps=%d)",
                                stage, step, what, bad_steps, max_bad_steps)
                    optimizer.zero_grad(set_to_none=True)
                    if on_step is not None:
                        on_step(False)
                else:
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                    optimizer.step()
                    if lr_scheduler is not None:
                        lr_scheduler.step()
                    if on_step is not None:
                        on_step(True)
                    if pruner is not None:
                        report = pruner.step()
                        if report and writer is not None:
                            tblog.log_pruning(writer, pruner, report, step)
                    total += float(loss.detach())
                    count += 1
                    if writer is not None and step % log_every == 0:
                        writer.add_scalar(f"{stage}/loss", loss.item(), step)
                        writer.add_scalar(f"{stage}/lr", optimizer.param_groups[0]["lr"], step)
                        if pruner is not None:
                            tblog.log_sparsity(writer, pruner, step)
                step += 1
                done += 1
                eta.tick(done)
                finished = (max_steps is not None and done >= max_steps) or (epoch == epochs - 1 and index == len(items) - 1)
                due = finished or stop or (save_every and done % save_every == 0)
                if save is not None and due:
                    save({"stage": stage, "epoch": epoch, "batch": index + 1, "step": step, "done": done, "finished": finished,
                          "preempted": stop and not finished, "bad_steps": bad_steps,
                          "epoch_data_rng": epoch_data_rng, "data_rng": get_data_rng(), "rng": rng_state_full(),
                          "loss_total": total, "loss_count": count})
                if stop and not finished:
                    raise Preempted(step, f"{stage}: SIGTERM received; stopped after step {step} " + (
                        "with a checkpoint written; trainer.resume=auto continues from it" if save is not None else
                        "without a checkpoint (this caller passed no save callback): a rerun starts over"))
                if max_steps is not None and done >= max_steps:
                    break
            if rank == 0:
                print(f"{stage} epoch {epoch + 1}/{epochs}: loss {total / max(count, 1):.4f}, "
                      f"lr {optimizer.param_groups[0]['lr']:.2e}, {time.perf_counter() - start:.1f}s", flush=True)
            if max_steps is not None and done >= max_steps:
                break
    return step


class _ETA:
    """Progress lines ``stage: step 120/768 (16%), 1m48s elapsed, ETA 9m42s`` every ``every_s`` seconds."""

    def __init__(self, stage: str, every_s: float, done: int):
        self.stage, self.every_s, self.total = stage, every_s, None
        self.start, self.start_done, self.last = time.perf_counter(), done, time.perf_counter()

    def plan(self, total: int, max_steps: int | None) -> None:
        self.total = total if max_steps is None else min(total, max_steps)

    def tick(self, done: int) -> None:
        now = time.perf_counter()
        if not self.every_s or now - self.last < self.every_s or not self.total:
            return
        self.last = now
        rate = (now - self.start) / max(done - self.start_done, 1)
        left = max(self.total - done, 0) * rate
        print(f"{self.stage}: step {done}/{self.total} ({100 * done / self.total:.0f}%), {_clock(now - self.start)} elapsed, "
              f"ETA {_clock(left)}", flush=True)


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  floor: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``floor``·peak (a LambdaLR)."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
