"""csprune.deploy: deployed layers equal the dense pruned ones, the form is chosen by measurement (and falls back to
dense, logged), checkpoints load straight into the deployed form, and the recipes' inference modes use it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import csprune
from csprune import deploy as dep
from csprune.errors import CheckpointError, ConfigError


def _prune(module: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    """Zero a random ``sparsity`` of every weight matrix, plus one whole output row of the first (an all-zero row)."""
    gen = torch.Generator().manual_seed(seed)
    first = True
    for name, p in module.named_parameters():
        if "weight" in name and p.dim() >= 2:
            with torch.no_grad():
                p[torch.rand(p.shape, generator=gen) < sparsity] = 0
                if first:
                    p[1] = 0
                    first = False
    return module.eval()


def _close(ref: torch.Tensor, out: torch.Tensor) -> None:
    """float32 summation order is all that may differ: |Δ| <= 1e-5·max|ref| + 1e-6."""
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, f"max error {err}"


class _Cases:
    """One module per supported layer kind, with its input and how to call it."""

    @staticmethod
    def build(kind: str):
        torch.manual_seed(0)
        if kind == "linear":
            return nn.Linear(48, 64), lambda m: m(torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1)))
        if kind == "conv1d_pointwise":
            return nn.Conv1d(24, 40, 1), lambda m: m(torch.randn(2, 24, 30, generator=torch.Generator().manual_seed(1)))
        if kind == "conv1d":
            return (nn.Conv1d(12, 20, 5, stride=2, padding=4, dilation=2),
                    lambda m: m(torch.randn(2, 12, 41, generator=torch.Generator().manual_seed(1))))
        if kind == "lstm":
            return (nn.LSTM(16, 24, num_layers=2, batch_first=True),
                    lambda m: m(torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)))[0])
        if kind == "lstm_bidirectional":
            return (nn.LSTM(16, 12, bidirectional=True),
                    lambda m: m(torch.randn(9, 2, 16, generator=torch.Generator().manual_seed(1)))[0])
        if kind == "attention":
            x = torch.randn(11, 2, 32, generator=torch.Generator().manual_seed(1))
            pad = torch.zeros(2, 11, dtype=torch.bool)
            pad[1, -4:] = True
            return nn.MultiheadAttention(32, 4), lambda m: m(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        if kind == "attention_cross":
            q = torch.randn(5, 2, 32, generator=torch.Generator().manual_seed(1))
            kv = torch.randn(8, 2, 32, generator=torch.Generator().manual_seed(2))
            return nn.MultiheadAttention(32, 4), lambda m: m(q, kv, kv, need_weights=False)[0]
        raise KeyError(kind)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


KINDS = ["linear", "conv1d_pointwise", "conv1d", "lstm", "lstm_bidirectional", "attention", "attention_cross"]


@pytest.mark.parametrize("form", ["dense", "csr"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("kind", KINDS)
def test_deployed_layer_equals_dense_pruned(kind, sparsity, form, single_thread):
    layer, call = _Cases.build(kind)
    holder = _Holder(_prune(layer, sparsity))
    with torch.no_grad():
        ref = call(holder.layer)
    report = dep.deploy(holder, lambda m: call(m.layer), forms=(form,), min_sparsity=0.0, budget_s=1e-4)
    assert not isinstance(holder.layer, type(layer)), "the layer was not replaced"
    matrices = [m for m in holder.modules() if isinstance(m, dep.SparseMatrix)]
    assert matrices and all(m.form == form for m in matrices)
    if form == "csr":
        assert all(m.weight.layout == torch.sparse_csr and m.weight.col_indices().dtype == torch.int32 for m in matrices)
    assert {d.form for d in report.decisions} == {form}
    with torch.no_grad():
        _close(ref, call(holder.layer))


@pytest.mark.parametrize("form", ["dense", "csr"])
def test_lstm_step_equals_sequence(form, single_thread):
    """Streaming: T single steps give the whole-sequence outputs (and the fused dense cell equals the gate ops)."""
    lstm = _prune(nn.LSTM(16, 24, num_layers=3, batch_first=True), 0.9)
    x = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = lstm(x)
    stepper = dep.as_deployed_lstm(copy.deepcopy(lstm))
    for m in [*stepper.ih, *stepper.hh]:
        m.to_form(form)
    state, outs = None, []
    with torch.no_grad():
        for t in range(x.shape[1]):
            h, state = stepper.step(x[:, t], state)
            outs.append(h)
    _close(ref, torch.stack(outs, dim=1))


def test_bidirectional_lstm_cannot_step():
    stepper = dep.as_deployed_lstm(nn.LSTM(4, 4, bidirectional=True))
    with pytest.raises(ConfigError, match="bidirectional"):
        stepper.step(torch.zeros(1, 4))


def test_sparse_forward_is_csr_and_reads_fewer_bytes(single_thread):
    layer = _prune(nn.Linear(256, 512), 0.9)
    matrix = dep.SparseMatrix(layer.weight.detach(), layer.bias.detach(), "dense")
    dense_bytes = matrix.weight_bytes()
    matrix.to_form("csr")
    # 8 bytes (fp32 value + int32 column) per non-zero, 4 per row pointer, against 4 per dense entry:
    nnz = int(layer.weight.count_nonzero())
    assert matrix.weight_bytes() == nnz * 8 + (512 + 1) * 4 + 512 * 4
    assert dense_bytes == 512 * 256 * 4 + 512 * 4
    assert dense_bytes / matrix.weight_bytes() > 4.0  # ≈ 1 / (0.1·2) at 90%


def _fake_timings(monkeypatch, table: dict[str, float]):
    """Make every timed form take the µs in ``table`` (the decision logic, without the machine's noise)."""
    def fake(fn, budget_s):
        frame = fn.__closure__  # the lambda closes over the matrix being timed
        matrix = next(c.cell_contents for c in frame if isinstance(c.cell_contents, dep.SparseMatrix))
        return table[matrix.form]
    monkeypatch.setattr(dep, "_median_micros", fake)


@pytest.mark.parametrize("dense_us,csr_us,expected", [(10.0, 30.0, "dense"), (10.0, 9.8, "dense"), (10.0, 5.0, "csr")])
def test_choice_falls_back_to_dense_and_is_logged(monkeypatch, caplog, dense_us, csr_us, expected):
    """Sparse slower (or within the 5% noise margin) -> dense; clearly faster -> csr; each decision logged per layer."""
    _fake_timings(monkeypatch, {"dense": dense_us, "csr": csr_us})
    model = nn.Sequential(_prune(nn.Linear(32, 32), 0.9), nn.ReLU(), _prune(nn.Linear(32, 8), 0.9))
    with caplog.at_level(logging.INFO, logger="csprune.deploy"):
        report = dep.deploy(model, lambda m: m(torch.randn(1, 32)))
    assert [d.form for d in report.decisions] == [expected, expected]
    assert [d.name for d in report.decisions] == ["0.matrix", "2.matrix"]
    logged = [r.getMessage() for r in caplog.records if r.name == "csprune.deploy"]
    assert len(logged) == 2 and all(f"-> {expected}" in line for line in logged)
    assert "0.matrix" in logged[0] and f"dense {dense_us:.1f} µs" in logged[0] and f"csr {csr_us:.1f} µs" in logged[0]


def test_real_timing_falls_back_to_dense_at_half_sparsity(caplog, single_thread):
    """At 50% a CSR product reads as many bytes as dense and does irregular work: torch's kernel loses by a wide
    margin (measured 3× here), so the measured choice is dense, and the log says so."""
    model = nn.Sequential(_prune(nn.Linear(512, 512), 0.5))
    with caplog.at_level(logging.INFO, logger="csprune.deploy"):
        report = dep.deploy(model, lambda m: m(torch.randn(1, 512)))
    assert report.decisions[0].form == "dense"
    assert report.decisions[0].micros["csr"] > report.decisions[0].micros["dense"]
    assert any("-> dense" in r.getMessage() for r in caplog.records)


def test_low_sparsity_layers_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8), _prune(nn.Linear(8, 8), 0.9))
    report = dep.deploy(model, None, forms=("csr",), budget_s=1e-4)
    assert isinstance(model[0], nn.Linear) and "0" in report.skipped
    assert isinstance(model[1], dep.DeployedLinear)


