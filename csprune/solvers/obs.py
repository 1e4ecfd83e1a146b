"""Batched backward elimination (optimal brain surgeon) in Gram form: the l0 form, warm-started.

Each row starts from its allowed support S (every atom when ``allowed`` is None; a gradual pruning
step passes the current mask) with the least-squares solution on it and the inverse of its Gram,

    θ_S = G_SS⁻¹·xy_S,    H = G_SS⁻¹,

and removes atoms until k_i are left. Removing a set Q from S raises ½θᵀGθ − θᵀxy by ½θ_Qᵀ·H_QQ⁻¹·θ_Q
(Hassibi & Stork 1993); each round takes, per row, the q atoms of least single-atom saliency
θ_j²/H_jj and applies the exact group update

    θ ← θ − H_:Q·H_QQ⁻¹·θ_Q,    H ← H − H_:Q·H_QQ⁻¹·H_Q:,

after which θ is again the least-squares solution on the smaller support and H its inverse Gram, so
no refit is needed at the end. The work is proportional to the atoms removed, not the atoms kept:
a gradual step that takes a layer from 35% to 50% sparsity only eliminates 15% of each row, where
forward OMP would re-select the 50% it keeps.

Tiers as in scikit-learn's ``_omp.py``: ``_start_inverse`` and ``_eliminate`` (kernels on one chunk of
rows), ``obs_gram`` (chunking, result), and the small ``OBS`` class.

The start inverse is computed in one of two exact ways, whichever is cheaper for the chunk:

* direct: Cholesky of the padded per-row blocks G_SS (∝ |S|³ per row);
* complement, from the group's shared G⁻¹: H = (G⁻¹)_SS − (G⁻¹)_SP·((G⁻¹)_PP)⁻¹·(G⁻¹)_PS with P the
  atoms already excluded (∝ |P|³ + |S|²·|P| per row; a copy of G⁻¹ when nothing is excluded yet).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from csprune.solvers._common import SolverResult, quad_objective
from csprune.solvers.refit import padded_gram_blocks, support_indices

# Rounds of group removal when rounds="auto": each round costs one batched rank-q update of the
# per-row inverses; 16 rounds measured within 0.5% of one-atom-at-a-time elimination's output error
# on AN4 Conformer layers (bench/solvers.py --obs-rounds), at 1/16 of the passes over memory.
_AUTO_ROUNDS = 16
# Elements of the per-row inverses [rows, m, m] held at once (2^25 fp32 = 128 MiB).
_BLOCK_ELEMS = 1 << 25


def _gather_cross(mat3: Tensor, groups: Tensor, rows_idx: Tensor, cols_idx: Tensor) -> Tensor:
    """[b, r, c] blocks mat3[group][rows_idx, cols_idx] per row; index n (padding) reads 0."""
    g, n = mat3.shape[0], mat3.shape[-1]
    padded = torch.zeros(g, n + 1, n + 1, dtype=mat3.dtype, device=mat3.device)
    padded[:, :n, :n] = mat3
    flat = padded.reshape(-1)
    lin = (rows_idx + groups.view(-1, 1) * (n + 1)).unsqueeze(2) * (n + 1) + cols_idx.unsqueeze(1)
    return torch.take(flat, lin)


def _start_inverse(gram3: Tensor, ginv3: Tensor | None, groups: Tensor, keep_idx: Tensor, drop_idx: Tensor | None) -> Tensor:
    """Kernel: H = G_SS⁻¹ per row of a chunk (identity on padding slots).

    Args:
        gram3: [g, n, n] Grams.
        ginv3: [g, n, n] their inverses (complement form), or None (direct form).
        groups: [b] group of each row.
        keep_idx: [b, m] support indices, padded with n.
        drop_idx: [b, p] excluded indices padded with n (complement form), or None.

    Returns:
        [b, m, m].
    """
    n = gram3.shape[-1]
    if ginv3 is None:
        blocks = padded_gram_blocks(gram3, groups, keep_idx)
        chol, info = torch.linalg.cholesky_ex(blocks)
        if bool((info != 0).any()):  # singular G_SS (undamped, rank-deficient): pseudo-inverse there
            bad = info != 0
            out = torch.empty_like(blocks)
            out[~bad] = torch.cholesky_inverse(chol[~bad])
            out[bad] = torch.linalg.pinv(blocks[bad], hermitian=True)
            return out
        return torch.cholesky_inverse(chol)
    inv_ss = padded_gram_blocks(ginv3, groups, keep_idx)
    if drop_idx is None or drop_idx.shape[1] == 0:
        return inv_ss
    inv_pp = padded_gram_blocks(ginv3, groups, drop_idx)
    inv_sp = _gather_cross(ginv3, groups, keep_idx, drop_idx)  # padding rows/cols read 0
    chol, info = torch.linalg.cholesky_ex(inv_pp)
    if bool((info != 0).any()):
        return _start_inverse(gram3, None, groups, keep_idx, None)
    half = torch.linalg.solve_triangular(chol, inv_sp.mT, upper=False)  # [b, p, m]
    inv = inv_ss - half.mT @ half
    pad = keep_idx == n  # the complement touched only real slots; restore exact identity on padding
    inv = inv.masked_fill(pad.unsqueeze(1) | pad.unsqueeze(2), 0.0)
    inv.diagonal(dim1=1, dim2=2).add_(pad.to(inv.dtype))
    return inv


def _eliminate(inv: Tensor, theta: Tensor, active: Tensor, remove: Tensor, rounds: int) -> int:
    """Kernel: remove ``remove[i]`` active atoms from each row of a chunk, in place.

    Args:
        inv: [b, m, m] inverse Gram of each row's active support (updated).
        theta: [b, m] least-squares solution on the active support (updated; zero when removed).
        active: [b, m] bool, slots still in the support (updated).
        remove: [b] int64 atoms to remove per row.
        rounds: group rounds; each row removes about remove[i]/rounds atoms per round.

    Returns:
        the number of rounds run.
    """
    b, m = theta.shape
    left = remove.clone()
    per_round = torch.clamp((remove + rounds - 1) // max(rounds, 1), min=1)
    eye = torch.eye(m, dtype=inv.dtype, device=inv.device)
    done_rounds = 0
    while bool((left > 0).any()):
        q = torch.minimum(per_round, left)  # [b]
        qmax = int(q.max())
        diag = inv.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(inv.dtype).tiny)
        saliency = (theta * theta / diag).masked_fill(~active, math.inf)
        sel = torch.topk(saliency, qmax, dim=1, largest=False).indices  # [b, qmax]
        use = torch.arange(qmax, device=theta.device).unsqueeze(0) < q.unsqueeze(1)  # [b, qmax]
        cols = torch.gather(inv, 2, sel.unsqueeze(1).expand(b, m, qmax)) * use.unsqueeze(1)  # H_:Q [b, m, qmax]
        hqq = torch.gather(cols, 1, sel.unsqueeze(2).expand(b, qmax, qmax))
        both = use.unsqueeze(1) & use.unsqueeze(2)
        hqq = torch.where(both, hqq, eye[:qmax, :qmax].expand(b, qmax, qmax))  # unused slots: decoupled units
        th_q = torch.gather(theta, 1, sel) * use
        chol, info = torch.linalg.cholesky_ex(hqq)
        if bool((info != 0).any()):  # lost definiteness to rounding: an exact solve is still fine
            rhs = torch.linalg.solve(hqq, torch.cat([th_q.unsqueeze(2), cols.mT], dim=2))
        else:
            rhs = torch.cholesky_solve(torch.cat([th_q.unsqueeze(2), cols.mT], dim=2), chol)
        theta -= (cols @ rhs[:, :, :1]).squeeze(2)
        inv -= cols @ rhs[:, :, 1:]
        gone = torch.zeros_like(active).scatter_(1, sel, use)
        active &= ~gone
        theta.masked_fill_(~active, 0.0)
        keep = active.unsqueeze(1) & active.unsqueeze(2)
        inv.masked_fill_(~keep, 0.0)  # removed atoms decouple exactly (rounding would leave ~1e-7 there)
        inv.diagonal(dim1=1, dim2=2).add_((~active).to(inv.dtype))
        left -= q
        done_rounds += 1
    return done_rounds


def obs_gram(
    gram3: Tensor,
    xy: Tensor,
    k: Tensor,
    groups: Tensor,
    *,
    allowed: Tensor | None = None,
    rounds: int | str = "auto",
    row_chunk: int | None = None,
    start: str = "auto",
) -> SolverResult:
    """Function tier: backward elimination for every row (inputs validated by ``solve``).

    Args:
        gram3: [g, n, n] symmetric positive definite Grams (damped).
        xy: [o, n] correlations (pruning: G·w_i).
        k: [o] int64 atoms to keep per row (<= the row's allowed count).
        groups: [o] group of each row.
        allowed: [o, n] bool start support, or None (all atoms).
        rounds: group-removal rounds ("auto": ``_AUTO_ROUNDS``; 0 or a number >= the atoms to remove:
            one atom at a time, the exact greedy elimination).
        row_chunk: rows per chunk (None: as many as fit ``_BLOCK_ELEMS``).
        start: "direct" | "complement" | "auto" (the cheaper by flop count, see the module docstring).

    Returns:
        SolverResult with ``coef`` [o, n] the least-squares solution on each row's final support,
        ``info["support"]`` [o, n] bool and ``info["rounds"]``.
    """
    o, n = xy.shape
    if start not in ("auto", "direct", "complement"):
        raise ValueError(f"start={start!r}: expected auto, direct or complement")
    rounds_n = _AUTO_ROUNDS if rounds == "auto" else int(rounds)
    if rounds_n < 0:
        raise ValueError(f"rounds={rounds!r}: must be 'auto' or an int >= 0")
    if rounds_n == 0:
        rounds_n = n  # one atom per round
    keep_mask = torch.ones(o, n, dtype=torch.bool, device=xy.device) if allowed is None else allowed
    counts = keep_mask.sum(1)
    m = int(counts.max()) if o else 0
    p = n - int(counts.min()) if o else 0
    coef = torch.zeros_like(xy)
    support = torch.zeros(o, n, dtype=torch.bool, device=xy.device)
    if o == 0 or m == 0:
        return SolverResult(coef, 0, 0.0, None, True, quad_objective(coef, gram3, xy), "obs", {"support": support, "rounds": 0})
    use_complement = start == "complement" or (start == "auto" and p ** 3 / 3 + m * m * p < m ** 3)
    ginv3 = None
    if use_complement:
        chol, info = torch.linalg.cholesky_ex(gram3)
        if bool((info != 0).any()):
            use_complement = False
        else:
            ginv3 = torch.cholesky_inverse(chol)
    chunk = row_chunk or max(1, _BLOCK_ELEMS // max(1, m * m))
    total_rounds = 0
    for lo in range(0, o, chunk):
        sl = slice(lo, min(o, lo + chunk))
        keep_idx, valid = support_indices(keep_mask[sl], width=m)
        drop_idx = None
        if use_complement and p > 0:
            drop_idx, _ = support_indices(~keep_mask[sl], width=p)
        inv = _start_inverse(gram3, ginv3, groups[sl], keep_idx, drop_idx)
        xy_s = torch.gather(torch.nn.functional.pad(xy[sl], (0, 1)), 1, keep_idx) * valid
        theta = (inv @ xy_s.unsqueeze(2)).squeeze(2) * valid
        active = valid.clone()
        total_rounds = max(total_rounds, _eliminate(inv, theta, active, counts[sl] - k[sl], rounds_n))
        rows = torch.arange(sl.stop - sl.start, device=xy.device).unsqueeze(1).expand_as(keep_idx)
        real = keep_idx < n
        coef[sl][rows[real], keep_idx[real]] = theta[real]
        support[sl][rows[real], keep_idx[real]] = active[real]
    objective = quad_objective(coef, gram3, xy)
    return SolverResult(coef, total_rounds, 0.0, None, True, objective, "obs",
                        {"support": support, "rounds": total_rounds, "start": "complement" if use_complement else "direct"})


class OBS:
    """Class tier: holds the options; ``OBS(rounds=8)(gram, xy, k, allowed=mask)``."""

    def __init__(self, rounds: int | str = "auto", row_chunk: int | None = None, start: str = "auto") -> None:
        self.options = {"rounds": rounds, "row_chunk": row_chunk, "start": start}

    def __call__(self, gram: Tensor, xy: Tensor, k: int | Tensor, allowed: Tensor | None = None) -> SolverResult:
        from csprune.solvers import solve

        return solve(gram, xy, k=k, solver="obs", allowed=allowed, **self.options)


__all__ = ["OBS", "obs_gram"]
