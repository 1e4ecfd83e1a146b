"""Sparse solvers in Gram form: tensors in, ``SolverResult`` out.

For every row i of ``xy`` at once (batched, on the tensors' device, float32 or float64)::

    l1 form (lam given):  min_θ ½θᵀ·G_i·θ − θᵀ·xy_i + lam_i‖θ‖₁
    l0 form (k given):    min_θ ½θᵀ·G_i·θ − θᵀ·xy_i   s.t. ‖θ‖₀ <= k_i

``G_i`` is ``gram`` ([n, n]) or ``gram[j]`` for the j-th of g contiguous equal row groups ([g, n, n]).
In pruning xy_i = G·w_i; in compressed sensing gram = ΦᵀΦ and xy = Φᵀy.

Solvers (``SOLVERS``): ``omp`` (default; l0 form, forward greedy), ``obs`` (l0 form, backward
elimination from the allowed support with exact optimal-brain-surgeon downdates: the fast form for
gradual steps, whose cost grows with the atoms removed), ``sparsegpt`` (l0 form, sequential OBS
with one shared inverse of G per group, O(n³ + o·n²): the fast form for in-training updates; values
are compensated, not refit), ``fista`` (l1 form; with k, λ is bisected per row
so the support has at most k_i non-zeros), ``cvxpy`` (exact per-row l1 reference), ``sklearn``
(``orthogonal_mp_gram`` for k, ``Lasso`` for lam). ``refit`` solves least squares on a support.

``allowed`` ([o, n] bool, solvers in ``ALLOWED_SOLVERS``) restricts row i to the atoms
{j : allowed[i, j]} — a gradual pruning step without regrowth passes the current mask, so no budget
is spent on weights that are already pruned.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from csprune.solvers._common import SOLVERS, SolverResult, check_budget, check_options, check_problem, row_groups
from csprune.solvers.fista import FISTA, fista_gram
from csprune.solvers.obs import OBS, obs_gram
from csprune.solvers.omp import OMP, omp_gram
from csprune.solvers.sparsegpt import SparseGPT, sparsegpt_gram
from csprune.solvers.refit import refit

# Solvers that take ``allowed`` natively (the references solve the unrestricted problem only).
ALLOWED_SOLVERS = ("omp", "obs", "sparsegpt", "fista")
_L1_OPTIONS = ("reweight_rounds", "reweight_eps", "lam_init", "bisect_steps", "bisect_rtol", "tol")
# The registry of each solver's options (prune.solver_options); SOLVERS (in _common) holds the names.
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "omp": ("atoms_per_iter", "pool_size", "refine_iters", "row_chunk"),
    "obs": ("rounds", "row_chunk", "start"),
    "sparsegpt": ("block",),
    "fista": _L1_OPTIONS + ("max_iter", "check_every", "power_iters"),
    "cvxpy": _L1_OPTIONS + ("solver_order",),
    "sklearn": _L1_OPTIONS + ("method", "lasso_tol", "max_iter"),
}


def solve(
    gram: Tensor,
    xy: Tensor,
    k: int | Tensor | None = None,
    lam: float | Tensor | None = None,
    solver: str = "omp",  # greedy l0 recovery: lowest output error in bench/ (see docs/design.md §3)
    allowed: Tensor | None = None,  # None: every atom may be selected (one-shot pruning, regrowth)
    **options: Any,
) -> SolverResult:
    """Solve the batched sparse problem for every row of ``xy``.

    Args:
        gram: [n, n] Gram shared by all rows, or [g, n, n] per contiguous row group (o % g == 0).
        xy: [o, n] correlations (pruning: G·w_i; compressed sensing: Φᵀy).
        k: l0 budget, int or int tensor [o] with 0 <= k_i <= n (k_i = 0: zero row; k_i = n: the
            unconstrained solution). With an l1 solver, λ is bisected per row to reach <= k_i non-zeros.
        lam: l1 weight, float or [o] tensor >= 0. Exactly one of k and lam.
        solver: one of ``SOLVERS``.
        allowed: [o, n] bool (or 0/1) atoms row i may use; with k, each k_i must not exceed row i's
            allowed count. Only for the solvers in ``ALLOWED_SOLVERS``.
        **options: solver options (see ``omp_gram``, ``fista_gram``, ``cvxpy_gram``, ``sklearn_gram``).

    Returns:
        SolverResult with ``coef`` [o, n] on xy's device and dtype.

    Raises:
        ValueError: bad shapes, dtypes, groups, budgets, NaN/Inf, unknown solver or option, an
            ``allowed`` mask of the wrong shape, with fewer atoms than a row's budget or for a solver
            outside ``ALLOWED_SOLVERS`` — before any work is done, naming the offending argument.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    gram3, xy, g = check_problem(gram, xy)
    o, n = xy.shape
    k_t, lam_t = check_budget(k, lam, o, n, xy)
    check_options(solver, options, SOLVER_OPTIONS[solver])
    allowed_t = _check_allowed(allowed, solver, xy, k_t)
    groups = row_groups(o, g, xy.device)
    if solver == "omp":
        if k_t is None:
            raise ValueError("solver='omp' solves the l0 form: pass k (the budget), not lam")
        return omp_gram(gram3, xy, k_t, groups, allowed=allowed_t, **options)
    if solver == "obs":
        if k_t is None:
            raise ValueError("solver='obs' solves the l0 form: pass k (the budget), not lam")
        return obs_gram(gram3, xy, k_t, groups, allowed=allowed_t, **options)
    if solver == "sparsegpt":
        if k_t is None:
            raise ValueError("solver='sparsegpt' solves the l0 form: pass k (the budget), not lam")
        return sparsegpt_gram(gram3, xy, k_t, groups, allowed=allowed_t, **options)
    if solver == "fista":
        return fista_gram(gram3, xy, groups, k=k_t, lam=lam_t, allowed=allowed_t, **options)
    from csprune.solvers.reference import cvxpy_gram, sklearn_gram

    if solver == "cvxpy":
        return cvxpy_gram(gram3, xy, groups, k=k_t, lam=lam_t, **options)
    if options.get("method") == "omp" and k_t is None:
        raise ValueError("solver='sklearn' with method='omp' solves the l0 form: pass k, not lam")
    return sklearn_gram(gram3, xy, groups, k=k_t, lam=lam_t, **options)


