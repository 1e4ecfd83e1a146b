"""Sensing operators: the Gram matrix G = ΦᵀΦ each row is measured with (docs/design.md §3).

* ``activations``: Φ = X, the layer's own inputs, G = E[xxᵀ] from the hooks,
  damped ``G + δ·mean(diag G)·I``;
* ``gaussian``: Φ_ij ~ N(0, 1/m), m = ⌈ρn⌉, seeded by the tensor's fqn so every
  run and every DDP rank draws the same Φ;
* ``identity``: G = I (CSP then reduces to magnitude pruning); also what ``activations``
  falls back to, with a warning, for a tensor whose inputs were not observed.
"""

from __future__ import annotations

import logging
import math
import zlib

import torch

from .base import LayerContext
from ..errors import ConfigError

__all__ = ["SENSINGS", "sensing_gram", "gaussian_gram", "grouped_xy"]

log = logging.getLogger("csprune")

SENSINGS = ("activations", "gaussian", "identity")
_warned: set[str] = set()


def gaussian_gram(fqn: str, n: int, ratio: float, device: torch.device, seed: int = 0) -> torch.Tensor:
    """ΦᵀΦ for a Gaussian Φ [⌈ρn⌉, n] with N(0, 1/m) entries, seeded by ``fqn`` and ``seed``.

    Returns:
        [1, n, n] float32.
    """
    m = max(1, math.ceil(ratio * n))
    gen = torch.Generator().manual_seed(zlib.crc32(fqn.encode()) ^ seed)
    phi = torch.randn(m, n, generator=gen) / math.sqrt(m)
    return (phi.T @ phi).unsqueeze(0).to(device)


def sensing_gram(
    ctx: LayerContext, n: int, sensing: str, damping: float, ratio: float, device: torch.device
) -> tuple[torch.Tensor, str]:
    """The Gram matrix of one target.

    Args:
        ctx: target context (statistics for ``activations``).
        n: row width.
        sensing: one of :data:`SENSINGS`.
        damping: δ, relative diagonal loading of the activation Gram.
        ratio: ρ = m/n of Gaussian sensing.
        device: where the solver runs.

    Returns:
        ([g, n, n] float32 Gram, the sensing actually used: "identity" for an ``activations``
        target without statistics).
    """
    if sensing == "identity":
        return torch.eye(n, device=device).unsqueeze(0), sensing
    if sensing == "activations":
        gram = ctx.stats.gram(ctx.target) if ctx.stats is not None else None
        if gram is not None:
            diag_mean = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
            eye = torch.eye(n, device=gram.device)
            return (gram + damping * diag_mean.view(-1, 1, 1) * eye).to(device), sensing
        # docs/design.md §3: values solved on a Gaussian Gram are never written into a layer whose activations
        # exist (measured worse than zeroing the layer); an unobserved tensor is pruned by magnitude.
        if ctx.target.fqn not in _warned:
            _warned.add(ctx.target.fqn)
            log.warning("csprune: inputs of %s (%s) were not observed; pruning it by magnitude (identity sensing)",
                        ctx.target.fqn, ctx.target.kind)
        return torch.eye(n, device=device).unsqueeze(0), "identity"
    if sensing == "gaussian":
        return gaussian_gram(ctx.target.fqn, n, ratio, device), sensing
    raise ConfigError(f"sensing={sensing!r}: expected one of {SENSINGS}")


def grouped_xy(gram: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """xy_i = G_{group(i)} w_i for every row.

    Args:
        gram: [g, n, n] symmetric.
        rows: [o, n], o divisible by g, rows split into g contiguous groups.

    Returns:
        [o, n].
    """
    g = gram.shape[0]
    o, n = rows.shape
    return torch.bmm(rows.reshape(g, o // g, n), gram).reshape(o, n)
