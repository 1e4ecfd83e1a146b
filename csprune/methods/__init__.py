"""Pruning methods: each turns (weights, statistics, budget) into a mask (+ new values)."""

from .base import LayerContext, Method, Selection
from .csp import CSP
from .magnitude import Magnitude, Random
from .wanda import Wanda

__all__ = ["Method", "LayerContext", "Selection", "Magnitude", "Random", "Wanda", "CSP", "build_method"]


def build_method(name: str, **kwargs) -> Method:
    """Method by config name ("csp", "magnitude", "gmp", "wanda", "random").

    "gmp" is magnitude pruning; the gradual Cubic schedule is the recipe's part of it.
    """
    table = {"csp": CSP, "magnitude": Magnitude, "gmp": Magnitude, "wanda": Wanda, "random": Random}
    if name not in table:
        raise ValueError(f"method {name!r}: expected one of {sorted(table)}")
    return table[name](**kwargs)
