"""Tests of the codec's objective metrics and loudness normalisation (recipes/codec/metrics.py).

PESQ and STOI run on a synthetic speech-like signal (a pitch-varying glottal pulse train through changing formant
resonators, with syllable envelopes and a pause), which wide-band PESQ and STOI both accept, so the tests need no
speech corpus.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.signal import lfilter

from recipes.codec.metrics import (
    active_rms_dbfs,
    codec_metrics,
    loudness_normalize,
    pesq_wb,
    segmental_snr_db,
    snr_db,
    stoi,
)

RATE = 16000


def speech_like(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A voiced, syllabic signal of ``seconds`` at 16 kHz, peak 0.3."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * np.sin(2 * np.pi * 3.1 * t)  # intonation, Hz
    pulses = np.diff(np.floor(np.cumsum(f0 / RATE)), prepend=0.0)  # one impulse per glottal period
    source = lfilter([1.0], [1.0, -0.95], pulses) + 0.02 * rng.standard_normal(n)  # spectral tilt + aspiration
    vowels = [(700, 1200, 2600), (300, 2300, 3000), (500, 900, 2400), (400, 1700, 2500)]  # formants, Hz
    syllable = RATE // 4
    out = np.zeros(n)
    for start in range(0, n, syllable):
        segment = source[start : start + syllable]
        for formant in vowels[rng.integers(len(vowels))]:
            r, theta = math.exp(-math.pi * 100 / RATE), 2 * math.pi * formant / RATE  # 100 Hz bandwidth
            segment = lfilter([1 - r], [1, -2 * r * math.cos(theta), r * r], segment)
        out[start : start + syllable] = segment
    out *= np.sin(np.pi * np.arange(n) / syllable) ** 2  # syllable envelope
    out[int(1.25 * RATE) : int(1.75 * RATE)] = 0.0  # a pause
    return 0.3 * out / np.abs(out).max()


def _noise_at_snr(signal: np.ndarray, snr: float, seed: int = 1) -> np.ndarray:
    """White noise scaled so that ``10 log10(|signal|^2 / |noise|^2) == snr`` exactly."""
    noise = np.random.default_rng(seed).standard_normal(signal.size)
    return noise * math.sqrt(np.dot(signal, signal) / np.dot(noise, noise) / 10 ** (snr / 10))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return speech_like()


@pytest.mark.parametrize("target", [-5.0, 0.0, 12.5, 30.0])
def test_snr_matches_the_constructed_ratio(speech, target):
    assert snr_db(speech, speech + _noise_at_snr(speech, target)) == pytest.approx(target, abs=0.1)


def test_snr_edge_cases_and_torch_input(speech):
    torch = pytest.importorskip("torch")
    assert snr_db(speech, speech) == math.inf
    assert snr_db(np.zeros(10), np.ones(10)) == -math.inf
    noisy = speech + _noise_at_snr(speech, 10.0)
    assert snr_db(torch.from_numpy(speech).float(), torch.from_numpy(noisy).float()) == pytest.approx(10.0, abs=0.01)


def test_segmental_snr_clamps_and_skips_silence(speech):
    assert segmental_snr_db(speech, speech) == 35.0  # every frame exact: the upper clamp
    assert segmental_snr_db(speech, speech, clamp=(-5.0, 20.0)) == 20.0
    assert segmental_snr_db(speech, 1000.0 * speech) == -10.0  # error ~60 dB above the signal: the lower clamp

    # Loud first half, near-silent (-60 dB) second half; the estimate is exact in the loud half and noisy in the
    # quiet one. The quiet frames are 60 dB below the loudest, beyond the default 40 dB silence threshold: they are
    # skipped and only exact frames remain. Keeping them (silence_db=None) adds frames at about 0 dB.
    rng = np.random.default_rng(2)
    reference = np.concatenate([0.1 * rng.standard_normal(RATE), 1e-4 * rng.standard_normal(RATE)])
    estimate = reference.copy()
    estimate[RATE:] += 1e-4 * rng.standard_normal(RATE)
    assert segmental_snr_db(reference, estimate) == 35.0
    everything = segmental_snr_db(reference, estimate, silence_db=None)
    assert 10.0 < everything < 25.0  # half the frames at 35 dB, half near 0 dB (error power = quiet reference power)
    assert math.isnan(segmental_snr_db(np.zeros(RATE), np.ones(RATE)))  # nothing but silence to score


def test_pesq_high_for_identical_and_lower_for_noisy(speech):
    clean = pesq_wb(speech, speech)
    assert clean > 4.0  # P.862.2 maps a perfect match to ~4.64
    noisy = pesq_wb(speech, speech + _noise_at_snr(speech, 10.0))
    assert noisy < clean - 1.0  # white noise at 10 dB SNR is clearly audible


def test_stoi_one_for_identical_and_lower_for_noisy(speech):
    assert stoi(speech, speech) == pytest.approx(1.0, abs=1e-6)  # correlation of identical envelopes
    noisy = stoi(speech, speech + _noise_at_snr(speech, 0.0))
    assert 0.0 < noisy < 0.9


def test_codec_metrics_has_all_four(speech):
    noisy = speech + _noise_at_snr(speech, 20.0)
    metrics = codec_metrics(speech, noisy, RATE)
    assert set(metrics) == {"snr", "segsnr", "pesq", "stoi"}
    assert metrics["snr"] == pytest.approx(20.0, abs=0.1)
    assert metrics["segsnr"] == segmental_snr_db(speech, noisy)  # 20 ms frames at 16 kHz: the default 320
    assert metrics["pesq"] == pesq_wb(speech, noisy) and metrics["stoi"] == stoi(speech, noisy)


def test_pesq_nan_with_one_warning_per_utterance(speech):
    # A 50 ms burst in a second of silence is too little speech for PESQ's utterance detection.
    rng = np.random.default_rng(0)
    reference = np.zeros(RATE)
    reference[8000:8800] = rng.standard_normal(800)
    estimate = reference + 1e-3 * rng.standard_normal(RATE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert math.isnan(pesq_wb(reference, estimate, name="burst-utt"))
        assert math.isnan(pesq_wb(reference, estimate, name="burst-utt"))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "burst-utt" in messages[0] and "no utterance" in messages[0]

    with pytest.warns(RuntimeWarning, match="silent-utt"):
        assert math.isnan(pesq_wb(np.zeros(RATE), np.zeros(RATE), name="silent-utt"))
    with pytest.warns(RuntimeWarning, match="all zeros"):
        assert math.isnan(pesq_wb(speech, np.zeros_like(speech), name="dead-decoder"))
    with pytest.warns(RuntimeWarning, match="0.25 s"):
        assert math.isnan(pesq_wb(speech[:2000], speech[:2000], name="short-utt"))


def test_stoi_nan_when_too_short(speech):
    with pytest.warns(RuntimeWarning, match="tiny-utt"):
        assert math.isnan(stoi(speech[:3000], speech[:3000], name="tiny-utt"))  # 0.19 s < 30 STOI frames


def test_inputs_are_validated_by_name(speech):
    with pytest.raises(ValueError, match="reference must be 1-D"):
        snr_db(speech[None, :], speech)
    with pytest.raises(ValueError, match="estimate must be 1-D"):
        stoi(speech, np.stack([speech, speech]))
    with pytest.raises(ValueError, match="reference has 48000 samples but estimate has 47999"):
        pesq_wb(speech, speech[:-1])
    bad = speech.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match="estimate contains NaN"):
        segmental_snr_db(speech, bad)
    with pytest.raises(ValueError, match="16 kHz"):
        pesq_wb(speech, speech, sample_rate=8000)


def _with_silences(active: np.ndarray, seed: int = 4) -> tuple[np.ndarray, slice]:
    """``active`` between 1 s of -80 dBFS noise on each side; returns the signal and where ``active`` is."""
    noise = 1e-4 * np.random.default_rng(seed).standard_normal(2 * RATE)
    return np.concatenate([noise[:RATE], active, noise[RATE:]]), slice(RATE, RATE + active.size)


def test_loudness_normalize_hits_the_target_on_the_active_part():
    # Active part: 1 s of white noise at -40 dBFS RMS (whole 20 ms frames, constant level, so every frame is
    # active); silences of 2 s in all would pull a plain RMS 4.8 dB down, and a plain normalisation that much too loud.
    active = np.random.default_rng(3).standard_normal(RATE)
    active *= 10 ** (-40 / 20) / math.sqrt(np.mean(active**2))
    wave, where = _with_silences(active)
    out = loudness_normalize(wave, target_dbfs=-26.0)
    level = 10 * math.log10(np.mean(out[where] ** 2))
    assert level == pytest.approx(-26.0, abs=0.05)
    assert active_rms_dbfs(out) == pytest.approx(-26.0, abs=0.05)
    assert out.dtype == wave.dtype and np.abs(out).max() < 1.0
    # One gain for the whole signal: the silences are scaled by the same factor (no gating of the output).
    np.testing.assert_allclose(out / wave, (out / wave)[0])


def test_loudness_normalize_never_clips_and_keeps_the_type():
    torch = pytest.importorskip("torch")
    # A quiet signal (-40 dBFS) with one spike at 0.5: the -26 dBFS gain (x5) would put the spike at 2.5.
    active = np.random.default_rng(5).standard_normal(RATE)
    active *= 10 ** (-40 / 20) / math.sqrt(np.mean(active**2))
    active[1000] = 0.5
    wave, _ = _with_silences(active)
    out = loudness_normalize(wave.astype(np.float32))
    assert out.dtype == np.float32
    assert np.abs(out).max() <= 1.0
    assert np.abs(out).max() == pytest.approx(0.999, abs=1e-6)  # the peak guard's limit: as loud as allowed
    tensor_out = loudness_normalize(torch.from_numpy(wave).float())
    assert isinstance(tensor_out, torch.Tensor) and tensor_out.dtype == torch.float32
    assert float(tensor_out.abs().max()) <= 1.0
    silent = np.zeros(RATE)
    np.testing.assert_array_equal(loudness_normalize(silent), silent)  # nothing active: unchanged


def test_loudness_normalize_on_speech_like_signal(speech):
    out = loudness_normalize(speech, target_dbfs=-26.0)
    assert active_rms_dbfs(out) == pytest.approx(-26.0, abs=0.01)
    assert np.abs(out).max() <= 1.0
    # The pause and syllable valleys are excluded, so the gated level is above the plain RMS of the whole signal.
    assert active_rms_dbfs(out) > 10 * math.log10(np.mean(out**2))
