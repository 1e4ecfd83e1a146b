"""Tests of the AN4 recipe's models (tiny sizes, synthetic features)."""

import copy

import pytest
import torch
import torchaudio
from torch import nn

from recipes.asr.models import MODELS, ConformerCTC, LSTMRNNT, build_model, count_parameters

VOCAB = 29
TINY = {
    "conformer_ctc": dict(input_dim=20, d_model=32, num_heads=2, ffn_dim=64, num_layers=2, depthwise_conv_kernel_size=5, dropout=0.0),
    "lstm_rnnt": dict(input_dim=20, encoder_hidden_dim=32, encoder_layers=2, embedding_dim=16, predictor_hidden_dim=32, joint_dim=32, dropout=0.0),
}
TARGET_TYPES = {"conformer_ctc": (nn.Linear, nn.Conv1d, nn.MultiheadAttention), "lstm_rnnt": (nn.Linear, nn.LSTM)}


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 64, 20, generator=generator)
    feat_lens = torch.tensor([64, 50, 37])
    tokens = torch.randint(1, VOCAB, (3, 6), generator=generator)
    token_lens = torch.tensor([6, 4, 3])
    tokens[1, 4:] = 0
    tokens[2, 3:] = 0
    return feats, feat_lens, tokens, token_lens


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, VOCAB, **TINY[name])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_loss_and_decode(name):
    model = _tiny(name)
    feats, feat_lens, tokens, token_lens = _batch()
    outputs = model(feats, feat_lens, tokens, token_lens)
    if name == "conformer_ctc":
        log_probs, out_lens = outputs
        assert log_probs.shape == (3, 16, VOCAB)
        assert out_lens.tolist() == [16, 13, 10]
        assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, 16), atol=1e-5)
    else:
        logits, out_lens, target_lens, _ = outputs
        assert logits.shape == (3, 16, 7, VOCAB)  # U + 1 predictor steps (start blank)
        assert out_lens.tolist() == [16, 12, 9] and target_lens.tolist() == [7, 5, 4]
    loss = model.loss(feats, feat_lens, tokens, token_lens)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    hyps = model.greedy_decode(feats, feat_lens)
    assert len(hyps) == 3
    assert all(isinstance(t, int) and 1 <= t < VOCAB for hyp in hyps for t in hyp)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_plain_prunable_modules_and_deepcopy(name):
    model = _tiny(name)
    present = {type(m) for m in model.modules()}
    for module_type in TARGET_TYPES[name]:
        assert module_type in present, f"{name} has no {module_type.__name__}"
    model.eval()
    clone = copy.deepcopy(model)
    feats, feat_lens, tokens, token_lens = _batch()
    assert torch.equal(clone.loss(feats, feat_lens, tokens, token_lens), model.loss(feats, feat_lens, tokens, token_lens))
    assert clone.greedy_decode(feats, feat_lens) == model.greedy_decode(feats, feat_lens)
    next(clone.parameters()).data.zero_()
    assert next(model.parameters()).abs().sum() > 0  # independent copy