def test_attention_out_proj_is_never_deployed_alone():
    """nn.MultiheadAttention reads out_proj.weight itself: a dense MHA keeps its out_proj even if that is sparse."""
    mha = nn.MultiheadAttention(16, 2)
    with torch.no_grad():
        mha.out_proj.weight[torch.rand(16, 16) < 0.95] = 0
    model = _Holder(mha)
    dep.deploy(model, None, forms=("csr",), budget_s=1e-4)
    assert isinstance(model.layer, nn.MultiheadAttention) and isinstance(model.layer.out_proj, nn.Linear)


def test_unknown_form_is_refused():
    with pytest.raises(ConfigError, match="'bsr'"):
        dep.deploy(nn.Linear(2, 2), None, forms=("bsr",))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(20, 32)
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h, _ = self.lstm(self.inp(x))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(self.norm(h))


@pytest.mark.parametrize("values_dtype", [None, "int8"])
def test_load_straight_into_deployed_form(tmp_path, values_dtype, single_thread):
    """The checkpoint's positions and values become CSR matrices in a meta-built model (no dense weight ever
    exists), and outputs equal the dense pruned model loaded by load_sparse (int8: the same dequantized values)."""
    torch.manual_seed(0)
    net = _Net().eval()
    csprune.prune_once(net, csprune.methods.Magnitude(), sparsity=0.9, exclude=["*.bias"])
    path = tmp_path / "net.safetensors"
    csprune.save_sparse(net, path, values_dtype=values_dtype)
    dense = _Net().eval()
    csprune.load_sparse(path, model=dense)
    x = torch.randn(2, 6, 20)
    with torch.no_grad():
        ref = dense(x)
    with torch.device("meta"):
        deployed = _Net()
    deployed.eval()
    report = dep.load(path, deployed, lambda m: m(x), forms=("csr",), budget_s=1e-4)
    assert len(report.decisions) == 5  # inp, lstm ih + hh, conv, out
    assert not any(t.is_meta for t in deployed.state_dict().values())  # everything left in the module tree is loaded
    for m in deployed.modules():
        if isinstance(m, dep.SparseMatrix):
            assert m.weight.layout == torch.sparse_csr and not m.weight.is_meta
    with torch.no_grad():
        _close(ref, deployed(x))


