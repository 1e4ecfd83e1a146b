"""What both recipes' Hydra entry points share (the csprune package itself never imports Hydra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_dir(cfg: Any, fallback: str) -> Path:
    """``cfg.output_dir``, else Hydra's run folder, else ``fallback`` (``run(cfg)`` called outside ``@hydra.main``)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(fallback)
