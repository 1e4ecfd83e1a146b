"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def an4_root() -> Path:
    """The AN4 corpus folder (``$AN4_ROOT``, default ``data/an4``); skips the test when it is
    missing, except under CI (``CI=true``), where missing data is a failure."""
    root = Path(os.environ.get("AN4_ROOT", "data/an4"))
    lists = [root / "etc" / f"an4_{split}.{kind}" for split in ("train", "test") for kind in ("fileids", "transcription")]
    if all(path.is_file() for path in lists) and (root / "wav").is_dir():
        return root
    message = f"AN4 corpus not found at '{root}': set AN4_ROOT to the corpus folder (see recipes/asr/data.py)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
