"""The ASR recipe end to end: smoke run, export round trip, TensorBoard tags, sweeps, configs."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

import csprune
from csprune.train.config import build_pruner, validate_prune_config
from recipes.asr import run as asr_run  # registers the structured configs

from conftest import REPO, cfg_for


def test_smoke_run_end_to_end(smoke_run):
    cfg, out, metrics = smoke_run
    assert isinstance(metrics["wer"], float) and metrics["wer"] >= 0
    assert metrics["sparsity_actual"] > 0.3  # encoder.* pruned to 70%: a large share of the model
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["wer"] == metrics["wer"] and on_disk["method"] == "csp"
    assert (out / "dense.pt").is_file() and (out / "model.safetensors").is_file()
    assert metrics["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size


def test_export_reloads_with_the_same_wer(smoke_run):
    cfg, out, metrics = smoke_run
    meta = csprune.read_sparse_meta(out / "model.safetensors")
    vocab = asr_run.CharVocab.from_dict(meta["vocab"])
    model = asr_run.make_model(meta["model"], vocab)
    csprune.load_sparse(out / "model.safetensors", model=model)
    data = asr_run.Data(cfg, vocab, asr_run.GlobalCMVN.from_dict(meta["cmvn"]), cfg.seed)
    again = asr_run.evaluate(model, data.test_batches(), vocab, torch.device("cpu"))
    assert again["wer"] == metrics["wer"] and again["cer"] == metrics["cer"]


def test_event_files_hold_the_tags(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = smoke_run
    tags = {"scalars": set(), "histograms": set(), "images": set(), "tensors": set()}
    for events in out.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "histograms": 0, "scalars": 0, "tensors": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags().get(kind, []))
    scalars = tags["scalars"]
    for tag in ("train/loss", "train/lr", "finetune/loss", "eval/wer", "eval/cer", "sparsity/total", "sparsity/scheduled",
                "prune/seconds", "prune/rel_error", "prune/solver_iters", "prune/solver_gap", "prune/solver_seconds"):
        assert tag in scalars, tag
    assert any(t.startswith("sparsity/encoder.") for t in scalars)  # per tensor
    assert any(t.startswith("weights/") for t in tags["histograms"])
    assert any(t.startswith("masks/") for t in tags["images"])
    assert "config/text_summary" in tags["tensors"]
    # HParams summaries carry only plugin metadata, which EventAccumulator drops: read the raw events.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    raw = {v.tag for f in out.rglob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load() for v in e.summary.value}
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= raw


def test_transcribe_mode_prints_a_transcript(smoke_run, an4_root, capsys):
    _, out, _ = smoke_run
    wav = next((an4_root / "wav" / "an4test_clstk").rglob("*.wav"))
    cfg = cfg_for("mode=transcribe", f"ckpt={out / 'model.safetensors'}", f"input={wav}")
    result = asr_run.run(cfg)
    assert isinstance(result["transcript"], str)
    assert result["transcript"] in capsys.readouterr().out


def test_multirun_and_report(an4_root, tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, AN4_ROOT=str(an4_root))
    cmd = [sys.executable, str(REPO / "recipes/asr/run.py"), "-m", "trainer=smoke", "+prune=magnitude",
           "prune.sparsity=0.5,0.8", f"hydra.sweep.dir={sweep}", f"data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 2
    assert sorted(json.loads((r / "metrics.json").read_text())["sparsity"] for r in runs) == [0.5, 0.8]
    rep = subprocess.run([sys.executable, "-m", "csprune.cli", "report", str(sweep)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "| magnitude | 0.50 |" in rep.stdout and "| magnitude | 0.80 |" in rep.stdout
    assert (sweep / "report.md").is_file()
    png = (sweep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ configs
MODELS = ["conformer_ctc", "lstm_rnnt"]
TRAINERS = ["default", "smoke", "demo"]
PRUNES = [None, "csp", "gmp", "magnitude", "wanda", "random"]


@pytest.mark.parametrize("model,trainer,prune", list(itertools.product(MODELS, TRAINERS, PRUNES)))
def test_every_config_option_composes_and_instantiates(model, trainer, prune):
    overrides = [f"model={model}", f"trainer={trainer}"] + ([f"+prune={prune}"] if prune else [])
    cfg = cfg_for(*overrides)
    container = OmegaConf.to_container(cfg, resolve=True)
    net = asr_run.make_model(container["model"], asr_run.CharVocab())
    assert sum(p.numel() for p in net.parameters()) > 0
    if prune:
        validate_prune_config(container["prune"])
        pruner = build_pruner(net, container["prune"], None, 0, 10, asr_run.DEFAULT_TARGETS[model])
        assert pruner.targets
        pruner.finalize()


def test_misspelled_key_fails_naming_it():
    with pytest.raises(Exception, match="epochz"):
        cfg_for("trainer.epochz=3")
    with pytest.raises(Exception, match="sparsty"):
        cfg_for("+prune=csp", "prune.sparsty=0.5")


def test_bad_sparsity_fails_before_training(tmp_path):
    cfg = cfg_for("trainer=smoke", "+prune=csp", "prune.sparsity=1.5", f"output_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"prune\.sparsity=1\.5"):
        asr_run.run(cfg)
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_bad_method_name_fails_before_training(tmp_path):
    cfg = cfg_for("trainer=smoke", "+prune=csp", "prune.solver=lars", f"output_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"prune\.solver='lars'"):
        asr_run.run(cfg)
