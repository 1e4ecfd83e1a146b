"""Data-free baselines: magnitude and random pruning (optionally with a least-squares refit)."""

from __future__ import annotations

import zlib

import torch

from .base import LayerContext, Method, Selection
from .refit import refit_selection

__all__ = ["Magnitude", "Random"]


class Magnitude(Method):
    """Keep the largest |w| (masks identical to ``torch.nn.utils.prune.l1_unstructured``).

    Args:
        refit: re-solve the kept weights by least squares on the activation Gram
            (the "magnitude+refit" baseline); needs calibration data.
        damping: δ of the Gram used by the refit.
    """

    name = "magnitude"

    def __init__(self, *, refit: bool = False, damping: float = 0.01) -> None:
        self.refit = refit
        self.damping = damping  # 1% diagonal loading, as CSP (docs/design.md §3)
        self.stats_mode = "full" if refit else None

    def score(self, rows: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return rows.abs()

    def select(self, rows: torch.Tensor, keep: torch.Tensor, ctx: LayerContext) -> Selection:
        return refit_selection(rows, keep, ctx, self.damping) if self.refit else Selection(keep)

    def extra_repr(self) -> str:
        return "refit=True" if self.refit else ""


class Random(Method):
    """Keep a uniformly random subset (a floor every method must beat).

    Args:
        seed: base seed; the draw also depends on the tensor's fqn and the step, so every
            DDP rank and every resumed run draws the same mask.
    """

    name = "random"
    row_floor = False  # the uninformed baseline: its draw is left as it is (methods/base.py, row floor)

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def score(self, rows: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        gen = torch.Generator().manual_seed((zlib.crc32(ctx.target.fqn.encode()) ^ self.seed) + 7919 * ctx.step)
        return torch.rand(rows.shape, generator=gen).to(rows.device)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"
