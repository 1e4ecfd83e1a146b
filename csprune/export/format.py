"""The csprune sparse checkpoint: a safetensors file whose metadata says how to rebuild dense tensors.

File layout (a valid safetensors file; csprune writes the container itself so that it controls every byte)::

    8 bytes      little-endian u64 N: header length
    N bytes      JSON header, padded with spaces so the data starts 8-byte aligned:
                   {"__metadata__": {"csprune": "<JSON string, below>"},
                    "<tensor entry>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
    data         the tensors' bytes, contiguous, ordered by item size (8, 4, 2, 1 bytes) so each is aligned

Each model tensor ``NAME`` is stored with one of four encodings:

    ``dense``      under ``NAME`` itself, as is (after the optional ``values_dtype`` cast)
    ``sparse``     ``NAME::values`` (the non-zeros in row-major order, 1-D) + ``NAME::mask`` (uint8, a coded mask,
                   see ``csprune.export.coding``)
    ``q8``         ``NAME::values`` (int8, every entry) + ``NAME::scale`` (float32, one per row)
    ``sparse_q8``  ``NAME::values`` (int8, non-zeros) + ``NAME::mask`` + ``NAME::scale``

whichever is smaller for that tensor, header entries included. ``-0.0`` counts as a zero for the mask; if a sparse
tensor has any, ``NAME::zsign`` (a coded mask over its zero positions, ``negative_zeros`` = [count, coding, param])
restores their sign, so the round trip is bit-exact (it costs ~1 bit per zero when signs are random: pruners
should write +0.0). NaN payloads are kept bit for bit. int8 is symmetric per row (row = first
dimension): ``scale = max|w_row| / 127``, ``q = round(w / scale)``, decoded ``q * scale`` cast back to the source
dtype; a row of zeros has scale 0. Only tensors with two or more dimensions are quantized; 0-d and 1-d ones
(biases, norms) keep their own dtype.

The ``csprune`` metadata value is compact JSON::

    {"format": "csprune.sparse", "version": 1, "producer": "csprune 0.1.0",
     "fields": ["encoding", "dtype", "shape", "nnz", "coding", "param", "sha256", "quant_error"],
     "tensors": {"NAME": ["sparse", "F32", [256, 144], 3686, "rice", 3, "<sha256>"], ...},
     "meta": {...user metadata...},
     "header_sha256": "<sha256>"}

``tensors`` entries are positional lists in the order of ``fields`` (keys would double the header size of a
model with hundreds of small tensors); ``dtype`` is the decoded dtype, ``coding``/``param`` the mask coding
("" and 0 when there is no mask), ``quant_error`` (int8 only) ``[max_abs, snr_db]`` measured at save time
(``snr_db`` null when the error is zero). Digests are SHA-256 in unpadded URL-safe base64 (43 characters):
``sha256`` of the decoded tensor (its dtype and shape as ASCII, e.g. ``F32[24,40]``, then its bytes in C order,
little-endian), and ``header_sha256`` of the first 8 + N file
bytes with the digest's own 43 characters replaced by ``"0" * 43``. Together they make every flipped byte
detectable: header bytes by the header digest, value bytes by the tensor digests, mask bytes by the decoder's
consistency checks and the tensor digests, scale bytes of empty rows by the "scale is 0 exactly for empty
rows" rule.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from . import coding as mask_coding

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "save_sparse",
    "load_sparse",
    "read_sparse_meta",
    "read_sparse_header",
    "SparseHeader",
]

FORMAT_NAME = "csprune.sparse"
FORMAT_VERSION = 1
METADATA_KEY = "csprune"
FIELDS = ("encoding", "dtype", "shape", "nnz", "coding", "param", "sha256", "quant_error", "negative_zeros")
ENCODINGS = ("dense", "sparse", "q8", "sparse_q8")
VALUES_DTYPES = ("float32", "float16", "bfloat16", "int8")
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_DIGEST_CHARS = 43  # unpadded base64 of 32 bytes
_DIGEST_PLACEHOLDER = "0" * _DIGEST_CHARS
_ENTRY_OVERHEAD = 60  # approx. header bytes of one safetensors entry besides its name, for the dense/sparse choice

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _ST_DTYPES.items()}
_ITEMSIZES = {name: torch.empty(0, dtype=dtype).element_size() for dtype, name in _ST_DTYPES.items()}
# Same-size integer views: zero tests and scatters run on the raw bits, so -0.0 and NaN payloads survive.
_INT_VIEWS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _producer_version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # a stale editable install can turn `csprune` into a namespace package
        from importlib import metadata

        try:
            return metadata.version("csprune")
        except metadata.PackageNotFoundError:
            return "unknown"


def _digest(data: Any) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def _tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a decoded tensor: its dtype and shape (e.g. ``F32[24,40]``, ASCII), then its bytes."""
    hasher = hashlib.sha256(f"{_ST_DTYPES[tensor.dtype]}{list(tensor.shape)}".replace(" ", "").encode("ascii"))
    hasher.update(_tensor_bytes(tensor))
    return base64.urlsafe_b64encode(hasher.digest()).rstrip(b"=").decode("ascii")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, without copying when it is already contiguous."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _int_view(tensor: torch.Tensor) -> np.ndarray:
    """Flat numpy integer view (same item size) of a CPU tensor's bits."""
    flat = tensor.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).numpy().view(_INT_VIEWS[tensor.element_size()])


