"""AN4 fbank frames for benchmarks: a minimal reader that needs only the corpus layout.

Benchmarks stay independent of the recipe code so they measure the engine alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio


def an4_root() -> Path:
    root = Path(os.environ.get("AN4_ROOT", "data/an4"))
    if not (root / "etc" / "an4_train.fileids").is_file():
        raise SystemExit(f"AN4 corpus not found at {root} (set AN4_ROOT to the folder holding etc/ and wav/)")
    return root


def fbank_frames(split: str, utterances: int, context: int = 1, offset: int = 0) -> torch.Tensor:
    """Log-mel fbank (80 bins) with ±context frames stacked, from the first utterances of a split.

    Returns:
        [frames, 80·(2·context+1)] float32, mean-centered per dim and scaled by one global std, so the
        per-bin energy differences that Wanda's ‖x_j‖ sees are kept.
    """
    root = an4_root()
    ids = (root / "etc" / f"an4_{split}.fileids").read_text().split()[offset:offset + utterances]
    feats = []
    for fid in ids:
        audio, rate = sf.read(root / "wav" / f"{fid}.wav", dtype="float32")
        wav = torch.from_numpy(np.asarray(audio)).unsqueeze(0)
        fb = torchaudio.compliance.kaldi.fbank(wav * 32768, num_mel_bins=80, sample_frequency=rate)
        padded = torch.nn.functional.pad(fb.T, (context, context), mode="replicate").T
        stacked = torch.cat([padded[i:i + fb.shape[0]] for i in range(2 * context + 1)], dim=1)
        feats.append(stacked)
    x = torch.cat(feats)
    x = x - x.mean(0)
    return x / x.std()
