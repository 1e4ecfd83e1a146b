"""Pruner behaviour: peer parity, exact zeros through training, resume, finalize, bad input."""

import copy
import logging

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn
from torch.nn.utils import parametrize

import csprune
from csprune.methods import CSP, Magnitude, Wanda
from csprune.schedules import Cubic, OneShot


class Mixed(nn.Module):
    """Linear, Conv1d and LSTM, as the parity test asks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, kernel_size=3, padding=1)
        self.lstm = nn.LSTM(6, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 3)

    def forward(self, x):  # x: [B, 4, T]
        h = torch.relu(self.conv(x)).transpose(1, 2)
        y, _ = self.lstm(h)
        return self.head(y)


def _params(model):
    return [(model.conv, "weight"), (model.head, "weight")] + [
        (model.lstm, n) for n in model.lstm._flat_weights_names if n.startswith("weight")
    ]


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_magnitude_matches_torch_l1_unstructured(sparsity):
    torch.manual_seed(0)
    ref = Mixed()
    ours = copy.deepcopy(ref)
    for module, name in _params(ref):
        tprune.l1_unstructured(module, name, amount=sparsity)
    csprune.prune_once(ours, Magnitude(), sparsity=sparsity, scope="layer")
    for (rm, name), (om, _) in zip(_params(ref), _params(ours)):
        assert torch.equal(getattr(rm, name + "_mask").bool(), getattr(om, name) != 0), name


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_magnitude_matches_torch_global_unstructured(sparsity):
    torch.manual_seed(1)
    ref = Mixed()
    ours = copy.deepcopy(ref)
    tprune.global_unstructured(_params(ref), pruning_method=tprune.L1Unstructured, amount=sparsity)
    csprune.prune_once(ours, Magnitude(), sparsity=sparsity, scope="global")
    for (rm, name), (om, _) in zip(_params(ref), _params(ours)):
        assert torch.equal(getattr(rm, name + "_mask").bool(), getattr(om, name) != 0), name


@pytest.mark.parametrize("scope", ["row", "layer", "global"])
def test_csp_identity_equals_magnitude(scope):
    torch.manual_seed(2)
    a, b = Mixed(), None
    b = copy.deepcopy(a)
    csprune.prune_once(a, Magnitude(), sparsity=0.6, scope=scope)
    csprune.prune_once(b, CSP(sensing="identity"), sparsity=0.6, scope=scope)
    for (pa, ta), (pb, tb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(ta, tb, atol=1e-6), pa


def _train(model, pruner, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 4, 9, generator=gen)
        y = torch.randn(4, 9, 3, generator=gen)
        loss = nn.functional.mse_loss(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()


@pytest.mark.parametrize("make_opt,method,steps", [
    (lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2), CSP(), 200),
    (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), Magnitude(), 200),
    (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=1e-3), Magnitude(), 120),
], ids=["adam-csp", "adamw-magnitude", "sgd-momentum-magnitude"])
def test_pruned_weights_stay_zero_through_training(make_opt, method, steps):
    torch.manual_seed(0)
    model = Mixed()
    opt = make_opt(model.parameters())
    pruner = csprune.Pruner(model, method, Cubic(0.8, start_step=0, end_step=100, frequency=20), optimizer=opt)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(4, 4, 9, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        for t in pruner.targets:
            mask = csprune.masks.get_mask(t.module, t.param_name)
            assert (t.weight[~mask] == 0).all()
            original = csprune.masks.original_param(t.module, t.param_name)
            assert (original[~mask] == 0).all()
            for key, v in opt.state[original].items():
                if torch.is_tensor(v) and v.shape == mask.shape:
                    if key in csprune.masks.SECOND_MOMENT_KEYS:  # a positive normal sentinel there (masks.py)
                        assert ((v[~mask] >= torch.finfo(v.dtype).tiny) & (v[~mask] <= 1.0)).all()
                    else:
                        assert (v[~mask] == 0).all()
    assert pruner.sparsity()["total"] == pytest.approx(0.8, abs=0.01)


def test_resume_gives_identical_masks_and_weights():
    def make():
        torch.manual_seed(0)
        model = Mixed()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        pruner = csprune.Pruner(model, CSP(), Cubic(0.7, 0, 60, 10), optimizer=opt, stats_steps=3)
        return model, opt, pruner

    model, opt, pruner = make()
    _train(model, pruner, opt, 35, seed=0)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()})
    _train(model, pruner, opt, 40, seed=1)

    model2, opt2, pruner2 = make()
    pruner2.load_state_dict(saved["pruner"])
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(model2, pruner2, opt2, 40, seed=1)

    m1, m2 = pruner.masks(), pruner2.masks()
    assert m1.keys() == m2.keys()
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n


def test_finalize_leaves_no_trace():
    torch.manual_seed(0)
    model = Mixed()
    clean_keys = list(Mixed().state_dict().keys())
    pruner = csprune.Pruner(model, CSP(), OneShot(0.5))
    model(torch.randn(2, 4, 7))
    pruner.step()
    out = pruner.finalize()
    assert out is model
    assert list(model.state_dict().keys()) == clean_keys
    for name, module in model.named_modules():
        assert not parametrize.is_parametrized(module), name
        assert not module._forward_pre_hooks and not module._forward_hooks, name
        assert type(module).__name__ in {"Mixed", "Conv1d", "LSTM", "Linear"}
    assert all(not n.endswith("mask") for n, _ in model.named_buffers())
    assert (model.head.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    model(torch.randn(2, 4, 7))  # still runs (LSTM flat weights refreshed)
    # The finalized LSTM computes with the zeroed weights.
    fresh = Mixed()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 7)
    assert torch.allclose(fresh(x), model(x))


def test_conformer_and_deepcopy(caplog):
    from torchaudio.models import Conformer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = Conformer(input_dim=16, num_heads=2, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=3)
            self.out = nn.Linear(16, 5)

        def forward(self, x, lens):
            y, _ = self.enc(x, lens)
            return self.out(y)

    torch.manual_seed(0)
    net = copy.deepcopy(Net())
    lens = torch.tensor([12, 9])
    calib = [(torch.randn(2, 12, 16), lens) for _ in range(3)]
    pruner = csprune.Pruner(net, CSP(), OneShot(0.5), targets=["enc.*"])
    kinds = {t.kind for t in pruner.targets}
    assert {"linear", "conv", "mha_in"} <= kinds
    pruner.stats.enabled = True
    with torch.no_grad():
        for b in calib:
            net(*b)
    mha = [t for t in pruner.targets if t.kind == "mha_in"][0]
    assert pruner.stats.observed(mha)  # keyword-called attention observed through its kwargs
    out_proj = [t for t in pruner.targets if t.fqn.endswith("out_proj.weight")]
    assert out_proj and all(pruner.stats.observed(t) for t in out_proj)  # recomputed on the attention
    with caplog.at_level(logging.WARNING, logger="csprune"):
        report = pruner.prune_to(0.5)
    assert "not observed" not in caplog.text  # every target's inputs seen: no magnitude fallback
    assert {r["sensing"] for r in report["tensors"].values()} == {"activations"}
    copy.deepcopy(net)  # a parametrized model still deep-copies
    pruner.finalize()
    sp = [(t.weight == 0).float().mean().item() for t in pruner.targets]
    assert all(abs(s - 0.5) < 0.02 for s in sp)
    net(*calib[0])


# ------------------------------------------------------------------ bad input
def test_bad_sparsity():
    for bad in (1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="sparsity"):
            csprune.prune_once(Mixed(), Magnitude(), sparsity=bad)


def test_glob_matching_nothing_names_it():
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"'decoder\.\*'"):
        csprune.Pruner(model, Magnitude(), OneShot(0.5), targets=["decoder.*"])
    with pytest.raises(ValueError, match="exclude"):
        csprune.Pruner(model, Magnitude(), OneShot(0.5), exclude=["nothing.here"])
    assert list(model.state_dict()) == list(before)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_no_prunable_tensor():
    with pytest.raises(ValueError, match="no prunable tensor"):
        csprune.Pruner(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), Magnitude(), OneShot(0.5))


def test_nan_weight_named_and_nothing_modified():
    model = Mixed()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    conv_before = model.conv.weight.detach().clone()
    pruner = csprune.Pruner(model, Magnitude(), OneShot(0.5))
    with pytest.raises(FloatingPointError, match="head.weight"):
        pruner.step()
    assert torch.equal(model.conv.weight, conv_before)  # conv is pruned before head: unchanged
    assert pruner.masks()["conv.weight"].all()


def test_nan_statistics_named():
    model = Mixed()
    pruner = csprune.Pruner(model, Wanda(), OneShot(0.5))
    x = torch.randn(2, 4, 7)
    x[0, 0, 0] = float("inf")
    model(x)
    with pytest.raises(FloatingPointError, match="conv.weight"):
        pruner.step()
    assert all(m.all() for m in pruner.masks().values())


def test_prune_once_needs_calib_for_data_methods():
    model = Mixed()
    with pytest.raises(ValueError, match="calib"):
        csprune.prune_once(model, CSP(), sparsity=0.5)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_bad_scope_and_pattern():
    with pytest.raises(ValueError, match="scope"):
        csprune.Pruner(Mixed(), Magnitude(), OneShot(0.5), scope="tensor")
    with pytest.raises(ValueError, match="pattern"):
        csprune.Pruner(Mixed(), Magnitude(), OneShot(0.5), pattern="4:2")
    with pytest.raises(ValueError, match="divisible"):
        csprune.Pruner(Mixed(), Magnitude(), OneShot(0.5), pattern="2:4")  # conv rows are 12 wide; LSTM 6


def test_embedding_only_when_asked():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    default = csprune.Pruner(copy.deepcopy(model), Magnitude(), OneShot(0.5))
    assert [t.fqn for t in default.targets] == ["1.weight"]
    asked = csprune.Pruner(copy.deepcopy(model), Magnitude(), OneShot(0.5), targets=[nn.Embedding])
    assert [t.fqn for t in asked.targets] == ["0.weight"]
