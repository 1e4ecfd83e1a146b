"""Glue both recipes share: prune config -> Pruner, seeding, progress, metrics files.

The recipes pass plain dicts (``OmegaConf.to_container`` of their Hydra configs),
so this module stays free of Hydra. The keys of a prune config (``conf/prune/*.yaml``):

=============  ==============================================================
method         csp | magnitude | gmp | wanda | random
sparsity       final fraction of zeros
schedule       oneshot | cubic | linear
ramp_epochs    epochs of fine-tuning over which a gradual schedule ramps up
frequency      steps between mask updates of a gradual schedule
scope          row | layer | global
pattern        unstructured | N:M
targets        fqn globs (None: the recipe's default), exclude: globs
sensing, solver, damping, gaussian_ratio, train_l1, solver_options   (csp)
refit, damping (magnitude, wanda); seed (random)
stats_steps, regrow, calib_batches, finetune_epochs, lr
max_gram_bytes cap on one layer's Gram accumulator (column blocks above it)
=============  ==============================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional

import numpy as np
import torch

from .methods import CSP, Magnitude, Method, Random, Wanda
from .progress import is_tty, progress
from .pruner import Pruner
from .schedules import Cubic, Linear, OneShot, Schedule

log = logging.getLogger("csprune")

__all__ = ["PruneConfig", "build_method", "build_schedule", "build_pruner", "validate_prune_config", "fit", "warmup_cosine",
           "seed_everything", "shard_seed", "launch", "calibrate", "method_label", "progress", "write_json", "is_tty"]


@dataclasses.dataclass
class PruneConfig:
    """Schema of ``conf/prune/*.yaml`` (both recipes register it as ``prune/prune_schema``).

    Plain dataclass: Hydra's ConfigStore turns it into a structured config, so a typo such as
    ``prune.sparsty=0.5`` fails before any work; the reason for each default is beside it.
    """

    method: str = "csp"  # csp | gmp | magnitude | wanda | random
    sparsity: float = 0.7  # final fraction of zeros in the targets
    schedule: str = "oneshot"  # oneshot | cubic | linear (gmp uses cubic)
    ramp_epochs: float = 1.0  # gradual schedules reach the final sparsity after this much fine-tuning
    frequency: int = 100  # steps between mask updates of gradual schedules (Zhu & Gupta)
    scope: str = "layer"  # row | layer | global
    pattern: str = "unstructured"  # or N:M such as 2:4
    targets: Optional[List[str]] = None  # fqn globs; None: the recipe's default for the model
    exclude: List[str] = dataclasses.field(default_factory=list)
    sensing: str = "activations"  # csp: activations | gaussian | identity
    solver: str = "auto"  # csp: auto (obs when an update removes <= what it keeps, else omp) | omp | obs | sparsegpt | fista | cvxpy | sklearn
    safeguard: Any = "auto"  # csp: true | false | auto (on one-shot, off in gradual updates): fall back per row to refit top-|w|/saliency supports
    damping: float = 0.01  # δ of G + δ·mean(diag G)·I
    gaussian_ratio: float = 0.5  # ρ = m/n of gaussian sensing
    train_l1: float = 0.0  # csp: λ_train of the annealed ℓ1 penalty (0: off)
    solver_options: Any = dataclasses.field(default_factory=dict)
    refit: bool = False  # magnitude/wanda: least-squares refit of kept weights
    seed: int = 0  # random: mask seed
    stats_steps: int = 8  # batches observed before each mask update
    calib_batches: int = 8  # one-shot: training batches observed before pruning
    calib_mode: str = "eval"  # one-shot statistics: eval (clean batches, model.eval()) | train (augmented, dropout on, BatchNorm frozen)
    regrow: bool = False  # allow pruned weights back at later updates
    finetune_epochs: int = 4  # fine-tuning after pruning (same for every method: a fair budget)
    finetune_lr: float = 5e-4  # a quarter of the dense peak LR, cosine-decayed
    finetune_warmup_steps: int = 0  # linear LR warm-up at the start of fine-tuning (same for every method)
    values_dtype: str = "float32"  # exported values: float32 | float16 | bfloat16 | int8
    max_gram_bytes: Optional[int] = None  # cap on one layer's Gram (8·n² bytes); larger layers use column blocks. None: exact



def build_method(p: Mapping[str, Any]) -> Method:
    """Method object from a prune config."""
    name = p["method"]
    if name == "csp":
        return CSP(
            sensing=p.get("sensing", "activations"),
            solver=p.get("solver", "auto"),
            damping=p.get("damping", 0.01),
            gaussian_ratio=p.get("gaussian_ratio", 0.5),
            train_l1=p.get("train_l1", 0.0),
            solver_options=dict(p.get("solver_options") or {}),
            safeguard=p.get("safeguard", "auto"),
        )
    if name in ("magnitude", "gmp"):
        return Magnitude(refit=p.get("refit", False), damping=p.get("damping", 0.01))
    if name == "wanda":
        return Wanda(refit=p.get("refit", False), damping=p.get("damping", 0.01))
    if name == "random":
        return Random(seed=p.get("seed", 0))
    raise ValueError(f"prune.method={name!r}: expected csp, magnitude, gmp, wanda or random")


def build_schedule(p: Mapping[str, Any], start_step: int, steps_per_epoch: int) -> Schedule:
    """Schedule object from a prune config, in optimizer steps counted from ``start_step``."""
    kind = p.get("schedule", "oneshot")
    sparsity = p["sparsity"]
    if kind == "oneshot":
        return OneShot(sparsity, step=start_step)
    ramp = max(1, int(round(p.get("ramp_epochs", 1) * steps_per_epoch)))
    cls = {"cubic": Cubic, "linear": Linear}.get(kind)
    if cls is None:
        raise ValueError(f"prune.schedule={kind!r}: expected oneshot, cubic or linear")
    return cls(final_sparsity=sparsity, start_step=start_step, end_step=start_step + ramp,
               frequency=max(1, min(int(p.get("frequency", 100)), ramp)))


def build_pruner(model: torch.nn.Module, p: Mapping[str, Any], optimizer: torch.optim.Optimizer | None,
                 start_step: int, steps_per_epoch: int, default_targets: list[str] | None = None) -> Pruner:
    """A Pruner for ``model`` from a prune config (``targets`` None -> ``default_targets``)."""
    targets = p.get("targets") or default_targets
    return Pruner(
        model,
        build_method(p),
        build_schedule(p, start_step, steps_per_epoch),
        targets=list(targets) if targets else None,
        exclude=list(p.get("exclude") or []) or None,
        scope=p.get("scope", "layer"),
        pattern=p.get("pattern", "unstructured"),
        optimizer=optimizer,
        stats_steps=p.get("stats_steps", 8),
        regrow=p.get("regrow", False),
        max_gram_bytes=p.get("max_gram_bytes"),
    )


# The schedule each method is known by; another schedule shows in reports as "method-schedule".
CONVENTIONAL_SCHEDULE = {"gmp": "cubic"}


def method_label(p: Mapping[str, Any]) -> str:
    """Report label of a prune config: "csp", "gmp", "wanda+refit", or e.g. "csp-cubic" for a method run
    on a schedule other than its conventional one."""
    method, schedule = p["method"], p.get("schedule", "oneshot")
    name = f"{method}+refit" if p.get("refit") and method in ("magnitude", "wanda") else method
    return name if schedule == CONVENTIONAL_SCHEDULE.get(method, "oneshot") else f"{name}-{schedule}"


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
    from .checkpoint import atomic_write

    text = json.dumps(data, indent=2, sort_keys=True, default=float) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def validate_prune_config(p: Mapping[str, Any], prefix: str = "prune") -> None:
    """Check a prune config before any work, naming the bad key (``prune.sparsity=1.5: ...``)."""
    from .methods.base import parse_pattern
    from .methods.sensing import SENSINGS
    from .pruner import SCOPES
    from .solvers import SOLVERS

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{prefix}.{key}={p.get(key)!r}: {why}")

    s = p.get("sparsity")
    if not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0 or s != s:
        raise bad("sparsity", "must lie in [0, 1)")
    choices = {
        "method": ("csp", "gmp", "magnitude", "wanda", "random"),
        "schedule": ("oneshot", "cubic", "linear"),
        "scope": SCOPES,
        "sensing": SENSINGS,
        "solver": SOLVERS + ("auto",),
        "safeguard": (True, False, "auto"),
        "values_dtype": ("float32", "float16", "bfloat16", "int8"),
        "calib_mode": ("eval", "train"),
    }
    for key, allowed in choices.items():
        if key in p and p[key] not in allowed:
            raise bad(key, f"expected one of {', '.join(allowed)}")
    try:
        parse_pattern(p.get("pattern", "unstructured"))
    except ValueError as exc:
        raise bad("pattern", str(exc).split(": ", 1)[-1]) from None
    for key in ("ramp_epochs", "damping", "train_l1"):
        if key in p and p[key] < 0:
            raise bad(key, "must be >= 0")
    for key in ("frequency", "stats_steps", "calib_batches"):
        if key in p and p[key] < 1:
            raise bad(key, "must be >= 1")


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


def fit(
    model: torch.nn.Module,
    batches,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    epochs: int,
    *,
    pruner: Pruner | None = None,
    writer=None,
    step: int = 0,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    log_every: int = 20,
    stage: str = "train",
    save: Callable[[dict], None] | None = None,
    save_every: int = 0,
    resume: Mapping[str, Any] | None = None,
    data_rng: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
    seed: int | None = None,
    max_bad_steps: int = 0,
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

    Faults (csprune.faults): a non-finite loss or gradient raises :class:`NonFiniteError` naming the
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
        epochs: epochs to run.
        pruner: when given, its ``penalty()`` is added to the loss and ``step()`` follows every
            optimizer step; pruning events are logged to TensorBoard.
        writer: a ``SummaryWriter`` or None.
        step: global step of the first batch (TensorBoard x axis).
        max_steps: stop after this many optimizer steps in this stage (smoke runs).
        grad_clip: max gradient norm (None: no clipping).
        log_every: steps between scalar logs.
        stage: tag prefix ("train", "finetune").
        save: checkpoint callback (None: no checkpoints).
        save_every: steps between ``save`` calls (0: only after the last step).
        resume: a ``progress`` dict from a checkpoint of this stage.
        data_rng: ``(get, set)`` of the RNG state ``batches`` consumes (e.g. SpecAugment's generator).
        seed: when given, torch's RNG is seeded per shard with :func:`shard_seed` before each forward
            (dropout identical under any split of the global batch). None: one stream per process.
        max_bad_steps: non-finite steps skipped in this stage before stopping (0: stop at the first).
        on_step: called after each batch with True when the optimizer stepped, False when the step
            was skipped (e.g. the codec's rate controller updates τ once per global batch here).

    Returns:
        the global step after the last batch.
    """
    from . import tblog
    from .checkpoint import rng_state_full, set_rng_state
    from .distributed import ShardBuffers, any_on_ranks
    from .faults import NonFiniteError, Preempted, PreemptionFlag, first_nonfinite_grad, nonfinite_terms

    get_data_rng, set_data_rng = data_rng if data_rng is not None else (lambda: None, lambda state: None)
    done, first_epoch, skip, bad_steps = 0, 0, 0, 0
    if resume is not None:
        if resume.get("stage", stage) != stage:
            raise ValueError(f"fit(stage={stage!r}): resume progress belongs to stage {resume.get('stage')!r}")
        first_epoch, skip, step, done = int(resume["epoch"]), int(resume["batch"]), int(resume["step"]), int(resume["done"])
        bad_steps = int(resume.get("bad_steps", 0))
        if resume.get("finished"):
            set_data_rng(resume["data_rng"])
            set_rng_state(resume["rng"])
            return step
    norm_buffers = ShardBuffers(model)
    rank = _rank()
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
                finished = (max_steps is not None and done >= max_steps) or (epoch == epochs - 1 and index == len(items) - 1)
                due = finished or stop or (save_every and done % save_every == 0)
                if save is not None and due:
                    save({"stage": stage, "epoch": epoch, "batch": index + 1, "step": step, "done": done, "finished": finished,
                          "preempted": stop and not finished, "bad_steps": bad_steps,
                          "epoch_data_rng": epoch_data_rng, "data_rng": get_data_rng(), "rng": rng_state_full(),
                          "loss_total": total, "loss_count": count})
                if stop and not finished:
                    raise Preempted(step, f"{stage}: SIGTERM received; stopped after step {step} "
                                          f"{'with a checkpoint written' if save is not None else 'without a checkpoint (none configured)'}; "
                                          f"trainer.resume=auto continues from it")
                if max_steps is not None and done >= max_steps:
                    break
            if rank == 0:
                print(f"{stage} epoch {epoch + 1}/{epochs}: loss {total / max(count, 1):.4f}, "
                      f"lr {optimizer.param_groups[0]['lr']:.2e}, {time.perf_counter() - start:.1f}s", flush=True)
            if max_steps is not None and done >= max_steps:
                break
    return step


def launch(run: Callable[[Any], Mapping[str, Any]], cfg: Any) -> Mapping[str, Any]:
    """The body of a recipe's ``@hydra.main``: ``run(cfg)``, then leave the process group.

    Every rank waits for rank 0's evaluation and export before exiting. A run preempted by SIGTERM
    (its checkpoint written) exits with status 143, as a terminated process would, so a scheduler
    requeues it and ``trainer.resume=auto`` continues.
    """
    import sys

    from .distributed import shutdown_distributed
    from .faults import PREEMPTED_EXIT_CODE, Preempted

    try:
        metrics = run(cfg)
    except Preempted as exc:
        print(f"preempted: {exc}", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    shutdown_distributed()
    return metrics


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor: float = 0.05):
    """Linear warm-up then cosine decay to ``floor``·peak (a LambdaLR)."""
    import math

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress_))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
