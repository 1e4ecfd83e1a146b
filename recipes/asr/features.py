"""Acoustic features for the AN4 recipe: log-mel fbank, an on-disk feature cache, global CMVN
and SpecAugment.

Typical use::

    cache = FeatureCache()                                   # ~/.cache/csprune/an4-fbank/<config key>/
    feats = cache.get(utt)                                   # [T, 80] float32, computed once
    cmvn = GlobalCMVN.fit(cache.get(u) for u in train_utts)  # mean/std over all train frames
    normalized = cmvn(feats)
    augment = SpecAugment(seed=0).train()
    augmented = augment(normalized)                          # only masks in train mode
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
from torch import nn

__all__ = [
    "FbankConfig",
    "load_audio",
    "compute_fbank",
    "default_cache_dir",
    "FeatureCache",
    "GlobalCMVN",
    "SpecAugment",
]

_CACHE_FORMAT_VERSION = 1  # bump when the stored layout or the extraction code changes meaning
CACHE_DIR_ENV = "CSPRUNE_FEATURE_CACHE"
"""Environment variable that overrides the default feature cache folder."""


def load_audio(path: str | os.PathLike, expected_sample_rate: int = 16000) -> torch.Tensor:
    """Reads a mono audio file with ``soundfile`` (torchaudio 2.11's loader needs torchcodec).

    Args:
        path: Audio file (WAV, NIST SPHERE, FLAC, ...).
        expected_sample_rate: Required sample rate in Hz; AN4 is 16 kHz.

    Returns:
        Waveform, shape ``[N]``, float32 in [-1, 1).

    Raises:
        ValueError: The file has another sample rate or more than one channel (names the file).
    """
    data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    if sample_rate != expected_sample_rate:
        raise ValueError(f"{path}: sample rate {sample_rate} Hz, expected {expected_sample_rate} Hz")
    if data.shape[1] != 1:
        raise ValueError(f"{path}: {data.shape[1]} channels, expected mono")
    return torch.from_numpy(np.ascontiguousarray(data[:, 0]))


@dataclasses.dataclass(frozen=True)
class FbankConfig:
    """Kaldi-compatible log-mel filterbank settings (``torchaudio.compliance.kaldi.fbank``).

    Attributes:
        num_mel_bins: Mel bands per frame.
        frame_length_ms: Analysis window length in ms.
        frame_shift_ms: Hop between frames in ms.
        sample_rate: Expected audio sample rate in Hz.
        dither: Dither amplitude; 0 keeps features deterministic so the cache is exact.
        low_freq: Lowest mel filter edge in Hz.
        high_freq: Highest mel filter edge in Hz; <= 0 means Nyquist + high_freq (Kaldi rule).
    """

    num_mel_bins: int = 80  # 80-dim fbank, the usual Conformer front end
    frame_length_ms: float = 25.0  # standard 25 ms speech window
    frame_shift_ms: float = 10.0  # standard 10 ms hop (100 frames/s)
    sample_rate: int = 16000  # AN4 is recorded at 16 kHz
    dither: float = 0.0  # deterministic features: a cached tensor equals a recomputed one
    low_freq: float = 20.0  # Kaldi default; drops DC / rumble
    high_freq: float = 0.0  # Kaldi default: up to Nyquist

    def key(self) -> str:
        """Short hash of every setting plus the cache format version; names the cache sub-folder,
        so changing any setting uses a fresh folder instead of stale features."""
        payload = json.dumps({"version": _CACHE_FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def window_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def shift_samples(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    def num_frames(self, num_samples: int) -> int:
        """Frames ``compute_fbank`` returns for ``num_samples`` samples (Kaldi ``snip_edges``),
        without reading audio; used to length-sort utterances."""
        if num_samples < self.window_samples:
            return 0
        return 1 + (num_samples - self.window_samples) // self.shift_samples


def compute_fbank(waveform: torch.Tensor, config: FbankConfig | None = None) -> torch.Tensor:
    """Log-mel filterbank of one utterance.

    Args:
        waveform: Shape ``[N]`` (or ``[1, N]``), float in [-1, 1) at ``config.sample_rate``.
        config: Feature settings; ``FbankConfig()`` when None.

    Returns:
        Features, shape ``[T, num_mel_bins]``, float32, ``T = config.num_frames(N)``.

    Raises:
        ValueError: The waveform is shorter than one analysis window.
    """
    config = config or FbankConfig()
    if waveform.dim() == 1:
        waveform = waveform.unsqueeze(0)
    if waveform.shape[-1] < config.window_samples:
        raise ValueError(f"compute_fbank: {waveform.shape[-1]} samples is shorter than one {config.frame_length_ms} ms window")
    # Kaldi works on the 16-bit integer scale; this only shifts the log energies by a constant.
    return kaldi.fbank(
        waveform.float() * 32768.0,
        num_mel_bins=config.num_mel_bins,
        frame_length=config.frame_length_ms,
        frame_shift=config.frame_shift_ms,
        sample_frequency=float(config.sample_rate),
        dither=config.dither,
        low_freq=config.low_freq,
        high_freq=config.high_freq,
        energy_floor=0.0,
    ).contiguous()


def default_cache_dir() -> Path:
    """``$CSPRUNE_FEATURE_CACHE`` if set, else ``~/.cache/csprune/an4-fbank`` (outside the corpus,
    which may be read-only)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "csprune" / "an4-fbank"


class _UtteranceLike(Protocol):
    utt_id: str
    audio_path: Path


class FeatureCache:
    """Computes fbank features once per utterance and stores them as ``.npy`` files.

    Layout: ``<cache_dir>/<config.key()>/<utt_id>-<source hash>.npy``. The config key changes with
    any feature setting; the source hash covers the audio file's absolute path, size and
    modification time, so a different corpus with the same utterance ids, or an edited file,
    never returns stale features. Files are written atomically (temp file + rename), so
    concurrent processes (DDP ranks, DataLoader workers) may share a cache.

    Args:
        cache_dir: Root folder; ``default_cache_dir()`` when None.
        config: Feature settings; ``FbankConfig()`` when None.

    Attributes:
        directory: The folder holding this config's features.
        num_computed: How many utterances this object has computed (cache misses), for tests and
            logging.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, config: FbankConfig | None = None) -> None:
        self.config = config or FbankConfig()
        self.directory = Path(cache_dir if cache_dir is not None else default_cache_dir()) / self.config.key()
        self.num_computed = 0

    def path_for(self, utt: _UtteranceLike) -> Path:
        """Cache file of ``utt`` (an object with ``utt_id`` and ``audio_path``)."""
        audio_path = Path(utt.audio_path).resolve()
        stat = audio_path.stat()
        source = f"{audio_path}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.directory / f"{utt.utt_id}-{hashlib.sha256(source.encode()).hexdigest()[:12]}.npy"

    def get(self, utt: _UtteranceLike) -> torch.Tensor:
        """Features of ``utt``, from the cache or computed and stored.

        Returns:
            Shape ``[T, num_mel_bins]``, float32.
        """
        path = self.path_for(utt)
        if path.exists():
            return torch.from_numpy(np.load(path, allow_pickle=False))
        feats = compute_fbank(load_audio(utt.audio_path, self.config.sample_rate), self.config)
        self.num_computed += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, feats.numpy(), allow_pickle=False)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return feats

    def precompute(self, utts: Iterable[_UtteranceLike], progress: bool = True) -> int:
        """Fills the cache for ``utts`` (shows a tqdm bar when ``progress``).

        Returns:
            The number of utterances computed now (cache misses).
        """
        from tqdm import tqdm

        utts = list(utts)
        before = self.num_computed
        for utt in tqdm(utts, desc="fbank", unit="utt", disable=not progress):
            self.get(utt)
        return self.num_computed - before


class GlobalCMVN:
    """Global cepstral mean and variance normalization: ``(x - mean) / std`` per feature dim.

    Args:
        mean: Shape ``[F]``.
        std: Shape ``[F]``, positive.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != std.shape:
            raise ValueError(f"GlobalCMVN: mean has {mean.numel()} dims but std has {std.numel()}")
        if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or (std <= 0).any():
            raise ValueError("GlobalCMVN: mean/std must be finite and std positive")
        self.mean = mean
        self.std = std

    @classmethod
    def fit(cls, features: Iterable[torch.Tensor], min_std: float = 1e-5) -> "GlobalCMVN":
        """Estimates mean and std over every frame of every utterance (float64 accumulation).

        Args:
            features: Utterance features, each ``[T_i, F]`` (e.g. the training set).
            min_std: Floor on the std so constant dims do not blow up.

        Raises:
            ValueError: No frames, or utterances disagree on ``F``.
        """
        total = None
        total_sq = None
        count = 0
        for feats in features:
            feats = feats.to(torch.float64)
            if total is None:
                total = feats.new_zeros(feats.shape[-1])
                total_sq = feats.new_zeros(feats.shape[-1])
            elif feats.shape[-1] != total.numel():
                raise ValueError(f"GlobalCMVN.fit: feature dim {feats.shape[-1]} != {total.numel()}")
            total += feats.sum(0)
            total_sq += feats.square().sum(0)
            count += feats.shape[0]
        if total is None or count == 0:
            raise ValueError("GlobalCMVN.fit: no frames")
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0.0)
        return cls(mean.float(), var.sqrt().clamp_min(min_std).float())

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalizes features.

        Args:
            feats: Shape ``[..., F]``.

        Returns:
            Same shape, ``(feats - mean) / std``.
        """
        if feats.shape[-1] != self.dim:
            raise ValueError(f"GlobalCMVN: features have {feats.shape[-1]} dims, CMVN has {self.dim}")
        return (feats - self.mean.to(feats)) / self.std.to(feats)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for checkpoint metadata: ``{"mean": [floats], "std": [floats]}``."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GlobalCMVN":
        """Inverse of ``to_dict``."""
        if not isinstance(data, dict) or "mean" not in data or "std" not in data:
            raise ValueError(f"GlobalCMVN.from_dict: expected keys 'mean' and 'std', got {data!r:.200}")
        return cls(torch.tensor(data["mean"], dtype=torch.float32), torch.tensor(data["std"], dtype=torch.float32))


class SpecAugment(nn.Module):
    """SpecAugment frequency and time masking (Park et al. 2019, without time warping).

    Masks only in training mode (``.train()``); in eval mode it returns its input unchanged.
    Randomness comes from the module's own ``torch.Generator`` seeded by ``seed`` (or from a
    generator passed to ``forward``), so results are reproducible and independent of the global
    RNG. Masked values are set to ``mask_value`` (0 = the mean after CMVN).

    Args:
        num_freq_masks: Frequency masks per utterance.
        freq_mask_width: Maximum width of a frequency mask in bins (width ~ U{0..max}).
        num_time_masks: Time masks per utterance.
        time_mask_width: Maximum width of a time mask in frames.
        max_time_mask_ratio: Time mask width is also at most this fraction of the utterance
            length, so short utterances are not wiped out.
        mask_value: Value written into masked cells.
        seed: Seed of the module's generator.
    """

    def __init__(
        self,
        num_freq_masks: int = 2,  # LibriSpeech "LD" policy: two F masks
        freq_mask_width: int = 27,  # LD policy F=27 of 80 bins
        num_time_masks: int = 2,  # LD policy: two T masks; AN4 utterances are short (~1-5 s)
        time_mask_width: int = 40,  # 0.4 s at 10 ms hop, smaller than LD's 100 for short utterances
        max_time_mask_ratio: float = 0.2,  # LD policy p=0.2: never mask more than a fifth per mask
        mask_value: float = 0.0,  # the feature mean after CMVN
        seed: int = 0,  # reproducible augmentation
    ) -> None:
        super().__init__()
        if min(num_freq_masks, freq_mask_width, num_time_masks, time_mask_width) < 0 or not 0.0 <= max_time_mask_ratio <= 1.0:
            raise ValueError("SpecAugment: mask counts/widths must be >= 0 and max_time_mask_ratio in [0, 1]")
        self.num_freq_masks = num_freq_masks
        self.freq_mask_width = freq_mask_width
        self.num_time_masks = num_time_masks
        self.time_mask_width = time_mask_width
        self.max_time_mask_ratio = max_time_mask_ratio
        self.mask_value = mask_value
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def extra_repr(self) -> str:
        return (
            f"num_freq_masks={self.num_freq_masks}, freq_mask_width={self.freq_mask_width}, "
            f"num_time_masks={self.num_time_masks}, time_mask_width={self.time_mask_width}, "
            f"max_time_mask_ratio={self.max_time_mask_ratio}, seed={self.seed}"
        )

    def __deepcopy__(self, memo: dict) -> "SpecAugment":
        clone = SpecAugment(
            self.num_freq_masks,
            self.freq_mask_width,
            self.num_time_masks,
            self.time_mask_width,
            self.max_time_mask_ratio,
            self.mask_value,
            self.seed,
        )
        clone.generator.set_state(self.generator.get_state())
        clone.train(self.training)
        return clone

    def get_rng_state(self) -> torch.Tensor:
        """State of the module's generator (for exact resume)."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restores a state from ``get_rng_state``."""
        self.generator.set_state(state)

    def _randint(self, high: int, generator: torch.Generator) -> int:
        """Uniform integer in ``[0, high]``."""
        return int(torch.randint(0, high + 1, (1,), generator=generator))

    def _mask_one(self, feats: torch.Tensor, length: int, generator: torch.Generator) -> None:
        num_frames, num_bins = length, feats.shape[-1]
        for _ in range(self.num_freq_masks):
            width = self._randint(min(self.freq_mask_width, num_bins), generator)
            start = self._randint(num_bins - width, generator)
            feats[:, start : start + width] = self.mask_value
        max_width = min(self.time_mask_width, int(self.max_time_mask_ratio * num_frames))
        for _ in range(self.num_time_masks):
            width = self._randint(max_width, generator)
            start = self._randint(num_frames - width, generator)
            feats[start : start + width, :] = self.mask_value

    def forward(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masks a copy of ``feats`` (training mode only).

        Args:
            feats: One utterance ``[T, F]`` or a padded batch ``[B, T, F]``.
            lengths: For a batch, valid frames per utterance ``[B]`` (time masks stay inside
                them); all ``T`` when None.
            generator: Overrides the module's generator for this call.

        Returns:
            Masked features, same shape; ``feats`` itself in eval mode.
        """
        if not self.training:
            return feats
        generator = generator if generator is not None else self.generator
        out = feats.clone()
        if out.dim() == 2:
            self._mask_one(out, out.shape[0], generator)
            return out
        if out.dim() != 3:
            raise ValueError(f"SpecAugment: expected [T, F] or [B, T, F], got {tuple(feats.shape)}")
        for index in range(out.shape[0]):
            length = out.shape[1] if lengths is None else int(lengths[index])
            self._mask_one(out[index], length, generator)
        return out
