"""Independent reference solvers: cvxpy (exact l1 form) and scikit-learn (OMP and Lasso).

Both solve row by row on CPU in float64 and return tensors on the input's device and dtype. cvxpy and
scikit-learn are imported inside the functions, so csprune imports without them.

* ``cvxpy_gram``: min ½‖Fθ‖² − xyᵀθ + Σ pen_j|θ_j| with FᵀF = G from an eigendecomposition
  (eigenvalues clipped at 0), so a merely PSD Gram is fine. Clarabel, SCS as the fallback. One
  parametrized problem per group, re-solved per row and per λ.
* ``sklearn_gram``: ``orthogonal_mp_gram`` on D^-½GD^-½ (l0 form) or ``Lasso`` (l1 form). Lasso
  minimizes 1/(2·n_samples)‖y − Xθ‖² + α‖θ‖₁; with X = F (n_samples = n rows) and y = F⁺ᵀxy the
  data term is ½θᵀGθ − xyᵀθ + const over n_samples, so α = λ/n_samples exactly (xy is projected on
  range(G), which changes nothing when G is non-singular). Per-coordinate weights scale the columns.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from csprune.solvers._common import SolverResult, quad_objective, rows_gram_matmul, signal_energy, lasso_duality_gap
from csprune.solvers._l1 import L1Solve, reweighted_l1
from csprune.solvers.refit import refit_rows
from csprune.errors import ConfigError


def _require(module: str, solver: str) -> Any:
    """Import a reference-solver dependency, with an install hint when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"solver={solver!r} needs {'scikit-learn' if module.startswith('sklearn') else module}: pip install 'csprune[ref]'") from err


