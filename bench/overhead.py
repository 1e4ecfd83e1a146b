"""Training-step overhead of a CSP Pruner on a Conformer-sized model (issue #2).

Runs the same training loop (same seeds, same data) without and with a Pruner
(CSP, activation sensing, Cubic schedule pruning every 100 steps) and prints the
amortized step-time ratio, including the pruning steps themselves.

    .venv/bin/python bench/overhead.py [--steps 300] [--layers 4]
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


def run(steps: int, layers: int, batch: int, frames: int, with_pruner: bool) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    model = Model(layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    pruner = None
    if with_pruner:
        pruner = csprune.Pruner(model, CSP(), Cubic(0.7, start_step=0, end_step=steps, frequency=100),
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps per loop (pruning every 100)")
    ap.add_argument("--layers", type=int, default=4, help="Conformer blocks")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=100, help="frames per utterance after subsampling")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    run(5, args.layers, args.batch, args.frames, False)  # warm-up
    base, _, _ = run(args.steps, args.layers, args.batch, args.frames, False)
    pruned, prune_s, sparsity = run(args.steps, args.layers, args.batch, args.frames, True)
    print(f"steps={args.steps} layers={args.layers} batch={args.batch}x{args.frames}")
    print(f"dense loop     {base:8.2f} s  ({base / args.steps * 1e3:.1f} ms/step)")
    print(f"with Pruner    {pruned:8.2f} s  ({pruned / args.steps * 1e3:.1f} ms/step; {prune_s:.2f} s in pruning steps)")
    print(f"final sparsity {sparsity.get('total', 0):.3f}")
    print(f"step-time ratio (amortized) {pruned / base:.3f}   goal <= 1.10")


if __name__ == "__main__":
    main()
