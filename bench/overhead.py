"""Training-step overhead of a CSP Pruner on a Conformer-sized model (issue #2).

Runs the same training loop (same seeds, same data) without and with a Pruner
(CSP, activation sensing, Cubic schedule pruning every 100 steps) and prints the
amortized step-time ratio, including the pruning steps themselves.

    .venv/bin/python bench/overhead.py [--steps 300] [--layers 4] [--solve-updates final]
    .venv/bin/python bench/overhead.py --between 0.5   # a step between updates: pruned vs dense, no updates

``--between S`` prunes the model once to S (magnitude, so no statistics hooks) and times the training
step with ``pruner.step()`` against the dense step, interleaved over repeats (the hot path of
docs/design.md "The training hot path").
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torchaudio.models import Conformer

import csprune
from csprune.methods import CSP
from csprune.schedules import Cubic


class Model(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.enc = Conformer(input_dim=144, num_heads=4, ffn_dim=576, num_layers=layers, depthwise_conv_kernel_size=31)
        self.head = nn.Linear(144, 30)

    def forward(self, x, lens):
        y, _ = self.enc(x, lens)
        return self.head(y)


def run(steps: int, layers: int, batch: int, frames: int, with_pruner: bool,
        solve_updates: str = "all") -> tuple[float, float, dict]:
    torch.manual_seed(0)
    model = Model(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    pruner = None
    if with_pruner:
        pruner = csprune.Pruner(model, CSP(solve_updates=solve_updates), Cubic(0.7, start_step=0, end_step=steps, frequency=100),
                                optimizer=opt, targets=["enc.*"])
    gen = torch.Generator().manual_seed(0)
    lens = torch.full((batch,), frames)
    prune_seconds = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(batch, frames, 144, generator=gen)
        loss = model(x, lens).pow(2).mean() + (pruner.penalty() if pruner else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pruner is not None:
            report = pruner.step()
            if report:
                prune_seconds += report["seconds"]
    total = time.perf_counter() - start
    return total, prune_seconds, (pruner.sparsity() if pruner else {})


def between_updates(sparsity: float, steps: int, repeats: int, layers: int, batch: int, frames: int) -> None:
    """Median ms/step of dense and pruned (no mask updates) training, interleaved, and their ratio."""
    from csprune.methods import Magnitude

    def build(pruned: bool):
        torch.manual_seed(0)
        model = Model(layers)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        pruner = None
        if pruned:  # a schedule whose updates lie far beyond the loop: only the hot path runs
            pruner = csprune.Pruner(model, Magnitude(), Cubic(sparsity, start_step=10**9, end_step=10**9 + 1, frequency=1),
                                    optimizer=opt, targets=["enc.*"])
            pruner.prune_to(sparsity)
        return model, opt, pruner

    def loop(model, opt, pruner, count):
        gen = torch.Generator().manual_seed(0)
        lens = torch.full((batch,), frames)
        start = time.perf_counter()
        for _ in range(count):
            x = torch.randn(batch, frames, 144, generator=gen)
            loss = model(x, lens).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()
        return (time.perf_counter() - start) / count * 1e3

    runs = {"dense": build(False), "pruned": build(True)}
    times = {name: [] for name in runs}
    for name, (m, o, p) in runs.items():
        loop(m, o, p, 3)  # optimizer state exists from here on, as in fine-tuning
    for _ in range(repeats):
        for name, (m, o, p) in runs.items():
            times[name].append(loop(m, o, p, steps))
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    print(f"between updates at sparsity {sparsity}: dense {med['dense']:.1f} ms/step, pruned {med['pruned']:.1f} ms/step "
          f"(medians of {repeats} x {steps} steps); ratio {med['pruned'] / med['dense']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps per loop (pruning every 100)")
    ap.add_argument("--layers", type=int, default=4, help="Conformer blocks")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=100, help="frames per utterance after subsampling")
    ap.add_argument("--between", type=float, default=None, metavar="S",
                    help="only time a step between updates at sparsity S (pruned vs dense)")
    ap.add_argument("--repeats", type=int, default=5, help="--between: interleaved repeats")
    ap.add_argument("--solve-updates", default="all", choices=["all", "final"], help="CSP(solve_updates=...)")
    args = ap.parse_args()
    if args.between is not None:
        between_updates(args.between, 20, args.repeats, args.layers, args.batch, args.frames)
        return
    torch.set_num_threads(torch.get_num_threads())
    run(5, args.layers, args.batch, args.frames, False)  # warm-up
    base, _, _ = run(args.steps, args.layers, args.batch, args.frames, False)
    pruned, prune_s, sparsity = run(args.steps, args.layers, args.batch, args.frames, True, args.solve_updates)
    print(f"steps={args.steps} layers={args.layers} batch={args.batch}x{args.frames} solve_updates={args.solve_updates}")
    print(f"dense loop     {base:8.2f} s  ({base / args.steps * 1e3:.1f} ms/step)")
    print(f"with Pruner    {pruned:8.2f} s  ({pruned / args.steps * 1e3:.1f} ms/step; {prune_s:.2f} s in pruning steps)")
    print(f"final sparsity {sparsity.get('total', 0):.3f}")
    print(f"step-time ratio (amortized) {pruned / base:.3f}   goal <= 1.10")


if __name__ == "__main__":
    main()
