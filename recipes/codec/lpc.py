"""LPC front end of the CMRL codec (``lpc=true``, the "collaborative quantization" variant).

Encoder: the signal is pre-emphasised; each 512-sample frame gets order-16 LPC coefficients
(autocorrelation method, float64 Levinson-Durbin), which are converted to line spectral frequencies
(LSF), scalar-quantized (``LSFQuantizer``) and dequantized again; the prediction error filter
``A(z)`` built from the DEQUANTIZED LSFs whitens the frame and the neural modules code that residual.
Decoder: the same ``A(z)`` is rebuilt from the LSF indices, the decoded residual goes through the
synthesis filter ``1 / A(z)`` and the result is de-emphasised. Frames are independent: both filters
start from a zero state at every frame, so ``synthesis_filter(analysis_filter(x, a), a) == x`` per frame
(up to float rounding), and LSF quantization error never turns into reconstruction error by itself;
it only costs prediction gain, which the residual coder absorbs.

Typical use::

    front = LPCFrontEnd()                                    # order 16, 40 bits of LSF side info per frame
    x = pre_emphasis(signal)                                 # [..., T]
    frames = ...                                             # [F, 512] frames of x
    residual, idx = front.analyze(frames)                    # [F, 512], [F, 16] int64 (the side info)
    decoded = front.synthesize(coded_residual, idx)          # [F, 512]
    y = de_emphasis(overlapped_frames)                       # back to the signal domain

Conventions: ``a`` is ``[F, order + 1]`` with ``a[:, 0] == 1`` and ``A(z) = 1 + a1 z^-1 + ... + ap z^-p``;
LSFs are in radians in ``(0, pi)`` (``pi`` is the Nyquist frequency), ``[F, order]``, increasing.
Coefficient math and both filters run in float64 on the input's device (outputs are cast back to the
input dtype), except the LSF root finding (``torch.linalg.eigvals`` on tiny matrices), which runs on the
CPU. ``synthesis_filter`` is a per-sample recursion (512 small steps per frame length, all frames at
once) with hand-written exact gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
import torchaudio.functional as audio_functional

__all__ = [
    "pre_emphasis",
    "de_emphasis",
    "lpc_analysis",
    "lpc_to_lsf",
    "lsf_to_lpc",
    "LSFQuantizer",
    "analysis_filter",
    "synthesis_filter",
    "prediction_gain_db",
    "LPCFrontEnd",
    "DEFAULT_PREEMPH",
    "DEFAULT_LSF_RANGES_HZ",
]

DEFAULT_PREEMPH = 0.9
"""Pre-emphasis coefficient. 0.9 lifts 8 kHz over DC by 20*log10(1.9/0.1) = 25.6 dB, enough to flatten the
steep spectral tilt of voiced speech (so the order-16 LPC fit is not spent on the low-frequency slope
and the residual coder sees a flatter spectrum), while the de-emphasis filter 1/(1 - 0.9 z^-1) amplifies
low-frequency coding noise by at most 20 dB at DC; 0.97 (the ASR habit) would make that 30 dB."""

DEFAULT_LSF_RANGES_HZ: tuple[tuple[float, float], ...] = (
    (60.0, 900.0),
    (200.0, 1400.0),
    (500.0, 2000.0),
    (800.0, 2500.0),
    (1200.0, 3000.0),
    (1700.0, 3500.0),
    (2100.0, 4000.0),
    (2600.0, 4500.0),
    (3000.0, 5000.0),
    (3400.0, 5400.0),
    (3800.0, 5800.0),
    (4200.0, 6300.0),
    (4800.0, 6700.0),
    (5400.0, 7100.0),
    (6000.0, 7500.0),
    (6500.0, 7940.0),
)
"""Per-dimension quantizer ranges (Hz) for order-16 LSFs at 16 kHz. The spread of wideband speech LSFs
(e.g. the per-dimension min/max over the first-stage centroids of the Opus/SILK wideband NLSF codebook:
LSF1 190-590 Hz, LSF8 3030-4160 Hz, LSF16 6810-7560 Hz), widened by 150-450 Hz on each side to reach
the tails. The flat-spectrum positions ``k * 8000 / 17`` Hz all lie inside. Values outside are clamped."""

_MAX_BITS_PER_DIM = 16  # the bitstream header stores each width in a nibble as bits - 1 (1..16)


# ----------------------------------------------------------------------------- small helpers


def _check_matrix(name: str, tensor: Any) -> torch.Tensor:
    """Raises ValueError unless ``tensor`` is a 2-D floating tensor of finite values."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return tensor


def _check_coefficients(a: Any, frames: torch.Tensor, frames_name: str) -> torch.Tensor:
    """Validates ``a`` ``[F or 1, order + 1]`` against ``frames`` ``[F, L]``.

    Returns:
        ``a`` as float64 on the frames' device, expanded to ``[F, order + 1]``.
    """
    a = _check_matrix("a", a)
    num_frames, frame_length = frames.shape
    if a.shape[0] not in (1, num_frames):
        raise ValueError(f"a has {a.shape[0]} rows but {frames_name} has {num_frames} frames")
    order = a.shape[1] - 1
    if order < 1:
        raise ValueError(f"a must have at least 2 columns (order >= 1), got shape {tuple(a.shape)}")
    if order >= frame_length:
        raise ValueError(f"order ({order}) must be smaller than the frame length ({frame_length}) of {frames_name}")
    a64 = a.to(device=frames.device, dtype=torch.float64)
    if not bool((a64[:, 0] - 1.0).abs().le(1e-6).all()):
        raise ValueError("a[:, 0] must be 1 (monic prediction error filter A(z))")
    return a64.expand(num_frames, order + 1)


