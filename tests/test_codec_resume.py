"""The codec recipe's training checkpoints: a run stopped by SIGTERM and resumed equals one that never stopped.

A `trainer=smoke` codec run has four stages of 3 steps each: greedy_m0 (global steps 0-2), greedy_m1 (3-5),
joint (6-8) and, under `+prune=gmp` with a mask update every step, finetune (9-11). SIGTERM is sent from
inside the loss of a chosen step (in-process: deterministic); the loop finishes that step, writes a
checkpoint and raises ``Preempted``. The same config with ``trainer.resume=true`` must then end with the
bit-identical model and the same PESQ, bitrate and rate-controller trajectory as the uninterrupted run.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from csprune.train.checkpoint import CheckpointMismatch, latest_checkpoint
from csprune.train.faults import Preempted
from recipes.codec import run as codec_run

from conftest import cfg_for

ARGS = ("trainer=smoke", "+prune=gmp", "prune.frequency=1", "trainer.threads=1", "trainer.checkpoint_every=2",
        "export_int8=false")


def _cfg(out, an4_root, *extra):
    return cfg_for(*ARGS, f"output_dir={out}", f"data.root={an4_root}", *extra, recipe="codec")


def _exported(run_dir) -> dict[str, torch.Tensor]:
    codec = codec_run.load_codec(str(run_dir / "model.safetensors"))
    return codec.model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(an4_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("codec_full")
    return out, codec_run.run(_cfg(out, an4_root))


def _sigterm_in_call(monkeypatch, call: int) -> None:
    """SIGTERM to this process from inside the loss of training step ``call`` (counted over all stages)."""
    original, calls = codec_run.TrainStep.__call__, [0]

    def stopping(self, model, index):
        value = original(self, model, index)
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        calls[0] += 1
        return value

    monkeypatch.setattr(codec_run.TrainStep, "__call__", stopping)


@pytest.mark.parametrize("call,stage", [(4, "greedy_m1"), (10, "finetune")])
def test_a_codec_run_stopped_by_sigterm_resumes_to_the_same_model(uninterrupted, an4_root, tmp_path, monkeypatch, call, stage):
    reference_dir, reference = uninterrupted
    out = tmp_path / "stopped"
    _sigterm_in_call(monkeypatch, call)
    with pytest.raises(Preempted):
        codec_run.run(_cfg(out, an4_root))
    monkeypatch.undo()
    assert not (out / "model.safetensors").exists()  # it really stopped before the end
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and newest[1]["stage"] == stage and newest[1]["progress"]["step"] == call + 1
    if stage == "finetune":
        assert 0.0 < newest[1]["pruner"]["level"]  # stopped with masks in place, mid-ramp
    resumed = codec_run.run(_cfg(out, an4_root, "trainer.resume=true"))
    for key in ("pesq", "snr", "bitrate_entropy", "bitrate_real", "sparsity_actual", "dense_pesq"):
        assert resumed[key] == reference[key], key
    a, b = _exported(out), _exported(reference_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume (max {(a[name] - b[name]).abs().max():.3g})"


def test_resuming_a_codec_run_with_a_changed_rate_target_is_refused_naming_it(uninterrupted, an4_root, tmp_path, monkeypatch):
    out = tmp_path / "stopped"
    _sigterm_in_call(monkeypatch, 1)
    with pytest.raises(Preempted):
        codec_run.run(_cfg(out, an4_root))
    monkeypatch.undo()
    with pytest.raises(CheckpointMismatch, match=r"loss\.target_bitrate: checkpoint 16000\.0 vs now 8000"):
        codec_run.run(_cfg(out, an4_root, "trainer.resume=true", "loss.target_bitrate=8000"))
