"""Audio for the codec: AN4 waveforms, loudness normalisation, framing and overlap-add.

Framing (Kankanahalli-Net / CMRL): frames of ``frame_len`` = 512 samples with ``overlap`` = 32
samples shared by neighbours, i.e. a hop of 480. The signal is padded with ``overlap`` zeros in
front and zeros at the end, so every sample lies in a frame's flat part or in the overlap of two
frames. The synthesis window is flat (1) except for ``overlap``-long Hann halves at both ends; the
rising half of one frame and the falling half of the previous one sum to 1, so overlap-adding
unmodified frames gives the signal back exactly.

    frames = frame_signal(wave)                  # [F, 512]
    wave_back = overlap_add(frames, len(wave))   # == wave (up to float rounding)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from csprune.train.an4 import Utterance, read_audio

__all__ = ["FRAME_LEN", "OVERLAP", "synthesis_window", "num_frames", "frame_signal", "overlap_add",
           "load_utterance", "FrameBank"]

FRAME_LEN = 512  # Kankanahalli-Net's window: 32 ms at 16 kHz
OVERLAP = 32  # 2 ms crossfade: small, so only 6% of the bitrate codes shared samples


def synthesis_window(frame_len: int = FRAME_LEN, overlap: int = OVERLAP) -> torch.Tensor:
    """[frame_len] window: Hann halves of length ``overlap`` at both ends, 1 in between.

    rise[n] = sin²(π (n + ½) / (2·overlap)), fall = 1 − rise, so rise + fall = 1 exactly.
    """
    n = torch.arange(overlap, dtype=torch.float64)
    rise = torch.sin(math.pi * (n + 0.5) / (2 * overlap)) ** 2
    window = torch.ones(frame_len, dtype=torch.float64)
    window[:overlap] = rise
    window[frame_len - overlap:] = 1.0 - rise
    return window.float()


def num_frames(num_samples: int, frame_len: int = FRAME_LEN, overlap: int = OVERLAP) -> int:
    """Frames covering ``num_samples`` after the ``overlap`` zeros in front (at least 1).

    The last frame's falling edge must cover only padding (it has no next frame to crossfade with),
    so ``count · hop ≥ overlap + num_samples``.
    """
    hop = frame_len - overlap
    return max(1, math.ceil((num_samples + overlap) / hop))


def frame_signal(wave: torch.Tensor, frame_len: int = FRAME_LEN, overlap: int = OVERLAP) -> torch.Tensor:
    """Cut a waveform [T] into overlapping frames [F, frame_len] (zero padded; see the module doc)."""
    if wave.dim() != 1:
        raise ValueError(f"frame_signal: wave must be 1-D [samples], got shape {tuple(wave.shape)}")
    hop = frame_len - overlap
    count = num_frames(wave.numel(), frame_len, overlap)
    padded = wave.new_zeros(count * hop + overlap)
    padded[overlap:overlap + wave.numel()] = wave
    return padded.unfold(0, frame_len, hop).contiguous()


def overlap_add(frames: torch.Tensor, num_samples: int, overlap: int = OVERLAP) -> torch.Tensor:
    """Inverse of :func:`frame_signal`: frames [F, L] -> waveform [num_samples]."""
    count, frame_len = frames.shape
    hop = frame_len - overlap
    windowed = frames * synthesis_window(frame_len, overlap).to(frames)
    positions = (torch.arange(count, device=frames.device) * hop).unsqueeze(1) + torch.arange(frame_len, device=frames.device)
    out = frames.new_zeros(count * hop + overlap).index_add(0, positions.reshape(-1), windowed.reshape(-1))
    return out[overlap:overlap + num_samples]


def load_utterance(utt: Utterance, target_dbfs: float | None) -> torch.Tensor:
    """An AN4 utterance's waveform [T] at 16 kHz, loudness-normalised to ``target_dbfs`` (None: as stored)."""
    from .metrics import loudness_normalize

    wave = read_audio(utt.audio_path)
    return loudness_normalize(wave, target_dbfs) if target_dbfs is not None else wave


class FrameBank:
    """Every frame of a set of utterances in one tensor, for random minibatches of frames.

    Args:
        utterances: AN4 utterances.
        target_dbfs: loudness each utterance is normalised to (None: as stored).
        to_frames: waveform [T] -> frames [F, L] (the codec's ``signal_frames``; default :func:`frame_signal`).

    Attributes:
        frames: [N, frame_len] float32, all frames of all utterances.
        waves: the normalised waveforms, in order (for evaluation).
    """

    def __init__(self, utterances: Sequence[Utterance], target_dbfs: float | None = -26.0,
                 to_frames: Callable[[torch.Tensor], torch.Tensor] = frame_signal):
        if not utterances:
            raise ValueError("FrameBank: no utterances (check data.root and data.max_*_utts)")
        self.utterances = list(utterances)
        self.waves = [load_utterance(u, target_dbfs) for u in self.utterances]
        self.frames = torch.cat([to_frames(w) for w in self.waves])

    def __len__(self) -> int:
        return self.frames.shape[0]

    def batches(self, batch_size: int, count: int | None, generator: torch.Generator) -> list[torch.Tensor]:
        """Frame indices of one epoch: ``count`` random batches int64 [batch_size] (None: one pass over all
        frames in random order, the last incomplete batch dropped)."""
        n = len(self)
        if count is None:
            order = torch.randperm(n, generator=generator)
            return [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [order]
        return [torch.randint(n, (batch_size,), generator=generator) for _ in range(count)]

