"""Batched orthogonal matching pursuit in Gram form (the l0 form, exactly k_i atoms per row).

Tiers as in scikit-learn's ``_omp.py``: ``_omp_block_kernel`` (one chunk of rows, normalized Gram),
``_htp_refine`` (optional improvement-only refinement), ``omp_gram`` (normalization, chunking,
result), and the small ``OMP`` class for callers that keep options around.

Design for a CPU where GEMM is fast and per-row matrix-vector work is memory-bound:

* All rows move together. Each selection round refreshes the residual correlations of every row with
  one GEMM, ``corr = xy − θ·G`` (o×n×n), instead of per-row ``G[:, S]·γ`` products.
* Per row, the Cholesky factor L of G_SS grows by blocks in a contiguous, geometrically grown buffer
  (identity beyond the filled slots, so no per-round slicing copies); z = L⁻¹·xy_S grows with it and
  θ_S = L⁻ᵀ·z is one back-substitution per round.
* ``atoms_per_iter`` = a > 1 takes a atoms per round, chosen by an exact greedy OMP run restricted to
  a *pool* of the ``pool_size`` atoms with the largest correlations: the pool's residual Gram
  G_PP − VᵀV (V = L⁻¹·G_SP, one multi-right-hand-side triangular solve) lets the in-pool steps update
  the pool correlations exactly, so the round equals a OMP steps whenever the true OMP atoms stay in
  the pool. With a = 1 and pool 1 it is textbook OMP (same supports as
  ``sklearn.linear_model.orthogonal_mp_gram``). Rounds, and so GEMMs and triangular solves, drop a-fold.
* ``refine_iters`` rounds of hard-thresholding pursuit (Foucart 2011) then propose the top-k of
  |θ + ∇| per row, refit by least squares, and keep the proposal only for rows whose objective
  improves — the result never gets worse than the greedy support (but may then differ from
  sklearn's OMP support, by design; ``refine_iters=0`` and ``atoms_per_iter=1`` give plain OMP).

Atom selection runs on D^-½·G·D^-½ (D = diag G): the largest |c_j|/sqrt(G_jj), as for unit-norm atoms.

``allowed`` ([o, n] bool) restricts every row to its allowed atoms (a gradual pruning step without
regrowth: the current mask). Excluded atoms never enter the greedy selection, the in-pool steps or
the HTP proposals, so all k_i atoms of a row are spent inside its allowed set (k_i <= its size).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from csprune.solvers._common import SolverResult, rows_gram_matmul, validated
from csprune.solvers.refit import refit_rows
from csprune.errors import ConfigError

# Aim for about this many selection rounds when atoms_per_iter="auto": each round costs one o×n×n
# GEMM plus per-row triangular solves; with the pool and 2 HTP rounds, 32 rounds measured at or
# below exact OMP's error on a 1024×1024 layer at 50-90% sparsity (bench/solvers.py).
_AUTO_ROUNDS = 32
# Above this k, exact OMP's per-row triangular work (∝ k³) dominates; below it one atom a round is cheap.
_AUTO_EXACT_MAX_K = 64
# Elements of the per-row Cholesky factors [rows, k, k] held at once (2^27 fp32 = 512 MiB): one chunk up to k≈360 at o=1024.
_FACTOR_ELEMS = 1 << 27


def _resolve_variant(kmax: int, n: int, atoms_per_iter: Any, pool_size: Any, refine_iters: Any) -> tuple[int, int, int]:
    """Turn the "auto" options into numbers (see the module docstring)."""
    if atoms_per_iter == "auto":
        atoms = 1 if kmax <= _AUTO_EXACT_MAX_K else math.ceil(kmax / _AUTO_ROUNDS)
        atoms = min(atoms, kmax) if kmax else 1
    else:
        atoms = int(atoms_per_iter)
    if atoms < 1:
        raise ConfigError(f"atoms_per_iter must be >= 1 or 'auto', got {atoms_per_iter!r}")
    if pool_size == "auto":
        pool = 1 if atoms == 1 else 2 * atoms + 8
    else:
        pool = int(pool_size)
    if pool < atoms:
        raise ConfigError(f"pool_size must be >= atoms_per_iter = {atoms}, got {pool_size!r}")
    if refine_iters == "auto":
        refine = 0 if atoms == 1 else 2
    else:
        refine = int(refine_iters)
    if refine < 0:
        raise ConfigError(f"refine_iters must be >= 0 or 'auto', got {refine_iters!r}")
    return atoms, pool, refine


def _omp_block_kernel(
    gram_n3: Tensor,
    xy_n: Tensor,
    k: Tensor,
    groups: Tensor,
    atoms_per_iter: int,
    pool_size: int,
    allowed: Tensor | None = None,  # None: every atom may be selected
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Kernel: block OMP for one chunk of rows on a unit-diagonal Gram.

    Args:
        gram_n3: [g, n, n] normalized Gram (unit diagonal where the atom is non-zero).
        xy_n: [r, n] normalized correlations.
        k: [r] int64 atoms per row.
        groups: [r] gram group of each row (non-decreasing).
        atoms_per_iter: atoms added per round (a).
        pool_size: candidates per round (>= a); 1 with a = 1 is plain OMP.
        allowed: [r, n] bool atoms each row may select (k_i <= its count), or None for all.

    Returns:
        (θ [r, n], support [r, n] bool (a subset of ``allowed``), corr = xy − θ·G [r, n], rounds).
    """
    r, n = xy_n.shape
    dtype, device = xy_n.dtype, xy_n.device
    kmax = int(k.max()) if r else 0
    theta = torch.zeros(r, n, dtype=dtype, device=device)
    chosen = torch.zeros(r, n + 1, dtype=torch.bool, device=device)
    corr = xy_n.clone()
    if kmax == 0:
        return theta, chosen[:, :n], corr, 0
    excluded = None if allowed is None else ~allowed  # [r, n] atoms a row may never select
    g = gram_n3.shape[0]
    padded = torch.zeros(g, n + 1, n + 1, dtype=dtype, device=device)
    padded[:, :n, :n] = gram_n3
    padded[:, n, n] = 1.0  # index n is a phantom unit atom orthogonal to all: the filler of unused slots
    flat = padded.reshape(-1)
    base = (groups * (n + 1) ** 2).view(r, 1, 1)
    # slot_atom: the atom each Cholesky slot stands for (n: unused slot, or an atom that was linearly
    # dependent on the ones before it — it stays in the support with coefficient 0).
    slot_atom = torch.full((r, kmax), n, dtype=torch.int64, device=device)
    slot_offset = base.view(r, 1) + slot_atom * (n + 1)  # linear offset of each slot's padded Gram row
    # The factor lives in a contiguous [r, cap, cap] buffer, identity beyond the filled slots, so the
    # triangular solves run on it directly (slicing [:t, :t] would copy it every round); it grows
    # geometrically, which bounds both the re-copies and the work wasted on padding.
    cap = min(kmax, max(32, 2 * atoms_per_iter))
    chol = torch.eye(cap, dtype=dtype, device=device).expand(r, cap, cap).contiguous()
    z = torch.zeros(r, kmax, dtype=dtype, device=device)
    dep_tol = 100 * torch.finfo(dtype).eps  # residual norm² below which a unit atom counts as dependent
    t = 0
    rounds = 0
    while t < kmax:
        m = min(atoms_per_iter, kmax - t)
        if t + m > cap:
            new_cap = min(kmax, max(t + m, cap + cap // 2))
            grown = torch.zeros(r, new_cap, new_cap, dtype=dtype, device=device)
            grown.diagonal(dim1=1, dim2=2).fill_(1.0)
            grown[:, :cap, :cap] = chol
            chol, cap = grown, new_cap
        need = (k - t).clamp(0, m)
        p = min(max(pool_size, m), n - t)
        taken = chosen[:, :n] if excluded is None else chosen[:, :n] | excluded
        score = corr.abs().masked_fill(taken, -1.0)
        pool = score.argmax(dim=1, keepdim=True) if p == 1 else torch.topk(score, p, dim=1).indices
        corr_pool0 = torch.gather(corr, 1, pool)
        g_pp = torch.take(flat, base + pool.unsqueeze(2) * (n + 1) + pool.unsqueeze(1))
        if t > 0:
            # Unused slots hold the phantom atom n, whose Gram row is zero: V is zero there.
            g_sp = torch.take(flat, slot_offset[:, :cap].unsqueeze(2) + pool.unsqueeze(1))
            proj = torch.linalg.solve_triangular(chol, g_sp, upper=False)  # V = L⁻¹·G_SP  [r, cap, p]
            resid_gram = g_pp - proj.mT @ proj
        else:
            proj = None
            resid_gram = g_pp
        resid_gram0 = resid_gram.clone()
        corr_pool = corr_pool0.clone()
        # Pool members already chosen or not allowed (score −1; only where a row has fewer than p
        # selectable atoms) are never picked: a row's first `need` picks are always selectable atoms.
        blocked = torch.where(torch.gather(score, 1, pool) < 0, math.inf, 0.0).to(dtype)
        picked = torch.empty(r, m, dtype=torch.int64, device=device)
        independent = torch.empty(r, m, dtype=torch.bool, device=device)
        for step in range(m):
            j = (corr_pool.abs() - blocked).argmax(dim=1, keepdim=True)
            picked[:, step] = j.squeeze(1)
            blocked.scatter_(1, j, math.inf)
            col = torch.gather(resid_gram, 2, j.unsqueeze(1).expand(r, p, 1)).squeeze(2)
            pivot = torch.gather(col, 1, j).squeeze(1)
            ok = pivot > dep_tol
            independent[:, step] = ok
            safe = torch.where(ok, pivot, torch.ones_like(pivot))
            weight = torch.where(ok, torch.gather(corr_pool, 1, j).squeeze(1) / safe, torch.zeros_like(pivot))
            corr_pool = corr_pool - weight.unsqueeze(1) * col
            if step + 1 < m:
                scaled = torch.where(ok, 1.0 / safe, torch.zeros_like(pivot))
                resid_gram = resid_gram - (col * scaled.unsqueeze(1)).unsqueeze(2) * col.unsqueeze(1)
        take = torch.arange(m, device=device).unsqueeze(0) < need.unsqueeze(1)
        keep = take & independent
        atoms = torch.gather(pool, 1, picked)
        chosen.scatter_(1, torch.where(take, atoms, torch.full_like(atoms, n)), True)
        keep_f = keep.to(dtype)
        pair = keep_f.unsqueeze(2) * keep_f.unsqueeze(1)
        sub = torch.gather(torch.gather(resid_gram0, 1, picked.unsqueeze(2).expand(r, m, p)), 2, picked.unsqueeze(1).expand(r, m, m))
        sub = sub * pair + torch.diag_embed(1.0 - keep_f)
        block = torch.linalg.cholesky(sub)
        if proj is not None:
            lower = torch.gather(proj[:, :t], 2, picked.unsqueeze(1).expand(r, t, m)).mT * keep_f.unsqueeze(2)
            chol[:, t : t + m, :t] = lower
        chol[:, t : t + m, t : t + m] = block
        rhs = torch.gather(corr_pool0, 1, picked) * keep_f  # z₂ = L₂₂⁻¹·(xy_new − L₂₁·z₁) = L₂₂⁻¹·corr_new
        z[:, t : t + m] = torch.linalg.solve_triangular(block, rhs.unsqueeze(2), upper=False).squeeze(2)
        slot_atom[:, t : t + m] = torch.where(keep, atoms, torch.full_like(atoms, n))
        slot_offset[:, t : t + m] = base.view(r, 1) + slot_atom[:, t : t + m] * (n + 1)
        t += m
        rounds += 1
        gamma = torch.linalg.solve_triangular(chol.mT, z[:, :cap].unsqueeze(2), upper=True).squeeze(2)
        theta_ext = torch.zeros(r, n + 1, dtype=dtype, device=device)
        theta_ext.scatter_(1, slot_atom[:, :cap], gamma)
        theta = theta_ext[:, :n]
        corr = xy_n - rows_gram_matmul(theta, gram_n3, groups)
    return theta.contiguous(), chosen[:, :n], corr, rounds


def _topk_mask(score: Tensor, k: Tensor) -> Tensor:
    """[r, n] bool: the k_i largest entries of each row of ``score``."""
    kmax = int(k.max()) if score.shape[0] else 0
    mask = torch.zeros_like(score, dtype=torch.bool)
    if kmax == 0:
        return mask
    idx = torch.topk(score, kmax, dim=1).indices
    take = torch.arange(kmax, device=score.device).unsqueeze(0) < k.unsqueeze(1)
    mask.scatter_(1, idx, take)
    return mask


def _htp_refine(
    gram_n3: Tensor,
    xy_n: Tensor,
    k: Tensor,
    groups: Tensor,
    theta: Tensor,
    support: Tensor,
    corr: Tensor,
    iters: int,
    allowed: Tensor | None = None,  # None: proposals may use every atom
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Improvement-only hard-thresholding pursuit on a unit-diagonal Gram.

    Each round proposes S' = top-k_i of |θ + corr| (a unit gradient step) among the allowed atoms,
    refits on S', and accepts S' on the rows where ½θᵀGθ − θᵀxy decreases.

    Args:
        gram_n3: [g, n, n] normalized Gram; xy_n: [o, n]; k: [o] budgets; groups: [o].
        theta: [o, n] current solution; support: [o, n] bool; corr: [o, n] = xy − θ·G.
        iters: rounds at most.
        allowed: [o, n] bool atoms a proposal may use (k_i <= its count), or None for all.

    Returns:
        (θ, support, corr, rounds run).
    """
    objective = -0.5 * (theta * (xy_n + corr)).sum(dim=1)  # = ½θᵀGθ − θᵀxy when G_SS·θ_S = xy_S
    done = 0
    for _ in range(iters):
        step = (theta + corr).abs()
        proposal = _topk_mask(step if allowed is None else step.masked_fill(~allowed, -1.0), k)
        changed = (proposal != support).any(dim=1)
        if not bool(changed.any()):
            break
        done += 1
        idx = changed.nonzero().squeeze(1)
        theta_new = refit_rows(gram_n3, xy_n[idx], proposal[idx], groups[idx])
        corr_new = xy_n[idx] - rows_gram_matmul(theta_new, gram_n3, groups[idx])
        objective_new = -0.5 * (theta_new * (xy_n[idx] + corr_new)).sum(dim=1)
        better = objective_new < objective[idx] - 1e-12 * objective[idx].abs()
        if not bool(better.any()):
            break
        acc = idx[better]
        theta[acc], corr[acc], support[acc] = theta_new[better], corr_new[better], proposal[idx][better]
        objective[acc] = objective_new[better]
    return theta, support, corr, done


def omp_gram(
    gram3: Tensor,
    xy: Tensor,
    k: Tensor,
    groups: Tensor,
    atoms_per_iter: int | str = "auto",  # 1 (exact OMP) up to k=64, else ceil(k/32): GEMM/triangular cost ∝ rounds
    pool_size: int | str = "auto",  # 2·atoms_per_iter+8: room for the in-pool greedy to find the true OMP atoms
    refine_iters: int | str = "auto",  # 0 for exact OMP (keeps sklearn's support), else 2 improvement-only HTP rounds
    row_chunk: int | None = None,  # rows per chunk; None: as many as keep [rows, k, k] factors <= 512 MiB (fp32)
    allowed: Tensor | None = None,  # None: every atom; else [o, n] bool, e.g. the current mask (no regrowth)
) -> SolverResult:
    """Function tier: batched OMP on validated inputs.

    Args:
        gram3: [g, n, n] Gram per group.
        xy: [o, n].
        k: [o] int64 budgets, 0 <= k_i <= n.
        groups: [o] gram group of each row.
        atoms_per_iter: atoms added per round, or "auto".
        pool_size: candidate pool per round (>= atoms_per_iter), or "auto".
        refine_iters: HTP refinement rounds (improvement-only), or "auto".
        row_chunk: rows processed together.
        allowed: [o, n] bool atoms each row may select, with k_i <= its count (checked by ``solve``);
            None: all atoms.

    Returns:
        SolverResult with exactly k_i non-zeros per row (fewer only where the residual vanished
        first and the remaining atoms got coefficient 0), all inside ``allowed``; ``lam`` None,
        ``converged`` True; ``info["support"]`` the [o, n] bool selected atoms (k_i per row).
    """
    o, n = xy.shape
    kmax = int(k.max()) if o else 0
    atoms, pool, refine = _resolve_variant(kmax, n, atoms_per_iter, pool_size, refine_iters)
    diag = torch.diagonal(gram3, dim1=-2, dim2=-1)
    tiny = torch.finfo(xy.dtype).tiny
    scale = torch.where(diag > tiny, diag.clamp_min(tiny).sqrt(), torch.ones_like(diag))  # [g, n]
    gram_n3 = gram3 / scale.unsqueeze(2) / scale.unsqueeze(1)
    row_scale = scale[groups]
    xy_n = xy / row_scale
    if row_chunk is None:
        elems = _FACTOR_ELEMS * 4 // xy.element_size()  # same bytes in float64
        row_chunk = max(1, elems // max(1, kmax * kmax))
    elif int(row_chunk) < 1:
        raise ConfigError(f"row_chunk must be >= 1 or None, got {row_chunk!r}")
    row_chunk = int(row_chunk)
    theta = torch.zeros_like(xy)
    support = torch.zeros_like(xy, dtype=torch.bool)
    corr = xy_n.clone()
    rounds = 0
    for start in range(0, o, row_chunk):
        sl = slice(start, min(o, start + row_chunk))
        th, sup, cr, rd = _omp_block_kernel(
            gram_n3, xy_n[sl], k[sl], groups[sl], atoms, pool, None if allowed is None else allowed[sl]
        )
        theta[sl], support[sl], corr[sl] = th, sup, cr
        rounds = max(rounds, rd)
    refined = 0
    if refine > 0 and kmax > 0:
        theta, support, corr, refined = _htp_refine(gram_n3, xy_n, k, groups, theta, support, corr, refine, allowed)
    coef = theta / row_scale
    on_support = corr.abs() * support
    denom = xy_n.abs().amax(dim=1).clamp_min(tiny)
    gap = float((on_support.amax(dim=1) / denom).max()) if o and n else 0.0
    objective = -0.5 * (theta * (xy_n + corr)).sum(dim=1)
    return SolverResult(
        coef=coef,
        n_iter=rounds + refined,
        gap=gap,
        lam=None,
        converged=True,
        objective=objective,
        solver="omp",
        info={
            "atoms_per_iter": atoms,
            "pool_size": pool,
            "refine_iters_run": refined,
            "nnz": support.sum(dim=1),
            "support": support,
        },
    )


class OMP:
    """Class tier: holds OMP options; ``OMP(atoms_per_iter=4)(gram, xy, k)``."""

    def __init__(
        self,
        atoms_per_iter: int | str = "auto",
        pool_size: int | str = "auto",
        refine_iters: int | str = "auto",
        row_chunk: int | None = None,
    ) -> None:
        self.options = {
            "atoms_per_iter": atoms_per_iter,
            "pool_size": pool_size,
            "refine_iters": refine_iters,
            "row_chunk": row_chunk,
        }

    def __call__(self, gram: Tensor, xy: Tensor, k: int | Tensor, allowed: Tensor | None = None) -> SolverResult:
        gram3, xy, groups, k_t, _, allowed_t = validated("omp", gram, xy, k, None, allowed, self.options)
        return omp_gram(gram3, xy, k_t, groups, allowed=allowed_t, **self.options)


__all__ = ["OMP", "omp_gram"]
