"""Tests of the ``.cmrl`` bitstream of the CMRL codec (recipes/codec/bitstream.py)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from recipes.codec.bitstream import (
    BitstreamError,
    model_digest,
    quantize_probabilities,
    read_cmrl,
    read_cmrl_header,
    write_cmrl,
)

K = 32  # centroids per quantizer
C = 256  # codes per frame and module
F = 37  # frames: odd, so nothing lines up with word or byte boundaries by accident
M = 2  # modules
RATE = 16000
HOP = 320  # samples per frame (20 ms), only used to make num_samples plausible
LSF_BITS = (6, 6, 5, 5, 5, 4, 4, 3)  # an order-8 LPC quantizer: 38 bits per frame
FIXED_HEADER = 31  # magic 4 + version 1 + rate 4 + samples 4 + frames 4 + M 1 + C 2 + K 2 + order 1 + digest 8


def _skewed_probs(shift: int) -> np.ndarray:
    """A geometric-ish distribution (entropy ~3.1 bits, far below log2(K) = 5 bits), rotated by ``shift``."""
    probs = np.exp(-np.arange(K) / 3.0)
    return np.roll(probs / probs.sum(), shift)


def _codes(probs: list[np.ndarray], frames: int = F, length: int = C, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(K, size=(frames, length), p=p) for p in probs]


def _lsf(frames: int = F, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << np.array(LSF_BITS), size=(frames, len(LSF_BITS)))


@pytest.fixture()
def probs() -> list[np.ndarray]:
    return [_skewed_probs(0), _skewed_probs(11)]


@pytest.mark.parametrize("with_lsf", [False, True], ids=["codes-only", "lpc-side-info"])
def test_round_trip_is_exact_and_sizes_add_up(tmp_path, probs, with_lsf):
    codes = _codes(probs)
    lsf = _lsf() if with_lsf else None
    bits = LSF_BITS if with_lsf else None
    digest = model_digest(probs)
    path = tmp_path / "utt.cmrl"
    written = write_cmrl(path, codes, probs, sample_rate=RATE, num_samples=F * HOP - 17, lsf_idx=lsf, lsf_bits=bits,
                         digest=digest)
    assert written == os.path.getsize(path)
    assert [p.name for p in tmp_path.iterdir()] == ["utt.cmrl"]  # the atomic write left no temp file behind

    stream = read_cmrl(path, probs, digest=digest, lsf_bits=bits)
    assert len(stream.codes) == M
    for decoded, original in zip(stream.codes, codes):
        assert decoded.shape == (F, C) and decoded.dtype == np.int64
        np.testing.assert_array_equal(decoded, original)
    if with_lsf:
        np.testing.assert_array_equal(stream.lsf_idx, lsf)
        assert stream.lsf_bits == LSF_BITS
        # Fixed-width packing: F frames of sum(LSF_BITS) bits, rounded up to whole bytes.
        assert stream.side_info_bits == 8 * math.ceil(F * sum(LSF_BITS) / 8)
    else:
        assert stream.lsf_idx is None and stream.side_info_bits == 0
    assert (stream.sample_rate, stream.num_samples, stream.num_frames) == (RATE, F * HOP - 17, F)

    # The documented overhead: fixed header, one nibble per LSF width, a u32 length per module, the CRC32.
    order = len(LSF_BITS) if with_lsf else 0
    assert stream.overhead_bytes == FIXED_HEADER + math.ceil(order / 2) + 4 * M + 4
    assert 8 * stream.file_bytes == sum(stream.module_bits) + stream.side_info_bits + 8 * stream.overhead_bytes
    assert stream.file_bytes == written
    assert stream.bitrate_bps == pytest.approx(8 * written / ((F * HOP - 17) / RATE))

    header = read_cmrl_header(path)  # no model needed
    assert header["num_modules"] == M and header["code_length"] == C and header["num_centroids"] == K
    assert header["lpc_order"] == order and header["digest"] == digest
    assert header["file_bytes"] == written and header["bitrate_bps"] == pytest.approx(stream.bitrate_bps)


def test_payload_bits_match_the_learned_distribution(tmp_path, probs):
    codes = _codes(probs)
    digest = model_digest(probs)
    path = tmp_path / "utt.cmrl"
    write_cmrl(path, codes, probs, sample_rate=RATE, num_samples=F * HOP, digest=digest)
    stream = read_cmrl(path, probs, digest=digest)
    for m in range(M):
        freqs = quantize_probabilities(probs[m])
        # Ideal code length of these very codes under the model the coder is given (its information content).
        ideal = float(-np.log2(freqs[codes[m]] / 2.0**16).sum())
        # A range coder adds at most a few 32-bit words of termination and ~0.1% for finite precision.
        assert 0.995 * ideal <= stream.module_bits[m] <= 1.01 * ideal + 96
        # ...and it really uses the distribution: fixed-length codes would cost log2(K) = 5 bits per code.
        assert stream.module_bits[m] < 0.7 * F * C * math.log2(K)


def test_improbable_codes_still_round_trip(tmp_path):
    probs = [_skewed_probs(0), _skewed_probs(0)]
    probs[0][7] = 1e-12  # learned as practically impossible...
    probs[1][31] = 0.0  # ...or exactly impossible
    probs = [p / p.sum() for p in probs]
    codes = _codes(probs, frames=5)
    codes[0][2, 3] = 7  # ...but emitted anyway
    codes[0][4, :10] = 7
    codes[1][0, 0] = 31
    assert quantize_probabilities(probs[0])[7] == 1 and quantize_probabilities(probs[1])[31] == 1
    digest = model_digest(probs)
    path = tmp_path / "rare.cmrl"
    write_cmrl(path, codes, probs, sample_rate=RATE, num_samples=5 * HOP, digest=digest)
    stream = read_cmrl(path, probs, digest=digest)
    for decoded, original in zip(stream.codes, codes):
        np.testing.assert_array_equal(decoded, original)


def test_quantize_probabilities_properties():
    # A uniform distribution over 32 symbols is exactly 2**16 / 32 = 2048 each.
    np.testing.assert_array_equal(quantize_probabilities(np.full(32, 1 / 32)), np.full(32, 2048))
    # A certain symbol leaves exactly 1 for the impossible one (every symbol must stay encodable).
    np.testing.assert_array_equal(quantize_probabilities(np.array([1.0, 0.0])), [65535, 1])
    rng = np.random.default_rng(3)
    for _ in range(20):
        probs = rng.dirichlet(np.full(K, 0.3))
        freqs = quantize_probabilities(probs)
        assert freqs.sum() == 1 << 16 and freqs.min() >= 1
        # freq = floor(p (2^16 - K)) + 1 (+1 for the largest remainders), so freq - p 2^16 lies in (-K p, 2 - K p].
        assert (np.abs(freqs - probs * 2**16) <= np.maximum(K * probs, 2.0)).all()
        np.testing.assert_array_equal(freqs, quantize_probabilities(probs.copy()))  # deterministic
        np.testing.assert_array_equal(freqs, quantize_probabilities(probs * 3.0))  # only the ratios matter
    with pytest.raises(ValueError):
        quantize_probabilities(np.array([0.5, -0.1, 0.6]))
    with pytest.raises(ValueError):
        quantize_probabilities(np.zeros(4))


def test_digest_depends_on_the_model_and_extra(probs):
    digest = model_digest(probs)
    assert len(digest) == 8
    assert model_digest([p.copy() for p in probs]) == digest
    assert model_digest(probs, extra=b"centroids") != digest
    assert model_digest(probs[::-1]) != digest
    assert model_digest([_skewed_probs(1), probs[1]]) != digest


def _small_file(tmp_path, probs) -> tuple[os.PathLike, bytes]:
    codes = _codes(probs, frames=3, length=4)
    path = tmp_path / "small.cmrl"
    write_cmrl(path, codes, probs, sample_rate=RATE, num_samples=3 * HOP, lsf_idx=_lsf(frames=3), lsf_bits=LSF_BITS,
               digest=model_digest(probs))
    return path, path.read_bytes()


def test_every_truncation_is_rejected(tmp_path, probs):
    _, data = _small_file(tmp_path, probs)
    digest = model_digest(probs)
    prefix_path = tmp_path / "prefix.cmrl"
    for length in range(len(data)):
        prefix_path.write_bytes(data[:length])
        with pytest.raises(BitstreamError) as info:
            read_cmrl(prefix_path, probs, digest=digest, lsf_bits=LSF_BITS)
        assert str(prefix_path) in str(info.value)
        if length >= 5:  # past the magic and version, a prefix is recognisably a cut CMRL file
            assert "truncated" in str(info.value), (length, str(info.value))
        with pytest.raises(BitstreamError):
            read_cmrl_header(prefix_path)


def test_foreign_files_are_not_cmrl(tmp_path, probs):
    import soundfile as sf

    wav = tmp_path / "speech.wav"
    sf.write(wav, np.zeros(1600, np.float32), RATE)
    with pytest.raises(BitstreamError, match="not a CMRL file.*WAV") as info:
        read_cmrl(wav, probs, digest=model_digest(probs))
    assert str(wav) in str(info.value)
    junk = tmp_path / "junk.cmrl"
    junk.write_bytes(np.random.default_rng(5).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(BitstreamError, match="not a CMRL file"):
        read_cmrl_header(junk)
    with pytest.raises(BitstreamError, match="no such file"):
        read_cmrl_header(tmp_path / "missing.cmrl")


def test_corruption_newer_version_and_wrong_model_are_named(tmp_path, probs):
    path, data = _small_file(tmp_path, probs)
    digest = model_digest(probs)
    bad = tmp_path / "bad.cmrl"

    flipped = bytearray(data)
    flipped[FIXED_HEADER + 4 + 4 + 1] ^= 0x10  # inside module 0's chunk (after the widths and its length)
    bad.write_bytes(bytes(flipped))
    with pytest.raises(BitstreamError, match="CRC"):
        read_cmrl(bad, probs, digest=digest)

    newer = bytearray(data)
    newer[4] = 2  # the version byte
    bad.write_bytes(bytes(newer))
    with pytest.raises(BitstreamError, match="version 2 is newer"):
        read_cmrl(bad, probs, digest=digest)

    other = [_skewed_probs(3), _skewed_probs(4)]
    with pytest.raises(BitstreamError, match="another model/checkpoint") as info:
        read_cmrl(path, other, digest=model_digest(other))
    assert str(path) in str(info.value)
    # Same digest but a model of the wrong shape (a caller bug) is still refused by name.
    with pytest.raises(BitstreamError, match="2 modules, the decoding model 3"):
        read_cmrl(path, probs + [probs[0]], digest=digest)
    with pytest.raises(BitstreamError, match="LSF bit widths"):
        read_cmrl(path, probs, digest=digest, lsf_bits=LSF_BITS[:-1])


def test_write_rejects_bad_input_and_names_the_module(tmp_path, probs):
    digest = model_digest(probs)
    path = tmp_path / "out.cmrl"
    codes = _codes(probs, frames=4)
    codes[1][3, 100] = K  # one past the last centroid
    with pytest.raises(BitstreamError, match=r"module 1: code 32 at frame 3, position 100") as info:
        write_cmrl(path, codes, probs, sample_rate=RATE, num_samples=4 * HOP, digest=digest)
    assert str(path) in str(info.value)
    codes[1][3, 100] = -1
    with pytest.raises(BitstreamError, match="module 1"):
        write_cmrl(path, codes, probs, sample_rate=RATE, num_samples=4 * HOP, digest=digest)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing, not even a temp file, was left

    good = _codes(probs, frames=4)
    with pytest.raises(BitstreamError, match="module 1 have shape"):
        write_cmrl(path, [good[0], good[1][:3]], probs, sample_rate=RATE, num_samples=4 * HOP, digest=digest)
    with pytest.raises(BitstreamError, match="2 distributions"):
        write_cmrl(path, good + [good[0]], probs, sample_rate=RATE, num_samples=4 * HOP, digest=digest)
    with pytest.raises(BitstreamError, match="integer"):
        write_cmrl(path, [g.astype(np.float32) for g in good], probs, sample_rate=RATE, num_samples=4 * HOP,
                   digest=digest)
    with pytest.raises(BitstreamError, match="lsf_idx has shape"):
        write_cmrl(path, good, probs, sample_rate=RATE, num_samples=4 * HOP, lsf_idx=_lsf(frames=5),
                   lsf_bits=LSF_BITS, digest=digest)
    lsf = _lsf(frames=4)
    lsf[0, 7] = 1 << LSF_BITS[7]
    with pytest.raises(BitstreamError, match="LSF dimension 7"):
        write_cmrl(path, good, probs, sample_rate=RATE, num_samples=4 * HOP, lsf_idx=lsf, lsf_bits=LSF_BITS,
                   digest=digest)
    with pytest.raises(BitstreamError, match="together"):
        write_cmrl(path, good, probs, sample_rate=RATE, num_samples=4 * HOP, lsf_idx=_lsf(frames=4), digest=digest)
    with pytest.raises(BitstreamError, match="8 bytes"):
        write_cmrl(path, good, probs, sample_rate=RATE, num_samples=4 * HOP, digest=b"short")


def test_torch_codes_are_accepted(tmp_path, probs):
    torch = pytest.importorskip("torch")
    codes = _codes(probs, frames=6)
    digest = model_digest([torch.tensor(p) for p in probs])
    assert digest == model_digest(probs)  # float64 tensors hold the same numbers
    path = tmp_path / "t.cmrl"
    write_cmrl(path, [torch.from_numpy(c) for c in codes], probs, sample_rate=RATE, num_samples=6 * HOP,
               digest=digest)
    for decoded, original in zip(read_cmrl(path, probs, digest=digest).codes, codes):
        np.testing.assert_array_equal(decoded, original)