# --------------------------------------------------------------------------------------------- saving


@dataclass
class _Part:
    """One safetensors entry: a name, its dtype string, shape and bytes."""

    name: str
    dtype: str
    shape: list[int]
    data: np.ndarray  # any dtype; written as raw bytes

    @property
    def itemsize(self) -> int:
        return _ITEMSIZES[self.dtype]


def _state_dict_of(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        from torch.nn.utils import parametrize

        for module_name, module in model_or_state_dict.named_modules():
            if parametrize.is_parametrized(module):
                raise ValueError(
                    f"module {module_name or '<root>'!r} still has parametrizations (pruning masks?): finalize the "
                    "model first (pruner.finalize() or torch.nn.utils.parametrize.remove_parametrizations)"
                )
            for hook in module._forward_pre_hooks.values():
                if type(hook).__module__ == "torch.nn.utils.prune":
                    raise ValueError(
                        f"module {module_name or '<root>'!r} still carries a torch.nn.utils.prune mask: call "
                        "torch.nn.utils.prune.remove(module, name) first"
                    )
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise TypeError(f"expected an nn.Module or a state_dict, got {type(model_or_state_dict).__name__}")
    out = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"state_dict keys must be non-empty strings, got {name!r}")
        if "::" in name:
            raise ValueError(f"tensor name {name!r} contains '::', which the format reserves for its parts")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided:
            raise TypeError(f"state_dict[{name!r}] has layout {tensor.layout}; densify it first")
        if tensor.dtype not in _ST_DTYPES:
            raise TypeError(f"state_dict[{name!r}] has unsupported dtype {tensor.dtype}")
        out[name] = tensor.detach().to("cpu")
    return out


