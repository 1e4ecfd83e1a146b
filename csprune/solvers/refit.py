"""Least-squares refit on a fixed support: θ_S = G_SS⁻¹·xy_S per row, zero elsewhere.

Kernel → function tiers as in scikit-learn's ``_omp.py``: ``_refit_cholesky_rows`` does one chunk of
rows with gathered, padded G_SS blocks; ``_refit_cg`` runs conjugate gradients on the masked G (one
GEMM per iteration, no [o, k, k] blocks — for big problems); ``refit`` validates and dispatches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from csprune.solvers._common import check_problem, gram_matmul, row_groups
from csprune.errors import ConfigError

# Elements of gathered [rows, k, k] blocks held at once: 2^25 fp32 = 128 MiB, keeps memory modest.
_BLOCK_ELEMS = 1 << 25


def support_indices(mask: Tensor, width: int | None = None, pad: int | None = None) -> tuple[Tensor, Tensor]:
    """Sorted support indices per row, padded to a common width.

    Args:
        mask: [o, n] bool.
        width: padded width (default: max support size).
        pad: index used for padding (default n, one past the last atom).

    Returns:
        (idx [o, width] int64 with padding ``pad``, valid [o, width] bool).
    """
    o, n = mask.shape
    counts = mask.sum(dim=1)
    width = int(counts.max()) if width is None else width
    pad = n if pad is None else pad
    # Stable sort puts the True entries first, in index order.
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    idx = torch.where(valid, order, torch.full_like(order, pad))
    return idx, valid


def padded_gram_blocks(gram3: Tensor, groups: Tensor, idx: Tensor) -> Tensor:
    """G_SS per row, with the padding slots forming an identity block.

    A row with |S| = c < w support slots gets ``[[G_SS, 0], [0, I_{w−c}]]``: every padding slot is
    its own unit, orthogonal atom, so the block stays positive definite whenever G_SS is, Cholesky
    succeeds, and the zero right-hand side on the padding keeps those coefficients at zero. (All
    padding slots share the index n, so gathering a padded Gram with a 1 at [n, n] would fill the
    whole (w−c)×(w−c) padding block with ones: singular for w − c >= 2.)

    Args:
        gram3: [g, n, n] Gram per group.
        groups: [r] int64 group of each row.
        idx: [r, w] int64 indices in [0, n], n meaning padding.

    Returns:
        [r, w, w] blocks, in gram3's dtype and device.
    """
    g, n = gram3.shape[0], gram3.shape[-1]
    padded = torch.zeros(g, n + 1, n + 1, dtype=gram3.dtype, device=gram3.device)
    padded[:, :n, :n] = gram3  # row/column n stays zero: padding couples to nothing
    flat = padded.reshape(-1)
    rows, w = idx.shape
    out = torch.empty(rows, w, w, dtype=gram3.dtype, device=gram3.device)
    step = max(1, (1 << 22) // max(1, w * w))  # index chunks of ~4M int64 (32 MiB) stay cache-friendly
    for start in range(0, rows, step):
        sl = slice(start, min(rows, start + step))
        lin = (idx[sl] + groups[sl].view(-1, 1) * (n + 1)).unsqueeze(2) * (n + 1)  # row offsets
        lin = lin + idx[sl].unsqueeze(1)  # one [r, w, w] temporary
        out[sl] = torch.take(flat, lin)
    out.diagonal(dim1=1, dim2=2).add_((idx == n).to(gram3.dtype))  # identity on the padding slots only
    return out


def _refit_cholesky_rows(gram3: Tensor, xy: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """Kernel: exact refit of a chunk of rows by batched Cholesky (pseudo-inverse where singular).

    Args:
        gram3: [g, n, n]; xy: [r, n]; mask: [r, n] bool; groups: [r].

    Returns:
        [r, n] coefficients.
    """
    r, n = xy.shape
    coef = torch.zeros(r, n + 1, dtype=xy.dtype, device=xy.device)
    if r == 0 or not bool(mask.any()):
        return coef[:, :n]
    idx, valid = support_indices(mask)
    blocks = padded_gram_blocks(gram3, groups, idx)
    rhs = torch.where(valid, torch.gather(torch.nn.functional.pad(xy, (0, 1)), 1, idx), torch.zeros((), dtype=xy.dtype, device=xy.device))
    chol, info = torch.linalg.cholesky_ex(blocks)
    sol = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):  # singular G_SS (G only PSD): minimum-norm least squares on those rows
        sol[bad] = (torch.linalg.pinv(blocks[bad], hermitian=True) @ rhs[bad].unsqueeze(-1)).squeeze(-1)
    coef.scatter_(1, idx, torch.where(valid, sol, torch.zeros_like(sol)))
    return coef[:, :n]


def _refit_cg(
    gram3: Tensor, xy: Tensor, mask: Tensor, max_iter: int, tol: float, theta0: Tensor | None
) -> tuple[Tensor, int, float]:
    """Kernel: Jacobi-preconditioned conjugate gradients on M·G·M + (I − M), all rows at once.

    Args:
        gram3: [g, n, n]; xy: [o, n]; mask: [o, n] bool.
        max_iter: CG iterations at most.
        tol: stop when every row has ‖residual‖ <= tol·‖xy_S‖.
        theta0: optional [o, n] warm start (masked).

    Returns:
        (coef [o, n], iterations, max relative residual).
    """
    m = mask.to(xy.dtype)
    g = gram3.shape[0]
    diag = torch.diagonal(gram3, dim1=-2, dim2=-1).repeat_interleave(xy.shape[0] // g, dim=0)
    precond = torch.where(mask & (diag > 0), 1.0 / diag.clamp_min(torch.finfo(xy.dtype).tiny), m)

    def apply(v: Tensor) -> Tensor:
        return gram_matmul(v * m, gram3) * m + v * (1 - m)

    rhs = xy * m
    x = torch.zeros_like(xy) if theta0 is None else theta0 * m
    res = rhs - apply(x)
    z = precond * res
    p = z.clone()
    rz = (res * z).sum(dim=1)
    rhs_norm = rhs.norm(dim=1).clamp_min(torch.finfo(xy.dtype).tiny)
    rel = float((res.norm(dim=1) / rhs_norm).max()) if xy.numel() else 0.0
    it = 0
    while it < max_iter and rel > tol:
        ap = apply(p)
        alpha = rz / (p * ap).sum(dim=1).clamp_min(torch.finfo(xy.dtype).tiny)
        x = x + alpha.unsqueeze(1) * p
        res = res - alpha.unsqueeze(1) * ap
        z = precond * res
        rz_new = (res * z).sum(dim=1)
        p = z + (rz_new / rz.clamp_min(torch.finfo(xy.dtype).tiny)).unsqueeze(1) * p
        rz = rz_new
        it += 1
        rel = float((res.norm(dim=1) / rhs_norm).max())
    return x * m, it, rel


def refit_rows(gram3: Tensor, xy: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """Function tier without input checks: chunked exact refit (used by the solvers).

    Args:
        gram3: [g, n, n]; xy: [o, n]; mask: [o, n] bool; groups: [o].

    Returns:
        [o, n].
    """
    o, n = xy.shape
    width = int(mask.sum(dim=1).max()) if o else 0
    chunk = max(1, _BLOCK_ELEMS // max(1, width * width))
    out = torch.zeros_like(xy)
    for start in range(0, o, chunk):
        stop = min(o, start + chunk)
        out[start:stop] = _refit_cholesky_rows(gram3, xy[start:stop], mask[start:stop], groups[start:stop])
    return out


def refit(
    gram: Tensor,
    xy: Tensor,
    mask: Tensor,
    method: str = "cholesky",  # exact; "cg" avoids [o, k, k] blocks when k is large
    max_iter: int = 500,  # CG only: iterations at most
    tol: float = 1e-6,  # CG only: relative residual to stop at
) -> Tensor:
    """Least-squares refit on a fixed support.

    For each row i: θ_S = G_SS⁻¹·xy_S on S = {j : mask[i, j]}, zero elsewhere. Rows with an empty
    support give zeros; full-support rows give the unconstrained solve. A singular G_SS (G only PSD)
    gives the minimum-norm least-squares solution.

    Args:
        gram: [n, n] or [g, n, n] (rows of group j use gram[j]).
        xy: [o, n].
        mask: [o, n] bool (or 0/1) support.
        method: "cholesky" (exact, chunked batched Cholesky) or "cg" (conjugate gradients on the
            masked G, one GEMM per iteration).
        max_iter: CG iteration limit.
        tol: CG relative residual tolerance.

    Returns:
        [o, n] coefficients with exact zeros off the support.
    """
    gram3, xy, g = check_problem(gram, xy)
    if not isinstance(mask, Tensor) or mask.shape != xy.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ConfigError(f"mask must be a tensor of the shape of xy {tuple(xy.shape)}, got {shape}")
    mask = mask.to(device=xy.device) != 0
    if method == "cholesky":
        return refit_rows(gram3, xy, mask, row_groups(xy.shape[0], g, xy.device))
    if method == "cg":
        return _refit_cg(gram3, xy, mask, max_iter, tol, None)[0]
    raise ConfigError(f"method must be 'cholesky' or 'cg', got {method!r}")
