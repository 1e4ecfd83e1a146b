"""Masks as parametrizations, kept exact through training, and a clean squash.

A mask is a boolean tensor shaped like the weight (True = kept). It is attached
with :func:`torch.nn.utils.parametrize.register_parametrization`, so every read
of ``module.weight`` sees ``original * mask`` and gradients at pruned positions
are exactly zero. :func:`enforce_zeros` additionally zeroes the stored original
and the optimizer's first moments at pruned positions (second moments are set to 1 there, see
``PRUNED_SECOND_MOMENT``), so nothing drifts there (AdamW's decoupled decay, momentum); a regrown
weight starts from zero with fresh state (:func:`clear_state`).
:func:`reset_moments` clears the stale first moments of kept weights a method rewrote (a
least-squares refit), so the optimizer does not keep pushing them toward where the old values went.
:func:`squash_mask` removes the parametrization and leaves a plain parameter
with exact zeros (the same ``nn.Parameter`` object, so optimizers stay valid).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize
from .errors import ConfigError

__all__ = [
    "MaskParametrization", "attach_mask", "get_mask", "set_mask", "enforce_zeros", "reset_moments", "squash_mask",
    "original_param", "clear_state", "FIRST_MOMENT_KEYS", "SECOND_MOMENT_KEYS", "PRUNED_SECOND_MOMENT",
]

# Optimizer state holding a running mean of past gradients (a direction): SGD and RMSprop momentum,
# the Adam family's first moment, centered RMSprop's gradient mean. Reset where a weight is rewritten.
FIRST_MOMENT_KEYS = ("momentum_buffer", "exp_avg", "grad_avg")
# Optimizer state that is a running mean of squared gradients, used under a square root: Adam's
# second moments, RMSprop's average, Adagrad's sum.
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")
# What a second moment holds at a pruned position. Any positive value is exact there: the gradient
# and the first moment are zero, so the update is 0 / (sqrt(v) + eps) = 0 whatever v is. Not 0,
# because torch's CPU sqrt takes a slow path on exact zeros: at 50% zeros AdamW's sqrt of a 576x144
# second moment costs 296 us instead of 30 us (AVX-512 build, one thread; docs/design.md "The
# training hot path"). Not a tiny value either: denormals are slower still (946 us).
PRUNED_SECOND_MOMENT = 1.0
# The optimizer decays that 1 by its β each step (β₂ = 0.999: 0.37 after 1000 steps; RMSprop's 0.99:
# 4e-5), so enforce_zeros sets it back on its first call after a mask change and every this many
# calls after, long before any β >= 0.5 reaches a denormal (0.5^100 = 8e-31), at the cost of one
# boolean fill per 100 steps. The first call also catches state the optimizer created after the mask
# (zeros there).
REFILL_EVERY = 100


class MaskParametrization(nn.Module):
    """``weight -> weight * mask``; the mask is a non-persistent buffer.

    Non-persistent so that ``model.state_dict()`` holds only the weights; the masks
    travel in ``Pruner.state_dict()`` (one obvious place for each).

    Once :func:`enforce_zeros` has zeroed the stored weight at the pruned positions
    (``zeros_enforced``; any new mask clears it), the forward returns the stored weight
    as it is — multiplying by the mask would only reproduce it — and a gradient hook on
    the stored weight zeroes its gradient at the pruned positions instead, so gradient
    norms (clipping), DDP's all-reduce and the optimizer see exactly what a masked forward
    gives them, and the pruned weights stay exactly zero (a zero gradient and zero optimizer
    state leave Adam, AdamW's decay and SGD momentum at zero). This takes the mask off the
    forward and backward pass of every step (bench/overhead.py).

    The hook multiplies by ``keep``, the mask as a float tensor, rather than filling by the boolean
    mask: on torch's CPU kernels ``masked_fill`` costs ~30x a multiply (272 vs 9 us on 576x144, one
    thread). A multiply leaves -0.0 where a gradient was negative, which no optimizer turns into a
    non-zero weight (0 + -0.0 = +0.0), and NaN where a gradient was NaN (the training loop stops on
    non-finite gradients before any step, csprune.train.faults).
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=False)
        self.register_buffer("keep", mask.to(torch.float32), persistent=False)  # refreshed, in the weight's dtype, by enforce_zeros
        self.zeros_enforced = False
        self.fast_calls = 0  # enforce_zeros calls on the fast path since the mask last changed
        self._hooked = None  # weakref to the tensor carrying our gradient hook (a deepcopy re-hooks its own)
        self._hook = None

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.keep.to(grad.dtype) if self.zeros_enforced else grad

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.zeros_enforced:
            if weight.requires_grad and (self._hooked is None or self._hooked() is not weight):
                self._hook = weight.register_hook(self._mask_grad)
                self._hooked = weakref.ref(weight)
            return weight
        return torch.where(self.mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))  # +0.0, never -0.0

    def release(self) -> None:
        """Remove the gradient hook (before the parametrization is squashed away)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._hooked = None, None
        self.zeros_enforced = False  # the squash evaluates the forward once more: by the mask, without a new hook


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
            existing.zeros_enforced = False
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
        raise ConfigError(f"mask for {name}: shape {tuple(mask.shape)} != weight shape {tuple(p.mask.shape)}")
    p.mask.copy_(mask)
    p.zeros_enforced = False  # the stored weight may be non-zero where the new mask prunes


def original_param(module: nn.Module, name: str) -> nn.Parameter:
    """The trainable parameter behind a parametrized weight (what the optimizer holds)."""
    return module.parametrizations[name].original


@torch.no_grad()
def enforce_zeros(module: nn.Module, name: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the stored weight and the optimizer state at pruned positions.

    Args:
        module: module with a mask on ``name``.
        name: parameter name.
        optimizer: optimizer holding the original parameter; where the mask is False, every
            state tensor shaped like the weight is zeroed (momentum buffers, Adam's first moment),
            except second moments (``SECOND_MOMENT_KEYS``), which are set to ``PRUNED_SECOND_MOMENT``.

    Once zeros are enforced and the mask has not changed since, a call only multiplies the weight
    and the first moments by the mask (a guard against drift at the cost of a fast multiply).
    """
    param = _find(module, name)
    if param is None:
        raise KeyError(f"{type(module).__name__}.{name} has no csprune mask")
    mask = param.mask
    original = original_param(module, name)
    state = optimizer.state.get(original) if optimizer is not None else None
    shaped = {key: value for key, value in (state or {}).items() if torch.is_tensor(value) and value.shape == mask.shape}
    if param.zeros_enforced:
        # Nothing changed since the last full pass: with a zero gradient and zero first moments the
        # optimizer leaves the pruned weights at zero, so this only guards against drift.
        original.mul_(param.keep.to(original.dtype))
        refill = param.fast_calls % REFILL_EVERY == 0  # the first fast call, then every REFILL_EVERY
        param.fast_calls += 1
        for key, value in shaped.items():
            if key not in SECOND_MOMENT_KEYS:
                if value.is_floating_point():
                    value.mul_(param.keep.to(value.dtype))
            elif refill:
                value.masked_fill_(~mask, PRUNED_SECOND_MOMENT)
        return
    pruned = ~mask
    original.masked_fill_(pruned, 0.0)  # +0.0: a -0.0 would cost a sign bit in the sparse export
    param.fast_calls = 0
    for key, value in shaped.items():
        value.masked_fill_(pruned, PRUNED_SECOND_MOMENT if key in SECOND_MOMENT_KEYS else 0)
    param.keep = mask.to(original.dtype)
    param.zeros_enforced = True


