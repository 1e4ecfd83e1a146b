"""DDP on CPU (gloo): statistics all-reduce, rank agreement checks, and the ASR recipe under torchrun.

The recipe test launches the README's ``torchrun --nproc_per_node=2`` command on the default model and
compares the export with a 1-process run of the same global batch. Equality needs the same computation
per sample: ``trainer.micro_batches=2`` makes the 1-process run cut every global batch into the same two
shards the two ranks get (BatchNorm and the depthwise convs see padded frames, so padding a sample with
a longer neighbour changes it slightly), dropout is seeded per shard, BatchNorm running statistics are
the mean of the shards' updates, and the reductions (gradient average, Gram sums) add the same numbers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from csprune import Pruner
from csprune.methods import CSP, Magnitude
from csprune.schedules import OneShot
from csprune.stats import InputStats
from csprune.targets import find_targets

from conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int = 2) -> None:
    port = _free_port()
    mp.spawn(_entry, args=(fn, world, port), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world)
    finally:
        dist.destroy_process_group()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _data(rank: int) -> torch.Tensor:
    return torch.randn(64, 12, generator=torch.Generator().manual_seed(100 + rank))


# --------------------------------------------------------------- statistics
def _stats_worker(rank: int, world: int) -> None:
    model = _net()
    targets = find_targets(model, ["0.weight", "2.weight", "4.weight"])
    stats = InputStats(targets, mode="full").attach()
    stats.enabled = True
    x = _data(rank)
    if rank == 0:
        model(x)
    else:  # rank 1 sees only the first layer's input: it must contribute zeros to the others
        model[0](x)
    stats.all_reduce(bucket_bytes=1024)  # tiny buckets: several collectives, exercised
    # Reference: the Grams of both ranks' data on one process.
    ref_model = _net()
    ref = InputStats(find_targets(ref_model, ["0.weight", "2.weight", "4.weight"]), mode="full").attach()
    ref.enabled = True
    ref_model(_data(0))
    ref_model[0](_data(1))
    for t, rt in zip(targets, ref.targets):
        assert torch.allclose(stats.gram(t), ref.gram(rt), atol=1e-6), t.fqn
        assert torch.equal(stats._acc[t.fqn].count, ref._acc[rt.fqn].count), t.fqn


def test_stats_all_reduce_sums_over_ranks_and_fills_missing_targets():
    _spawn(_stats_worker)


def _csp_worker(rank: int, world: int) -> None:
    model = _net()
    pruner = Pruner(model, CSP(), OneShot(0.5))
    pruner.stats.enabled = True
    model(_data(rank))
    pruner.prune_to(0.5)  # all-reduces the Grams, then checks the masks agree
    masks = torch.cat([m.reshape(-1).float() for m in pruner.masks().values()])
    gathered = [torch.zeros_like(masks) for _ in range(world)]
    dist.all_gather(gathered, masks)
    assert torch.equal(gathered[0], gathered[1])


def test_csp_masks_agree_on_ranks_with_different_data():
    _spawn(_csp_worker)


def _mismatch_worker(rank: int, world: int) -> None:
    model = _net()
    with torch.no_grad():
        if rank == 1:  # a rank whose weights drifted: its magnitude masks differ
            model[0].weight.mul_(torch.linspace(0.1, 10, 12))
    pruner = Pruner(model, Magnitude(), OneShot(0.5))
    try:
        pruner.prune_to(0.5)
    except RuntimeError as exc:
        assert "masks after pruning step" in str(exc) and "differ from rank 0" in str(exc)
    else:
        raise AssertionError("rank masks differ but no error was raised")


def test_mask_mismatch_between_ranks_is_an_error():
    _spawn(_mismatch_worker)


def _weights_worker(rank: int, world: int) -> None:
    from csprune.train.ddp import check_weights_agree as _check_weights_agree

    model = _net()
    _check_weights_agree(model, world)  # identical: passes
    with torch.no_grad():
        model[4].bias[0] += 1e-7 * rank  # one ulp-ish difference on rank 1
    try:
        _check_weights_agree(model, world)
    except RuntimeError as exc:
        assert "ranks [1]" in str(exc)
    else:
        raise AssertionError("differing weights not detected")


def test_final_weight_check_detects_a_tiny_difference():
    _spawn(_weights_worker)


# --------------------------------------------------------------- the recipe
# The README's command, as written (default model: BatchNorm in the conv modules, dropout on), plus
# the test's own folders.
README_DDP = ["recipes/asr/run.py", "+prune=csp", "trainer=smoke"]


def _recipe(cmd: list[str], out, cache, an4_root) -> subprocess.CompletedProcess:  # cache None: the codec (no feature cache)
    """Run ``cmd`` (script path relative to the repo, as in the README) from a temp folder, so Hydra's
    own run folder lands there and not in the working tree."""
    env = dict(os.environ, AN4_ROOT=str(an4_root), OMP_NUM_THREADS="1")
    cmd = [str(REPO / c) if c.endswith(".py") else c for c in cmd]
    out.mkdir(parents=True, exist_ok=True)
    folders = [f"output_dir={out}"] + ([f"data.cache_dir={cache}"] if cache is not None else [])
    done = subprocess.run(cmd + folders, cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _export(run_dir) -> dict[str, torch.Tensor]:
    import csprune
    from recipes.asr import run as asr_run

    path = run_dir / "model.safetensors"
    meta = csprune.read_sparse_meta(path)
    model = asr_run.make_model(meta["model"], asr_run.CharVocab.from_dict(meta["vocab"]))
    csprune.load_sparse(path, model=model)
    return model.state_dict()


def test_readme_ddp_command_on_the_default_model_matches_one_process(an4_root, tmp_path):
    """2 gloo ranks end with identical masks, weights and BatchNorm buffers (the recipe checks every
    float tensor across ranks, or fails), equal to one process cutting each global batch into the
    same two shards (``trainer.micro_batches=2``): per-shard dropout seeds and shard-averaged
    running statistics make the two computations the same."""
    two = tmp_path / "two"
    done = _recipe([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *README_DDP],
                   two, tmp_path / "cache", an4_root)
    assert "2 DDP ranks" in done.stdout
    assert sorted(p.name for p in two.iterdir() if p.suffix in (".json", ".safetensors", ".pt")) == [
        "dense.pt", "metrics.json", "model.safetensors"]  # rank 0 alone wrote
    one = tmp_path / "one"
    _recipe([sys.executable, *README_DDP, "trainer.micro_batches=2"], one, tmp_path / "cache", an4_root)
    a, b = _export(one), _export(two)
    assert a.keys() == b.keys()
    assert any(k.endswith("running_mean") for k in a), "the default model has BatchNorm buffers"
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), f"mask of {k} differs"
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    bn = [k for k in a if k.endswith("running_var")]
    assert all(not torch.equal(a[k], torch.ones_like(a[k])) for k in bn), "running statistics never updated"
    assert sum(int((v == 0).sum()) for v in a.values()) > 10_000  # CSP pruned a large share


README_CODEC_DDP = ["recipes/codec/run.py", "+prune=csp", "trainer=smoke"]


def test_readme_codec_ddp_command_matches_one_process(an4_root, tmp_path):
    """The codec under 2 gloo ranks (greedy stages with unused modules, the rate controller's λ
    agreed over ranks once per step) equals one process with the same two shards per global batch."""
    import csprune
    from recipes.codec import run as codec_run

    two = tmp_path / "two"
    done = _recipe([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *README_CODEC_DDP],
                   two, None, an4_root)
    assert "2 DDP ranks" in done.stdout
    one = tmp_path / "one"
    _recipe([sys.executable, *README_CODEC_DDP, "trainer.micro_batches=2"], one, None, an4_root)
    a, b = (codec_run.load_codec(str(d / "model.safetensors")).model.state_dict() for d in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), f"mask of {k} differs"
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert csprune.read_sparse_meta(two / "model.safetensors")["recipe"] == "codec"


def test_batch_size_must_split_over_ranks(an4_root):
    from conftest import cfg_for
    from recipes.asr import run as asr_run

    cfg = cfg_for("trainer=smoke", "trainer.micro_batches=3", f"data.root={an4_root}")
    with pytest.raises(ValueError, match=r"data\.batch_size=8: must be divisible"):
        asr_run.Data(cfg, asr_run.CharVocab(), None, 0)


# ------------------------------------------------------------------ sweeps
def test_joblib_multirun_runs_two_jobs_in_parallel_and_reports(an4_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install hydra-joblib-launcher")
    import json

    sweep = tmp_path / "sweep"
    env = dict(os.environ, AN4_ROOT=str(an4_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "recipes/asr/run.py"), "-m", "hydra/launcher=local_parallel", "trainer=smoke",
           "trainer.threads=1", "+prune=magnitude", "prune.sparsity=0.5,0.8", f"hydra.sweep.dir={sweep}",
           f"data.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stdout + done.stderr  # Hydra logs the launcher it used
    runs = [json.loads(p.read_text()) for p in sorted(sweep.rglob("metrics.json"))]
    assert sorted(r["sparsity"] for r in runs) == [0.5, 0.8]
    assert runs[0]["pid"] != runs[1]["pid"] and os.getpid() not in {r["pid"] for r in runs}  # worker processes
    first, second = sorted(runs, key=lambda r: r["started_at"])
    assert second["started_at"] < first["finished_at"], "the two jobs did not overlap in time"
    rep = subprocess.run([sys.executable, "-m", "csprune.cli", "report", str(sweep)], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert rep.returncode == 0, rep.stderr
    assert "| magnitude | 0.50 |" in rep.stdout and "| magnitude | 0.80 |" in rep.stdout
