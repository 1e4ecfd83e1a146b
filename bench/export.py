"""Sparse checkpoint size and load time on two shapes of model, side by side in one run.

Models: ``conformer`` (a 7.8M-parameter torchaudio Conformer + CTC head: 530 tensors, most of them small biases and
norms -- the header-bound case) and ``mlp`` (four 1536x1536 Linear layers: few large tensors -- the data-bound case).
For each sparsity (50/70/90/95%), the model pruned per layer by ``csprune.prune_once(model, Magnitude(), sparsity=s)``
is written three ways and measured:

- dense ``torch.save`` of the state_dict;
- packed bitmask + values, one safetensors file (the compressed-tensors "sparse-bitmask" layout);
- ``csprune.save_sparse``.

Printed ratios (goals in brackets): stored mask bytes / (n H(p) / 8) per tensor (worst) and in total [<= 1.02,
+16 B a tensor allowed]; whole csprune file / (mask bound + raw value bits) [<= 1.03]; ``load_sparse`` time /
``torch.load`` time of the dense state_dict, medians of interleaved repeats [<= 1.0]; the same for
``load_sparse(verify="full")`` (also hashes every decoded tensor), for information.

    python bench/export.py [--models conformer,mlp] [--sparsities 0.5,0.7,0.9,0.95] [--repeats 9]
                           [--values-dtype float32] [--layers 16]
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


class MLP(torch.nn.Sequential):
    """Few large tensors: four 1536x1536 Linear layers (9.4M parameters, 8 tensors)."""

    def __init__(self, width: int = 1536, depth: int = 4) -> None:
        super().__init__(*[torch.nn.Linear(width, width) for _ in range(depth)])


def build_model(kind: str, args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    return (ConformerCTC(num_layers=args.layers) if kind == "conformer" else MLP()).eval()


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


def run_one(kind: str, sparsity: float, args: argparse.Namespace, workdir: str) -> dict[str, float]:
    import csprune

    model = build_model(kind, args)
    csprune.prune_once(model, csprune.methods.Magnitude(), sparsity=sparsity)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    # The engine writes +0.0 at pruned positions; -0.0 would still round-trip, at ~1 bit per zero.
    negative_zeros = sum(int(((t == 0) & t.signbit()).sum()) for t in state.values() if t.is_floating_point())

    dense_path = os.path.join(workdir, f"{kind}_dense_{sparsity}.pt")
    bitmask_path = os.path.join(workdir, f"{kind}_bitmask_{sparsity}.safetensors")
    sparse_path = os.path.join(workdir, f"{kind}_csprune_{sparsity}.safetensors")
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

    dense_times, sparse_times, full_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so machine load affects all alike
        dense_times.append(timed(torch.load, dense_path, weights_only=True))
        sparse_times.append(timed(load_sparse, sparse_path))
        full_times.append(timed(load_sparse, sparse_path, verify="full"))
    codings = {}
    for row in masked:
        codings[row["coding"]] = codings.get(row["coding"], 0) + 1
    return {
        "model": kind,
        "sparsity": sparsity,
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
        "load_ratio": statistics.median(s / d for s, d in zip(sparse_times, dense_times)),
        "full_ratio": statistics.median(f / d for f, d in zip(full_times, dense_times)),
        "save_s": save_time,
        "codings": codings,
        "params": totals["numel"],
        "tensors": totals["tensors"],
        "negative_zeros": negative_zeros,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="conformer,mlp")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9,0.95")
    parser.add_argument("--repeats", type=int, default=9, help="load-time repeats (median); 9 damps a busy machine")
    parser.add_argument("--values-dtype", default=None, choices=["float32", "float16", "bfloat16", "int8"])
    parser.add_argument("--layers", type=int, default=16, help="16 = the Conformer-sized model of the issue")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, values_dtype={args.values_dtype}; "
          "pruned per layer by csprune.prune_once(Magnitude)")
    print("load ratio = median over interleaved repeats of load_sparse time / torch.load time (dense state_dict)")
    with tempfile.TemporaryDirectory() as workdir:
        for kind in args.models.split(","):
            results = [run_one(kind, float(s), args, workdir) for s in args.sparsities.split(",")]
            r0 = results[0]
            print(f"\n{kind}: {r0['params']:,} params in {r0['tensors']} tensors; "
                  f"negative zeros left by the pruner: {[r['negative_zeros'] for r in results]}")
            print(
                f"{'sparsity':>8} {'torch.save':>11} {'bitmask+val':>11} {'csprune':>10} {'header':>7} "
                f"{'mask/H tot':>10} {'mask/H worst':>12} {'file/bound':>10} {'load pt ms':>10} {'load cs ms':>10} "
                f"{'load ratio':>10} {'full ratio':>10}  codings"
            )
            for r in results:
                print(
                    f"{r['sparsity']:>8.2f} {r['dense_pt']:>11,} {r['bitmask']:>11,} {r['csprune']:>10,} "
                    f"{r['header']:>7,} {r['mask_total']:>10.4f} {r['mask_worst']:>12.4f} {r['file_over_bound']:>10.4f} "
                    f"{r['load_dense_ms']:>10.1f} {r['load_sparse_ms']:>10.1f} {r['load_ratio']:>10.3f} "
                    f"{r['full_ratio']:>10.3f}  {r['codings']}"
                )
                if r["over_allowance"]:
                    print(f"         masks above 1.02 x bound + 16 B: {r['over_allowance']}")
    print("\ngoals: mask/H <= 1.02 (+16 B a tensor), file/bound <= 1.03, load ratio <= 1.0")


if __name__ == "__main__":
    main()
