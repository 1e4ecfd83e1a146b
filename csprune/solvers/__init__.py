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

from csprune.solvers._common import ALLOWED_SOLVERS, SOLVER_OPTIONS, SOLVERS, SolverResult, validated
from csprune.solvers.fista import FISTA, fista_gram
from csprune.solvers.obs import OBS, obs_gram
from csprune.solvers.omp import OMP, omp_gram
from csprune.solvers.sparsegpt import SparseGPT, sparsegpt_gram
from csprune.solvers.refit import refit
from csprune.errors import ConfigError


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
    gram3, xy, groups, k_t, lam_t, allowed_t = validated(solver, gram, xy, k, lam, allowed, options)
    if solver == "omp":
        return omp_gram(gram3, xy, k_t, groups, allowed=allowed_t, **options)
    if solver == "obs":
        return obs_gram(gram3, xy, k_t, groups, allowed=allowed_t, **options)
    if solver == "sparsegpt":
        return sparsegpt_gram(gram3, xy, k_t, groups, allowed=allowed_t, **options)
    if solver == "fista":
        return fista_gram(gram3, xy, groups, k=k_t, lam=lam_t, allowed=allowed_t, **options)
    from csprune.solvers.reference import cvxpy_gram, sklearn_gram

    if solver == "cvxpy":
        return cvxpy_gram(gram3, xy, groups, k=k_t, lam=lam_t, **options)
    if options.get("method") == "omp" and k_t is None:
        raise ConfigError("solver='sklearn' with method='omp' solves the l0 form: pass k, not lam")
    return sklearn_gram(gram3, xy, groups, k=k_t, lam=lam_t, **options)


__all__ = ["ALLOWED_SOLVERS", "FISTA", "OBS", "OMP", "SOLVERS", "SOLVER_OPTIONS", "SparseGPT", "obs_gram", "sparsegpt_gram", "SolverResult", "fista_gram", "omp_gram", "refit", "solve"]
