"""Shared pieces of the solvers: the result dataclass, input checks and grouped-Gram helpers.

Every solver works on the same batched problem. For each row i of ``xy`` ([o, n]):

    l1 form:  min_θ ½θᵀ·G_i·θ − θᵀ·xy_i + lam_i‖θ‖₁
    l0 form:  min_θ ½θᵀ·G_i·θ − θᵀ·xy_i   s.t. ‖θ‖₀ ≤ k_i

``gram`` is either [n, n] (shared by all rows) or [g, n, n]: the o rows are split into g contiguous
equal groups and the rows of group j use gram[j].
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from csprune.errors import ConfigError

SOLVERS = ("omp", "obs", "sparsegpt", "fista", "cvxpy", "sklearn")
# Solvers that take ``allowed`` natively (the references solve the unrestricted problem only).
ALLOWED_SOLVERS = ("omp", "obs", "sparsegpt", "fista")
_L1_OPTIONS = ("reweight_rounds", "reweight_eps", "lam_init", "bisect_steps", "bisect_rtol", "tol")
# The registry of each solver's options (prune.solver_options); SOLVERS holds the names.
SOLVER_OPTIONS: dict[str, tuple[str, ...]] = {
    "omp": ("atoms_per_iter", "pool_size", "refine_iters", "row_chunk"),
    "obs": ("rounds", "row_chunk", "start"),
    "sparsegpt": ("block",),
    "fista": _L1_OPTIONS + ("max_iter", "check_every", "power_iters"),
    "cvxpy": _L1_OPTIONS + ("solver_order",),
    "sklearn": _L1_OPTIONS + ("method", "lasso_tol", "max_iter"),
}


# Relative tolerance of the symmetry check: loose enough for fp32 Grams accumulated by hooks.
_SYMMETRY_RTOL = 1e-3


@dataclass
class SolverResult:
    """What every solver returns.

    Attributes:
        coef: [o, n] the solution, one row per row of ``xy``.
        n_iter: iterations used (OMP: atom-selection rounds; FISTA: gradient steps summed over
            bisection/reweighting solves; references: solver iterations where known).
        gap: max over rows of a relative optimality measure: the relative duality gap for the l1
            form, the relative residual correlation on the support for the l0 form.
        lam: [o] the λ used (l1 form) or found by bisection (k-budget with an l1 solver); None for
            the l0 solvers.
        converged: False when an iteration limit was hit before the tolerance was met.
        objective: [o] ½θᵀGθ − θᵀxy (+ Σ lam_i|θ| in the l1 form), or None.
        solver: the solver name that produced it.
        info: anything else worth logging (per-solver; e.g. nnz per row, bisection steps).
    """

    coef: Tensor
    n_iter: int
    gap: float
    lam: Tensor | None
    converged: bool
    objective: Tensor | None = None
    solver: str = ""
    info: dict[str, Any] = field(default_factory=dict)


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def check_problem(gram: Any, xy: Any) -> tuple[Tensor, Tensor, int]:
    """Validate ``gram``/``xy`` and return them with the number of groups.

    Args:
        gram: [n, n] or [g, n, n] symmetric float32/float64 tensor.
        xy: [o, n] tensor of the same dtype and device, o % g == 0.

    Returns:
        (gram as [g, n, n], xy, g).

    Raises:
        ValueError: naming the argument and the shapes when anything is off.
    """
    if not isinstance(gram, Tensor):
        raise ConfigError(f"gram must be a torch.Tensor, got {_describe(gram)}")
    if not isinstance(xy, Tensor):
        raise ConfigError(f"xy must be a torch.Tensor, got {_describe(xy)}")
    if gram.dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"gram must be float32 or float64, got {_describe(gram)}")
    if xy.dtype != gram.dtype:
        raise ConfigError(f"xy dtype {xy.dtype} does not match gram dtype {gram.dtype}")
    if xy.device != gram.device:
        raise ConfigError(f"xy is on {xy.device} but gram is on {gram.device}")
    if gram.dim() not in (2, 3) or gram.shape[-1] != gram.shape[-2]:
        raise ConfigError(f"gram must be [n, n] or [g, n, n], got shape {tuple(gram.shape)}")
    n = gram.shape[-1]
    if xy.dim() != 2 or xy.shape[1] != n:
        raise ConfigError(
            f"xy must be [o, n] with n = {n} (from gram {tuple(gram.shape)}), got shape {tuple(xy.shape)}"
        )
    gram3 = gram if gram.dim() == 3 else gram.unsqueeze(0)
    g = gram3.shape[0]
    if g == 0 or xy.shape[0] % g != 0:
        raise ConfigError(
            f"xy has {xy.shape[0]} rows, which does not split into the g = {g} groups of gram "
            f"{tuple(gram.shape)} (need o % g == 0)"
        )
    if not bool(torch.isfinite(gram).all()):
        raise ConfigError(f"gram {tuple(gram.shape)} contains NaN or Inf")
    if not bool(torch.isfinite(xy).all()):
        raise ConfigError(f"xy {tuple(xy.shape)} contains NaN or Inf")
    scale = gram3.abs().amax().item()
    if n > 0 and (gram3 - gram3.mT).abs().amax().item() > _SYMMETRY_RTOL * max(scale, 1e-30):
        raise ConfigError(f"gram {tuple(gram.shape)} is not symmetric")
    return gram3, xy, g


def check_budget(k: Any, lam: Any, o: int, n: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Validate exactly one of ``k`` / ``lam`` and broadcast it to [o].

    Args:
        k: int or int tensor [o], 0 <= k_i <= n; or None.
        lam: float >= 0 or tensor [o] >= 0; or None.
        o: number of rows.
        n: problem size.
        like: a tensor whose device (and, for lam, dtype) the result takes.

    Returns:
        (k as int64 [o] or None, lam as [o] float or None).
    """
    if (k is None) == (lam is None):
        raise ConfigError(
            "pass exactly one of k (l0 budget) and lam (l1 weight); got "
            f"k={'None' if k is None else _describe(k)}, lam={'None' if lam is None else _describe(lam)}"
        )
    if k is not None:
        if isinstance(k, bool):
            raise ConfigError(f"k must be an int or an int tensor [o], got {_describe(k)}")
        if isinstance(k, numbers.Integral):
            k_t = torch.full((o,), int(k), dtype=torch.int64, device=like.device)
        elif isinstance(k, Tensor):
            if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
                raise ConfigError(f"k must be an int or an int tensor [o], got {_describe(k)}")
            if k.dim() == 0:
                k = k.expand(o)
            if k.shape != (o,):
                raise ConfigError(f"k must be an int or a tensor of shape [o] = [{o}], got {_describe(k)}")
            k_t = k.to(device=like.device, dtype=torch.int64)
        else:
            raise ConfigError(f"k must be an int or an int tensor [o], got {_describe(k)}")
        if o and (int(k_t.min()) < 0 or int(k_t.max()) > n):
            raise ConfigError(
                f"k must satisfy 0 <= k <= n = {n}; got k in [{int(k_t.min())}, {int(k_t.max())}]"
            )
        return k_t, None
    if isinstance(lam, bool):
        raise ConfigError(f"lam must be a float or a tensor [o], got {_describe(lam)}")
    if isinstance(lam, numbers.Real):
        lam_t = torch.full((o,), float(lam), dtype=like.dtype, device=like.device)
    elif isinstance(lam, Tensor):
        if not lam.dtype.is_floating_point and lam.dtype not in (torch.int32, torch.int64):
            raise ConfigError(f"lam must be a float or a tensor [o], got {_describe(lam)}")
        if lam.dim() == 0:
            lam = lam.expand(o)
        if lam.shape != (o,):
            raise ConfigError(f"lam must be a float or a tensor of shape [o] = [{o}], got {_describe(lam)}")
        lam_t = lam.to(device=like.device, dtype=like.dtype)
    else:
        raise ConfigError(f"lam must be a float or a tensor [o], got {_describe(lam)}")
    if not bool(torch.isfinite(lam_t).all()) or (o and float(lam_t.min()) < 0):
        raise ConfigError(f"lam must be finite and >= 0, got values in [{float(lam_t.min())}, {float(lam_t.max())}]")
    return None, lam_t