def _factor(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F with FᵀF = G (rows scaled eigenvectors) and its pseudo-inverse transpose F⁺ᵀ, both [n, n]."""
    evals, evecs = np.linalg.eigh(gram)
    evals = np.clip(evals, 0.0, None)
    root = np.sqrt(evals)
    factor = root[:, None] * evecs.T
    cutoff = max(evals.max(initial=0.0), 1e-300) * gram.shape[0] * np.finfo(np.float64).eps
    inv_root = np.where(evals > cutoff, 1.0 / np.where(root > 0, root, 1.0), 0.0)
    pinv_t = inv_root[:, None] * evecs.T  # y = pinv_t @ xy satisfies Fᵀy = P_range(G)·xy
    return factor, pinv_t


def _l1_common(
    name: str,
    gram3: Tensor,
    xy: Tensor,
    groups: Tensor,
    k: Tensor | None,
    lam: Tensor | None,
    per_row: Any,
    reweight_rounds: int,
    reweight_eps: float,
    lam_init: Any,
    bisect_steps: int,
    bisect_rtol: float,
    tol: float,
) -> SolverResult:
    """Drive a per-row float64 l1 solver ``per_row(group, xy_row, pen_row, warm) -> (θ, iters, ok)``."""
    g64 = gram3.detach().to("cpu", torch.float64)
    xy64 = xy.detach().to("cpu", torch.float64)
    grp = groups.to("cpu")
    energy = signal_energy(g64, xy64) if g64.shape[0] == 1 else _grouped_energy(g64, xy64, grp)

    def solve_pen(rows: Tensor, penalty: Tensor, warm: Tensor | None) -> L1Solve:
        rows = rows.to("cpu")
        penalty = penalty.to("cpu", torch.float64)
        coef = torch.zeros(len(rows), xy64.shape[1], dtype=torch.float64)
        iters, ok = 0, torch.ones(len(rows), dtype=torch.bool)
        for pos, row in enumerate(rows.tolist()):
            w = None if warm is None else warm[pos].to("cpu", torch.float64).numpy()
            sol, it, good = per_row(int(grp[row]), xy64[row].numpy(), penalty[pos].numpy(), w)
            coef[pos] = torch.from_numpy(sol)
            iters += it
            ok[pos] = good
        corr = xy64[rows] - rows_gram_matmul(coef, g64, grp[rows])
        _, rel = lasso_duality_gap(coef, corr, xy64[rows], penalty, energy[rows])
        zero_pen = (penalty == 0).all(dim=1)
        rel = torch.where(zero_pen, corr.abs().amax(dim=1) / xy64[rows].abs().amax(dim=1).clamp_min(1e-300), rel)
        return L1Solve(coef=coef, n_iter=iters, rel_gap=rel, converged=ok & (rel <= tol))

    def unconstrained(rows: Tensor) -> Tensor:
        rows = rows.to("cpu")
        return refit_rows(g64, xy64[rows], torch.ones_like(xy64[rows], dtype=torch.bool), grp[rows])

    k_cpu = None if k is None else k.to("cpu")
    lam_cpu = None if lam is None else lam.to("cpu", torch.float64)
    lam_init_t = None
    if lam_init is not None:
        lam_init_t = torch.as_tensor(lam_init, dtype=torch.float64).expand(xy.shape[0]).clone()
    outcome = reweighted_l1(
        solve_pen, xy64, k_cpu, lam_cpu, lam_init_t, unconstrained, reweight_rounds, reweight_eps, bisect_steps, bisect_rtol
    )
    coef = outcome.coef
    objective = quad_objective(coef, g64, xy64, rows_gram_matmul(coef, g64, grp))
    if lam_cpu is not None:
        objective = objective + lam_cpu * coef.abs().sum(dim=1)
    return SolverResult(
        coef=coef.to(device=xy.device, dtype=xy.dtype),
        n_iter=int(outcome.n_iter),
        gap=float(outcome.rel_gap.max()) if xy.shape[0] else 0.0,
        lam=outcome.lam.to(device=xy.device, dtype=xy.dtype),
        converged=bool(outcome.converged.all()),
        objective=objective.to(device=xy.device, dtype=xy.dtype),
        solver=name,
        info={"bisect_steps": outcome.steps, "nnz": (coef != 0).sum(dim=1)},
    )


def _grouped_energy(g64: Tensor, xy64: Tensor, grp: Tensor) -> Tensor:
    """signal_energy for rows given with explicit groups."""
    out = torch.empty(xy64.shape[0], dtype=torch.float64)
    for gid in grp.unique().tolist():
        sel = grp == gid
        out[sel] = signal_energy(g64[gid : gid + 1], xy64[sel])
    return out


def cvxpy_gram(
    gram3: Tensor,
    xy: Tensor,
    groups: Tensor,
    k: Tensor | None = None,
    lam: Tensor | None = None,
    solver_order: tuple[str, ...] = ("CLARABEL", "SCS"),  # interior point first (exact); SCS if it fails
    tol: float = 1e-6,  # relative duality gap a row must reach to count as converged
    reweight_rounds: int = 0,  # as in fista
    reweight_eps: float = 0.1,  # as in fista
    lam_init: Any = None,  # bisection warm start
    bisect_steps: int = 40,  # as in fista
    bisect_rtol: float = 1e-4,  # as in fista
) -> SolverResult:
    """Per-row exact reference of the (weighted) l1 form with cvxpy.

    Args:
        gram3: [g, n, n]; xy: [o, n]; groups: [o]; k or lam: [o] (exactly one).
        Others: see the defaults' comments.

    Returns:
        SolverResult on xy's device and dtype.
    """
    cp = _require("cvxpy", "cvxpy")
    g64 = gram3.detach().to("cpu", torch.float64).numpy()
    n = g64.shape[-1]
    problems = []
    for j in range(g64.shape[0]):
        factor, _ = _factor(g64[j])
        theta = cp.Variable(n)
        xy_p = cp.Parameter(n)
        pen_p = cp.Parameter(n, nonneg=True)
        objective = 0.5 * cp.sum_squares(factor @ theta) - xy_p @ theta + pen_p @ cp.abs(theta)
        problems.append((cp.Problem(cp.Minimize(objective)), theta, xy_p, pen_p))

    def per_row(group: int, xy_row: np.ndarray, pen_row: np.ndarray, warm: np.ndarray | None) -> tuple[np.ndarray, int, bool]:
        problem, theta, xy_p, pen_p = problems[group]
        xy_p.value, pen_p.value = xy_row, pen_row
        for name in solver_order:
            try:
                kwargs: dict[str, Any] = {"eps": 1e-10, "max_iters": 100000} if name == "SCS" else {}
                problem.solve(solver=name, **kwargs)
            except cp.error.SolverError:
                continue
            if problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and theta.value is not None:
                iters = int(getattr(problem.solver_stats, "num_iters", 0) or 0)
                sol = np.asarray(theta.value, dtype=np.float64)
                # Interior-point solutions are only approximately sparse: snap |θ| below 1e-9·max to 0.
                sol = np.where(np.abs(sol) <= 1e-9 * max(np.abs(sol).max(initial=0.0), 1e-300), 0.0, sol)
                return sol, iters, problem.status == cp.OPTIMAL
        return np.zeros(n), 0, False

    return _l1_common(
        "cvxpy", gram3, xy, groups, k, lam, per_row, reweight_rounds, reweight_eps, lam_init, bisect_steps, bisect_rtol, tol
    )


def sklearn_gram(
    gram3: Tensor,
    xy: Tensor,
    groups: Tensor,
    k: Tensor | None = None,
    lam: Tensor | None = None,
    method: str | None = None,  # None: "omp" for k, "lasso" for lam; "lasso" with k bisects λ
    tol: float = 1e-6,  # relative duality gap for Lasso rows to count as converged
    lasso_tol: float = 1e-12,  # Lasso's own (absolute, scaled) gap tolerance: tight, it is a reference
    max_iter: int = 100000,  # Lasso coordinate-descent sweeps
    reweight_rounds: int = 0,  # as in fista
    reweight_eps: float = 0.1,  # as in fista
    lam_init: Any = None,  # bisection warm start
    bisect_steps: int = 40,  # as in fista
    bisect_rtol: float = 1e-4,  # as in fista
) -> SolverResult:
    """scikit-learn reference: ``orthogonal_mp_gram`` (l0) or ``Lasso`` (l1).

    Args:
        gram3: [g, n, n]; xy: [o, n]; groups: [o]; k or lam: [o] (exactly one).
        method: "omp" (needs k) or "lasso".
        Others: see the defaults' comments.

    Returns:
        SolverResult on xy's device and dtype.
    """
    if method is None:
        method = "omp" if k is not None else "lasso"
    if method not in ("omp", "lasso"):
        raise ConfigError(f"method must be 'omp' or 'lasso' for solver='sklearn', got {method!r}")
    if method == "omp":
        if k is None:
            raise ConfigError("solver='sklearn' with method='omp' solves the l0 form: pass k, not lam")
        return _sklearn_omp(gram3, xy, groups, k)
    ConvergenceWarning = _require("sklearn.exceptions", "sklearn").ConvergenceWarning
    Lasso = _require("sklearn.linear_model", "sklearn").Lasso

    g64 = gram3.detach().to("cpu", torch.float64).numpy()
    factors = [_factor(g64[j]) for j in range(g64.shape[0])]
    n = g64.shape[-1]

    def per_row(group: int, xy_row: np.ndarray, pen_row: np.ndarray, warm: np.ndarray | None) -> tuple[np.ndarray, int, bool]:
        factor, pinv_t = factors[group]
        y = pinv_t @ xy_row
        active = pen_row > 0
        sol = np.zeros(n)
        if not active.any():
            return np.linalg.lstsq(factor, y, rcond=None)[0], 1, True
        # Column scaling turns Σ pen_j|θ_j| into lam·‖u‖₁ with θ_j = u_j·lam/pen_j (zero-penalty
        # coordinates get a tiny penalty instead; only the "no penalty at all" case is exact above).
        lam_row = pen_row[active].max()
        pen_safe = np.where(active, pen_row, lam_row * 1e-12)
        col_scale = lam_row / pen_safe
        design = factor * col_scale[None, :]
        gram_scaled = design.T @ design
        model = Lasso(
            alpha=lam_row / n, fit_intercept=False, precompute=gram_scaled, tol=lasso_tol, max_iter=max_iter,
            warm_start=False, selection="cyclic",
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(design, y, check_input=True)
        ok = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        sol = model.coef_ * col_scale
        return sol, int(np.max(model.n_iter_)), ok

    return _l1_common(
        "sklearn", gram3, xy, groups, k, lam, per_row, reweight_rounds, reweight_eps, lam_init, bisect_steps, bisect_rtol, tol
    )


def _sklearn_omp(gram3: Tensor, xy: Tensor, groups: Tensor, k: Tensor) -> SolverResult:
    """``orthogonal_mp_gram`` per (group, k) batch on the unit-diagonal Gram; exact k_i atoms."""
    orthogonal_mp_gram = _require("sklearn.linear_model", "sklearn").orthogonal_mp_gram

    g64 = gram3.detach().to("cpu", torch.float64)
    xy64 = xy.detach().to("cpu", torch.float64)
    grp, k_cpu = groups.to("cpu"), k.to("cpu")
    diag = torch.diagonal(g64, dim1=-2, dim2=-1)
    scale = torch.where(diag > 0, diag.clamp_min(1e-300).sqrt(), torch.ones_like(diag))
    gram_n = (g64 / scale.unsqueeze(2) / scale.unsqueeze(1)).numpy()
    xy_n = (xy64 / scale[grp]).numpy()
    coef_n = np.zeros_like(xy_n)
    for gid in grp.unique().tolist():
        for kk in k_cpu[grp == gid].unique().tolist():
            rows = ((grp == gid) & (k_cpu == kk)).nonzero().squeeze(1).numpy()
            if kk == 0:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # premature stop: fewer atoms, reported via nnz
                sol = orthogonal_mp_gram(gram_n[gid], xy_n[rows].T, n_nonzero_coefs=int(kk), copy_Gram=True)
            coef_n[rows] = np.asarray(sol).reshape(xy_n.shape[1], -1).T
    coef = torch.from_numpy(coef_n) / scale[grp]
    objective = quad_objective(coef, g64, xy64, rows_gram_matmul(coef, g64, grp))
    return SolverResult(
        coef=coef.to(device=xy.device, dtype=xy.dtype),
        n_iter=int(k_cpu.max()) if len(k_cpu) else 0,
        gap=0.0,
        lam=None,
        converged=True,
        objective=objective.to(device=xy.device, dtype=xy.dtype),
        solver="sklearn",
        info={"nnz": (coef != 0).sum(dim=1)},
    )


__all__ = ["cvxpy_gram", "sklearn_gram"]
