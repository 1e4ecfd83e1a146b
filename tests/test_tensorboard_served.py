"""TensorBoard served for real over a smoke run's logs, read back through its HTTP API (loopback only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def served(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    exe = Path(sys.executable).with_name("tensorboard")
    port = _free_port()
    cmd = [str(exe) if exe.exists() else shutil.which("tensorboard"), "--logdir", str(run_dir), "--host", "127.0.0.1",
           "--port", str(port), "--reload_interval", "1"]
    log = open(tmp_path / "tensorboard.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {(tmp_path / 'tensorboard.log').read_text()[-1500:]}")
            try:
                if "." in _get(base, "/data/runs") and _get(base, "/data/plugin/scalars/tags").get(".", {}).get("eval/wer"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard did not serve the run within 45 s")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # no leftover process, pass or fail
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_tensorboard_serves_scalars_hparams_histograms_images(served, smoke_run):
    _, _, metrics = smoke_run
    scalars = _get(served, "/data/plugin/scalars/tags")["."]
    for tag in ("train/loss", "finetune/loss", "eval/wer", "eval/cer", "sparsity/total", "prune/solver_iters",
                "prune/solver_gap", "prune/solver_seconds", "prune/rel_error"):
        assert tag in scalars, tag
    per_tensor = [t for t in scalars if t.startswith("sparsity/encoder.")]
    assert per_tensor
    wer = _get(served, "/data/plugin/scalars/scalars?run=.&tag=eval/wer")
    assert wer[-1][2] == pytest.approx(metrics["wer"])
    total = _get(served, "/data/plugin/scalars/scalars?run=.&tag=sparsity/total")
    assert total[-1][2] == pytest.approx(metrics["sparsity_actual"], abs=1e-6)

    experiment = _get(served, "/data/plugin/hparams/experiment", {"experimentName": ""})
    hparams = {h["name"] for h in experiment["hparamInfos"]}
    assert {"prune.method", "prune.sparsity", "model.name"} <= hparams
    metric_tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"final/wer", "final/cer", "final/compression_ratio"} <= metric_tags

    histograms = _get(served, "/data/plugin/histograms/tags")["."]
    assert any(t.startswith("weights/") for t in histograms)
    images = _get(served, "/data/plugin/images/tags")["."]
    image_tag = next(t for t in images if t.startswith("masks/"))
    entries = _get(served, f"/data/plugin/images/images?run=.&tag={urllib.request.quote(image_tag)}")
    assert entries and entries[0]["query"]
