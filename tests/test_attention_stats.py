"""MultiheadAttention ``out_proj``: its true input is observed, and CSP refits on it (issue #12, defect 2).

``nn.MultiheadAttention`` passes ``out_proj.weight`` to the attention function instead of calling
``out_proj``, so a hook on the Linear never fires. The reference here is computed independently of
the library: torch's own attention with ``out_proj`` replaced by identity weights and zero bias,
whose outputs are then the concatenated heads X, and G = XᵀX / count (the library's normalisation).
"""

import copy
import logging

import pytest
import torch
from torch import nn

import csprune
from csprune.methods import CSP
from csprune.schedules import OneShot

E, HEADS, T, B = 16, 4, 11, 3  # small enough that no call is subsampled (max_positions=4096)


class AttnNet(nn.Module):
    """Linear front end, one attention (self- or cross-), called with keyword arguments."""

    def __init__(self, batch_first: bool, cross: bool = False, dropout: float = 0.0):
        super().__init__()
        self.front = nn.Linear(8, E)
        kdim = 6 if cross else None  # cross-attention: separate q/k/v projections
        self.att = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=dropout)
        self.batch_first = batch_first
        self.cross = cross

    def attention_inputs(self, x: torch.Tensor, memory: torch.Tensor | None):
        """Query/key/value in the attention's layout.

        Args:
            x: [B, T, 8].
            memory: [B, S, 6] (cross-attention) or None.
        """
        q = torch.tanh(self.front(x))
        kv = memory if self.cross else q
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        return q, kv

    def forward(self, x, memory=None, key_padding_mask=None, attn_mask=None):
        q, kv = self.attention_inputs(x, memory)
        y, _ = self.att(query=q, key=kv, value=kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                        need_weights=False)
        return y


def _reference_gram(net: AttnNet, batches: list[dict]) -> torch.Tensor:
    """XᵀX / count over the attention's outputs with an identity out_proj (torch computes X).

    Returns:
        [E, E] float64.
    """
    ident = copy.deepcopy(net)
    with torch.no_grad():
        ident.att.out_proj.weight.copy_(torch.eye(E))
        ident.att.out_proj.bias.zero_()
        xs = [ident(**b).reshape(-1, E).double() for b in batches]
    x = torch.cat(xs)
    return x.T @ x / x.shape[0]


def _batches(cross: bool, padding: bool, causal: bool, n: int = 3) -> list[dict]:
    out = []
    for i in range(n):
        b = {"x": torch.randn(B, T, 8)}
        s = T + 2 if cross else T
        if cross:
            b["memory"] = torch.randn(B, s, 6)
        if padding:
            lens = torch.tensor([s, s - 3 - i, s - 5])
            b["key_padding_mask"] = torch.arange(s).unsqueeze(0) >= lens.unsqueeze(1)  # True = padded key
        if causal:
            b["attn_mask"] = torch.ones(T, s, dtype=torch.bool).triu(1)  # True = may not attend
        out.append(b)
    return out


def _out_proj_target(pruner):
    (t,) = [t for t in pruner.targets if t.fqn == "att.out_proj.weight"]
    return t


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padding", [False, True])
def test_out_proj_gram_is_the_gram_of_the_concatenated_heads(batch_first, padding):
    torch.manual_seed(0)
    net = AttnNet(batch_first).eval()
    batches = _batches(cross=False, padding=padding, causal=False)
    expected = _reference_gram(net, batches)
    pruner = csprune.Pruner(net, CSP(), OneShot(0.5), targets=["att.out_proj"])
    target = _out_proj_target(pruner)
    pruner.stats.enabled = True
    with torch.no_grad():
        for b in batches:
            net(**b)
    got = pruner.stats.gram(target)
    assert got is not None, "out_proj input not observed"
    assert got.shape == (1, E, E)
    assert pruner.stats._acc[target.fqn].count.item() == len(batches) * B * T  # every query position
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_out_proj_gram_cross_attention_with_both_masks_in_train_mode(batch_first):
    """Separate q/k/v projections (kdim != embed_dim), key_padding_mask and attn_mask together, grad on."""
    torch.manual_seed(1)
    net = AttnNet(batch_first, cross=True).train()
    batches = _batches(cross=True, padding=True, causal=True)
    expected = _reference_gram(net, batches)
    pruner = csprune.Pruner(net, CSP(), OneShot(0.5), targets=["att.*"])
    assert {t.param_name for t in pruner.targets} == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "weight"}
    pruner.stats.enabled = True
    for b in batches:
        net(**b).sum().backward()  # the recompute inside the hook must not join the graph
    got = pruner.stats.gram(_out_proj_target(pruner))
    assert got is not None, "out_proj input not observed"
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-4, atol=1e-6)


