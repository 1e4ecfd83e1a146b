"""Training checkpoints: kill-and-resume equals an uninterrupted run; torn writes and foreign checkpoints.

The recipe runs as a subprocess (``tests/_faulty.py`` wraps it and SIGKILLs itself right after, or
halfway through, the training checkpoint of a chosen step: deterministic, no polling races), then
again with ``trainer.resume=true`` into the same folder. Single-threaded CPU, seeded: bit-exact.
"""

from __future__ import annotations

import logging
import signal

import pytest
import torch

from csprune.train.checkpoint import FORMAT, CheckpointMismatch, latest_checkpoint, load_checkpoint, save_checkpoint

from _asr_runs import ARGS, KILL_STEP, assert_same as _assert_same, final_state as _final_state, run as _run
from conftest import cfg_for

@pytest.mark.faults
def test_sigkill_mid_ramp_then_resume_equals_uninterrupted(uninterrupted, an4_root, fault_table):
    base, reference = uninterrupted
    out = base / "killed"
    killed = _run(out, base / "cache", an4_root, kill="after")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "model.safetensors").exists()  # it really died before the end
    newest = latest_checkpoint(out / "checkpoints")
    assert newest is not None and newest[1]["stage"] == "finetune" and newest[1]["progress"]["step"] == KILL_STEP
    level = newest[1]["pruner"]["level"]
    assert 0.0 < level < 0.7  # killed in the middle of the pruning ramp
    resumed = _run(out, base / "cache", an4_root, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints'}" in resumed.stdout
    _assert_same(_final_state(out), reference)
    fault_table("SIGKILL mid-ramp, after a checkpoint", 1, 1, 0, 0)


@pytest.mark.faults
def test_kill_while_writing_resumes_from_previous_checkpoint(uninterrupted, an4_root, caplog, fault_table):
    base, reference = uninterrupted
    out = base / "torn"
    killed = _run(out, base / "cache", an4_root, kill="during")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = out / "checkpoints"
    temps = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and not (folder / f"ckpt-{KILL_STEP:08d}.pt").exists()  # the torn write never replaced anything
    resumed = _run(out, base / "cache", an4_root, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"ckpt-{KILL_STEP - 2:08d}.pt" in resumed.stdout  # the previous checkpoint
    assert "never finished" in resumed.stdout + resumed.stderr  # the stale temp file was reported
    _assert_same(_final_state(out), reference)
    fault_table("SIGKILL while writing a training checkpoint", 1, 1, 0, 0)


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    for step in (2, 4):
        save_checkpoint({"progress": {"step": step}, "w": torch.full((3,), float(step))}, tmp_path / f"ckpt-{step:08d}.pt",
                        keep_last=2)
    newest = tmp_path / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:50])  # as if the storage lost the tail
    (tmp_path / ".ckpt-00000006.pt.abc.tmp").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="csprune"):
        path, state = latest_checkpoint(tmp_path)
    assert path.name == "ckpt-00000002.pt" and state["progress"]["step"] == 2
    assert "skipping unreadable checkpoint" in caplog.text and "ckpt-00000004.pt" in caplog.text
    assert not (tmp_path / ".ckpt-00000006.pt.abc.tmp").exists()


def test_keep_last_rotates(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step}, tmp_path / f"ckpt-{step:08d}.pt", keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-00000004.pt", "ckpt-00000005.pt"]


def test_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint({"step": 1}, tmp_path / "ckpt-00000001.pt")
    state = torch.load(path, weights_only=True)
    state["format"] = FORMAT.rsplit("/", 1)[0] + "/99"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch, match=r"format version 99 is newer"):
        load_checkpoint(path)
    with pytest.raises(CheckpointMismatch, match="ckpt-00000001.pt"):
        latest_checkpoint(tmp_path)  # not silently skipped: resuming from an older one would lose work


@pytest.mark.parametrize("override,names", [
    ("model.d_model=48", r"another model \(d_model: checkpoint 32 vs now 48\)"),
    ("prune.sparsity=0.5", r"another config \(prune\.sparsity: checkpoint 0\.7 vs now 0\.5\)"),
])
def test_checkpoint_of_another_model_or_config_is_refused(uninterrupted, an4_root, override, names):
    from recipes.asr import run as asr_run

    base, _ = uninterrupted
    cfg = cfg_for(*ARGS, f"output_dir={base / 'full'}", f"data.cache_dir={base / 'cache'}", f"data.root={an4_root}",
                  "trainer.resume=true", override)
    with pytest.raises(CheckpointMismatch, match=names):
        asr_run.run(cfg)


def test_resume_true_without_checkpoint_fails_naming_the_folder(tmp_path, an4_root):
    from recipes.asr import run as asr_run

    cfg = cfg_for(*ARGS, f"output_dir={tmp_path}", f"data.root={an4_root}", "trainer.resume=true")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "checkpoints")):
        asr_run.run(cfg)
