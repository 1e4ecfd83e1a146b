"""Budgets never starve a row that magnitude would keep alive (issue #12, defect 3; docs/design.md §3).

A depthwise conv has one small Gram per channel (15 taps here); ranking |w|·√G_jj across the
whole tensor (scope "layer") used to hand the budget out by each channel's input energy and
leave quiet channels with no weight at all, where magnitude keeps them alive.
"""

import copy

import pytest
import torch
from torch import nn

import csprune
from csprune.methods import CSP, Magnitude, Wanda
from csprune.methods.base import keep_from_scores

C, K = 144, 15  # a Conformer-sized depthwise conv: 144 channels, 15 taps each


def _depthwise_and_calib(seed: int = 0):
    """Depthwise Conv1d and calibration inputs whose channel scales spread over e^±2 (as after a GLU).

    Returns:
        (conv, [(x [4, C, 100],), ...]).
    """
    torch.manual_seed(seed)
    conv = nn.Conv1d(C, C, K, padding=K // 2, groups=C)
    scale = torch.exp(torch.randn(1, C, 1))
    return conv, [(torch.randn(4, C, 100) * scale,) for _ in range(4)]


def _dead_rows(weight: torch.Tensor) -> torch.Tensor:
    """[o] bool, rows of the row view with no non-zero weight."""
    return (weight.reshape(weight.shape[0], -1) == 0).all(1)


@pytest.mark.parametrize("method", [CSP, Wanda])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_no_depthwise_channel_starved_at_layer_scope(method, sparsity):
    conv, calib = _depthwise_and_calib()
    magnitude = csprune.prune_once(copy.deepcopy(conv), Magnitude(), sparsity=sparsity, scope="layer").weight
    pruned = csprune.prune_once(copy.deepcopy(conv), method(), sparsity=sparsity, calib=calib, scope="layer").weight
    starved = _dead_rows(pruned) & ~_dead_rows(magnitude)
    assert int(starved.sum()) == 0, f"{int(starved.sum())} channels emptied that magnitude keeps alive"
    assert int((pruned == 0).sum()) == round(sparsity * pruned.numel())  # the budget, exactly


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_no_row_starved_at_global_scope(sparsity):
    """Global scope: the floor holds over all targets and the total budget is still met exactly."""
    conv, calib = _depthwise_and_calib(seed=1)
    net = nn.Sequential(conv, nn.Conv1d(C, 32, 1))
    magnitude = csprune.prune_once(copy.deepcopy(net), Magnitude(), sparsity=sparsity, scope="global")
    pruned = csprune.prune_once(copy.deepcopy(net), CSP(), sparsity=sparsity, calib=calib, scope="global")
    total = zeros = 0
    for layer, ref in zip(pruned, magnitude):
        starved = _dead_rows(layer.weight) & ~_dead_rows(ref.weight)
        assert int(starved.sum()) == 0
        total += layer.weight.numel()
        zeros += int((layer.weight == 0).sum())
    assert zeros == round(sparsity * total)


def test_row_floor_by_hand():
    """Row 1 scores far below row 0, but magnitude keeps one of its weights: it keeps its best-scored one,
    and row 0 gives up its lowest-scored kept weight."""
    scores = torch.tensor([[10.0, 9.0, 8.0, 1.0], [0.3, 0.1, 0.2, 0.05]])
    mags = torch.tensor([[5.0, 4.0, 1.0, 0.5], [3.0, 0.2, 0.1, 0.1]])  # magnitude keeps 5, 4, 3, 1 (rows 0 and 1)
    (plain,) = keep_from_scores([scores], 0.5, "layer")
    assert plain.tolist() == [[True, True, True, True], [False, False, False, False]]
    (floored,) = keep_from_scores([scores], 0.5, "layer", magnitudes=[mags])
    assert floored.tolist() == [[True, True, True, False], [True, False, False, False]]


def test_row_floor_leaves_rows_magnitude_empties_and_disallowed_weights():
    """A row magnitude empties may stay empty; a weight that may not be kept (-inf) is never added."""
    scores = torch.tensor([[10.0, 9.0], [float("-inf"), 0.1], [0.2, 0.3]])
    mags = torch.tensor([[1.0, 1.0], [float("-inf"), 2.0], [0.01, 0.02]])  # magnitude keeps rows 0 and 1
    (floored,) = keep_from_scores([scores], 0.5, "layer", magnitudes=[mags])
    assert floored.tolist() == [[True, True], [False, True], [False, False]]  # row 2 gives way: magnitude empties it
