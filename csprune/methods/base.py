"""What every method shares: the per-tensor context, budgets from scores, N:M groups.

A method turns (weights, statistics, budget) into a mask, and optionally new
values for the kept weights (docs/design.md §1). Score-based methods (magnitude, random,
Wanda) only define :meth:`Method.score`; the pruner ranks scores within a row,
a tensor or all targets (``scope``) exactly as ``torch.nn.utils.prune`` does.
CSP also overrides :meth:`Method.select` to choose each row's support with a
sparse-recovery solver, given the per-row budgets the ranking produced.

Row floor (docs/design.md §3: budgets never starve a row that magnitude would keep alive).
At scope "layer" or "global" a data-driven score such as CSP's |w_ij|·√G_jj or
Wanda's |w_ij|·‖x_j‖ is compared across rows that read different inputs. For a
grouped or depthwise conv each channel has its own small Gram (e.g. 15 taps), and
the ranking then hands the budget out by each channel's input energy: channels with
quiet inputs lose every weight (measured on a 144-channel depthwise Conv1d: 35/61/112
empty channels at 0.5/0.7/0.9, against 0/0/29 for magnitude). A quiet channel is not an
unimportant one: a per-channel normalization usually follows (BatchNorm after the
Conformer's depthwise conv) and rescales it, so its layer-local output error says
little about its worth; and an empty row outputs only its bias for good (masks are
monotone, no gradient regrows it). So whenever magnitude, ranking |w| at the same
scope and sparsity, keeps a weight of a row, the row keeps at least one: the row's
best-scored weight is added and the lowest-scored kept weight elsewhere (never a row's
last one where the floor holds) gives way, so the budget is met exactly and every
other weight is still allocated by the method's own ranking. This is the smallest
change that meets the rule; row scope for grouped convs would drop the cross-row
allocation altogether, and allocating by marginal error reduction uses the same
layer-local error that undervalues these channels, so it would starve them as well.
Random pruning opts out (``row_floor = False``): it is the uninformed baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..stats import InputStats
from ..targets import Target
from ..errors import ConfigError

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
        gradual: True when this is one update of a gradual schedule (training continues after it and
            more updates follow); False for a one-shot step.
        final: True when this step reaches the schedule's final sparsity (always for a one-shot step).
    """

    target: Target
    stats: InputStats | None
    step: int
    allowed: torch.Tensor
    pattern: tuple[int, int] | None = None
    state: dict = field(default_factory=dict)
    gradual: bool = False
    final: bool = True


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
        row_floor: keep at least one weight in every row magnitude keeps alive (see the module doc).
    """

    name = "method"
    stats_mode: str | None = None
    train_l1: float = 0.0
    row_floor: bool = True  # docs/design.md §3: budgets never starve a row that magnitude would keep alive

    def observes(self, final: bool) -> bool:
        """Whether an update needs input statistics (``final``: it reaches the final sparsity); the
        pruner observes the ``stats_steps`` before an update only when this says so."""
        return self.stats_mode is not None

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
        raise ConfigError(f"pattern={pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'") from None
    if not 0 < n_keep < m:
        raise ConfigError(f"pattern={pattern!r}: need 0 < N < M")
    return n_keep, m


def prune_counts(sparsity: float, size: int) -> int:
    """Number of weights to zero: round(s·size), the rounding of torch.nn.utils.prune."""
    return int(round(sparsity * size))


def keep_from_scores(scores: list[torch.Tensor], sparsity: float, scope: str,
                     magnitudes: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Rank scores and keep the largest, pruning ``round(s·size)`` per row / tensor / all.

    The smallest scores are taken with ``topk(largest=False)`` over the flattened
    scores, exactly as ``torch.nn.utils.prune.l1_unstructured`` (scope "layer") and
    ``global_unstructured`` (scope "global") do, so magnitude masks match theirs.

    Args:
        scores: per target, [o, n] scores (-inf where a weight may not be kept).
        sparsity: fraction of zeros.
        scope: "row", "layer" or "global".
        magnitudes: per target, [o, n] |w| (-inf where a weight may not be kept), or None. When
            given, the row floor of the module doc is applied at scope "layer" / "global": no row
            is left empty where magnitude at this scope and sparsity keeps one, and the number
            pruned per tensor (layer) or in all (global) is unchanged. At scope "row" every row
            keeps ``n − round(s·n)`` weights, as magnitude does, so there is nothing to do.

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
        keeps = [_keep_flat(s, prune_counts(sparsity, s.numel())) for s in scores]
        if magnitudes is not None:
            keeps = [_row_floor(k.reshape(-1), s.reshape(-1), _row_ids(s), _alive_rows(m, prune_counts(sparsity, m.numel())),
                                s.shape[0]).view_as(s) for k, s, m in zip(keeps, scores, magnitudes)]
        return keeps
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores])
        keep = _keep_flat(flat, prune_counts(sparsity, flat.numel()))
        if magnitudes is not None:
            mags = torch.cat([m.reshape(-1) for m in magnitudes])
            mag_keep = _keep_flat(mags, prune_counts(sparsity, mags.numel())) & torch.isfinite(mags)
            offsets = [0]
            for s in scores:
                offsets.append(offsets[-1] + s.shape[0])
            row_id = torch.cat([_row_ids(s) + off for s, off in zip(scores, offsets)])
            need = torch.zeros(offsets[-1], dtype=torch.long, device=flat.device).scatter_add_(0, row_id, mag_keep.long()) > 0
            keep = _row_floor(keep, flat, row_id, need, offsets[-1])
        return [part.view_as(s) for part, s in zip(keep.split([s.numel() for s in scores]), scores)]
    raise ConfigError(f"scope={scope!r}: expected 'row', 'layer' or 'global'")


def _row_ids(scores: torch.Tensor) -> torch.Tensor:
    """Row index of every entry of an [o, n] tensor, flattened: [o·n] long."""
    o, n = scores.shape
    return torch.arange(o, device=scores.device).repeat_interleave(n)


def _alive_rows(magnitudes: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Rows of one tensor where layer-scope magnitude pruning keeps a weight that may be kept.

    Args:
        magnitudes: [o, n] |w|, -inf where a weight may not be kept.
        n_prune: weights magnitude prunes in the tensor.

    Returns:
        [o] bool.
    """
    return (_keep_flat(magnitudes, n_prune) & torch.isfinite(magnitudes)).any(1)


