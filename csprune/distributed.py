"""DDP glue both recipes share: process-group setup, the wrapper, and cross-rank agreement checks.

``torchrun`` (or a multi-task SLURM job from the submitit launcher) sets the environment; NCCL is
used on GPU, gloo on CPU. Everything here is a no-op in a single process.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

__all__ = ["shutdown_distributed", "resolve_device", "init_distributed", "LossModule", "wrap_ddp", "checksum", "assert_same_on_ranks",
           "check_weights_agree", "is_distributed"]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_device(name: str) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when ``WORLD_SIZE`` > 1.

    Each rank takes the GPU of its ``LOCAL_RANK``. Inside a multi-task SLURM job started by the
    submitit launcher, the environment comes from submitit instead.
    """
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SUBMITIT_FOLDER" in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()  # RANK/WORLD_SIZE/MASTER_* as torchrun would set them
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return 0, 1, device
    dist = torch.distributed
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shutdown_distributed() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it (no-op when not distributed).

    A rank with nothing left to do (ranks > 0 skip the evaluation and export) must not exit while
    rank 0 still works: its process teardown would kill the group's threads under rank 0's feet
    (seen as "terminate called without an active exception" and SIGABRT on a loaded machine).
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class LossModule(nn.Module):
    """``forward = model.loss``, so DDP sees the training forward (it only hooks ``__call__``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.loss(*inputs)


def wrap_ddp(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """The module the training loop calls: the model itself, or DDP around its ``loss``.

    Wrap *after* the Pruner is built: parametrizations replace parameters and DDP snapshots the
    parameter list when it wraps.
    """
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(LossModule(model), device_ids=[device.index] if device.type == "cuda" else None)


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
        raise RuntimeError(f"DDP: {what} of ranks {bad} differ from rank 0's (checksums {[g.tolist() for g in gathered]})")


def check_weights_agree(model: nn.Module, world: int) -> None:
    """Under DDP, the final weights must be bit-identical on every rank (mismatch is an error)."""
    if world > 1:
        floats = [t for _, t in sorted(model.state_dict().items()) if t.is_floating_point()]
        assert_same_on_ranks(checksum(floats), "final weights")
