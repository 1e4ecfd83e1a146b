"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def single_thread():
    """Tiny problems: one thread avoids OpenMP wake-up stalls on a busy machine (restored after the test)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def an4_root() -> Path:
    """The AN4 corpus folder (``$AN4_ROOT``, default ``data/an4``); skips the test when it is
    missing, except under CI (``CI=true``), where missing data is a failure."""
    root = Path(os.environ.get("AN4_ROOT", "data/an4"))
    lists = [root / "etc" / f"an4_{split}.{kind}" for split in ("train", "test") for kind in ("fileids", "transcription")]
    if all(path.is_file() for path in lists) and (root / "wav").is_dir():
        return root
    message = f"AN4 corpus not found at '{root}': set AN4_ROOT to the corpus folder (see csprune/an4.py)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def cfg_for(*overrides: str, recipe: str = "asr"):
    """A recipe's config (``conf/<recipe>.yaml``) composed with ``overrides`` (as on the command line)."""
    import importlib

    from hydra import compose, initialize_config_dir

    importlib.import_module(f"recipes.{recipe}.run")  # registers the structured configs

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(recipe, overrides=list(overrides))


@pytest.fixture(scope="session")
def smoke_run(an4_root, tmp_path_factory):
    """One `trainer=smoke +prune=csp` run of the ASR recipe: (cfg, run folder, metrics)."""
    from recipes.asr import run as asr_run

    out = tmp_path_factory.mktemp("smoke")
    cfg = cfg_for("trainer=smoke", "+prune=csp", f"output_dir={out}", f"data.root={an4_root}",
                  f"data.cache_dir={out / 'cache'}")
    return cfg, out, asr_run.run(cfg)


@pytest.fixture(scope="session")
def uninterrupted(an4_root, tmp_path_factory):
    """The resume/fault tests' reference: the smoke recipe of tests/_asr_runs.py run without a fault.
    Returns (base folder, exported state_dict); the feature cache is ``base / "cache"``."""
    from _asr_runs import final_state, run

    base = tmp_path_factory.mktemp("resume")
    done = run(base / "full", base / "cache", an4_root)
    assert done.returncode == 0, done.stderr[-3000:]
    return base, final_state(base / "full")


# ---------------------------------------------------------------- the fault table
_FAULT_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def fault_table():
    """``record(fault, trials, detected, silently_wrong, work_lost)`` adds a row to the table printed at the end."""
    def record(fault: str, trials: int, detected: int, silently_wrong: int, work_lost: int) -> None:
        _FAULT_ROWS.append(dict(fault=fault, trials=trials, detected=detected, silently_wrong=silently_wrong, work_lost=work_lost))
    return record


def pytest_terminal_summary(terminalreporter):
    if not _FAULT_ROWS:
        return
    w = max(len(r["fault"]) for r in _FAULT_ROWS)
    tr = terminalreporter
    tr.section("fault table")
    tr.write_line(f"| {'fault':<{w}} | trials | detected | silently wrong | work lost |")
    tr.write_line(f"|{'-' * (w + 2)}|--------|----------|----------------|-----------|")
    for r in _FAULT_ROWS:
        tr.write_line(f"| {r['fault']:<{w}} | {r['trials']:>6} | {r['detected']:>8} | {r['silently_wrong']:>14} | {r['work_lost']:>9} |")
