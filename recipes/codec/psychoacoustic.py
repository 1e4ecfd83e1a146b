"""Psychoacoustic masking model and loss terms for the codec recipe.

The global masking threshold follows ISO/IEC 11172-3 (MPEG-1 audio) psychoacoustic model 1, in the
form described by Painter & Spanias ("Perceptual coding of digital audio", Proc. IEEE 2000),
adapted to 16 kHz speech with a 512-point FFT:

1. Hann-windowed power spectrum in dB, normalised so that a full-scale sinusoid peaks at 96 dB SPL
   (``power_spectrum_db``).
2. Tonal maskers: local maxima that exceed their neighbours at ``k ± Δk`` by at least 7 dB
   (``Δk`` grows with frequency); a tonal masker's power is the sum over bins ``k-1, k, k+1``.
3. Noise (non-tonal) maskers: in each critical band (1-Bark-wide, ``floor(hz_to_bark(f))``), the
   power of the bins that are not part of a tonal masker's neighbourhood, placed at the band's
   geometric-mean bin.
4. Decimation: maskers below the absolute threshold of hearing are dropped; of two tonal maskers
   closer than 0.5 Bark only the stronger one is kept.
5. Individual thresholds: masker level + masking index (tonal ``-6.025 - 0.275 z``, noise
   ``-2.025 - 0.175 z``) + the level-dependent model-1 spreading function, non-zero for
   ``Δz = z_maskee - z_masker`` in ``[-3, 8)`` Bark.
6. Global threshold at every FFT bin: the power sum of the absolute threshold and all individual
   thresholds.

``PsychoacousticLoss`` implements the two loss terms of Zhen, Lee, Sung, Beack & Kim,
"Psychoacoustic calibration of loss functions for efficient end-to-end neural audio coding",
IEEE Signal Processing Letters 27, 2020 ("priority weighting" and "noise modulation"); see its
docstring for the exact formulas.

Typical use::

    loss_fn = PsychoacousticLoss()                     # 16 kHz, 512-sample frames
    terms = loss_fn(reference_frames, decoded_frames)  # both [F, 512]; two scalars
    loss = alpha * terms["priority"] + beta * terms["noise_modulation"]
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FULL_SCALE_DB",
    "hz_to_bark",
    "absolute_threshold_db",
    "power_spectrum_db",
    "global_masking_threshold",
    "PsychoacousticLoss",
]

FULL_SCALE_DB = 96.0  # level of a full-scale sinusoid (16-bit dynamic range), as in MPEG-1 model 1
_POWER_FLOOR = 1e-12  # relative power floor (-120 dB re full scale, i.e. -24 dB SPL): keeps log10 finite
_TONAL_EXCESS_DB = 7.0  # a tonal masker exceeds its neighbours at ±Δk by this much (model 1)
_TONAL_MERGE_BARK = 0.5  # of two tonal maskers closer than this, only the stronger one is kept
_SPREAD_LOW_BARK = -3.0  # the spreading function is zero below this Δz (model 1)
_SPREAD_HIGH_BARK = 8.0  # ... and at or above this Δz
_MIN_AUDIBLE_HZ = 20.0  # Terhardt's formula diverges at 0 Hz; lower frequencies use its 20 Hz value


def _as_float_tensor(values: float | Tensor) -> Tensor:
    """``values`` as a floating-point tensor (python numbers become the default dtype)."""
    tensor = torch.as_tensor(values)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def hz_to_bark(f: float | Tensor) -> Tensor:
    """Critical-band rate in Bark (Zwicker & Terhardt, 1980).

    ``z = 13 atan(0.00076 f) + 3.5 atan((f / 7500)^2)``.

    Args:
        f: frequencies in Hz, any shape.

    Returns:
        Tensor of the same shape as ``f``: the Bark values (8.51 at 1 kHz, 21.3 at 8 kHz).
    """
    f = _as_float_tensor(f)
    return 13.0 * torch.atan(0.00076 * f) + 3.5 * torch.atan((f / 7500.0) ** 2)


def absolute_threshold_db(f_hz: float | Tensor) -> Tensor:
    """Absolute threshold of hearing (threshold in quiet) in dB SPL, Terhardt (1979).

    ``ATH(f) = 3.64 (f/1k)^-0.8 - 6.5 exp(-0.6 (f/1k - 3.3)^2) + 1e-3 (f/1k)^4``, with
    frequencies below 20 Hz (including DC) clamped to 20 Hz, where the formula is ~83 dB: it
    diverges at 0 Hz, and nothing below 20 Hz is audible anyway.

    Args:
        f_hz: frequencies in Hz, any shape.

    Returns:
        Tensor of the same shape as ``f_hz``: the threshold in dB SPL (minimum about -5 dB near
        3.3 kHz).
    """
    khz = _as_float_tensor(f_hz).clamp(min=_MIN_AUDIBLE_HZ) / 1000.0
    return 3.64 * khz.pow(-0.8) - 6.5 * torch.exp(-0.6 * (khz - 3.3) ** 2) + 1e-3 * khz.pow(4)


def _check_frames(frames: Tensor, n_fft: int, name: str) -> None:
    """Raise ValueError unless ``frames`` is a floating-point ``[F, n_fft]`` tensor with F >= 1."""
    if not isinstance(frames, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [F, {n_fft}], got {type(frames).__name__}")
    if frames.dim() != 2:
        raise ValueError(f"{name} must be 2-D [F, {n_fft}] (frames x samples), got shape {tuple(frames.shape)}")
    if frames.shape[1] != n_fft:
        raise ValueError(
            f"{name} must have n_fft={n_fft} samples per frame, got {frames.shape[1]} (shape {tuple(frames.shape)})"
        )
    if frames.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one frame, got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {frames.dtype}")


def _check_config(sample_rate: int, n_fft: int) -> None:
    """Raise ValueError for a non-positive sample rate or an odd / too small FFT size."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if n_fft < 16 or n_fft % 2:
        raise ValueError(f"n_fft must be an even number >= 16, got {n_fft}")