@torch.no_grad()
def clear_state(module: nn.Module, name: str, where: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Zero every optimizer state entry of ``module.<name>`` at ``where`` (a regrown weight starts fresh).

    Args:
        module: module with a mask on ``name``.
        name: parameter name.
        where: bool, shaped like the weight.
        optimizer: optimizer holding the original parameter, or None (nothing to do).
    """
    if optimizer is None:
        return
    for value in (optimizer.state.get(original_param(module, name)) or {}).values():
        if torch.is_tensor(value) and value.shape == where.shape:
            value.masked_fill_(where.to(value.device), 0)


@torch.no_grad()
def reset_moments(module: nn.Module, name: str, changed: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> int:
    """Zero the first-moment optimizer state of the weights a pruning step rewrote.

    Design: the first moment (``FIRST_MOMENT_KEYS``: Adam's ``exp_avg``, SGD's ``momentum_buffer``)
    averages gradients taken at the old values, so after a refit moved a weight it points the wrong
    way; it restarts from zero. The second moments (``exp_avg_sq``, ``max_exp_avg_sq``, RMSprop's
    ``square_avg``, Adagrad's ``sum``) are kept: they estimate each weight's gradient scale, which a
    refit barely changes, and zeroing them would be unsafe — the step counter, and so Adam's bias
    correction, is per tensor, so late in training a zeroed ``exp_avg_sq`` gives updates up to 6.6×
    the learning rate (β = (0.9, 0.999): (1−β₁ᵗ)/√(1−β₂ᵗ) peaks at t = 12, still 1.26 at t = 1000).
    With m = 0 and v kept, a rewritten weight's Adam update ramps from 0 back to its usual size within
    about 1/(1−β₁) steps. Pruned positions are not touched here (:func:`enforce_zeros` zeroes all
    their state).

    Args:
        module: module with a mask on ``name``.
        name: parameter name.
        changed: bool, shaped like the weight: True where the pruner wrote a new value.
        optimizer: optimizer holding the original parameter, or None (nothing to do).

    Returns:
        Number of state entries reset (summed over the first-moment tensors).
    """
    if optimizer is None:
        return 0
    state = optimizer.state.get(original_param(module, name))
    if not state:
        return 0
    reset = 0
    for key in FIRST_MOMENT_KEYS:
        value = state.get(key)
        if torch.is_tensor(value) and value.shape == changed.shape:
            value.masked_fill_(changed.to(value.device), 0)
            reset += int(changed.sum())
    return reset


def squash_mask(module: nn.Module, name: str) -> None:
    """Remove the mask parametrization, leaving ``original * mask`` as a plain parameter."""
    param = _find(module, name)
    if param is None:
        return
    param.release()
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    order = [k for k in getattr(module, "_csprune_param_order", []) if k in module._parameters]
    rest = [k for k in module._parameters if k not in order]
    module._parameters = {k: module._parameters[k] for k in order + rest}
    if not parametrize.is_parametrized(module):
        module.__dict__.pop("_csprune_param_order", None)
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()  # the RNN's flat weight list must point at the new plain parameters
