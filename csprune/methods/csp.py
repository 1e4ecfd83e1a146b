"""CSP: compressed-sensing-based pruning (docs/design.md §3).

For each row w_i of a target's row view, CSP recovers a sparse θ_i that explains
the same measurements Φw_i:

    θ_i = argmin_θ ½(w_i − θ)ᵀ G (w_i − θ)   s.t. ‖θ‖₀ ≤ k_i      (omp, sklearn)
        or the ℓ1 relaxation with λ_i bisected to the budget     (fista, cvxpy)

with G = ΦᵀΦ from the chosen sensing. The per-row budgets k_i come from ranking
the saliency |w_ij|·sqrt(G_jj) within the scope (row / layer / global), so a
layer's non-zeros go to the rows whose outputs need them. The mask is the
support (top-k_i of |θ|, ties broken by |w|) and the kept weights are the
least-squares refit on it, written back into the model.
"""

from __future__ import annotations

import logging
import time

import torch

from ..solvers import ALLOWED_SOLVERS, SOLVERS, refit, solve
from .base import LayerContext, Method, Selection, nm_keep, rank_keep
from .refit import relative_error, row_error
from .sensing import SENSINGS, grouped_xy, sensing_gram
from ..errors import ConfigError

__all__ = ["CSP"]

log = logging.getLogger("csprune")