def _relative_power(frames: Tensor) -> Tensor:
    """Hann-windowed power spectrum relative to a full-scale sinusoid.

    Args:
        frames: ``[F, N]`` time-domain frames.

    Returns:
        ``[F, N//2 + 1]`` power, 1.0 for a full-scale (amplitude 1) sinusoid centred on a bin.
    """
    n_fft = frames.shape[-1]
    window = torch.hann_window(n_fft, periodic=True, dtype=frames.dtype, device=frames.device)
    # A sinusoid of amplitude A centred on bin k gives |X(k)| = A * sum(window) / 2.
    reference = window.sum() / 2.0
    spectrum = torch.fft.rfft(frames * window, n=n_fft, dim=-1)
    return (spectrum.real**2 + spectrum.imag**2) / reference**2


def power_spectrum_db(frames: Tensor, n_fft: int = 512) -> Tensor:
    """Hann-windowed power spectrum in dB SPL, MPEG-1 model 1 normalisation.

    ``P(k) = 96 + 10 log10(|X(k)|^2 / (sum(w)/2)^2 + 1e-12)``: a full-scale sinusoid on a bin
    reads 96 dB, and silence reads -24 dB (the floor). Differentiable.

    Args:
        frames: ``[F, n_fft]`` float time-domain frames, amplitude in [-1, 1].
        n_fft: FFT size; frames must have exactly this many samples (512: 32 ms at 16 kHz).

    Returns:
        ``[F, n_fft//2 + 1]`` power spectrum in dB.

    Raises:
        ValueError: when ``frames`` is not a floating-point ``[F, n_fft]`` tensor.
    """
    _check_frames(frames, n_fft, "frames")
    return FULL_SCALE_DB + 10.0 * torch.log10(_relative_power(frames) + _POWER_FLOOR)


def _db_to_power(db: Tensor) -> Tensor:
    """``10^(db/10)``; -inf maps to 0."""
    return torch.pow(10.0, 0.1 * db)


def _power_to_db(power: Tensor) -> Tensor:
    """``10 log10(power)``; 0 maps to -inf."""
    return 10.0 * torch.log10(power)


def _shift(values: Tensor, offset: int, fill: float) -> Tensor:
    """``out[..., k] = values[..., k + offset]``, ``fill`` where ``k + offset`` is out of range."""
    if offset == 0:
        return values
    out = torch.full_like(values, fill)
    length = values.shape[-1]
    if abs(offset) >= length:
        return out
    if offset > 0:
        out[..., : length - offset] = values[..., offset:]
    else:
        out[..., -offset:] = values[..., : length + offset]
    return out


