"""The ASR smoke recipe as a subprocess, for the resume and fault tests (one definition, shared)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import csprune

REPO = Path(__file__).resolve().parents[1]

# Smoke recipe with a gradual schedule: 6 dense steps (global steps 0-5), then 12 fine-tuning steps
# (6-17) whose GMP ramp (cubic, an update every 2 steps) spans the first 9; a training checkpoint
# every 2 steps. One micro-batch per step, so the loss call index equals the global step.
ARGS = ["trainer=smoke", "+prune=gmp", "trainer.threads=1", "data.max_train_utts=48", "trainer.max_steps=12",
        "prune.ramp_epochs=1.5", "prune.frequency=2", "trainer.checkpoint_every=2"]
KILL_STEP = 10  # global step 10 = fine-tuning step 4 of the 9-step ramp (sparsity ~0.5 of 0.7)
FINAL_STEP = 18


def run(out: Path, cache: Path, an4_root: Path, *extra: str, kill: str | None = None, fault: str | None = None,
        at: int = KILL_STEP, launcher: list[str] | None = None, args: list[str] = ARGS) -> subprocess.CompletedProcess:
    """Run the recipe into ``out``; ``kill="after"|"during"`` or ``fault=`` (see tests/_faulty.py) injects a fault at ``at``."""
    env = dict(os.environ, AN4_ROOT=str(an4_root), CSPRUNE_REPO=str(REPO), OMP_NUM_THREADS="1")
    script = REPO / "recipes/asr/run.py"
    fault = f"kill-{kill}" if kill else fault
    if fault:
        env.update(FAULT_AT=str(at), FAULT=fault)
        script = REPO / "tests/_faulty.py"
    cmd = [*(launcher or [sys.executable]), str(script), *args, f"output_dir={out}", f"data.cache_dir={cache}", *extra]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported model's state_dict."""
    from recipes.asr import run as asr_run

    path = run_dir / "model.safetensors"
    meta = csprune.read_sparse_meta(path)
    model = asr_run.make_model(meta["model"], asr_run.CharVocab.from_dict(meta["vocab"]))
    csprune.load_sparse(path, model=model)
    return model.state_dict()


def assert_same(a: dict, b: dict) -> None:
    """Bit-identical state dicts (masks first, for a clearer message)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), f"mask of {k} differs"
        assert torch.equal(a[k], b[k]), f"{k} differs (max {(a[k].float() - b[k].float()).abs().max()})"


def differs(a: dict, b: dict) -> bool:
    """True when the state dicts are not bit-identical (a silently wrong result)."""
    return a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a)
