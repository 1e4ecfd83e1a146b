"""Peak memory of CSP on one large Linear, with and without the Gram cap (``max_gram_bytes``).

    /usr/bin/time -v python bench/memory.py                      # full 4096x4096 Gram
    /usr/bin/time -v python bench/memory.py --cap-mib 16         # block-diagonal Gram under 16 MiB

Random weights; inputs from a correlated Gaussian (a rank-``latent`` factor model plus isotropic
noise, columns rescaled), generated in chunks from a seed so the data never sits in memory whole.
Prints one JSON line: output error on held-out inputs ``‖(W−Ŵ)Xᵀ‖²/‖WXᵀ‖²``, the pruning report's
``stats_bytes`` (float64 accumulator) and ``gram_bytes_peak`` (float32 Gram handed to the solver),
seconds, and this process's peak RSS from ``getrusage`` (``/usr/bin/time -v`` reports the same
"Maximum resident set size").
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch import nn

from csprune import Pruner
from csprune.methods import CSP
from csprune.schedules import OneShot


def batches(n: int, samples: int, chunk: int, latent: int, seed: int):
    """Yield [chunk, n] float32 inputs: x = z·A + 0.3·ε, scaled per column (A fixed by ``latent``'s seed)."""
    g = torch.Generator().manual_seed(1234)
    mixing = torch.randn(latent, n, generator=g) / latent ** 0.5  # [latent, n]
    scale = torch.exp(0.5 * torch.randn(n, generator=g))  # [n] uneven column energies, as in real layers
    data = torch.Generator().manual_seed(seed)
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        z = torch.randn(m, latent, generator=data)
        yield (z @ mixing + 0.3 * torch.randn(m, n, generator=data)) * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="layer width (in = out = n)")
    ap.add_argument("--cap-mib", type=float, default=0, help="max_gram_bytes in MiB (0: no cap)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--solver", default="omp")
    ap.add_argument("--samples", type=int, default=8192, help="calibration inputs (2x n: a well-conditioned Gram)")
    ap.add_argument("--latent", type=int, default=256, help="rank of the correlated part of the inputs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = nn.Linear(args.n, args.n, bias=False)
    dense = layer.weight.detach().clone()
    cap = int(args.cap_mib * 2**20) or None
    pruner = Pruner(layer, CSP(solver=args.solver), OneShot(args.sparsity), max_gram_bytes=cap)
    start = time.perf_counter()
    pruner.stats.enabled = True
    with torch.no_grad():
        for x in batches(args.n, args.samples, 1024, args.latent, seed=1):
            layer(x)
    collect = time.perf_counter() - start
    report = pruner.prune_to(args.sparsity)
    seconds = time.perf_counter() - start
    pruner.finalize()
    err_num = err_den = 0.0
    with torch.no_grad():
        for x in batches(args.n, 4096, 1024, args.latent, seed=2):  # held out
            err_num += float(((x @ (layer.weight - dense).T) ** 2).sum())
            err_den += float(((x @ dense.T) ** 2).sum())
    info = report["tensors"]["weight"]
    print(json.dumps({
        "n": args.n, "sparsity": args.sparsity, "solver": args.solver, "cap_bytes": cap or 0,
        "gram_block": int(info["gram_block"]), "stats_bytes": report["stats_bytes"], "gram_bytes_peak": report["gram_bytes_peak"],
        "rel_output_error": err_num / err_den, "actual_sparsity": float((layer.weight == 0).float().mean()),
        "collect_seconds": round(collect, 1), "seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