def _tonal_neighbourhood(freqs_hz: Tensor) -> list[Tensor]:
    """Which offsets ``Δk`` the 7-dB tonal test checks at each bin (model 1, by frequency).

    ``Δk = 2`` below 5.5 kHz, ``Δk ∈ {2, 3}`` from 5.5 to 11 kHz, ``Δk ∈ {2, ..., 6}`` above: the
    Painter & Spanias ranges for 44.1 kHz / 512 points, mapped to frequency.

    Args:
        freqs_hz: ``[K]`` bin frequencies.

    Returns:
        List indexed by offset ``d = 0..6``: ``[K]`` bool, True where bin ``k`` checks ``k ± d``
        (entries 0 and 1 are all False).
    """
    max_offset = torch.full_like(freqs_hz, 2.0)
    max_offset = torch.where(freqs_hz >= 5500.0, torch.full_like(freqs_hz, 3.0), max_offset)
    max_offset = torch.where(freqs_hz >= 11000.0, torch.full_like(freqs_hz, 6.0), max_offset)
    return [(d >= 2) & (max_offset >= d) for d in range(7)]


def global_masking_threshold(frames: Tensor, sample_rate: int = 16000, n_fft: int = 512) -> Tensor:
    """Global masking threshold of MPEG-1 psychoacoustic model 1, per frame and FFT bin.

    Batched over frames: the only Python loops run over small fixed offsets (≤ 0.5 Bark in bins),
    and the individual thresholds of all surviving maskers are evaluated at once on a
    ``[F, maskers, K]`` tensor with invalid maskers masked out. Not differentiable (no need: it is
    computed from the clean reference); runs under ``torch.no_grad``.

    Args:
        frames: ``[F, n_fft]`` float time-domain frames, amplitude in [-1, 1].
        sample_rate: sampling rate in Hz (16000: the codec recipe's speech rate).
        n_fft: FFT size and frame length (512: 32 ms at 16 kHz, the CMRL frame).

    Returns:
        ``[F, n_fft//2 + 1]`` threshold in dB, on the same scale as ``power_spectrum_db``; never
        below the absolute threshold of hearing.

    Raises:
        ValueError: when ``frames`` is not a floating-point ``[F, n_fft]`` tensor, or for a bad
            ``sample_rate`` / ``n_fft``.
    """
    _check_config(sample_rate, n_fft)
    _check_frames(frames, n_fft, "frames")
    with torch.no_grad():
        return _global_masking_threshold(frames.detach(), sample_rate, n_fft)


