"""The Gram memory cap: block sizes, blocked statistics, pruning under the cap, reporting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import csprune
from csprune import Pruner
from csprune.methods import CSP, Wanda
from csprune.schedules import OneShot
from csprune.stats import InputStats, gram_block_size
from csprune.targets import find_targets


def test_block_size_is_the_largest_fitting_divisor():
    assert gram_block_size(64, 1, None) is None  # no cap
    assert gram_block_size(64, 1, 8 * 64 * 64) is None  # the full Gram fits exactly
    assert gram_block_size(64, 1, 8 * 64 * 32) == 32
    assert gram_block_size(64, 1, 8 * 64 * 31) == 16  # 31 is no divisor of 64
    assert gram_block_size(60, 3, 8 * 3 * 60 * 12) == 12  # row groups multiply the cost
    assert gram_block_size(64, 1, 8 * 64 * 8, multiple=4) == 8
    with pytest.raises(ValueError, match=r"Gram of fc\.weight .* cannot be blocked"):
        gram_block_size(64, 1, 100, multiple=4, fqn="fc.weight")


def _xs(n: int, count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(n, n, generator=g)
    return [torch.randn(128, n, generator=g) @ mix for _ in range(count)]


def test_blocked_statistics_are_the_diagonal_blocks_of_the_full_gram():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16))
    targets = find_targets(net, ["0.weight"])
    full = InputStats(targets).attach()
    capped = InputStats(targets, max_gram_bytes=8 * 32 * 8).attach()  # blocks of 8
    full.enabled = capped.enabled = True
    for x in _xs(32):
        net(x)
    g, b = full.gram(targets[0]), capped.gram(targets[0])
    assert b.shape == (4, 8, 8) and capped.nbytes() < full.nbytes() / 3
    for j in range(4):
        assert torch.allclose(b[j], g[0, 8 * j:8 * (j + 1), 8 * j:8 * (j + 1)], rtol=1e-5, atol=1e-4)


def test_mha_groups_block_group_major():
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    targets = find_targets(mha, ["in_proj_weight"])
    full, capped = InputStats(targets).attach(), InputStats(targets, max_gram_bytes=8 * 3 * 16 * 4).attach()
    full.enabled = capped.enabled = True
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mha(q, k, k)
    g, b = full.gram(targets[0]), capped.gram(targets[0])  # [3, 16, 16], [12, 4, 4]
    assert b.shape == (12, 4, 4)
    for gi in range(3):
        for j in range(4):
            assert torch.allclose(b[gi * 4 + j], g[gi, 4 * j:4 * j + 4, 4 * j:4 * j + 4], atol=1e-5)


@pytest.mark.parametrize("scope,pattern", [("layer", "unstructured"), ("row", "unstructured"), ("layer", "2:4")])
def test_capped_csp_prunes_to_the_budget_and_reports_memory(scope, pattern):
    torch.manual_seed(0)
    results = {}
    for cap in (None, 8 * 64 * 16):  # full [64, 64] Gram vs blocks of 16 columns
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 32, bias=False))
        dense = net[0].weight.detach().clone()
        pruner = Pruner(net, CSP(), OneShot(0.5), scope=scope, pattern=pattern, max_gram_bytes=cap)
        pruner.stats.enabled = True
        xs = _xs(64)
        for x in xs:
            net(x)
        report = pruner.prune_to(0.5)
        w = net[0].weight.detach()
        X = torch.cat(xs)
        results[cap] = float(((X @ (w - dense).T) ** 2).sum() / ((X @ dense.T) ** 2).sum())
        assert abs(float((w == 0).float().mean()) - 0.5) < 1e-6
        info = report["tensors"]["0.weight"]
        if cap is None:
            assert info["gram_block"] == 64 and report["stats_bytes"] >= 8 * 64 * 64
        else:
            assert info["gram_block"] == 16 and report["stats_bytes"] <= cap + 64
            assert report["gram_bytes_peak"] == 4 * 64 * 16 and report["max_gram_bytes"] == cap
            if scope == "row":  # each column block of a row keeps its proportional share
                assert torch.equal((w != 0).reshape(32, 4, 16).sum(-1), torch.full((32, 4), 8))
        if pattern == "2:4":
            assert torch.equal((w != 0).reshape(32, 16, 4).sum(-1), torch.full((32, 16), 2))
    # Dropping off-block correlations costs accuracy, but the refit still beats doing nothing by far.
    assert results[None] <= results[8 * 64 * 16] + 1e-6 and results[8 * 64 * 16] < 0.5


def test_cap_is_ignored_by_diag_statistics():
    net = nn.Sequential(nn.Linear(64, 32))
    pruner = Pruner(net, Wanda(), OneShot(0.5), max_gram_bytes=1)
    assert pruner.stats.blocks == {}


def test_prune_once_accepts_the_cap():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    csprune.prune_once(net, CSP(), sparsity=0.5, calib=[(x,) for x in _xs(64)], max_gram_bytes=8 * 64 * 32)
    assert abs(float((net[0].weight == 0).float().mean()) - 0.5) < 1e-6


def test_capped_pruner_state_round_trips_and_rejects_other_cap():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    pruner = Pruner(net, CSP(), OneShot(0.5), max_gram_bytes=8 * 64 * 16)
    pruner.stats.enabled = True
    net(_xs(64, 1)[0])
    state = pruner.state_dict()
    twin = Pruner(nn.Sequential(nn.Linear(64, 32)), CSP(), OneShot(0.5), max_gram_bytes=8 * 64 * 16)
    twin.load_state_dict(state)
    assert torch.equal(twin.stats.gram(twin.targets[0]), pruner.stats.gram(pruner.targets[0]))
    other = Pruner(nn.Sequential(nn.Linear(64, 32)), CSP(), OneShot(0.5))
    with pytest.raises(ValueError, match=r"statistics of '0\.weight'.*max_gram_bytes"):
        other.load_state_dict(state)
