"""Tests for recipes/codec/psychoacoustic.py (MPEG-1 model 1 masking threshold, Zhen et al. loss).

Expected values are derived here from the published formulas (Terhardt's threshold in quiet,
Zwicker's Bark scale, the model-1 masking indices and spreading function) and from the 96-dB
normalisation, not read back from the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from recipes.codec.psychoacoustic import (
    PsychoacousticLoss,
    absolute_threshold_db,
    global_masking_threshold,
    hz_to_bark,
    power_spectrum_db,
)

SR = 16000
N_FFT = 512
BIN_HZ = SR / N_FFT  # 31.25 Hz: 1 kHz and 4 kHz fall exactly on bins 32 and 128
FREQS = [k * BIN_HZ for k in range(N_FFT // 2 + 1)]


def tone(freq_hz: float, amplitude: float, frames: int = 1) -> torch.Tensor:
    """[frames, N_FFT] sinusoid frames."""
    t = torch.arange(N_FFT, dtype=torch.float64) / SR
    return (amplitude * torch.sin(2 * math.pi * freq_hz * t)).float().repeat(frames, 1)


def terhardt_db(f_hz: float) -> float:
    """Terhardt's threshold in quiet, written out independently of the module."""
    khz = max(f_hz, 20.0) / 1000.0
    return 3.64 * khz**-0.8 - 6.5 * math.exp(-0.6 * (khz - 3.3) ** 2) + 1e-3 * khz**4


def zwicker_bark(f_hz: float) -> float:
    return 13.0 * math.atan(0.00076 * f_hz) + 3.5 * math.atan((f_hz / 7500.0) ** 2)


BARKS = [zwicker_bark(f) for f in FREQS]
ATH = torch.tensor([terhardt_db(f) for f in FREQS])


def bin_at_bark(z: float) -> int:
    """The FFT bin whose Bark value is closest to z."""
    return min(range(len(BARKS)), key=lambda k: abs(BARKS[k] - z))


# ------------------------------------------------------------------------------------------------
# Scales and threshold in quiet
# ------------------------------------------------------------------------------------------------


def test_absolute_threshold_matches_terhardt():
    for f in (50.0, 100.0, 1000.0, 3300.0, 4000.0, 8000.0):
        assert float(absolute_threshold_db(f)) == pytest.approx(terhardt_db(f), abs=1e-3)
    # Shape of the curve: about 40 dB at 50 Hz, a few dB at 1 kHz, negative (the ear's most
    # sensitive region) in 3-4 kHz, where the minimum of the 20 Hz - 8 kHz range lies.
    assert float(absolute_threshold_db(50.0)) > 35.0
    assert 2.0 < float(absolute_threshold_db(1000.0)) < 5.0
    grid = torch.linspace(20.0, 8000.0, 7981)
    f_min = float(grid[absolute_threshold_db(grid).argmin()])
    assert 3000.0 < f_min < 4000.0
    assert float(absolute_threshold_db(grid).min()) < -4.0
    # DC is clamped to the 20 Hz value instead of diverging.
    at_dc = float(absolute_threshold_db(torch.tensor([0.0])))
    assert math.isfinite(at_dc) and at_dc == pytest.approx(terhardt_db(20.0), abs=1e-3)


def test_hz_to_bark_matches_zwicker():
    for f in (100.0, 1000.0, 4000.0, 8000.0):
        assert float(hz_to_bark(f)) == pytest.approx(zwicker_bark(f), abs=1e-4)
    # 1 kHz sits near the 9th critical band, 8 kHz near the 22nd.
    assert 8.0 < float(hz_to_bark(1000.0)) < 9.0
    assert 21.0 < float(hz_to_bark(8000.0)) < 22.0


def test_power_spectrum_full_scale_sine_is_96_db():
    # The 96-dB normalisation: a full-scale sinusoid centred on a bin reads 96 dB there, a
    # half-scale one 6.02 dB less, and the Hann window puts its neighbours 6.02 dB lower still.
    full = power_spectrum_db(tone(1000.0, 1.0), N_FFT)[0]
    half = power_spectrum_db(tone(1000.0, 0.5), N_FFT)[0]
    assert float(full[32]) == pytest.approx(96.0, abs=0.01)
    assert float(half[32]) == pytest.approx(96.0 - 6.02, abs=0.01)
    assert float(half[31]) == pytest.approx(96.0 - 12.04, abs=0.01)


# ------------------------------------------------------------------------------------------------
# Global masking threshold
# ------------------------------------------------------------------------------------------------


