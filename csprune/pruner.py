"""The Pruner: prepare → ``step()`` after every optimizer step → ``finalize()``.

::

    pruner = Pruner(model, CSP(), Cubic(0.9, 0, 2000, 100), optimizer=opt)
    for batch in loader:
        loss = task_loss(model, batch) + pruner.penalty()
        loss.backward(); opt.step(); pruner.step()
    pruner.finalize()            # plain module, exact zeros, no parametrization left

At construction every target gets an all-ones mask parametrization. ``step()``
recomputes masks whenever the schedule says so (using input statistics the
hooks gathered over the last ``stats_steps`` forward passes), then keeps pruned
weights and optimizer state at exactly zero. Where a method writes new values into
kept weights (CSP's least-squares refit), their first-moment optimizer state is
reset (see :func:`csprune.masks.reset_moments`), never left stale.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import masks as M
from .progress import progress
from .distributed import assert_same_on_ranks, checksum, is_distributed
from .methods.base import LayerContext, Method, Selection, keep_from_scores, nm_keep, parse_pattern
from .schedules import OneShot, Schedule
from .stats import InputStats
from .targets import Target, TargetSpec, find_targets
from .errors import ConfigError, NumericalError

__all__ = ["Pruner", "prune_once", "SCOPES"]

log = logging.getLogger("csprune")

SCOPES = ("row", "layer", "global")
_STATE_VERSION = 1


class Pruner:
    """Prunes the target tensors of ``model`` on a schedule.

    Args:
        model: the model (pruned in place; ``deepcopy`` first to keep the dense one).
        method: a :class:`csprune.methods.Method` (Magnitude, Random, Wanda, CSP).
        schedule: a :mod:`csprune.schedules` schedule.
        targets: selectors of the tensors to prune (fqn globs, ``"type:Linear"``, classes);
            None = every supported weight except embedding tables.
        exclude: selectors removed from ``targets`` (e.g. ``["*.bias", "head.*"]``).
        scope: budget scope: "row", "layer" (torch.nn.utils.prune's per-tensor default) or "global".
        pattern: "unstructured" or "N:M" (e.g. "2:4"; fixes the sparsity at 1 − N/M).
        optimizer: optimizer whose state is zeroed at pruned positions and whose first moments are
            reset where a refit rewrote a kept weight (recommended; see ``masks.reset_moments``).
        stats_steps: forward passes observed before each pruning step. 4: what every gradual CSP
            result in recipes/asr/RESULTS.md used (with 1% damping the Grams are well conditioned).
            An observed step costs ~2x a plain one (a 576-wide input's Gram is 4x that layer's
            forward), so 8 added ~8% to a run updating every 100 steps (bench/overhead.py).
        regrow: allow a pruned weight to come back at a later pruning step (masks are
            monotone otherwise).
        max_gram_bytes: cap on one target's Gram accumulator (float64, ``8·g·n²`` bytes). A larger
            target keeps a block-diagonal Gram of column blocks of b inputs (the largest divisor of
            n that fits, a multiple of M for N:M) and is pruned as independent column blocks: the
            method sees the row view ``[g·(n/b)·o/g, b]`` with one Gram per block, so budgets follow
            the scope over blocks (scope "row": each block of a row keeps its proportional share).
            None: no cap (exact). Reported as ``gram_block``/``gram_bytes`` per tensor.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        schedule: Schedule,
        *,
        targets: Sequence[TargetSpec] | None = None,
        exclude: Sequence[TargetSpec] | None = None,
        scope: str = "layer",
        pattern: str = "unstructured",
        optimizer: torch.optim.Optimizer | None = None,
        stats_steps: int = 4,
        regrow: bool = False,
        max_gram_bytes: int | None = None,
    ) -> None:
        if not isinstance(method, Method):
            raise TypeError(f"method: expected a csprune.methods.Method, got {type(method).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a csprune.schedules schedule, got {type(schedule).__name__}")
        if scope not in SCOPES:
            raise ConfigError(f"scope={scope!r}: expected one of {SCOPES}")
        if stats_steps < 1:
            raise ConfigError(f"stats_steps={stats_steps}: must be >= 1")
        self.pattern = parse_pattern(pattern)
        self.targets: list[Target] = find_targets(model, targets, exclude)
        if self.pattern:
            for t in self.targets:
                n = t.row_shape[1]
                if n % self.pattern[1]:
                    raise ConfigError(f"pattern={pattern!r}: {t.fqn} has rows of width {n}, not divisible by {self.pattern[1]}")
        self.model = model
        self.method = method
        self.schedule = schedule
        self.scope = scope
        self.optimizer = optimizer
        self.stats_steps = stats_steps
        self.regrow = regrow
        self._step = 0
        self._level = 0.0  # sparsity of the current masks
        self._method_state: dict[str, dict] = {t.fqn: {} for t in self.targets}
        self.last_report: dict[str, Any] = {}
        for t in self.targets:
            M.attach_mask(t.module, t.param_name)
        self.max_gram_bytes = max_gram_bytes
        self.stats: InputStats | None = None
        if method.stats_mode is not None:
            self.stats = InputStats(self.targets, mode=method.stats_mode, max_gram_bytes=max_gram_bytes,
                                    block_multiple=self.pattern[1] if self.pattern else 1).attach()
        blocks = self.stats.blocks if self.stats is not None else {}
        # What the method sees of each target: the target itself, or its column-blocked view.
        self._views: list[Target | _BlockedView] = [
            _BlockedView(t, blocks[t.fqn]) if t.fqn in blocks else t for t in self.targets]
        self._update_collecting()

    # ------------------------------------------------------------- training
    @property
    def step_count(self) -> int:
        """Number of ``step()`` calls so far."""
        return self._step

    def penalty(self) -> torch.Tensor:
        """λ_train(t)·Σ‖W‖₁ over targets, annealed linearly to 0 by the end of the schedule."""
        coef = getattr(self.method, "train_l1", 0.0)
        device = self.targets[0].weight.device
        if not coef:
            return torch.zeros((), device=device)
        anneal = 1.0 - self.schedule.progress(self._step)
        if anneal <= 0:
            return torch.zeros((), device=device)
        return coef * anneal * sum(t.weight.abs().sum() for t in self.targets)

    def step(self) -> dict | None:
        """Call after every ``optimizer.step()``.

        Recomputes masks when the schedule updates at this step, then keeps pruned
        weights (and optimizer state) at zero.

        Returns:
            the pruning report (``last_report``) when masks changed, else None.
        """
        report = None
        t = self._step
        if self.schedule.is_update(t):
            target_level = self._target_level(t)
            if target_level > self._level or (self.regrow and target_level != self._level):
                report = self._prune(target_level, gradual=not isinstance(self.schedule, OneShot))
            if self.stats is not None:
                self.stats.reset()
        self.enforce()
        self._step += 1
        self._update_collecting()
        return report

    def _pattern_level(self, level: float) -> float:
        """An N:M pattern prunes to 1 − N/M whatever the schedule says, once it prunes at all."""
        return 1.0 - self.pattern[0] / self.pattern[1] if self.pattern and level > 0 else level

    def _target_level(self, step: int) -> float:
        return self._pattern_level(self.schedule.sparsity_at(step))

    def _update_collecting(self) -> None:
        """Observe inputs only during the ``stats_steps`` forward passes before a pruning step."""
        if self.stats is None:
            return
        t = self._step
        self.stats.enabled = any(self.schedule.is_update(u) and self.method.observes(self._is_final(self._target_level(u)))
                                 for u in range(t, t + self.stats_steps))

    def _is_final(self, level: float) -> bool:
        """Whether an update to ``level`` reaches the schedule's final sparsity."""
        return level >= self._pattern_level(self.schedule.final_sparsity) - 1e-9

    def enforce(self) -> None:
        """Zero pruned weights and their optimizer state (idempotent)."""
        for tgt in self.targets:
            M.enforce_zeros(tgt.module, tgt.param_name, self.optimizer)

    # -------------------------------------------------------------- pruning
    @torch.no_grad()
    def prune_to(self, sparsity: float, *, gradual: bool = False) -> dict:
        """Recompute masks now for ``sparsity`` (outside the schedule), e.g. after calibration.

        Args:
            sparsity: target level in [0, 1).
            gradual: treat it as an in-training update, as ``step()`` does on a gradual schedule
                (methods make it cheap: CSP's ``safeguard="auto"`` is off then); False: a one-shot step.
        """
        if not 0.0 <= sparsity < 1.0 or math.isnan(sparsity):
            raise ConfigError(f"sparsity={sparsity!r}: must lie in [0, 1)")
        report = self._prune(sparsity, gradual=gradual)
        if self.stats is not None:
            self.stats.reset()
        self.enforce()
        return report

    @torch.no_grad()
    def _prune(self, level: float, gradual: bool = False) -> dict:
        """Compute every new mask first, then apply them all (nothing changes on error).

        Applying a selection with new values also resets the optimizer's first moments of the kept
        entries whose value changed (``masks.reset_moments``; second moments are kept); the
        ``enforce`` that follows zeroes all state of the pruned entries. The count of reset entries
        is reported per tensor as ``moments_reset``.
        """
        start = time.perf_counter()
        rows, contexts = [], []
        for t, view in zip(self.targets, self._views):
            w = view.rows(t.weight.detach())
            if not torch.isfinite(w).all():
                raise NumericalError(f"weight {t.fqn} contains NaN/Inf; not pruning")
            allowed = torch.ones_like(w, dtype=torch.bool) if self.regrow else view.rows(M.get_mask(t.module, t.param_name))
            rows.append(w)
            contexts.append(LayerContext(view, self.stats, self._step, allowed, self.pattern, self._method_state[t.fqn],
                                         gradual=gradual, final=not gradual or self._is_final(level)))
        if self.stats is not None and self.stats.mode is not None:
            self._sync_stats()
        scores = []
        for w, ctx in zip(rows, contexts):
            s = self.method.score(w, ctx).to(torch.float32)
            scores.append(s.masked_fill(~ctx.allowed, float("-inf")))
        if self.pattern:
            keeps = [nm_keep(s, *self.pattern) for s in scores]
        else:
            mags = None  # row floor (methods/base.py): no row left empty where magnitude at this scope keeps one
            if self.method.row_floor and self.scope != "row":
                mags = [w.abs().float().masked_fill(~ctx.allowed, float("-inf")) for w, ctx in zip(rows, contexts)]
            keeps = keep_from_scores(scores, level, self.scope, mags)
        selections: list[Selection] = [
            self.method.select(w, k, ctx)
            for w, k, ctx in progress(list(zip(rows, keeps, contexts)), desc=f"{self.method.name} masks")
        ]
        # Apply.
        per_tensor = {}
        gram_peak = 0
        for t, view, w, sel in zip(self.targets, self._views, rows, selections):
            mask = view.unrows(sel.mask)
            if self.regrow:  # a weight that comes back starts from zero state, not the pruned entries' (masks.py)
                M.clear_state(t.module, t.param_name, mask & ~M.get_mask(t.module, t.param_name), self.optimizer)
            M.set_mask(t.module, t.param_name, mask)
            moments_reset = 0
            if sel.values is not None:
                original = M.original_param(t.module, t.param_name)
                before = original.detach().clone() if self.optimizer is not None else None
                original.copy_(view.unrows(sel.values.to(original.dtype)))
                if before is not None:
                    changed = (original != before) & mask
                    moments_reset = M.reset_moments(t.module, t.param_name, changed, self.optimizer)
            n = t.row_shape[1]
            block = view.block if isinstance(view, _BlockedView) else n
            gram_bytes = 4 * t.groups * n * block  # the float32 Gram a solver gets ([g·n/b, b, b])
            if self.stats is not None:
                gram_peak = max(gram_peak, gram_bytes)
            per_tensor[t.fqn] = dict(sel.info, sparsity=1.0 - sel.mask.float().mean().item(),
                                     gram_block=float(block), gram_bytes=float(gram_bytes),
                                     moments_reset=float(moments_reset))
        self._level = level
        self._check_ranks_agree()
        self.last_report = {
            "step": self._step,
            "scheduled_sparsity": level,
            "seconds": time.perf_counter() - start,
            "stats_bytes": self.stats.nbytes() if self.stats is not None else 0,
            "gram_bytes_peak": gram_peak,
            "max_gram_bytes": self.max_gram_bytes or 0,
            "tensors": per_tensor,
        }
        log.info("csprune: step %d pruned to %.3f in %.2fs", self._step, level, self.last_report["seconds"])
        return self.last_report

    def _sync_stats(self) -> None:
        self.stats.all_reduce()

    def _check_ranks_agree(self) -> None:
        """Under DDP, every rank must hold the same masks: compare a checksum (mismatch is an error)."""
        if is_distributed():
            masks = [M.get_mask(t.module, t.param_name) for t in self.targets]
            assert_same_on_ranks(checksum(masks, modulus=997), f"masks after pruning step {self._step}")

    # ------------------------------------------------------------ reporting
    @torch.no_grad()
    def sparsity(self) -> dict[str, float]:
        """Fraction of zeros of each target's effective weight, and ``"total"``."""
        out, zeros, total = {}, 0, 0
        for t in self.targets:
            w = t.weight
            z = int((w == 0).sum())
            out[t.fqn] = z / max(w.numel(), 1)
            zeros += z
            total += w.numel()
        out["total"] = zeros / max(total, 1)
        return out

    def masks(self) -> dict[str, torch.Tensor]:
        """Current boolean masks keyed by target fqn (True = kept)."""
        return {t.fqn: M.get_mask(t.module, t.param_name).clone() for t in self.targets}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: step, level, masks, statistics, method state."""
        method_state = {}
        for fqn, st in self._method_state.items():
            kept = {k: v for k, v in st.items() if not k.startswith("_")}
            if kept:
                method_state[fqn] = kept
        return {
            "version": _STATE_VERSION,
            "method": repr(self.method),
            "step": self._step,
            "level": self._level,
            "masks": self.masks(),
            "stats": self.stats.state_dict() if self.stats is not None else {},
            "method_state": method_state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (checked against this pruner's targets first)."""
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"pruner state version {state.get('version')!r} is not {_STATE_VERSION}")
        masks = state["masks"]
        by_fqn = {t.fqn: t for t in self.targets}
        missing = sorted(set(by_fqn) - set(masks))
        extra = sorted(set(masks) - set(by_fqn))
        if missing or extra:
            raise ConfigError(f"pruner state does not match the targets: missing {missing}, unexpected {extra}")
        for fqn, m in masks.items():
            if tuple(m.shape) != tuple(by_fqn[fqn].shape):
                raise ConfigError(f"pruner state: mask {fqn} has shape {tuple(m.shape)}, weight has {tuple(by_fqn[fqn].shape)}")
        for fqn, m in masks.items():
            t = by_fqn[fqn]
            M.set_mask(t.module, t.param_name, m.to(t.weight.device))
        self._step = int(state["step"])
        self._level = float(state["level"])
        if self.stats is not None:
            self.stats.load_state_dict(state.get("stats", {}))
        for fqn, st in state.get("method_state", {}).items():
            self._method_state[fqn].update(st)
        self._update_collecting()

    # ------------------------------------------------------------- finalize
    def finalize(self) -> nn.Module:
        """Remove hooks and parametrizations: a plain module with exact zeros."""
        if self.stats is not None:
            self.stats.detach()
            self.stats = None
        for t in self.targets:
            M.enforce_zeros(t.module, t.param_name, self.optimizer)
            M.squash_mask(t.module, t.param_name)
        return self.model


