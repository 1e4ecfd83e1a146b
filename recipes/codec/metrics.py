"""Objective quality metrics of the speech codec, and loudness normalisation.

All metrics take a clean ``reference`` and a decoded ``estimate``: 1-D float arrays (numpy or torch, any device)
of equal length, in the usual [-1, 1] full-scale convention. Anything else raises ``ValueError`` naming the
argument, and so does a NaN or infinity (a diverged model should be noticed, not averaged).

- ``snr_db``: global SNR.
- ``segmental_snr_db``: mean of per-frame SNRs, each clamped; frames of reference silence are skipped.
- ``pesq_wb``: wide-band PESQ (ITU-T P.862.2, MOS-LQO, about 1.0-4.64) from the ``pesq`` package; 16 kHz only.
- ``stoi``: short-time objective intelligibility (Taal et al. 2011, about 0-1) from ``pystoi``; any sample rate
  (pystoi resamples to 10 kHz itself).
- ``codec_metrics``: all four in one dict.

PESQ and STOI return NaN (with a warning) instead of a meaningless number when the signal holds no speech they
can score: PESQ's "no utterances detected" error, and pystoi's too-short case (it would return 1e-5).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

__all__ = [
    "snr_db",
    "segmental_snr_db",
    "pesq_wb",
    "stoi",
    "codec_metrics",
    "loudness_normalize",
    "active_rms_dbfs",
]

_EPS = 1e-20  # guards log10 of exact zeros; far below the energy of one 16-bit LSB over a frame
_warned_pesq: set[tuple[str, str]] = set()  # (problem, utterance) pairs already warned about: warn once each


def _as_1d(array: Any, name: str) -> np.ndarray:
    """``array`` as a 1-D float64 numpy array; ValueError naming ``name`` otherwise."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().to("cpu").double().numpy()
    try:
        out = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a 1-D float array: {error}") from None
    if out.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one mono waveform), got shape {tuple(out.shape)}")
    if out.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return out


def _pair(reference: Any, estimate: Any) -> tuple[np.ndarray, np.ndarray]:
    ref, est = _as_1d(reference, "reference"), _as_1d(estimate, "estimate")
    if ref.size != est.size:
        raise ValueError(f"reference has {ref.size} samples but estimate has {est.size}; they must be equal "
                         "(trim the decoder output to the input length)")
    return ref, est


