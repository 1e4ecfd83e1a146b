"""Cost of gradual mask updates on the recipe's Conformer-CTC, against the training between them (issue #12).

Starts from a dense recipe checkpoint and walks each method through the mask updates of a gradual
schedule, 0 → 0.35 → 0.5 → 0.7 → 0.9 (what a cubic ramp passes through), on real AN4 training
batches: before every update the pruner observes ``stats_steps`` training steps (forward, backward,
AdamW step, as in fine-tuning), then the update itself is timed. The training steps between two
updates (``--frequency``) are timed once per method, so the ratio "update / training between updates"
is measured side by side, in one process, on the same threads.

    AN4_ROOT=../shared/data/an4 .venv/bin/python bench/gradual.py --dense outputs/asr/dense_conformer/dense.pt \
        [--methods magnitude csp-omp csp-obs] [--frequency 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from network_error import build_methods, load_dense  # noqa: E402

LEVELS = (0.35, 0.5, 0.7, 0.9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--methods", nargs="+", default=["magnitude", "csp-omp", "csp-obs"])
    ap.add_argument("--frequency", type=int, default=20, help="training steps between mask updates")
    ap.add_argument("--stats-steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import csprune

    asr, data, vocab, dense = load_dense(args.dense)
    batches = data.train_batches(0)
    print(f"threads {torch.get_num_threads()}; {len(batches)} batches/epoch; update every {args.frequency} steps", flush=True)

    def train_steps(model, opt, pruner, count, offset):
        for i in range(count):
            b = batches[(offset + i) % len(batches)]
            loss = model.loss(*b.inputs())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.enforce()

    rows = []
    for name, method in build_methods(args.methods, 0.01).items():
        torch.manual_seed(0)
        model = copy.deepcopy(dense)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
        pruner = csprune.Pruner(model, method, csprune.schedules.OneShot(LEVELS[-1]), targets=asr.DEFAULT_TARGETS["conformer_ctc"],
                                optimizer=opt, stats_steps=args.stats_steps)
        if pruner.stats is not None:
            pruner.stats.enabled = False  # plain training between updates (the Pruner would observe the first steps)
        t0 = time.perf_counter()
        train_steps(model, opt, pruner, args.frequency, 0)
        between = time.perf_counter() - t0
        updates = []
        for j, level in enumerate(LEVELS):
            if pruner.stats is not None:
                pruner.stats.enabled = True
            t0 = time.perf_counter()
            train_steps(model, opt, pruner, args.stats_steps, 1000 * j)
            observe = time.perf_counter() - t0
            if pruner.stats is not None:
                pruner.stats.enabled = False
            t0 = time.perf_counter()
            report = pruner.prune_to(level, gradual=True)  # what step() does on a gradual schedule (CSP: no safeguard)
            update = time.perf_counter() - t0
            errors = [v.get("rel_error") for v in report["tensors"].values() if v.get("rel_error") is not None]
            updates.append((level, update, observe, sum(errors) / len(errors) if errors else float("nan")))
            print(f"{name:12s} -> {level:.2f}: update {update:6.2f} s (mean layer error {updates[-1][3]:.4f}); "
                  f"{args.stats_steps} observed steps {observe:.2f} s", flush=True)
        rows.append((name, between, updates))
    print(f"\n| method | training between updates ({args.frequency} steps) | " + " | ".join(f"update to {s:.2f}" for s in LEVELS)
          + " | updates / training between (mean) |")
    print("|---|---|" + "---|" * (len(LEVELS) + 1))
    for name, between, updates in rows:
        mean_ratio = sum(u for _, u, _, _ in updates) / len(updates) / between
        print(f"| {name} | {between:.1f} s | " + " | ".join(f"{u:.2f} s" for _, u, _, _ in updates) + f" | {mean_ratio:.3f} |")


if __name__ == "__main__":
    main()
