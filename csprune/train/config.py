"""Prune configs (``conf/prune/*.yaml``) → Pruner: the schema, validation and builders both recipes use.

The recipes pass plain dicts (``OmegaConf.to_container`` of their Hydra configs), so nothing here
imports Hydra. The keys are the fields of :class:`PruneConfig`, each with the reason for its default.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, List, Mapping, Optional

import torch

from ..errors import ConfigError
from ..methods import METHODS, Method
from ..methods.base import parse_pattern
from ..methods.sensing import SENSINGS
from ..pruner import SCOPES, Pruner
from ..schedules import SCHEDULES, OneShot, Schedule
from ..solvers import SOLVER_OPTIONS, SOLVERS

__all__ = ["PruneConfig", "build_method", "build_schedule", "build_pruner", "validate_prune_config", "method_label",
           "method_names", "method_arguments", "CONVENTIONAL_SCHEDULE", "METHOD_ALIASES"]


@dataclasses.dataclass
class PruneConfig:
    """Schema of ``conf/prune/*.yaml`` (both recipes register it as ``prune/prune_schema``).

    Plain dataclass: Hydra's ConfigStore turns it into a structured config, so a typo such as
    ``prune.sparsty=0.5`` fails before any work; the reason for each default is beside it.
    """

    method: str = "csp"  # csp | gmp | magnitude | wanda | random
    sparsity: float = 0.7  # final fraction of zeros in the targets
    schedule: str = "oneshot"  # oneshot | cubic | linear (gmp uses cubic)
    ramp_epochs: float = 1.0  # gradual schedules reach the final sparsity after this much fine-tuning
    frequency: int = 100  # steps between mask updates of gradual schedules (Zhu & Gupta)
    scope: str = "layer"  # row | layer | global
    pattern: str = "unstructured"  # or N:M such as 2:4
    targets: Optional[List[str]] = None  # fqn globs; None: the recipe's default for the model
    exclude: List[str] = dataclasses.field(default_factory=list)
    sensing: str = "activations"  # csp: activations | gaussian | identity
    solver: str = "auto"  # csp: auto (obs when an update removes <= what it keeps, else omp) | omp | obs | sparsegpt | fista | cvxpy | sklearn
    safeguard: Any = "auto"  # csp: true | false | auto (on one-shot, off in gradual updates): fall back per row to refit top-|w|/saliency supports
    solve_updates: str = "all"  # csp on a gradual schedule: all (every update solves) | final (|w| until the last update, which solves)
    damping: float = 0.01  # δ of G + δ·mean(diag G)·I
    gaussian_ratio: float = 0.5  # ρ = m/n of gaussian sensing
    train_l1: float = 0.0  # csp: λ_train of the annealed ℓ1 penalty (0: off)
    solver_options: Any = dataclasses.field(default_factory=dict)
    refit: bool = False  # magnitude/wanda: least-squares refit of kept weights
    seed: int = 0  # random: mask seed
    stats_steps: int = 4  # batches observed before each gradual mask update (what RESULTS.md's gradual CSP runs used)
    calib_batches: int = 8  # one-shot: training batches observed before pruning
    calib_mode: str = "eval"  # one-shot statistics: eval (clean batches, model.eval()) | train (augmented, dropout on, BatchNorm frozen)
    regrow: bool = False  # allow pruned weights back at later updates
    finetune_epochs: int = 4  # fine-tuning after pruning (same for every method: a fair budget)
    finetune_lr: float = 5e-4  # a quarter of the dense peak LR, cosine-decayed
    finetune_warmup_steps: int = 0  # linear LR warm-up at the start of fine-tuning (same for every method)
    values_dtype: str = "float32"  # exported values: float32 | float16 | bfloat16 | int8
    max_gram_bytes: Optional[int] = None  # cap on one layer's Gram (8·n² bytes); larger layers use column blocks. None: exact



# Config-only method names: "gmp" is magnitude pruning on its conventional cubic schedule (Zhu & Gupta 2017).
METHOD_ALIASES: dict[str, str] = {"gmp": "magnitude"}


def method_names() -> tuple[str, ...]:
    """Every ``prune.method`` a config may name: the registry's and the aliases."""
    return tuple(METHODS) + tuple(METHOD_ALIASES)


def method_arguments(name: str) -> tuple[str, ...]:
    """The constructor arguments of method ``name`` (each is a :class:`PruneConfig` field of the same name)."""
    cls = METHODS[METHOD_ALIASES.get(name, name)]
    return tuple(k for k in inspect.signature(cls.__init__).parameters if k != "self")


def build_method(p: Mapping[str, Any]) -> Method:
    """Method object from a prune config: the registry's class, given every config key its constructor takes."""
    name = p["method"]
    if name not in method_names():
        raise ConfigError(f"prune.method={name!r}: expected one of {', '.join(method_names())}")
    cls = METHODS[METHOD_ALIASES.get(name, name)]
    kwargs = {k: p[k] for k in method_arguments(name) if k in p}
    if "solver_options" in kwargs:
        kwargs["solver_options"] = dict(kwargs["solver_options"] or {})
    return cls(**kwargs)


def build_schedule(p: Mapping[str, Any], start_step: int, steps_per_epoch: int) -> Schedule:
    """Schedule object from a prune config, in optimizer steps counted from ``start_step``."""
    kind = p.get("schedule", "oneshot")
    if kind not in SCHEDULES:
        raise ConfigError(f"prune.schedule={kind!r}: expected one of {', '.join(SCHEDULES)}")
    sparsity = p["sparsity"]
    if kind == "oneshot":
        return OneShot(sparsity, step=start_step)
    ramp = max(1, int(round(p.get("ramp_epochs", 1) * steps_per_epoch)))
    return SCHEDULES[kind](final_sparsity=sparsity, start_step=start_step, end_step=start_step + ramp,
                           frequency=max(1, min(int(p.get("frequency", 100)), ramp)))


def build_pruner(model: torch.nn.Module, p: Mapping[str, Any], optimizer: torch.optim.Optimizer | None,
                 start_step: int, steps_per_epoch: int, default_targets: list[str] | None = None) -> Pruner:
    """A Pruner for ``model`` from a prune config (``targets`` None -> ``default_targets``)."""
    targets = p.get("targets") or default_targets
    return Pruner(
        model,
        build_method(p),
        build_schedule(p, start_step, steps_per_epoch),
        targets=list(targets) if targets else None,
        exclude=list(p.get("exclude") or []) or None,
        scope=p.get("scope", "layer"),
        pattern=p.get("pattern", "unstructured"),
        optimizer=optimizer,
        stats_steps=p.get("stats_steps", 4),
        regrow=p.get("regrow", False),
        max_gram_bytes=p.get("max_gram_bytes"),
    )


# The schedule each method is known by; another schedule shows in reports as "method-schedule".
CONVENTIONAL_SCHEDULE = {"gmp": "cubic"}


def method_label(p: Mapping[str, Any]) -> str:
    """Report label of a prune config: "csp", "gmp", "wanda+refit", or e.g. "csp-cubic" for a method run
    on a schedule other than its conventional one."""
    method, schedule = p["method"], p.get("schedule", "oneshot")
    name = f"{method}+refit" if p.get("refit") and method in ("magnitude", "wanda") else method
    return name if schedule == CONVENTIONAL_SCHEDULE.get(method, "oneshot") else f"{name}-{schedule}"


def validate_prune_config(p: Mapping[str, Any], prefix: str = "prune") -> None:
    """Check a prune config before any work, naming the bad key (``prune.sparsity=1.5: ...``).

    Names are checked against their registries (methods, schedules, solvers and their options,
    sensings, scopes), so a typo in ``prune.solver_options`` fails here and not after dense training.

    Raises:
        ConfigError: naming the key, its value and what was expected.
    """
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{prefix}.{key}={p.get(key)!r}: {why}")

    s = p.get("sparsity")
    if not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0 or s != s:
        raise bad("sparsity", "must lie in [0, 1)")
    choices = {
        "method": method_names(),
        "schedule": tuple(SCHEDULES),
        "scope": SCOPES,
        "sensing": SENSINGS,
        "solver": SOLVERS + ("auto",),
        "safeguard": (True, False, "auto"),
        "solve_updates": ("all", "final"),
        "values_dtype": ("float32", "float16", "bfloat16", "int8"),
        "calib_mode": ("eval", "train"),
    }
    for key, allowed in choices.items():
        if key in p and p[key] not in allowed:
            raise bad(key, f"expected one of {', '.join(map(str, allowed))}")
    try:
        parse_pattern(p.get("pattern", "unstructured"))
    except ValueError as exc:
        raise bad("pattern", str(exc).split(": ", 1)[-1]) from None
    for key in ("ramp_epochs", "damping", "train_l1"):
        if key in p and p[key] < 0:
            raise bad(key, "must be >= 0")
    for key in ("frequency", "stats_steps", "calib_batches"):
        if key in p and p[key] < 1:
            raise bad(key, "must be >= 1")
    options = p.get("solver_options") or {}
    if options:
        solver = p.get("solver", "auto")
        per_solver = options if solver == "auto" else {solver: options}
        for name, opts in per_solver.items():
            if name not in SOLVER_OPTIONS:
                raise bad("solver_options", f"with solver auto, keys are solver names ({', '.join(SOLVER_OPTIONS)}); got {name!r}")
            unknown = sorted(set(opts or {}) - set(SOLVER_OPTIONS[name]))
            if unknown:
                raise bad("solver_options", f"unknown option(s) {unknown} for solver {name!r}; valid: {sorted(SOLVER_OPTIONS[name])}")