def _first_per_row(flags: torch.Tensor, row_id: torch.Tensor, rows: int) -> torch.Tensor:
    """Flat index of the first True entry of each row ([rows] long; ``flags.numel()`` where none)."""
    pos = torch.arange(flags.numel(), device=flags.device)
    first = torch.full((rows,), flags.numel(), dtype=torch.long, device=flags.device)
    return first.scatter_reduce_(0, row_id[flags], pos[flags], "amin")


def _row_max(key: torch.Tensor, row_id: torch.Tensor, rows: int) -> torch.Tensor:
    """Largest ``key`` of each row, [rows] (-inf for a row without entries)."""
    out = torch.full((rows,), float("-inf"), dtype=key.dtype, device=key.device)
    return out.scatter_reduce_(0, row_id, key, "amax")


def _row_floor(keep: torch.Tensor, scores: torch.Tensor, row_id: torch.Tensor, need: torch.Tensor,
               rows: int) -> torch.Tensor:
    """Give each row in ``need`` at least one kept weight without changing how many are kept.

    Every needy empty row gets its best-scored weight that may be kept; as many kept weights
    then give way, the lowest-scored first, never the best-scored kept weight of a needy row.
    There are always enough: the needy rows are rows magnitude keeps alive with the same
    budget, so they number at most the kept weights.

    Args:
        keep: [N] bool keep mask over the scope, flattened.
        scores: [N] the ranking it came from (-inf: may not be kept).
        row_id: [N] long, the row of each entry (0 … rows−1).
        need: [rows] bool, rows that must keep a weight.
        rows: number of rows.

    Returns:
        [N] bool, the same number of True as ``keep``.
    """
    n = keep.numel()
    count = torch.zeros(rows, dtype=torch.long, device=keep.device).scatter_add_(0, row_id, keep.long())
    empty = need & (count == 0)
    if not bool(empty.any()):
        return keep
    finite = torch.isfinite(scores)
    best = finite & (scores == _row_max(scores.masked_fill(~finite, float("-inf")), row_id, rows)[row_id])
    add = _first_per_row(best, row_id, rows)[empty]
    add = add[add < n]  # a row with nothing that may be kept stays empty (magnitude keeps none there either)
    keep = keep.clone()
    keep[add] = True
    kept_key = scores.masked_fill(~keep, float("-inf"))
    top = keep & (kept_key == _row_max(kept_key, row_id, rows)[row_id])
    protect = _first_per_row(top, row_id, rows)[need]
    candidate = keep.clone()
    candidate[protect[protect < n]] = False
    if int(candidate.sum()) < add.numel():  # cannot happen when ``need`` comes from magnitude at the same budget
        raise RuntimeError("row floor: more rows to keep alive than weights in the budget")
    drop = torch.topk(scores.masked_fill(~candidate, float("inf")), add.numel(), largest=False).indices
    keep[drop] = False
    return keep


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
        raise ConfigError(f"N:M pattern needs the input width ({n}) divisible by M={m}")
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
