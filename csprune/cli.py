"""``csprune`` command line: ``inspect``, ``export`` and ``report`` (each subcommand registers itself with ``add_*``).

Errors print one line, ``csprune: error: ...``, on stderr and exit with status 1 (argparse usage errors: 2).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import CsPruneError

__all__ = ["main", "build_parser"]


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:
        from importlib import metadata

        return metadata.version("csprune")


def _run_inspect(args: argparse.Namespace) -> int:
    from .export import format_report, inspect_sparse

    report = inspect_sparse(args.path)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def add_inspect(subparsers: Any) -> None:
    parser = subparsers.add_parser("inspect", help="per-tensor size report of a sparse checkpoint")
    parser.add_argument("path", help="a .safetensors file written by csprune")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_run_inspect)


def _training_state_dict(path: str) -> dict[str, Any]:
    """The state_dict inside a ``torch.save``d training checkpoint, loaded with ``weights_only=True``."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CsPruneError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CsPruneError(
            f"{path}: not loadable with torch.load(weights_only=True) (only tensors and primitives are "
            f"accepted; nothing else is unpickled): {first_line}"
        ) from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise CsPruneError(f"{path}: expected a state_dict or a dict with a 'model' state_dict")
    not_tensors = [str(key) for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CsPruneError(f"{path}: not a state_dict: entries {not_tensors[:5]} are not tensors")
    return checkpoint


def _run_export(args: argparse.Namespace) -> int:
    from .export import inspect_sparse, save_sparse

    meta = None
    if args.meta is not None:
        try:
            with open(args.meta, encoding="utf-8") as handle:
                meta = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise CsPruneError(f"{args.meta}: cannot read meta JSON: {exc}") from None
    state = _training_state_dict(args.checkpoint)
    try:
        save_sparse(state, args.out, values_dtype=args.values_dtype, meta=meta)
    except (TypeError, ValueError) as exc:
        raise CsPruneError(f"{args.checkpoint}: {exc}") from None
    totals = inspect_sparse(args.out)["totals"]
    print(
        f"wrote {args.out}: {totals['file_bytes']} bytes, {totals['tensors']} tensors, sparsity "
        f"{totals['sparsity']:.4f}, {totals['compression_ratio_vs_fp32']:.2f}x smaller than dense fp32"
    )
    return 0


def add_export(subparsers: Any) -> None:
    parser = subparsers.add_parser("export", help="turn a training checkpoint / state_dict into a sparse checkpoint")
    parser.add_argument("checkpoint", help="torch.save'd state_dict, or a dict with a 'model' state_dict")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument(
        "--values-dtype", choices=["float32", "float16", "bfloat16", "int8"], default=None,
        help="store floating weights in this dtype (default: keep each tensor's dtype, bit-exact)",
    )
    parser.add_argument("--meta", default=None, help="JSON file stored as the checkpoint's user metadata")
    parser.set_defaults(func=_run_export)


def _run_report(args: argparse.Namespace) -> int:
    from .train.report import write_report

    try:
        report = write_report(args.folders, args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise CsPruneError(str(exc)) from None
    out = args.out or args.folders[0]
    print(report.markdown, end="")
    print(f"wrote {out}/report.md and {out}/report.png ({len(report.runs)} runs, {len(report.incomplete)} incomplete)")
    return 0


def add_report(subparsers: Any) -> None:
    parser = subparsers.add_parser("report", help="Markdown table and PNG plot of a sweep (or any folders of runs)")
    parser.add_argument("folders", nargs="+", help="multirun folders or run folders (each run holds metrics.json)")
    parser.add_argument("--out", default=None, help="where to write report.md and report.png (default: the first folder)")
    parser.set_defaults(func=_run_report)


# One registration function per subcommand.
SUBCOMMANDS: list[Callable[[Any], None]] = [add_inspect, add_export, add_report]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csprune", description="csprune: compressed-sensing pruning tools")
    parser.add_argument("--version", action="version", version=f"csprune {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: parse ``argv`` (default ``sys.argv[1:]``), run, return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CsPruneError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"csprune: error: {message}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
