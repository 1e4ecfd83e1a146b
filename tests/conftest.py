"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def an4_root() -> Path:
    """The AN4 corpus folder (``$AN4_ROOT``, default ``data/an4``); skips the test when it is
    missing, except under CI (``CI=true``), where missing data is a failure."""
    root = Path(os.environ.get("AN4_ROOT", "data/an4"))
    lists = [root / "etc" / f"an4_{split}.{kind}" for split in ("train", "test") for kind in ("fileids", "transcription")]
    if all(path.is_file() for path in lists) and (root / "wav").is_dir():
        return root
    message = f"AN4 corpus not found at '{root}': set AN4_ROOT to the corpus folder (see csprune/an4.py)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def cfg_for(*overrides: str, recipe: str = "asr"):
    """A recipe's config (``conf/<recipe>.yaml``) composed with ``overrides`` (as on the command line)."""
    import importlib

    from hydra import compose, initialize_config_dir

    importlib.import_module(f"recipes.{recipe}.run")  # registers the structured configs

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(recipe, overrides=list(overrides))


@pytest.fixture(scope="session")
def smoke_run(an4_root, tmp_path_factory):
    """One `trainer=smoke +prune=csp` run of the ASR recipe: (cfg, run folder, metrics)."""
    from recipes.asr import run as asr_run

    out = tmp_path_factory.mktemp("smoke")
    cfg = cfg_for("trainer=smoke", "+prune=csp", f"output_dir={out}", f"data.root={an4_root}",
                  f"data.cache_dir={out / 'cache'}")
    return cfg, out, asr_run.run(cfg)
