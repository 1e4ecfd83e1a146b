"""Lossless coding of pruning masks.

A mask is a flat boolean array of ``n`` entries with ``nnz`` ones (ones = kept weights). Three codings
are implemented; a file records which one each tensor uses:

``bits``
    Packed bitmask, ``ceil(n / 8)`` bytes, ``numpy.packbits(mask, bitorder="little")``. Optimal near
    50% sparsity, where the entropy bound is one bit per weight anyway.

``rice``
    Golomb-Rice code of the gaps between the positions of the rarer symbol (the kept positions when
    ``nnz <= n / 2``, the pruned positions otherwise). Gap ``g`` (number of common symbols before the next
    rare one) is split into a quotient ``g >> k``, written in unary (that many 0 bits, then a 1 bit), and a
    ``k``-bit remainder. The bytes are the unary stream followed by ``k`` bit planes (plane ``j`` holds bit
    ``j`` of every remainder), each padded to whole bytes with zero bits. Keeping the quotients and the
    remainders in separate streams is what makes decoding fully vectorized: the 1 bits of the unary stream
    sit at ``t_i = i + sum(quotients[:i + 1])``, so one ``flatnonzero`` gives every quotient prefix sum and
    the positions follow from one ``cumsum`` -- no bit-by-bit parsing loop. For an i.i.d. mask this is within
    about 1.5% of the entropy bound at 70-99% sparsity, and it decodes 3-5x faster than ``ans``, which
    matters because ``load_sparse`` must not be slower than ``torch.load`` of the dense weights. It is
    written here because no maintained Python library ships a vectorized Golomb-Rice coder.

``ans``
    Asymmetric numeral systems (``constriction.stream.stack.AnsCoder``, Rust) over the packed mask bytes,
    each byte an i.i.d. symbol from the model ``P(b) = p^popcount(b) (1 - p)^(8 - popcount(b))``, i.e. an
    i.i.d. Bernoulli(p) model of the bits, coded 8 bits per symbol for speed. ``p`` is
    ``round(65536 * nnz / n) / 65536`` clamped to ``[1, 65535] / 65536``, computed in exact integer
    arithmetic from the ``nnz`` stored in the file, so the decoder rebuilds the identical model on any
    machine and the file need not store it. Within 0.1% of the entropy bound, but slower to decode.

All decoders validate the stream completely (lengths, counts, zero padding, coder end state) and raise
``MaskDecodeError`` on anything inconsistent, so a corrupted stream never decodes to a silently different
mask of the right size without the caller noticing; the caller's per-tensor SHA-256 is the final check.
"""

from __future__ import annotations

import math

import numpy as np
from ..errors import ConfigError

__all__ = [
    "CODINGS",
    "MaskDecodeError",
    "entropy_bound_bytes",
    "encode_mask",
    "decode_mask",
    "choose_mask_coding",
]

CODINGS = ("bits", "rice", "ans")
# Decode speed order (fastest first); `choose_mask_coding` prefers earlier entries when sizes are close.
_SPEED_ORDER = ("bits", "rice", "ans")
# A faster coding is kept when it is at most this much larger than the smallest one: 1.5% keeps every
# mask within the 2% goal (ANS sits at ~0.1%) while avoiding ANS's 3-5x slower decode where possible.
FAST_CODING_TOLERANCE = 0.015
_ANS_PRECISION = 65536  # p is quantized to 1/65536: the model mismatch then costs < 0.01% of the bound
_MAX_RICE_K = 48  # larger would mean gaps of 2^48 weights; positions must fit int64 comfortably


class MaskDecodeError(ValueError):
    """The coded mask is inconsistent with its declared size, count or coding."""


def entropy_bound_bytes(numel: int, nnz: int) -> float:
    """Empirical entropy bound of a mask in bytes: ``n * H(nnz / n) / 8``.

    Args:
        numel: Number of mask entries ``n``.
        nnz: Number of ones.

    Returns:
        The bound in bytes (0.0 for an empty, all-zero or all-one mask).
    """
    if numel <= 0 or nnz <= 0 or nnz >= numel:
        return 0.0
    p = nnz / numel
    return numel * -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p)) / 8.0


# ----------------------------------------------------------------------------------------------- bits


def _encode_bits(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, bitorder="little")


def _decode_bits(data: np.ndarray, numel: int) -> np.ndarray:
    if data.size != (numel + 7) // 8:
        raise MaskDecodeError(f"bitmask has {data.size} bytes, expected {(numel + 7) // 8}")
    bits = np.unpackbits(data, bitorder="little")
    if bits[numel:].any():
        raise MaskDecodeError("bitmask padding bits are not zero")
    return bits[:numel].view(np.bool_)


# ----------------------------------------------------------------------------------------------- rice