def test_load_refuses_another_model(tmp_path):
    net = _prune(_Net(), 0.9)
    path = tmp_path / "net.safetensors"
    csprune.save_sparse(net, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        dep.load(path, nn.Sequential(nn.Linear(20, 32)))


def test_load_sparse_parts_match_load_sparse(tmp_path):
    net = _prune(_Net(), 0.9)
    path = tmp_path / "net.safetensors"
    csprune.save_sparse(net, path)
    dense = csprune.load_sparse(path)
    parts = csprune.export.load_sparse_parts(path, verify="full")
    assert dense.keys() == parts.keys()
    sparse_stored = [k for k, v in parts.items() if isinstance(v, csprune.export.SparseParts)]
    assert "lstm.weight_ih_l0" in sparse_stored
    for k, v in parts.items():
        assert torch.equal(v.to_dense() if isinstance(v, csprune.export.SparseParts) else v, dense[k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need a CUDA GPU (run on a lent one)")
def test_semi_structured_2_4_on_gpu():
    layer = nn.Linear(256, 256).half().cuda().eval()
    csprune.prune_once(layer, csprune.methods.Magnitude(), sparsity=0.5, pattern="2:4")
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    ref = layer(x)
    holder = _Holder(layer)
    report = dep.deploy(holder, lambda m: m.layer(x), forms=("semi_structured",), min_sparsity=0.0)
    assert report.decisions[0].form == "semi_structured"
    out = holder.layer(x)
    assert (out - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def test_build_for_load_uses_meta_only_for_large_models(tmp_path, monkeypatch):
    """The meta device costs a fixed ~160 MB of imports: small models are built on the CPU, large ones on meta."""
    net = _prune(_Net(), 0.9)
    path = tmp_path / "net.safetensors"
    csprune.save_sparse(net, path)
    assert not any(p.is_meta for p in dep.build_for_load(path, _Net).parameters())
    monkeypatch.setattr(dep, "META_BUILD_MIN_BYTES", 1)
    model = dep.build_for_load(path, _Net)
    assert all(p.is_meta for p in model.parameters())
    dep.load(path, model.eval(), None, forms=("csr",), budget_s=1e-4)
    assert not any(t.is_meta for t in model.state_dict().values())
