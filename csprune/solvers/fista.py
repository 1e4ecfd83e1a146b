"""Batched FISTA (proximal gradient with Nesterov momentum) for the l1 form in Gram form.

Tiers: ``_fista_kernel`` (fixed per-coordinate penalties, a subset of rows), ``fista_gram`` (λ
bisection to a k-budget and reweighting via ``_l1``), ``FISTA`` (options holder).

Step 1/L with L = λ_max(G) per group from power iteration (times a small safety margin); momentum is
restarted per row when it points uphill (O'Donoghue & Candès 2015), which keeps the linear rate on
the strongly convex (damped-Gram) problems pruning produces. Stops on the relative duality gap,
evaluated every ``check_every`` steps (it costs one extra GEMM).

``allowed`` ([o, n] bool) solves the problem restricted to θ_j = 0 off the allowed atoms (a gradual
pruning step without regrowth): the prox step projects onto that subspace (the prox of λ|θ_j| plus
the indicator of θ_j = 0 is 0), the duality gap only checks dual feasibility on allowed atoms, and
the λ bracket comes from the allowed atoms' correlations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from csprune.solvers._common import SolverResult, lasso_duality_gap, quad_objective, rows_gram_matmul, signal_energy, validated
from csprune.solvers._l1 import L1Solve, reweighted_l1
from csprune.solvers.refit import refit_rows

# Power iteration approaches λ_max from below; 2% headroom keeps the step safely <= 1/λ_max.
_LIPSCHITZ_MARGIN = 1.02


def lipschitz_constants(gram3: Tensor, iters: int = 100, rtol: float = 1e-7) -> Tensor:
    """λ_max of each group's Gram by power iteration (seeded start, so runs repeat exactly).

    Args:
        gram3: [g, n, n] symmetric PSD.
        iters: iterations at most.
        rtol: stop when the Rayleigh quotient changes less than this (relative).

    Returns:
        [g] estimates times the safety margin.
    """
    g, n = gram3.shape[0], gram3.shape[-1]
    gen = torch.Generator().manual_seed(0)
    vec = torch.randn(g, n, 1, generator=gen, dtype=torch.float64).to(dtype=gram3.dtype, device=gram3.device)
    vec = vec / vec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(gram3.dtype).tiny)
    est = torch.zeros(g, dtype=gram3.dtype, device=gram3.device)
    for _ in range(iters):
        nxt = torch.bmm(gram3, vec)
        new_est = (vec * nxt).sum(dim=(1, 2))
        norm = nxt.norm(dim=1, keepdim=True)
        vec = nxt / norm.clamp_min(torch.finfo(gram3.dtype).tiny)
        if bool(((new_est - est).abs() <= rtol * new_est.abs()).all()):
            est = new_est
            break
        est = new_est
    return est.clamp_min(torch.finfo(gram3.dtype).tiny) * _LIPSCHITZ_MARGIN


def _fista_kernel(
    gram3: Tensor,
    xy: Tensor,
    groups: Tensor,
    penalty: Tensor,
    lipschitz: Tensor,
    energy: Tensor,
    theta0: Tensor | None,
    max_iter: int,
    tol: float,
    check_every: int,
    allowed: Tensor | None = None,  # None: all atoms free
) -> L1Solve:
    """Kernel: FISTA with adaptive restart on rows sorted by group.

    Args:
        gram3: [g, n, n]; xy: [r, n]; groups: [r].
        penalty: [r, n] per-coordinate λ >= 0.
        lipschitz: [r] step constants.
        energy: [r] ‖y‖² for the duality gap.
        theta0: [r, n] warm start or None.
        max_iter: gradient steps at most.
        tol: relative duality gap to stop at (every row).
        check_every: steps between gap evaluations.
        allowed: [r, n] bool atoms that may be non-zero, or None for all.

    Returns:
        L1Solve for these rows (zero off ``allowed``).
    """
    step = (1.0 / lipschitz).unsqueeze(1)
    thresh = penalty * step
    x = torch.zeros_like(xy) if theta0 is None else theta0.clone()
    if allowed is not None:
        x = x.masked_fill(~allowed, 0.0)
    y = x.clone()
    momentum_t = torch.ones(xy.shape[0], dtype=xy.dtype, device=xy.device)
    rel_gap = torch.full_like(momentum_t, float("inf"))
    no_penalty = (penalty == 0).all(dim=1)
    xy_scale = xy.abs().amax(dim=1).clamp_min(torch.finfo(xy.dtype).tiny)
    it = 0
    while it < max_iter:
        it += 1
        grad = rows_gram_matmul(y, gram3, groups) - xy
        moved = y - step * grad
        x_new = moved.sign() * (moved.abs() - thresh).clamp_min(0)
        if allowed is not None:
            x_new = x_new.masked_fill(~allowed, 0.0)  # prox of the restriction θ_j = 0 off the allowed set
        restart = ((y - x_new) * (x_new - x)).sum(dim=1) > 0
        t_new = 0.5 * (1 + torch.sqrt(1 + 4 * momentum_t * momentum_t))
        beta = torch.where(restart, torch.zeros_like(t_new), (momentum_t - 1) / t_new)
        momentum_t = torch.where(restart, torch.ones_like(t_new), t_new)
        y = x_new + beta.unsqueeze(1) * (x_new - x)
        x = x_new
        if it % check_every == 0 or it == max_iter:
            corr = xy - rows_gram_matmul(x, gram3, groups)
            if allowed is not None:
                corr = corr.masked_fill(~allowed, 0.0)  # fixed-at-zero atoms carry no dual constraint
            _, rel_gap = lasso_duality_gap(x, corr, xy, penalty, energy)
            # λ = 0 rows: the gap is uninformative; use the relative gradient instead.
            rel_gap = torch.where(no_penalty, corr.abs().amax(dim=1) / xy_scale, rel_gap)
            if bool((rel_gap <= tol).all()):
                break
    return L1Solve(coef=x, n_iter=it, rel_gap=rel_gap, converged=rel_gap <= tol)


def fista_gram(
    gram3: Tensor,
    xy: Tensor,
    groups: Tensor,
    k: Tensor | None = None,
    lam: Tensor | None = None,
    max_iter: int = 1000,  # per solve; restarted FISTA needs ~sqrt(cond)·log(1/tol) steps, cond ~1e4 fits
    tol: float | None = None,  # relative duality gap; None: 1e-7 (float64) / 1e-4 (float32, its rounding floor)
    check_every: int = 10,  # a gap check costs one extra GEMM: ~10% overhead
    reweight_rounds: int = 0,  # plain l1 by default; 2-4 rounds approach l0-like supports
    reweight_eps: float = 0.1,  # ε relative to a row's largest |θ| (Candès et al.: just below typical magnitudes)
    lam_init: Tensor | float | None = None,  # warm start of the λ bisection (e.g. the previous pruning step's λ)
    bisect_steps: int = 40,  # evaluations per bisection; ~log2 of the λ range over the bracket tolerance
    bisect_rtol: float = 1e-4,  # stop bisecting a row when hi/lo <= 1 + rtol
    power_iters: int = 100,  # power iteration for λ_max(G); stops early on a 1e-7 relative change
    allowed: Tensor | None = None,  # None: every atom; else [o, n] bool, e.g. the current mask (no regrowth)
) -> SolverResult:
    """Function tier: FISTA on validated inputs (l1 form, or λ bisected to a k-budget).

    Args:
        gram3: [g, n, n]; xy: [o, n]; groups: [o].
        k: [o] budgets or None; lam: [o] λ or None (exactly one given).
        allowed: [o, n] bool atoms that may be non-zero (k_i <= its count, checked by ``solve``);
            None: all atoms.
        Others: see the defaults' comments.

    Returns:
        SolverResult; ``lam`` is the λ used or found; ``converged`` False (and ``gap`` the largest
        relative duality gap) if any returned row hit ``max_iter`` first.
    """
    if tol is None:
        tol = 1e-7 if xy.dtype == torch.float64 else 1e-4
    lipschitz = lipschitz_constants(gram3, power_iters)[groups]
    energy = signal_energy(gram3, xy)

    def solve_pen(rows: Tensor, penalty: Tensor, warm: Tensor | None) -> L1Solve:
        return _fista_kernel(
            gram3, xy[rows], groups[rows], penalty, lipschitz[rows], energy[rows], warm, max_iter, tol, check_every,
            None if allowed is None else allowed[rows],
        )

    def unconstrained(rows: Tensor) -> Tensor:
        free = torch.ones_like(xy[rows], dtype=torch.bool) if allowed is None else allowed[rows]
        return refit_rows(gram3, xy[rows], free, groups[rows])

    lam_init_t = None
    if lam_init is not None:
        lam_init_t = torch.as_tensor(lam_init, dtype=xy.dtype, device=xy.device).expand(xy.shape[0]).clone()
    # λ_max and the bisection's first guess come from |xy_j| on the atoms that may be non-zero.
    bracket_xy = xy if allowed is None else xy.masked_fill(~allowed, 0.0)
    outcome = reweighted_l1(
        solve_pen, bracket_xy, k, lam, lam_init_t, unconstrained, reweight_rounds, reweight_eps, bisect_steps, bisect_rtol
    )
    coef = outcome.coef
    objective = quad_objective(coef, gram3, xy, rows_gram_matmul(coef, gram3, groups))
    if lam is not None:
        objective = objective + lam * coef.abs().sum(dim=1)
    gap = float(outcome.rel_gap.max()) if xy.shape[0] else 0.0
    return SolverResult(
        coef=coef,
        n_iter=int(outcome.n_iter),
        gap=gap,
        lam=outcome.lam,
        converged=bool(outcome.converged.all()),
        objective=objective,
        solver="fista",
        info={"bisect_steps": outcome.steps, "nnz": (coef != 0).sum(dim=1), "rel_gap": outcome.rel_gap},
    )


class FISTA:
    """Class tier: holds FISTA options; ``FISTA(reweight_rounds=2)(gram, xy, k=...)``."""

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    def __call__(self, gram: Tensor, xy: Tensor, k: Any = None, lam: Any = None, allowed: Tensor | None = None) -> SolverResult:
        gram3, xy, groups, k_t, lam_t, allowed_t = validated("fista", gram, xy, k, lam, allowed, self.options)
        return fista_gram(gram3, xy, groups, k=k_t, lam=lam_t, allowed=allowed_t, **self.options)


__all__ = ["FISTA", "fista_gram", "lipschitz_constants"]
