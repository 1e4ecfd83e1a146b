"""Fault injection for ``save_sparse`` (csprune/export/format.py): an export cut short never leaves half a file.

``save_sparse`` writes a temp file beside the destination, fsyncs it and renames it over the destination. So:

* a write that fails midway (full disk: ENOSPC; ``ulimit -f``: EFBIG) raises ``WriteError`` -- a ``CsPruneError``
  and an ``OSError`` with the original errno -- naming the destination; the destination is the previous file,
  byte-identical, or absent, and the temp file is removed;
* a SIGKILL in the middle of the write leaves the previous file or none under the destination's name, never a
  partial one (the temp file, a dotfile beside it, is all that can remain, and the next export still succeeds).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from csprune.errors import CsPruneError, WriteError
from csprune.export import load_sparse, read_sparse_header, save_sparse

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults

NAME = "model.safetensors"


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A small pruned state dict (~40 KB on disk: several entries, so the write is several calls)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, shape in enumerate([(96, 64), (64,), (32, 96), (8, 3, 5, 5), (4096,)]):
        tensor = torch.randn(shape, generator=generator)
        tensor[torch.rand(shape, generator=generator) < 0.5] = 0
        state[f"layer{i}.weight"] = tensor
    return state


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class _FailingFile:
    """A file object that writes ``budget`` bytes for real, then fails like a full disk."""

    def __init__(self, real, budget: list[int], code: int) -> None:
        self._real, self._budget, self._code = real, budget, code

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        room = self._budget[0]
        if view.nbytes > room:
            self._real.write(view[:room])
            self._real.flush()  # the partial bytes really are in the temp file
            self._budget[0] = 0
            raise OSError(self._code, os.strerror(self._code))
        self._budget[0] -= view.nbytes
        return self._real.write(view)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._real.close()


def _fail_after(monkeypatch, folder: Path, budget: int, code: int = errno.ENOSPC) -> list[Path]:
    """Make files opened with ``os.fdopen`` in ``folder`` fail after ``budget`` bytes; returns the temp paths seen."""
    real_fdopen, seen = os.fdopen, []

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        target = Path(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists(f"/proc/self/fd/{fd}") else None
        if "w" in mode and target is not None and target.parent == folder:
            seen.append(target)
            return _FailingFile(handle, [budget], code)
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    return seen


@pytest.fixture(scope="module")
def sizes(tmp_path_factory) -> dict[str, int]:
    folder = tmp_path_factory.mktemp("ref")
    save_sparse(_state(0), folder / "new.safetensors")
    save_sparse(_state(1), folder / "old.safetensors")
    return {"new": (folder / "new.safetensors").stat().st_size, "old": (folder / "old.safetensors").stat().st_size}


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous-file", "previous-file"])
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.999], ids=["at-0", "in-header", "halfway", "last-bytes"])
def test_a_write_failing_midway_names_the_path_and_leaves_no_half_file(tmp_path, monkeypatch, sizes, previous,
                                                                      fraction, fault_table):
    path = tmp_path / NAME
    if previous:
        save_sparse(_state(1), path)
    before = path.read_bytes() if previous else None
    budget = int(fraction * sizes["new"])
    seen = _fail_after(monkeypatch, tmp_path, budget)
    with pytest.raises(WriteError) as info:
        save_sparse(_state(0), path)
    monkeypatch.undo()
    error = info.value
    assert seen, "the fault was not injected (save_sparse no longer writes through os.fdopen?)"
    assert isinstance(error, CsPruneError) and isinstance(error, OSError)
    assert error.errno == errno.ENOSPC and error.path == str(path)
    assert str(path) in str(error) and "No space left on device" in str(error), str(error)
    assert ("previous file is intact" if previous else "no file was created") in str(error), str(error)
    assert error.__cause__ is not None and getattr(error.__cause__, "errno", None) == errno.ENOSPC  # the original
    if previous:
        assert path.read_bytes() == before  # byte-identical
        load_sparse(path)
    else:
        assert not path.exists()
    assert _listing(tmp_path) == ([NAME] if previous else [])  # the temp file was removed
    assert not any(p.exists() for p in seen)
    fault_table(f"full disk (ENOSPC) mid-export at {fraction:.1%}{', over a previous file' if previous else ''}", 1, 1, 0, 0)


def _child(code: str, timeout: float = 120, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_file_size_limit_midway_names_the_path_and_leaves_no_half_file(tmp_path, sizes, fault_table):
    """``ulimit -f`` (RLIMIT_FSIZE) with SIGXFSZ ignored: the kernel refuses the write past the limit (EFBIG)."""
    (tmp_path / "fresh").mkdir()
    (tmp_path / "over").mkdir()
    save_sparse(_state(1), tmp_path / "over" / NAME)
    before = (tmp_path / "over" / NAME).read_bytes()
    limit = sizes["new"] // 2
    child = _child(f"""
        import json, resource, signal, sys
        import test_faults_export as t
        from csprune.export import save_sparse
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        out = []
        for folder in ("fresh", "over"):
            try:
                save_sparse(t._state(0), {str(tmp_path)!r} + "/" + folder + "/{NAME}")
                out.append(None)
            except Exception as error:
                out.append([type(error).__name__, str(error), getattr(error, "errno", None),
                            isinstance(error, OSError)])
        print(json.dumps(out))
    """, cwd=str(REPO / "tests"))
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr[-3000:]
    results = json.loads(stdout.strip().splitlines()[-1])
    for folder, result in zip(("fresh", "over"), results):
        path = tmp_path / folder / NAME
        assert result is not None, f"{folder}: a {sizes['new']}-byte export under a {limit}-byte limit succeeded"
        kind, message, code, is_os_error = result
        assert kind == "WriteError" and code == errno.EFBIG and is_os_error, result
        assert str(path) in message and "File too large" in message, message
    assert _listing(tmp_path / "fresh") == []
    assert _listing(tmp_path / "over") == [NAME] and (tmp_path / "over" / NAME).read_bytes() == before
    fault_table("ulimit -f mid-export (fresh, over a previous file)", 2, 2, 0, 0)


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous-file", "previous-file"])
def test_sigkill_midway_leaves_the_old_file_or_none(tmp_path, sizes, previous, fault_table):
    path = tmp_path / NAME
    if previous:
        save_sparse(_state(1), path)
    before = path.read_bytes() if previous else None
    half = sizes["new"] // 2
    # The child writes half of the file (really: flushed and fsynced into the temp file), says so, and hangs there
    # until it is killed; no polling race: the kill comes after the half is on disk.
    child = _child(f"""
        import os, sys, time
        import test_faults_export as t
        from csprune.export import save_sparse
        real_fdopen, written = os.fdopen, [0]

        class Hanging:
            def __init__(self, real):
                self.real = real
            def write(self, data):
                view = memoryview(data).cast("B")
                if written[0] + view.nbytes >= {half}:
                    self.real.write(view[: {half} - written[0]])
                    self.real.flush()
                    os.fsync(self.real.fileno())
                    print("HALF", os.readlink("/proc/self/fd/%d" % self.real.fileno()), flush=True)
                    time.sleep(600)
                written[0] += view.nbytes
                return self.real.write(view)
            def __getattr__(self, name):
                return getattr(self.real, name)
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                self.real.close()

        os.fdopen = lambda fd, mode="r", *a, **k: Hanging(real_fdopen(fd, mode, *a, **k)) if "w" in mode else \\
            real_fdopen(fd, mode, *a, **k)
        save_sparse(t._state(0), {str(path)!r})
        print("DONE", flush=True)
    """, cwd=str(REPO / "tests"))
    try:
        line = child.stdout.readline()
        assert line.startswith("HALF "), (line, child.stderr.read() if child.poll() is not None else "")
        temp = Path(line.split(" ", 1)[1].strip())
        assert temp.parent == tmp_path and temp != path and 0 < temp.stat().st_size < sizes["new"]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    if previous:
        assert path.read_bytes() == before  # the old file, byte-identical, never a partial new one
        read_sparse_header(path)
    else:
        assert not path.exists()
    # All that can remain is the hidden temp file beside it ...
    leftovers = [name for name in _listing(tmp_path) if name != NAME]
    assert all(name.startswith(f".{NAME}.") and name.endswith(".tmp") for name in leftovers), leftovers
    # ... and the next export goes through.
    save_sparse(_state(0), path)
    assert path.stat().st_size == sizes["new"]
    load_sparse(path)
    # A kill is not "detected" (nothing runs to see it); what counts is that no half file stands under the name.
    fault_table(f"SIGKILL mid-export{' over a previous file' if previous else ''}", 1, 1, 0, 0)
