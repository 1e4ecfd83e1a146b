"""The mask fast path: after enforce_zeros, no multiply in the forward, a gradient hook instead.

The reference is the plain masked computation (weight * mask), done by hand.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import pytest

import csprune
from csprune import masks as M
from csprune.methods import Magnitude
from csprune.schedules import OneShot


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


def _train(layer, opt, steps, enforce):
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(7, 6, generator=gen)
        opt.zero_grad()
        layer(x).sub(1.0).pow(2).sum().backward()
        opt.step()
        enforce()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    lambda p: torch.optim.Adagrad(p, lr=1e-2),
], ids=["adamw", "adam-amsgrad", "sgd-nesterov", "rmsprop-centered", "adagrad"])
def test_fast_path_trains_exactly_like_the_masked_reference(make_opt):
    """The hot path (multiply hook, second moments at 1 where pruned, no full pass while the mask is
    unchanged) gives bit-identical kept weights to the plain reference: every step masks the gradient
    with a boolean fill and zeroes the pruned weight and every state tensor. Pruned weights stay +0.0
    (no sign bit) and the pruned second moments hold the sentinel."""
    layer, mask = _layer()
    reference = nn.Linear(6, 4)
    reference.load_state_dict({"weight": M.original_param(layer, "weight").detach() * mask, "bias": layer.bias.detach()})
    opt, ref_opt = make_opt(list(layer.parameters())), make_opt(list(reference.parameters()))
    weight = M.original_param(layer, "weight")

    def enforce_reference():
        with torch.no_grad():
            reference.weight.masked_fill_(~mask, 0.0)
            for value in ref_opt.state[reference.weight].values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.masked_fill_(~mask, 0)

    reference.weight.register_hook(lambda g: g.masked_fill(~mask, 0.0))
    _train(reference, ref_opt, 12, enforce_reference)
    _train(layer, opt, 12, lambda: M.enforce_zeros(layer, "weight", opt))
    assert torch.equal(weight.detach(), reference.weight.detach())
    assert torch.equal(layer.bias.detach(), reference.bias.detach())
    assert not bool(torch.signbit(weight.detach()[~mask]).any()), "a pruned weight became -0.0"
    _assert_pruned_state(opt.state[weight], mask)


def _assert_pruned_state(state, mask):
    """First moments exactly 0 where pruned; second moments positive normal floats, at most the sentinel."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == mask.shape:
            pruned = value[~mask]
            if key in M.SECOND_MOMENT_KEYS:
                assert bool((pruned >= torch.finfo(pruned.dtype).tiny).all()), f"{key}: zero or denormal where pruned"
                assert bool((pruned <= M.PRUNED_SECOND_MOMENT).all()), key
            else:
                assert not bool(pruned.any()), key


def test_pruned_second_moments_never_decay_into_denormals():
    """RMSprop with alpha=0.5 halves the pruned sentinel every step: without the periodic refill it would
    underflow (0.5^250 = 0 in float32) and torch's sqrt would take its slow path on every step."""
    layer, mask = _layer()
    opt = torch.optim.RMSprop(layer.parameters(), lr=1e-3, alpha=0.5)
    _train(layer, opt, 250, lambda: M.enforce_zeros(layer, "weight", opt))
    _assert_pruned_state(opt.state[M.original_param(layer, "weight")], mask)


def test_a_regrown_weight_starts_from_zero_state():
    """With regrow, a pruned entry that comes back gets zero optimizer state, not the pruned sentinel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = csprune.Pruner(model, Magnitude(), OneShot(0.5), optimizer=opt, regrow=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=gen)).pow(2).sum().backward()
        opt.step()
        pruner.step()
    weight = M.original_param(model[0], "weight")
    old = M.get_mask(model[0], "weight").clone()
    with torch.no_grad():
        weight.copy_(torch.randn(8, 8, generator=gen))  # new magnitudes: some pruned entries win back their place
    pruner.prune_to(0.5)
    regrown = M.get_mask(model[0], "weight") & ~old
    assert bool(regrown.any())
    state = opt.state[weight]
    assert not bool(state["exp_avg"][regrown].any()) and not bool(state["exp_avg_sq"][regrown].any())
