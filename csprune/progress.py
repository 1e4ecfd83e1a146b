"""Progress bars for long work: tqdm on a terminal, silent when stdout is not a TTY (CI, sweeps)."""

from __future__ import annotations

import sys
from typing import Iterable

__all__ = ["progress", "is_tty"]


def is_tty() -> bool:
    return sys.stdout.isatty()


def progress(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """tqdm bar on a terminal; the iterable unchanged otherwise (callers print one line per stage)."""
    if not is_tty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
