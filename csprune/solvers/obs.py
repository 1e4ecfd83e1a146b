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

Two exact representations of H, whichever is cheaper for the chunk (same result up to rounding):

* direct: H itself, [m, m] per row, from a Cholesky of the padded blocks G_SS (∝ |S|³ + |S|²·r per row);
  the cheap one at high sparsity, where |S| is small;
* complement: H = (G⁻¹)_SS − B·Bᵀ with B = (G⁻¹)_:P·L_P⁻ᵀ (L_P the Cholesky factor of (G⁻¹)_PP, P the
  atoms removed so far), from the group's shared G⁻¹. Removing Q appends |Q| columns to B; diag H
  and H_:Q are read off B, so H is never formed (∝ |P₀|³/3 + n·|P₀|² + n·(|P|² − |P₀|²)/2 per row): the
  cheap one at low sparsity, and a first step from a dense layer costs n·r²/2 per row instead of n²·r.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from csprune.solvers._common import SolverResult, quad_objective, validated
from csprune.solvers.refit import padded_gram_blocks, support_indices
from csprune.errors import ConfigError

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


def _start_inverse(gram3: Tensor, groups: Tensor, keep_idx: Tensor) -> Tensor:
    """Kernel (direct form): H = G_SS⁻¹ per row of a chunk, identity on padding slots.

    Args:
        gram3: [g, n, n] Grams.
        groups: [b] group of each row.
        keep_idx: [b, m] support indices, padded with n.

    Returns:
        [b, m, m].
    """
    blocks = padded_gram_blocks(gram3, groups, keep_idx)
    chol, info = torch.linalg.cholesky_ex(blocks)
    if bool((info != 0).any()):  # singular G_SS (undamped, rank-deficient): pseudo-inverse there
        bad = info != 0
        out = torch.empty_like(blocks)
        out[~bad] = torch.cholesky_inverse(chol[~bad])
        out[bad] = torch.linalg.pinv(blocks[bad], hermitian=True)
        return out
    return torch.cholesky_inverse(chol)


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
        theta.unsqueeze(2).baddbmm_(cols, rhs[:, :, :1], alpha=-1.0)
        inv.baddbmm_(cols, rhs[:, :, 1:], alpha=-1.0)  # in place: one pass over the [b, m, m] inverses a round
        gone = torch.zeros_like(active).scatter_(1, sel, use)
        active &= ~gone
        # The update leaves the removed rows and columns of H at zero up to rounding (H_Q: − H_QQ·H_QQ⁻¹·H_Q:);
        # they are never selected again (saliency +inf), so only θ is cleaned, not the whole [b, m, m] H.
        theta.masked_fill_(~active, 0.0)
        left -= q
        done_rounds += 1
    return done_rounds


