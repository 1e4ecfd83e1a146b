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


def register_schemas(name: str, schema: type, models: dict[str, type]) -> None:
    """Register a recipe's structured configs with Hydra's ConfigStore (before ``@hydra.main`` runs).

    Args:
        name: the primary schema's name (``asr_schema``), referenced by the recipe's YAML defaults.
        schema: the recipe's top-level config dataclass.
        models: ``model`` group schemas by name (``{"cmrl_schema": CMRLConfig}``). The ``prune`` group's
            schema, shared by both recipes, is registered too.
    """
    from hydra.core.config_store import ConfigStore

    from csprune.train.config import PruneConfig

    cs = ConfigStore.instance()
    cs.store(name=name, node=schema)
    for model_name, node in models.items():
        cs.store(group="model", name=model_name, node=node)
    cs.store(group="prune", name="prune_schema", node=PruneConfig)
