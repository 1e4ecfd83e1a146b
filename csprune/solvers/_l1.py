"""What every l1 solver shares: λ bisection to a k-budget and iteratively reweighted l1 rounds.

A solver plugs in as ``solve_pen(rows, penalty, warm) -> L1Solve``: solve the weighted problem
min_θ ½θᵀGθ − θᵀxy + Σ_j penalty_j|θ_j| for the listed rows. The driver never looks inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class L1Solve:
    """One weighted-l1 solve of a subset of rows.

    Attributes:
        coef: [r, n].
        n_iter: iterations spent.
        rel_gap: [r] relative duality gap per row.
        converged: [r] bool.
    """

    coef: Tensor
    n_iter: int
    rel_gap: Tensor
    converged: Tensor


SolvePen = Callable[[Tensor, Tensor, "Tensor | None"], L1Solve]


@dataclass
class L1Outcome:
    """Result of the driver: coef [o, n], lam [o], n_iter, rel_gap [o], converged [o], bisection steps."""

    coef: Tensor
    lam: Tensor
    n_iter: int
    rel_gap: Tensor
    converged: Tensor
    steps: int


def bisect_lambda(
    solve_pen: SolvePen,
    xy: Tensor,
    weights: Tensor,
    k: Tensor,
    lam_init: Tensor | None,
    unconstrained: Callable[[Tensor], Tensor],
    max_steps: int,
    rtol: float,
) -> L1Outcome:
    """Per-row λ such that the l1 solution has at most k_i non-zeros, as many as possible.

    Rows with k_i = 0 get θ = 0 at λ = λ_max; rows with k_i = n get the unconstrained solution at
    λ = 0. The rest bisect geometrically on λ in (lo, hi], hi always feasible (nnz <= k_i), starting
    from ``lam_init`` (warm start) or from the (k_i+1)-th largest |xy_j|/w_j (exact for orthogonal G).
    Only unfinished rows are re-solved, each warm-started from its previous solution.

    Args:
        solve_pen: the l1 solver.
        xy: [o, n].
        weights: [o, n] positive per-coordinate weights (penalty = λ_i·w_ij).
        k: [o] int64 budgets.
        lam_init: optional [o] first guess.
        unconstrained: rows -> [r, n] unconstrained least-squares solution (for k_i = n).
        max_steps: bisection evaluations at most.
        rtol: stop a row when hi/lo <= 1 + rtol.

    Returns:
        L1Outcome; a row is converged when its inner solve converged (running out of bisection
        steps only costs closeness to k_i, never feasibility).
    """
    o, n = xy.shape
    dtype, device = xy.dtype, xy.device
    ratio = xy.abs() / weights
    lam_max = ratio.amax(dim=1) if n else torch.zeros(o, dtype=dtype, device=device)
    best_coef = torch.zeros_like(xy)
    best_nnz = torch.zeros(o, dtype=torch.int64, device=device)
    best_lam = lam_max.clone()
    best_gap = torch.zeros(o, dtype=dtype, device=device)
    best_conv = torch.ones(o, dtype=torch.bool, device=device)
    n_iter = 0
    full = k >= n
    if bool(full.any()):
        rows = full.nonzero().squeeze(1)
        best_coef[rows] = unconstrained(rows)
        best_nnz[rows] = (best_coef[rows] != 0).sum(dim=1)
        best_lam[rows] = 0.0
    hi = lam_max.clone()
    lo = torch.zeros_like(hi)
    if lam_init is not None:
        lam = torch.minimum(lam_init.to(dtype=dtype, device=device), lam_max)
        lam = torch.maximum(lam, lam_max * 1e-12)
    else:
        sorted_ratio = torch.sort(ratio, dim=1, descending=True).values
        pick = k.clamp(max=n - 1).unsqueeze(1) if n else k.unsqueeze(1)
        lam = torch.gather(sorted_ratio, 1, pick).squeeze(1) if n else lam_max.clone()
        lam = torch.where(lam > 0, lam, lam_max * 0.5)
    active = (k > 0) & ~full & (lam_max > 0)
    last = torch.zeros_like(xy)
    steps = 0
    while bool(active.any()) and steps < max_steps:
        steps += 1
        rows = active.nonzero().squeeze(1)
        out = solve_pen(rows, lam[rows].unsqueeze(1) * weights[rows], last[rows])
        n_iter += out.n_iter
        last[rows] = out.coef
        nnz = (out.coef != 0).sum(dim=1)
        feasible = nnz <= k[rows]
        improve = feasible & (nnz > best_nnz[rows])
        upd = rows[improve]
        best_coef[upd] = out.coef[improve]
        best_nnz[upd] = nnz[improve]
        best_lam[upd] = lam[upd]
        best_gap[upd] = out.rel_gap[improve]
        best_conv[upd] = out.converged[improve]
        hi[rows] = torch.where(feasible, lam[rows], hi[rows])
        lo[rows] = torch.where(feasible, lo[rows], lam[rows])
        done = (best_nnz[rows] == k[rows]) | ((lo[rows] > 0) & (hi[rows] <= lo[rows] * (1 + rtol)))
        active[rows[done]] = False
        lo_r, hi_r = lo[rows], hi[rows]
        never_feasible_below_max = hi_r >= lam_max[rows]
        nxt = torch.where(
            lo_r == 0,
            hi_r / 4,
            torch.where(never_feasible_below_max, torch.minimum(lo_r * 4, (lo_r * hi_r).sqrt()), (lo_r * hi_r).sqrt()),
        )
        lam[rows] = nxt
    return L1Outcome(best_coef, best_lam, n_iter, best_gap, best_conv, steps)


def reweighted_l1(
    solve_pen: SolvePen,
    xy: Tensor,
    k: Tensor | None,
    lam: Tensor | None,
    lam_init: Tensor | None,
    unconstrained: Callable[[Tensor], Tensor],
    reweight_rounds: int,
    reweight_eps: float,
    bisect_steps: int,
    bisect_rtol: float,
) -> L1Outcome:
    """Plain l1 (``reweight_rounds`` = 0) or iteratively reweighted l1 (Candès, Wakin & Boyd 2008).

    After each round the weights become w_j = ε/(|θ_j| + ε), ε = ``reweight_eps``·max_j|θ_j| per row:
    coordinates at zero keep the full λ, large ones are penalized less — a step toward log-sum /
    l0. With a k-budget each round re-bisects λ, warm-started from the previous round's λ.

    Args:
        solve_pen: the l1 solver.
        xy: [o, n].
        k: [o] budgets (then λ is bisected) or None.
        lam: [o] λ (used as is) or None.
        lam_init: optional [o] bisection warm start.
        unconstrained: rows -> unconstrained solution (for k_i = n rows).
        reweight_rounds: extra reweighted solves after the first.
        reweight_eps: ε relative to the row's largest |θ|.
        bisect_steps: bisection evaluations per round at most.
        bisect_rtol: bisection bracket tolerance.

    Returns:
        L1Outcome of the last round.
    """
    o = xy.shape[0]
    weights = torch.ones_like(xy)
    all_rows = torch.arange(o, device=xy.device)
    outcome: L1Outcome | None = None
    for rnd in range(reweight_rounds + 1):
        if k is not None:
            prev_iter = 0 if outcome is None else outcome.n_iter
            outcome = bisect_lambda(solve_pen, xy, weights, k, lam_init, unconstrained, bisect_steps, bisect_rtol)
            outcome.n_iter += prev_iter
            lam_init = outcome.lam
        else:
            assert lam is not None
            warm = None if outcome is None else outcome.coef
            out = solve_pen(all_rows, lam.unsqueeze(1) * weights, warm)
            prev_iter = 0 if outcome is None else outcome.n_iter
            outcome = L1Outcome(out.coef, lam, prev_iter + out.n_iter, out.rel_gap, out.converged, 0)
        if rnd < reweight_rounds:
            mag = outcome.coef.abs()
            eps = (reweight_eps * mag.amax(dim=1, keepdim=True)).clamp_min(torch.finfo(xy.dtype).tiny)
            weights = torch.where(mag.amax(dim=1, keepdim=True) > 0, eps / (mag + eps), torch.ones_like(mag))
    assert outcome is not None
    return outcome
