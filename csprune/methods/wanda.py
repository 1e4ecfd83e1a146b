"""Wanda (Sun et al., 2023): importance |W_ij|·‖X_j‖₂ from input norms."""

from __future__ import annotations

import logging

import torch


from .base import LayerContext, Method, Selection
from .refit import refit_selection

__all__ = ["Wanda"]

log = logging.getLogger("csprune")


class Wanda(Method):
    """Score |w_ij|·sqrt(E[x_j²]); compare within rows (``scope="row"``) as the paper does.

    Args:
        refit: re-solve the kept weights by least squares on the activation Gram ("Wanda+refit").
        damping: δ of the Gram used by the refit.
    """

    name = "wanda"

    def __init__(self, *, refit: bool = False, damping: float = 0.01) -> None:
        self.refit = refit
        self.damping = damping  # 1% diagonal loading, as CSP (docs/design.md §3)
        self.stats_mode = "full" if refit else "diag"

    def score(self, rows: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        sq = ctx.stats.sq_norms(ctx.target) if ctx.stats is not None else None
        if sq is None:
            log.warning("csprune: wanda has no input statistics for %s; scoring it by magnitude", ctx.target.fqn)
            return rows.abs()
        g = sq.shape[0]
        o, n = rows.shape
        norms = sq.clamp_min(0).sqrt().to(rows.device)  # [g, n]
        return (rows.abs().reshape(g, o // g, n) * norms.unsqueeze(1)).reshape(o, n)

    def select(self, rows: torch.Tensor, keep: torch.Tensor, ctx: LayerContext) -> Selection:
        return refit_selection(rows, keep, ctx, self.damping) if self.refit else Selection(keep)

    def extra_repr(self) -> str:
        return "refit=True" if self.refit else ""