def test_train_mode_attention_dropout_is_left_out():
    """With attention dropout in train mode, out_proj sees the dropout-free heads (the eval-mode input)."""
    torch.manual_seed(2)
    net = AttnNet(batch_first=True, dropout=0.5).train()
    batches = _batches(cross=False, padding=True, causal=False)
    expected = _reference_gram(copy.deepcopy(net).eval(), batches)
    pruner = csprune.Pruner(net, CSP(), OneShot(0.5), targets=["att.out_proj"])
    pruner.stats.enabled = True
    with torch.no_grad():
        for b in batches:
            net(**b)
    got = pruner.stats.gram(_out_proj_target(pruner))
    assert got is not None, "out_proj input not observed"
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_csp_out_proj_values_beat_zeroing_the_layer(batch_first, sparsity, caplog):
    """Relative output error ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² of out_proj on held-out inputs is below 1 (zeroing)."""
    torch.manual_seed(3)
    net = AttnNet(batch_first).eval()
    calib = _batches(cross=False, padding=True, causal=False, n=6)
    held_out = _batches(cross=False, padding=True, causal=False, n=2)
    ident = copy.deepcopy(net)
    with torch.no_grad():
        ident.att.out_proj.weight.copy_(torch.eye(E))
        ident.att.out_proj.bias.zero_()
        x = torch.cat([ident(**b).reshape(-1, E) for b in held_out])  # [N, E] concatenated heads
    w = net.att.out_proj.weight.detach().clone()
    pruner = csprune.Pruner(net, CSP(), OneShot(sparsity), targets=["att.*"])
    pruner.stats.enabled = True
    with torch.no_grad():
        for b in calib:
            net(**b)
    with caplog.at_level(logging.WARNING, logger="csprune"):
        report = pruner.prune_to(sparsity)
    pruner.finalize()
    w_hat = net.att.out_proj.weight.detach()
    assert (w_hat == 0).sum().item() == round(sparsity * w.numel())
    err = ((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    # Zeroing the layer gives 1.0; measured here 0.006 / 0.04 / 0.32 at 0.5 / 0.7 / 0.9 (before the fix:
    # 5.9 / 0.99 / 1.3, refit on a Gaussian Gram).
    assert err < 0.5, f"out_proj relative output error {err:.3f} (zeroing the layer: 1.0)"
    assert report["tensors"]["att.out_proj.weight"]["sensing"] == "activations"
    assert "not observed" not in caplog.text


def test_conformer_out_proj_observed_exactly():
    """torchaudio's Conformer (the ASR recipe's encoder) calls its attention with keyword arguments and a
    key_padding_mask, sequence-first; each layer's out_proj statistics equal the independent reference."""
    from torchaudio.models import Conformer

    torch.manual_seed(4)
    enc = Conformer(input_dim=E, num_heads=HEADS, ffn_dim=32, num_layers=2, depthwise_conv_kernel_size=3).eval()
    calib = [(torch.randn(2, 12, E), torch.tensor([12, 8])) for _ in range(3)]
    # Reference: record every attention call of the dense model, replay it through a copy with identity out_proj.
    calls: dict[str, list] = {}
    handles = [m.register_forward_hook(lambda mod, a, kw, out, name=name: calls.setdefault(name, []).append((a, kw)),
                                       with_kwargs=True)
               for name, m in enc.named_modules() if isinstance(m, nn.MultiheadAttention)]
    with torch.no_grad():
        for b in calib:
            enc(*b)
    for h in handles:
        h.remove()
    expected = {}
    for name, recorded in calls.items():
        ident = copy.deepcopy(enc.get_submodule(name))
        with torch.no_grad():
            ident.out_proj.weight.copy_(torch.eye(E))
            ident.out_proj.bias.zero_()
            x = torch.cat([ident(*a, **kw)[0].reshape(-1, E).double() for a, kw in recorded])
        expected[f"{name}.out_proj.weight"] = x.T @ x / x.shape[0]
    assert len(expected) == 2

    pruner = csprune.Pruner(enc, CSP(), OneShot(0.5))
    outs = [t for t in pruner.targets if t.fqn.endswith("out_proj.weight")]
    assert sorted(t.fqn for t in outs) == sorted(expected)
    pruner.stats.enabled = True
    with torch.no_grad():
        for b in calib:
            enc(*b)
    for t in outs:
        got = pruner.stats.gram(t)
        assert got is not None, f"{t.fqn}: input not observed"
        torch.testing.assert_close(got[0].double(), expected[t.fqn], rtol=1e-4, atol=1e-6)
