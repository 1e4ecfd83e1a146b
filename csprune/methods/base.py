"""What every method shares: the per-tensor context, budgets from scores, N:M groups.

A method turns (weights, statistics, budget) into a mask, and optionally new
values for the kept weights (DESIGN §1). Score-based methods (magnitude, random,
Wanda) only define :meth:`Method.score`; the pruner ranks scores within a row,
a tensor or all targets (``scope``) exactly as ``torch.nn.utils.prune`` does.
CSP also overrides :meth:`Method.select` to choose each row's support with a
sparse-recovery solver, given the per-row budgets the ranking produced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..stats import InputStats
from ..targets import Target

__all__ = ["Method", "LayerContext", "Selection", "parse_pattern", "prune_counts", "keep_from_scores", "nm_keep", "rank_keep"]

log = logging.getLogger("csprune")


@dataclass
class LayerContext:
    """What a method may look at for one target.

    Attributes:
        target: the tensor being pruned.
        stats: input statistics collected since the last pruning step (None for data-free methods).
        step: optimizer step of this pruning event (seeds random choices).
        allowed: [o, n] bool, positions that may be kept (the previous mask unless regrowing).
        pattern: None for unstructured, (N, M) for N:M.
        state: per-target scratch the method may keep between pruning steps (e.g. warm starts).
    """

    target: Target
    stats: InputStats | None
    step: int
    allowed: torch.Tensor
    pattern: tuple[int, int] | None = None
    state: dict = field(default_factory=dict)


@dataclass
class Selection:
    """A method's answer for one target.

    Attributes:
        mask: [o, n] bool, True = kept.
        values: [o, n] new weights (zero off the mask), or None to keep the current ones.
        info: scalars for logging (solver iterations, residual, seconds, ...).
    """

    mask: torch.Tensor
    values: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


class Method:
    """Base class: a small callable object per method (Torch-Pruning style).

    Attributes:
        name: short name used in logs and configs.
        stats_mode: None (data-free), "diag" (needs E[x_j²]) or "full" (needs Gram matrices).
        train_l1: coefficient of the sparsity-inducing ℓ1 term added by ``Pruner.penalty()``.
    """

    name = "method"
    stats_mode: str | None = None
    train_l1: float = 0.0

    def score(self, rows: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """Importance of each weight (higher = keep).

        Args:
            rows: [o, n] current weights (row view).
            ctx: the target's context.

        Returns:
            [o, n] float scores.
        """
        raise NotImplementedError

    def select(self, rows: torch.Tensor, keep: torch.Tensor, ctx: LayerContext) -> Selection:
        """Final mask (and values) given the score-ranked ``keep`` mask; default: use it as is."""
        return Selection(keep)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "2:4" -> (2, 4)."""
    if pattern == "unstructured":
        return None
    try:
        n_keep, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern={pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'") from None
    if not 0 < n_keep < m:
        raise ValueError(f"pattern={pattern!r}: need 0 < N < M")
    return n_keep, m


def prune_counts(sparsity: float, size: int) -> int:
    """Number of weights to zero: round(s·size), the rounding of torch.nn.utils.prune."""
    return int(round(sparsity * size))


def keep_from_scores(scores: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Rank scores and keep the largest, pruning ``round(s·size)`` per row / tensor / all.

    The smallest scores are taken with ``topk(largest=False)`` over the flattened
    scores, exactly as ``torch.nn.utils.prune.l1_unstructured`` (scope "layer") and
    ``global_unstructured`` (scope "global") do, so magnitude masks match theirs.

    Args:
        scores: per target, [o, n] scores.
        sparsity: fraction of zeros.
        scope: "row", "layer" or "global".

    Returns:
        per target, [o, n] bool keep masks.
    """
    if scope == "row":
        out = []
        for s in scores:
            k = prune_counts(sparsity, s.shape[1])
            keep = torch.ones_like(s, dtype=torch.bool)
            if k:
                idx = torch.topk(s, k, dim=1, largest=False).indices
                keep.scatter_(1, idx, False)
            out.append(keep)
        return out
    if scope == "layer":
        return [_keep_flat(s, prune_counts(sparsity, s.numel())) for s in scores]
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores])
        keep = _keep_flat(flat, prune_counts(sparsity, flat.numel()))
        return [part.view_as(s) for part, s in zip(keep.split([s.numel() for s in scores]), scores)]
    raise ValueError(f"scope={scope!r}: expected 'row', 'layer' or 'global'")


def _keep_flat(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune:
        keep[torch.topk(scores.reshape(-1), n_prune, largest=False).indices] = False
    return keep.view_as(scores)


def nm_keep(scores: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """Keep the ``n_keep`` largest scores in each group of ``m`` consecutive inputs.

    Args:
        scores: [o, n] with n % m == 0.

    Returns:
        [o, n] bool keep mask.
    """
    o, n = scores.shape
    if n % m:
        raise ValueError(f"N:M pattern needs the input width ({n}) divisible by M={m}")
    grouped = scores.reshape(o, n // m, m)
    idx = torch.topk(grouped, n_keep, dim=2).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(o, n)


def rank_keep(key: torch.Tensor, k_rows: torch.Tensor) -> torch.Tensor:
    """Keep the ``k_rows[i]`` largest entries of each row of ``key``.

    Args:
        key: [o, n] ranking key.
        k_rows: [o] int budgets.

    Returns:
        [o, n] bool.
    """
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order))
    return ranks < k_rows.to(key.device).unsqueeze(1)
