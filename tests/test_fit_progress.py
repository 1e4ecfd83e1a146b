"""fit's progress lines: a log file (not a terminal) shows each stage's step count and an ETA."""

from __future__ import annotations

import re
import time

import torch

from csprune.train.loop import FitConfig, fit


def test_progress_lines_carry_an_eta(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = [torch.randn(8, 4) for _ in range(5)]

    def loss_fn(m, batch):
        time.sleep(0.004)  # some work per step, so the ETA is not 0
        return m(batch).pow(2).mean()

    fit(model, lambda epoch: batches, loss_fn, opt, None, FitConfig(epochs=4, stage="warm", progress_every_s=1e-6))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warm: step")]
    assert len(lines) >= 15
    steps = [int(re.match(r"warm: step (\d+)/20 \((\d+)%\), .* elapsed, ETA (\d+)m(\d+)s", line).group(1)) for line in lines]
    assert steps == sorted(steps) and steps[-1] == 20
    assert lines[-1].endswith("ETA 0m00s")
