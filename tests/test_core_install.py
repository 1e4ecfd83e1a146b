"""The core install alone (``pip install csprune``, no extras) runs the README's Python quick start.

A fresh venv gets the package without extras (torch comes from the machine's wheel cache); the
README's first ``python`` block runs in it with a tiny model standing in for ``MyModel``/``loader``,
and the recipes' dependencies (hydra, tensorboard, pesq) are not importable there. The install's size
and time are printed (the closing note of issue #13 compares them with the full install).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


from conftest import REPO

PRELUDE = '''
import torch
from torch import nn

class MyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(x))

gen = torch.Generator().manual_seed(0)
loader = [torch.randn(8, 16, generator=gen) for _ in range(250)]
calib_inputs = [torch.randn(8, 16, generator=gen) for _ in range(4)]

def task_loss(model, batch):
    return model(batch).pow(2).mean()
'''

CHECKS = '''
zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.startswith("encoder") and n.endswith("weight"))
assert zeros > 0.5 * (16 * 32 + 32 * 16), zeros
import importlib.util
missing = [m for m in ("hydra", "tensorboard", "pesq", "matplotlib", "soundfile") if importlib.util.find_spec(m) is None]
print("not importable:", " ".join(missing))
'''


def _readme_quick_start() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quick start (Python API)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_core_install_runs_the_quick_start_without_the_recipe_dependencies(tmp_path):
    # Install from a copy: an in-tree build would leave build/ and *.egg-info in the working tree.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "build", "*.egg-info",
                                                             "api", "__pycache__", "data"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    start = time.perf_counter()
    done = subprocess.run([str(py), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PIP_NO_CACHE_DIR="1"))
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    script = tmp_path / "quick_start.py"
    script.write_text(PRELUDE + _readme_quick_start() + CHECKS)
    run = subprocess.run([str(py), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "not importable: hydra tensorboard pesq matplotlib soundfile" in run.stdout, run.stdout
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    site = next((venv / "lib").glob("python*/site-packages"))
    print(f"\ncore install: {seconds:.0f} s, {_du(site) / 2**20:.0f} MiB in site-packages")