def _quantize_rows(tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization.

    Args:
        tensor: Floating tensor of shape ``(rows, ...)``.
        name: For error messages.

    Returns:
        ``(q, scale, decoded)``: int8 of shape ``(rows, cols)``, float32 of shape ``(rows,)``, and the
        dequantized tensor in ``tensor``'s shape and dtype (exactly what ``load_sparse`` will return).
    """
    rows = tensor.reshape(tensor.shape[0], -1).to(torch.float32)
    if not torch.isfinite(rows).all():
        raise ValueError(f"tensor {name!r} has NaN/Inf values, which int8 cannot represent")
    scale = rows.abs().amax(dim=1) / 127.0
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe_scale[:, None]).clamp_(-127, 127).to(torch.int8)
    scale = torch.where(q.ne(0).any(dim=1), scale, torch.zeros_like(scale))  # empty rows: scale exactly 0
    return q, scale, _dequantize(q, scale, tensor.dtype).reshape(tensor.shape)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` per row, computed in float32 then cast to ``dtype``: one rounding, same on save and load."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def _quant_error(original: torch.Tensor, decoded: torch.Tensor) -> list[float | None]:
    error = decoded.to(torch.float64) - original.to(torch.float64)
    noise = float(error.square().sum())
    signal = float(original.to(torch.float64).square().sum())
    snr_db = None if noise == 0.0 else (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    if snr_db is not None and not math.isfinite(snr_db):
        snr_db = None
    return [float(f"{float(error.abs().max()) if error.numel() else 0.0:.6g}"), None if snr_db is None else round(snr_db, 3)]


def _encode_tensor(
    name: str, tensor: torch.Tensor, values_dtype: str | None, coding_policy: str
) -> tuple[list[Any], list[_Part]]:
    """Choose the encoding of one tensor and build its metadata entry and stored parts."""
    if values_dtype in ("float32", "float16", "bfloat16") and tensor.is_floating_point():
        tensor = tensor.to(getattr(torch, values_dtype))
    shape = list(tensor.shape)
    numel = tensor.numel()
    dtype_name = _ST_DTYPES[tensor.dtype]
    overhead = len(name) + _ENTRY_OVERHEAD

    if values_dtype == "int8" and tensor.is_floating_point() and tensor.dim() >= 2 and numel > 0:
        q, scale, decoded = _quantize_rows(tensor, name)
        q_flat = q.reshape(-1).numpy()
        mask = q_flat != 0
        nnz = int(np.count_nonzero(mask))
        entry_tail = [_tensor_digest(decoded), _quant_error(tensor, decoded)]
        scale_part = _Part(f"{name}::scale", "F32", [len(scale)], scale.numpy())
        dense_cost = numel
        if nnz < numel:
            coding, data, param = mask_coding.choose_mask_coding(mask, coding_policy)
            if nnz + data.size + overhead + 8 < dense_cost:
                entry = ["sparse_q8", dtype_name, shape, nnz, coding, param, *entry_tail]
                return entry, [
                    _Part(f"{name}::values", "I8", [nnz], q_flat[mask]),
                    _Part(f"{name}::mask", "U8", [data.size], data),
                    scale_part,
                ]
        entry = ["q8", dtype_name, shape, numel, "", 0, *entry_tail]
        return entry, [_Part(f"{name}::values", "I8", [numel], q_flat), scale_part]

    bits = _int_view(tensor)
    digest = _tensor_digest(tensor)
    mask = bits != 0
    negative_zeros = None
    if tensor.is_floating_point():
        # -0.0 (sign bit only) is a zero for the mask; its sign is kept in a second coded mask over the zeros,
        # so the round trip stays bit-exact. Pruning by `w * mask` makes -0.0 for every negative pruned weight.
        is_negative_zero = bits == np.iinfo(bits.dtype).min
        if is_negative_zero.any():
            mask &= ~is_negative_zero
            negative_zeros = is_negative_zero[~mask]
    nnz = int(np.count_nonzero(mask))
    itemsize = tensor.element_size()
    # Sparse needs a mask of at least the entropy bound and a second header entry; skip coding hopeless cases.
    if nnz < numel and nnz * itemsize + mask_coding.entropy_bound_bytes(numel, nnz) + overhead < numel * itemsize:
        coding, data, param = mask_coding.choose_mask_coding(mask, coding_policy)
        parts = [
            _Part(f"{name}::values", dtype_name, [nnz], bits[mask]),
            _Part(f"{name}::mask", "U8", [data.size], data),
        ]
        extra: list[Any] = []
        if negative_zeros is not None:
            sign_coding, sign_data, sign_param = mask_coding.choose_mask_coding(negative_zeros, coding_policy)
            parts.append(_Part(f"{name}::zsign", "U8", [sign_data.size], sign_data))
            extra = [None, [int(np.count_nonzero(negative_zeros)), sign_coding, sign_param]]
        if sum(part.data.nbytes for part in parts) + len(parts) * overhead / 2 + 8 < numel * itemsize:
            return ["sparse", dtype_name, shape, nnz, coding, param, digest, *extra], parts
    return ["dense", dtype_name, shape, nnz, "", 0, digest], [_Part(name, dtype_name, shape, bits)]


def save_sparse(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    values_dtype: str | None = None,
    meta: Mapping[str, Any] | None = None,
    *,
    mask_coding_policy: str = "auto",
) -> dict[str, Any]:
    """Write a model's weights as a csprune sparse checkpoint (a safetensors file).

    The write is atomic: a temporary file in the same directory is fsynced and renamed over ``path``.

    Args:
        model_or_state_dict: A finalized ``nn.Module`` (no parametrizations or ``torch.nn.utils.prune`` hooks
            left) or a ``state_dict`` (name -> tensor; tensors are saved as they are).
        path: Output file.
        values_dtype: ``None`` (default: every tensor keeps its dtype, so the round trip is bit-exact),
            ``"float32"``/``"float16"``/``"bfloat16"`` (floating tensors are cast first; lossless from then on),
            or ``"int8"`` (floating tensors with 2+ dims quantized symmetrically per row; others kept as is).
        meta: Optional JSON-serializable dict (model config, vocabulary, normalization stats...), returned
            by ``read_sparse_meta``.
        mask_coding_policy: ``"auto"`` (default: the fastest-decoding mask coding within 1.5% of the smallest),
            ``"smallest"``, or one of ``"bits"``, ``"rice"``, ``"ans"`` to force it (tests, benchmarks).

    Returns:
        The decoded metadata that was written (as ``read_sparse_header(path).metadata``).

    Raises:
        ValueError: Bad ``values_dtype``/``meta``/policy, a model that is not finalized, NaN/Inf under int8.
        TypeError: A state_dict value that is not a plain strided CPU-able tensor of a supported dtype.
    """
    if values_dtype is not None and values_dtype not in VALUES_DTYPES:
        raise ValueError(f"values_dtype must be None or one of {VALUES_DTYPES}, got {values_dtype!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        meta_json = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"meta is not JSON-serializable: {exc}") from exc

    state = _state_dict_of(model_or_state_dict)
    entries: dict[str, list[Any]] = {}
    parts: list[_Part] = []
    for name, tensor in state.items():
        entry, tensor_parts = _encode_tensor(name, tensor, values_dtype, mask_coding_policy)
        entries[name] = entry
        parts.extend(tensor_parts)

    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "producer": f"csprune {_producer_version()}",
        "fields": list(FIELDS),
        "tensors": entries,
        "meta": meta_json,
        "header_sha256": _DIGEST_PLACEHOLDER,
    }
    _write_safetensors(Path(path), parts, json.dumps(metadata, separators=(",", ":"), allow_nan=False))
    metadata["header_sha256"] = read_sparse_header(path).metadata["header_sha256"]
    return metadata


def _write_safetensors(path: Path, parts: list[_Part], metadata_json: str) -> None:
    parts = sorted(parts, key=lambda part: -part.itemsize)  # stable: alignment without padding between tensors
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: metadata_json}}
    offset = 0
    for part in parts:
        size = part.data.nbytes
        header[part.name] = {"dtype": part.dtype, "shape": part.shape, "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-(8 + len(header_bytes)) % 8)
    prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
    placeholder = _placeholder_field(_DIGEST_PLACEHOLDER)
    if prefix.count(placeholder) != 1:
        raise AssertionError("header digest placeholder not unique")
    prefix = prefix.replace(placeholder, _placeholder_field(_digest(prefix)))

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(prefix)
            for part in parts:
                out.write(memoryview(np.ascontiguousarray(part.data)).cast("B"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _placeholder_field(digest: str) -> bytes:
    # The metadata JSON is itself a JSON string inside the header, so its quotes appear escaped.
    return b'\\"header_sha256\\":\\"' + digest.encode("ascii") + b'\\"'


# -------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SparseHeader:
    """A validated header of a csprune sparse checkpoint.

    Attributes:
        path: The file.
        metadata: The decoded ``csprune`` metadata (format, version, producer, tensors, meta, header_sha256).
        entries: safetensors entry name -> (dtype, shape, begin, end), offsets relative to the data start.
        data_start: File offset of the first data byte (8 + N).
        file_size: Size of the file in bytes.
    """

    path: str
    metadata: dict[str, Any]
    entries: dict[str, _Entry]
    data_start: int
    file_size: int

    def tensor(self, name: str) -> dict[str, Any]:
        """The metadata entry of one model tensor as a dict keyed by ``FIELDS``."""
        row = self.metadata["tensors"][name]
        return dict(zip(FIELDS, row))


def _fail(path: Any, message: str, tensor: str | None = None) -> CheckpointError:
    return CheckpointError(path, message, tensor)


def _parse_header(path: str, prefix: bytes, file_size: int) -> SparseHeader:
    """Validate the 8 + N header bytes of a file of ``file_size`` bytes (everything but the data)."""
    if file_size < 8 or len(prefix) < 8:
        raise _fail(path, f"file is truncated ({file_size} bytes): no safetensors header")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise _fail(path, f"header claims {header_len} bytes but the file has {file_size} (truncated or corrupt)")
    if len(prefix) < 8 + header_len:
        raise _fail(path, "file is truncated inside the header")
    try:
        header = json.loads(prefix[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    file_meta = header.pop("__metadata__", None)
    if not isinstance(file_meta, dict) or not isinstance(file_meta.get(METADATA_KEY), str):
        raise _fail(path, f"not a csprune sparse checkpoint (no {METADATA_KEY!r} metadata)")
    try:
        metadata = json.loads(file_meta[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise _fail(path, f"csprune metadata is not valid JSON ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise _fail(path, f"not a csprune sparse checkpoint (format {metadata.get('format') if isinstance(metadata, dict) else None!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise _fail(path, f"unsupported format version {metadata.get('version')!r} (this csprune reads version {FORMAT_VERSION})")

    digest = metadata.get("header_sha256")
    if not isinstance(digest, str) or len(digest) != _DIGEST_CHARS:
        raise _fail(path, "header digest missing or malformed")
    raw = prefix[: 8 + header_len]
    field = _placeholder_field(digest)
    if raw.count(field) != 1 or _digest(raw.replace(field, _placeholder_field(_DIGEST_PLACEHOLDER))) != digest:
        raise _fail(path, "header checksum mismatch: the header is corrupt or was edited")

    data_size = file_size - 8 - header_len
    entries: dict[str, _Entry] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            valid = (
                dtype in _TORCH_DTYPES
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int
                and type(end) is int
            )
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise _fail(path, "malformed safetensors entry", name)
        if end - begin != math.prod(shape) * _ITEMSIZES[dtype]:
            raise _fail(path, f"header says {end - begin} bytes for shape {shape} of {dtype}", name)
        entries[name] = _Entry(dtype, tuple(shape), begin, end)
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            raise _fail(path, f"data offsets are not contiguous at byte {entry.begin}", name)
        position = entry.end
    if position != data_size:
        raise _fail(path, f"header describes {position} data bytes but the file holds {data_size} (truncated?)")
    result = SparseHeader(path, metadata, entries, 8 + header_len, file_size)
    _check_tensor_table(result)
    return result


def _check_tensor_table(header: SparseHeader) -> None:
    """Check that the metadata's tensor table and the safetensors entries describe the same parts."""
    path, tensors = header.path, header.metadata.get("tensors")
    if not isinstance(tensors, dict):
        raise _fail(path, "metadata has no tensor table")
    expected_parts: set[str] = set()
    for name, row in tensors.items():
        if not isinstance(row, list) or len(row) < 7:
            raise _fail(path, "malformed tensor metadata", name)
        encoding, dtype, shape, nnz, coding, param = row[:6]
        if (
            encoding not in ENCODINGS
            or dtype not in _TORCH_DTYPES
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or type(nnz) is not int
            or type(param) is not int
            or not isinstance(row[6], str)
        ):
            raise _fail(path, "malformed tensor metadata", name)
        numel = math.prod(shape)
        if not 0 <= nnz <= numel:
            raise _fail(path, f"metadata says {nnz} non-zeros in {numel} entries", name)
        masked = encoding in ("sparse", "sparse_q8")
        if masked != (coding in mask_coding.CODINGS) or (not masked and coding != ""):
            raise _fail(path, f"mask coding {coding!r} does not fit encoding {encoding!r}", name)
        quantized = encoding in ("q8", "sparse_q8")
        if quantized and (len(shape) < 2 or not _TORCH_DTYPES[dtype].is_floating_point):
            raise _fail(path, f"int8 encoding of a {len(shape)}-d {dtype} tensor", name)
        stored = nnz if masked else numel
        wanted = {name: (dtype, tuple(shape))} if encoding == "dense" else {
            f"{name}::values": ("I8" if quantized else dtype, (stored,))
        }
        if quantized:
            wanted[f"{name}::scale"] = ("F32", (shape[0],))
        for part, (part_dtype, part_shape) in wanted.items():
            entry = header.entries.get(part)
            if entry is None:
                raise _fail(path, f"part {part!r} is missing from the file", name)
            if (entry.dtype, entry.shape) != (part_dtype, part_shape):
                raise _fail(
                    path, f"part {part!r} is {entry.dtype}{list(entry.shape)}, expected {part_dtype}{list(part_shape)}", name
                )
            expected_parts.add(part)
        if masked:
            entry = header.entries.get(f"{name}::mask")
            if entry is None or entry.dtype != "U8" or len(entry.shape) != 1:
                raise _fail(path, "mask part missing or not 1-d uint8", name)
            expected_parts.add(f"{name}::mask")
        signs = row[8] if len(row) > 8 else None
        if signs is not None:
            entry = header.entries.get(f"{name}::zsign")
            if (
                encoding != "sparse"
                or not isinstance(signs, list)
                or len(signs) != 3
                or type(signs[0]) is not int
                or not 0 < signs[0] <= numel - nnz
                or signs[1] not in mask_coding.CODINGS
                or type(signs[2]) is not int
                or entry is None
                or entry.dtype != "U8"
                or len(entry.shape) != 1
            ):
                raise _fail(path, "malformed negative-zero signs", name)
            expected_parts.add(f"{name}::zsign")
    unexpected = sorted(set(header.entries) - expected_parts)
    if unexpected:
        raise _fail(path, f"file holds parts no tensor refers to: {unexpected[:5]}")


def read_sparse_header(path: str | os.PathLike) -> SparseHeader:
    """Read and validate only the header of a sparse checkpoint (no tensor data is read).

    Raises:
        CheckpointError: Unreadable, truncated, forged or unknown-version header.
    """
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) == 8:
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len <= _MAX_HEADER_BYTES:
                    prefix += handle.read(header_len)
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc.strerror or exc})") from None
    return _parse_header(str(path), prefix, file_size)