def check_options(solver: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Raise ValueError for an option the solver does not know, listing the valid ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for solver={solver!r}; valid: {sorted(allowed)}")


def row_groups(o: int, g: int, device: torch.device) -> Tensor:
    """[o] int64: the gram group of each row (contiguous equal groups)."""
    return torch.arange(g, device=device).repeat_interleave(o // g) if g > 1 else torch.zeros(
        o, dtype=torch.int64, device=device
    )


def gram_matmul(theta: Tensor, gram3: Tensor) -> Tensor:
    """θ·G for every row with its group's Gram.

    Args:
        theta: [o, n].
        gram3: [g, n, n] symmetric.

    Returns:
        [o, n] with row i = G_{group(i)} θ_i.
    """
    g, n = gram3.shape[0], gram3.shape[-1]
    if g == 1:
        return theta @ gram3[0]
    return torch.bmm(theta.reshape(g, -1, n), gram3).reshape(theta.shape)


def rows_gram_matmul(theta: Tensor, gram3: Tensor, groups: Tensor) -> Tensor:
    """Row i of the result is G_{groups[i]}·θ_i, for rows sorted by group.

    Args:
        theta: [r, n].
        gram3: [g, n, n] symmetric.
        groups: [r] non-decreasing group ids.

    Returns:
        [r, n].
    """
    if gram3.shape[0] == 1:
        return theta @ gram3[0]
    out = torch.empty_like(theta)
    ids, counts = torch.unique_consecutive(groups, return_counts=True)
    start = 0
    for gid, cnt in zip(ids.tolist(), counts.tolist()):
        out[start : start + cnt] = theta[start : start + cnt] @ gram3[gid]
        start += cnt
    return out


def quad_objective(theta: Tensor, gram3: Tensor, xy: Tensor, gtheta: Tensor | None = None) -> Tensor:
    """[o] ½θᵀGθ − θᵀxy per row (``gtheta`` = θ·G when already known)."""
    if gtheta is None:
        gtheta = gram_matmul(theta, gram3)
    return (theta * (0.5 * gtheta - xy)).sum(dim=1)


def signal_energy(gram3: Tensor, xy: Tensor) -> Tensor:
    """[o] xyᵀ·G⁺·xy per row: ‖y‖² of the measurements this Gram form stands for.

    With G = ΦᵀΦ and xy = Φᵀy this is the squared norm of the part of y in range(Φ) — the only part
    the problem sees. It turns ½θᵀGθ − θᵀxy into the primal ½‖y − Φθ‖² up to a known constant, which
    the duality gap needs. Cholesky per group; eigendecomposition (pseudo-inverse) where it fails.
    """
    g, n = gram3.shape[0], gram3.shape[-1]
    out = torch.empty(xy.shape[0], dtype=xy.dtype, device=xy.device)
    rows = xy.reshape(g, -1, n)
    for j in range(g):
        chol, info = torch.linalg.cholesky_ex(gram3[j])
        if int(info) == 0:
            half = torch.linalg.solve_triangular(chol, rows[j].T, upper=False)
            energy = (half * half).sum(dim=0)
        else:
            evals, evecs = torch.linalg.eigh(gram3[j])
            cutoff = evals.abs().max().clamp_min(1e-30) * n * torch.finfo(xy.dtype).eps
            inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(cutoff), torch.zeros_like(evals))
            proj = rows[j] @ evecs
            energy = (proj * proj * inv).sum(dim=1)
        out.view(g, -1)[j] = energy
    return out


