"""Quality against bitrate from one trained codec, by the rate trim alone (no retraining).

For each total target (bit/s, equal module shares unless ``--shares``), fit the coders of a recipe ``dense.pt``
to it (``recipes.codec.run.fit_coders``: entropy-constrained assignment at inference, design §9) and code the
130 AN4 test utterances through real ``.cmrl`` files. The first row is the coder with no trim (nearest centroid).

    AN4_ROOT=../shared/data/an4 python bench/codec_trim.py outputs/codec/<run>/dense.pt --targets 16000 12000 8000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a codec run's dense.pt")
    parser.add_argument("--targets", type=float, nargs="+", required=True, help="total bit/s (side information included)")
    parser.add_argument("--shares", type=float, nargs="+", default=None, help="module shares of the code bitrate (sum 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from csprune.train.an4 import default_an4_root, read_an4_split
    from csprune.train.checkpoint import load_checkpoint
    from recipes.codec.data import FrameBank, load_utterance
    from recipes.codec.run import build_codec, evaluate, fit_coders

    init = load_checkpoint(args.ckpt)
    codec = build_codec(init["model_config"], init["lpc_config"])
    codec.model.load_state_dict(init["model"])
    root = default_an4_root()
    bank = FrameBank(read_an4_split(root, "train"), -26.0, codec.signal_frames)
    utts = read_an4_split(root, "test")
    waves = [load_utterance(u, -26.0) for u in utts]
    count = codec.model.num_modules
    shares = args.shares or [1.0 / count] * count
    if len(shares) != count or abs(sum(shares) - 1) > 1e-6:
        parser.error(f"--shares {args.shares}: need {count} shares summing to 1")
    rows = []
    for target in [None, *args.targets]:
        t0 = time.perf_counter()
        budgets = None if target is None else [(target - codec.side_bits_per_second) * s for s in shares]
        fitted = fit_coders(codec, bank, budgets)
        scores = evaluate(codec, utts, waves, prefix=f"trim {target or 'none'}")
        row = {"target": target, "rate_tradeoff": [r["rate_tradeoff"] for r in fitted],
               "train_bitrate": [r["bitrate"] for r in fitted], **scores, "seconds": time.perf_counter() - t0}
        rows.append(row)
        label = "none" if target is None else f"{target / 1000:.1f}k"
        modules = " / ".join(f"{scores[key] / 1000:.2f}" for key in (f"bitrate_m{m}" for m in range(count)))
        print(f"target {label}: real {scores['bitrate_real'] / 1000:.2f} kbit/s "
              f"(m: {modules}), PESQ-WB {scores['pesq']:.3f}, "
              f"SNR {scores['snr']:.2f} dB, segSNR {scores['segsnr']:.2f}, STOI {scores['stoi']:.3f}, "
              f"mu {', '.join(f'{mu:.2e}' for mu in row['rate_tradeoff'])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