def test_tone_threshold_peaks_at_masker_and_falls_off_asymmetrically():
    """The issue's test: a 1 kHz tone lifts the threshold above the ATH around 1 kHz, and the
    threshold falls off on both sides, much faster below the masker than above it."""
    threshold = global_masking_threshold(tone(1000.0, 0.5), SR, N_FFT)[0]
    assert threshold.shape == (N_FFT // 2 + 1,)
    z0 = zwicker_bark(1000.0)
    k0 = 32

    # Level at the masker from the model: the tonal masker is the power sum of bins 31..33:
    # 89.98 dB + 2 x 83.96 dB = 89.98 + 10 log10(1.5) dB; masking index -6.025 - 0.275 z; the
    # spreading function is 0 dB at dz = 0 and the ATH (~3 dB) is negligible.
    masker_db = 96.0 + 20 * math.log10(0.5) + 10 * math.log10(1.5)
    expected_peak = masker_db - 6.025 - 0.275 * z0  # ~83.4 dB
    assert float(threshold[k0]) == pytest.approx(expected_peak, abs=0.3)

    # Within one critical band of 1 kHz the tone masks far above the threshold in quiet:
    # the lowest point there is the -1 Bark edge, 83.4 - (0.4 X + 6) = ~40.7 dB vs ATH ~4 dB.
    band = [k for k in range(len(BARKS)) if abs(BARKS[k] - z0) <= 1.0]
    assert len(band) >= 8
    assert bool(torch.all(threshold[band] - ATH[band] > 20.0))

    # Monotone fall-off away from the masker over the spreading function's range (-3..+6 Bark;
    # the ATH changes by < 2 dB/Bark there, less than the spreading slopes).
    below = [k for k in range(k0, -1, -1) if BARKS[k] >= z0 - 3.0]
    above = [k for k in range(k0, len(BARKS)) if BARKS[k] <= z0 + 6.0]
    for path in (below, above):
        values = threshold[path]
        assert bool(torch.all(values[1:] <= values[:-1] + 1e-4)), path

    # Strictly lower at ±2 and ±4 Bark than at the masker, in dB above the ATH as well.
    excess = threshold - ATH
    for dz in (-4.0, -2.0, 2.0, 4.0):
        k = bin_at_bark(z0 + dz)
        assert float(excess[k]) < float(excess[k0]) - 10.0, dz
    # At -4 Bark the tone is outside the spreading function's [-3, 8) range: only the ATH remains.
    k_minus4 = bin_at_bark(z0 - 4.0)
    assert float(threshold[k_minus4]) == pytest.approx(float(ATH[k_minus4]), abs=0.01)

    # Asymmetry. Expected drops over 2 Bark: below 17 + (0.4 X + 6) = ~59.7 dB, above
    # 17 + (17 - 0.15 X) = ~20.2 dB.
    k_m2, k_p2 = bin_at_bark(z0 - 2.0), bin_at_bark(z0 + 2.0)
    drop_below = float(threshold[k0] - threshold[k_m2])
    drop_above = float(threshold[k0] - threshold[k_p2])
    assert drop_below > drop_above + 25.0
    # Slopes: 17 dB/Bark between -2 and -1 Bark; 17 - 0.15 X = ~3.2 dB/Bark beyond +2 Bark.
    k_m1, k_p4 = bin_at_bark(z0 - 1.0), bin_at_bark(z0 + 4.0)
    slope_below = float(threshold[k_m1] - threshold[k_m2]) / (BARKS[k_m1] - BARKS[k_m2])
    slope_above = float(threshold[k_p2] - threshold[k_p4]) / (BARKS[k_p4] - BARKS[k_p2])
    assert 14.0 < slope_below < 20.0
    assert 17.0 - 0.15 * masker_db - 0.5 < slope_above < 17.0 - 0.15 * masker_db + 0.5
    assert slope_below > 3 * slope_above


def test_louder_tone_raises_threshold_by_level_difference():
    quiet = global_masking_threshold(tone(1000.0, 0.25), SR, N_FFT)[0]
    loud = global_masking_threshold(tone(1000.0, 0.5), SR, N_FFT)[0]
    level_step = 20 * math.log10(2.0)  # 6.02 dB
    # At the masker and within 1 Bark above it the threshold is level + index - 17 dz: it moves
    # with the level exactly (the ATH, ~80 dB lower, does not matter).
    for k in (32, 33, 36):
        assert float(loud[k] - quiet[k]) == pytest.approx(level_step, abs=0.05), k
    # One bin below (dz = -0.2 Bark) the spreading is (0.4 X + 6) dz: the steeper lower slope of
    # the louder masker takes back 0.4 * 6.02 * 0.2 = ~0.5 dB of the level step.
    dz = BARKS[31] - BARKS[32]
    assert float(loud[31] - quiet[31]) == pytest.approx(level_step * (1 + 0.4 * dz), abs=0.05)
    # Upward spread of masking grows with level: above +1 Bark the spreading slope is
    # 17 - 0.15 X, so the rise is level_step * (1 + 0.15 (dz - 1)).
    k = bin_at_bark(zwicker_bark(1000.0) + 3.0)
    dz = BARKS[k] - zwicker_bark(1000.0)
    assert float(loud[k] - quiet[k]) == pytest.approx(level_step * (1 + 0.15 * (dz - 1)), abs=0.05)


def test_weaker_tonal_masker_within_half_bark_is_dropped():
    # At 5 kHz a bin is ~0.036 Bark: tones 5 bins apart (0.18 Bark) are both tonal maskers (each
    # exceeds its ±2-bin neighbours by far more than 7 dB), but closer than 0.5 Bark, so only the
    # stronger one survives decimation and the pair masks exactly like the strong tone alone.
    strong = tone(5000.0, 0.5)
    close_pair = global_masking_threshold(strong + tone(5156.25, 0.2), SR, N_FFT)
    alone = global_masking_threshold(strong, SR, N_FFT)
    assert torch.allclose(close_pair, alone, atol=0.01)
    # 1 Bark apart (30 bins) both survive, and the second one lifts the threshold at its own bin:
    # it is 8 dB weaker, but the strong tone's spreading there is already -17 dB, so its own
    # individual threshold is ~9 dB above the strong tone's one.
    far_pair = global_masking_threshold(strong + tone(5937.5, 0.2), SR, N_FFT)
    assert float((far_pair - alone)[0, 190]) > 5.0


def test_white_noise_threshold_broadly_above_ath():
    generator = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(8, N_FFT, generator=generator)
    threshold = global_masking_threshold(noise, SR, N_FFT)
    # Per-bin noise level: 96 + 10 log10(6 sigma^2 / N) = ~56.7 dB. Each band's noise masker
    # sums >= 3 bins (>= +4.8 dB), the noise masking index is at most ~-6 dB, and every bin is
    # within ~1 Bark of a masker (worst case -17 dB), so the threshold is ~35 dB or more, while
    # the ATH above 200 Hz is below 14 dB.
    audible = [k for k, f in enumerate(FREQS) if 200.0 <= f <= 7800.0]
    excess = threshold[:, audible] - ATH[audible]
    assert bool(torch.all(excess > 10.0))
    assert float(excess.median()) > 30.0


def test_silence_threshold_is_ath_and_never_below_ath():
    # Silence reads -24 dB (the power floor) everywhere, below the ATH minimum (~-5 dB), so every
    # masker is decimated and only the threshold in quiet remains.
    silence = global_masking_threshold(torch.zeros(2, N_FFT), SR, N_FFT)
    assert torch.allclose(silence, ATH.expand_as(silence), atol=1e-3)
    noisy = global_masking_threshold(0.3 * torch.randn(4, N_FFT), SR, N_FFT)
    assert bool(torch.all(noisy >= ATH - 1e-3))


def test_batched_frames_match_single_frames():
    # Frames are independent: batching (with its -inf padded masker lists) must not mix them.
    generator = torch.Generator().manual_seed(1)
    frames = torch.cat(
        [
            tone(1000.0, 0.5),
            0.05 * torch.randn(1, N_FFT, generator=generator),
            torch.zeros(1, N_FFT),
            tone(440.0, 0.3) + tone(2500.0, 0.2) + tone(6000.0, 0.1),
        ]
    )
    batched = global_masking_threshold(frames, SR, N_FFT)
    for i in range(frames.shape[0]):
        single = global_masking_threshold(frames[i : i + 1], SR, N_FFT)[0]
        assert torch.allclose(batched[i], single, atol=1e-3), i


def test_many_frames_are_handled_in_one_call():
    generator = torch.Generator().manual_seed(2)
    t = torch.arange(N_FFT) / SR
    f0 = 100.0 + 3000.0 * torch.rand(1000, 1, generator=generator)
    frames = 0.3 * torch.sin(2 * math.pi * f0 * t) + 0.02 * torch.randn(1000, N_FFT, generator=generator)
    threshold = global_masking_threshold(frames, SR, N_FFT)
    assert threshold.shape == (1000, N_FFT // 2 + 1)
    assert bool(torch.isfinite(threshold).all())
    assert bool(torch.all(threshold >= ATH - 1e-3))


# ------------------------------------------------------------------------------------------------
# PsychoacousticLoss
# ------------------------------------------------------------------------------------------------


def speech_like(frames: int = 4, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return tone(300.0, 0.3, frames) + tone(1000.0, 0.2, frames) + 0.01 * torch.randn(frames, N_FFT, generator=generator)


def test_loss_is_zero_for_perfect_reconstruction():
    reference = speech_like()
    terms = PsychoacousticLoss()(reference, reference.clone())
    assert set(terms) == {"priority", "noise_modulation"}
    assert all(value.dim() == 0 for value in terms.values())
    # No spectral difference and no noise: both terms vanish.
    assert float(terms["priority"]) == pytest.approx(0.0, abs=1e-12)
    assert float(terms["noise_modulation"]) == 0.0


def test_loss_grows_with_audible_noise():
    reference = speech_like()
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(reference.shape, generator=generator)
    loss_fn = PsychoacousticLoss()
    small = loss_fn(reference, reference + 0.005 * noise)
    large = loss_fn(reference, reference + 0.05 * noise)
    # 0.05 white noise is ~50 dB per bin, far above the ATH away from the tones: audible.
    assert float(large["noise_modulation"]) > 0.0
    assert float(large["priority"]) > 0.0
    # Noise power x100: the noise-to-mask ratios grow 100-fold, the magnitude errors too.
    assert float(large["noise_modulation"]) > float(small["noise_modulation"])
    assert float(large["priority"]) > float(small["priority"])


@pytest.mark.parametrize("noise_domain", ["power", "db"])
@pytest.mark.parametrize("noise_reduction", ["max", "mean"])
def test_masked_error_costs_less_than_unmasked_error(noise_domain, noise_reduction):
    reference = tone(1000.0, 0.5)
    loss_fn = PsychoacousticLoss(noise_domain=noise_domain, noise_reduction=noise_reduction)
    # Same error energy twice: a 0.05-amplitude sinusoid (70 dB at its bin, 64 dB one bin away).
    # At 1062.5 Hz (+0.18 Bark from the tone) the threshold is ~80 dB: masked, no penalty.
    # At 4 kHz (+8.8 Bark, outside the spreading function) only the ATH (~-4 dB) applies: audible.
    masked = loss_fn(reference, reference + tone(1062.5, 0.05))["noise_modulation"]
    unmasked = loss_fn(reference, reference + tone(4000.0, 0.05))["noise_modulation"]
    assert float(masked) == 0.0
    assert float(unmasked) > 0.0


def test_priority_weights_audible_bins_more():
    reference = tone(1000.0, 0.5)
    loss_fn = PsychoacousticLoss()
    # Equal error energy: shrinking the tone to 0.45 (error 0.05 at 1 kHz, where the tone is
    # ~6.6 dB above its threshold: w = log10(10^0.66 + 1) = ~0.75) versus adding 0.05 at 4 kHz,
    # where the reference is silent, 20 dB below the ATH (w = log10(10^-2 + 1) = ~0.004).
    on_tone = loss_fn(reference, tone(1000.0, 0.45))["priority"]
    off_tone = loss_fn(reference, reference + tone(4000.0, 0.05))["priority"]
    assert float(on_tone) > 10.0 * float(off_tone)


@pytest.mark.parametrize("options", [{}, {"priority_domain": "db", "noise_domain": "db", "noise_reduction": "mean"}])
def test_gradients_flow_to_decoded_only(options):
    reference = speech_like().requires_grad_(True)
    generator = torch.Generator().manual_seed(5)
    decoded = (reference.detach() + 0.02 * torch.randn(reference.shape, generator=generator)).requires_grad_(True)
    terms = PsychoacousticLoss(**options)(reference, decoded)
    (terms["priority"] + terms["noise_modulation"]).backward()
    assert decoded.grad is not None
    assert bool(torch.isfinite(decoded.grad).all())
    assert float(decoded.grad.abs().sum()) > 0.0
    assert reference.grad is None  # the threshold and weights are computed without gradient

    # A perfect reconstruction is a minimum, not a NaN: gradients there are finite.
    decoded = reference.detach().clone().requires_grad_(True)
    terms = PsychoacousticLoss(**options)(reference.detach(), decoded)
    (terms["priority"] + terms["noise_modulation"]).backward()
    assert bool(torch.isfinite(decoded.grad).all())


# ------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------


def test_bad_frames_raise_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="frames"):
        global_masking_threshold(torch.zeros(N_FFT), SR, N_FFT)  # 1-D
    with pytest.raises(ValueError, match="frames"):
        global_masking_threshold(torch.zeros(3, 256), SR, N_FFT)  # shorter than n_fft
    with pytest.raises(ValueError, match="frames"):
        power_spectrum_db(torch.zeros(3, 256), N_FFT)
    loss_fn = PsychoacousticLoss()
    good = torch.zeros(2, N_FFT)
    with pytest.raises(ValueError, match="reference_frames"):
        loss_fn(torch.zeros(N_FFT), good)
    with pytest.raises(ValueError, match="decoded_frames"):
        loss_fn(good, torch.zeros(2, 256))
    with pytest.raises(ValueError, match="decoded_frames"):
        loss_fn(good, torch.zeros(3, N_FFT))  # frame count differs
    with pytest.raises(ValueError, match="noise_domain"):
        PsychoacousticLoss(noise_domain="linear")