def lasso_duality_gap(
    theta: Tensor, corr: Tensor, xy: Tensor, penalty: Tensor, energy: Tensor
) -> tuple[Tensor, Tensor]:
    """Duality gap of the weighted l1 problem in Gram form, per row.

    Primal P(θ) = ½‖y − Φθ‖² + Σ_j pen_j|θ_j| with ‖y‖² = ``energy``; the dual point is the scaled
    residual s·r, s = min(1, min_j pen_j/|Φ_jᵀr|) (Gram form: Φᵀr = xy − Gθ = ``corr``).

    Args:
        theta: [o, n] primal point.
        corr: [o, n] xy − θ·G.
        xy: [o, n].
        penalty: [o, n] (or broadcastable) per-coordinate λ >= 0.
        energy: [o] ‖y‖² (see ``signal_energy``).

    Returns:
        (gap [o] >= 0, relative gap [o] = gap / max(P, tiny)).
    """
    theta_xy = (theta * xy).sum(dim=1)
    theta_g_theta = theta_xy - (theta * corr).sum(dim=1)  # θᵀGθ = θᵀxy − θᵀcorr
    resid_sq = (energy - 2 * theta_xy + theta_g_theta).clamp_min(0)
    l1 = (penalty * theta.abs()).sum(dim=1)
    ratio = torch.where(corr.abs() > 0, penalty / corr.abs().clamp_min(1e-300), torch.full_like(corr, math.inf))
    scale = ratio.amin(dim=1).clamp(max=1.0)
    resid_y = energy - theta_xy  # rᵀy
    primal = 0.5 * resid_sq + l1
    dual = scale * resid_y - 0.5 * scale * scale * resid_sq
    gap = (primal - dual).clamp_min(0)
    tiny = torch.finfo(theta.dtype).tiny
    return gap, gap / primal.clamp_min(tiny)


