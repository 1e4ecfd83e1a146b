"""Sparsity schedules: pure functions of the optimizer step.

Each schedule is a small frozen dataclass with two pure methods:

* ``sparsity_at(step) -> float``: the scheduled fraction of zeros after the
  pruning step at ``step`` (piecewise constant between pruning steps);
* ``is_update(step) -> bool``: whether the pruner recomputes masks at ``step``.

The formulas live in module-level functions (``cubic_sparsity`` ...) so they can
be tested and plotted without any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from .errors import ConfigError

__all__ = ["OneShot", "Cubic", "Linear", "cubic_sparsity", "linear_sparsity", "Schedule", "SCHEDULES"]


def _check_sparsity(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= float(value) < 1.0) or math.isnan(value):
        raise ConfigError(f"{name}={value!r}: sparsity must lie in [0, 1)")


def _last_update(step: int, start: int, end: int, frequency: int) -> int:
    """The most recent pruning step at or before ``step`` (clipped to [start, end])."""
    if step >= end:
        return end
    return start + ((step - start) // frequency) * frequency


def _ramp_progress(step: int, start: int, end: int, frequency: int) -> float | None:
    """Fraction of the ramp done at the last pruning step <= ``step`` (None before ``start``)."""
    if step < start:
        return None
    if end <= start:
        return 1.0
    return min(1.0, (_last_update(step, start, end, frequency) - start) / (end - start))


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int, frequency: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))³ at t = t0 + kΔt."""
    progress = _ramp_progress(step, start, end, frequency)
    return 0.0 if progress is None else final + (initial - final) * (1.0 - progress) ** 3


def linear_sparsity(step: int, initial: float, final: float, start: int, end: int, frequency: int) -> float:
    """Sparsity rising linearly from ``initial`` at ``start`` to ``final`` at ``end``."""
    progress = _ramp_progress(step, start, end, frequency)
    return 0.0 if progress is None else initial + (final - initial) * progress


class Schedule:
    """Base of the schedules: ``sparsity_at``, ``is_update``, ``progress`` and ``final``."""

    final_sparsity: float

    def sparsity_at(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def is_update(self, step: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def progress(self, step: int) -> float:  # pragma: no cover - abstract
        """Fraction of the schedule done at ``step``, in [0, 1]."""
        raise NotImplementedError


@dataclass(frozen=True)
class OneShot(Schedule):
    """Prune once to ``final_sparsity`` at ``step``.

    Attributes:
        final_sparsity: fraction of zeros after the pruning step.
        step: the optimizer step at which masks are computed (0: the first call of ``Pruner.step``).
    """

    final_sparsity: float
    step: int = 0  # prune at the first step: one-shot pruning of a trained model

    def __post_init__(self):
        _check_sparsity("final_sparsity", self.final_sparsity)
        if self.step < 0:
            raise ConfigError(f"step={self.step}: must be >= 0")

    def sparsity_at(self, step: int) -> float:
        return self.final_sparsity if step >= self.step else 0.0

    def is_update(self, step: int) -> bool:
        return step == self.step

    def progress(self, step: int) -> float:
        return 1.0 if step >= self.step else 0.0


@dataclass(frozen=True)
class _Gradual(Schedule):
    final_sparsity: float
    start_step: int = 0  # start pruning with training; set later to prune a trained model
    end_step: int = 1000  # Zhu & Gupta prune over a large part of training; recipes set it from epochs
    frequency: int = 100  # Δt: Zhu & Gupta recompute masks every 100 steps
    initial_sparsity: float = 0.0  # s_i: start from the dense model

    def __post_init__(self):
        _check_sparsity("final_sparsity", self.final_sparsity)
        _check_sparsity("initial_sparsity", self.initial_sparsity)
        if self.frequency < 1:
            raise ConfigError(f"frequency={self.frequency}: must be >= 1")
        if self.start_step < 0 or self.end_step < self.start_step:
            raise ConfigError(f"start_step={self.start_step}, end_step={self.end_step}: need 0 <= start_step <= end_step")

    def is_update(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    def progress(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.end_step <= self.start_step:
            return 1.0
        return min(1.0, (step - self.start_step) / (self.end_step - self.start_step))


@dataclass(frozen=True)
class Cubic(_Gradual):
    """Gradual pruning of Zhu & Gupta (2017): fast early, slow near the end."""

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step, self.frequency)


@dataclass(frozen=True)
class Linear(_Gradual):
    """Sparsity rising linearly between ``start_step`` and ``end_step``."""

    def sparsity_at(self, step: int) -> float:
        return linear_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step, self.frequency)


# The registry of schedule names (prune.schedule): the one place they are defined.
SCHEDULES: dict[str, type[Schedule]] = {"oneshot": OneShot, "cubic": Cubic, "linear": Linear}