def _check_signal(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor [..., T], got {x.dtype} of shape {tuple(x.shape)}")
    return x


def _check_coef(coef: float) -> float:
    if not (isinstance(coef, (int, float)) and 0.0 <= float(coef) < 1.0):
        raise ValueError(f"coef must be in [0, 1) (a stable de-emphasis pole), got {coef!r}")
    return float(coef)


def _check_order(order: Any) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 2 or order % 2:
        raise ValueError(f"order must be an even integer >= 2, got {order!r}")
    return order


# ----------------------------------------------------------------------------- emphasis


def pre_emphasis(x: torch.Tensor, coef: float = DEFAULT_PREEMPH) -> torch.Tensor:
    """First-order pre-emphasis ``y[n] = x[n] - coef * x[n-1]`` along the last axis, ``x[-1] = 0``.

    Args:
        x: Signal(s), shape ``[..., T]``. Each row starts from a zero state, so applying it to whole
            signals or to independent frames are both fine, as long as ``de_emphasis`` sees the same rows.
        coef: Pre-emphasis coefficient in [0, 1); default ``DEFAULT_PREEMPH`` (0.9, see there why).

    Returns:
        Pre-emphasised signal, shape ``[..., T]``, dtype and device of ``x``; differentiable.
    """
    x = _check_signal("x", x)
    coef = _check_coef(coef)
    shifted = torch.nn.functional.pad(x[..., :-1], (1, 0))
    return x - coef * shifted


def de_emphasis(y: torch.Tensor, coef: float = DEFAULT_PREEMPH) -> torch.Tensor:
    """Exact inverse of ``pre_emphasis``: the IIR ``x[n] = y[n] + coef * x[n-1]``, zero initial state.

    Computed in float64 (``torchaudio.functional.lfilter``, ``clamp=False``) and differentiable w.r.t. ``y``.

    Args:
        y: Pre-emphasised signal(s), shape ``[..., T]``.
        coef: The coefficient ``pre_emphasis`` used, in [0, 1).

    Returns:
        De-emphasised signal, shape ``[..., T]``, dtype and device of ``y``.
    """
    y = _check_signal("y", y)
    coef = _check_coef(coef)
    options = {"dtype": torch.float64, "device": y.device}
    denominator = torch.tensor([1.0, -coef], **options)
    numerator = torch.tensor([1.0, 0.0], **options)
    x = audio_functional.lfilter(y.to(torch.float64), denominator, numerator, clamp=False)
    return x.to(y.dtype)


# ----------------------------------------------------------------------------- LPC analysis


def _levinson_durbin(autocorrelation: torch.Tensor) -> torch.Tensor:
    """Batched Levinson-Durbin recursion.

    Args:
        autocorrelation: ``r`` ``[F, order + 1]`` float64 with ``r[:, 0] > 0`` and a positive definite
            Toeplitz matrix.

    Returns:
        ``a`` ``[F, order + 1]`` float64, ``a[:, 0] == 1``, minimum phase (all reflection coefficients
        are clamped into the open unit interval as a guard against rounding).
    """
    order = autocorrelation.shape[1] - 1
    a = torch.zeros_like(autocorrelation)
    a[:, 0] = 1.0
    error = autocorrelation[:, 0].clone()
    reflection_limit = 1.0 - 1e-9  # keeps 1 - k^2 > 0, i.e. the filter strictly minimum phase
    for i in range(1, order + 1):
        # acc = r[i] + sum_{j=1}^{i-1} a_j r[i-j]
        acc = (a[:, :i] * autocorrelation[:, 1 : i + 1].flip(1)).sum(1)
        k = (-acc / error).clamp(-reflection_limit, reflection_limit)
        previous = a[:, 1:i].clone()
        a[:, 1:i] = previous + k[:, None] * previous.flip(1)
        a[:, i] = k
        error = (error * (1.0 - k * k)).clamp_min(1e-300)  # no 0/0 if a frame is perfectly predictable
    return a


def lpc_analysis(
    frames: torch.Tensor,
    order: int = 16,
    lag_window_hz: float = 60.0,
    white_noise_db: float = -40.0,
    sample_rate: int = 16000,
) -> torch.Tensor:
    """LPC coefficients per frame by the autocorrelation method.

    The frame is Hann windowed, its autocorrelation (lags ``0..order``) multiplied by a Gaussian lag
    window (bandwidth expansion, so sharp resonances do not make ``1/A`` ring) and ``r[0]`` raised by
    the white-noise correction (a noise floor ``white_noise_db`` below the frame energy; keeps the
    Toeplitz system well conditioned). Levinson-Durbin then runs in float64. Silent (all-zero) frames
    give ``a = [1, 0, ..., 0]``.

    Args:
        frames: ``[F, L]`` floating frames (already pre-emphasised), ``L > order``.
        order: Prediction order; 16 is the usual wideband (16 kHz) choice, one pole pair per kHz plus margin.
        lag_window_hz: Standard deviation in Hz of the Gaussian lag window
            ``w[k] = exp(-0.5 * (2 pi f k / fs)^2)``; 60 Hz as in wideband speech codecs. 0 disables it.
        white_noise_db: Noise floor relative to ``r[0]``: ``r[0] *= 1 + 10^(db/10)``; -40 dB is the usual
            value. ``-inf`` disables it.
        sample_rate: Sample rate in Hz, for the lag window; the codec runs at 16 kHz.

    Returns:
        ``a`` ``[F, order + 1]`` with ``a[:, 0] == 1``, minimum phase, dtype and device of ``frames``.

    Raises:
        ValueError: ``frames`` is not a finite 2-D floating tensor, or ``order`` is not in ``1..L-1``.
    """
    frames = _check_matrix("frames", frames)
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    frame_length = frames.shape[1]
    if order >= frame_length:
        raise ValueError(f"order ({order}) must be smaller than the frame length ({frame_length}) of frames")
    if lag_window_hz < 0 or sample_rate <= 0:
        raise ValueError(f"lag_window_hz must be >= 0 and sample_rate > 0, got {lag_window_hz}, {sample_rate}")

    x = frames.detach().to(torch.float64)
    window = torch.hann_window(frame_length, periodic=False, dtype=torch.float64, device=x.device)
    xw = x * window
    autocorrelation = torch.stack(
        [(xw[:, lag:] * xw[:, : frame_length - lag]).sum(1) for lag in range(order + 1)], dim=1
    )
    energy = autocorrelation[:, :1]
    silent = energy[:, 0] <= 0.0
    # Scale invariance: normalise by r[0], so tiny but nonzero frames behave like loud ones.
    autocorrelation = autocorrelation / torch.where(silent[:, None], torch.ones_like(energy), energy)
    lags = torch.arange(order + 1, dtype=torch.float64, device=x.device)
    lag_window = torch.exp(-0.5 * (2.0 * math.pi * lag_window_hz * lags / sample_rate) ** 2)
    autocorrelation = autocorrelation * lag_window
    autocorrelation[:, 0] = 1.0 + 10.0 ** (white_noise_db / 10.0)
    autocorrelation[silent] = torch.nn.functional.one_hot(
        torch.zeros((), dtype=torch.long, device=x.device), order + 1
    ).to(torch.float64)
    a = _levinson_durbin(autocorrelation)
    return a.to(frames.dtype)


# ----------------------------------------------------------------------------- LSF <-> LPC


def _colleague_roots(chebyshev: torch.Tensor) -> torch.Tensor:
    """Real parts of the roots of ``sum_k c_k T_k(x)`` (``c`` ``[F, m + 1]``, ``c_m != 0``) -> ``[F, m]``."""
    num_frames, m = chebyshev.shape[0], chebyshev.shape[1] - 1
    if m == 1:
        return -(chebyshev[:, :1] / chebyshev[:, 1:])
    # x T_0 = T_1, x T_k = (T_{k-1} + T_{k+1}) / 2 and, at a root, T_m = -sum_{k<m} c_k T_k / c_m.
    matrix = torch.zeros(num_frames, m, m, dtype=torch.float64)
    matrix[:, 0, 1] = 1.0
    for k in range(1, m):
        matrix[:, k, k - 1] = 0.5
        if k + 1 < m:
            matrix[:, k, k + 1] = 0.5
    matrix[:, m - 1, :] -= chebyshev[:, :m] / (2.0 * chebyshev[:, m:])
    return torch.linalg.eigvals(matrix).real


def _polish_roots(omega: torch.Tensor, cosine_series: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Newton steps on ``f(w) = sum_k c_k cos(k w)``; ``omega`` ``[F, m]``, ``cosine_series`` ``[F, m + 1]``.

    ``iterations`` defaults to 3: the eigenvalue roots are already good to ~1e-8, and Newton converges
    quadratically, so a few steps reach float64 precision.
    """
    k = torch.arange(cosine_series.shape[1], dtype=torch.float64)
    coefficients = cosine_series[:, None, :]
    for _ in range(iterations):
        phase = omega[:, :, None] * k
        value = (coefficients * torch.cos(phase)).sum(-1)
        slope = -(coefficients * k * torch.sin(phase)).sum(-1)
        step = value / slope
        accept = torch.isfinite(step) & (step.abs() < 1e-3)  # only refine; never jump to another root
        omega = torch.where(accept, omega - torch.where(accept, step, torch.zeros_like(step)), omega)
    return omega


def lpc_to_lsf(a: torch.Tensor) -> torch.Tensor:
    """Line spectral frequencies of minimum-phase prediction error filters.

    With ``P(z) = A(z) + z^-(p+1) A(1/z)`` and ``Q(z) = A(z) - z^-(p+1) A(1/z)`` (``p`` even), ``P`` has a
    trivial root at ``z = -1`` and ``Q`` at ``z = 1``; the remaining roots lie on the unit circle and
    interlace (``P`` owns LSF 1, 3, 5, ...). Each deflated symmetric polynomial becomes a degree-``p/2``
    Chebyshev series in ``x = cos(w)``, whose roots come from its colleague matrix and are polished by
    Newton steps in ``w``.

    Args:
        a: ``[F, order + 1]``, ``a[:, 0] == 1``, even ``order``, minimum phase (for non-minimum-phase
            input the result is not meaningful).

    Returns:
        LSFs ``[F, order]`` in radians, increasing, in ``(0, pi)``; dtype and device of ``a``.

    Raises:
        ValueError: ``a`` is not a finite 2-D floating tensor with ``a[:, 0] == 1`` and an even order >= 2.
    """
    a = _check_matrix("a", a)
    order = a.shape[1] - 1
    if order < 2 or order % 2:
        raise ValueError(f"a must have an even order >= 2 (odd number of columns), got shape {tuple(a.shape)}")
    coefficients = a.detach().to(device="cpu", dtype=torch.float64)
    if not bool((coefficients[:, 0] - 1.0).abs().le(1e-6).all()):
        raise ValueError("a[:, 0] must be 1 (monic prediction error filter A(z))")
    half = order // 2
    extended = torch.nn.functional.pad(coefficients, (0, 1))  # a_{p+1} = 0
    reversed_ = extended.flip(1)
    sum_polynomial = extended + reversed_  # P, degree p + 1
    difference_polynomial = extended - reversed_  # Q, degree p + 1
    # Deflate: P' = P / (1 + z^-1), Q' = Q / (1 - z^-1), both symmetric of degree p.
    sign = (-1.0) ** torch.arange(order + 2, dtype=torch.float64)
    p_deflated = (torch.cumsum(sum_polynomial * sign, 1) * sign)[:, : order + 1]
    q_deflated = torch.cumsum(difference_polynomial, 1)[:, : order + 1]
    roots = []
    for deflated in (p_deflated, q_deflated):
        # e^{j w p/2} P'(e^{jw}) = c_0 + sum_{k=1}^{p/2} c_k cos(k w), c_0 = p'_{p/2}, c_k = 2 p'_{p/2-k}.
        series = torch.cat([deflated[:, half : half + 1], 2.0 * deflated[:, :half].flip(1)], dim=1)
        x = _colleague_roots(series).clamp(-1.0, 1.0)
        omega = torch.sort(torch.arccos(x), dim=1).values
        roots.append(_polish_roots(omega, series))
    lsf = torch.sort(torch.cat(roots, dim=1), dim=1).values
    return lsf.to(device=a.device, dtype=a.dtype)


def lsf_to_lpc(lsf: torch.Tensor) -> torch.Tensor:
    """Prediction error filters from increasing LSFs (the inverse of ``lpc_to_lsf``).

    ``P'(z) = prod_{i odd} (1 - 2 cos(w_i) z^-1 + z^-2)``, ``Q'(z)`` likewise over even ``i`` (1-based),
    ``P = (1 + z^-1) P'``, ``Q = (1 - z^-1) Q'`` and ``A = (P + Q) / 2``. Strictly increasing LSFs in
    ``(0, pi)`` always give a minimum-phase ``A``.

    Args:
        lsf: ``[F, order]`` radians, increasing, in ``(0, pi)``, even ``order``.

    Returns:
        ``a`` ``[F, order + 1]`` with ``a[:, 0] == 1``; dtype and device of ``lsf`` (computed in float64).

    Raises:
        ValueError: ``lsf`` is not a finite 2-D floating tensor with an even number >= 2 of columns.
    """
    lsf = _check_matrix("lsf", lsf)
    order = lsf.shape[1]
    if order < 2 or order % 2:
        raise ValueError(f"lsf must have an even number >= 2 of columns, got shape {tuple(lsf.shape)}")
    omega = lsf.to(torch.float64)
    num_frames = omega.shape[0]

    def product_of_sections(angles: torch.Tensor) -> torch.Tensor:
        polynomial = torch.zeros(num_frames, order + 1, dtype=torch.float64, device=omega.device)
        polynomial[:, 0] = 1.0
        for i in range(angles.shape[1]):
            middle = -2.0 * torch.cos(angles[:, i : i + 1])
            shifted1 = torch.nn.functional.pad(polynomial[:, :-1], (1, 0))
            shifted2 = torch.nn.functional.pad(polynomial[:, :-2], (2, 0))
            polynomial = polynomial + middle * shifted1 + shifted2
        return polynomial  # [F, order + 1], degree order

    p_deflated = product_of_sections(omega[:, 0::2])
    q_deflated = product_of_sections(omega[:, 1::2])
    p_full = torch.nn.functional.pad(p_deflated, (0, 1)) + torch.nn.functional.pad(p_deflated, (1, 0))
    q_full = torch.nn.functional.pad(q_deflated, (0, 1)) - torch.nn.functional.pad(q_deflated, (1, 0))
    a = 0.5 * (p_full + q_full)[:, : order + 1]
    return a.to(lsf.dtype)


# ----------------------------------------------------------------------------- LSF quantizer


def _critical_bandwidth_hz(frequency_hz: float) -> float:
    """Zwicker's critical bandwidth ``25 + 75 (1 + 1.4 (f / kHz)^2)^0.69`` Hz."""
    return 25.0 + 75.0 * (1.0 + 1.4 * (frequency_hz / 1000.0) ** 2) ** 0.69


def _default_ranges_hz(order: int, sample_rate: int) -> tuple[tuple[float, float], ...]:
    if order == len(DEFAULT_LSF_RANGES_HZ) and sample_rate == 16000:
        return DEFAULT_LSF_RANGES_HZ
    # Elsewhere: a window of 3 flat-spectrum spacings around each flat-spectrum position k * s, skewed
    # low like speech LSFs (spectral tilt pulls them down), clipped to the band.
    nyquist = sample_rate / 2.0
    spacing = nyquist / (order + 1)
    return tuple(
        (max(0.0, (k - 1.75) * spacing), min(nyquist, (k + 1.25) * spacing)) for k in range(1, order + 1)
    )


class LSFQuantizer:
    """Per-dimension uniform scalar quantizer of LSFs with a fixed bit budget per frame.

    Dimension ``d`` has ``2 ** bits_per_dim[d]`` cells splitting ``ranges_hz[d]`` evenly; ``quantize`` picks
    the cell (values outside the range go to the end cells), ``dequantize`` returns cell centres, sorted
    and pushed apart to a minimum spacing of ``min_gap_hz`` inside ``[min_gap, pi - min_gap]``, so any index
    array at all (even adversarial, e.g. all equal) decodes to a stable synthesis filter.

    Bit allocation (unless ``bits_per_dim`` is given): every dimension gets 1 bit, then each further bit
    goes to the dimension with the largest cell width measured in critical bands (cell width in Hz over
    Zwicker's critical bandwidth at the range centre), i.e. greedy reverse water-filling of a
    perceptually weighted squared error. Low LSFs carry the formants the ear resolves finely, so they
    get more bits: 40 bits at order 16 and 16 kHz give ``(4, 4, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1)``
    (cells of 52-106 Hz for LSF 1-4, 225-240 Hz for LSF 5-7, 475-850 Hz above: 0.4-0.8 critical bands each).

    Attributes:
        order: Number of LSFs per frame.
        sample_rate: Sample rate in Hz (maps Hz to radians).
        bits_per_dim: Bits of each dimension's index, 1..16 (the bitstream writes idx with these widths).
        bits_per_frame: ``sum(bits_per_dim)``.
        ranges_hz: ``(low, high)`` Hz of each dimension.
        min_gap_hz: Minimum spacing of dequantized LSFs in Hz.
    """

    def __init__(
        self,
        order: int = 16,
        total_bits: int | None = 40,
        sample_rate: int = 16000,
        ranges_hz: Sequence[Sequence[float]] | None = None,
        min_gap_hz: float = 50.0,
        bits_per_dim: Sequence[int] | None = None,
    ) -> None:
        """Builds the quantizer.

        Args:
            order: Number of LSFs (even); 16, the codec's LPC order.
            total_bits: Bits per frame; 40 (1.25 kb/s of side info at 512-sample frames and 16 kHz).
                Must be in ``order..16*order``; with ``bits_per_dim`` it must equal their sum (or be None).
            sample_rate: Hz; the codec runs at 16 kHz.
            ranges_hz: ``order`` pairs ``(low, high)`` in Hz, ``0 <= low < high <= fs/2``; None picks
                ``DEFAULT_LSF_RANGES_HZ`` (order 16 at 16 kHz) or a flat-spectrum-centred default.
            min_gap_hz: Minimum spacing of decoded LSFs; 50 Hz keeps formant bandwidths realistic and the
                filter well inside the unit circle. ``(order + 1) * min_gap_hz`` must be below fs/2.
            bits_per_dim: Explicit allocation (each 1..16), overriding the greedy one; its sum must equal
                ``total_bits`` unless ``total_bits`` is None.

        Raises:
            ValueError: Any argument out of range (the message names it).
        """
        self.order = _check_order(order)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        self.sample_rate = sample_rate
        nyquist = sample_rate / 2.0
        if not (min_gap_hz > 0 and (order + 1) * min_gap_hz < nyquist):
            raise ValueError(f"min_gap_hz must be > 0 and (order + 1) * min_gap_hz < {nyquist} Hz, got {min_gap_hz}")
        self.min_gap_hz = float(min_gap_hz)
        ranges = _default_ranges_hz(order, sample_rate) if ranges_hz is None else ranges_hz
        ranges = tuple((float(low), float(high)) for low, high in ranges)
        if len(ranges) != order or any(not (0.0 <= low < high <= nyquist) for low, high in ranges):
            raise ValueError(f"ranges_hz must be {order} pairs with 0 <= low < high <= {nyquist}, got {ranges}")
        self.ranges_hz = ranges

        if bits_per_dim is not None:
            bits = tuple(int(b) for b in bits_per_dim)
            if len(bits) != order or any(not 1 <= b <= _MAX_BITS_PER_DIM for b in bits):
                raise ValueError(f"bits_per_dim must be {order} integers in 1..{_MAX_BITS_PER_DIM}, got {bits}")
            if total_bits is not None and sum(bits) != total_bits:
                raise ValueError(f"total_bits ({total_bits}) != sum(bits_per_dim) ({sum(bits)})")
        else:
            if isinstance(total_bits, bool) or not isinstance(total_bits, int):
                raise ValueError(f"total_bits must be an integer, got {total_bits!r}")
            if not order <= total_bits <= _MAX_BITS_PER_DIM * order:
                raise ValueError(
                    f"total_bits must be in {order}..{_MAX_BITS_PER_DIM * order} (1..16 bits per LSF), got {total_bits}"
                )
            bits = self._allocate(total_bits)
        self.bits_per_dim: tuple[int, ...] = bits
        self.bits_per_frame: int = sum(bits)

        to_radians = math.pi / nyquist
        self._low = torch.tensor([low * to_radians for low, _ in ranges], dtype=torch.float64)
        self._high = torch.tensor([high * to_radians for _, high in ranges], dtype=torch.float64)
        self._levels = torch.tensor([2**b for b in bits], dtype=torch.int64)
        self._step = (self._high - self._low) / self._levels.to(torch.float64)
        self._min_gap = self.min_gap_hz * to_radians

    def _allocate(self, total_bits: int) -> tuple[int, ...]:
        """Greedy perceptual bit allocation (see the class docstring)."""
        widths_in_bands = [(high - low) / _critical_bandwidth_hz(0.5 * (low + high)) for low, high in self.ranges_hz]
        bits = [1] * self.order
        for _ in range(total_bits - self.order):
            cell = [width / 2**b if b < _MAX_BITS_PER_DIM else -1.0 for width, b in zip(widths_in_bands, bits)]
            bits[max(range(self.order), key=lambda d: (cell[d], -d))] += 1  # ties: lower LSF first
        return tuple(bits)

    def _check_rows(self, name: str, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[1] != self.order:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a tensor [F, {self.order}], got {shape}")

    def quantize(self, lsf: torch.Tensor) -> torch.Tensor:
        """LSFs ``[F, order]`` (radians) -> indices ``[F, order]`` int64, ``0 <= idx[:, d] < 2**bits_per_dim[d]``.

        Raises:
            ValueError: ``lsf`` is not a finite floating tensor ``[F, order]``.
        """
        self._check_rows("lsf", lsf)
        _check_matrix("lsf", lsf)
        device = lsf.device
        low, step, levels = (t.to(device) for t in (self._low, self._step, self._levels))
        cell = torch.floor((lsf.detach().to(torch.float64) - low) / step).to(torch.int64)
        return torch.minimum(cell.clamp_min(0), levels - 1)

    def dequantize(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices ``[F, order]`` -> LSFs ``[F, order]`` float64 radians, strictly increasing with spacing
        ``>= min_gap`` inside ``[min_gap, pi - min_gap]`` (so ``lsf_to_lpc`` gives a stable filter).

        Raises:
            ValueError: ``idx`` is not an integer tensor ``[F, order]`` with each index below its level count.
        """
        self._check_rows("idx", idx)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ValueError(f"idx must be an integer tensor, got {idx.dtype}")
        device = idx.device
        low, step, levels = (t.to(device) for t in (self._low, self._step, self._levels))
        idx = idx.to(torch.int64)
        if bool(((idx < 0) | (idx >= levels)).any()):
            raise ValueError(f"idx out of range: need 0 <= idx[:, d] < 2**bits_per_dim[d], bits {self.bits_per_dim}")
        values = torch.sort(low + (idx.to(torch.float64) + 0.5) * step, dim=1).values
        return _enforce_spacing(values, self._min_gap)

    def to_dict(self) -> dict[str, Any]:
        """Settings as plain JSON-able types (``from_dict`` rebuilds an identical quantizer)."""
        return {
            "order": self.order,
            "total_bits": self.bits_per_frame,
            "sample_rate": self.sample_rate,
            "ranges_hz": [list(pair) for pair in self.ranges_hz],
            "min_gap_hz": self.min_gap_hz,
            "bits_per_dim": list(self.bits_per_dim),
        }

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> LSFQuantizer:
        """Inverse of ``to_dict``."""
        return cls(**dict(settings))

    def __repr__(self) -> str:
        return (
            f"LSFQuantizer(order={self.order}, bits_per_dim={self.bits_per_dim}, bits_per_frame={self.bits_per_frame})"
        )


def _enforce_spacing(sorted_lsf: torch.Tensor, gap: float) -> torch.Tensor:
    """Smallest moves making ``x`` satisfy ``x_0 >= gap``, ``x_i - x_{i-1} >= gap``, ``x_last <= pi - gap``.

    Forward pass ``y_i = max(x_i, y_{i-1} + gap)`` then backward pass ``z_i = min(y_i, z_{i+1} - gap)``,
    both closed form through cumulative max/min. Needs ``(order + 1) * gap < pi``; then ``z`` keeps the
    lower bound ``z_i >= (i + 1) gap`` too.
    """
    order = sorted_lsf.shape[1]
    positions = torch.arange(order, dtype=sorted_lsf.dtype, device=sorted_lsf.device) * gap
    forward = torch.cummax(sorted_lsf - positions, dim=1).values + positions
    forward = torch.maximum(forward, positions + gap)
    upper = math.pi - gap - (order - 1) * gap + positions  # pi - (order - i) gap
    backward = torch.cummin((forward - positions).flip(1), dim=1).values.flip(1) + positions
    return torch.minimum(backward, upper)


# ----------------------------------------------------------------------------- filters


def analysis_filter(frames: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Prediction error (whitening) FIR ``e[n] = sum_k a_k x[n-k]``, zero initial state per frame.

    Args:
        frames: ``[F, L]`` floating frames.
        a: ``[F, order + 1]`` (or ``[1, order + 1]`` for all frames), ``a[:, 0] == 1``, ``order < L``.

    Returns:
        Residual ``[F, L]``, dtype and device of ``frames``; computed in float64, differentiable.

    Raises:
        ValueError: Bad shapes, non-finite values, ``a[:, 0] != 1`` or ``order >= L`` (names the argument).
    """
    frames = _check_matrix("frames", frames)
    a64 = _check_coefficients(a, frames, "frames")
    order, frame_length = a64.shape[1] - 1, frames.shape[1]
    padded = torch.nn.functional.pad(frames.to(torch.float64), (order, 0))
    residual = sum(a64[:, k : k + 1] * padded[:, order - k : order - k + frame_length] for k in range(order + 1))
    return residual.to(frames.dtype)


def _all_pole_recursion(excitation: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``y[n] = e[n] - sum_{k=1}^{p} a_k y[n-k]`` with ``y[n < 0] = 0``; ``[F, L]``, ``[F, p + 1]`` -> ``[F, L]``.

    One small vectorised step per sample over all frames (time-major buffer, so each step reads a
    contiguous ``[p, F]`` slice). The per-step tensors are far below the intra-op parallel grain size,
    so this does not spawn a thread-pool barrier per sample, which made a grouped-convolution based
    ``lfilter`` hundreds of times slower on a busy CPU.
    """
    order, frame_length = a.shape[1] - 1, excitation.shape[1]
    lagged_coefficients = a[:, 1:].flip(1).t().contiguous()  # [p, F]: a_p ... a_1
    buffer = excitation.new_zeros(frame_length + order, excitation.shape[0])  # p zeros of initial state
    excitation_t = excitation.t()
    for n in range(frame_length):
        buffer[order + n] = excitation_t[n] - (lagged_coefficients * buffer[n : n + order]).sum(0)
    return buffer[order:].t().contiguous()


class _AllPoleFilter(torch.autograd.Function):
    """``1 / A(z)`` with zero initial state; exact gradients w.r.t. the excitation and ``a``.

    ``y = H e`` with ``H`` lower-triangular Toeplitz (impulse response of ``1/A``), so
    ``dL/de = H^T g = flip(H flip(g))`` (the same filter run backwards in time) and, from
    ``A y = e``, ``dL/da_k = -sum_n (dL/de)[n] y[n-k]``.
    """

    @staticmethod
    def forward(ctx: Any, excitation: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        output = _all_pole_recursion(excitation, a)
        ctx.save_for_backward(a, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a, output = ctx.saved_tensors
        grad_excitation = _all_pole_recursion(grad_output.flip(1), a).flip(1)
        grad_a = None
        if ctx.needs_input_grad[1]:
            order, frame_length = a.shape[1] - 1, output.shape[1]
            padded = torch.nn.functional.pad(output, (order, 0))
            grad_a = torch.stack(
                [-(grad_excitation * padded[:, order - k : order - k + frame_length]).sum(1) for k in range(order + 1)],
                dim=1,
            )
        return (grad_excitation if ctx.needs_input_grad[0] else None), grad_a


def synthesis_filter(residual: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """All-pole synthesis filter ``1 / A(z)``, zero initial state per frame: the exact inverse of
    ``analysis_filter`` with the same ``a``.

    Runs the recursion in float64 and casts back, so float32 round trips stay accurate even for sharp
    resonances. Differentiable w.r.t. ``residual`` (and ``a``) with exact, hand-written gradients
    (first order only). Same results as ``torchaudio.functional.lfilter(residual, a, [1, 0, ...],
    clamp=False, batching=True)``, without its per-frame grouped convolution, which is slow when the
    CPU is shared.

    Args:
        residual: ``[F, L]`` floating excitation.
        a: ``[F, order + 1]`` (or ``[1, order + 1]``), ``a[:, 0] == 1``, minimum phase, ``order < L``.

    Returns:
        Frames ``[F, L]``, dtype and device of ``residual``.

    Raises:
        ValueError: Bad shapes, non-finite values, ``a[:, 0] != 1`` or ``order >= L`` (names the argument).
    """
    residual = _check_matrix("residual", residual)
    a64 = _check_coefficients(a, residual, "residual")
    frames = _AllPoleFilter.apply(residual.to(torch.float64), a64.contiguous())
    return frames.to(residual.dtype)


def prediction_gain_db(frames: torch.Tensor, residual: torch.Tensor) -> float:
    """``10 log10(sum frames^2 / sum residual^2)`` over all frames (dB); 0.0 when both are silent.

    Args:
        frames: ``[..., L]`` signal.
        residual: Same shape, its prediction residual.

    Raises:
        ValueError: The shapes differ.
    """
    if frames.shape != residual.shape:
        raise ValueError(f"frames {tuple(frames.shape)} and residual {tuple(residual.shape)} must have the same shape")
    signal_energy = float(frames.detach().to(torch.float64).square().sum())
    residual_energy = float(residual.detach().to(torch.float64).square().sum())
    if signal_energy == 0.0 and residual_energy == 0.0:
        return 0.0
    tiny = 1e-300  # keeps log10 finite when one side is exactly zero
    return 10.0 * math.log10((signal_energy + tiny) / (residual_energy + tiny))


# ----------------------------------------------------------------------------- front end


@dataclasses.dataclass
class LPCFrontEnd:
    """The codec's LPC front end: LPC analysis, LSF quantization and the analysis/synthesis filters.

    ``analyze`` expects pre-emphasised frames and whitens them with the filter rebuilt from the
    DEQUANTIZED LSFs, so ``synthesize`` (decoder) uses bit-identical coefficients from ``idx`` alone.
    Use ``emphasize`` / ``deemphasize`` (``pre_emphasis`` / ``de_emphasis`` with ``preemph``) around it.

    Attributes:
        order: LPC order (even); 16 for wideband speech.
        preemph: Pre-emphasis coefficient; ``DEFAULT_PREEMPH`` (0.9, see there why).
        lsf_bits: LSF side-info bits per frame; 40 (1.25 kb/s at 512-sample frames, 16 kHz).
        sample_rate: Hz; the codec runs at 16 kHz.
        lag_window_hz: Gaussian lag window of the analysis; 60 Hz, the usual wideband value.
        white_noise_db: White-noise correction of the analysis; -40 dB, the usual value.
        min_gap_hz: Minimum spacing of decoded LSFs; 50 Hz keeps every decoded filter stable.
        quantizer: The ``LSFQuantizer`` built from the fields above (not an init argument).
    """

    order: int = 16  # one resonance pair per kHz of the 8 kHz band, plus spectral-tilt margin
    preemph: float = DEFAULT_PREEMPH  # see DEFAULT_PREEMPH
    lsf_bits: int = 40  # 1.25 kb/s of side info
    sample_rate: int = 16000  # the codec's sample rate
    lag_window_hz: float = 60.0  # bandwidth expansion as in wideband codecs
    white_noise_db: float = -40.0  # conditioning of the autocorrelation matrix
    min_gap_hz: float = 50.0  # stability margin of decoded filters
    quantizer: LSFQuantizer = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_order(self.order)
        _check_coef(self.preemph)
        self.quantizer = LSFQuantizer(
            order=self.order, total_bits=self.lsf_bits, sample_rate=self.sample_rate, min_gap_hz=self.min_gap_hz
        )

    @property
    def bits_per_frame(self) -> int:
        """LSF side-info bits per frame (``sum(quantizer.bits_per_dim)``)."""
        return self.quantizer.bits_per_frame

    @property
    def bits_per_dim(self) -> tuple[int, ...]:
        """Bit width of each LSF index (what the bitstream writes)."""
        return self.quantizer.bits_per_dim

    def emphasize(self, x: torch.Tensor) -> torch.Tensor:
        """``pre_emphasis(x, self.preemph)``, ``[..., T] -> [..., T]``."""
        return pre_emphasis(x, self.preemph)

    def deemphasize(self, y: torch.Tensor) -> torch.Tensor:
        """``de_emphasis(y, self.preemph)``, ``[..., T] -> [..., T]``, differentiable."""
        return de_emphasis(y, self.preemph)

    def coefficients(self, idx: torch.Tensor) -> torch.Tensor:
        """LSF indices ``[F, order]`` -> dequantized ``a`` ``[F, order + 1]`` float64 (device of ``idx``)."""
        return lsf_to_lpc(self.quantizer.dequantize(idx))

    def analyze(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder side.

        Args:
            frames: ``[F, L]`` pre-emphasised frames, ``L > order``.

        Returns:
            ``(residual, idx)``: residual ``[F, L]`` (dtype/device of ``frames``; differentiable w.r.t.
            ``frames``, the coefficients are treated as constants) and LSF indices ``[F, order]`` int64
            (device of ``frames``).

        Raises:
            ValueError: ``frames`` is not a finite 2-D floating tensor with ``L > order``.
        """
        frames = _check_matrix("frames", frames)
        a = lpc_analysis(
            frames.detach().to(torch.float64),  # float64 all the way to the LSFs
            order=self.order,
            lag_window_hz=self.lag_window_hz,
            white_noise_db=self.white_noise_db,
            sample_rate=self.sample_rate,
        )
        lsf = lpc_to_lsf(a)
        idx = self.quantizer.quantize(lsf)
        residual = analysis_filter(frames, self.coefficients(idx))
        return residual, idx

    def synthesize(self, residual: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Decoder side: ``[F, L]`` residual and ``[F, order]`` indices -> ``[F, L]`` (pre-emphasised) frames,
        dtype/device of ``residual``, differentiable w.r.t. ``residual``."""
        return synthesis_filter(residual, self.coefficients(idx.to(residual.device)))

    def to_dict(self) -> dict[str, Any]:
        """Settings as plain JSON-able types for checkpoint metadata (``quantizer`` holds the full tables)."""
        return {
            "order": self.order,
            "preemph": self.preemph,
            "lsf_bits": self.lsf_bits,
            "sample_rate": self.sample_rate,
            "lag_window_hz": self.lag_window_hz,
            "white_noise_db": self.white_noise_db,
            "min_gap_hz": self.min_gap_hz,
            "quantizer": self.quantizer.to_dict(),
        }

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> LPCFrontEnd:
        """Inverse of ``to_dict``; the stored quantizer tables win over rebuilding from defaults, so a
        checkpoint decodes identically even if the default ranges or allocation change later."""
        settings = dict(settings)
        quantizer_settings = settings.pop("quantizer", None)
        front_end = cls(**settings)
        if quantizer_settings is not None:
            quantizer = LSFQuantizer.from_dict(quantizer_settings)
            if quantizer.order != front_end.order or quantizer.bits_per_frame != front_end.lsf_bits:
                raise ValueError(
                    f"settings: quantizer (order {quantizer.order}, {quantizer.bits_per_frame} bits) does not match "
                    f"order {front_end.order}, lsf_bits {front_end.lsf_bits}"
                )
            front_end.quantizer = quantizer
        return front_end