def _global_masking_threshold(frames: Tensor, sample_rate: int, n_fft: int) -> Tensor:
    """Body of ``global_masking_threshold`` (arguments already checked)."""
    dtype, device = frames.dtype, frames.device
    num_frames = frames.shape[0]
    num_bins = n_fft // 2 + 1
    neg_inf = float("-inf")

    freqs = torch.arange(num_bins, dtype=torch.float64, device=device) * (sample_rate / n_fft)
    bark = hz_to_bark(freqs)  # [K] float64
    ath = absolute_threshold_db(freqs).to(dtype)  # [K]
    power_db = power_spectrum_db(frames, n_fft)  # [F, K]

    # --- Tonal maskers: local maxima exceeding the bins at ±Δk by 7 dB. -----------------------
    checks = _tonal_neighbourhood(freqs)
    is_tonal = (power_db > _shift(power_db, -1, neg_inf)) & (power_db >= _shift(power_db, 1, neg_inf))
    for d in range(2, 7):
        if not bool(checks[d].any()):
            continue
        exceeds = (power_db - _shift(power_db, -d, neg_inf) >= _TONAL_EXCESS_DB) & (
            power_db - _shift(power_db, d, neg_inf) >= _TONAL_EXCESS_DB
        )
        is_tonal &= exceeds | ~checks[d]
    # Like model 1 (2 < k < K-1): skip DC and its neighbours, and the Nyquist bin.
    candidate = torch.zeros(num_bins, dtype=torch.bool, device=device)
    candidate[3 : num_bins - 1] = True
    is_tonal &= candidate

    power = _db_to_power(power_db)  # [F, K], same dB reference
    tonal_power = _shift(power, -1, 0.0) + power + _shift(power, 1, 0.0)
    tonal_db = torch.where(is_tonal, _power_to_db(tonal_power), torch.full_like(power_db, neg_inf))

    # --- Noise maskers: per critical band, the power of the bins outside tonal neighbourhoods. ---
    excluded = is_tonal.clone()
    for d in range(1, 7):
        reach = is_tonal & (checks[d] if d >= 2 else torch.ones_like(checks[0]))
        if bool(reach.any()):
            excluded |= _shift(reach, -d, False) | _shift(reach, d, False)
    excluded[:, 0] = True  # DC carries no audible masking power
    band_of_bin = torch.floor(bark).long()  # [K]
    num_bands = int(band_of_bin.max()) + 1
    band_onehot = torch.nn.functional.one_hot(band_of_bin, num_bands).to(dtype)  # [K, B]
    band_onehot[0] = 0.0  # DC is not part of any band's masker or its position
    noise_power = (power * ~excluded) @ band_onehot  # [F, B]
    noise_db = _power_to_db(noise_power)  # -inf for bands with no remaining power
    # Masker position: the geometric-mean bin of each band (bins >= 1).
    bins = torch.arange(num_bins, dtype=torch.float64, device=device)
    log_bin_sum = torch.log(bins.clamp(min=1.0)) @ band_onehot.to(torch.float64)
    bins_per_band = band_onehot.to(torch.float64).sum(0)
    present = bins_per_band > 0
    geo_bin = torch.exp(log_bin_sum / bins_per_band.clamp(min=1.0)).round().long().clamp(1, num_bins - 1)
    noise_db = torch.where(present.unsqueeze(0), noise_db, torch.full_like(noise_db, neg_inf))

    # --- Decimation. ----------------------------------------------------------------------------
    tonal_db = torch.where(tonal_db >= ath, tonal_db, torch.full_like(tonal_db, neg_inf))
    noise_db = torch.where(noise_db >= ath[geo_bin], noise_db, torch.full_like(noise_db, neg_inf))
    # Of two tonal maskers closer than 0.5 Bark keep the stronger (ties: the lower frequency);
    # decided on all pairs at once, so a masker is dropped if any stronger one is that close.
    keep = torch.isfinite(tonal_db)
    offset = 1
    while offset < num_bins:
        close = (bark[offset:] - bark[:-offset]).abs() < _TONAL_MERGE_BARK  # [K - offset] pairs (k, k+offset)
        if not bool(close.any()):
            break  # Bark is monotonic, so no larger offset is closer either
        low, high = tonal_db[:, :-offset], tonal_db[:, offset:]
        both = torch.isfinite(low) & torch.isfinite(high) & close
        keep[:, :-offset] &= ~(both & (high > low))
        keep[:, offset:] &= ~(both & (low >= high))
        offset += 1
    tonal_db = torch.where(keep, tonal_db, torch.full_like(tonal_db, neg_inf))

    # --- Gather the surviving maskers into [F, M] (level, Bark, masking index). ---------------
    num_tonal = int(keep.sum(dim=1).max())
    levels, positions, indices = [], [], []
    if num_tonal > 0:
        tonal_levels, tonal_bins = torch.topk(tonal_db, num_tonal, dim=1)  # -inf pads frames with fewer
        tonal_bark = bark.to(dtype)[tonal_bins]
        levels.append(tonal_levels)
        positions.append(tonal_bark)
        indices.append(-6.025 - 0.275 * tonal_bark)
    noise_bark = bark.to(dtype)[geo_bin].unsqueeze(0).expand(num_frames, -1)
    levels.append(noise_db)
    positions.append(noise_bark)
    indices.append(-2.025 - 0.175 * noise_bark)
    masker_db = torch.cat(levels, dim=1)  # [F, M]
    masker_bark = torch.cat(positions, dim=1)  # [F, M]
    masking_index = torch.cat(indices, dim=1)  # [F, M]

    # --- Individual thresholds at every bin, power-summed with the absolute threshold. ---------
    masked_power = _summed_individual_power(masker_db, masker_bark, masking_index, bark.to(dtype))
    return _power_to_db(_db_to_power(ath).unsqueeze(0) + masked_power)


