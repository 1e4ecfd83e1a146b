"""The csprune sparse checkpoint: a safetensors file whose metadata says how to rebuild dense tensors.

File layout (a valid safetensors file; csprune writes the container itself so that it controls every byte)::

    8 bytes      little-endian u64 N: header length
    N bytes      JSON header, padded with spaces so the data starts 8-byte aligned:
                   {"__metadata__": {"csprune": "<JSON string, below>"},
                    "<entry>": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...}
    data         the entries' bytes, contiguous, ordered by item size (8, 4, 2, 1 bytes) so each is aligned

A model with hundreds of small tensors would spend more on per-entry header text (names, offsets, digests) than the
3% the format allows above the entropy bound, so the stored bytes of all tensors share a few entries:

    ``::values.<DT>``  one per stored dtype (F32, BF16, I8, I64...): every tensor's stored values of that dtype,
                       concatenated in table order (a dense tensor: all its entries; a sparse one: its non-zeros
                       in row-major order; int8: the quantized entries)
    ``::mask``         U8: every coded mask (see ``csprune.export.coding``) and negative-zero sign mask, in table order
    ``::scale``        F32: int8 row scales (one per row, row = first dimension), in table order
    ``::sha256``       U8 [T, 32]: one SHA-256 per model tensor, in table order (below)
    ``NAME``           a dense tensor of at least ``OWN_ENTRY_MIN_BYTES`` keeps an entry under its own name, so plain
                       safetensors readers see big unpruned weights as they are

Offsets inside the shared entries are not stored: they are the running sums of the per-tensor sizes the table
implies, and the reader checks that they add up to each entry's size exactly.

Each model tensor ``NAME`` has one of four encodings, whichever is smaller for it:

    ``dense``      all entries as is (after the optional ``values_dtype`` cast)
    ``sparse``     the non-zeros + a coded mask
    ``q8``         int8, every entry, + one float32 scale per row
    ``sparse_q8``  int8 non-zeros + a coded mask + scales

``-0.0`` counts as a zero for the mask; if a sparse tensor has any, a second coded mask over its zero positions
(``negative_zeros`` = [count, coding, param, bytes]) restores their sign, so the round trip is bit-exact (it costs
~1 bit per zero when signs are random: pruners should write +0.0). NaN payloads are kept bit for bit. int8 is
symmetric per row: ``scale = max|w_row| / 127``, ``q = round(w / scale)``, decoded ``q * scale`` computed in float32
and cast back to the source dtype; a row of zeros has scale 0. Only floating tensors with two or more dimensions
are quantized.

The ``csprune`` metadata value is compact JSON::

    {"format": "csprune.sparse", "version": 2, "producer": "csprune 0.1.0", "dtype": "F32",
     "fields": ["shape", "encoding", "nnz", "coding", "param", "mask_bytes", "dtype", "negative_zeros", "quant_error"],
     "tensors": [["encoder.layers.0.ffn.", {"weight": [[256,144],"sparse",3686,"rice",3,812], "bias": [[256]]}],
                 ...],
     "meta": {...user metadata...}, "decoded_sha256": "<digest>", "header_sha256": "<digest>"}

``tensors`` is the table, in state_dict order, grouped by name prefix (up to and including the last ``.``) so the
long module paths of a deep model are written once: a group ``[prefix, {suffix: row, ...}]`` holds the names
``prefix + suffix`` (consecutive names only, so the order is kept). A row is a positional list in the order of
``fields`` with trailing defaults left out: ``encoding`` defaults to ``dense``, ``nnz`` (non-zeros; informative for
dense tensors) to all entries, ``coding``/``param``/``mask_bytes`` to no mask (``mask_bytes``: its length inside
``::mask``), ``dtype`` (of the decoded tensor) to the file's ``dtype``, ``negative_zeros``/``quant_error`` to null.
``quant_error`` (int8 only) is ``[max_abs, snr_db]`` measured at save time (``snr_db`` null when the error is 0).

Digests. ``header_sha256`` (unpadded URL-safe base64, 43 characters): SHA-256 of the first 8 + N file bytes with
its own 43 characters replaced by ``"0" * 43``. Row ``i`` of ``::sha256``: SHA-256 of tensor ``i``'s name and
expanded row (``json.dumps([name, shape, dtype, encoding, nnz, coding, param, mask_bytes, negative_zeros])``
compact, UTF-8, then a NUL byte) followed by its stored bytes (mask, sign mask, values, scales). Decoding is a
deterministic function of the row and the stored bytes, and every decoder validates all lengths and counts, so a
tensor whose digest matches decodes to exactly the numbers that were saved: ``load_sparse`` checks these stored-byte
digests (cheap: compressed bytes, in a second thread while it decodes). ``decoded_sha256``: SHA-256 over all decoded
tensors in table order, each as its dtype and shape in ASCII (e.g. ``F32[24,40]``) then its bytes in C order,
little-endian -- an end-to-end check of the decoders themselves, run by ``load_sparse(verify="full")``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import CheckpointError, ConfigError
from . import coding as mask_coding

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "save_sparse",
    "load_sparse",
    "load_sparse_parts",
    "SparseParts",
    "read_sparse_meta",
    "read_sparse_header",
    "SparseHeader",
]

FORMAT_NAME = "csprune.sparse"
FORMAT_VERSION = 2
METADATA_KEY = "csprune"
# Positional row fields; dtype comes late so that rows of the file's most common dtype can leave it out.
FIELDS = ("shape", "encoding", "nnz", "coding", "param", "mask_bytes", "dtype", "negative_zeros", "quant_error")
_ROW_ORDER = ("shape", "dtype", "encoding", "nnz", "coding", "param", "mask_bytes", "negative_zeros")  # expanded rows
ENCODINGS = ("dense", "sparse", "q8", "sparse_q8")
VALUES_DTYPES = ("float32", "float16", "bfloat16", "int8")
VERIFY_MODES = (False, True, "full")
# A dense tensor this large keeps its own safetensors entry: its ~100 header bytes are then < 0.2% of its data.
OWN_ENTRY_MIN_BYTES = 1 << 16
MASK_ENTRY, SCALE_ENTRY, DIGEST_ENTRY, VALUES_PREFIX = "::mask", "::scale", "::sha256", "::values."
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_DIGEST_CHARS = 43  # unpadded base64 of 32 bytes
_DIGEST_PLACEHOLDER = "0" * _DIGEST_CHARS
_SPARSE_ROW_BYTES = 40  # approx. header bytes a sparse row costs more than a dense one, for the dense/sparse choice

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


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _digest(data: Any) -> str:
    return _b64(hashlib.sha256(data).digest())


def _update_decoded(hasher: Any, tensor: torch.Tensor) -> None:
    """Feed a decoded tensor to ``hasher``: its dtype and shape (e.g. ``F32[24,40]``, ASCII), then its bytes."""
    hasher.update(f"{_ST_DTYPES[tensor.dtype]}{list(tensor.shape)}".replace(" ", "").encode("ascii"))
    hasher.update(_tensor_bytes(tensor))


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


def _row_prefix(name: str, row: tuple) -> bytes:
    """What a tensor's stored-byte digest starts with: its name and expanded row (everything decoding depends on)."""
    return json.dumps([name, *row], separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\0"


# --------------------------------------------------------------------------------------------- saving




def _state_dict_of(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        from torch.nn.utils import parametrize

        for module_name, module in model_or_state_dict.named_modules():
            if parametrize.is_parametrized(module):
                raise ConfigError(
                    f"module {module_name or '<root>'!r} still has parametrizations (pruning masks?): finalize the "
                    "model first (pruner.finalize() or torch.nn.utils.parametrize.remove_parametrizations)"
                )
            for hook in module._forward_pre_hooks.values():
                if type(hook).__module__ == "torch.nn.utils.prune":
                    raise ConfigError(
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
            raise ConfigError(f"tensor name {name!r} contains '::', which the format reserves for its parts")
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
        raise ConfigError(f"tensor {name!r} has NaN/Inf values, which int8 cannot represent")
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



@dataclass
class _Encoded:
    """One model tensor as stored: its expanded row and its stored byte arrays."""

    row: tuple  # (shape, dtype, encoding, nnz, coding, param, mask_bytes, negative_zeros)
    values: np.ndarray  # any dtype; written as raw bytes
    values_dtype: str
    mask: np.ndarray | None = None
    zsign: np.ndarray | None = None
    scale: np.ndarray | None = None
    quant_error: list[float | None] | None = None
    decoded: torch.Tensor | None = None  # what load_sparse returns (int8: the dequantized tensor)


def _encode_tensor(name: str, tensor: torch.Tensor, values_dtype: str | None, coding_policy: str) -> _Encoded:
    """Choose the encoding of one tensor."""
    if values_dtype in ("float32", "float16", "bfloat16") and tensor.is_floating_point():
        tensor = tensor.to(getattr(torch, values_dtype))
    shape = list(tensor.shape)
    numel = tensor.numel()
    dtype_name = _ST_DTYPES[tensor.dtype]

    if values_dtype == "int8" and tensor.is_floating_point() and tensor.dim() >= 2 and numel > 0:
        q, scale, decoded = _quantize_rows(tensor, name)
        q_flat = q.reshape(-1).numpy()
        mask = q_flat != 0
        nnz = int(np.count_nonzero(mask))
        common = dict(scale=scale.numpy(), quant_error=_quant_error(tensor, decoded), decoded=decoded)
        if nnz < numel:
            coding, data, param = mask_coding.choose_mask_coding(mask, coding_policy)
            if nnz + data.size + _SPARSE_ROW_BYTES < numel:
                row = (shape, dtype_name, "sparse_q8", nnz, coding, param, int(data.size), None)
                return _Encoded(row, q_flat[mask], "I8", mask=data, **common)
        return _Encoded((shape, dtype_name, "q8", numel, "", 0, 0, None), q_flat, "I8", **common)

    bits = _int_view(tensor)
    mask = bits != 0
    negative_zeros = None
    if tensor.is_floating_point():
        # -0.0 (sign bit only) is a zero for the mask; its sign is kept in a second coded mask over the zeros,
        # so the round trip stays bit-exact.
        is_negative_zero = bits == np.iinfo(bits.dtype).min
        if is_negative_zero.any():
            mask &= ~is_negative_zero
            negative_zeros = is_negative_zero[~mask]
    nnz = int(np.count_nonzero(mask))
    itemsize = tensor.element_size()
    dense_bytes = numel * itemsize
    # Sparse needs a mask of at least the entropy bound and a longer row; skip coding hopeless cases.
    if nnz < numel and nnz * itemsize + mask_coding.entropy_bound_bytes(numel, nnz) + _SPARSE_ROW_BYTES < dense_bytes:
        coding, data, param = mask_coding.choose_mask_coding(mask, coding_policy)
        stored = nnz * itemsize + data.size
        signs, sign_data = None, None
        if negative_zeros is not None:
            sign_coding, sign_data, sign_param = mask_coding.choose_mask_coding(negative_zeros, coding_policy)
            signs = [int(np.count_nonzero(negative_zeros)), sign_coding, sign_param, int(sign_data.size)]
            stored += sign_data.size
        if stored + _SPARSE_ROW_BYTES < dense_bytes:
            row = (shape, dtype_name, "sparse", nnz, coding, param, int(data.size), signs)
            return _Encoded(row, bits[mask], dtype_name, mask=data, zsign=sign_data, decoded=tensor)
    return _Encoded((shape, dtype_name, "dense", nnz, "", 0, 0, None), bits, dtype_name, decoded=tensor)


def _row_defaults(shape: list[int], default_dtype: str) -> dict[str, Any]:
    return {"shape": None, "encoding": "dense", "nnz": math.prod(shape), "coding": "", "param": 0, "mask_bytes": 0,
            "dtype": default_dtype, "negative_zeros": None, "quant_error": None}


def _compact_row(row: tuple, default_dtype: str, quant_error: list | None) -> list[Any]:
    """The row as written: positional in ``FIELDS`` order, trailing defaults left out (see the module docstring)."""
    values = dict(zip(_ROW_ORDER, row), quant_error=quant_error)
    defaults = _row_defaults(values["shape"], default_dtype)
    full = [values[key] for key in FIELDS]
    while len(full) > 1 and full[-1] == defaults[FIELDS[len(full) - 1]]:
        full.pop()
    return full


def _group_names(names: list[str]) -> list[tuple[str, list[str]]]:
    """Consecutive names split at their last '.' and grouped by the prefix (prefix keeps the dot)."""
    groups: list[tuple[str, list[str]]] = []
    for name in names:
        prefix = name[: name.rfind(".") + 1]
        if groups and groups[-1][0] == prefix:
            groups[-1][1].append(name)
        else:
            groups.append((prefix, [name]))
    return groups


def save_sparse(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    values_dtype: str | None = None,
    meta: Mapping[str, Any] | None = None,
    *,
    mask_coding_policy: str = "auto",
) -> dict[str, Any]:
    """Write a model's weights as a csprune sparse checkpoint (a safetensors file).

    The write is atomic: a temporary file in the same directory is fsynced and renamed over ``path`` (then the
    directory is fsynced). An interrupted export leaves the previous file (or none) under ``path``, never half a file.

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
        WriteError: The file could not be written (full disk: ENOSPC, file-size limit: EFBIG, permissions...); the
            message names ``path`` and says whether a previous file there is intact, ``errno`` keeps the cause's and
            the temp file was removed. (``csprune.errors.WriteError`` is a ``CsPruneError`` and an ``OSError``.)
    """
    if values_dtype is not None and values_dtype not in VALUES_DTYPES:
        raise ConfigError(f"values_dtype must be None or one of {VALUES_DTYPES}, got {values_dtype!r}")
    if meta is not None and not isinstance(meta, Mapping):
        raise ConfigError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        meta_json = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"meta is not JSON-serializable: {exc}") from exc

    state = _state_dict_of(model_or_state_dict)
    encoded = {name: _encode_tensor(name, tensor, values_dtype, mask_coding_policy) for name, tensor in state.items()}
    counts = Counter(enc.row[1] for enc in encoded.values())
    default_dtype = max(counts, key=counts.get) if counts else "F32"

    decoded_hasher = hashlib.sha256()
    digests = bytearray()
    blobs: dict[str, list[np.ndarray]] = {}
    own: list[tuple[str, str, list[int], np.ndarray]] = []
    for name, enc in encoded.items():
        _update_decoded(decoded_hasher, enc.decoded)
        hasher = hashlib.sha256(_row_prefix(name, enc.row))
        for part in (enc.mask, enc.zsign):
            if part is not None:
                hasher.update(part)
                blobs.setdefault(MASK_ENTRY, []).append(part)
        hasher.update(enc.values)
        if enc.row[2] == "dense" and enc.values.nbytes >= OWN_ENTRY_MIN_BYTES:
            own.append((name, enc.values_dtype, enc.row[0], enc.values))
        elif enc.values.size:
            blobs.setdefault(VALUES_PREFIX + enc.values_dtype, []).append(enc.values)
        if enc.scale is not None:
            hasher.update(enc.scale)
            blobs.setdefault(SCALE_ENTRY, []).append(enc.scale)
        digests += hasher.digest()

    entries = [(DIGEST_ENTRY, "U8", [len(encoded), 32], np.frombuffer(bytes(digests), np.uint8))] if encoded else []
    for blob, arrays in blobs.items():
        dtype = "U8" if blob == MASK_ENTRY else "F32" if blob == SCALE_ENTRY else blob[len(VALUES_PREFIX) :]
        data = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays])
        entries.append((blob, dtype, [data.size // _ITEMSIZES[dtype]], data))
    entries += own

    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "producer": f"csprune {_producer_version()}",
        "dtype": default_dtype,
        "fields": list(FIELDS),
        "tensors": [
            [prefix, {name[len(prefix) :]: _compact_row(encoded[name].row, default_dtype, encoded[name].quant_error)
                      for name in names}]
            for prefix, names in _group_names(list(encoded))
        ],
        "meta": meta_json,
        "decoded_sha256": _b64(decoded_hasher.digest()),
        "header_sha256": _DIGEST_PLACEHOLDER,
    }
    _write_safetensors(Path(path), entries, json.dumps(metadata, separators=(",", ":"), allow_nan=False))
    metadata["header_sha256"] = read_sparse_header(path).metadata["header_sha256"]
    return metadata


def _write_safetensors(path: Path, entries: list[tuple[str, str, list[int], np.ndarray]], metadata_json: str) -> None:
    entries = sorted(entries, key=lambda e: -_ITEMSIZES[e[1]])  # stable: alignment without padding between entries
    header: dict[str, Any] = {"__metadata__": {METADATA_KEY: metadata_json}}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-(8 + len(header_bytes)) % 8)
    prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
    placeholder = _placeholder_field(_DIGEST_PLACEHOLDER)
    if prefix.count(placeholder) != 1:
        raise AssertionError("header digest placeholder not unique")
    prefix = prefix.replace(placeholder, _placeholder_field(_digest(prefix)))

    def write(out: BinaryIO) -> None:
        out.write(prefix)
        for _, _, _, data in entries:
            out.write(memoryview(np.ascontiguousarray(data)).cast("B"))

    # Temp file beside `path`, fsync, rename, fsync of the folder: a crash leaves the old file or the new one; a
    # failed write (full disk, ulimit -f) raises WriteError naming `path`, with the temp file removed.
    atomic_write(path, write)


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


@dataclass
class TensorInfo:
    """One model tensor of a checkpoint: its row and where its stored bytes are.

    ``parts`` maps ``"mask"``, ``"zsign"``, ``"values"``, ``"scale"`` (those it has) to ``(entry, begin, end)``: the
    safetensors entry holding it and the byte range in the file.
    """

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    nnz: int
    coding: str
    param: int
    mask_bytes: int
    negative_zeros: list | None
    quant_error: list | None
    parts: dict[str, tuple[str, int, int]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row(self) -> tuple:
        return (list(self.shape), self.dtype, self.encoding, self.nnz, self.coding, self.param, self.mask_bytes,
                self.negative_zeros)

    @property
    def stored_bytes(self) -> int:
        return sum(end - begin for _, begin, end in self.parts.values())


@dataclass(frozen=True)
class SparseHeader:
    """A validated header of a csprune sparse checkpoint.

    Attributes:
        path: The file.
        metadata: The decoded ``csprune`` metadata (format, version, producer, tensors, meta, digests).
        entries: safetensors entry name -> (dtype, shape, begin, end), offsets relative to the data start.
        tensors: model tensor name -> ``TensorInfo``, in table (state_dict) order.
        data_start: File offset of the first data byte (8 + N).
        file_size: Size of the file in bytes.
    """

    path: str
    metadata: dict[str, Any]
    entries: dict[str, _Entry]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int

    def tensor(self, name: str) -> dict[str, Any]:
        """The metadata of one model tensor as a dict keyed by ``FIELDS`` (defaults filled in)."""
        info = self.tensors[name]
        return {key: (list(info.shape) if key == "shape" else getattr(info, key)) for key in FIELDS}


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
    placeholder_field = _placeholder_field(digest)
    if raw.count(placeholder_field) != 1 or _digest(raw.replace(placeholder_field, _placeholder_field(_DIGEST_PLACEHOLDER))) != digest:
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
    data_start = 8 + header_len
    tensors = _tensor_table(path, metadata, entries, data_start)
    return SparseHeader(path, metadata, entries, tensors, data_start, file_size)


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _expand_row(path: str, name: str, row: Any, default_dtype: str, index: int) -> TensorInfo:
    if not isinstance(row, list) or not 1 <= len(row) <= len(FIELDS):
        raise _fail(path, "malformed tensor metadata", name)
    shape = row[0]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(path, "malformed tensor shape", name)
    numel = math.prod(shape)
    values = _row_defaults(shape, default_dtype) | dict(zip(FIELDS, row))
    dtype, encoding, nnz, coding, param, mask_bytes, signs, quant_error = (
        values[key] for key in ("dtype", "encoding", "nnz", "coding", "param", "mask_bytes", "negative_zeros", "quant_error")
    )
    if (
        dtype not in _TORCH_DTYPES
        or encoding not in ENCODINGS
        or not _is_count(nnz)
        or not isinstance(coding, str)
        or type(param) is not int
        or not _is_count(mask_bytes)
        or (quant_error is not None and not isinstance(quant_error, list))
    ):
        raise _fail(path, "malformed tensor metadata", name)
    if nnz > numel:
        raise _fail(path, f"metadata says {nnz} non-zeros in {numel} entries", name)
    masked = encoding in ("sparse", "sparse_q8")
    if masked != (coding in mask_coding.CODINGS) or (not masked and (coding != "" or param or mask_bytes)):
        raise _fail(path, f"mask coding {coding!r} does not fit encoding {encoding!r}", name)
    if encoding in ("q8", "sparse_q8") and (len(shape) < 2 or not _TORCH_DTYPES[dtype].is_floating_point):
        raise _fail(path, f"int8 encoding of a {len(shape)}-d {dtype} tensor", name)
    if signs is not None and (
        encoding != "sparse"
        or not isinstance(signs, list)
        or len(signs) != 4
        or type(signs[0]) is not int
        or not 0 < signs[0] <= numel - nnz
        or signs[1] not in mask_coding.CODINGS
        or type(signs[2]) is not int
        or not _is_count(signs[3])
    ):
        raise _fail(path, "malformed negative-zero signs", name)
    return TensorInfo(name, index, tuple(shape), dtype, encoding, nnz, coding, param, mask_bytes, signs, quant_error)


def _tensor_table(path: str, metadata: dict[str, Any], entries: dict[str, _Entry], data_start: int) -> dict[str, TensorInfo]:
    """Expand the metadata's tensor table and place every tensor's parts; check it matches the entries exactly."""
    groups, default_dtype = metadata.get("tensors"), metadata.get("dtype")
    if not isinstance(groups, list) or default_dtype not in _TORCH_DTYPES:
        raise _fail(path, "metadata has no valid tensor table")
    tensors: dict[str, TensorInfo] = {}
    for group in groups:
        if not (isinstance(group, list) and len(group) == 2 and isinstance(group[0], str) and isinstance(group[1], dict)):
            raise _fail(path, "malformed tensor table group")
        prefix, rows = group
        for suffix, row in rows.items():
            name = prefix + suffix
            if not name or "." in suffix or "::" in name or name in tensors:
                raise _fail(path, "malformed or duplicate tensor name", name)
            tensors[name] = _expand_row(path, name, row, default_dtype, len(tensors))

    # Place parts: running offsets inside the shared entries, in table order.
    cursors: dict[str, int] = {}

    def take(info: TensorInfo, part: str, entry_name: str, nbytes: int) -> None:
        begin = cursors.get(entry_name, 0)
        cursors[entry_name] = begin + nbytes
        info.parts[part] = (entry_name, begin, begin + nbytes)

    for name, info in tensors.items():
        if info.mask_bytes or info.coding:
            take(info, "mask", MASK_ENTRY, info.mask_bytes)
        if info.negative_zeros is not None:
            take(info, "zsign", MASK_ENTRY, info.negative_zeros[3])
        quantized = info.encoding in ("q8", "sparse_q8")
        stored_dtype = "I8" if quantized else info.dtype
        count = info.nnz if info.encoding in ("sparse", "sparse_q8") else info.numel
        if name in entries:
            entry = entries[name]
            if info.encoding != "dense" or (entry.dtype, entry.shape) != (info.dtype, info.shape):
                raise _fail(path, f"own entry {entry.dtype}{list(entry.shape)} does not fit the table's "
                                  f"{info.encoding} {info.dtype}{list(info.shape)}", name)
            cursors[name] = entry.end - entry.begin
            info.parts["values"] = (name, 0, cursors[name])
        elif count:
            take(info, "values", VALUES_PREFIX + stored_dtype, count * _ITEMSIZES[stored_dtype])
        if quantized:
            take(info, "scale", SCALE_ENTRY, 4 * info.shape[0])
    if tensors:
        cursors[DIGEST_ENTRY] = 32 * len(tensors)
    for entry_name, size in cursors.items():
        entry = entries.get(entry_name)
        if entry is None:
            raise _fail(path, f"entry {entry_name!r} is missing from the file")
        if entry_name in tensors:
            continue  # an own entry: checked above
        if entry_name == DIGEST_ENTRY:
            dtype, shape = "U8", (len(tensors), 32)
        else:
            dtype = {MASK_ENTRY: "U8", SCALE_ENTRY: "F32"}.get(entry_name) or entry_name[len(VALUES_PREFIX) :]
            shape = (size // _ITEMSIZES[dtype],) if dtype in _ITEMSIZES else None
        if (entry.dtype, entry.shape) != (dtype, shape) or entry.end - entry.begin != size:
            raise _fail(path, f"entry {entry_name!r} is {entry.dtype}{list(entry.shape)}; the table implies "
                              f"{dtype}, {size} bytes")
    unexpected = sorted(set(entries) - set(cursors))
    if unexpected:
        raise _fail(path, f"file holds entries no tensor refers to: {unexpected[:5]}")
    # Absolute file offsets, so readers need not look the entries up again.
    for info in tensors.values():
        for part, (entry_name, begin, end) in info.parts.items():
            base = data_start + entries[entry_name].begin
            info.parts[part] = (entry_name, base + begin, base + end)
    return tensors


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


def _decode_positions(header: SparseHeader, buffer: bytearray, info: TensorInfo, part: str, numel: int, count: int,
                      coding: str, param: int) -> np.ndarray:
    _, begin, end = info.parts[part]
    try:
        return mask_coding.decode_mask(
            np.frombuffer(buffer, np.uint8, end - begin, begin), coding, param, numel, count
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # constriction raises pyo3 PanicException (a BaseException) on some garbage
        what = "mask" if part == "mask" else "negative-zero signs"
        raise _fail(header.path, f"{what} does not decode: {exc}", info.name) from None


@dataclass
class SparseParts:
    """A sparse-stored tensor as its non-zeros, not densified (what ``load_sparse_parts`` returns for them).

    Attributes:
        shape: the tensor's shape.
        positions: ``[nnz]`` int64 flat row-major indices of the stored values, increasing.
        values: ``[nnz]`` the values there (int8-stored ones dequantized per row, as ``load_sparse`` does).
    """

    shape: tuple
    positions: torch.Tensor
    values: torch.Tensor

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(math.prod(self.shape), dtype=self.values.dtype)
        dense[self.positions] = self.values
        return dense.view(self.shape)


def _decode_tensor(header: SparseHeader, buffer: bytearray, info: TensorInfo, as_parts: bool = False) -> Any:
    """One tensor, dense; with ``as_parts``, tensors stored sparse come back as :class:`SparseParts`."""
    dtype, shape, numel, encoding = _TORCH_DTYPES[info.dtype], info.shape, info.numel, info.encoding
    values = info.parts.get("values")
    if encoding == "dense":
        if values is None:
            return torch.empty(shape, dtype=dtype)
        # A view of the private read buffer: no copy (the buffer lives as long as any tensor uses it).
        return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=values[1]).view(shape)

    positions = None
    if encoding in ("sparse", "sparse_q8"):
        positions = _decode_positions(header, buffer, info, "mask", numel, info.nnz, info.coding, info.param)

    if encoding == "sparse":
        int_view = _INT_VIEWS[_ITEMSIZES[info.dtype]]
        stored = np.frombuffer(buffer, int_view, info.nnz, values[1]) if values is not None else np.zeros(0, int_view)
        if as_parts:  # negative zeros are zeros to a product: not needed here
            return SparseParts(tuple(shape), torch.from_numpy(positions.astype(np.int64)),
                               torch.from_numpy(stored.copy()).view(dtype))
        dense = np.zeros(numel, dtype=int_view)
        if values is not None:
            dense[positions] = stored
        if info.negative_zeros is not None:
            count, sign_coding, sign_param, _ = info.negative_zeros
            negative = _decode_positions(header, buffer, info, "zsign", numel - info.nnz, count, sign_coding, sign_param)
            zero_positions = np.ones(numel, dtype=np.bool_)
            zero_positions[positions] = False
            dense[np.flatnonzero(zero_positions)[negative]] = np.iinfo(int_view).min
        return torch.from_numpy(dense).view(dtype).view(shape)

    stored_q = np.frombuffer(buffer, np.int8, values[2] - values[1], values[1]) if values else np.zeros(0, np.int8)
    _, begin, _ = info.parts["scale"]
    scale = torch.from_numpy(np.frombuffer(buffer, np.float32, shape[0], begin).copy())
    if positions is not None:
        q = np.zeros(numel, dtype=np.int8)
        q[positions] = stored_q
    else:
        q = stored_q
    q_rows = torch.from_numpy(q).view(shape[0], -1)
    nonempty_rows = q_rows.ne(0).any(dim=1)
    if not torch.isfinite(scale).all() or not torch.equal(scale.gt(0), nonempty_rows) or scale.lt(0).any():
        raise _fail(header.path, "int8 scales are corrupt (must be > 0 exactly for non-empty rows)", info.name)
    if as_parts and positions is not None:
        flat = torch.from_numpy(positions.astype(np.int64))
        row_scale = scale[torch.div(flat, q_rows.shape[1], rounding_mode="floor")]
        decoded = (torch.from_numpy(stored_q.copy()).to(torch.float32) * row_scale).to(dtype)  # = _dequantize, per value
        return SparseParts(tuple(shape), flat, decoded)
    return _dequantize(q_rows, scale, dtype).view(shape)


def _stored_digests(header: SparseHeader, buffer: bytearray, out: list[bytes]) -> None:
    """SHA-256 of every tensor's row and stored bytes, appended to ``out`` in table order (run in a thread:
    hashlib releases the GIL on large buffers, so this overlaps with decoding)."""
    view = memoryview(buffer)
    for info in header.tensors.values():
        hasher = hashlib.sha256(_row_prefix(info.name, info.row))
        for part in ("mask", "zsign", "values", "scale"):
            span = info.parts.get(part)
            if span is not None:
                hasher.update(view[span[1] : span[2]])
        out.append(hasher.digest())


def load_sparse(
    path: str | os.PathLike, model: torch.nn.Module | None = None, *, verify: bool | str = True
) -> dict[str, torch.Tensor]:
    """Load a csprune sparse checkpoint as a dense state_dict; never unpickles anything.

    Args:
        path: The file written by ``save_sparse``.
        model: If given, the state_dict is loaded into it strictly (same keys and shapes; floating tensors
            may be cast to the model's floating dtype).
        verify: ``True`` (default): check every tensor's SHA-256 of its metadata row and stored bytes, which with
            the validating decoders guarantees the saved numbers. ``"full"``: also the SHA-256 of all decoded
            tensors recorded at save time (an end-to-end check of the decoders; hashes the dense bytes, slower).
            ``False``: skip tensor digests (the header digest and all structural checks always run); only for files
            you produced yourself and trust.

    Returns:
        Name -> dense tensor (CPU), in the order they were saved. Dense-stored tensors are views of one private
        read buffer; sparse ones own their memory.

    Raises:
        CheckpointError: Truncation, corruption, unknown version, inconsistent header, checksum mismatch, or
            (with ``model``) missing/unexpected keys and shape/dtype mismatches. The message names the file
            and the tensor.
    """
    header, state = _read_tensors(path, verify, as_parts=False)
    if model is not None:
        _load_into(header.path, model, state)
    return state


def load_sparse_parts(path: str | os.PathLike, *, verify: bool | str = True) -> dict[str, Any]:
    """Like :func:`load_sparse`, but tensors stored sparse come back as :class:`SparseParts` (positions and
    values), never densified: what ``csprune.deploy.load`` builds sparse matrices from. Same checks and errors.
    With ``verify="full"`` each sparse tensor is densified alone, transiently, to check the decoded digest."""
    return _read_tensors(path, verify, as_parts=True)[1]


def _read_tensors(path: str | os.PathLike, verify: bool | str, as_parts: bool) -> tuple[SparseHeader, dict[str, Any]]:
    """Read, decode and verify every tensor of ``path`` (see :func:`load_sparse`)."""
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
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

    digests: list[bytes] = []
    hasher_thread = None
    if verify and header.tensors:
        hasher_thread = threading.Thread(target=_stored_digests, args=(header, buffer, digests), daemon=True)
        hasher_thread.start()
    state: dict[str, Any] = {}
    try:
        for name, info in header.tensors.items():
            try:
                state[name] = _decode_tensor(header, buffer, info, as_parts=True) if as_parts else _decode_tensor(header, buffer, info)
            except CheckpointError:
                raise
            except Exception as exc:  # anything unforeseen in decoding still names the file and tensor
                raise _fail(header.path, f"cannot decode ({type(exc).__name__}: {exc})", name) from None
    finally:
        if hasher_thread is not None:
            hasher_thread.join()
    if hasher_thread is not None:
        if len(digests) != len(header.tensors):
            raise _fail(header.path, "could not compute the tensor digests")
        begin = header.data_start + header.entries[DIGEST_ENTRY].begin
        stored = bytes(buffer[begin : begin + 32 * len(digests)])
        if b"".join(digests) != stored:
            for info, digest in zip(header.tensors.values(), digests):
                if stored[32 * info.index : 32 * info.index + 32] != digest:
                    raise _fail(header.path, "SHA-256 mismatch: the stored data is corrupt", info.name)
    if verify == "full":
        hasher = hashlib.sha256()
        for info, tensor in zip(header.tensors.values(), state.values()):  # sparse parts: densified one at a time
            _update_decoded(hasher, _decode_tensor(header, buffer, info) if isinstance(tensor, SparseParts) else tensor)
        if _b64(hasher.digest()) != header.metadata.get("decoded_sha256"):
            raise _fail(header.path, "decoded tensors do not match the SHA-256 recorded at save time "
                                     "(stored bytes verified, so the decoder disagrees with the encoder)")
    return header, state


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
