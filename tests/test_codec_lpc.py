"""Tests of the codec's LPC front end (recipes/codec/lpc.py).

Reference signals and filters are built independently with numpy/scipy (``np.poly`` of chosen poles,
``scipy.signal.lfilter``), so every expected value comes from the construction, not from the module.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.signal import lfilter

from recipes.codec.lpc import (
    LPCFrontEnd,
    LSFQuantizer,
    analysis_filter,
    de_emphasis,
    lpc_analysis,
    lpc_to_lsf,
    lsf_to_lpc,
    pre_emphasis,
    prediction_gain_db,
    synthesis_filter,
)

SAMPLE_RATE = 16000  # the codec's rate
FRAME = 512  # the codec's frame length


def _resonator(radius: float, angle: float) -> np.ndarray:
    """``1 - 2 r cos(theta) z^-1 + r^2 z^-2``: a conjugate pole pair at ``r e^{+-j theta}``."""
    return np.array([1.0, -2.0 * radius * math.cos(angle), radius * radius])


def _random_stable_filters(
    rng: np.random.Generator, count: int, order: int = 16, max_radius: float = 0.98
) -> np.ndarray:
    """``[count, order + 1]`` real minimum-phase polynomials from random conjugate pole pairs inside the unit circle."""
    rows = []
    for _ in range(count):
        radius = rng.uniform(0.2, max_radius, order // 2)
        angle = rng.uniform(0.02, math.pi - 0.02, order // 2)
        poles = np.concatenate([radius * np.exp(1j * angle), radius * np.exp(-1j * angle)])
        rows.append(np.real(np.poly(poles)))
    return np.array(rows)


def _max_root_radius(a: torch.Tensor) -> float:
    return max(float(np.abs(np.roots(row)).max()) for row in a.detach().double().numpy())


def _vowel(num_frames: int, seed: int = 0) -> torch.Tensor:
    """Vowel-like signal: 120 Hz harmonics through four formant resonators (/a/-ish) plus -60 dB noise, ``[F * L]``."""
    rng = np.random.default_rng(seed)
    n = np.arange(num_frames * FRAME)
    f0 = 120.0  # a male voice
    source = sum(np.cos(2 * math.pi * f0 * k * n / SAMPLE_RATE + rng.uniform(0, 2 * math.pi)) for k in range(1, 65))
    signal = source
    for formant_hz, bandwidth_hz in ((700, 80), (1220, 90), (2600, 120), (3500, 200)):
        radius = math.exp(-math.pi * bandwidth_hz / SAMPLE_RATE)
        signal = lfilter([1.0], _resonator(radius, 2 * math.pi * formant_hz / SAMPLE_RATE), signal)
    signal = 0.5 * signal / np.abs(signal).max() + 1e-3 * rng.standard_normal(signal.shape)
    return torch.tensor(signal, dtype=torch.float32)


# ----------------------------------------------------------------------------- (1) known AR processes


@pytest.mark.parametrize(
    "true_a",
    [
        np.array([1.0, -1.5, 0.8]),  # AR(2): x[n] = 1.5 x[n-1] - 0.8 x[n-2] + e[n], poles at radius sqrt(0.8)
        np.convolve(_resonator(0.9, 0.4), _resonator(0.8, 1.3)),  # AR(4): two resonances
    ],
    ids=["ar2", "ar4"],
)
def test_lpc_analysis_recovers_ar_coefficients(true_a):
    rng = np.random.default_rng(1)
    num_frames, frame_length, burn_in = 32, 4096, 1000
    process = lfilter([1.0], true_a, rng.standard_normal(burn_in + num_frames * frame_length))[burn_in:]
    frames = torch.tensor(process.reshape(num_frames, frame_length), dtype=torch.float32)
    a = lpc_analysis(frames, order=len(true_a) - 1)
    assert a.shape == (num_frames, len(true_a)) and a.dtype == torch.float32
    assert torch.all(a[:, 0] == 1.0)
    # Compare poles (well conditioned) rather than polynomial coefficients (ill conditioned for AR(4)).
    # A Hann-windowed 4096-sample frame pins a pole's angle to ~0.02 rad (radius to ~0.01); the mean over
    # 32 frames to ~0.004. The 60 Hz lag window and -40 dB noise floor pull poles inward by < 0.005
    # (bandwidth expansion), so 0.01 in radius and 0.02 rad (51 Hz) in angle leave a safe margin.
    estimated = np.roots(a.double().mean(0).numpy())
    expected = np.roots(true_a)
    key = lambda roots: np.sort_complex(roots)  # noqa: E731  same ordering for both
    np.testing.assert_allclose(np.abs(key(estimated)), np.abs(key(expected)), atol=0.01)
    np.testing.assert_allclose(np.angle(key(estimated)), np.angle(key(expected)), atol=0.02)
    assert _max_root_radius(a) < 1.0


# ----------------------------------------------------------------------------- (2) LSF conversion


def test_flat_filter_has_equally_spaced_lsf():
    # A(z) = 1: P = 1 + z^-17 and Q = 1 - z^-17 have roots at odd / even multiples of pi/17.
    a = torch.zeros(1, 17, dtype=torch.float64)
    a[0, 0] = 1.0
    expected = torch.arange(1, 17, dtype=torch.float64) * math.pi / 17
    torch.testing.assert_close(lpc_to_lsf(a)[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(lsf_to_lpc(expected[None]), a, atol=1e-12, rtol=0)


def test_lsf_round_trip_and_ordering_on_random_stable_filters():
    a = torch.tensor(_random_stable_filters(np.random.default_rng(2), 300, max_radius=0.99))
    lsf = lpc_to_lsf(a)
    assert lsf.shape == (300, 16)
    assert torch.all(lsf > 0) and torch.all(lsf < math.pi)
    assert torch.all(lsf.diff(dim=1) > 0)
    torch.testing.assert_close(lsf_to_lpc(lsf), a, atol=1e-6, rtol=0)
    # float32 in, float32 out
    assert lpc_to_lsf(a.float()).dtype == torch.float32


def test_single_resonance_lsf_bracket_the_pole_angle():
    # A(z) = 1 - 2 r cos(theta) z^-1 + r^2 z^-2: its two LSFs straddle theta, closer together as r -> 1.
    theta = 1.0
    widths = []
    for radius in (0.5, 0.9, 0.99):
        lsf = lpc_to_lsf(torch.tensor(_resonator(radius, theta))[None])[0]
        assert lsf[0] < theta < lsf[1]
        widths.append(float(lsf[1] - lsf[0]))
    assert widths[0] > widths[1] > widths[2]


# ----------------------------------------------------------------------------- (3) quantizer


def test_default_quantizer_budget_and_settings_round_trip():
    quantizer = LSFQuantizer()
    assert quantizer.bits_per_frame == 40 == sum(quantizer.bits_per_dim)
    assert len(quantizer.bits_per_dim) == 16 and all(1 <= b <= 16 for b in quantizer.bits_per_dim)
    # perceptual allocation: the low LSFs (formant region) get at least as many bits as the top ones
    assert quantizer.bits_per_dim[0] >= quantizer.bits_per_dim[-1] + 1
    restored = LSFQuantizer.from_dict(json.loads(json.dumps(quantizer.to_dict())))
    assert restored.bits_per_dim == quantizer.bits_per_dim and restored.ranges_hz == quantizer.ranges_hz
    idx = torch.randint(0, 2, (5, 16))
    torch.testing.assert_close(restored.dequantize(idx), quantizer.dequantize(idx), atol=0, rtol=0)


def _index_grid(quantizer: LSFQuantizer) -> list[torch.Tensor]:
    """Adversarial index arrays: all zero, all top, all equal, reversed ramps and random ones."""
    levels = torch.tensor([2**b for b in quantizer.bits_per_dim])
    top = levels - 1
    cases = [torch.zeros(16, dtype=torch.long), top, torch.minimum(torch.full((16,), 3), top)]
    cases.append(torch.where(torch.arange(16) % 2 == 0, top, torch.zeros(16, dtype=torch.long)))  # zig-zag
    cases.append(top.flip(0).clamp(max=top))  # reversed
    generator = torch.Generator().manual_seed(3)
    cases += [torch.floor(torch.rand(16, generator=generator) * levels).long() for _ in range(50)]
    return cases


@pytest.mark.parametrize("total_bits", [16, 40, 64])
def test_dequantized_filters_are_always_stable(total_bits):
    quantizer = LSFQuantizer(total_bits=total_bits)
    idx = torch.stack(_index_grid(quantizer))
    lsf = quantizer.dequantize(idx)
    min_gap = 2 * math.pi * 50.0 / SAMPLE_RATE  # 50 Hz in radians
    assert torch.all(lsf >= min_gap - 1e-12) and torch.all(lsf <= math.pi - min_gap + 1e-12)
    assert torch.all(lsf.diff(dim=1) >= min_gap - 1e-12)
    a = lsf_to_lpc(lsf)
    assert torch.all(a[:, 0] == 1.0)
    assert _max_root_radius(a) < 1.0


def test_quantization_error_shrinks_with_more_bits():
    # LSFs within the quantizer ranges: flat-spectrum positions k*pi/17 jittered by up to +-100 Hz.
    rng = np.random.default_rng(4)
    jitter = rng.uniform(-1, 1, (200, 16)) * 2 * math.pi * 100 / SAMPLE_RATE
    lsf = torch.tensor(np.arange(1, 17) * math.pi / 17 + jitter)
    errors = []
    for total_bits in (16, 24, 40, 64, 128):
        quantizer = LSFQuantizer(total_bits=total_bits)
        idx = quantizer.quantize(lsf)
        levels = torch.tensor([2**b for b in quantizer.bits_per_dim])
        assert idx.dtype == torch.int64 and torch.all(idx >= 0) and torch.all(idx < levels)
        errors.append(float((quantizer.dequantize(idx) - lsf).abs().mean()))
    assert all(coarse > fine for coarse, fine in zip(errors, errors[1:])), errors
    # 128 bits = 8 bits per LSF: cells of a few Hz, so the mean error is below 10 Hz
    assert errors[-1] < 2 * math.pi * 10 / SAMPLE_RATE


# ----------------------------------------------------------------------------- (4) identities


def test_analysis_then_synthesis_is_identity_with_dequantized_coefficients():
    front_end = LPCFrontEnd()
    frames = pre_emphasis(_vowel(8)).reshape(8, FRAME)
    residual, idx = front_end.analyze(frames)
    assert residual.shape == frames.shape and residual.dtype == torch.float32
    assert idx.shape == (8, 16) and idx.dtype == torch.int64
    rebuilt = front_end.synthesize(residual, idx)
    relative_error = float((rebuilt - frames).norm() / frames.norm())
    assert relative_error < 1e-4
    # the same identity through the bare functions, with arbitrary stable coefficients
    a = torch.tensor(_random_stable_filters(np.random.default_rng(5), 8, max_radius=0.97))
    noise = torch.randn(8, FRAME, generator=torch.Generator().manual_seed(5))
    rebuilt = synthesis_filter(analysis_filter(noise, a), a)
    assert float((rebuilt - noise).norm() / noise.norm()) < 1e-4


def test_analysis_filter_matches_fir_definition_and_zero_state():
    a = torch.tensor([[1.0, -0.5, 0.25]])
    impulse = torch.zeros(1, 6)
    impulse[0, 0] = 1.0
    # impulse response of an FIR with zero initial state is its coefficient list
    torch.testing.assert_close(analysis_filter(impulse, a)[0], torch.tensor([1.0, -0.5, 0.25, 0, 0, 0]))
    # 1/(1 - 0.9 z^-1) has impulse response 0.9^n
    torch.testing.assert_close(
        synthesis_filter(impulse, torch.tensor([[1.0, -0.9]]))[0], 0.9 ** torch.arange(6.0), atol=1e-6, rtol=0
    )
    # per-row filters agree with scipy's direct-form filters, row by row
    a = _random_stable_filters(np.random.default_rng(8), 5, max_radius=0.97)
    signal = np.random.default_rng(9).standard_normal((5, 300))
    fir = analysis_filter(torch.tensor(signal), torch.tensor(a)).numpy()
    iir = synthesis_filter(torch.tensor(signal), torch.tensor(a)).numpy()
    for row in range(5):
        np.testing.assert_allclose(fir[row], lfilter(a[row], [1.0], signal[row]), atol=1e-10)
        np.testing.assert_allclose(iir[row], lfilter([1.0], a[row], signal[row]), atol=1e-9)


def test_emphasis_pair_is_an_exact_inverse():
    x = torch.tensor([1.0, 1.0, 1.0])
    # y[n] = x[n] - 0.9 x[n-1] with x[-1] = 0
    torch.testing.assert_close(pre_emphasis(x), torch.tensor([1.0, 0.1, 0.1]))
    signal = torch.randn(3, 4000, generator=torch.Generator().manual_seed(6))
    restored = de_emphasis(pre_emphasis(signal))
    assert restored.shape == signal.shape and restored.dtype == signal.dtype
    torch.testing.assert_close(restored, signal, atol=1e-5, rtol=0)
    torch.testing.assert_close(de_emphasis(pre_emphasis(signal, 0.68), 0.68), signal, atol=1e-5, rtol=0)
    y = pre_emphasis(signal).requires_grad_()
    de_emphasis(y).sum().backward()
    # d sum(x) / d y[n] = sum_{m >= n} 0.9^(m - n): 1 at the last sample, ~1/(1 - 0.9) = 10 far from it
    assert y.grad is not None
    assert abs(float(y.grad[0, -1]) - 1.0) < 1e-9 and abs(float(y.grad[0, 0]) - 10.0) < 1e-6


# ----------------------------------------------------------------------------- (5) silence


def test_silent_and_tiny_frames_are_handled():
    frames = torch.zeros(3, FRAME)
    a = lpc_analysis(frames)
    expected = torch.zeros(3, 17)
    expected[:, 0] = 1.0
    torch.testing.assert_close(a, expected, atol=0, rtol=0)
    front_end = LPCFrontEnd()
    residual, idx = front_end.analyze(frames)
    assert torch.all(residual == 0)
    decoded = front_end.synthesize(residual, idx)
    assert torch.all(torch.isfinite(decoded)) and torch.all(decoded == 0)
    # the autocorrelation method is scale invariant: a whisper gives the same filter as a shout
    loud = pre_emphasis(_vowel(2)).reshape(2, FRAME)
    torch.testing.assert_close(lpc_analysis(loud.double() * 1e-30), lpc_analysis(loud.double()), atol=1e-9, rtol=0)
    # a silent frame next to loud ones does not disturb them
    mixed = torch.cat([loud, torch.zeros(1, FRAME)])
    residual, idx = front_end.analyze(mixed)
    assert torch.all(torch.isfinite(residual)) and torch.all(residual[-1] == 0)


# ----------------------------------------------------------------------------- (6) gain and gradients


def test_prediction_gain_on_vowel_is_large():
    frames = pre_emphasis(_vowel(6)).reshape(6, FRAME)
    gain = prediction_gain_db(frames, analysis_filter(frames, lpc_analysis(frames)))
    # four resonances with 80-200 Hz bandwidths give a spectral envelope spanning > 30 dB; an order-16
    # all-pole fit whitens most of it
    assert gain > 10.0
    residual, _ = LPCFrontEnd().analyze(frames)
    quantized_gain = prediction_gain_db(frames, residual)
    # 40-bit LSFs put the first formants' LSFs within ~50-100 Hz (about their bandwidths): still a clear
    # gain, never more than the unquantized optimum plus a little (the optimum is per windowed frame)
    assert 5.0 < quantized_gain < gain + 1.0
    assert prediction_gain_db(frames, frames) == 0.0


def test_gradient_flows_through_synthesis_filter():
    front_end = LPCFrontEnd()
    frames = pre_emphasis(_vowel(4)).reshape(4, FRAME)
    residual, idx = front_end.analyze(frames)
    residual = residual.detach().requires_grad_()
    front_end.deemphasize(front_end.synthesize(residual, idx).reshape(-1)).square().sum().backward()
    assert residual.grad is not None and torch.all(torch.isfinite(residual.grad))
    assert float(residual.grad.abs().sum()) > 0
    # y = H e is linear with H lower-triangular Toeplitz of the impulse response h of 1/A(z), so
    # d y[n0] / d e[m] = h[n0 - m] for m <= n0 and 0 after n0 (causality); h comes from scipy here.
    a = _random_stable_filters(np.random.default_rng(7), 2, order=4, max_radius=0.9)
    excitation = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    n0 = 30
    synthesis_filter(excitation, torch.tensor(a))[1, n0].backward()
    impulse = np.zeros(n0 + 1)
    impulse[0] = 1.0
    h = lfilter([1.0], a[1], impulse)
    np.testing.assert_allclose(excitation.grad[1, : n0 + 1].numpy(), h[::-1], atol=1e-12)
    assert torch.all(excitation.grad[1, n0 + 1 :] == 0) and torch.all(excitation.grad[0] == 0)
    # and against finite differences, w.r.t. both the excitation and the coefficients
    tail = torch.tensor(a[:, 1:], requires_grad=True)  # a[:, 0] stays 1
    short = excitation.detach()[:, :12].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e, t: synthesis_filter(e, torch.cat([torch.ones(2, 1, dtype=t.dtype), t], dim=1)), (short, tail)
    )


# ----------------------------------------------------------------------------- (7) bad input


def test_bad_input_raises_value_error_naming_the_argument():
    frames = torch.randn(2, 64)
    with pytest.raises(ValueError, match="frames"):
        lpc_analysis(torch.randn(64))
    with pytest.raises(ValueError, match="frames"):
        lpc_analysis(torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError, match="order"):
        lpc_analysis(frames, order=64)
    with pytest.raises(ValueError, match="order"):
        analysis_filter(frames, torch.cat([torch.ones(2, 1), torch.zeros(2, 64)], dim=1))
    with pytest.raises(ValueError, match="a has 3 rows"):
        analysis_filter(frames, torch.tensor([[1.0, 0.5]] * 3))
    with pytest.raises(ValueError, match=r"a\[:, 0\]"):
        synthesis_filter(frames, torch.tensor([[2.0, 0.5]] * 2))
    with pytest.raises(ValueError, match="residual"):
        synthesis_filter(torch.randn(1, 2, 64), torch.tensor([[1.0, 0.5]]))
    with pytest.raises(ValueError, match="a must have an even order"):
        lpc_to_lsf(torch.tensor([[1.0, 0.5, 0.1, 0.0]]))
    with pytest.raises(ValueError, match="lsf"):
        lsf_to_lpc(torch.rand(2, 3))
    with pytest.raises(ValueError, match="coef"):
        pre_emphasis(frames, coef=1.0)
    with pytest.raises(ValueError, match="total_bits"):
        LSFQuantizer(total_bits=8)  # fewer than 1 bit per LSF
    with pytest.raises(ValueError, match="order"):
        LSFQuantizer(order=15)
    quantizer = LSFQuantizer()
    with pytest.raises(ValueError, match="idx"):
        quantizer.dequantize(torch.full((1, 16), 1 << 10))
    with pytest.raises(ValueError, match="idx"):
        quantizer.dequantize(torch.zeros(1, 16))  # float indices
    with pytest.raises(ValueError, match="lsf"):
        quantizer.quantize(torch.rand(1, 10))


def test_front_end_settings_round_trip():
    front_end = LPCFrontEnd(lsf_bits=48, preemph=0.85)
    settings = json.loads(json.dumps(front_end.to_dict()))
    restored = LPCFrontEnd.from_dict(settings)
    assert restored == front_end and restored.bits_per_frame == 48 == sum(restored.bits_per_dim)
    frames = pre_emphasis(_vowel(2), 0.85).reshape(2, FRAME)
    residual, idx = front_end.analyze(frames)
    residual2, idx2 = restored.analyze(frames)
    assert torch.equal(idx, idx2) and torch.equal(residual, residual2)
