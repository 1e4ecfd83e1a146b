"""The codec recipe end to end: smoke training, real bitstreams, pruning, TensorBoard, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from csprune.train.an4 import read_an4_split, read_audio
from recipes.codec import run as codec_run  # registers the structured configs
from recipes.codec.bitstream import BitstreamError, read_cmrl_header
from recipes.codec.data import frame_signal, overlap_add, synthesis_window
from recipes.codec.loss import CodecLoss, LossConfig
from recipes.codec.model import CMRL, ModuleConfig, SoftToHardQuantizer, count_parameters

from conftest import REPO, cfg_for


@pytest.fixture(scope="module")
def codec_smoke(an4_root, tmp_path_factory):
    """A `trainer=smoke` dense run then a `+prune=csp` run from its dense.pt: (dense dir, pruned dir, metrics)."""
    dense_dir = tmp_path_factory.mktemp("codec_dense")
    dense = codec_run.run(cfg_for("trainer=smoke", f"output_dir={dense_dir}", f"data.root={an4_root}", recipe="codec"))
    pruned_dir = tmp_path_factory.mktemp("codec_csp")
    pruned = codec_run.run(cfg_for("trainer=smoke", "+prune=csp", "prune.sparsity=0.5", f"init_from={dense_dir / 'dense.pt'}",
                                   f"output_dir={pruned_dir}", f"data.root={an4_root}", recipe="codec"))
    return dense_dir, pruned_dir, dense, pruned


def test_smoke_runs_end_to_end(codec_smoke):
    dense_dir, pruned_dir, dense, pruned = codec_smoke
    for key in ("pesq", "snr", "segsnr", "stoi", "bitrate_entropy", "bitrate_real", "checkpoint_bytes"):
        assert isinstance(dense[key], float | int) and math.isfinite(dense[key]), key
    # The file holds the entropy-coded codes plus a ~43-byte header per utterance: its rate is at least
    # roughly the entropy estimate (a coder cannot beat the empirical entropy by more than the model mismatch).
    assert dense["bitrate_real"] > 0.9 * dense["bitrate_entropy"]
    on_disk = json.loads((pruned_dir / "metrics.json").read_text())
    assert on_disk["method"] == "csp" and on_disk["primary_metric"] == "pesq"
    assert on_disk["dense_pesq"] == dense["pesq"]  # the pruned run starts from the dense run's model
    assert abs(pruned["sparsity_actual"] - 0.5) < 0.01  # fraction of zeros over the targeted convs
    assert (pruned_dir / "model.safetensors").stat().st_size == pruned["checkpoint_bytes"]
    # What a deployer ships: the same pruned model with int8 values, smaller, evaluated through real files too.
    assert (pruned_dir / "model_int8.safetensors").stat().st_size == pruned["checkpoint_int8_bytes"] < pruned["checkpoint_bytes"]
    assert math.isfinite(pruned["int8_pesq"]) and pruned["int8_bitrate_real"] > 0
    int8 = codec_run.load_codec(str(pruned_dir / "model_int8.safetensors"))
    weight = next(t for n, t in int8.model.state_dict().items() if n.endswith("stage1.0.squeeze.weight"))
    scales = weight.reshape(weight.shape[0], -1).abs().amax(1, keepdim=True) / 127
    assert torch.allclose(weight.reshape(weight.shape[0], -1) / scales.clamp_min(1e-12),
                          (weight.reshape(weight.shape[0], -1) / scales.clamp_min(1e-12)).round(), atol=1e-3)  # 255 levels a row


def test_encode_decode_a_real_file_matches_the_in_memory_reconstruction(codec_smoke, an4_root, tmp_path):
    _, pruned_dir, _, _ = codec_smoke
    ckpt = pruned_dir / "model.safetensors"
    wav = read_an4_split(an4_root, "test")[0].audio_path
    bits, out_wav = tmp_path / "x.cmrl", tmp_path / "x.wav"
    enc = codec_run.run(cfg_for("mode=encode", f"ckpt={ckpt}", f"input={wav}", f"output={bits}", recipe="codec"))
    codec_run.run(cfg_for("mode=decode", f"ckpt={ckpt}", f"input={bits}", f"output={out_wav}", recipe="codec"))
    decoded, rate = sf.read(out_wav, dtype="float32")
    reference = read_audio(wav)
    assert rate == 16000 and decoded.shape == (reference.numel(),)
    codec = codec_run.load_codec(str(ckpt))
    in_memory = codec.decode(codec.encode(reference))
    assert np.array_equal(decoded, in_memory.numpy())  # bit-exact: the file carries exactly the hard codes
    assert enc["bytes"] == bits.stat().st_size
    header = read_cmrl_header(bits)
    assert header["num_samples"] == reference.numel() and header["num_modules"] == 2


def test_other_sample_rates_are_resampled(codec_smoke, an4_root, tmp_path):
    _, pruned_dir, _, _ = codec_smoke
    ckpt = pruned_dir / "model.safetensors"
    wave = read_audio(read_an4_split(an4_root, "test")[1].audio_path)
    import torchaudio

    low = torchaudio.functional.resample(wave, 16000, 8000)
    sf.write(tmp_path / "8k.wav", low.numpy(), 8000)
    codec_run.run(cfg_for("mode=encode", f"ckpt={ckpt}", f"input={tmp_path / '8k.wav'}", f"output={tmp_path / 'x.cmrl'}", recipe="codec"))
    header = read_cmrl_header(tmp_path / "x.cmrl")
    assert header["sample_rate"] == 16000 and header["num_samples"] == 2 * low.numel()  # 8 kHz -> 16 kHz doubles the length


def test_truncated_foreign_and_mismatched_files_are_refused(codec_smoke, an4_root, tmp_path):
    dense_dir, pruned_dir, _, _ = codec_smoke
    ckpt = pruned_dir / "model.safetensors"
    wav = read_an4_split(an4_root, "test")[0].audio_path
    bits = tmp_path / "x.cmrl"
    codec_run.run(cfg_for("mode=encode", f"ckpt={ckpt}", f"input={wav}", f"output={bits}", recipe="codec"))
    data = bits.read_bytes()
    (tmp_path / "cut.cmrl").write_bytes(data[: len(data) // 2])
    with pytest.raises(BitstreamError, match="cut.cmrl"):
        codec_run.run(cfg_for("mode=decode", f"ckpt={ckpt}", f"input={tmp_path / 'cut.cmrl'}", f"output={tmp_path / 'y.wav'}", recipe="codec"))
    with pytest.raises(BitstreamError, match="not a CMRL"):
        codec_run.run(cfg_for("mode=decode", f"ckpt={ckpt}", f"input={wav}", f"output={tmp_path / 'y.wav'}", recipe="codec"))
    assert not (tmp_path / "y.wav").exists()  # nothing half-written
    # The dense model's quantizer distribution differs from the fine-tuned one: its digest refuses the file.
    with pytest.raises(BitstreamError, match="model"):
        codec_run.run(cfg_for("mode=decode", f"ckpt={dense_dir / 'model.safetensors'}", f"input={bits}",
                              f"output={tmp_path / 'y.wav'}", recipe="codec"))


def test_encode_needs_its_arguments_and_a_codec_checkpoint(codec_smoke, an4_root, tmp_path):
    _, pruned_dir, _, _ = codec_smoke
    with pytest.raises(ValueError, match="output="):
        codec_run.run(cfg_for("mode=encode", f"ckpt={pruned_dir / 'model.safetensors'}", "input=x.wav", recipe="codec"))
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        codec_run.run(cfg_for("mode=encode", f"ckpt={pruned_dir / 'model.safetensors'}", f"input={tmp_path / 'nope.wav'}",
                              f"output={tmp_path / 'x.cmrl'}", recipe="codec"))


def _event_tags(folder) -> tuple[set[str], set[str]]:
    """Scalar and audio tags of every event file in a run folder (the HParams session writes its own file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, audio = set(), set()
    for events in folder.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"audio": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        audio |= set(acc.Tags()["audio"])
    return scalars, audio


def test_event_files_hold_the_codec_tags(codec_smoke):
    _, pruned_dir, _, _ = codec_smoke
    scalars, audio = _event_tags(pruned_dir)
    for tag in ("finetune/loss", "finetune/nmse", "finetune/mel", "finetune/entropy_m0", "finetune/bitrate_m1",
                "finetune/rate_weight_m0", "finetune/hard_entropy_m0", "eval/pesq", "eval/snr", "eval/stoi", "eval/bitrate_real", "eval/bitrate_entropy",
                "sparsity/total", "prune/rel_error"):
        assert tag in scalars, tag
    assert any(t.endswith("/reference") for t in audio) and any(t.endswith("/eval") for t in audio)


def test_report_plots_pesq(codec_smoke, tmp_path):
    _, pruned_dir, _, _ = codec_smoke
    out = subprocess.run([sys.executable, "-m", "csprune.cli", "report", str(pruned_dir), "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "report.md").read_text()
    assert "PESQ" in table and "csp" in table
    assert "| method | sparsity | real bitrate (kbit/s) | PESQ-WB (MOS-LQO) |" in table  # quality at its bitrate
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "report.png").shape[1] == 1650  # three panels: the third vs bitrate
    from csprune.train.report import build_report, rate_points

    points = rate_points(build_report([pruned_dir]))
    assert set(points) == {"csp", "dense"} and points["csp"][0][2] == 0.5


# ---------------------------------------------------------------- model, quantizer, framing (no AN4 needed)


def test_full_size_module_has_kankanahalli_size():
    model = CMRL(2)
    per_module = count_parameters(model.stages[0])
    assert 0.40e6 < per_module < 0.50e6  # "≈0.45M parameters a module at full size"
    frames = torch.randn(3, 512) * 0.05
    out = model(frames, hard=True)
    assert out["decoded"].shape == (3, 512) and out["modules"][0]["idx"].shape == (3, 256)
    # The cascade: module 1 codes what module 0 left, so the decoded frame is the sum of both outputs.
    torch.testing.assert_close(out["decoded"], out["modules"][0]["decoded"] + out["modules"][1]["decoded"])


def test_hard_codes_take_only_centroid_values_at_inference():
    torch.manual_seed(0)
    quantizer = SoftToHardQuantizer(32)
    with torch.no_grad():
        quantizer.centroids.add_(0.01 * torch.randn(32))  # not a regular grid any more
    x = torch.rand(4, 256) * 2 - 1
    quantizer.eval()
    q = quantizer(x)["q"]
    distance = (q.unsqueeze(-1) - quantizer.levels()).abs().min(-1).values  # levels(): the centroids as used
    assert torch.all(distance == 0)
    quantizer.train()
    x.requires_grad_(True)
    passed = quantizer(x)["q"]  # straight-through (default): hard values forward ...
    assert torch.equal(passed.detach(), q)
    passed.sum().backward()
    assert x.grad.abs().sum() > 0  # ... and the soft assignment's gradient backward
    soft_quantizer = SoftToHardQuantizer(32, straight_through=False)
    soft_quantizer.load_state_dict(quantizer.state_dict())
    soft = soft_quantizer(x.detach())["q"]
    assert (soft.unsqueeze(-1) - quantizer.levels()).abs().min(-1).values.max() > 0  # soft values lie between centroids


def _train_entropy(weight: float, steps: int = 80) -> float:
    """Soft-histogram entropy after training a tiny module for `steps` with a fixed entropy weight λ (no control)."""
    torch.manual_seed(0)
    model = CMRL(1, wide=16, narrow=8, blocks=1)
    loss = CodecLoss(LossConfig(rate_weight_init=weight, rate_gain=0.0, rate_p_gain=0.0, mel_weight=0.0,
                                target_bitrate=8533.3), 1, 8533.3)  # budget 1 bit/value: λ·H/1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t = torch.arange(512) / 16000
    gen = torch.Generator().manual_seed(1)
    entropy = 0.0
    for _ in range(steps):
        f0 = 100 + 200 * torch.rand(16, 1, generator=gen)
        frames = 0.05 * torch.sin(2 * math.pi * f0 * t) + 0.005 * torch.randn(16, 512, generator=gen)
        out = model(frames)
        value = loss(out["decoded"], frames, out["modules"])
        opt.zero_grad()
        value.backward()
        opt.step()
        entropy = loss.last["entropy_m0"]
    return entropy


def test_entropy_estimate_falls_as_the_entropy_weight_rises():
    entropies = [_train_entropy(weight) for weight in (0.0, 0.05, 0.5)]
    assert entropies[0] > entropies[1] > entropies[2], entropies


def test_rate_control_moves_once_per_step_and_skips_bad_steps():
    loss = CodecLoss(LossConfig(target_bitrate=16000, rate_weight_init=0.1, rate_gain=0.05), 2, 8533.3)
    frames = torch.randn(2, 512)
    over = [{"entropy": torch.tensor(3.0), "hard_entropy": 3.0, "penalty": torch.tensor(0.0)}] * 2  # 25.6 kbit/s > 8
    loss(frames, frames, over)
    assert torch.allclose(loss.rate_weight, torch.tensor(0.1))  # λ moves once per optimizer step, not per batch
    loss.step_rate_control()
    assert torch.all(loss.rate_weight > 0.1)
    under = [{"entropy": torch.tensor(0.2), "hard_entropy": 0.2, "penalty": torch.tensor(0.0)}] * 2
    before = loss.rate_weight.clone()
    loss(frames, frames, under)
    loss.step_rate_control(applied=False)  # a skipped step leaves λ alone
    assert torch.equal(loss.rate_weight, before)
    loss(frames, frames, under)
    loss.step_rate_control()
    assert torch.all(loss.rate_weight < before)


def test_rate_control_uses_the_mean_bitrate_of_a_steps_micro_batches():
    def weight_after(entropies):
        loss = CodecLoss(LossConfig(target_bitrate=16000, rate_weight_init=0.1, rate_gain=0.05), 1, 8533.3)
        frames = torch.randn(2, 512)
        for h in entropies:
            loss(frames, frames, [{"entropy": torch.tensor(h), "hard_entropy": h, "penalty": torch.tensor(0.0)}])
        loss.step_rate_control()
        return float(loss.rate_weight[0])

    # Two micro-batches at 0.5 and 1.5 bits/code move λ as one batch at their mean, 1.0 bits/code.
    assert weight_after([0.5, 1.5]) == pytest.approx(weight_after([1.0]), rel=1e-6)
    assert weight_after([0.5, 1.5]) != pytest.approx(weight_after([1.5]), rel=1e-6)


@pytest.mark.parametrize("length", [1, 479, 480, 481, 16000, 23457])
def test_framing_and_overlap_add_are_exact_inverses(length):
    wave = torch.randn(length)
    frames = frame_signal(wave)
    assert frames.shape[1] == 512
    torch.testing.assert_close(overlap_add(frames, length), wave, rtol=0, atol=1e-6)


def test_window_halves_sum_to_one():
    w = synthesis_window(512, 32).double()
    torch.testing.assert_close(w[:32] + w[-32:], torch.ones(32, dtype=torch.float64), rtol=0, atol=1e-7)
    assert torch.all(w[32:-32] == 1)


def test_bad_model_config_is_named():
    with pytest.raises(ValueError, match="num_modules"):
        CMRL(0)
    with pytest.raises(ValueError, match="frame_len"):
        CMRL(1, frame_len=511)
    with pytest.raises(TypeError):
        ModuleConfig(widht=3)  # a typo fails (the structured config catches it on the command line)


def test_lpc_and_psychoacoustic_options_run_and_round_trip(an4_root, tmp_path):
    out = tmp_path / "lpc"
    metrics = codec_run.run(cfg_for("trainer=smoke", "lpc=true", "loss.psychoacoustic=true", f"output_dir={out}",
                                    f"data.root={an4_root}", "data.max_test_utts=2", recipe="codec"))
    # 40 LSF bits a frame at 33.3 frames/s are carried in every file on top of the module codes.
    assert metrics["bitrate_real"] > 40 * 16000 / 480 and metrics["lpc"] is True
    assert {"joint/priority", "joint/noise_modulation"} <= _event_tags(out)[0]
    wav = read_an4_split(an4_root, "test")[0].audio_path
    ckpt = out / "model.safetensors"
    codec_run.run(cfg_for("mode=encode", f"ckpt={ckpt}", f"input={wav}", f"output={tmp_path / 'x.cmrl'}", recipe="codec"))
    assert read_cmrl_header(tmp_path / "x.cmrl")["lpc_order"] == 16
    codec_run.run(cfg_for("mode=decode", f"ckpt={ckpt}", f"input={tmp_path / 'x.cmrl'}", f"output={tmp_path / 'y.wav'}", recipe="codec"))
    decoded, _ = sf.read(tmp_path / "y.wav", dtype="float32")
    codec = codec_run.load_codec(str(ckpt))
    assert codec.lpc is not None
    assert np.array_equal(decoded, codec.decode(codec.encode(read_audio(wav))).numpy())
