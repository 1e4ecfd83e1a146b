"""The recipes' inference modes with csprune.deploy: streaming RNN-T transcription equals the full-utterance greedy
decode on AN4 test files (dense and deployed), and deploy=sparse changes no transcript, bitstream or sample."""

from __future__ import annotations

import pytest
import soundfile as sf
import torch

import csprune
from csprune import deploy as dep
from csprune.errors import ConfigError
from tests.conftest import cfg_for


@pytest.fixture(scope="module")
def rnnt_export(an4_root, tmp_path_factory):
    """A smoke LSTM transducer pruned to 90% by the recipe (its export's path)."""
    from recipes.asr import run as asr_run

    out = tmp_path_factory.mktemp("rnnt90")
    asr_run.run(cfg_for("trainer=smoke", "model=lstm_rnnt", "+prune=magnitude", "prune.sparsity=0.9", f"output_dir={out}",
                        f"data.root={an4_root}", f"data.cache_dir={out / 'cache'}", "trainer.threads=1"))
    return out / "model.safetensors"


def _load(path, model_device="cpu"):
    from recipes.asr.features import FbankConfig, GlobalCMVN
    from recipes.asr.run import make_model
    from recipes.asr.text import CharVocab

    meta = csprune.read_sparse_meta(path)
    vocab = CharVocab.from_dict(meta["vocab"])
    with torch.device(model_device):
        model = make_model(meta["model"], vocab)
    return model.eval(), vocab, FbankConfig(**meta["fbank"]), GlobalCMVN.from_dict(meta["cmvn"])


def _stream(model, feats, chunk):
    from recipes.asr.streaming import StreamingGreedyRNNT

    stream = StreamingGreedyRNNT(model)
    partials = []
    for piece in feats.split(chunk):
        stream.push(piece)
        partials.append(list(stream.tokens))
    final = stream.finish()
    assert all(a == final[: len(a)] for a in partials), "a partial hypothesis is not a prefix of the final one"
    return final


def test_streaming_equals_full_utterance_on_an4_test(rnnt_export, an4_root, single_thread):
    """All 130 AN4 test utterances: full-utterance greedy == streaming (chunks of 1 and 7 frames), dense and deployed."""
    from csprune.train.an4 import read_audio
    from recipes.asr.data import read_an4_split
    from recipes.asr.features import compute_fbank

    dense, vocab, fbank, cmvn = _load(rnnt_export)
    csprune.load_sparse(rnnt_export, model=dense)
    utts = read_an4_split(an4_root, "test")
    feats = [cmvn(compute_fbank(read_audio(u.audio_path, fbank.sample_rate), fbank)) for u in utts]
    deployed, *_ = _load(rnnt_export, "meta")
    report = dep.load(rnnt_export, deployed, lambda m: _stream(m, feats[0], 4), forms=("csr",), budget_s=1e-4)
    assert report.forms()["csr"] == len(report.decisions) >= 8  # every matrix really runs sparse
    emitted = 0
    for u, f in zip(utts, feats):
        full = dense.greedy_decode(f.unsqueeze(0), torch.tensor([f.shape[0]]))[0]
        assert _stream(dense, f, 1) == full, u.utt_id
        assert _stream(deployed, f, 7) == full, u.utt_id
        emitted += len(full)
    assert len(utts) == 130 and emitted > 130  # the predictor really ran (tokens were emitted)


def test_transcribe_cli_deploy_and_streaming(rnnt_export, an4_root, capsys):
    from recipes.asr import run as asr_run

    wav = sorted((an4_root / "wav").rglob("an4test_clstk/*/*.wav"))[0]
    base = [f"ckpt={rnnt_export}", f"input={wav}", "mode=transcribe"]
    plain = asr_run.run(cfg_for(*base))["transcript"]
    capsys.readouterr()
    streamed = asr_run.run(cfg_for(*base, "deploy=sparse", "streaming=true", "model=lstm_rnnt"))["transcript"]
    err = capsys.readouterr().err
    assert streamed == plain
    assert "deploy=sparse:" in err and "transcriber.lstms.0.ih.0" in err  # every decision is printed
    if plain:
        assert "partial: " in err


def test_inference_options_are_checked(rnnt_export, an4_root, tmp_path):
    from recipes.asr import run as asr_run

    wav = sorted((an4_root / "wav").rglob("an4test_clstk/*/*.wav"))[0]
    with pytest.raises(ConfigError, match="deploy='fast'"):
        asr_run.run(cfg_for(f"ckpt={rnnt_export}", f"input={wav}", "mode=transcribe", "deploy=fast"))
    conformer = tmp_path / "c"
    asr_run.run(cfg_for("trainer=smoke", "+prune=magnitude", "prune.sparsity=0.9", f"output_dir={conformer}",
                        f"data.root={an4_root}", f"data.cache_dir={tmp_path / 'cache'}", "trainer.threads=1"))
    with pytest.raises(ConfigError, match="streaming=true needs an lstm_rnnt export"):
        asr_run.run(cfg_for(f"ckpt={conformer / 'model.safetensors'}", f"input={wav}", "mode=transcribe", "streaming=true"))
    # the Conformer-CTC transcribes the same deployed (attention, convolutions, Linear layers all deployable)
    args = [f"ckpt={conformer / 'model.safetensors'}", f"input={wav}", "mode=transcribe"]
    assert asr_run.run(cfg_for(*args, "deploy=sparse"))["transcript"] == asr_run.run(cfg_for(*args))["transcript"]


def test_codec_encode_decode_deployed(an4_root, tmp_path):
    """deploy=sparse writes the same .cmrl bytes and decodes the same samples (to float32 summation order)."""
    from recipes.codec import run as codec_run

    out = tmp_path / "codec"
    codec_run.run(cfg_for("trainer=smoke", "+prune=magnitude", "prune.sparsity=0.9", f"output_dir={out}",
                          f"data.root={an4_root}", recipe="codec"))
    wav = sorted((an4_root / "wav").rglob("an4test_clstk/*/*.wav"))[0]
    ckpt = out / "model.safetensors"
    files = {}
    for mode in ("dense", "sparse"):
        cmrl, decoded = tmp_path / f"{mode}.cmrl", tmp_path / f"{mode}.wav"
        codec_run.run(cfg_for(f"ckpt={ckpt}", f"input={wav}", f"output={cmrl}", "mode=encode", f"deploy={mode}", recipe="codec"))
        codec_run.run(cfg_for(f"ckpt={ckpt}", f"input={cmrl}", f"output={decoded}", "mode=decode", f"deploy={mode}", recipe="codec"))
        files[mode] = (cmrl.read_bytes(), torch.from_numpy(sf.read(decoded, dtype="float32")[0]))
    assert files["dense"][0] == files["sparse"][0]
    ref, out_wave = files["dense"][1], files["sparse"][1]
    assert (ref - out_wave).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6
    codec = codec_run.load_codec(str(ckpt), "sparse", lambda c: c.encode(torch.zeros(16000)))
    assert any(isinstance(m, dep.SparseMatrix) for m in codec.model.modules())
