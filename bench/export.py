"""Sparse checkpoint size and load time on a Conformer-sized model, side by side in one run.

For each sparsity (50/70/90/95%), one model pruned by the engine (falls back to torch.nn.utils.prune, per layer
L1, when the engine is not importable) is written three ways and measured:

- dense ``torch.save`` of the state_dict;
- packed bitmask + values, one safetensors file (the compressed-tensors "sparse-bitmask" layout);
- ``csprune.save_sparse``.

Printed ratios (goals in brackets): stored mask bytes / (n H(p) / 8) per tensor (worst) and in total [<= 1.02,
+16 B a tensor allowed]; whole csprune file / (mask bound + raw value bits) [<= 1.03]; ``load_sparse`` time /
``torch.load`` time of the dense state_dict, medians of interleaved repeats [<= 1.0].

    python bench/export.py [--sparsities 0.5,0.7,0.9,0.95] [--repeats 9] [--values-dtype float32] [--layers 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchaudio
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from csprune.export import inspect_sparse, load_sparse, save_sparse


class ConformerCTC(torch.nn.Module):
    """torchaudio Conformer encoder + linear CTC head: ~10M parameters with the default sizes."""

    def __init__(self, num_layers: int = 16, vocab: int = 32) -> None:
        super().__init__()
        self.encoder = torchaudio.models.Conformer(
            input_dim=144, num_heads=4, ffn_dim=576, num_layers=num_layers, depthwise_conv_kernel_size=31
        )
        self.head = torch.nn.Linear(144, vocab)


def prune_model(model: torch.nn.Module, sparsity: float) -> str:
    """Prune ``model`` in place to ``sparsity`` per layer; returns which pruner did it."""
    try:  # the engine; the only line to change when its API moves
        import csprune

        csprune.prune_once(model, csprune.methods.Magnitude(), sparsity=sparsity)
        return "csprune.prune_once(Magnitude)"
    except (ImportError, AttributeError, NotImplementedError) as exc:
        fallback = f"torch.nn.utils.prune l1_unstructured (engine unavailable: {type(exc).__name__})"
    from torch.nn.utils import prune

    for module in model.modules():
        names = []
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
            names.append("weight")
        if isinstance(module, torch.nn.MultiheadAttention) and module.in_proj_weight is not None:
            names.append("in_proj_weight")
        for name in names:
            prune.l1_unstructured(module, name, amount=sparsity)
            prune.remove(module, name)
    return fallback


def bitmask_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """compressed-tensors style: tensors with zeros as packed bitmask + values; others dense."""
    out = {}
    for name, tensor in state.items():
        flat = tensor.reshape(-1)
        mask = flat != 0
        if tensor.is_floating_point() and tensor.dim() >= 2 and not bool(mask.all()):
            out[f"{name}.bitmask"] = torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
            out[f"{name}.values"] = flat[mask].contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def run_one(sparsity: float, args: argparse.Namespace, workdir: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = ConformerCTC(num_layers=args.layers).eval()
    pruner = prune_model(model, sparsity)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    # `w * mask` pruning leaves -0.0 at every negative pruned weight; bit-exact storage would have to keep those
    # signs (~1 bit per zero). -0.0 + 0.0 == +0.0, so this canonicalizes them without touching other values.
    negative_zeros = sum(int(((t == 0) & t.signbit()).sum()) for t in state.values() if t.is_floating_point())
    if args.canonical_zeros:
        state = {name: t + 0.0 if t.is_floating_point() else t for name, t in state.items()}

    dense_path = os.path.join(workdir, f"dense_{sparsity}.pt")
    bitmask_path = os.path.join(workdir, f"bitmask_{sparsity}.safetensors")
    sparse_path = os.path.join(workdir, f"csprune_{sparsity}.safetensors")
    torch.save(state, dense_path)
    save_file(bitmask_layout(state), bitmask_path)
    save_time = timed(save_sparse, state, sparse_path, values_dtype=args.values_dtype)

    loaded = load_sparse(sparse_path)
    if args.values_dtype in (None, "float32"):
        for name, tensor in state.items():
            assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name

    report = inspect_sparse(sparse_path)
    masked = [row for row in report["tensors"] if row["mask_bytes"]]
    worst = max(masked, key=lambda row: row["mask_bytes"] / row["mask_bound_bytes"])
    over_allowance = [r["name"] for r in masked if r["mask_bytes"] > 1.02 * r["mask_bound_bytes"] + 16]
    totals = report["totals"]

    dense_times, sparse_times = [], []
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        dense_times.append(timed(torch.load, dense_path, weights_only=True))
        sparse_times.append(timed(load_sparse, sparse_path))
    codings = {}
    for row in masked:
        codings[row["coding"]] = codings.get(row["coding"], 0) + 1
    return {
        "sparsity": sparsity,
        "pruner": pruner,
        "dense_pt": os.path.getsize(dense_path),
        "bitmask": os.path.getsize(bitmask_path),
        "csprune": totals["file_bytes"],
        "header": totals["header_bytes"],
        "mask_total": totals["mask_over_bound"],
        "mask_worst": worst["mask_bytes"] / worst["mask_bound_bytes"],
        "mask_worst_name": worst["name"],
        "over_allowance": over_allowance,
        "file_over_bound": totals["file_over_bound"],
        "load_dense_ms": 1e3 * statistics.median(dense_times),
        "load_sparse_ms": 1e3 * statistics.median(sparse_times),
        "save_s": save_time,
        "codings": codings,
        "params": totals["numel"],
        "tensors": totals["tensors"],
        "negative_zeros": negative_zeros,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.5,0.7,0.9,0.95")
    parser.add_argument("--repeats", type=int, default=9, help="load-time repeats (median); 9 damps a busy machine")
    parser.add_argument("--values-dtype", default=None, choices=["float32", "float16", "bfloat16", "int8"])
    parser.add_argument(
        "--keep-negative-zeros", dest="canonical_zeros", action="store_false",
        help="save the pruner's -0.0 as they are (costs ~1 bit per zero) instead of canonicalizing them to +0.0",
    )
    parser.add_argument("--layers", type=int, default=16, help="16 = the Conformer-sized model of the issue")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, values_dtype={args.values_dtype}")
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_one(float(s), args, workdir) for s in args.sparsities.split(",")]
    r0 = results[0]
    print(f"model: {r0['params']:,} params in {r0['tensors']} tensors; pruned by {r0['pruner']}")
    print(
        f"pruner left {[r['negative_zeros'] for r in results]} negative zeros; "
        + ("canonicalized to +0.0 before saving" if args.canonical_zeros else "saved as they are")
    )
    print(
        f"{'sparsity':>8} {'torch.save':>11} {'bitmask+val':>11} {'csprune':>10} {'header':>7} "
        f"{'mask/H tot':>10} {'mask/H worst':>12} {'file/bound':>10} {'load pt ms':>10} {'load cs ms':>10} "
        f"{'load ratio':>10}  codings"
    )
    for r in results:
        print(
            f"{r['sparsity']:>8.2f} {r['dense_pt']:>11,} {r['bitmask']:>11,} {r['csprune']:>10,} {r['header']:>7,} "
            f"{r['mask_total']:>10.4f} {r['mask_worst']:>12.4f} {r['file_over_bound']:>10.4f} "
            f"{r['load_dense_ms']:>10.1f} {r['load_sparse_ms']:>10.1f} "
            f"{r['load_sparse_ms'] / r['load_dense_ms']:>10.3f}  {r['codings']}"
        )
        if r["over_allowance"]:
            print(f"         masks above 1.02 x bound + 16 B: {r['over_allowance']}")
    print("goals: mask/H <= 1.02 (+16 B a tensor), file/bound <= 1.03, load ratio <= 1.0")


if __name__ == "__main__":
    main()
