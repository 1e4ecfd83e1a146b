"""Faults a user meets, each injected for real and detected by name, with nothing lost before the last checkpoint.

Recipe-level faults run the ASR smoke recipe of tests/_asr_runs.py as a subprocess with
tests/_faulty.py injecting one fault at a known step, then resume into the same folder and compare the
export with an uninterrupted run (bit-identical, single-threaded and seeded). Each test adds a row to
the fault table printed at the end of the session (``make faults`` runs just these).

"work lost" counts optimizer steps that had a checkpoint on disk before the fault and were not
recoverable after it (the goal is 0; steps after the last checkpoint are redone by design).
"""

from __future__ import annotations

import logging
import signal
import sys

import pytest
import torch
from torch import nn

from _asr_runs import ARGS, FINAL_STEP, differs, final_state, run
from csprune.train.checkpoint import CheckpointMismatch, latest_checkpoint
from csprune.train.faults import PREEMPTED_EXIT_CODE, NonFiniteError
from csprune.train.loop import FitConfig, fit

pytestmark = pytest.mark.faults


def _newest_step(out) -> int | None:
    found = latest_checkpoint(out / "checkpoints")
    return None if found is None else int(found[1]["progress"]["step"])


def _lost(expected_ckpt_step: int, out) -> int:
    """Steps covered by a checkpoint before the fault that are no longer covered."""
    found = _newest_step(out)
    return max(0, expected_ckpt_step - (found or 0))


def _resume_and_compare(out, base, an4_root, reference, mode: str = "true") -> bool:
    resumed = run(out, base / "cache", an4_root, f"trainer.resume={mode}")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    return differs(final_state(out), reference)


# ------------------------------------------------------------------------ preemption
def test_sigterm_writes_a_checkpoint_and_resume_auto_equals_uninterrupted(uninterrupted, an4_root, fault_table):
    base, reference = uninterrupted
    out = base / "sigterm"
    at = 8  # SIGTERM arrives during step 8's forward; the step finishes, then a checkpoint at step 9 (not a multiple of 2)
    done = run(out, base / "cache", an4_root, fault="term", at=at)
    assert done.returncode == PREEMPTED_EXIT_CODE, done.stdout[-2000:] + done.stderr[-3000:]
    assert "SIGTERM received; stopped after step 9" in done.stdout
    assert not (out / "model.safetensors").exists()
    assert _newest_step(out) == at + 1  # the preemption checkpoint, beyond the regular one at 8
    wrong = _resume_and_compare(out, base, an4_root, reference, mode="auto")
    fault_table("SIGTERM (preemption) mid fine-tuning", 1, 1, int(wrong), 0)
    assert not wrong


# ------------------------------------------------------------------------ non-finite values
def test_nan_loss_stops_naming_step_and_term_and_resume_continues(uninterrupted, an4_root, fault_table):
    base, reference = uninterrupted
    out = base / "nan"
    done = run(out, base / "cache", an4_root, fault="nan", at=9)
    assert done.returncode != 0
    assert "NonFiniteError" in done.stderr and "non-finite loss at step 9" in done.stderr, done.stderr[-3000:]
    lost = _lost(8, out)  # the checkpoint of step 8 was written before the NaN
    assert lost == 0 and _newest_step(out) == 8  # nothing written after the bad step
    wrong = _resume_and_compare(out, base, an4_root, reference)
    fault_table("NaN loss in fine-tuning", 1, 1, int(wrong), lost)
    assert not wrong


def _tiny_fit(tmp_path, loss_fn, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(5, 4) for _ in range(6)]
    saved = []
    step = fit(model, lambda epoch: data, loss_fn, opt, None, FitConfig(epochs=1, save_every=2, **kwargs), save=saved.append)
    return model, step, saved


def test_fit_names_the_parameter_with_a_non_finite_gradient(tmp_path, fault_table):
    def loss_fn(model, x):
        out = model(x).pow(2).mean()
        if loss_fn.calls == 3:  # an overflow in one layer's gradient only (a hook on the leaf parameter)
            model[2].weight.register_hook(lambda g: g * float("inf"))
        loss_fn.calls += 1
        return out

    loss_fn.calls = 0
    with pytest.raises(NonFiniteError, match=r"non-finite grad:2\.weight at step 3") as info:
        _tiny_fit(tmp_path, loss_fn)
    assert info.value.step == 3 and info.value.term == "grad:2.weight"
    fault_table("Inf gradient (named parameter)", 1, 1, 0, 0)