def _rice_sizes(gaps: np.ndarray, k_candidates: range) -> dict[int, int]:
    """Exact coded size in bytes of the gaps for each Rice parameter in ``k_candidates``."""
    count = gaps.size
    plane_bytes = (count + 7) // 8
    sizes = {}
    for k in k_candidates:
        unary_bits = int((gaps >> k).sum()) + count
        sizes[k] = (unary_bits + 7) // 8 + k * plane_bytes
    return sizes


def _rare_positions(mask: np.ndarray) -> np.ndarray:
    nnz = int(np.count_nonzero(mask))
    return np.flatnonzero(mask if nnz <= mask.size - nnz else ~mask)


def _encode_rice(mask: np.ndarray) -> tuple[np.ndarray, int]:
    positions = _rare_positions(mask)
    count = positions.size
    if count == 0:
        return np.zeros(0, np.uint8), 0
    gaps = np.diff(positions, prepend=-1) - 1  # common symbols before each rare one, >= 0
    # The optimal k is near log2(mean gap); search a window around it exactly.
    k_guess = max(0, int(math.log2(max(float(gaps.mean()), 1.0))))
    sizes = _rice_sizes(gaps, range(max(0, k_guess - 2), min(_MAX_RICE_K, k_guess + 3)))
    k = min(sizes, key=lambda kk: (sizes[kk], kk))
    terminators = np.cumsum((gaps >> k) + 1) - 1
    unary = np.zeros(int(terminators[-1]) + 1, np.bool_)
    unary[terminators] = True
    parts = [np.packbits(unary, bitorder="little")]
    for j in range(k):
        parts.append(np.packbits(((gaps >> j) & 1).astype(np.bool_), bitorder="little"))
    data = np.concatenate(parts)
    assert data.size == sizes[k]
    return data, k


def _decode_rice_positions(data: np.ndarray, k: int, numel: int, count: int) -> np.ndarray:
    """Positions (int64, strictly increasing) of the ``count`` rare symbols."""
    if not 0 <= k <= _MAX_RICE_K:
        raise MaskDecodeError(f"Rice parameter {k} out of range")
    if count == 0:
        if data.size or k:
            raise MaskDecodeError("empty Rice stream expected")
        return np.zeros(0, np.int64)
    plane_bytes = (count + 7) // 8
    unary_bytes = data.size - k * plane_bytes
    if unary_bytes <= 0:
        raise MaskDecodeError("Rice stream too short")
    # flatnonzero on a bool view is several times faster than on the uint8 array unpackbits returns.
    terminators = np.flatnonzero(np.unpackbits(data[:unary_bytes], bitorder="little").view(np.bool_))
    if terminators.size != count:
        raise MaskDecodeError(f"Rice stream holds {terminators.size} gaps, expected {count}")
    if (int(terminators[-1]) >> 3) + 1 != unary_bytes:
        raise MaskDecodeError("Rice unary stream has trailing bytes")
    index = np.arange(count, dtype=np.int64)
    quotient_sums = terminators - index
    if int(quotient_sums[-1]) > (numel >> k):  # also rules out int64 overflow below
        raise MaskDecodeError("Rice gaps run past the end of the tensor")
    remainders = np.zeros(count, np.uint64 if k > 8 else np.uint8)
    for j in range(k):
        start = unary_bytes + j * plane_bytes
        plane = np.unpackbits(data[start : start + plane_bytes], bitorder="little")
        if plane[count:].any():
            raise MaskDecodeError("Rice remainder padding bits are not zero")
        remainders |= plane[:count].astype(remainders.dtype) << remainders.dtype.type(j)
    positions = index + (quotient_sums << k) + np.cumsum(remainders, dtype=np.int64)
    if int(positions[-1]) >= numel:
        raise MaskDecodeError("Rice positions run past the end of the tensor")
    return positions


# ------------------------------------------------------------------------------------------------ ans


