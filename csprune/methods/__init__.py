"""Pruning methods: each turns (weights, statistics, budget) into a mask (+ new values).

``METHODS`` is the registry: the one place a method's config name is defined. Config validation,
the prune-config builder (``csprune.train.config``), error messages and the registry test read it.
"""

from __future__ import annotations

from .base import LayerContext, Method, Selection
from .csp import CSP
from .magnitude import Magnitude, Random
from .wanda import Wanda

__all__ = ["Method", "LayerContext", "Selection", "Magnitude", "Random", "Wanda", "CSP", "METHODS"]

METHODS: dict[str, type[Method]] = {"csp": CSP, "magnitude": Magnitude, "wanda": Wanda, "random": Random}