def snr_db(reference: Any, estimate: Any) -> float:
    """Global signal-to-noise ratio ``10 log10(sum(ref^2) / sum((ref - est)^2))`` in dB.

    Args:
        reference: Clean waveform ``[T]``.
        estimate: Decoded waveform ``[T]``.

    Returns:
        The SNR; ``+inf`` for an exact reconstruction, ``-inf`` for an all-zero reference with a non-zero estimate,
        NaN when both are all zero.
    """
    ref, est = _pair(reference, estimate)
    signal, noise = float(np.dot(ref, ref)), float(np.dot(ref - est, ref - est))
    if noise == 0.0:
        return math.inf if signal > 0.0 else math.nan
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def segmental_snr_db(
    reference: Any,
    estimate: Any,
    frame: int = 320,  # 20 ms at 16 kHz: the usual segment length
    clamp: tuple[float, float] = (-10.0, 35.0),  # the classic limits (Quackenbush et al. 1988)
    silence_db: float | None = 40.0,  # frames this far below the loudest frame count as silence (skipped)
) -> float:
    """Segmental SNR: mean over frames of the per-frame SNR, each clamped to ``clamp``.

    Non-overlapping frames of ``frame`` samples; a final partial frame is dropped (a signal shorter than one frame
    is one frame). Reference frames whose energy is more than ``silence_db`` below the loudest frame's, or exactly
    zero, are skipped: in silence the SNR measures only the noise floor and would pull the mean to the lower clamp
    whatever the codec does in speech. A frame reconstructed exactly scores the upper clamp.

    Args:
        reference: Clean waveform ``[T]``.
        estimate: Decoded waveform ``[T]``.
        frame: Frame length in samples.
        clamp: ``(low, high)`` limits of the per-frame SNR in dB.
        silence_db: Silence threshold relative to the loudest frame; None keeps every non-zero frame.

    Returns:
        The segmental SNR in dB; NaN if every frame is silent.
    """
    ref, est = _pair(reference, estimate)
    if frame < 1:
        raise ValueError(f"frame must be >= 1, got {frame}")
    num_frames = max(ref.size // frame, 1)
    length = min(num_frames * frame, ref.size)
    ref_frames = ref[:length].reshape(num_frames, -1)
    err_frames = (ref - est)[:length].reshape(num_frames, -1)
    signal = np.einsum("ft,ft->f", ref_frames, ref_frames)
    noise = np.einsum("ft,ft->f", err_frames, err_frames)
    active = signal > 0.0
    if silence_db is not None and active.any():
        active &= signal >= signal.max() * 10.0 ** (-silence_db / 10.0)
    if not active.any():
        return math.nan
    with np.errstate(divide="ignore"):
        per_frame = 10.0 * np.log10(signal[active] / noise[active])  # +inf where the frame is exact
    return float(np.clip(per_frame, clamp[0], clamp[1]).mean())


def pesq_wb(reference: Any, estimate: Any, sample_rate: int = 16000, *, name: str | None = None) -> float:
    """Wide-band PESQ (P.862.2 MOS-LQO) of ``estimate`` against ``reference``.

    Args:
        reference: Clean waveform ``[T]`` at 16 kHz.
        estimate: Decoded waveform ``[T]``.
        sample_rate: Must be 16000: wide-band PESQ is defined at 16 kHz only (resample first).
        name: Utterance name for the warning below.

    Returns:
        The score (about 1.0-4.64; identical signals give about 4.64), or NaN when PESQ detects no utterance
        (silence, or too short a signal: the pesq package's ``NoUtterancesError``), the signals are shorter than
        0.25 s (``BufferTooShortError``) or the estimate is all zeros (where the pesq package crashes). A
        ``RuntimeWarning`` naming the utterance and the problem is emitted the first time for each ``name`` and
        kind of problem (once per kind for unnamed calls), not on every call.
    """
    ref, est = _pair(reference, estimate)
    if sample_rate != 16000:
        raise ValueError(f"wide-band PESQ needs 16 kHz audio, got sample_rate={sample_rate}; resample first")
    from pesq import BufferTooShortError, NoUtterancesError, pesq

    problem = None
    if ref.size < 16000 // 4:
        problem = "shorter than the 0.25 s PESQ needs"  # what pesq's BufferTooShortError would say
    elif not ref.any():
        problem = "no utterance detected (the reference is silent)"  # pesq would divide by a zero peak
    elif not est.any():
        problem = "the estimate is all zeros"  # pesq's level alignment fails with a NaN ValueError
    else:
        try:
            return float(pesq(16000, ref, est, "wb"))
        except NoUtterancesError:
            problem = "no utterance detected"
        except BufferTooShortError:  # the pesq package's own length rule, should it differ from the check above
            problem = "too short for PESQ"
    key = (problem, name if name is not None else "")
    if key not in _warned_pesq:
        _warned_pesq.add(key)
        where = f"utterance {name!r}" if name is not None else "an unnamed utterance"
        warnings.warn(f"PESQ is NaN for {where}: {problem}", RuntimeWarning, stacklevel=2)
    return math.nan


def stoi(reference: Any, estimate: Any, sample_rate: int = 16000, *, name: str | None = None) -> float:
    """STOI (classic, ``extended=False``) of ``estimate`` against ``reference``.

    Args:
        reference: Clean waveform ``[T]``.
        estimate: Decoded waveform ``[T]``.
        sample_rate: Sample rate of both in Hz.
        name: Utterance name for the warning below.

    Returns:
        The score (about 0-1; identical signals give 1), or NaN with a warning when fewer than 30 STOI frames
        (~384 ms of speech) remain after pystoi drops silent frames -- pystoi itself would return 1e-5.
    """
    ref, est = _pair(reference, estimate)
    from pystoi import stoi as pystoi_stoi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(pystoi_stoi(ref, est, sample_rate, extended=False))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        where = f"utterance {name!r}" if name is not None else "the utterance"
        warnings.warn(f"{where} has too little speech for STOI (< 30 frames after silence removal); its STOI is NaN",
                      RuntimeWarning, stacklevel=2)
        return math.nan
    for w in caught:  # pass on anything else pystoi said
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return score


def codec_metrics(reference: Any, estimate: Any, sample_rate: int, *, name: str | None = None) -> dict[str, float]:
    """All objective metrics of one utterance.

    Args:
        reference: Clean waveform ``[T]``.
        estimate: Decoded waveform ``[T]``.
        sample_rate: Sample rate in Hz (16000 for PESQ).
        name: Utterance name, for warnings.

    Returns:
        ``{"snr": dB, "segsnr": dB, "pesq": MOS-LQO, "stoi": 0-1}`` (NaN where a metric has nothing to score).
    """
    ref, est = _pair(reference, estimate)
    return {
        "snr": snr_db(ref, est),
        "segsnr": segmental_snr_db(ref, est, frame=max(1, round(0.02 * sample_rate))),  # 20 ms at any rate
        "pesq": pesq_wb(ref, est, sample_rate, name=name),
        "stoi": stoi(ref, est, sample_rate, name=name),
    }


# ------------------------------------------------------------------------------------------- loudness


def _active_power(wave: np.ndarray, frame: int, gate_db: float, floor_dbfs: float) -> float | None:
    """Mean power of the active frames of ``wave``, or None if there are none."""
    num_frames = max(wave.size // frame, 1)
    length = min(num_frames * frame, wave.size)
    power = np.mean(wave[:length].reshape(num_frames, -1) ** 2, axis=1)
    loud = power > 10.0 ** (floor_dbfs / 10.0)
    if not loud.any():
        return None
    # Relative gate (as in ITU-R BS.1770): drop frames far below the mean of the loud ones.
    active = loud & (power >= power[loud].mean() * 10.0 ** (-gate_db / 10.0))
    return float(power[active].mean())


def active_rms_dbfs(
    wave: Any,
    frame: int = 320,  # 20 ms at 16 kHz
    gate_db: float = 20.0,  # speech syllables vary ~10-15 dB around the mean; pauses and breaths sit >20 dB below
    floor_dbfs: float = -70.0,  # absolute gate: digital silence and dither never count as active
) -> float:
    """RMS level of the active (non-silent) part of ``wave`` in dBFS (0 dBFS = a full-scale square wave).

    Frames of ``frame`` samples (non-overlapping; a partial last frame is dropped) are active when their power is
    above ``floor_dbfs`` and no more than ``gate_db`` below the mean power of the frames above ``floor_dbfs``.

    Args:
        wave: Waveform ``[T]``.
        frame: Frame length in samples.
        gate_db: Relative gate in dB.
        floor_dbfs: Absolute gate in dBFS.

    Returns:
        The level in dBFS; ``-inf`` when no frame is active.
    """
    power = _active_power(_as_1d(wave, "wave"), frame, gate_db, floor_dbfs)
    return -math.inf if power is None else 10.0 * math.log10(power)


def loudness_normalize(
    wave: Any,
    target_dbfs: float = -26.0,  # the ITU-T P.56 active speech level used for codec test material
    *,
    frame: int = 320,  # 20 ms at 16 kHz
    gate_db: float = 20.0,  # see active_rms_dbfs
    floor_dbfs: float = -70.0,  # see active_rms_dbfs
    peak_limit: float = 0.999,  # just under full scale, so a 16-bit write cannot wrap
) -> Any:
    """Scale ``wave`` so its active-speech RMS (``active_rms_dbfs``) is ``target_dbfs``, without clipping.

    A simplified P.56-style level: the RMS is taken over active frames only, so leading/trailing silence and
    pauses do not make a sparse utterance look quiet (and be over-amplified). One gain is applied to the whole
    signal -- no compression. Peak guard: if that gain would push the peak above ``peak_limit``, the gain is
    lowered so the peak lands exactly on ``peak_limit``; the result is then quieter than the target (never
    clipped). A signal with no active frame is returned unchanged.

    Args:
        wave: Waveform ``[T]`` (numpy or torch).
        target_dbfs: Target active RMS level in dBFS.
        frame: Frame length in samples for the activity gate.
        gate_db: Relative gate in dB.
        floor_dbfs: Absolute gate in dBFS.
        peak_limit: Largest allowed absolute sample value after scaling.

    Returns:
        The scaled waveform, the same type, dtype (and device for torch) as ``wave``.
    """
    samples = _as_1d(wave, "wave")
    power = _active_power(samples, frame, gate_db, floor_dbfs)
    if power is None:
        gain = 1.0
    else:
        gain = 10.0 ** (target_dbfs / 20.0) / math.sqrt(power)
        peak = float(np.max(np.abs(samples)))
        if peak * gain > peak_limit:
            gain = peak_limit / peak
    if hasattr(wave, "detach"):  # torch: scale in float64 then cast back, on the original device
        import torch

        scaled = torch.from_numpy(samples * gain).to(dtype=wave.dtype, device=wave.device)
        return torch.clamp(scaled, -peak_limit, peak_limit) if wave.dtype.is_floating_point else scaled
    dtype = wave.dtype if isinstance(wave, np.ndarray) and wave.dtype.kind == "f" else np.float64
    return np.clip(samples * gain, -peak_limit, peak_limit).astype(dtype)
