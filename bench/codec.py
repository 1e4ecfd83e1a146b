"""The figures a codec user asks for, for one exported codec (``recipes/codec`` ``model.safetensors``).

- parameters, and multiply-accumulates per second of audio (every Conv1d of every module, counted by hooks on one
  forward pass; PReLU, tanh, the quantizer and the LPC filter are left out, all under 1% of the MACs);
- encode and decode real-time factor on one CPU thread: seconds of compute per second of audio, for the whole
  path (framing, LPC if any, the network, range coding and the ``.cmrl`` file write; decode: read, decode,
  overlap-add), medians of ``--repeats`` runs on one AN4 test utterance;
- algorithmic latency: the frame, of which the crossfade is look-ahead;
- bitstream overhead: header, per-module length prefixes and CRC, in bytes and as a share of the file at the
  model's measured bitrate for an utterance of mean AN4 length, next to the real bytes over the code entropy.

    AN4_ROOT=../shared/data/an4 OMP_NUM_THREADS=1 python bench/codec.py outputs/codec/<run>/model.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def conv_macs(model: torch.nn.Module, frames: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv1d in one hard forward pass over ``frames`` [B, L]."""
    total = [0]

    def hook(module, _inputs, output):
        total[0] += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0]

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    try:
        with torch.no_grad():
            model(frames, hard=True)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--utterance", type=int, default=0, help="index in the AN4 test list")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import os

    from csprune.train.an4 import read_an4_split
    from recipes.codec.data import load_utterance
    from recipes.codec.run import SAMPLE_RATE, load_codec

    codec = load_codec(args.ckpt)
    model = codec.model
    params = sum(p.numel() for p in model.parameters())
    hop = codec.frame_len - codec.overlap
    frames_per_second = SAMPLE_RATE / hop
    macs_per_frame = conv_macs(model, torch.zeros(1, codec.frame_len))
    root = os.environ.get("AN4_ROOT", "data/an4")
    utts = read_an4_split(root, "test")
    utt = utts[args.utterance]
    wave = load_utterance(utt, -26.0)
    seconds = wave.numel() / SAMPLE_RATE
    enc, dec = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.cmrl"
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            size = codec.write(path, codec.encode(wave))
            t1 = time.perf_counter()
            codec.decode(codec.read(path))
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        # overhead: what a file holds besides the range-coded codes (and LPC side info)
        coded = codec.encode(wave)
        empty = 0
        from recipes.codec.bitstream import _encode_chunk, quantize_probabilities

        for m in range(model.num_modules):
            freqs = quantize_probabilities(codec.probs()[m])  # as write_cmrl codes them
            empty += len(_encode_chunk(coded.indices[m].reshape(-1).cpu().numpy(), freqs))
        side = 0 if codec.lpc is None else int(np.ceil(codec.lpc.bits_per_frame * coded.indices[0].shape[0] / 8))
        overhead = size - empty - side
    mean_seconds = statistics.mean(u.num_samples for u in utts) / SAMPLE_RATE
    bitrate = 8 * size / seconds
    print(f"codec {args.ckpt}: {model.num_modules} modules{' + LPC' if codec.lpc is not None else ''}, {params:,} parameters")
    print(f"MACs: {macs_per_frame / 1e6:.1f} M per frame, {macs_per_frame * frames_per_second / 1e9:.2f} GMAC per second of audio "
          f"({frames_per_second:.2f} frames/s, hop {hop} samples)")
    print(f"RTF on 1 thread ({utt.utt_id}, {seconds:.2f} s): encode {statistics.median(enc[1:]) / seconds:.4f}, "
          f"decode {statistics.median(dec[1:]) / seconds:.4f}")
    print(f"algorithmic latency: {codec.frame_len} samples = {1000 * codec.frame_len / SAMPLE_RATE:.1f} ms "
          f"(a {hop}-sample hop plus the {codec.overlap}-sample crossfade as look-ahead)")
    print(f"bitstream overhead: {overhead} bytes a file (header, {model.num_modules} length prefixes, CRC32); this file "
          f"{size} bytes at {bitrate / 1000:.2f} kbit/s: {100 * overhead / size:.2f}%; at the mean AN4 test length "
          f"({mean_seconds:.2f} s) and 8 / 16 / 24 kbit/s: "
          + " / ".join(f"{100 * overhead * 8 / (r * mean_seconds + overhead * 8):.2f}%" for r in (8000, 16000, 24000)))


if __name__ == "__main__":
    main()
