"""Fault injection for the ``.cmrl`` reader (recipes/codec/bitstream.py): a deterministic, seeded fuzzer.

Every damaged or forged file must be refused with the documented ``BitstreamError`` (naming the file) or decode to
exactly what its bytes say; nothing else may escape and nothing may be returned silently wrong. ``fuzz_cmrl`` counts,
per fault kind:

``trials``
    Files tried.
``detected``
    ``read_cmrl`` raised ``BitstreamError`` and its message names the file.
``accepted``
    ``read_cmrl`` returned a stream, and the file is *exactly* what ``write_cmrl`` writes for that stream (re-writing
    it reproduces the bytes): a forged but internally consistent file, e.g. another length with the frame count it
    takes, decodes to what it says. (A file the reader accepts must also be accepted by ``read_cmrl_header`` with the
    same numbers.)
``silently_wrong``
    ``read_cmrl`` returned a stream that is neither the original's contents (for the unchanged file) nor what the file
    says: codes decoded past the end of a chunk, data left undecoded, a declared length the frames do not cover, a
    header field the reader ignored, ...
``noncanonical``
    ``read_cmrl`` returned the original's contents from a file that differs from what ``write_cmrl`` writes for them
    (ignored bytes that happen not to matter). Not wrong, but the reader is meant to be strict, so it is counted.
``crashed``
    Any other exception from ``read_cmrl`` or ``read_cmrl_header`` (or a ``BitstreamError`` not naming the file).

The fault kinds: ``random`` bytes (raw, or behind the magic and version); ``random_crc`` (a prefix of a valid file,
then random bytes, with a valid CRC); ``truncate`` (every proper prefix of every base file); ``truncate_crc`` (every
prefix of the CRC'd body with the CRC recomputed); ``bitflip`` (1..8 flipped bits or a short burst, CRC kept);
``forged_header`` (one header field -- version, rate, length, frame count, modules, code length, centroids, LPC order,
digest, an LSF width nibble, a chunk length -- changed, CRC recomputed); ``forged_payload`` (a chunk or the side info
altered, shortened or extended, its length prefix adjusted, CRC recomputed); ``forged_frames`` (the frame count and,
consistently, the side info size and the declared length changed, or F and C traded, CRC recomputed: only the payload
can tell); ``splice`` (a chunk replaced by another module's or another utterance's chunk, CRC recomputed).

The reader is called the way ``SpeechCodec.read`` calls it: with the model's digest, LSF widths (``()`` without LPC),
code length, sample rate and framing. ``python -m tests.test_faults_cmrl`` prints the table.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from recipes.codec.bitstream import (
    MAGIC,
    BitstreamError,
    CMRLStream,
    model_digest,
    read_cmrl,
    read_cmrl_header,
    write_cmrl,
)
from recipes.codec.data import num_frames

__all__ = ["KINDS", "COUNTERS", "fuzz_cmrl", "format_table"]

K = 32
RATE = 16000
FRAME_LEN, OVERLAP = 8, 2  # a tiny framing (hop 6) so that small files have plausible lengths
HEADER = struct.Struct("<4sBIIIBHHB8s")  # the documented fixed header, re-stated here (not imported from the reader)
FIELDS = ("magic", "version", "sample_rate", "num_samples", "num_frames", "modules", "code_length", "centroids",
          "order", "digest")
FIELD_MAX = {"version": 0xFF, "sample_rate": 0xFFFFFFFF, "num_samples": 0xFFFFFFFF, "num_frames": 0xFFFFFFFF,
             "modules": 0xFF, "code_length": 0xFFFF, "centroids": 0xFFFF, "order": 0xFF}

KINDS = ("random", "random_crc", "truncate", "truncate_crc", "bitflip", "forged_header", "forged_payload",
         "forged_frames", "splice")
COUNTERS = ("trials", "detected", "accepted", "silently_wrong", "noncanonical", "crashed")


def frames_for(num_samples: int) -> int:
    """The framing the fuzzed files were written with (the codec's ``num_frames``)."""
    return num_frames(num_samples, FRAME_LEN, OVERLAP)


def _samples_for(frames: int) -> int:
    """A length that takes exactly ``frames`` frames (the largest one)."""
    return max(1, frames * (FRAME_LEN - OVERLAP) - OVERLAP)


def _skewed_probs(shift: int) -> np.ndarray:
    probs = np.exp(-np.arange(K) / 3.0)
    return np.roll(probs / probs.sum(), shift)


@dataclass
class _Parts:
    """A file cut into its documented fields (so a forger can change one and put it back together)."""

    fields: list  # the 10 fixed-header values
    nibbles: bytes
    chunks: list[bytes]
    side: bytes

    def body(self) -> bytes:
        values = list(self.fields)
        for i, name in enumerate(FIELDS):
            if name in FIELD_MAX:
                values[i] = int(values[i]) % (FIELD_MAX[name] + 1)
        out = [HEADER.pack(*values), self.nibbles]
        for chunk in self.chunks:
            out += [struct.pack("<I", len(chunk)), chunk]
        out.append(self.side)
        return b"".join(out)

    def file(self) -> bytes:
        return _with_crc(self.body())

    def copy(self) -> _Parts:
        return _Parts(list(self.fields), self.nibbles, list(self.chunks), self.side)


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@dataclass
class _Base:
    """A valid file and everything needed to read and judge it."""

    name: str
    data: bytes
    parts: _Parts
    probs: list[np.ndarray]
    digest: bytes
    lsf_bits: tuple[int, ...]  # () without LPC: what the codec passes
    code_length: int
    codes: list[np.ndarray]
    lsf_idx: np.ndarray | None
    num_samples: int

    def read(self, path: Path) -> CMRLStream:
        return read_cmrl(path, self.probs, digest=self.digest, lsf_bits=self.lsf_bits, code_length=self.code_length,
                         sample_rate=RATE, num_frames_for=frames_for)


def _make_base(folder: Path, name: str, modules: int, frames: int, length: int, lsf_bits: tuple[int, ...],
               seed: int) -> _Base:
    rng = np.random.default_rng(seed)
    probs = [_skewed_probs(7 * m) for m in range(modules)]
    codes = [rng.choice(K, size=(frames, length), p=p) for p in probs]
    lsf = rng.integers(0, 1 << np.array(lsf_bits), size=(frames, len(lsf_bits))) if lsf_bits else None
    digest = model_digest(probs, extra=name.encode())
    num_samples = _samples_for(frames) - int(rng.integers(0, FRAME_LEN - OVERLAP))
    assert frames_for(num_samples) == frames
    path = folder / f"{name}.cmrl"
    write_cmrl(path, codes, probs, sample_rate=RATE, num_samples=num_samples, lsf_idx=lsf,
               lsf_bits=lsf_bits or None, digest=digest)
    data = path.read_bytes()
    fields = list(HEADER.unpack_from(data))
    offset = HEADER.size
    nibble_bytes = (len(lsf_bits) + 1) // 2
    nibbles = data[offset : offset + nibble_bytes]
    offset += nibble_bytes
    chunks = []
    for _ in range(modules):
        (size,) = struct.unpack_from("<I", data, offset)
        chunks.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    side = data[offset:-4]
    parts = _Parts(fields, nibbles, chunks, side)
    assert parts.file() == data
    return _Base(name, data, parts, probs, digest, lsf_bits, length, codes, lsf, num_samples)


def _bases(folder: Path) -> list[_Base]:
    return [
        _make_base(folder, "lpc8", modules=2, frames=3, length=4, lsf_bits=(6, 6, 5, 5, 5, 4, 4, 3), seed=0),
        _make_base(folder, "plain", modules=2, frames=5, length=3, lsf_bits=(), seed=1),
        _make_base(folder, "lpc3", modules=1, frames=1, length=5, lsf_bits=(3, 5, 2), seed=2),  # odd order: padding
        _make_base(folder, "long", modules=3, frames=12, length=16, lsf_bits=(), seed=3),
    ]


# ------------------------------------------------------------------------------------------------- faults


def _random(rng: np.random.Generator, base: _Base, bases: list[_Base]) -> bytes:
    body = rng.integers(0, 256, int(rng.integers(0, 160)), dtype=np.uint8).tobytes()
    prefix = [b"", MAGIC, MAGIC + b"\x01", MAGIC + bytes([int(rng.integers(0, 256))])][int(rng.integers(0, 4))]
    return prefix + body


def _random_crc(rng: np.random.Generator, base: _Base, bases: list[_Base]) -> bytes:
    body = base.data[:-4]
    keep = int(rng.integers(5, len(body) + 1))
    extra = rng.integers(0, 256, int(rng.integers(0, 2 * len(body))), dtype=np.uint8).tobytes()
    return _with_crc(body[:keep] + extra)


def _bitflip(rng: np.random.Generator, base: _Base, bases: list[_Base]) -> bytes:
    data = bytearray(base.data)
    if rng.random() < 0.25:  # a burst of up to 32 bits: CRC32 catches every one
        start = int(rng.integers(0, 8 * len(data) - 32))
        pattern = int(rng.integers(1, 1 << 32))
        for i in range(32):
            if pattern >> i & 1:
                data[(start + i) // 8] ^= 1 << ((start + i) % 8)
    else:
        for bit in rng.choice(8 * len(data), size=int(rng.integers(1, 9)), replace=False):
            data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def _new_value(rng: np.random.Generator, old: int, top: int) -> int:
    flipped = old ^ (1 << int(rng.integers(0, top.bit_length())))
    choices = [old + 1, old - 1, 0, top, int(rng.integers(0, top + 1)), flipped, old * 2, old // 2 if old > 1 else old + 2]
    for _ in range(20):
        value = int(choices[int(rng.integers(0, len(choices)))]) % (top + 1)
        if value != old:
            return value
    return (old + 1) % (top + 1)


def _forged_header(rng: np.random.Generator, base: _Base, bases: list[_Base]) -> bytes:
    parts = base.parts.copy()
    targets = list(FIELD_MAX) + ["digest", "chunk_length"] + (["nibble"] if parts.nibbles else [])
    target = targets[int(rng.integers(0, len(targets)))]
    if target in FIELD_MAX:
        index = FIELDS.index(target)
        parts.fields[index] = _new_value(rng, int(parts.fields[index]), FIELD_MAX[target])
        if target == "order" and rng.random() < 0.5:  # with as many width nibbles as the new order needs
            parts.nibbles = rng.integers(0, 256, (parts.fields[index] + 1) // 2, dtype=np.uint8).tobytes()
        return parts.file()
    if target == "digest":
        digest = bytearray(parts.fields[9])
        digest[int(rng.integers(0, len(digest)))] ^= int(rng.integers(1, 256))
        parts.fields[9] = bytes(digest)
        return parts.file()
    if target == "nibble":
        nibbles = bytearray(parts.nibbles)
        nibbles[int(rng.integers(0, len(nibbles)))] ^= int(rng.integers(1, 256))
        parts.nibbles = bytes(nibbles)
        return parts.file()
    # A chunk's length prefix, the bytes left where they are.
    body = bytearray(parts.body())
    offset = HEADER.size + len(parts.nibbles)
    module = int(rng.integers(0, len(parts.chunks)))
    offset += sum(4 + len(c) for c in parts.chunks[:module])
    struct.pack_into("<I", body, offset, _new_value(rng, len(parts.chunks[module]), 0xFFFFFFFF))
    return _with_crc(bytes(body))


def _mutate_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    data = bytearray(data)
    op = int(rng.integers(0, 6))
    if op == 0 and data:  # flip bits
        for bit in rng.choice(8 * len(data), size=min(8 * len(data), int(rng.integers(1, 4))), replace=False):
            data[bit // 8] ^= 1 << (bit % 8)
    elif op == 1 and data:  # drop bytes at the end
        del data[len(data) - int(rng.integers(1, len(data) + 1)) :]
    elif op == 2:  # append bytes (zeros: a padded word; or random)
        size = int(rng.integers(1, 9))
        data += bytes(size) if rng.random() < 0.5 else rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    elif op == 3 and data:  # delete bytes in the middle
        start = int(rng.integers(0, len(data)))
        del data[start : start + int(rng.integers(1, 4))]
    elif op == 4:  # insert bytes
        start = int(rng.integers(0, len(data) + 1))
        data[start:start] = rng.integers(0, 256, int(rng.integers(1, 4)), dtype=np.uint8).tobytes()
    elif data:  # overwrite the last byte (the coder's final word)
        data[-1] = (data[-1] + int(rng.integers(1, 256))) % 256
    else:
        data += b"\x00"
    return bytes(data)


def _forged_payload(rng: np.random.Generator, base: _Base, bases: list[_Base]) -> bytes:
    parts = base.parts.copy()
    if parts.side and rng.random() < 0.3:
        if rng.random() < 0.5:  # change bits, keep the size (also the padding bits at the end)
            side = bytearray(parts.side)
            side[int(rng.integers(0, len(side)))] ^= 1 << int(rng.integers(0, 8))
            parts.side = bytes(side)
        else:
            parts.side = _mutate_bytes(rng, parts.side)
        return parts.file()
    module = int(rng.integers(0, len(parts.chunks)))
    parts.chunks[module] = _mutate_bytes(rng, parts.chunks[module])
    return parts.file()


def _resize_side(rng: np.random.Generator, base: _Base, frames: int) -> bytes:
    """Side info for ``frames`` frames of ``base``'s widths: the original's bits, cut or extended, padding zeroed."""
    if not base.lsf_bits:
        return b""
    frame_bits = sum(base.lsf_bits)
    bits = np.unpackbits(np.frombuffer(base.parts.side, dtype=np.uint8))[: base.parts.fields[4] * frame_bits]
    want = frames * frame_bits
    if want > bits.size:
        bits = np.concatenate([bits, rng.integers(0, 2, want - bits.size).astype(np.uint8)])
    return np.packbits(bits[:want]).tobytes()


def _forged_frames(rng: np.random.Generator, base: _Base, bases: list[_Base]) -> bytes:
    parts = base.parts.copy()
    old_frames, length = int(parts.fields[4]), int(parts.fields[6])
    if rng.random() < 0.2 and old_frames * length > 1:  # trade F and C (same number of codes)
        divisors = [d for d in range(1, old_frames * length + 1) if old_frames * length % d == 0 and d != old_frames]
        frames = int(divisors[int(rng.integers(0, len(divisors)))])
        parts.fields[6] = old_frames * length // frames
    else:
        options = [old_frames + 1, old_frames - 1, old_frames + 2, old_frames - 2, 0, 2 * old_frames,
                   old_frames + int(rng.integers(3, 1000)), 0xFFFFFFFF, 1 << 24, 1 << 31]
        frames = max(0, int(options[int(rng.integers(0, len(options)))]))
        if frames == old_frames:
            frames += 1
    parts.fields[4] = frames
    if frames * sum(base.lsf_bits) < 1 << 20:  # a side info of the matching size (else only the header is forged)
        parts.side = _resize_side(rng, base, frames)
    if rng.random() < 0.8 and frames:  # and a length that takes exactly that many frames
        parts.fields[3] = min(0xFFFFFFFF, _samples_for(frames))
    return parts.file()


def _splice(rng: np.random.Generator, base: _Base, bases: list[_Base]) -> bytes:
    parts = base.parts.copy()
    module = int(rng.integers(0, len(parts.chunks)))
    choice = int(rng.integers(0, 3))
    if choice == 0 and len(parts.chunks) > 1:  # another module's chunk of the same file
        parts.chunks[module] = parts.chunks[(module + int(rng.integers(1, len(parts.chunks)))) % len(parts.chunks)]
    elif choice < 2:  # another file's chunk
        other = [b for b in bases if b is not base][int(rng.integers(0, len(bases) - 1))]
        parts.chunks[module] = other.parts.chunks[int(rng.integers(0, len(other.parts.chunks)))]
    else:  # a valid encoding of other codes of the same shape under the same module's model: says other codes
        from recipes.codec.bitstream import _encode_chunk, quantize_probabilities

        codes = rng.choice(K, size=base.codes[module].size, p=base.probs[module])
        parts.chunks[module] = _encode_chunk(codes, quantize_probabilities(base.probs[module]))
    return parts.file()


_GENERATORS: dict[str, Callable[[np.random.Generator, _Base, list[_Base]], bytes]] = {
    "random": _random,
    "random_crc": _random_crc,
    "bitflip": _bitflip,
    "forged_header": _forged_header,
    "forged_payload": _forged_payload,
    "forged_frames": _forged_frames,
    "splice": _splice,
}


def _cases(seed: int, trials: int, bases: list[_Base]):
    """Yield ``(kind, base, data)``: ``trials`` random cases of each random kind, every truncation of every base."""
    for base in bases:
        for length in range(len(base.data)):
            yield "truncate", base, base.data[:length]
        body = base.data[:-4]
        for length in range(len(body)):
            yield "truncate_crc", base, _with_crc(body[:length])
    for index, (kind, generate) in enumerate(_GENERATORS.items()):
        rng = np.random.default_rng([seed, index])
        for _ in range(trials):
            base = bases[int(rng.integers(0, len(bases)))]
            yield kind, base, generate(rng, base, bases)


# ------------------------------------------------------------------------------------------------- judging


def _same(stream: CMRLStream, base: _Base) -> bool:
    """The stream holds exactly the original's contents."""
    return (
        len(stream.codes) == len(base.codes)
        and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(stream.codes, base.codes))
        and ((stream.lsf_idx is None and base.lsf_idx is None)
             or (stream.lsf_idx is not None and base.lsf_idx is not None
                 and stream.lsf_idx.shape == base.lsf_idx.shape and np.array_equal(stream.lsf_idx, base.lsf_idx)))
        and (stream.sample_rate, stream.num_samples, stream.num_frames, stream.digest)
        == (RATE, base.num_samples, base.codes[0].shape[0], base.digest)
    )


def _says(stream: CMRLStream, base: _Base, data: bytes, folder: Path) -> bool:
    """The file is exactly what ``write_cmrl`` writes for the stream (the stream is what the file says)."""
    path = folder / "rewritten.cmrl"
    try:
        write_cmrl(path, stream.codes, base.probs, sample_rate=stream.sample_rate, num_samples=stream.num_samples,
                   lsf_idx=stream.lsf_idx, lsf_bits=stream.lsf_bits, digest=stream.digest)
    except BitstreamError:
        return False
    rewritten = path.read_bytes()
    return rewritten == data and frames_for(stream.num_samples) == stream.num_frames


def _judge(base: _Base, data: bytes, folder: Path) -> str:
    path = folder / "fuzzed.cmrl"
    path.write_bytes(data)
    try:
        header = read_cmrl_header(path)
    except BitstreamError as error:
        header = None
        if str(path) not in str(error):
            return "crashed"
    except Exception:  # noqa: BLE001 - anything but the documented error is what the fuzzer looks for
        return "crashed"
    try:
        stream = base.read(path)
    except BitstreamError as error:
        return "detected" if str(path) in str(error) else "crashed"
    except Exception:  # noqa: BLE001
        return "crashed"
    if header is None or (header["num_frames"], header["num_samples"], header["digest"]) != (
            stream.num_frames, stream.num_samples, stream.digest):
        return "silently_wrong"  # the header reader disagrees with the decoder
    if data == base.data:
        return "accepted" if _same(stream, base) else "silently_wrong"
    if _says(stream, base, data, folder):
        return "accepted"
    return "noncanonical" if _same(stream, base) else "silently_wrong"


def fuzz_cmrl(seed: int = 0, trials: int = 300) -> dict[str, dict[str, int]]:
    """Fuzz the ``.cmrl`` reader; deterministic for a given ``seed``.

    Args:
        seed: Seed of every random fault.
        trials: Cases of each random kind (``truncate`` and ``truncate_crc`` always try every length of every base
            file, whatever ``trials``).

    Returns:
        ``{kind: {"trials", "detected", "accepted", "silently_wrong", "noncanonical", "crashed"}}`` (plain ints),
        one entry per kind in ``KINDS``; see the module doc for what each counter means.
    """
    table = {kind: dict.fromkeys(COUNTERS, 0) for kind in KINDS}
    with tempfile.TemporaryDirectory(prefix="fuzz-cmrl-") as tmp:
        folder = Path(tmp)
        bases = _bases(folder)
        for kind, base, data in _cases(seed, trials, bases):
            table[kind]["trials"] += 1
            table[kind][_judge(base, data, folder)] += 1
    return table


def format_table(table: dict[str, dict[str, int]]) -> str:
    """The fuzz counts as a fixed-width text table (one row per kind and a total)."""
    rows = [["kind", *COUNTERS]]
    totals = dict.fromkeys(COUNTERS, 0)
    for kind, counts in table.items():
        rows.append([kind, *(str(counts[c]) for c in COUNTERS)])
        for c in COUNTERS:
            totals[c] += counts[c]
    rows.append(["total", *(str(totals[c]) for c in COUNTERS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.faults
def test_fuzzed_cmrl_files_are_refused_or_decode_to_what_they_say(fault_table):
    table = fuzz_cmrl(seed=0, trials=500)
    for kind, counts in table.items():  # "detected": refused with BitstreamError; the rest decoded to what they say
        fault_table(f".cmrl reader: {kind}", counts["trials"], counts["detected"], counts["silently_wrong"], 0)
    total = sum(counts["trials"] for counts in table.values())
    assert total >= 4000
    for kind, counts in table.items():
        assert counts["trials"] == sum(counts[c] for c in COUNTERS[1:]), kind
        assert counts["crashed"] == 0, (kind, counts)
        assert counts["silently_wrong"] == 0, (kind, counts)
        assert counts["noncanonical"] == 0, (kind, counts)  # the reader accepts only what the writer writes
    # CRC32 catches every damage that leaves the CRC alone: no prefix, flip or burst gets through.
    for kind in ("truncate", "bitflip"):
        assert table[kind]["detected"] == table[kind]["trials"], (kind, table[kind])
    # Forgeries with a valid CRC do get past the CRC: the fuzzer really reaches the decoder.
    assert table["splice"]["accepted"] > 0 and table["forged_frames"]["detected"] > 0


def test_fuzz_counts_are_deterministic():
    assert fuzz_cmrl(seed=3, trials=15) == fuzz_cmrl(seed=3, trials=15)


# Regression cases, one per bug the fuzzer found (each a forged file with a valid CRC).


@pytest.fixture()
def plain(tmp_path) -> _Base:
    return _make_base(tmp_path, "plain", modules=2, frames=5, length=3, lsf_bits=(), seed=1)


def _forge(base: _Base, tmp_path: Path, **changes) -> Path:
    parts = base.parts.copy()
    for name, value in changes.items():
        if name == "nibbles":
            parts.nibbles = value
        elif name == "side":
            parts.side = value
        else:
            parts.fields[FIELDS.index(name)] = value
    path = tmp_path / "forged.cmrl"
    path.write_bytes(parts.file())
    return path


@pytest.mark.parametrize("frames", [4, 6], ids=["one-frame-less", "one-frame-more"])
def test_a_frame_count_the_payload_does_not_hold_is_refused(tmp_path, plain, frames):
    # Before: one frame less decoded the first 4 frames and ignored the rest of every chunk; one more decoded a
    # 6th frame of codes out of the zero padding past the end of the data. Both with a length that fits the count.
    path = _forge(plain, tmp_path, num_frames=frames, num_samples=_samples_for(frames))
    with pytest.raises(BitstreamError, match="not the encoding of the .* codes the header declares") as info:
        plain.read(path)
    assert str(path) in str(info.value)


def test_a_huge_frame_count_is_refused_before_decoding(tmp_path, plain):
    # Before: the decoder was asked for 2**32 * 3 codes and the process aborted (a failed 64 GiB allocation in Rust).
    path = _forge(plain, tmp_path, num_frames=0xFFFFFFFF, num_samples=0xFFFFFFFF)
    with pytest.raises(BitstreamError, match="too few for the"):
        read_cmrl(path, plain.probs, digest=plain.digest)
    assert read_cmrl_header(path)["num_frames"] == 0xFFFFFFFF  # the header alone is well-formed


def test_traded_frames_and_code_length_are_refused(tmp_path, plain):
    # Before: 3 frames of 5 codes instead of 5 of 3 decoded (same number of codes) into the wrong shape.
    path = _forge(plain, tmp_path, num_frames=3, code_length=5, num_samples=_samples_for(3))
    with pytest.raises(BitstreamError, match="5 codes per frame and module, the decoding model 3"):
        plain.read(path)


def test_a_length_the_frames_do_not_take_is_refused(tmp_path, plain):
    # Before: a declared length of 3 frames' worth with 5 frames of codes: the decoder trimmed the waveform and
    # dropped 2 frames (or, longer than the frames, returned a waveform shorter than declared).
    for samples in (_samples_for(3), _samples_for(5) + 1, 0xFFFFFFFF):
        path = _forge(plain, tmp_path, num_samples=samples)
        with pytest.raises(BitstreamError, match="frames of the decoding model's framing, the file declares 5"):
            plain.read(path)


def test_other_rate_and_side_info_are_refused(tmp_path, plain):
    path = _forge(plain, tmp_path, sample_rate=8000)
    with pytest.raises(BitstreamError, match="sample rate 8000 Hz; the decoding model codes 16000 Hz"):
        plain.read(path)
    # LSF side info in a file for a model without LPC: the codec passes lsf_bits=() and refuses it.
    path = _forge(plain, tmp_path, order=1, nibbles=b"\x00", side=bytes(1))
    with pytest.raises(BitstreamError, match="LSF bit widths"):
        plain.read(path)


def test_a_nonzero_width_padding_nibble_is_refused(tmp_path):
    # Before: the unused high nibble after an odd number of LSF widths was ignored.
    base = _make_base(tmp_path, "lpc3", modules=1, frames=1, length=5, lsf_bits=(3, 5, 2), seed=2)
    nibbles = bytearray(base.parts.nibbles)
    nibbles[-1] |= 0x70
    path = _forge(base, tmp_path, nibbles=bytes(nibbles))
    with pytest.raises(BitstreamError, match="padding nibble"):
        base.read(path)
    with pytest.raises(BitstreamError, match="padding nibble"):
        read_cmrl_header(path)


def test_an_unreadable_file_is_the_documented_error(tmp_path, plain, monkeypatch):
    import errno
    import os

    path = tmp_path / "plain.cmrl"

    def failing_read(self):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    with pytest.raises(BitstreamError, match="cannot be read") as info:
        plain.read(path)
    assert str(path) in str(info.value) and isinstance(info.value.__cause__, OSError)


def test_the_codec_refuses_a_forged_length(tmp_path):
    """``SpeechCodec.read`` checks the frame count against its framing and the code length against its model."""
    import torch

    from recipes.codec.codec import SpeechCodec
    from recipes.codec.model import CMRL

    torch.manual_seed(0)
    codec = SpeechCodec(CMRL(1, wide=8, narrow=4, blocks=1, frame_len=64), overlap=8)
    wave = 0.05 * torch.randn(300)
    path = tmp_path / "utt.cmrl"
    codec.write(path, codec.encode(wave))
    back = codec.read(path)
    assert back.num_samples == 300 and back.indices[0].shape == (num_frames(300, 64, 8), 32)

    data = path.read_bytes()[:-4]
    forged = bytearray(data)
    struct.pack_into("<I", forged, 9, 300 + 56 * 3)  # three frames longer than the frames cover
    path.write_bytes(_with_crc(bytes(forged)))
    with pytest.raises(BitstreamError, match="framing"):
        codec.read(path)
    forged = bytearray(data)
    frames = struct.unpack_from("<I", forged, 13)[0]
    struct.pack_into("<I", forged, 13, frames * 2)  # twice the frames of half the codes
    struct.pack_into("<H", forged, 18, 16)
    struct.pack_into("<I", forged, 9, 2 * frames * 56 - 8)  # a length that takes 2 * frames frames
    path.write_bytes(_with_crc(bytes(forged)))
    with pytest.raises(BitstreamError, match="16 codes per frame and module, the decoding model 32"):
        codec.read(path)


if __name__ == "__main__":
    print(format_table(fuzz_cmrl()))