class _BlockedView:
    """A target seen as independent column blocks (what a method prunes under ``max_gram_bytes``).

    Row i of group gi, columns [j·b, (j+1)·b), becomes a row of group ``gi·nb + j`` (nb = n/b):
    the view's rows are ``[g·nb·o/g, b]`` and its groups match the block-diagonal Gram
    ``InputStats.gram`` returns for the target.
    """

    def __init__(self, target: Target, block: int):
        self.base = target
        self.block = block
        self.fqn, self.module_fqn, self.module = target.fqn, target.module_fqn, target.module
        self.param_name, self.kind = target.param_name, target.kind
        o, n = target.row_shape
        self.nb = n // block
        self.groups = target.groups * self.nb
        self._o, self._n = o, n

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def row_shape(self) -> tuple[int, int]:
        return self._o * self.nb, self.block

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """[g·nb·o/g, b] blocked rows of a tensor shaped like the target's weight."""
        g, o, b = self.base.groups, self._o, self.block
        r = self.base.rows(weight)
        return r.reshape(g, o // g, self.nb, b).permute(0, 2, 1, 3).reshape(g * self.nb * (o // g), b)

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rows`: back to the target's weight shape."""
        g, o, b = self.base.groups, self._o, self.block
        r = rows.reshape(g, self.nb, o // g, b).permute(0, 2, 1, 3).reshape(o, self._n)
        return self.base.unrows(r)


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def prune_once(
    model: nn.Module,
    method: Method,
    *,
    sparsity: float,
    calib: Iterable | None = None,
    targets: Sequence[TargetSpec] | None = None,
    exclude: Sequence[TargetSpec] | None = None,
    scope: str = "layer",
    pattern: str = "unstructured",
    max_gram_bytes: int | None = None,
) -> nn.Module:
    """One-shot pruning: observe ``calib``, prune to ``sparsity``, finalize.

    Args:
        model: pruned in place.
        method: the method.
        sparsity: fraction of zeros in [0, 1).
        calib: iterable of model inputs (tuple → ``model(*b)``, dict → ``model(**b)``, tensor → ``model(b)``);
            needed by data-dependent methods (Wanda, CSP with activation sensing, refits).
        targets, exclude, scope, pattern, max_gram_bytes: as :class:`Pruner`.

    Returns:
        the finalized model (plain module, exact zeros).
    """
    schedule = OneShot(sparsity)  # validates sparsity before anything is touched
    if method.stats_mode is not None and calib is None:
        raise ConfigError(f"calib: {method!r} needs calibration inputs (an iterable of model-input tuples)")
    pruner = Pruner(model, method, schedule, targets=targets, exclude=exclude, scope=scope, pattern=pattern,
                    max_gram_bytes=max_gram_bytes)
    if pruner.stats is not None:
        pruner.stats.enabled = True
        with torch.no_grad():
            for batch in calib:
                _call(model, batch)
        pruner.stats.enabled = False
    pruner.prune_to(sparsity)
    return pruner.finalize()