def test_fit_names_the_loss_term_and_skips_bounded_bad_steps(tmp_path, caplog):
    class Loss:
        """A two-term loss that reports its terms in ``last``, as the codec's loss does."""

        def __init__(self, bad_calls):
            self.bad_calls, self.calls, self.last = bad_calls, 0, {}

        def __call__(self, model, x):
            mse = model(x).pow(2).mean()
            rate = torch.tensor(float("nan") if self.calls in self.bad_calls else 0.5)
            self.last = {"mse": float(mse.detach()), "rate": float(rate)}
            self.calls += 1
            return mse + rate

    with pytest.raises(NonFiniteError, match=r"non-finite rate, loss at step 2"):
        _tiny_fit(tmp_path, Loss({2}))
    # With max_bad_steps=2, two bad steps are skipped (no optimizer step on them), then a third stops it.
    with caplog.at_level(logging.WARNING, logger="csprune"):
        model, step, saved = _tiny_fit(tmp_path, Loss({1, 4}), max_bad_steps=2)
    assert step == 6 and saved[-1]["bad_steps"] == 2 and "skipping step 1" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(NonFiniteError, match="at step 4"):
        _tiny_fit(tmp_path, Loss({1, 2, 4}), max_bad_steps=2)


# ------------------------------------------------------------------------ full disk
def test_file_size_limit_on_a_training_checkpoint_names_it_and_resume_continues(uninterrupted, an4_root, fault_table):
    base, reference = uninterrupted
    out = base / "fsize_ckpt"
    done = run(out, base / "cache", an4_root, fault="fsize-ckpt", at=12)
    assert done.returncode != 0
    target = out / "checkpoints" / "ckpt-00000012.pt"
    assert f"{target}: could not be written (File too large); no file was created" in done.stderr, done.stderr[-3000:]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    lost = _lost(10, out)
    wrong = _resume_and_compare(out, base, an4_root, reference)
    fault_table("file-size limit on a training checkpoint", 1, 1, int(wrong), lost)
    assert lost == 0 and not wrong


def test_file_size_limit_on_the_export_names_it_and_resume_exports(uninterrupted, an4_root, fault_table):
    base, reference = uninterrupted
    out = base / "fsize_export"
    done = run(out, base / "cache", an4_root, fault="fsize-export")
    assert done.returncode != 0
    assert f"{out / 'model.safetensors'}" in done.stderr and "File too large" in done.stderr, done.stderr[-3000:]
    assert not (out / "model.safetensors").exists()
    lost = _lost(FINAL_STEP, out)  # the end-of-stage checkpoint was on disk before the export
    wrong = _resume_and_compare(out, base, an4_root, reference)
    fault_table("file-size limit on the export", 1, 1, int(wrong), lost)
    assert lost == 0 and not wrong


# ------------------------------------------------------------------------ changed settings on resume
@pytest.mark.parametrize("override,names", [
    ("data.batch_size=4", r"another config \(data\.batch_size: checkpoint 8 vs now 4\)"),
    ("trainer.micro_batches=2", r"another shards of each global batch \(DDP ranks x trainer\.micro_batches\) \(checkpoint 1 vs now 2\)"),
    ("trainer.lr=1e-4", r"another config \(trainer\.lr: checkpoint 0\.002 vs now 0\.0001\)"),
])
def test_resume_with_a_changed_setting_is_refused_naming_it(uninterrupted, an4_root, override, names, fault_table):
    from conftest import cfg_for
    from recipes.asr import run as asr_run

    base, _ = uninterrupted
    cfg = cfg_for(*ARGS, f"output_dir={base / 'full'}", f"data.cache_dir={base / 'cache'}", f"data.root={an4_root}",
                  "trainer.resume=true", override)
    with pytest.raises(CheckpointMismatch, match=names):
        asr_run.run(cfg)
    fault_table(f"resume with {override}", 1, 1, 0, 0)


def test_two_ranks_preempted_resume_in_one_process_with_the_same_shards(an4_root, tmp_path, fault_table):
    """2 gloo ranks get SIGTERM mid fine-tuning; one process with trainer.micro_batches=2 (the same two
    shards per global batch) resumes and ends where an uninterrupted 2-rank run ends."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    whole = tmp_path / "whole"
    assert run(whole, tmp_path / "cache", an4_root, launcher=torchrun).returncode == 0
    out = tmp_path / "preempted"
    done = run(out, tmp_path / "cache", an4_root, fault="term", at=8, launcher=torchrun)
    assert done.returncode != 0 and "SIGTERM received; stopped after step 9" in done.stdout, done.stderr[-3000:]
    assert _newest_step(out) == 9
    resumed = run(out, tmp_path / "cache", an4_root, "trainer.resume=auto", "trainer.micro_batches=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_state(whole), final_state(out)
    wrong = any(not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    fault_table("2 ranks preempted, resumed as 1 process x 2 micro-batches", 1, 1, int(wrong), 0)
    assert not wrong


def test_sigterm_outside_training_is_not_swallowed():
    """The SIGTERM handler is installed only inside fit: afterwards the default action is back."""
    before = signal.getsignal(signal.SIGTERM)
    model = nn.Linear(2, 1)
    fit(model, lambda e: [torch.ones(1, 2)], lambda m, x: m(x).sum(), torch.optim.SGD(model.parameters(), lr=0.1), None,
        FitConfig(epochs=1))
    assert signal.getsignal(signal.SIGTERM) is before
