"""Per-tensor size report of a sparse checkpoint, from its header alone (no tensor data is decoded)."""

from __future__ import annotations

import os
from typing import Any

from .coding import entropy_bound_bytes
from .format import _ITEMSIZES, read_sparse_header

__all__ = ["inspect_sparse", "format_report"]


def inspect_sparse(path: str | os.PathLike) -> dict[str, Any]:
    """Per-tensor and total sizes of a sparse checkpoint against dense fp32 and the entropy bound.

    Args:
        path: A file written by ``save_sparse``. Its header is verified; the data is not decoded (use
            ``load_sparse`` to verify the tensors' checksums).

    Returns:
        ``{"path", "format", "version", "producer", "tensors": [row, ...], "totals": {...}}``. Each row has
        ``name, shape, dtype, encoding, coding, numel, nnz, sparsity, dense_bytes`` (numel x decoded item size),
        ``stored_bytes`` (all its parts), ``mask_bytes``, ``mask_bound_bytes`` (n H(p) / 8 of its zero pattern),
        ``bound_bytes`` (mask bound + stored value bits), ``bits_per_weight`` (stored bits / numel) and, for int8,
        ``quant_max_abs`` / ``quant_snr_db``. Totals add ``header_bytes``, ``file_bytes``, ``dense_fp32_bytes``,
        ``compression_ratio_vs_fp32`` (dense fp32 bytes / file bytes), ``mask_over_bound`` and
        ``file_over_bound``. ``stored_bytes`` of the rows add up to the data bytes less the per-tensor digests
        (32 B a tensor), which like the header count only in the totals.

    Raises:
        CheckpointError: The header is unreadable, corrupt or of an unknown version.
    """
    header = read_sparse_header(path)
    rows = []
    for name, info in header.tensors.items():
        numel = info.numel
        mask_bytes = info.mask_bytes
        stored_dtype = "I8" if info.encoding in ("q8", "sparse_q8") else info.dtype
        mask_bound = entropy_bound_bytes(numel, info.nnz)
        row = {
            "name": name,
            "shape": list(info.shape),
            "dtype": info.dtype,
            "encoding": info.encoding,
            "coding": info.coding,
            "numel": numel,
            "nnz": info.nnz,
            "sparsity": 1.0 - info.nnz / numel if numel else 0.0,
            "dense_bytes": numel * _ITEMSIZES[info.dtype],
            "stored_bytes": info.stored_bytes,
            "mask_bytes": mask_bytes,
            "mask_bound_bytes": mask_bound,
            # Ideal storage: only the non-zeros' bits (at the stored value width) plus the mask bound.
            "bound_bytes": mask_bound + info.nnz * _ITEMSIZES[stored_dtype],
            "bits_per_weight": 8.0 * info.stored_bytes / numel if numel else 0.0,
        }
        if info.quant_error is not None:
            row["quant_max_abs"], row["quant_snr_db"] = info.quant_error
        rows.append(row)

    def total(key: str) -> float:
        return sum(row[key] for row in rows)

    numel = total("numel")
    file_bytes = header.file_size
    totals = {
        "tensors": len(rows),
        "numel": numel,
        "nnz": total("nnz"),
        "sparsity": 1.0 - total("nnz") / numel if numel else 0.0,
        "dense_bytes": total("dense_bytes"),
        "dense_fp32_bytes": 4 * numel,
        "stored_bytes": total("stored_bytes"),
        "header_bytes": header.data_start,
        "file_bytes": file_bytes,
        "mask_bytes": total("mask_bytes"),
        "mask_bound_bytes": total("mask_bound_bytes"),
        "bound_bytes": total("bound_bytes"),
        "bits_per_weight": 8.0 * file_bytes / numel if numel else 0.0,
        "compression_ratio_vs_fp32": 4 * numel / file_bytes,
    }
    masked_bound = sum(row["mask_bound_bytes"] for row in rows if row["mask_bytes"])
    totals["mask_over_bound"] = totals["mask_bytes"] / masked_bound if masked_bound else None
    totals["file_over_bound"] = file_bytes / totals["bound_bytes"] if totals["bound_bytes"] else None
    return {
        "path": str(path),
        "format": header.metadata["format"],
        "version": header.metadata["version"],
        "producer": header.metadata.get("producer"),
        "tensors": rows,
        "totals": totals,
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_report(report: dict[str, Any]) -> str:
    """The ``inspect_sparse`` report as a fixed-width text table with totals."""
    header = ("tensor", "shape", "enc", "sparsity", "dense B", "stored B", "bits/w", "bound B", "int8 err")
    lines = []
    for row in report["tensors"]:
        err = f"{row['quant_max_abs']:.3g}/{row['quant_snr_db']}dB" if "quant_max_abs" in row else ""
        enc = row["encoding"] + (f":{row['coding']}" if row["coding"] else "")
        lines.append((
            row["name"], "x".join(map(str, row["shape"])) or "()", enc, f"{row['sparsity']:.3f}",
            str(row["dense_bytes"]), str(row["stored_bytes"]), f"{row['bits_per_weight']:.3f}",
            f"{row['bound_bytes']:.0f}", err,
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    t = report["totals"]
    out.append("")
    out.append(
        f"{t['tensors']} tensors, {t['numel']} weights, sparsity {t['sparsity']:.4f}; "
        f"file {_human(t['file_bytes'])} ({t['file_bytes']} B, header {t['header_bytes']} B), "
        f"{t['bits_per_weight']:.3f} bits/weight"
    )
    mask_ratio = f"{t['mask_over_bound']:.4f}" if t["mask_over_bound"] is not None else "n/a"
    file_ratio = f"{t['file_over_bound']:.4f}" if t["file_over_bound"] is not None else "n/a"
    out.append(
        f"dense fp32 {_human(t['dense_fp32_bytes'])}: compression ratio {t['compression_ratio_vs_fp32']:.2f}x; "
        f"mask / entropy bound {mask_ratio}; file / (mask bound + value bits) {file_ratio}"
    )
    return "\n".join(out)
