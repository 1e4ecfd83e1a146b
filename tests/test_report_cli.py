"""`csprune report` and the CLI's help, tested the way a person uses them."""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from csprune.cli import build_parser, main


def _run(folder: Path, method: str, sparsity: float, wer: float, size: int, seed: int = 0):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / "metrics.json").write_text(json.dumps({
        "method": method, "sparsity": sparsity, "wer": wer, "cer": wer / 3, "seed": seed, "dense_wer": 0.2,
        "checkpoint_bytes": size, "dense_bytes": 4000, "compression_ratio": 4000 / size, "primary_metric": "wer"}))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_complete_and_incomplete_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _run(sweep / "0", "csp", 0.5, 0.25, 2000)
    _run(sweep / "1", "gmp", 0.5, 0.30, 2100)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # started, never finished
    assert main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert str(sweep / "2") in out and "Incomplete" in out
    md = (sweep / "report.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("| csp") or l.startswith("| gmp")]
    assert lines[0].startswith("| csp") and "**25.00**" in lines[0]  # sorted by method; best WER per sparsity in bold
    assert "**" not in lines[1]
    assert _png_size(sweep / "report.png") == (1100, 420)


def test_report_merges_several_sweeps_and_averages_seeds(tmp_path):
    _run(tmp_path / "a" / "0", "csp", 0.9, 0.40, 900, seed=0)
    _run(tmp_path / "b" / "0", "csp", 0.9, 0.50, 900, seed=1)
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| csp | 0.90 | 2 | 45.00 ± 7.07 |" in md  # sample std of {40, 50}: sqrt(50)


def test_report_error_bars_are_the_seed_std_of_each_cell(tmp_path):
    from csprune.train.report import build_report, series

    for seed, wer in enumerate((0.40, 0.50, 0.45)):
        _run(tmp_path / f"s{seed}", "csp", 0.9, wer, 900, seed=seed)
    _run(tmp_path / "single", "csp", 0.5, 0.30, 2000)
    xs, ys, errs, sizes = series(build_report([tmp_path]))["csp"]
    assert xs == [0.5, 0.9] and ys[0] == pytest.approx(30.0) and ys[1] == pytest.approx(45.0)
    assert errs == [0.0, pytest.approx(5.0)]  # one run: no bar; {40, 50, 45}: sample std 5
    assert sizes[1] == pytest.approx(900 / 1024)


def test_report_on_nothing_is_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "csprune.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "no finished run" in done.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    names = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names.append(action.option_strings[-1] if action.option_strings else action.dest)
    return names


def test_every_help_lists_every_option():
    parser = build_parser()
    commands = {"": parser, **_subparsers(parser)}
    assert {"inspect", "export", "report"} <= set(commands)
    for name, sub in commands.items():
        argv = ([name] if name else []) + ["--help"]
        done = subprocess.run([sys.executable, "-m", "csprune.cli", *argv], capture_output=True, text=True)
        assert done.returncode == 0, name
        for option in _option_names(sub):
            assert option in done.stdout, (name, option)
        for action in sub._actions:
            if action.help is None and not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                pytest.fail(f"{name}: {action.dest} has no help text")
    for name in _subparsers(parser):
        assert name in subprocess.run([sys.executable, "-m", "csprune.cli", "--help"], capture_output=True, text=True).stdout


def test_version():
    done = subprocess.run([sys.executable, "-m", "csprune.cli", "--version"], capture_output=True, text=True)
    import csprune

    assert done.returncode == 0 and done.stdout.strip() == f"csprune {csprune.__version__}"
