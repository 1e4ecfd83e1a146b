"""Sweep reports: a Markdown table and a PNG plot from run folders (``csprune report``).

A *run folder* holds ``metrics.json`` (written by a recipe at the end of a run) or
at least Hydra's ``.hydra/`` (a run that started); the latter is reported as
incomplete instead of failing the report. Runs are grouped by method and
sparsity; seeds of the same cell are averaged: mean ± sample standard deviation
(n − 1), in the table and as error bars on the plot.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Sequence
from ..errors import ConfigError

__all__ = ["find_runs", "build_report", "write_report", "series", "Report", "METRICS"]

# metric key -> (label on the plot, scale for display, lower is better)
METRICS = {
    "wer": ("WER (%)", 100.0, True),
    "cer": ("CER (%)", 100.0, True),
    "pesq": ("PESQ-WB (MOS-LQO)", 1.0, False),
    "snr": ("SNR (dB)", 1.0, False),
}


@dataclass
class Report:
    runs: list[dict[str, Any]]
    incomplete: list[Path]
    primary: str
    markdown: str = ""
    cells: dict = field(default_factory=dict)


def find_runs(folders: Sequence[str | os.PathLike]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Collect run folders below ``folders``.

    Returns:
        (metrics dicts with a ``_dir`` key, run folders without metrics.json).
    """
    runs, incomplete = [], []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        for dirpath, dirnames, filenames in os.walk(folder):
            here = Path(dirpath)
            if "metrics.json" in filenames:
                try:
                    data = json.loads((here / "metrics.json").read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise ConfigError(f"{here / 'metrics.json'}: unreadable ({exc})") from exc
                data["_dir"] = str(here)
                runs.append(data)
                dirnames.clear()
            elif ".hydra" in dirnames:
                incomplete.append(here)
                dirnames.clear()
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return runs, incomplete


def _fmt(values: list[float], scale: float) -> str:
    if not values:
        return "—"
    m = mean(values) * scale
    if len(values) > 1:
        return f"{m:.2f} ± {stdev(values) * scale:.2f}"
    return f"{m:.2f}"


def build_report(folders: Sequence[str | os.PathLike]) -> Report:
    """Group runs by (method, sparsity) and render the Markdown table."""
    runs, incomplete = find_runs(folders)
    if not runs:
        raise ConfigError(f"no finished run (metrics.json) under {', '.join(map(str, folders))}")
    primary = runs[0].get("primary_metric", "wer")
    label, scale, lower_better = METRICS.get(primary, (primary, 1.0, True))
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        name = r.get("label") or r.get("method", "dense")  # recipes label non-default schedules, e.g. "csp-cubic"
        cells.setdefault((str(name), float(r.get("sparsity", 0.0))), []).append(r)
    best: dict[float, float] = {}
    for (method, s), rs in cells.items():
        vals = [r[primary] for r in rs if isinstance(r.get(primary), (int, float))]
        if vals:
            m = mean(vals)
            if s not in best or (m < best[s] if lower_better else m > best[s]):
                best[s] = m
    secondary = "cer" if primary == "wer" else "snr"
    lines = [
        f"| method | sparsity | runs | {label} | {METRICS.get(secondary, (secondary,))[0]} | checkpoint (KiB) | ratio vs dense fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, s) in sorted(cells):
        rs = cells[(method, s)]
        vals = [r[primary] for r in rs if isinstance(r.get(primary), (int, float))]
        cell = _fmt(vals, scale)
        if vals and math.isclose(mean(vals), best[s]) and len({m for (m, s2) in cells if s2 == s}) > 1:
            cell = f"**{cell}**"
        sec = _fmt([r[secondary] for r in rs if isinstance(r.get(secondary), (int, float))], METRICS.get(secondary, ("", 1.0))[1])
        size = _fmt([r["checkpoint_bytes"] / 1024 for r in rs if "checkpoint_bytes" in r], 1.0)
        ratio = _fmt([r["compression_ratio"] for r in rs if "compression_ratio" in r], 1.0)
        lines.append(f"| {method} | {s:.2f} | {len(rs)} | {cell} | {sec} | {size} | {ratio} |")
    dense = [r[f"dense_{primary}"] for r in runs if isinstance(r.get(f"dense_{primary}"), (int, float))]
    if dense:
        lines.append(f"\nDense reference {label}: {_fmt(dense, scale)} (mean over the runs' dense starts).")
    rated = [(method, s, rs) for (method, s), rs in sorted(cells.items()) if any("bitrate_real" in r for r in rs)]
    if rated:  # codec sweeps: quality is only comparable at the bitrate it was bought with
        lines += ["", f"| method | sparsity | real bitrate (kbit/s) | {label} |", "|---|---|---|---|"]
        for method, s, rs in rated:
            rates = [r["bitrate_real"] / 1000 for r in rs if isinstance(r.get("bitrate_real"), (int, float))]
            vals = [r[primary] for r in rs if isinstance(r.get(primary), (int, float))]
            lines.append(f"| {method} | {s:.2f} | {_fmt(rates, 1.0)} | {_fmt(vals, scale)} |")
    if incomplete:
        lines.append("\nIncomplete runs (no metrics.json): " + ", ".join(str(p) for p in incomplete))
    return Report(runs, incomplete, primary, "\n".join(lines) + "\n", cells)


def series(report: Report) -> dict[str, tuple[list[float], list[float], list[float], list[float]]]:
    """Per method, sorted by sparsity: (sparsities, mean primary metric, its sample std over seeds
    (0 for a single run), mean checkpoint KiB), the primary metric in display units."""
    _, scale, _ = METRICS.get(report.primary, (report.primary, 1.0, True))
    out = {}
    for method in sorted({m for m, _ in report.cells}):
        pts = sorted((s, rs) for (m, s), rs in report.cells.items() if m == method)
        xs, ys, errs, sizes = [], [], [], []
        for s, rs in pts:
            vals = [r[report.primary] for r in rs if isinstance(r.get(report.primary), (int, float))]
            xs.append(s)
            ys.append(mean(vals) * scale if vals else float("nan"))
            errs.append(stdev(vals) * scale if len(vals) > 1 else 0.0)
            kib = [r["checkpoint_bytes"] / 1024 for r in rs if "checkpoint_bytes" in r]
            sizes.append(mean(kib) if kib else float("nan"))
        out[method] = (xs, ys, errs, sizes)
    return out


def rate_points(report: Report) -> dict[str, list[tuple[float, float, float]]]:
    """Codec sweeps: per method, (real bitrate in kbit/s, primary metric in display units, sparsity) of every run
    that measured its real bitrate, and the dense models' own points under "dense"."""
    _, scale, _ = METRICS.get(report.primary, (report.primary, 1.0, True))
    out: dict[str, list[tuple[float, float, float]]] = {}
    for r in report.runs:
        if isinstance(r.get("bitrate_real"), (int, float)) and isinstance(r.get(report.primary), (int, float)):
            out.setdefault(r.get("label", r.get("method", "?")), []).append(
                (r["bitrate_real"] / 1000, r[report.primary] * scale, float(r.get("sparsity", 0.0))))
        if isinstance(r.get("dense_bitrate_real"), (int, float)) and isinstance(r.get(f"dense_{report.primary}"), (int, float)):
            point = (r["dense_bitrate_real"] / 1000, r[f"dense_{report.primary}"] * scale, 0.0)
            if point not in out.setdefault("dense", []):
                out["dense"].append(point)
    return {k: sorted(v) for k, v in out.items()}


def plot_report(report: Report, path: str | os.PathLike) -> Path:
    """Two panels: the primary metric vs sparsity (dense dashed) and checkpoint size vs sparsity; codec sweeps
    (runs with a real bitrate) get a third: the primary metric against the real bitrate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, scale, _ = METRICS.get(report.primary, (report.primary, 1.0, True))
    points = rate_points(report)
    fig, axes = plt.subplots(1, 3 if points else 2, figsize=(16.5 if points else 11, 4.2), dpi=100)
    ax_m, ax_s = axes[0], axes[1]
    markers = "osD^vP*X"
    if points:
        ax_r = axes[2]
        for i, (method, pts) in enumerate(points.items()):
            ax_r.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker=markers[i % len(markers)],
                      color="gray" if method == "dense" else None, label=method)
            for kbps, value, sparsity in pts:
                if sparsity:
                    ax_r.annotate(f"{sparsity:g}", (kbps, value), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax_r.set_xlabel("real bitrate (kbit/s, .cmrl files)")
        ax_r.set_ylabel(label)
        ax_r.set_title(f"{label} vs bitrate (labels: sparsity)")
        ax_r.grid(True, alpha=0.3)
        ax_r.legend()
    for i, (method, (xs, ys, errs, sizes)) in enumerate(series(report).items()):
        ax_m.errorbar(xs, ys, yerr=errs, marker=markers[i % len(markers)], capsize=4, label=method)
        ax_s.plot(xs, sizes, marker=markers[i % len(markers)], label=method)
    dense = [r[f"dense_{report.primary}"] for r in report.runs if isinstance(r.get(f"dense_{report.primary}"), (int, float))]
    if dense:
        ax_m.axhline(mean(dense) * scale, linestyle="--", color="gray", label="dense")
    dense_bytes = [r["dense_bytes"] for r in report.runs if "dense_bytes" in r]
    if dense_bytes:
        ax_s.axhline(mean(dense_bytes) / 1024, linestyle="--", color="gray", label="dense fp32")
    ax_m.set_xlabel("sparsity (fraction of zeros)")
    ax_m.set_ylabel(label)
    ax_m.set_title(f"{label} vs sparsity")
    ax_s.set_xlabel("sparsity (fraction of zeros)")
    ax_s.set_ylabel("checkpoint size (KiB)")
    ax_s.set_title("exported checkpoint size")
    for ax in (ax_m, ax_s):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(folders: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> Report:
    """Build the report and write ``report.md`` and ``report.png`` into ``out_dir`` (default: the first folder)."""
    report = build_report(folders)
    out = Path(out_dir or folders[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report.markdown)
    plot_report(report, out / "report.png")
    return report
