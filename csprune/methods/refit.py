"""Least-squares refit of the kept weights on the sensing Gram, shared by all methods."""

from __future__ import annotations

import torch

from ..solvers import refit
from .base import LayerContext, Selection
from .sensing import grouped_xy, sensing_gram

__all__ = ["refit_selection", "relative_error", "row_error"]


def relative_error(gram: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> float:
    """Σ (w−θ)ᵀG(w−θ) / Σ wᵀGw: relative output error of the pruned rows on the sensing data.

    Args:
        gram: [g, n, n].
        rows: [o, n] original weights.
        values: [o, n] pruned weights.
    """
    diff = rows - values
    num = (grouped_xy(gram, diff) * diff).sum()
    den = (grouped_xy(gram, rows) * rows).sum().clamp_min(1e-30)
    return float(num / den)


def row_error(gram: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(w−θ)ᵀG(w−θ) per row, [o] (the CSP objective up to ½)."""
    diff = rows - values
    return (grouped_xy(gram, diff) * diff).sum(1)


def refit_selection(rows: torch.Tensor, keep: torch.Tensor, ctx: LayerContext, damping: float,
                    sensing: str = "activations", ratio: float = 0.5) -> Selection:
    """Keep ``keep`` and re-solve the kept weights: θ_S = G_SS⁻¹ (G w)_S per row.

    Args:
        rows: [o, n] current weights.
        keep: [o, n] bool mask.
        ctx: the target's context.
        damping: δ of the activation Gram.
        sensing: Gram to fit on (unobserved inputs: identity, i.e. the kept weights stay as they are).
        ratio: ρ of gaussian sensing.
    """
    gram, used = sensing_gram(ctx, rows.shape[1], sensing, damping, ratio, rows.device)
    gram = gram.to(rows.dtype)
    xy = grouped_xy(gram, rows)
    values = refit(gram, xy, keep)
    return Selection(keep, values, {"rel_error": relative_error(gram, rows, values), "sensing": used})