def _check_allowed(allowed: Any, solver: str, xy: Tensor, k: Tensor | None) -> Tensor | None:
    """Validate ``allowed`` for ``solve``.

    Args:
        allowed: None, or [o, n] bool / 0-1 tensor.
        solver: the solver name.
        xy: [o, n] (shape and device).
        k: [o] int64 budgets or None (l1 form).

    Returns:
        [o, n] bool on xy's device, or None when every atom is allowed (the unrestricted fast path).
    """
    if allowed is None:
        return None
    if not isinstance(allowed, Tensor) or allowed.shape != xy.shape:
        shape = tuple(allowed.shape) if isinstance(allowed, Tensor) else type(allowed).__name__
        raise ValueError(f"allowed must be a bool tensor of the shape of xy {tuple(xy.shape)}, got {shape}")
    allowed_t = allowed.to(device=xy.device) != 0
    if bool(allowed_t.all()):
        return None
    if solver not in ALLOWED_SOLVERS:
        raise ValueError(f"allowed is supported by the solvers {ALLOWED_SOLVERS}, not solver={solver!r}")
    if k is not None and xy.shape[0]:
        short = k > allowed_t.sum(dim=1)
        if bool(short.any()):
            row = int(short.nonzero()[0])
            raise ValueError(
                f"k exceeds the allowed atoms in {int(short.sum())} row(s); e.g. row {row}: k = {int(k[row])}, "
                f"{int(allowed_t[row].sum())} allowed"
            )
    return allowed_t


__all__ = ["ALLOWED_SOLVERS", "FISTA", "OBS", "OMP", "SOLVERS", "SOLVER_OPTIONS", "SparseGPT", "obs_gram", "sparsegpt_gram", "SolverResult", "fista_gram", "omp_gram", "refit", "solve"]