def read_sparse_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The user ``meta`` dict stored by ``save_sparse`` (model config, vocabulary...), header verified.

    Raises:
        CheckpointError: As ``read_sparse_header``.
    """
    meta = read_sparse_header(path).metadata.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail(path, "user meta is not a JSON object")
    return meta


def _decode_tensor(header: SparseHeader, buffer: bytearray, name: str) -> torch.Tensor:
    info = header.tensor(name)
    encoding, dtype = info["encoding"], _TORCH_DTYPES[info["dtype"]]
    shape, nnz = tuple(info["shape"]), info["nnz"]
    numel = math.prod(shape)
    start = header.data_start

    def part_array(part: str, np_dtype: Any) -> np.ndarray:
        entry = header.entries[part]
        count = (entry.end - entry.begin) // np.dtype(np_dtype).itemsize
        return np.frombuffer(buffer, dtype=np_dtype, count=count, offset=start + entry.begin)

    if encoding == "dense":
        entry = header.entries[name]
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        # A view of the private read buffer: no copy (the buffer lives as long as any tensor uses it).
        return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=start + entry.begin).view(shape)

    int_view = _INT_VIEWS[_ITEMSIZES[info["dtype"]]]
    if encoding in ("sparse", "sparse_q8"):
        try:
            positions = mask_coding.decode_mask(
                part_array(f"{name}::mask", np.uint8), info["coding"], info["param"], numel, nnz
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # constriction raises pyo3 PanicException (a BaseException) on some garbage
            raise _fail(header.path, f"mask does not decode: {exc}", name) from None
    else:
        positions = None

    if encoding == "sparse":
        dense = np.zeros(numel, dtype=int_view)
        dense[positions] = part_array(f"{name}::values", int_view)
        signs = info.get("negative_zeros")
        if signs is not None:
            count, sign_coding, sign_param = signs
            try:
                negative = mask_coding.decode_mask(
                    part_array(f"{name}::zsign", np.uint8), sign_coding, sign_param, numel - nnz, count
                )
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                raise _fail(header.path, f"negative-zero signs do not decode: {exc}", name) from None
            zero_positions = np.ones(numel, dtype=np.bool_)
            zero_positions[positions] = False
            dense[np.flatnonzero(zero_positions)[negative]] = np.iinfo(int_view).min
        return torch.from_numpy(dense).view(dtype).view(shape)

    stored_q = part_array(f"{name}::values", np.int8)
    if positions is not None:
        q = np.zeros(numel, dtype=np.int8)
        q[positions] = stored_q
    else:
        q = stored_q
    q_rows = torch.from_numpy(q).view(shape[0], -1)
    scale = torch.from_numpy(part_array(f"{name}::scale", np.float32).copy())
    nonempty_rows = q_rows.ne(0).any(dim=1)
    if not torch.isfinite(scale).all() or not torch.equal(scale.gt(0), nonempty_rows) or scale.lt(0).any():
        raise _fail(header.path, "int8 scales are corrupt (must be > 0 exactly for non-empty rows)", name)
    return _dequantize(q_rows, scale, dtype).view(shape)


def load_sparse(
    path: str | os.PathLike, model: torch.nn.Module | None = None, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Load a csprune sparse checkpoint as a dense state_dict; never unpickles anything.

    Args:
        path: The file written by ``save_sparse``.
        model: If given, the state_dict is loaded into it strictly (same keys and shapes; floating tensors
            may be cast to the model's floating dtype).
        verify: Check each decoded tensor's SHA-256 (default). The header digest and all structural checks
            always run; turn this off only for files you produced yourself and trust.

    Returns:
        Name -> dense tensor (CPU), in the order they were saved. Dense-stored tensors are views of one private
        read buffer; sparse ones own their memory.

    Raises:
        CheckpointError: Truncation, corruption, unknown version, inconsistent header, checksum mismatch, or
            (with ``model``) missing/unexpected keys and shape/dtype mismatches. The message names the file
            and the tensor.
    """
    try:
        with open(path, "rb") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            buffer = bytearray(file_size)
            got = handle.readinto(buffer)
    except OSError as exc:
        raise _fail(path, f"cannot read file ({exc.strerror or exc})") from None
    if got != file_size:
        raise _fail(path, f"short read: {got} of {file_size} bytes")
    header_len = struct.unpack("<Q", bytes(buffer[:8]))[0] if file_size >= 8 else 0
    header = _parse_header(str(path), bytes(buffer[: 8 + min(header_len, _MAX_HEADER_BYTES)]), file_size)

    state: dict[str, torch.Tensor] = {}
    for name in header.metadata["tensors"]:
        try:
            tensor = _decode_tensor(header, buffer, name)
        except CheckpointError:
            raise
        except Exception as exc:  # anything unforeseen in decoding still names the file and tensor
            raise _fail(header.path, f"cannot decode ({type(exc).__name__}: {exc})", name) from None
        if verify and _tensor_digest(tensor) != header.tensor(name)["sha256"]:
            raise _fail(header.path, "SHA-256 mismatch: the stored data is corrupt", name)
        state[name] = tensor
    if model is not None:
        _load_into(header.path, model, state)
    return state


def _load_into(path: str, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise _fail(path, f"does not match the model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    for name, tensor in state.items():
        target = own[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise _fail(path, f"shape {list(tensor.shape)} does not match the model's {list(target.shape)}", name)
        if target.dtype != tensor.dtype and not (target.is_floating_point() and tensor.is_floating_point()):
            raise _fail(path, f"dtype {tensor.dtype} does not match the model's {target.dtype}", name)
    model.load_state_dict(state, strict=True)
