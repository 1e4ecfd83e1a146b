"""Sequential OBS with one shared inverse (the SparseGPT algorithm) in Gram form: the fast l0 solver.

Same problem as ``omp`` and ``obs`` — min ½(w − θ)ᵀG(w − θ) with k_i non-zeros in row i — solved
approximately in O(n³ + o·n²) per Gram instead of per-row factorizations (Frantar & Alistarh 2023).
Columns are visited left to right. When column j is decided, the columns to its right are the only
ones still free, for every row alike, so one upper Cholesky factor U of G⁻¹ serves all rows: pruning
w_ij moves the rest of the row by the exact OBS compensation restricted to the columns > j,

    err = w_ij / U_jj,    w_i,j: ← w_i,j: − err·U_j,j:.

Within each block of ``block`` columns the pruned positions are chosen adaptively from the current,
already compensated weights by the OBS saliency w_ij²/U_jj²; the block's errors then update the
columns to its right with one GEMM. Atoms outside ``allowed`` (a gradual step's already-pruned
weights) are always pruned first; the block shares of each row's budget follow its remaining columns.

The values returned are the compensated weights on the kept support, not its exact least-squares
refit (``obs`` and ``refit`` give that, at per-row cost); during gradual pruning the training that
follows absorbs the difference, which is why this is CSP's solver for in-training updates.

Tiers as in scikit-learn's ``_omp.py``: ``_sequential_kernel`` (all rows of all groups at once),
``sparsegpt_gram`` (factorization, budgets, result) and the small ``SparseGPT`` class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from csprune.solvers._common import SolverResult, quad_objective, validated
from csprune.errors import ConfigError

# Columns per lazy-update block: SparseGPT's 128 balances the adaptive mask choice (a block sees the
# compensation of all blocks before it) against one GEMM per block instead of one per column.
_BLOCK = 128


def _upper_inverse_factor(gram3: Tensor) -> tuple[Tensor, Tensor]:
    """([g, n, n] G⁻¹, [g, n, n] its upper Cholesky factor U, UᵀU = G⁻¹), with a growing jitter where G is singular."""
    n = gram3.shape[-1]
    eye = torch.eye(n, dtype=gram3.dtype, device=gram3.device)
    jitter = 0.0
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(gram3 + jitter * eye)
        if not bool((info != 0).any()):
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if not bool((info != 0).any()):
                return inv, upper
        scale = float(gram3.diagonal(dim1=-2, dim2=-1).mean().clamp_min(1e-30))
        jitter = scale * (1e-6 if jitter == 0.0 else 100 * jitter / scale)
    raise ConfigError("gram is not positive definite even with jitter; damp it (CSP damping > 0)")


def _sequential_kernel(upper: Tensor, w: Tensor, prune: Tensor, forced: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Kernel: prune ``prune[g, r]`` weights per row, sweeping the columns with a shared factor.

    Args:
        upper: [g, n, n] upper Cholesky factor of each group's G⁻¹.
        w: [g, r, n] weights (r rows per group).
        prune: [g, r] int64 weights to prune per row (>= the row's forced count).
        forced: [g, r, n] bool positions that must be pruned.
        block: columns per lazy-update block.

    Returns:
        (values [g, r, n] compensated weights, zero where pruned; pruned [g, r, n] bool).
    """
    g, r, n = w.shape
    w = w.clone()
    pruned = torch.zeros_like(forced)
    done = torch.zeros_like(prune)
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        cols = i2 - i1
        w1 = w[:, :, i1:i2].clone()
        u1 = upper[:, i1:i2, i1:i2]
        d = u1.diagonal(dim1=-2, dim2=-1).unsqueeze(1)  # [g, 1, cols]
        forced1 = forced[:, :, i1:i2]
        need = prune - done
        remaining = n - i1
        share = torch.round(need.to(w.dtype) * cols / remaining).to(torch.int64)
        low = torch.maximum(forced1.sum(-1), need - (remaining - cols))  # the columns after this block can take the rest
        count = torch.minimum(torch.maximum(share, low), torch.minimum(need, torch.full_like(need, cols)))
        saliency = (w1 * w1 / (d * d)).masked_fill(forced1, -1.0)  # forced positions rank first
        order = torch.argsort(saliency, dim=-1)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(cols, device=w.device).expand_as(order))
        mask1 = rank < count.unsqueeze(-1)  # [g, r, cols] pruned in this block
        err1 = torch.zeros_like(w1)
        for j in range(cols):
            col = w1[:, :, j]
            err = torch.where(mask1[:, :, j], col, torch.zeros_like(col)) / u1[:, j, j].unsqueeze(1)  # [g, r]
            w1[:, :, j:] -= err.unsqueeze(-1) * u1[:, j, j:].unsqueeze(1)
            err1[:, :, j] = err
        w[:, :, i1:i2] = w1.masked_fill(mask1, 0.0)
        if i2 < n:
            w[:, :, i2:] -= err1 @ upper[:, i1:i2, i2:]
        pruned[:, :, i1:i2] = mask1
        done += count
    return w, pruned


def sparsegpt_gram(
    gram3: Tensor,
    xy: Tensor,
    k: Tensor,
    groups: Tensor,
    *,
    allowed: Tensor | None = None,
    block: int = _BLOCK,
) -> SolverResult:
    """Function tier (inputs validated by ``solve``).

    Args:
        gram3: [g, n, n] Grams (damped, positive definite).
        xy: [o, n] correlations G·w_i.
        k: [o] int64 atoms kept per row (<= the allowed count).
        groups: [o] group of each row (contiguous equal groups).
        allowed: [o, n] bool atoms that may be kept (None: all).
        block: columns per lazy-update block.

    Returns:
        SolverResult with ``coef`` [o, n] and ``info["support"]`` [o, n] bool.
    """
    o, n = xy.shape
    g = gram3.shape[0]
    if block < 1:
        raise ConfigError(f"block={block}: must be >= 1")
    inv, upper = _upper_inverse_factor(gram3)
    w = torch.bmm(xy.reshape(g, o // g, n), inv).reshape(o, n)  # the signal w_i = G⁻¹·xy_i (pruning: the weights)
    allow = torch.ones(o, n, dtype=torch.bool, device=xy.device) if allowed is None else allowed
    w = w.masked_fill(~allow, 0.0)
    values, pruned = _sequential_kernel(upper, w.reshape(g, o // g, n), (n - k).reshape(g, o // g),
                                        (~allow).reshape(g, o // g, n), block)
    coef = values.reshape(o, n)
    support = ~pruned.reshape(o, n)
    return SolverResult(coef, n, 0.0, None, True, quad_objective(coef, gram3, xy), "sparsegpt",
                        {"support": support, "block": block})


class SparseGPT:
    """Class tier: ``SparseGPT(block=64)(gram, xy, k, allowed=mask)``."""

    def __init__(self, block: int = _BLOCK) -> None:
        self.options = {"block": block}

    def __call__(self, gram: Tensor, xy: Tensor, k: int | Tensor, allowed: Tensor | None = None) -> SolverResult:
        gram3, xy, groups, k_t, _, allowed_t = validated("sparsegpt", gram, xy, k, None, allowed, self.options)
        return sparsegpt_gram(gram3, xy, k_t, groups, allowed=allowed_t, **self.options)


__all__ = ["SparseGPT", "sparsegpt_gram"]