def _ans_model(numel: int, nnz: int):
    import constriction  # imported lazily: only needed for ANS-coded masks

    p_num = min(max((nnz * _ANS_PRECISION + numel // 2) // max(numel, 1), 1), _ANS_PRECISION - 1)
    q_num = _ANS_PRECISION - p_num
    denom = _ANS_PRECISION**8
    # Exact integer numerators, one correctly rounded division each: identical floats on every machine.
    by_popcount = [p_num**c * q_num ** (8 - c) / denom for c in range(9)]
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
    probabilities = np.array([by_popcount[c] for c in popcount], dtype=np.float64)
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _encode_ans(mask: np.ndarray, nnz: int) -> np.ndarray:
    import constriction

    symbols = np.packbits(mask, bitorder="little").astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    if symbols.size:
        coder.encode_reverse(symbols, _ans_model(mask.size, nnz))
    words = np.asarray(coder.get_compressed(), dtype=np.uint32)
    return words.astype("<u4").view(np.uint8)


def _decode_ans(data: np.ndarray, numel: int, nnz: int) -> np.ndarray:
    import constriction

    if data.size % 4:
        raise MaskDecodeError("ANS stream is not a whole number of 32-bit words")
    n_bytes = (numel + 7) // 8
    words = data.view("<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    symbols = coder.decode(_ans_model(numel, nnz), n_bytes) if n_bytes else np.zeros(0, np.int32)
    if not coder.is_empty():
        raise MaskDecodeError("ANS stream has data left over after the last symbol")
    return _decode_bits(symbols.astype(np.uint8), numel)


# ------------------------------------------------------------------------------------------ interface


def encode_mask(mask: np.ndarray, coding: str) -> tuple[np.ndarray, int]:
    """Encode a flat boolean mask.

    Args:
        mask: Boolean array of shape ``(n,)``.
        coding: One of ``CODINGS``.

    Returns:
        ``(data, param)``: the coded bytes (uint8, shape ``(m,)``) and the coding parameter the decoder
        needs besides ``n`` and ``nnz`` (the Rice ``k``; 0 for the other codings).
    """
    mask = np.ascontiguousarray(mask, dtype=np.bool_).reshape(-1)
    if coding == "bits":
        return _encode_bits(mask), 0
    if coding == "rice":
        return _encode_rice(mask)
    if coding == "ans":
        return _encode_ans(mask, int(np.count_nonzero(mask))), 0
    raise ConfigError(f"unknown mask coding {coding!r}; expected one of {CODINGS}")


def decode_mask(data: np.ndarray, coding: str, param: int, numel: int, nnz: int) -> np.ndarray:
    """Decode a mask coded by ``encode_mask`` into the positions of its ones.

    Positions rather than a boolean mask because scattering values by position (``dense[pos] = values``)
    is several times faster than ``masked_scatter_`` with a dense boolean mask.

    Args:
        data: Coded bytes, uint8 of shape ``(m,)``.
        coding: One of ``CODINGS``.
        param: The parameter ``encode_mask`` returned.
        numel: Mask length ``n``.
        nnz: Number of ones the mask must have.

    Returns:
        int64 array of shape ``(nnz,)``: the strictly increasing positions of the ones.

    Raises:
        MaskDecodeError: The stream does not decode to a mask of ``n`` entries with ``nnz`` ones.
    """
    if not 0 <= nnz <= numel:
        raise MaskDecodeError(f"nnz {nnz} outside [0, {numel}]")
    if coding == "rice":
        kept_is_rare = nnz <= numel - nnz
        positions = _decode_rice_positions(data, param, numel, nnz if kept_is_rare else numel - nnz)
        if kept_is_rare:
            return positions
        mask = np.ones(numel, dtype=np.bool_)
        mask[positions] = False
    elif param != 0:
        raise MaskDecodeError(f"coding {coding!r} takes no parameter, got {param}")
    elif coding == "bits":
        mask = _decode_bits(data, numel)
    elif coding == "ans":
        mask = _decode_ans(data, numel, nnz)
    else:
        raise MaskDecodeError(f"unknown mask coding {coding!r}")
    positions = np.flatnonzero(mask)
    if positions.size != nnz:
        raise MaskDecodeError(f"mask has {positions.size} ones, expected {nnz}")
    return positions


def choose_mask_coding(mask: np.ndarray, policy: str = "auto") -> tuple[str, np.ndarray, int]:
    """Encode a mask with the coding ``policy`` selects.

    Args:
        mask: Boolean array of shape ``(n,)``.
        policy: ``"smallest"`` (fewest bytes), ``"auto"`` (the fastest-decoding coding within
            ``FAST_CODING_TOLERANCE`` of the smallest), or a name from ``CODINGS`` to force it.

    Returns:
        ``(coding, data, param)``.
    """
    if policy in CODINGS:
        data, param = encode_mask(mask, policy)
        return policy, data, param
    if policy not in ("auto", "smallest"):
        raise ConfigError(f"unknown mask coding policy {policy!r}; expected 'auto', 'smallest' or one of {CODINGS}")
    encoded = {coding: encode_mask(mask, coding) for coding in _SPEED_ORDER}
    smallest = min(data.size for data, _ in encoded.values())
    tolerance = FAST_CODING_TOLERANCE if policy == "auto" else 0.0
    for coding in _SPEED_ORDER:
        data, param = encoded[coding]
        if data.size <= smallest * (1.0 + tolerance):
            return coding, data, param
    raise AssertionError("unreachable: the smallest coding always qualifies")