def _summed_individual_power(masker_db: Tensor, masker_bark: Tensor, masking_index: Tensor, bark: Tensor) -> Tensor:
    """Power sum over maskers of the individual masking thresholds at every bin.

    The individual threshold of masker ``m`` (level ``X``, Bark ``z_m``, masking index ``av``) at
    bin ``k`` is ``X + av + vf(Δz, X)`` with ``Δz = z_k - z_m`` and the MPEG-1 model 1
    spreading function, piecewise linear in ``Δz``:
    ``17 (Δz + 1) - (0.4 X + 6)`` on [-3, -1), ``(0.4 X + 6) Δz`` on [-1, 0), ``-17 Δz`` on [0, 1),
    ``-(Δz - 1)(17 - 0.15 X) - 17`` on [1, 8), and no masking outside [-3, 8). Below the masker
    the slope steepens with level, above it flattens (upward spread of masking). Being continuous,
    it is evaluated as a sum of clamped ramps:
    ``(0.4 X + 6) clamp(Δz, -1, 0) + 17 min(Δz + 1, 0) - 17 clamp(Δz, 0, 1) - (17 - 0.15 X) max(Δz - 1, 0)``.

    Args:
        masker_db: ``[F, M]`` masker levels in dB, -inf for empty slots.
        masker_bark: ``[F, M]`` masker positions in Bark.
        masking_index: ``[F, M]`` masking indices in dB.
        bark: ``[K]`` Bark value of every bin.

    Returns:
        ``[F, K]`` summed masking power (``10^(dB/10)`` units; 0 where nothing masks).
    """
    valid = torch.isfinite(masker_db)
    level = torch.where(valid, masker_db, torch.zeros_like(masker_db))
    lower_slope = (0.4 * level + 6.0).unsqueeze(-1)  # [F, M, 1]
    upper_slope = (17.0 - 0.15 * level).unsqueeze(-1)
    dz = bark.view(1, 1, -1) - masker_bark.unsqueeze(-1)  # [F, M, K], maskee - masker
    exponent = (level + masking_index).unsqueeze(-1) + lower_slope * dz.clamp(-1.0, 0.0)
    exponent += 17.0 * (dz + 1.0).clamp(max=0.0)
    exponent -= 17.0 * dz.clamp(0.0, 1.0)
    exponent -= upper_slope * (dz - 1.0).clamp(min=0.0)
    power = exponent.mul_(0.1 * math.log(10.0)).exp_()  # 10^(dB / 10), in place: [F, M, K] is the big one
    in_range = (dz >= _SPREAD_LOW_BARK) & (dz < _SPREAD_HIGH_BARK) & valid.unsqueeze(-1)
    return power.masked_fill_(~in_range, 0.0).sum(dim=1)