@pytest.mark.parametrize("name", sorted(MODELS))
def test_overfits_one_tiny_batch(name):
    model = _tiny(name)
    feats, feat_lens, tokens, token_lens = _batch(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.loss(feats, feat_lens, tokens, token_lens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_ctc_greedy_collapses_repeats_and_drops_blanks(monkeypatch):
    model = _tiny("conformer_ctc").eval()
    path = torch.tensor([[3, 3, 0, 3, 5, 5, 0, 0], [0, 7, 7, 7, 0, 2, 2, 2]])
    log_probs = torch.nn.functional.one_hot(path, VOCAB).float().log()
    monkeypatch.setattr(model, "forward", lambda feats, feat_lens, *rest: (log_probs, torch.tensor([8, 6])))
    assert model.greedy_decode(torch.zeros(2, 32, 20), torch.tensor([32, 24])) == [[3, 3, 5], [7, 2]]


def test_rnnt_greedy_respects_max_symbols_per_frame():
    model = build_model("lstm_rnnt", VOCAB, **TINY["lstm_rnnt"], max_symbols_per_frame=2).eval()
    with torch.no_grad():  # joiner that never predicts the blank
        model.joiner.output.weight.zero_()
        model.joiner.output.bias.fill_(-10.0)
        model.joiner.output.bias[4] = 10.0
    feats, feat_lens, _, _ = _batch()
    assert model.greedy_decode(feats, feat_lens) == [[4] * 32, [4] * 24, [4] * 18]  # 2 per encoder step


def test_build_model_errors_and_defaults():
    with pytest.raises(ValueError, match="conformer_ctc"):
        build_model("transformer", VOCAB)
    with pytest.raises(TypeError, match="lstm_rnnt"):
        build_model("lstm_rnnt", VOCAB, num_heads=4)
    assert 2_000_000 < count_parameters(ConformerCTC(VOCAB)) < 3_000_000
    assert 1_500_000 < count_parameters(LSTMRNNT(VOCAB)) < 3_000_000


def _reference_greedy(model: LSTMRNNT, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[list[int]]:
    """Unbatched textbook RNN-T greedy search, one utterance at a time (no padding at all)."""
    hyps = []
    with torch.no_grad():
        for index in range(feats.shape[0]):
            length = int(feat_lens[index])
            enc, enc_lens = model.transcribe(feats[index : index + 1, :length], feat_lens[index : index + 1])
            one = torch.ones(1, dtype=torch.long)
            pred, _, state = model.predict(torch.zeros(1, 1, dtype=torch.long), one, None)
            hyp = []
            for step in range(int(enc_lens[0])):
                for _ in range(model.max_symbols_per_frame):
                    logits, _, _ = model.join(enc[:, step : step + 1], one, pred, one)
                    best = int(logits[0, 0, 0].argmax())
                    if best == 0:
                        break
                    hyp.append(best)
                    pred, _, state = model.predict(torch.tensor([[best]]), one, state)
            hyps.append(hyp)
    return hyps


@pytest.mark.parametrize("seed", [0, 1])
def test_rnnt_batched_greedy_matches_unbatched_reference(seed):
    torch.manual_seed(seed)
    model = build_model("lstm_rnnt", VOCAB, **TINY["lstm_rnnt"], max_symbols_per_frame=3).eval()
    with torch.no_grad():  # sharper, blank-leaning joiner: a mix of blanks and (repeated) emissions
        model.joiner.output.weight.mul_(4.0)
        model.joiner.output.bias[0] += 1.0
    feats, feat_lens, _, _ = _batch(seed)
    hyps = model.greedy_decode(feats, feat_lens)
    assert hyps == _reference_greedy(model, feats, feat_lens)
    assert all(0 < len(h) < 3 * n for h, n in zip(hyps, [16, 12, 9]))  # emissions and blanks on every utterance


def test_rnnt_transcriber_is_causal():
    model = _tiny("lstm_rnnt").eval()
    feats, feat_lens, _, _ = _batch()
    enc, _ = model.transcribe(feats, feat_lens)
    changed = feats.clone()
    changed[:, 40:] = torch.randn_like(changed[:, 40:])  # frames 40.. = encoder steps 10..
    enc_changed, _ = model.transcribe(changed, feat_lens)
    assert torch.allclose(enc[:, :10], enc_changed[:, :10], atol=1e-6)
    assert not torch.allclose(enc[:, 10:], enc_changed[:, 10:])


def test_rnnt_loss_terms_and_padding():
    feats, feat_lens, tokens, token_lens = _batch()
    torch.manual_seed(0)
    plain = build_model("lstm_rnnt", VOCAB, **{**TINY["lstm_rnnt"], "ctc_weight": 0.0}).eval()
    assert plain.ctc_output is None
    logits, out_lens, _, _ = plain(feats, feat_lens, tokens, token_lens)
    expected = torchaudio.functional.rnnt_loss(logits, tokens.int(), out_lens.int(), token_lens.int(), blank=0, reduction="mean")
    assert torch.allclose(plain.loss(feats, feat_lens, tokens, token_lens), expected)
    wide = torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], 1)  # more blank padding than the longest target
    assert torch.allclose(plain.loss(feats, feat_lens, wide, token_lens), expected)
    with_ctc = build_model("lstm_rnnt", VOCAB, **{**TINY["lstm_rnnt"], "ctc_weight": 0.5}).eval()
    with_ctc.load_state_dict(plain.state_dict(), strict=False)
    enc, enc_lens = with_ctc.transcribe(feats, feat_lens)
    log_probs = with_ctc.ctc_output(enc).log_softmax(-1).transpose(0, 1)
    ctc = torch.nn.functional.ctc_loss(log_probs, tokens, enc_lens, token_lens, reduction="sum", zero_infinity=True) / 3
    assert torch.allclose(with_ctc.loss(feats, feat_lens, tokens, token_lens), expected + 0.5 * ctc)
    with pytest.raises(ValueError, match="ctc_weight"):
        build_model("lstm_rnnt", VOCAB, ctc_weight=-1.0)


def test_rnnt_overfit_batch_decodes_its_targets():
    """Loss and decoding agree: a model overfit on a few utterances greedy-decodes their targets."""
    torch.manual_seed(0)
    model = build_model("lstm_rnnt", VOCAB, **TINY["lstm_rnnt"])
    feats, feat_lens, tokens, token_lens = _batch(seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        loss = model.loss(feats, feat_lens, tokens, token_lens)
        loss.backward()
        optimizer.step()
    model.eval()
    targets = [tokens[i, : int(n)].tolist() for i, n in enumerate(token_lens)]
    assert model.greedy_decode(feats, feat_lens) == targets, loss.item()