def check_allowed(allowed: Any, solver: str, xy: Tensor, k: Tensor | None) -> Tensor | None:
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
        raise ConfigError(f"allowed must be a bool tensor of the shape of xy {tuple(xy.shape)}, got {shape}")
    allowed_t = allowed.to(device=xy.device) != 0
    if bool(allowed_t.all()):
        return None
    if solver not in ALLOWED_SOLVERS:
        raise ConfigError(f"allowed is supported by the solvers {ALLOWED_SOLVERS}, not solver={solver!r}")
    if k is not None and xy.shape[0]:
        short = k > allowed_t.sum(dim=1)
        if bool(short.any()):
            row = int(short.nonzero()[0])
            raise ConfigError(
                f"k exceeds the allowed atoms in {int(short.sum())} row(s); e.g. row {row}: k = {int(k[row])}, "
                f"{int(allowed_t[row].sum())} allowed"
            )
    return allowed_t



def validated(solver: str, gram: Any, xy: Any, k: Any, lam: Any, allowed: Any, options: dict[str, Any]
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Every check ``solve`` and the solver classes run before any work, in one place.

    Returns:
        (gram as [g, n, n], xy, groups [o], k [o] or None, lam [o] or None, allowed [o, n] or None).

    Raises:
        ValueError: naming the offending argument (see ``csprune.solvers.solve``).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"solver must be one of {SOLVERS}, got {solver!r}")
    gram3, xy, g = check_problem(gram, xy)
    o, n = xy.shape
    k_t, lam_t = check_budget(k, lam, o, n, xy)
    check_options(solver, options, SOLVER_OPTIONS[solver])
    allowed_t = check_allowed(allowed, solver, xy, k_t)
    if solver in ("omp", "obs", "sparsegpt") and k_t is None:
        raise ConfigError(f"solver={solver!r} solves the l0 form: pass k (the budget), not lam")
    return gram3, xy, row_groups(o, g, xy.device), k_t, lam_t, allowed_t