def _eliminate_complement(ginv3: Tensor, groups: Tensor, w: Tensor, allowed: Tensor, remove: Tensor, rounds: int) -> tuple[Tensor, Tensor, int]:
    """Kernel: backward elimination of a chunk of rows in the complement form (see the module docstring).

    Args:
        ginv3: [g, n, n] inverse Grams.
        groups: [b] group of each row.
        w: [b, n] signals w_i = G⁻¹·xy_i (pruning: the weights; zero where not allowed).
        allowed: [b, n] bool start support S₀.
        remove: [b] int64 atoms to remove per row.
        rounds: group rounds (about remove[i]/rounds atoms per row and round).

    Returns:
        (θ [b, n] least-squares solution on the final support, support [b, n] bool, rounds run).
    """
    b, n = w.shape
    ginv_rows = ginv3.expand(b, n, n) if ginv3.shape[0] == 1 else ginv3[groups]  # [b, n, n]
    drop0 = ~allowed
    p0 = int(drop0.sum(1).max())
    width = p0 + int(remove.max()) + rounds  # each round appends max_i q_i columns: at most ⌈r/rounds⌉ each
    basis = torch.zeros(b, n, max(width, 1), dtype=w.dtype, device=w.device)  # B, columns filled left to right
    theta = w.masked_fill(drop0, 0.0)
    if p0:
        idx, valid = support_indices(drop0, width=p0)
        cols = _gather_cross(ginv3, groups, torch.arange(n, device=w.device).expand(b, n), idx)  # (G⁻¹)_:P0 [b, n, p0]
        block = padded_gram_blocks(ginv3, groups, idx)
        chol, info = torch.linalg.cholesky_ex(block)
        if bool((info != 0).any()):
            raise torch.linalg.LinAlgError("(G⁻¹)_PP is not positive definite")
        basis[:, :, :p0] = torch.linalg.solve_triangular(chol, cols.mT, upper=False).mT  # B0 = (G⁻¹)_:P0·L⁻ᵀ
        w_p = torch.gather(torch.nn.functional.pad(w, (0, 1)), 1, idx) * valid
        z = torch.linalg.solve_triangular(chol, w_p.unsqueeze(2), upper=False)  # L⁻¹·w_P0
        theta = (w - (basis[:, :, :p0] @ z).squeeze(2)).masked_fill(drop0, 0.0)
    filled = p0
    diag = ginv_rows.diagonal(dim1=1, dim2=2) - basis[:, :, :filled].pow(2).sum(2)
    active = allowed.clone()
    left = remove.clone()
    per_round = torch.clamp((remove + rounds - 1) // max(rounds, 1), min=1)
    done_rounds = 0
    while bool((left > 0).any()):
        q = torch.minimum(per_round, left)
        qmax = int(q.max())
        saliency = (theta * theta / diag.clamp_min(torch.finfo(w.dtype).tiny)).masked_fill(~active, math.inf)
        sel = torch.topk(saliency, qmax, dim=1, largest=False).indices  # [b, qmax]
        use = torch.arange(qmax, device=w.device).unsqueeze(0) < q.unsqueeze(1)
        # H_:Q = (G⁻¹)_:Q − B·B_Qᵀ; unused slots are zero columns
        h_q = torch.gather(ginv_rows, 2, sel.unsqueeze(1).expand(b, n, qmax))
        if filled:
            b_q = torch.gather(basis[:, :, :filled], 1, sel.unsqueeze(2).expand(b, qmax, filled))  # [b, qmax, filled]
            h_q = h_q - basis[:, :, :filled] @ b_q.mT
        h_q = h_q * use.unsqueeze(1)
        h_qq = torch.gather(h_q, 1, sel.unsqueeze(2).expand(b, qmax, qmax))
        both = use.unsqueeze(1) & use.unsqueeze(2)
        eye = torch.eye(qmax, dtype=w.dtype, device=w.device)
        h_qq = torch.where(both, h_qq, eye)
        chol, info = torch.linalg.cholesky_ex(h_qq)
        if bool((info != 0).any()):  # rounding cost definiteness: regularise the tiny block
            h_qq = h_qq + eye * (1e-6 * h_qq.diagonal(dim1=1, dim2=2).abs().mean(1, keepdim=True).unsqueeze(2) + 1e-30)
            chol = torch.linalg.cholesky(h_qq)
        new = torch.linalg.solve_triangular(chol, h_q.mT, upper=False).mT  # C = H_:Q·L_Q⁻ᵀ [b, n, qmax]
        th_q = torch.gather(theta, 1, sel) * use
        theta = theta - (new @ torch.linalg.solve_triangular(chol, th_q.unsqueeze(2), upper=False)).squeeze(2)
        basis[:, :, filled:filled + qmax] = new
        filled += qmax
        diag = diag - new.pow(2).sum(2)
        gone = torch.zeros_like(active).scatter_(1, sel, use)
        active &= ~gone
        theta = theta.masked_fill(~active, 0.0)
        left -= q
        done_rounds += 1
    return theta, active, done_rounds


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
        start: the representation of H: "direct" | "complement" | "auto" (the cheaper by flop count,
            see the module docstring).

    Returns:
        SolverResult with ``coef`` [o, n] the least-squares solution on each row's final support,
        ``info["support"]`` [o, n] bool and ``info["rounds"]``.
    """
    o, n = xy.shape
    if start not in ("auto", "direct", "complement"):
        raise ConfigError(f"start={start!r}: expected auto, direct or complement")
    rounds_n = _AUTO_ROUNDS if rounds == "auto" else int(rounds)
    if rounds_n < 0:
        raise ConfigError(f"rounds={rounds!r}: must be 'auto' or an int >= 0")
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
    removed = counts - k
    r_max = int(removed.max())
    direct_cost = m ** 3 + 2 * m * m * r_max
    complement_cost = p ** 3 / 3 + n * p * p + n * ((p + r_max) ** 2 - p * p) / 2
    use_complement = start == "complement" or (start == "auto" and complement_cost < direct_cost)
    ginv3 = None
    if use_complement:
        chol, info = torch.linalg.cholesky_ex(gram3)
        if bool((info != 0).any()):
            use_complement = False
        else:
            ginv3 = torch.cholesky_inverse(chol)
    if use_complement:
        signal = torch.bmm(xy.reshape(gram3.shape[0], -1, n), ginv3).reshape(o, n)  # w_i = G⁻¹·xy_i
        width = p + r_max + rounds_n
        chunk = row_chunk or max(1, _BLOCK_ELEMS // max(1, n * max(n, width)))
    else:
        chunk = row_chunk or max(1, _BLOCK_ELEMS // max(1, m * m))
    total_rounds = 0
    for lo in range(0, o, chunk):
        sl = slice(lo, min(o, lo + chunk))
        if use_complement:
            theta, active, used = _eliminate_complement(ginv3, groups[sl], signal[sl], keep_mask[sl], removed[sl], rounds_n)
            coef[sl] = theta
            support[sl] = active
            total_rounds = max(total_rounds, used)
            continue
        keep_idx, valid = support_indices(keep_mask[sl], width=m)
        inv = _start_inverse(gram3, groups[sl], keep_idx)
        xy_s = torch.gather(torch.nn.functional.pad(xy[sl], (0, 1)), 1, keep_idx) * valid
        theta = (inv @ xy_s.unsqueeze(2)).squeeze(2) * valid
        active = valid.clone()
        total_rounds = max(total_rounds, _eliminate(inv, theta, active, removed[sl], rounds_n))
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
        gram3, xy, groups, k_t, _, allowed_t = validated("obs", gram, xy, k, None, allowed, self.options)
        return obs_gram(gram3, xy, k_t, groups, allowed=allowed_t, **self.options)


__all__ = ["OBS", "obs_gram"]
