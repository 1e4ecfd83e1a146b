"""Collectives the engine needs under DDP: is a process group up, and do all ranks hold the same thing.

Everything here is a no-op in a single process. Process-group setup, the DDP wrapper and the
training-loop helpers live in ``csprune.train.ddp``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import DistributedError

__all__ = ["is_distributed", "checksum", "assert_same_on_ranks"]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def checksum(tensors: Iterable[torch.Tensor], modulus: int = 1009) -> torch.Tensor:
    """[2] float64 on CPU: Σv and a position-weighted Σv over the tensors, in order (cheap rank comparison)."""
    total = torch.zeros(2, dtype=torch.float64)
    for i, t in enumerate(tensors):
        v = t.detach().reshape(-1).double().cpu()
        total[0] += v.sum()
        total[1] += (v * torch.arange(1, v.numel() + 1, dtype=torch.float64).remainder(modulus)).sum() * (i + 1)
    return total


def assert_same_on_ranks(value: torch.Tensor, what: str) -> None:
    """All-gather ``value`` and raise naming ``what`` and the ranks when any rank differs from rank 0."""
    if not is_distributed():
        return
    dist = torch.distributed
    mine = value.cuda() if dist.get_backend() == "nccl" else value
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    bad = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if bad:
        raise DistributedError(f"DDP: {what} of ranks {bad} differ from rank 0's (checksums {[g.tolist() for g in gathered]})")
