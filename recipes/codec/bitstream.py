"""The ``.cmrl`` file: the real, entropy-coded bitstream of the CMRL neural speech codec.

The codec has ``M`` cascaded modules. Per frame, the quantizer of module ``m`` emits ``C`` integer codes in
``[0, K)`` (indices of its ``K`` centroids). Each module has a learned code distribution ``probs_m`` (length ``K``);
the codes are coded as i.i.d. draws from it with a range coder (``constriction.stream.queue.RangeEncoder``), so a
file costs about ``-sum(log2 p(code))`` bits plus a few bytes of framing -- the bitrate the learned distribution
promises, measured on real bytes. In LPC mode each frame also carries ``order`` LSF indices, dimension ``d`` with a
fixed width of ``lsf_bits[d]`` bits.

Both sides code with the *same integers*: ``quantize_probabilities`` turns ``probs_m`` into frequencies summing to
``2**16`` (every symbol at least 1, so any code stays encodable), and the coder's model is built from
``freq / 2**16``, which is exact in float64. Float noise in ``probs_m`` (a checkpoint reloaded on another machine)
can therefore only change the integers, never make encoder and decoder disagree silently: the integers (plus
whatever else the decoder depends on, e.g. the centroids) are hashed by ``model_digest`` into 8 bytes stored in the
header, and ``read_cmrl`` refuses a file whose digest is not the caller's.

File layout (all integers little-endian)::

    offset size  field
    0      4     magic b"CMRL"
    4      1     format version (1)
    5      4     u32 sample rate (Hz)
    9      4     u32 num_samples: length of the decoded waveform
    13     4     u32 num_frames F
    17     1     u8  modules M (1..255)
    18     2     u16 code length C: codes per frame and module (1..65535)
    20     2     u16 centroids K (2..65535)
    22     1     u8  LPC order (0: no side info)
    23     8     model digest (``model_digest``)
    31     ceil(order / 2)
                 LSF bit widths, one nibble each (``bits - 1``, so 1..16 bits), low nibble first; padding nibble 0
    then, for each module m = 0..M-1:
           4     u32 chunk length L_m in bytes
           L_m   range-coded codes of module m, the F*C codes in frame-major order (frame 0's C codes, frame 1's,
                 ...), i.i.d. under the module's quantized distribution. The coder's 32-bit words are stored
                 little-endian with the (up to 3) trailing zero bytes of the last word dropped; the reader pads with
                 zeros to whole words, which restores the words exactly.
    then       ceil(F * sum(lsf_bits) / 8)
                 LSF side info, fixed-width bit-packed: frame by frame, dimension by dimension, each index written
                 most significant bit first in lsf_bits[d] bits; the last byte is padded with zero bits. Fixed width
                 (not entropy coded) because the codec has no learned LSF distribution to code them with.
    last   4     u32 CRC32 (zlib) of every byte before it

The fixed overhead is ``31 + ceil(order / 2) + 4 M + 4`` bytes (43 bytes for M = 2 without LPC, 59 for M = 4 with
order 16). ``CMRLStream`` splits the file size into per-module payload bits, side-info bits and overhead bytes, so
``8 * file_bytes / duration`` -- the honest bitrate -- can be reported alongside where the bits go.

Every malformed input raises ``BitstreamError`` naming the file: a foreign file (e.g. a WAV passed by mistake), a
newer format version, a truncated file (every proper prefix of a valid file is rejected by the framing check before
anything is decoded), a corrupt file (CRC mismatch), a file written by another model (digest mismatch), and shape or
range errors at write time. The CRC only catches damage; a file whose CRC was recomputed over a changed header or
payload (a forgery, or a buggy writer) is held to the format itself: ``read_cmrl`` accepts only what ``write_cmrl``
writes for the contents it returns -- each chunk must be the canonical encoding of exactly ``F * C`` codes (a chunk
too short to hold them is refused before decoding), padding bits and nibbles must be zero -- and, given the decoding
model's code length, sample rate and framing, checks the header against them (so the declared length is the one the
frames cover). ``tests/test_faults_cmrl.py`` fuzzes all of this.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csprune.atomic import atomic_write
from csprune.errors import CsPruneError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PROB_PRECISION",
    "BitstreamError",
    "CMRLStream",
    "quantize_probabilities",
    "model_digest",
    "write_cmrl",
    "read_cmrl",
    "read_cmrl_header",
]

MAGIC = b"CMRL"
FORMAT_VERSION = 1
PROB_PRECISION = 16  # frequencies sum to 2**16: costs < 0.01 bit/code vs float probabilities, exact in float64
DIGEST_BYTES = 8  # 64 bits: an accidental match between two checkpoints is out of the question
# magic, version, sample rate, num_samples, num_frames, modules, code length, centroids, LPC order, digest
_HEADER = struct.Struct("<4sBIIIBHHB8s")
_U32 = struct.Struct("<I")
_CRC_BYTES = 4
_MAX_LSF_BITS = 16  # one nibble per width in the header
_U32_MAX = 0xFFFFFFFF
# A range-coded chunk of L bytes carries at most 8 L + a few bits of information (the coder's 64-bit state flushes at
# most two words beyond it; measured: under 11 bits over). So N codes under a model whose most probable code costs b
# bits need 8 L + _CODER_SLACK_BITS >= N b: checked before decoding, it keeps a forged frame count from making the
# decoder allocate (and spin through) codes the chunk cannot hold.
_CODER_SLACK_BITS = 96
# Leading bytes of files most likely to be passed by mistake, for a clearer message.
_FOREIGN_MAGICS = {
    b"RIFF": "a RIFF/WAV audio file",
    b"fLaC": "a FLAC audio file",
    b"OggS": "an Ogg audio file",
    b"ID3": "an MP3 audio file",
    b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?)",
}


class BitstreamError(CsPruneError):
    """A ``.cmrl`` file cannot be written or read; the message always names the file.

    Attributes:
        path: The file the error is about.
    """

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


@dataclass
class CMRLStream:
    """A decoded ``.cmrl`` file.

    Attributes:
        codes: One int64 array of shape ``[F, C]`` per module, values in ``[0, K)``.
        lsf_idx: int64 array ``[F, order]`` of LSF indices, or None without LPC side info.
        lsf_bits: Bit width of each LSF dimension (length ``order``), or None.
        sample_rate: Sample rate of the decoded waveform in Hz.
        num_samples: Length of the decoded waveform in samples.
        num_frames: ``F``.
        module_bits: Payload bits of each module's range-coded chunk (length ``M``), without its length prefix.
        side_info_bits: Bits of the packed LSF side info (0 without LPC), padding included.
        overhead_bytes: Everything else: fixed header, LSF widths, chunk length prefixes and the CRC.
        file_bytes: Size of the file; ``8 * file_bytes == sum(module_bits) + side_info_bits + 8 * overhead_bytes``.
        digest: The model digest stored in the header.
    """

    codes: list[np.ndarray]
    lsf_idx: np.ndarray | None
    lsf_bits: tuple[int, ...] | None
    sample_rate: int
    num_samples: int
    num_frames: int
    module_bits: list[int]
    side_info_bits: int
    overhead_bytes: int
    file_bytes: int
    digest: bytes

    @property
    def duration_s(self) -> float:
        """Duration of the decoded waveform in seconds."""
        return self.num_samples / self.sample_rate

    @property
    def bitrate_bps(self) -> float:
        """The real bitrate: ``8 * file_bytes / duration`` in bits per second (header and CRC included)."""
        return 8.0 * self.file_bytes / self.duration_s


# ----------------------------------------------------------------------------------------------- model


def quantize_probabilities(probs: Any, precision: int = PROB_PRECISION) -> np.ndarray:
    """Deterministic integer frequencies for a code distribution, the model both coder sides use.

    Largest-remainder rounding of ``probs / sum(probs) * (2**precision - K)``, plus 1 for every symbol: each
    frequency is at least 1 (every code stays encodable, even one the model gave probability 0) and they sum to
    exactly ``2**precision``. The arithmetic is float64 with a stable tie-break (lower index first), so the same
    input gives the same integers on every machine.

    Args:
        probs: Non-negative finite weights of shape ``[K]`` (need not sum to 1), numpy or torch.
        precision: Bits of the frequencies' total (16 is what the file format uses).

    Returns:
        int64 array of shape ``[K]``, every entry >= 1, summing to ``2**precision``.

    Raises:
        ValueError: ``probs`` is not 1-D, has fewer than 2 or more than ``2**precision`` entries, or has a negative,
            non-finite or all-zero weight.
    """
    if hasattr(probs, "detach"):  # a torch tensor
        probs = probs.detach().cpu().double().numpy()
    weights = np.asarray(probs, dtype=np.float64)
    total = 1 << precision
    if weights.ndim != 1 or not 2 <= weights.size <= total:
        raise ValueError(f"probs must be 1-D with 2..{total} entries, got shape {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("probs must be finite, non-negative and not all zero")
    num_symbols = weights.size
    scaled = weights / weights.sum() * (total - num_symbols)
    floors = np.floor(scaled)
    freqs = floors.astype(np.int64) + 1
    leftover = total - int(freqs.sum())
    # Fractional parts, largest first, ties to the lower index (stable sort): the deterministic tie-break.
    order = np.argsort(-(scaled - floors), kind="stable")
    if leftover >= 0:
        # leftover < K in exact arithmetic; the loop only guards against float rounding of the normalisation.
        while leftover > 0:
            take = min(leftover, num_symbols)
            freqs[order[:take]] += 1
            leftover -= take
    else:  # float rounding overshot by a few units: take them from the largest frequencies, never below 1
        for index in np.argsort(-freqs, kind="stable"):
            take = min(-leftover, int(freqs[index]) - 1)
            freqs[index] -= take
            leftover += take
            if leftover == 0:
                break
    assert int(freqs.sum()) == total and int(freqs.min()) >= 1
    return freqs


def model_digest(probs_list: Sequence[Any], extra: bytes = b"") -> bytes:
    """The 8-byte model fingerprint stored in the header.

    SHA-256 over a domain tag, the number of modules, and each module's quantized frequencies
    (``quantize_probabilities``, as little-endian u32 with their count), then ``extra``; first 8 bytes. Put into
    ``extra`` whatever else decoding depends on (e.g. the centroids' bytes, the LPC quantizer tables), so a file
    decoded with any other checkpoint is refused instead of decoding to garbage.

    Args:
        probs_list: The ``M`` per-module distributions, each of shape ``[K]``.
        extra: Further model bytes to bind the file to.

    Returns:
        8 bytes.
    """
    hasher = hashlib.sha256(b"csprune.cmrl.model\0")
    hasher.update(_U32.pack(len(probs_list)))
    for probs in probs_list:
        freqs = quantize_probabilities(probs)
        hasher.update(_U32.pack(freqs.size))
        hasher.update(freqs.astype("<u4").tobytes())
    hasher.update(bytes(extra))
    return hasher.digest()[:DIGEST_BYTES]


def _coder_model(freqs: np.ndarray) -> Any:
    import constriction  # imported lazily, as in csprune.export.coding

    # freq / 2**16 is exact in float64, so both sides hand constriction bit-identical probabilities.
    return constriction.stream.model.Categorical(freqs.astype(np.float64) / float(1 << PROB_PRECISION), perfect=False)


def _encode_chunk(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    """Range-code ``symbols`` (1-D, in ``[0, K)``) into the chunk bytes the file stores (trailing zeros dropped)."""
    import constriction

    encoder = constriction.stream.queue.RangeEncoder()
    if symbols.size:
        encoder.encode(symbols.astype(np.int32), _coder_model(freqs))
    chunk = np.asarray(encoder.get_compressed(), dtype=np.uint32).astype("<u4").tobytes()
    return _strip_last_word(chunk)


# --------------------------------------------------------------------------------------------- writing


def _check_lsf_bits(path: Path, lsf_bits: Any) -> tuple[int, ...]:
    bits = tuple(int(b) for b in lsf_bits)
    if not 1 <= len(bits) <= 255:
        raise BitstreamError(path, f"LPC order (len(lsf_bits)) must be 1..255, got {len(bits)}")
    bad = [b for b in bits if not 1 <= b <= _MAX_LSF_BITS]
    if bad:
        raise BitstreamError(path, f"every LSF bit width must be 1..{_MAX_LSF_BITS}, got {bits}")
    return bits


def _pack_lsf(lsf_idx: np.ndarray, lsf_bits: tuple[int, ...]) -> bytes:
    """Fixed-width, MSB-first bit packing of ``lsf_idx`` ``[F, order]``."""
    columns = []
    for dim, width in enumerate(lsf_bits):
        shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
        columns.append((lsf_idx[:, dim : dim + 1] >> shifts) & 1)  # [F, width]
    if not columns or lsf_idx.shape[0] == 0:
        return b""
    bits = np.concatenate(columns, axis=1).astype(np.uint8).reshape(-1)
    return np.packbits(bits, bitorder="big").tobytes()


def _unpack_lsf(path: Path, data: bytes, num_frames: int, lsf_bits: tuple[int, ...]) -> np.ndarray:
    order, frame_bits = len(lsf_bits), sum(lsf_bits)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="big")
    if bits[num_frames * frame_bits :].any():
        raise BitstreamError(path, "corrupt LSF side info: padding bits are not zero")
    bits = bits[: num_frames * frame_bits].reshape(num_frames, frame_bits).astype(np.int64)
    lsf_idx = np.empty((num_frames, order), dtype=np.int64)
    start = 0
    for dim, width in enumerate(lsf_bits):
        weights = np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64)
        lsf_idx[:, dim] = bits[:, start : start + width] @ weights
        start += width
    return lsf_idx


def _as_int_array(path: Path, array: Any, what: str) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise BitstreamError(path, f"{what} must be an integer array, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def write_cmrl(
    path: str | os.PathLike,
    codes: Sequence[Any],
    probs: Sequence[Any],
    *,
    sample_rate: int,
    num_samples: int,
    lsf_idx: Any | None = None,
    lsf_bits: Sequence[int] | None = None,
    digest: bytes,
) -> int:
    """Entropy-code one utterance into a ``.cmrl`` file (atomically: temp file, then ``os.replace``).

    Args:
        path: Output file.
        codes: ``M`` integer arrays of shape ``[F, C]``, module ``m``'s codes in ``[0, K)``.
        probs: ``M`` code distributions of shape ``[K]`` (quantized with ``quantize_probabilities``).
        sample_rate: Sample rate of the waveform in Hz.
        num_samples: Length of the waveform in samples (the decoder trims its output to it).
        lsf_idx: LPC mode: integer array ``[F, order]`` of LSF indices; None without side info.
        lsf_bits: LPC mode: bit width of each LSF dimension (length ``order``, each 1..16); given iff ``lsf_idx`` is.
        digest: ``model_digest(probs, extra)`` of the model that produced the codes.

    Returns:
        The number of bytes written.

    Raises:
        BitstreamError: Shapes disagree, a code (naming the module) or LSF index (naming the dimension) is out of
            range, or a header field does not fit its width.
    """
    path = Path(path)
    num_modules = len(codes)
    if num_modules != len(probs):
        raise BitstreamError(path, f"got {num_modules} code arrays but {len(probs)} distributions")
    if not 1 <= num_modules <= 255:
        raise BitstreamError(path, f"the format holds 1..255 modules, got {num_modules}")
    digest = bytes(digest)
    if len(digest) != DIGEST_BYTES:
        raise BitstreamError(path, f"digest must be {DIGEST_BYTES} bytes (model_digest), got {len(digest)}")
    if not 0 < int(sample_rate) <= _U32_MAX or not 0 < int(num_samples) <= _U32_MAX:
        raise BitstreamError(
            path, f"sample_rate and num_samples must be 1..{_U32_MAX}, got {sample_rate}, {num_samples}")
    try:
        freqs = [quantize_probabilities(p) for p in probs]
    except ValueError as error:
        raise BitstreamError(path, f"invalid code distribution: {error}") from None
    num_centroids = freqs[0].size
    if any(f.size != num_centroids for f in freqs):
        raise BitstreamError(path, f"all modules must have the same K, got {[f.size for f in freqs]}")
    if num_centroids > 0xFFFF:
        raise BitstreamError(path, f"the format holds K <= 65535 centroids, got {num_centroids}")

    arrays = [_as_int_array(path, c, f"codes of module {m}") for m, c in enumerate(codes)]
    shape = arrays[0].shape
    for m, array in enumerate(arrays):
        if array.ndim != 2 or array.shape != shape:
            raise BitstreamError(path, f"codes of module {m} have shape {array.shape}; every module needs the same "
                                 f"[F, C] (module 0 has {shape})")
    num_frames, code_length = shape
    if not 1 <= code_length <= 0xFFFF or num_frames > _U32_MAX:
        raise BitstreamError(path, f"codes shape {shape} does not fit the format (C in 1..65535)")
    for m, array in enumerate(arrays):
        bad = np.flatnonzero((array < 0) | (array >= num_centroids))
        if bad.size:
            frame, position = divmod(int(bad[0]), code_length)
            raise BitstreamError(
                path, f"module {m}: code {int(array.reshape(-1)[bad[0]])} at frame {frame}, position {position} is "
                f"outside [0, {num_centroids}) ({bad.size} codes out of range)")

    if (lsf_idx is None) != (lsf_bits is None):
        raise BitstreamError(path, "lsf_idx and lsf_bits must be given together (LPC mode) or not at all")
    side_info = b""
    widths: tuple[int, ...] = ()
    if lsf_idx is not None:
        widths = _check_lsf_bits(path, lsf_bits)
        lsf = _as_int_array(path, lsf_idx, "lsf_idx")
        if lsf.shape != (num_frames, len(widths)):
            raise BitstreamError(
                path, f"lsf_idx has shape {lsf.shape}, expected [F, order] = {(num_frames, len(widths))}")
        for dim, width in enumerate(widths):
            column = lsf[:, dim]
            if column.size and (column.min() < 0 or column.max() >= 1 << width):
                raise BitstreamError(path, f"LSF dimension {dim}: index outside [0, {1 << width}) ({width} bits)")
        side_info = _pack_lsf(lsf, widths)

    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, int(sample_rate), int(num_samples), num_frames, num_modules,
                          code_length, num_centroids, len(widths), digest)]
    parts.append(_pack_nibbles(widths))
    for array, module_freqs in zip(arrays, freqs):
        chunk = _encode_chunk(array.reshape(-1), module_freqs)
        parts.append(_U32.pack(len(chunk)))
        parts.append(chunk)
    parts.append(side_info)
    body = b"".join(parts)
    data = body + _U32.pack(zlib.crc32(body))

    atomic_write(path, lambda out: out.write(data))  # a crash leaves the old file or the new one
    return len(data)


def _pack_nibbles(widths: tuple[int, ...]) -> bytes:
    nibbles = [w - 1 for w in widths] + [0] * (len(widths) % 2)
    return bytes(nibbles[i] | (nibbles[i + 1] << 4) for i in range(0, len(nibbles), 2))


def _strip_last_word(chunk: bytes) -> bytes:
    """Drop up to 3 trailing zero bytes (inside the last 32-bit word only, so zero padding restores it exactly)."""
    keep = len(chunk)
    while keep > len(chunk) - 3 and keep > 0 and chunk[keep - 1] == 0:
        keep -= 1
    return chunk[:keep]


# --------------------------------------------------------------------------------------------- reading


@dataclass
class _Parsed:
    header: dict[str, Any]
    chunks: list[bytes]
    side_info: bytes


def _parse(path: Path, data: bytes) -> _Parsed:
    """Check the framing and CRC of a whole file; decode nothing."""
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        what = "empty" if not data else f"only {len(data)} bytes long"
        raise BitstreamError(path, f"not a CMRL file or truncated: the file is {what}")
    if data[: len(MAGIC)] != MAGIC:
        kind = next((name for magic, name in _FOREIGN_MAGICS.items() if data.startswith(magic)), None)
        found = f"it looks like {kind}" if kind else f"it starts with {data[:4]!r}, expected {MAGIC!r}"
        raise BitstreamError(path, f"not a CMRL file: {found}")
    if len(data) > len(MAGIC) and data[len(MAGIC)] > FORMAT_VERSION:
        raise BitstreamError(path, f"CMRL format version {data[len(MAGIC)]} is newer than this reader "
                             f"(version {FORMAT_VERSION}); update csprune to read it")
    if len(data) < _HEADER.size:
        raise BitstreamError(path, f"truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    (_, version, sample_rate, num_samples, num_frames, num_modules, code_length, num_centroids, order,
     digest) = _HEADER.unpack_from(data)
    if version < 1:
        raise BitstreamError(path, f"corrupt header: format version {version}")
    offset = _HEADER.size
    nibble_bytes = (order + 1) // 2
    if len(data) < offset + nibble_bytes:
        raise BitstreamError(path, "truncated inside the LSF bit widths")
    nibbles = [n for byte in data[offset : offset + nibble_bytes] for n in (byte & 15, byte >> 4)]
    lsf_bits = tuple(n + 1 for n in nibbles[:order]) if order else None
    offset += nibble_bytes
    chunks = []
    for m in range(num_modules):
        if len(data) < offset + _U32.size:
            raise BitstreamError(path, f"truncated (or corrupt) before the chunk of module {m}")
        (length,) = _U32.unpack_from(data, offset)
        offset += _U32.size
        if len(data) < offset + length:
            raise BitstreamError(path, f"truncated (or corrupt length) in the chunk of module {m}: it declares "
                                 f"{length} bytes, {len(data) - offset} remain")
        chunks.append(data[offset : offset + length])
        offset += length
    side_bytes = (num_frames * sum(lsf_bits) + 7) // 8 if lsf_bits else 0
    if len(data) < offset + side_bytes + _CRC_BYTES:
        raise BitstreamError(path, f"truncated (or corrupt header): {len(data)} bytes, the header implies "
                             f"{offset + side_bytes + _CRC_BYTES}")
    side_info = data[offset : offset + side_bytes]
    offset += side_bytes
    if len(data) != offset + _CRC_BYTES:
        raise BitstreamError(path, f"corrupt: {len(data) - offset - _CRC_BYTES} unexpected bytes after the payload")
    (stored_crc,) = _U32.unpack_from(data, offset)
    if zlib.crc32(data[:offset]) != stored_crc:
        raise BitstreamError(path, "corrupt: CRC32 mismatch (the file was damaged after it was written)")
    if num_modules == 0 or code_length == 0 or num_centroids < 2 or sample_rate == 0 or num_samples == 0:
        raise BitstreamError(path, "corrupt header: zero modules, code length, centroids, rate or length")
    if order % 2 and nibbles[order]:
        raise BitstreamError(path, "corrupt header: the padding nibble after the LSF bit widths is not zero")
    header = {
        "version": version,
        "sample_rate": sample_rate,
        "num_samples": num_samples,
        "num_frames": num_frames,
        "num_modules": num_modules,
        "code_length": code_length,
        "num_centroids": num_centroids,
        "lpc_order": order,
        "lsf_bits": lsf_bits,
        "digest": digest,
        "chunk_bytes": [len(c) for c in chunks],
        "side_info_bytes": side_bytes,
        "file_bytes": len(data),
        "overhead_bytes": len(data) - sum(len(c) for c in chunks) - side_bytes,
        "duration_s": num_samples / sample_rate,
        "bitrate_bps": 8.0 * len(data) * sample_rate / num_samples,
    }
    return _Parsed(header, chunks, side_info)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BitstreamError(path, "no such file") from None
    except IsADirectoryError:
        raise BitstreamError(path, "is a directory, not a CMRL file") from None
    except OSError as error:  # permissions, an I/O error: still the documented error, naming the file
        raise BitstreamError(path, f"cannot be read ({error.strerror or error})") from error


def read_cmrl_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a ``.cmrl`` file's header and framing without a model (for messages and inspection).

    The whole file is read and its CRC checked, so the numbers returned are trustworthy; nothing is decoded.

    Args:
        path: The file.

    Returns:
        A dict with ``version``, ``sample_rate``, ``num_samples``, ``num_frames``, ``num_modules``, ``code_length``
        (C), ``num_centroids`` (K), ``lpc_order``, ``lsf_bits`` (tuple or None), ``digest`` (8 bytes),
        ``chunk_bytes`` (per module), ``side_info_bytes``, ``file_bytes``, ``overhead_bytes``, ``duration_s`` and
        ``bitrate_bps`` (``8 * file_bytes / duration_s``).

    Raises:
        BitstreamError: Not a CMRL file, newer version, truncated or corrupt.
    """
    path = Path(path)
    return _parse(path, _read_bytes(path)).header


def read_cmrl(
    path: str | os.PathLike,
    probs: Sequence[Any],
    *,
    digest: bytes,
    lsf_bits: Sequence[int] | None = None,
    code_length: int | None = None,
    sample_rate: int | None = None,
    num_frames_for: Callable[[int], int] | None = None,
) -> CMRLStream:
    """Decode a ``.cmrl`` file.

    Only a file that is exactly what ``write_cmrl`` writes for the contents returned is accepted: every chunk must
    be the range coder's encoding of exactly ``F * C`` codes (re-encoding the decoded codes gives the chunk back
    byte for byte), so a header whose frame count or code length disagrees with the payload -- even one with a
    recomputed CRC -- is refused instead of decoding codes past the end of the data or leaving data undecoded.

    Args:
        path: The file.
        probs: The ``M`` per-module code distributions (shape ``[K]``) of the decoding model.
        digest: ``model_digest(probs, extra)`` of the decoding model; must equal the file's.
        lsf_bits: The LSF bit widths the decoding model expects; when given they must equal the file's (which are
            stored in it, so None just accepts them; ``()`` demands a file without side info).
        code_length: The codes per frame and module the decoding model expects (C); None accepts the file's.
        sample_rate: The sample rate the decoding model codes (Hz); None accepts the file's.
        num_frames_for: The decoding model's framing, ``num_samples -> frames``; when given, the file's frame count
            must be the one its declared length takes (so the decoded waveform is exactly ``num_samples`` long and
            built from every frame).

    Returns:
        The decoded ``CMRLStream``.

    Raises:
        BitstreamError: The file is not a CMRL file, newer, truncated or corrupt (including a payload that is not
            the encoding of the codes the header declares); it was written by another model (digest mismatch); or
            its shapes, rate or frame count disagree with ``probs`` / ``lsf_bits`` / ``code_length`` /
            ``sample_rate`` / ``num_frames_for``.
    """
    path = Path(path)
    parsed = _parse(path, _read_bytes(path))
    header = parsed.header
    if bytes(digest) != header["digest"]:
        raise BitstreamError(
            path, f"written by another model/checkpoint: its model digest is {header['digest'].hex()}, the decoding "
            f"model's is {bytes(digest).hex()} (decode it with the checkpoint that encoded it)")
    num_modules, num_centroids = header["num_modules"], header["num_centroids"]
    if len(probs) != num_modules:
        raise BitstreamError(path, f"the file has {num_modules} modules, the decoding model {len(probs)}")
    try:
        freqs = [quantize_probabilities(p) for p in probs]
    except ValueError as error:
        raise BitstreamError(path, f"invalid code distribution: {error}") from None
    for m, module_freqs in enumerate(freqs):
        if module_freqs.size != num_centroids:
            raise BitstreamError(path, f"module {m}: the file has K = {num_centroids} centroids, the model "
                                 f"{module_freqs.size}")
    if lsf_bits is not None and tuple(int(b) for b in lsf_bits) != (header["lsf_bits"] or ()):
        raise BitstreamError(path, f"the file's LSF bit widths {header['lsf_bits']} differ from the model's "
                             f"{tuple(lsf_bits)}")

    if code_length is not None and int(code_length) != header["code_length"]:
        raise BitstreamError(path, f"the file has {header['code_length']} codes per frame and module, the decoding "
                             f"model {int(code_length)}")
    if sample_rate is not None and int(sample_rate) != header["sample_rate"]:
        raise BitstreamError(path, f"sample rate {header['sample_rate']} Hz; the decoding model codes "
                             f"{int(sample_rate)} Hz")
    num_frames, num_samples = header["num_frames"], header["num_samples"]
    if num_frames_for is not None and int(num_frames_for(num_samples)) != num_frames:
        raise BitstreamError(path, f"corrupt header: {num_samples} samples take {int(num_frames_for(num_samples))} "
                             f"frames of the decoding model's framing, the file declares {num_frames}")

    import constriction

    code_length = header["code_length"]
    count = num_frames * code_length
    codes = []
    for m, (chunk, module_freqs) in enumerate(zip(parsed.chunks, freqs)):
        # Even the most probable code costs min_bits: a chunk too short for `count` of them cannot hold the codes
        # (refused before the decoder allocates them; a forged frame count could ask for 2**48).
        min_bits = -math.log2(int(module_freqs.max()) / float(1 << PROB_PRECISION))
        if count * min_bits > 8 * len(chunk) + _CODER_SLACK_BITS:
            raise BitstreamError(
                path, f"corrupt: module {m}'s chunk has {len(chunk)} bytes, too few for the {count} codes the header "
                f"declares ({num_frames} frames x {code_length}; each costs at least {min_bits:.3g} bits)")
        padded = chunk + b"\0" * (-len(chunk) % 4)
        words = np.frombuffer(padded, dtype="<u4").astype(np.uint32)
        try:
            decoder = constriction.stream.queue.RangeDecoder(words)
            symbols = decoder.decode(_coder_model(module_freqs), count) if count else np.zeros(0, np.int32)
        except Exception as error:  # constriction reports malformed data with its own exception types
            raise BitstreamError(path, f"module {m}: the range-coded chunk does not decode ({error})") from None
        symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
        # The decoder happily decodes past the end of the data (zeros) or stops before it: only the canonical
        # encoding of exactly these codes is the chunk a writer produced for them.
        if symbols.size != count or _encode_chunk(symbols, module_freqs) != chunk:
            raise BitstreamError(
                path, f"corrupt: module {m}'s chunk is not the encoding of the {count} codes the header declares "
                f"({num_frames} frames x {code_length}): the frame count or code length does not match the payload")
        codes.append(symbols.reshape(num_frames, code_length))
    lsf_idx = None
    if header["lsf_bits"]:
        lsf_idx = _unpack_lsf(path, parsed.side_info, num_frames, header["lsf_bits"])
    return CMRLStream(
        codes=codes,
        lsf_idx=lsf_idx,
        lsf_bits=header["lsf_bits"],
        sample_rate=header["sample_rate"],
        num_samples=header["num_samples"],
        num_frames=num_frames,
        module_bits=[8 * n for n in header["chunk_bytes"]],
        side_info_bits=8 * header["side_info_bytes"],
        overhead_bytes=header["overhead_bytes"],
        file_bytes=header["file_bytes"],
        digest=header["digest"],
    )
