"""DDP glue both recipes share: process-group setup, the wrapper, shard-averaged buffers, agreement checks.

``torchrun`` (or a multi-task SLURM job from the submitit launcher) sets the environment; NCCL is
used on GPU, gloo on CPU. Everything here is a no-op in a single process.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..distributed import checksum, is_distributed
from ..errors import DistributedError

__all__ = ["shutdown_distributed", "resolve_device", "init_distributed", "LossModule", "wrap_ddp", "ShardBuffers",
           "any_on_ranks", "check_weights_agree"]


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


def wrap_ddp(model: nn.Module, world: int, device: torch.device, *, forward: str = "loss",
             find_unused_parameters: bool = False) -> nn.Module:
    """The module the training loop calls: the model itself, or DDP around it.

    Wrap *after* the Pruner is built: parametrizations replace parameters and DDP snapshots the
    parameter list when it wraps.

    Args:
        model: the unwrapped model.
        world: number of ranks (1: ``model`` is returned as is).
        device: this rank's device.
        forward: "loss": DDP calls ``model.loss`` (the ASR models); "model": ``model.forward`` itself.
        find_unused_parameters: needed when a step leaves some parameters without gradient (the codec's
            greedy stages train one module at a time).
    """
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = LossModule(model) if forward == "loss" else model
    # broadcast_buffers=False: BatchNorm running statistics are averaged over all shards after every
    # step (ShardBuffers) instead of being overwritten by rank 0's before every forward.
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
               find_unused_parameters=find_unused_parameters)


class ShardBuffers:
    """Running statistics of a global batch: the mean of the updates its shards make, on every rank.

    A global batch is cut into shards (DDP ranks × micro-batches). BatchNorm (any ``_NormBase`` that
    tracks running stats) updates its running mean and variance from the shard it sees; this makes the
    step's update the mean of the shards' updates, identical on every rank and equal to what one
    process computes for the same shards (``trainer.micro_batches``). Why averaging and not
    SyncBatchNorm: SyncBatchNorm changes the training forward itself (statistics over the global batch,
    an all-reduce per layer per forward) and so could not match a micro-batched single process;
    averaging costs one small all-reduce per step and keeps each shard's forward exactly what it is
    alone. ``num_batches_tracked`` advances once per step, as in one process with one batch.

    Use: ``begin()`` before the step's first shard, ``shard_done()`` after each shard's forward and
    backward, ``finish()`` after the last one.
    """

    def __init__(self, model: nn.Module):
        from torch.nn.modules.batchnorm import _NormBase

        self.buffers = [b for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._before: list[torch.Tensor] = []
        self._sums: list[torch.Tensor] = []
        self._shards = 0

    def __bool__(self) -> bool:
        return bool(self.buffers)

    def begin(self) -> None:
        self._before = [b.detach().clone() for b in self.buffers]
        self._sums = [torch.zeros_like(b) for b in self.buffers]
        self._shards = 0

    @torch.no_grad()
    def shard_done(self) -> None:
        """Record this shard's update and restore the buffers for the next shard."""
        for b, before, acc in zip(self.buffers, self._before, self._sums):
            acc.add_(b)
            b.copy_(before)
        self._shards += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Set every buffer to the mean over all shards of all ranks (integers: the value after one shard)."""
        floats = [(b, acc) for b, acc in zip(self.buffers, self._sums) if b.is_floating_point()]
        for b, acc in floats:
            b.copy_(acc / self._shards)
        for b, acc in zip(self.buffers, self._sums):
            if not b.is_floating_point():
                b.copy_(acc // self._shards)
        if is_distributed() and floats:
            flat = torch.cat([b.reshape(-1) for b, _ in floats])
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
            offset = 0
            for b, _ in floats:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


def any_on_ranks(flags: list[bool], device: torch.device | None = None) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks (the flags themselves when not distributed).

    Used so that every rank takes the same decision at a step boundary (stop on a non-finite loss,
    checkpoint on SIGTERM); a rank deciding alone would leave the others waiting in a collective.
    """
    if not is_distributed():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def check_weights_agree(model: nn.Module, world: int, on_disk: str = "") -> None:
    """Under DDP, the final weights and buffers must be bit-identical on every rank (mismatch is an error).

    Args:
        model: the unwrapped model.
        world: number of ranks (1: nothing to check).
        on_disk: what rank 0 has already written that survives the error (named in the message).

    Raises:
        RuntimeError: naming the ranks and up to five differing tensors.
    """
    if world <= 1:
        return
    names, tensors = zip(*[(k, t) for k, t in sorted(model.state_dict().items()) if t.is_floating_point()])
    mine = torch.stack([checksum([t]) for t in tensors])  # [T, 2]: one checksum per tensor
    dist = torch.distributed
    device = mine.cuda() if dist.get_backend() == "nccl" else mine
    gathered = [torch.zeros_like(device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, device)
    gathered = [g.cpu() for g in gathered]
    bad_ranks = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if bad_ranks:
        differ = [names[i] for i in range(len(names)) if any(not torch.equal(g[i], gathered[0][i]) for g in gathered)]
        keep = f"; {on_disk} is intact" if on_disk else ""
        raise DistributedError(f"DDP: final weights of ranks {bad_ranks} differ from rank 0's in {len(differ)} tensors "
                           f"({', '.join(differ[:5])}){keep}")