class PsychoacousticLoss(nn.Module):
    """The two psychoacoustic loss terms of Zhen et al. (IEEE SPL 2020).

    With ``P`` the reference power spectrum (dB, ``power_spectrum_db``) and ``M`` the reference's
    global masking threshold (dB, ``global_masking_threshold``), both computed without gradient:

    * ``priority`` (priority weighting, the paper's first term): per-bin weight
      ``w = log10(10^(0.1 P) / 10^(0.1 M) + 1)``, i.e. ``log10(1 + signal-to-mask ratio)``: about 0
      on bins far below the threshold (inaudible), growing with the dB level above it. The
      weights are normalised to mean 1 over the whole batch (all frames and bins), so silent
      frames keep their small weight and the term has the scale of a plain spectral MSE. The
      weighted error is ``mean(w * (S_ref - S_dec)^2)`` with
      ``priority_domain="magnitude"`` (default): ``S`` = spectral magnitude relative to a
      full-scale sinusoid (``|X| / (sum(w)/2)``, 1.0 for a full-scale tone), or
      ``priority_domain="db"``: ``S`` = the power spectrum in dB, as in the authors' released
      code (cocosci/pam-nac, ``smr_loss``).
    * ``noise_modulation`` (the paper's second term): the coding noise ``N = |FFT(w (x_ref -
      x_dec))|^2`` on the same dB scale is penalised only where it exceeds the threshold. With
      ``noise_domain="power"`` (default, the paper / released code ``nmr_max_mean_loss``) the
      per-bin penalty is ``relu(10^(0.1 N) / 10^(0.1 M) - 1)`` (noise-to-mask power ratio above 1);
      with ``noise_domain="db"`` it is ``relu(N - M)`` in dB, which is bounded and gentler for
      training from scratch (the power ratio is unbounded: noise 70 dB above the threshold
      costs 1e7). ``noise_reduction="max"`` (default, as in the paper: it bounds the
      worst bin, i.e. raises the lower bound of the mask-to-noise ratio) takes the maximum over
      bins per frame, then the mean over frames; ``"mean"`` averages over frames and bins.

    Both terms are 0 when ``decoded_frames == reference_frames`` and differentiable w.r.t.
    ``decoded_frames``.

    Args:
        sample_rate: sampling rate in Hz (16000: the codec recipe's speech rate).
        n_fft: FFT size and frame length (512: the CMRL frame).
        priority_domain: ``"magnitude"`` (default: bounded errors, the brief of this recipe) or
            ``"db"`` (the authors' code).
        noise_domain: ``"power"`` (default: the paper's ratio) or ``"db"``.
        noise_reduction: ``"max"`` over bins (default: the paper) or ``"mean"``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 512,
        priority_domain: Literal["magnitude", "db"] = "magnitude",
        noise_domain: Literal["power", "db"] = "power",
        noise_reduction: Literal["max", "mean"] = "max",
    ) -> None:
        super().__init__()
        _check_config(sample_rate, n_fft)
        if priority_domain not in ("magnitude", "db"):
            raise ValueError(f"priority_domain must be 'magnitude' or 'db', got {priority_domain!r}")
        if noise_domain not in ("power", "db"):
            raise ValueError(f"noise_domain must be 'power' or 'db', got {noise_domain!r}")
        if noise_reduction not in ("max", "mean"):
            raise ValueError(f"noise_reduction must be 'max' or 'mean', got {noise_reduction!r}")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.priority_domain = priority_domain
        self.noise_domain = noise_domain
        self.noise_reduction = noise_reduction

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, priority_domain={self.priority_domain!r}, "
            f"noise_domain={self.noise_domain!r}, noise_reduction={self.noise_reduction!r}"
        )

    def forward(self, reference_frames: Tensor, decoded_frames: Tensor) -> dict[str, Tensor]:
        """Both loss terms for a batch of frames.

        Args:
            reference_frames: ``[F, n_fft]`` clean frames (no gradient is taken through them).
            decoded_frames: ``[F, n_fft]`` codec output frames, same shape.

        Returns:
            ``{"priority": scalar, "noise_modulation": scalar}`` tensors, differentiable w.r.t.
            ``decoded_frames``.

        Raises:
            ValueError: for a frames tensor that is not floating-point ``[F, n_fft]``, or shapes
                that differ.
        """
        _check_frames(reference_frames, self.n_fft, "reference_frames")
        _check_frames(decoded_frames, self.n_fft, "decoded_frames")
        if decoded_frames.shape != reference_frames.shape:
            raise ValueError(
                f"decoded_frames shape {tuple(decoded_frames.shape)} differs from reference_frames shape "
                f"{tuple(reference_frames.shape)}"
            )
        reference = reference_frames.detach().to(decoded_frames.dtype)
        with torch.no_grad():
            threshold_db = _global_masking_threshold(reference, self.sample_rate, self.n_fft)  # [F, K]
            reference_power = _relative_power(reference)  # [F, K]
            reference_db = FULL_SCALE_DB + 10.0 * torch.log10(reference_power + _POWER_FLOOR)
            # log10(10^(0.1 P) / 10^(0.1 M) + 1), computed from the dB difference (no overflow).
            weight = torch.log10(torch.pow(10.0, 0.1 * (reference_db - threshold_db)) + 1.0)
            weight = weight / weight.mean().clamp(min=torch.finfo(weight.dtype).tiny)

        decoded_power = _relative_power(decoded_frames)
        if self.priority_domain == "magnitude":
            error = torch.sqrt(reference_power + _POWER_FLOOR) - torch.sqrt(decoded_power + _POWER_FLOOR)
        else:
            error = reference_db - (FULL_SCALE_DB + 10.0 * torch.log10(decoded_power + _POWER_FLOOR))
        priority = (weight * error**2).mean()

        noise_power = _relative_power(reference - decoded_frames)  # [F, K], full-scale tone = 1
        if self.noise_domain == "power":
            mask_power = torch.pow(10.0, 0.1 * (threshold_db - FULL_SCALE_DB))  # same reference
            excess = torch.relu(noise_power / mask_power - 1.0)
        else:
            noise_db = FULL_SCALE_DB + 10.0 * torch.log10(noise_power + _POWER_FLOOR)
            excess = torch.relu(noise_db - threshold_db)
        if self.noise_reduction == "max":
            noise_modulation = excess.amax(dim=1).mean()
        else:
            noise_modulation = excess.mean()
        return {"priority": priority, "noise_modulation": noise_modulation}