class CSP(Method):
    """Compressed-sensing pruning.

    Args:
        sensing: "activations" (Φ = the layer's inputs), "gaussian" or "identity".
        solver: one of ``csprune.solvers.SOLVERS``, or "auto": per update, ``obs`` (backward
            elimination, exact least squares) when it removes no more atoms than the rows keep —
            every gradual step and one-shot up to 50% — else ``omp`` (forward selection of the few
            atoms kept); each is the faster and, in bench/solvers.py, the lower-error one there.
        damping: δ in G + δ·mean(diag G)·I; 1% keeps G well conditioned without
            changing which weights matter (docs/design.md §3 measurements used it).
        gaussian_ratio: ρ = m/n for gaussian sensing (0.5: half as many measurements as unknowns).
        train_l1: λ_train of ``Pruner.penalty()``: λ_train·Σ‖W‖₁ over targets, annealed to 0 by
            the end of the schedule (0: off, training is left alone).
        solver_options: extra keyword arguments for ``csprune.solvers.solve``; with solver "auto", a
            dict per solver name (``{"omp": {...}, "obs": {...}}``).
        safeguard: per row, fall back to the refit top-|w| (or saliency) support when it has a lower
            error than the solver's; greedy recovery is not optimal, and this costs two batched refits
            (∝ k³ per row). "auto": on for one-shot steps, off for gradual updates, where the
            training that follows matters more than the last refit and the update must stay cheap.
        solve_updates: which updates of a gradual schedule run the solver: "all", or "final" (the
            ones before it rank and keep by |w| as gmp does, with no statistics and no solve; the
            update that reaches the final sparsity senses and solves, warm-started from the mask
            they left). "all" by default: see docs/design.md §3 for what each costs and scores.
    """

    name = "csp"

    def __init__(
        self,
        sensing: str = "activations",
        solver: str = "auto",
        *,
        damping: float = 0.01,
        gaussian_ratio: float = 0.5,
        train_l1: float = 0.0,
        solver_options: dict | None = None,
        safeguard: bool | str = "auto",
        solve_updates: str = "all",
    ) -> None:
        if sensing not in SENSINGS:
            raise ConfigError(f"sensing={sensing!r}: expected one of {SENSINGS}")
        if solver not in SOLVERS + ("auto",):
            raise ConfigError(f"solver={solver!r}: expected auto or one of {SOLVERS}")
        if safeguard not in (True, False, "auto"):
            raise ConfigError(f"safeguard={safeguard!r}: expected true, false or auto")
        if solve_updates not in ("all", "final"):
            raise ConfigError(f"solve_updates={solve_updates!r}: expected all or final")
        if damping < 0:
            raise ConfigError(f"damping={damping}: must be >= 0")
        if not 0 < gaussian_ratio:
            raise ConfigError(f"gaussian_ratio={gaussian_ratio}: must be > 0")
        self.sensing = sensing
        self.solver = solver
        self.damping = damping
        self.gaussian_ratio = gaussian_ratio
        self.train_l1 = float(train_l1)
        self.solver_options = dict(solver_options or {})
        self.safeguard = safeguard
        self.solve_updates = solve_updates
        self.stats_mode = "full" if sensing == "activations" else None

    def _gram(self, rows: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, str]:
        cached = ctx.state.get("_gram")
        if cached is None or cached[2] != ctx.step:
            gram, used = sensing_gram(ctx, rows.shape[1], self.sensing, self.damping, self.gaussian_ratio, rows.device)
            cached = (gram.to(rows.dtype), used, ctx.step)
            ctx.state["_gram"] = cached
        return cached[0], cached[1]

    def observes(self, final: bool) -> bool:
        return self.stats_mode is not None and (final or self.solve_updates == "all")

    def _by_magnitude(self, ctx: LayerContext) -> bool:
        """An update before the final one under ``solve_updates="final"``: |w| ranks and keeps."""
        return ctx.gradual and not ctx.final and self.solve_updates == "final"

    def score(self, rows: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if self._by_magnitude(ctx):
            return rows.abs()
        gram, _ = self._gram(rows, ctx)
        g = gram.shape[0]
        o, n = rows.shape
        scale = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [g, n]
        return (rows.abs().reshape(g, o // g, n) * scale.unsqueeze(1)).reshape(o, n)

    def select(self, rows: torch.Tensor, keep: torch.Tensor, ctx: LayerContext) -> Selection:
        if self._by_magnitude(ctx):
            return Selection(keep, None, {"solver": "magnitude"})
        gram, used = self._gram(rows, ctx)
        ctx.state.pop("_gram", None)  # do not hold an n×n matrix per tensor between steps
        xy = grouped_xy(gram, rows)
        k_rows = keep.sum(1)
        solver = self.solver_for(k_rows, ctx.allowed)
        options = dict(self.solver_options.get(solver, {})) if self.solver == "auto" else dict(self.solver_options)
        if solver in ("fista", "cvxpy") and ctx.state.get("lam") is not None:
            options.setdefault("lam_init", ctx.state["lam"])
        start = time.perf_counter()
        result = solve(gram, xy, k=k_rows, solver=solver, allowed=ctx.allowed if solver in ALLOWED_SOLVERS else None, **options)
        seconds = time.perf_counter() - start
        if result.lam is not None:
            ctx.state["lam"] = result.lam.detach()
        if not result.converged:
            log.warning("csprune: %s solver did not converge on %s (gap %.3g after %d iterations)",
                        solver, ctx.target.fqn, result.gap, result.n_iter)
        theta = result.coef.to(rows.dtype)
        # Support = largest |θ|; rows where θ has fewer non-zeros than the budget fill up by |w|.
        abs_theta, abs_w = theta.abs(), rows.abs()
        key = torch.where(
            theta != 0,
            1.0 + abs_theta / abs_theta.amax().clamp_min(1e-30),
            0.999 * abs_w / abs_w.amax().clamp_min(1e-30),
        )
        key = key.masked_fill(~ctx.allowed, -1.0)
        mask = nm_keep(key, *ctx.pattern) if ctx.pattern else rank_keep(key, k_rows)
        values = theta if result.lam is None and torch.equal(mask, theta != 0) else refit(gram, xy, mask)  # l1 θ is shrunk: refit
        # Safeguard (docs/design.md §3: CSP must never lose to magnitude+refit): per row, keep whichever of the
        # solver's support, the top-|w| support and the saliency-ranked support has the lowest error.
        fallbacks = 0
        if self.safeguard is True or (self.safeguard == "auto" and not ctx.gradual):
            magnitude_key = abs_w.masked_fill(~ctx.allowed, -1.0)
            for cand in (nm_keep(magnitude_key, *ctx.pattern) if ctx.pattern else rank_keep(magnitude_key, k_rows), keep):
                cand_values = refit(gram, xy, cand)
                better = row_error(gram, rows, cand_values) < row_error(gram, rows, values)
                if better.any():
                    fallbacks += int(better.sum())
                    mask = torch.where(better.unsqueeze(1), cand, mask)
                    values = torch.where(better.unsqueeze(1), cand_values, values)
        info = {
            "solver_iters": float(result.n_iter),
            "solver_gap": float(result.gap),
            "solver_seconds": seconds,
            "rel_error": relative_error(gram, rows, values),
            "sensing": used,
            "safeguard_rows": float(fallbacks),
            "solver": solver,
        }
        return Selection(mask, values, info)

    def solver_for(self, k_rows: torch.Tensor, allowed: torch.Tensor) -> str:
        """The solver of one update: ``self.solver``, or for "auto" obs when the rows remove at most as
        many atoms as they keep (backward elimination does the removals), else omp (forward selection
        does the keeps)."""
        if self.solver != "auto":
            return self.solver
        removed = int((allowed.sum(1) - k_rows).sum())
        return "obs" if removed <= int(k_rows.sum()) else "omp"

    def extra_repr(self) -> str:
        extra = ", solve_updates='final'" if self.solve_updates == "final" else ""
        return f"sensing={self.sensing!r}, solver={self.solver!r}{extra}"
