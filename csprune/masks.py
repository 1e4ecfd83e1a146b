"""Masks as parametrizations, kept exact through training, and a clean squash.

A mask is a boolean tensor shaped like the weight (True = kept). It is attached
with :func:`torch.nn.utils.parametrize.register_parametrization`, so every read
of ``module.weight`` sees ``original * mask`` and gradients at pruned positions
are exactly zero. :func:`enforce_zeros` additionally zeroes the stored original
and the optimizer state at pruned positions, so nothing drifts there (AdamW's
decoupled decay, momentum) and a regrown weight starts from zero.
:func:`squash_mask` removes the parametrization and leaves a plain parameter
with exact zeros (the same ``nn.Parameter`` object, so optimizers stay valid).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["MaskParametrization", "attach_mask", "get_mask", "set_mask", "enforce_zeros", "squash_mask", "original_param"]


class MaskParametrization(nn.Module):
    """``weight -> weight * mask``; the mask is a non-persistent buffer.

    Non-persistent so that ``model.state_dict()`` holds only the weights; the masks
    travel in ``Pruner.state_dict()`` (one obvious place for each).
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))  # +0.0, never -0.0


def _find(module: nn.Module, name: str) -> MaskParametrization | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, MaskParametrization):
            return p
    return None


def attach_mask(module: nn.Module, name: str, mask: torch.Tensor | None = None) -> MaskParametrization:
    """Attach a mask parametrization to ``module.<name>`` (all-ones when ``mask`` is None)."""
    existing = _find(module, name)
    if existing is not None:
        if mask is not None:
            existing.mask.copy_(mask)
        return existing
    weight = getattr(module, name)
    if mask is None:
        mask = torch.ones_like(weight, dtype=torch.bool)
    param = MaskParametrization(mask.to(weight.device))
    if not hasattr(module, "_csprune_param_order"):  # restored by squash_mask: state_dict order unchanged
        module._csprune_param_order = list(module._parameters.keys())
    parametrize.register_parametrization(module, name, param, unsafe=True)
    return param


def get_mask(module: nn.Module, name: str) -> torch.Tensor:
    """The boolean mask of ``module.<name>`` (True = kept)."""
    p = _find(module, name)
    if p is None:
        raise KeyError(f"{type(module).__name__}.{name} has no csprune mask")
    return p.mask


def set_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Replace the mask in place (shape-checked)."""
    p = _find(module, name)
    if p is None:
        raise KeyError(f"{type(module).__name__}.{name} has no csprune mask")
    if mask.shape != p.mask.shape:
        raise ValueError(f"mask for {name}: shape {tuple(mask.shape)} != weight shape {tuple(p.mask.shape)}")
    p.mask.copy_(mask)


def original_param(module: nn.Module, name: str) -> nn.Parameter:
    """The trainable parameter behind a parametrized weight (what the optimizer holds)."""
    return module.parametrizations[name].original


@torch.no_grad()
def enforce_zeros(module: nn.Module, name: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the stored weight and the optimizer state at pruned positions.

    Args:
        module: module with a mask on ``name``.
        name: parameter name.
        optimizer: optimizer holding the original parameter; every state tensor shaped
            like the weight (momentum buffers, Adam moments) is zeroed where the mask is False.
    """
    mask = get_mask(module, name)
    original = original_param(module, name)
    original.masked_fill_(~mask, 0.0)  # +0.0: a -0.0 would cost a sign bit in the sparse export
    if optimizer is not None:
        state = optimizer.state.get(original)
        if state:
            for value in state.values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.masked_fill_(~mask, 0)


def squash_mask(module: nn.Module, name: str) -> None:
    """Remove the mask parametrization, leaving ``original * mask`` as a plain parameter."""
    if _find(module, name) is None:
        return
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    order = [k for k in getattr(module, "_csprune_param_order", []) if k in module._parameters]
    rest = [k for k in module._parameters if k not in order]
    module._parameters = {k: module._parameters[k] for k in order + rest}
    if not parametrize.is_parametrized(module):
        module.__dict__.pop("_csprune_param_order", None)
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()  # the RNN's flat weight list must point at the new plain parameters
