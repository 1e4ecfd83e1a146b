"""Sparse checkpoint format: ``save_sparse`` / ``load_sparse`` / ``inspect_sparse`` and mask entropy coding."""

from ..errors import CheckpointError
from .format import (FORMAT_NAME, FORMAT_VERSION, SparseParts, load_sparse, load_sparse_parts, read_sparse_header,
                     read_sparse_meta, save_sparse)
from .inspect import format_report, inspect_sparse

__all__ = [
    "CheckpointError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "save_sparse",
    "load_sparse",
    "load_sparse_parts",
    "SparseParts",
    "read_sparse_meta",
    "read_sparse_header",
    "inspect_sparse",
    "format_report",
]
