"""Faults the training loop detects and names: non-finite losses or gradients, and preemption (SIGTERM).

``fit`` (csprune.train.loop) uses these; they are also usable in a user's own loop:

    with PreemptionFlag() as preempt:
        for batch in loader:
            ...
            if preempt.requested:
                save(...); raise Preempted(...)

Policy (a reason for each):

- A non-finite loss or gradient stops training by default (``max_bad_steps=0``): on a pruned model a
  NaN usually means a refit or LR problem that skipping would hide. ``max_bad_steps=N`` skips at most N
  such steps in a stage (no optimizer step, no pruner step), as mixed-precision loss scalers do, for
  runs where a rare overflow is expected. The error names the stage, the step, and which loss term or
  parameter gradient was not finite; nothing is written after the last good checkpoint.
- SIGTERM (how SLURM and Kubernetes preempt) sets a flag; at the next step boundary every rank agrees
  on it, rank 0 writes a checkpoint, and :class:`Preempted` is raised. The recipes exit with status
  143 (128 + SIGTERM), and ``trainer.resume=auto`` continues exactly where the run stopped.
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Mapping

import torch
from torch import nn

from ..errors import CsPruneError

__all__ = ["NonFiniteError", "Preempted", "PreemptionFlag", "nonfinite_terms", "first_nonfinite_grad", "PREEMPTED_EXIT_CODE"]

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class NonFiniteError(CsPruneError, FloatingPointError):
    """The loss or a gradient was NaN or Inf; the message names the stage, step and term.

    Attributes:
        stage: The training stage ("train", "finetune", ...).
        step: The global step whose batch gave the bad value.
        term: The loss term or ``grad:<parameter>`` that was not finite.
    """

    def __init__(self, stage: str, step: int, term: str, message: str) -> None:
        self.stage, self.step, self.term = stage, step, term
        super().__init__(message)


class Preempted(CsPruneError):
    """Training stopped on SIGTERM after writing a checkpoint (``trainer.resume=auto`` continues).

    Attributes:
        step: The global step after the last completed batch (the checkpoint's step).
    """

    def __init__(self, step: int, message: str) -> None:
        self.step = step
        super().__init__(message)


class PreemptionFlag:
    """Context manager: while inside, SIGTERM sets ``requested`` instead of killing the process.

    The previous handler is restored on exit. Outside the main thread (where Python cannot install
    signal handlers) it is inert and ``requested`` stays False.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.requested = True

    def __enter__(self) -> "PreemptionFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def nonfinite_terms(terms: Mapping[str, float | torch.Tensor]) -> list[str]:
    """Names of the terms whose value is NaN or ±Inf, in order."""
    bad = []
    for name, value in terms.items():
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(v):
            bad.append(name)
    return bad


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or Inf (None when all are finite).

    Called after every step, so the common case costs one device sync: all gradients are checked in one
    reduction, and only a bad step walks the parameters to name the culprit.
    """
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named or bool(torch.stack([torch.isfinite(g).all() for _, g in named]).all()):
        return None
    return next(name for name, g in named if not bool(torch.isfinite(g).all()))
