"""One-shot pruning of a trained AN4 Conformer-CTC, measured at network level (issue #12).

Loads a dense recipe checkpoint (``dense.pt``), prunes the recipe's default targets one-shot with each
method on the same calibration batches, and prints, per method and sparsity:

* the relative error of the network's output logits on held-out AN4 test utterances,
  ‖f̂(x) − f(x)‖² / ‖f(x)‖² (the quantity CSP minimises layer by layer, seen at the output);
* the test WER before any fine-tuning;
* dead depthwise-conv channels (all 15 taps pruned) — issue #12 defect 3;
* the largest |value| written into an attention out_proj, relative to the dense max — defect 2;
* wall time of the pruning step.

    AN4_ROOT=../shared/data/an4 .venv/bin/python bench/network_error.py --dense outputs/asr/dense_conformer/dense.pt \
        [--sparsity 0.5 0.7 0.9] [--methods magnitude magnitude+refit wanda+refit csp-omp csp-obs] \
        [--calib-batches 8] [--calib-mode eval|train] [--damping 0.01] [--threads 2] [--json out.json]

Runs on older checkouts too (methods a checkout lacks are skipped), so an ablation can run the same
script against the code before a fix (``git worktree add /tmp/before <rev>``; ``PYTHONPATH=/tmp/before``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_methods(names, damping):
    from csprune.methods import CSP, Magnitude, Wanda
    from csprune.solvers import SOLVERS

    out = {}
    for name in names:
        if name == "magnitude":
            out[name] = Magnitude()
        elif name == "magnitude+refit":
            out[name] = Magnitude(refit=True, damping=damping)
        elif name == "wanda+refit":
            out[name] = Wanda(refit=True, damping=damping)
        elif name == "wanda":
            out[name] = Wanda()
        elif name.startswith("csp-"):
            solver, _, extra = name[4:].partition("+")
            if solver not in SOLVERS + ("auto",):
                print(f"skipping {name}: this checkout has no solver {solver!r}", flush=True)
                continue
            kwargs = {"solver": solver, "damping": damping}
            if extra == "nosafe":
                kwargs["safeguard"] = False
            out[name] = CSP(**kwargs)
        else:
            raise SystemExit(f"unknown method {name!r}")
    return out


def load_dense(path: str):
    """(the ASR recipe module, its AN4 Data, the vocabulary, the dense model) of a recipe ``dense.pt``."""
    from hydra import compose, initialize_config_dir

    from csprune.train.checkpoint import load_checkpoint
    from recipes.asr import run as asr

    repo = Path(asr.__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("asr", overrides=[])
    init = load_checkpoint(path)
    vocab = asr.CharVocab.from_dict(init["vocab"])
    data = asr.Data(cfg, vocab, asr.GlobalCMVN.from_dict(init["cmvn"]), seed=0)
    dense = asr.make_model(init["model_config"], vocab)
    dense.load_state_dict(init["model"])
    return asr, data, vocab, dense


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, help="dense.pt of the ASR recipe")
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "magnitude+refit", "wanda+refit", "csp-omp", "csp-obs"])
    ap.add_argument("--calib-batches", type=int, default=8, help="training batches of 16 observed (recipe default 8)")
    ap.add_argument("--calib-mode", choices=["eval", "train"], default="eval",
                    help="eval: model.eval() on clean batches; train: dropout and SpecAugment on, BatchNorm frozen")
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import csprune

    asr, data, vocab, dense = load_dense(args.dense)
    dense.eval()
    test = data.test_batches()
    if args.calib_mode == "eval":
        calib = data.calib_batches(args.calib_batches)
    else:  # the fine-tuning distribution: SpecAugment'd batches, dropout on
        calib = data.train_batches(0)[: args.calib_batches]

    def logits(model):
        out = []
        hook = model.output.register_forward_hook(lambda m, i, o: out.append(o.detach()))
        with torch.no_grad():
            for b in test:
                model(*b.inputs())
        hook.remove()
        return out

    reference = logits(dense)
    ref_energy = sum(float(r.pow(2).sum()) for r in reference)
    dense_wer = asr.evaluate(dense, test, vocab, torch.device("cpu"))["wer"]
    print(f"dense: WER {dense_wer:.4f}; calibration {args.calib_batches} batches in {args.calib_mode} mode; damping {args.damping}", flush=True)
    out_proj_max = max(float(m.out_proj.weight.detach().abs().max()) for m in dense.modules() if isinstance(m, torch.nn.MultiheadAttention))

    rows = []
    for s in args.sparsity:
        for name, method in build_methods(args.methods, args.damping).items():
            model = copy.deepcopy(dense)
            pruner = csprune.Pruner(model, method, csprune.schedules.OneShot(s), targets=asr.DEFAULT_TARGETS["conformer_ctc"])
            if pruner.stats is not None:
                pruner.stats.enabled = True
                model.train() if args.calib_mode == "train" else model.eval()
                if args.calib_mode == "train":
                    for m in model.modules():
                        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                            m.eval()
                torch.manual_seed(0)
                with torch.no_grad():
                    for b in calib:
                        model(*b.inputs())
                pruner.stats.enabled = False
            t0 = time.perf_counter()
            pruner.prune_to(s)
            seconds = time.perf_counter() - t0
            pruner.finalize()
            model.eval()
            got = logits(model)
            err = sum(float((g - r).pow(2).sum()) for g, r in zip(got, reference)) / ref_energy
            wer = asr.evaluate(model, test, vocab, torch.device("cpu"))["wer"]
            dead = sum(int((m.weight.detach().flatten(1) == 0).all(1).sum()) for name_, m in model.named_modules()
                       if name_.endswith("depthwise_conv"))
            omax = max(float(m.out_proj.weight.detach().abs().max()) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))
            row = dict(method=name, sparsity=s, logit_error=err, wer=wer, dead_depthwise=dead,
                       out_proj_max_ratio=omax / out_proj_max, seconds=seconds)
            rows.append(row)
            print(f"s={s:.2f} {name:18s} logit error {err:.4f}  WER {wer:.4f}  dead dw channels {dead:4d}  "
                  f"out_proj max/dense {omax / out_proj_max:.2f}  {seconds:.1f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "dense_wer": dense_wer, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
