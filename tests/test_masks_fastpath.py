"""The mask fast path: after enforce_zeros, no multiply in the forward, a gradient hook instead.

The reference is the plain masked computation (weight * mask), done by hand.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from csprune import masks as M


def _layer():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    M.attach_mask(layer, "weight", mask)
    return layer, mask


def _grad(layer, x):
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    return M.original_param(layer, "weight").grad.clone()


def test_enforced_forward_is_the_stored_weight_and_gradients_match_the_masked_forward():
    layer, mask = _layer()
    x = torch.randn(5, 6)
    reference_w = (M.original_param(layer, "weight").detach() * mask).clone()
    reference = nn.functional.linear(x, reference_w, layer.bias)
    masked_grad = _grad(layer, x)  # before enforce: torch.where in the forward
    assert not bool(masked_grad[~mask].any())
    M.enforce_zeros(layer, "weight")
    assert layer.parametrizations.weight[0].zeros_enforced
    assert layer.weight is M.original_param(layer, "weight")  # no new tensor: the forward multiplies by nothing
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=0)
    torch.testing.assert_close(_grad(layer, x), masked_grad, rtol=0, atol=0)  # the hook zeroes the pruned gradient


def test_a_new_mask_uses_the_masked_forward_until_zeros_are_enforced_again():
    layer, mask = _layer()
    M.enforce_zeros(layer, "weight")
    smaller = mask & (torch.arange(6) < 3)
    M.set_mask(layer, "weight", smaller)
    assert not layer.parametrizations.weight[0].zeros_enforced
    x = torch.randn(5, 6)
    expected = nn.functional.linear(x, M.original_param(layer, "weight").detach() * smaller, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)  # stored weight still non-zero where newly pruned


def test_a_deepcopy_masks_its_own_gradients_and_a_squash_leaves_no_hook():
    layer, mask = _layer()
    M.enforce_zeros(layer, "weight")
    x = torch.randn(5, 6)
    _grad(layer, x)
    twin = copy.deepcopy(layer)
    assert not bool(_grad(twin, x)[~mask].any())  # the copy's parameter got its own hook
    M.squash_mask(layer, "weight")
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    assert bool(layer.weight.grad[~mask].any()), "after squash the gradient is free (no hook left behind)"
