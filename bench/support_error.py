"""Relative output error of pruned layers fed with real AN4 features (issue #2, docs/design.md §3).

For each layer and sparsity, every method prunes the same weights using Gram
statistics from AN4 *train* frames; the error ‖X(W − Ŵ)‖²/‖XW‖² is measured on
held-out AN4 *test* frames.

    AN4_ROOT=../shared/data/an4 .venv/bin/python bench/support_error.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import csprune
from csprune.methods import CSP, Magnitude, Wanda

from _an4 import fbank_frames


def methods(include_slow: bool):
    out = {
        "magnitude": Magnitude(),
        "magnitude+refit": Magnitude(refit=True),
        "wanda+refit": Wanda(refit=True),
        "csp-omp": CSP(solver="omp"),
    }
    if include_slow:  # per-row bisection on λ: minutes per layer, so only on the small layer
        out["csp-fista"] = CSP(solver="fista")
        out["csp-sklearn"] = CSP(solver="sklearn")
        out["csp-cvxpy"] = CSP(solver="cvxpy")
    return out


def rel_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer utterances and no reference solvers")
    ap.add_argument("--train-utts", type=int, default=128, help="utterances for the Gram (docs/design.md §3 used 128)")
    args = ap.parse_args()
    n_train = 24 if args.quick else args.train_utts
    torch.manual_seed(0)
    # (label, context frames, output rows, hidden width): hidden > 0 feeds the layer relu(X·R) of a fixed random
    # projection R, a stand-in for a hidden layer whose input dims have very different norms.
    layers = [("64x240 (fbank ±1 frame)", 1, 64, 0), ("256x512 (hidden, fbank ±4)", 4, 256, 512)]
    sparsities = (0.5, 0.7, 0.9)
    table = []
    for label, context, out_dim, hidden in layers:
        x_train = fbank_frames("train", n_train, context)
        x_test = fbank_frames("test", 32 if args.quick else 130, context)
        if hidden:
            proj = torch.randn(x_train.shape[1], hidden, generator=torch.Generator().manual_seed(1)) / x_train.shape[1] ** 0.5
            x_train, x_test = torch.relu(x_train @ proj), torch.relu(x_test @ proj)
        n = x_train.shape[1]
        base = nn.Linear(n, out_dim, bias=False)
        calib = [(chunk,) for chunk in x_train.split(4096)]
        ms = methods(include_slow=not args.quick and n <= 240)
        for s in sparsities:
            row = {"layer": label, "sparsity": s}
            for name, method in ms.items():
                layer = copy.deepcopy(base)
                t0 = time.perf_counter()
                csprune.prune_once(layer, method, sparsity=s, calib=calib, scope="row")
                row[name] = (rel_error(x_test, base.weight.detach(), layer.weight.detach()), time.perf_counter() - t0)
            table.append(row)
            print(f"{label:26s} s={s:.1f} " + "  ".join(f"{k}={v[0]:.4f}" for k, v in row.items() if isinstance(v, tuple)), flush=True)

    names = list(methods(True))
    print("\n— = not run on that layer (per-row λ bisection of the ℓ1 references takes minutes there)")
    print("Relative output error ‖X(W−Ŵ)‖²/‖XW‖² on held-out AN4 test frames (lower is better); time in s")
    print("| layer | sparsity | " + " | ".join(names) + " | csp-omp / magnitude+refit |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for row in table:
        cells = [f"{row[n][0]:.4f} ({row[n][1]:.1f}s)" if n in row else "—" for n in names]
        ratio = row["csp-omp"][0] / row["magnitude+refit"][0]
        print(f"| {row['layer']} | {row['sparsity']:.1f} | " + " | ".join(cells) + f" | {ratio:.3f} |")


if __name__ == "__main__":
    main()
