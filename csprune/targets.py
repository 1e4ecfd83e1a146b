"""Which tensors are pruned, and their 2-D row view.

A *target* is one weight tensor of a supported module, addressed by its fully
qualified name (fqn) such as ``"encoder.layers.0.ffn.1.weight"``. Every method
and solver works on the target's **row view** ``W ∈ R^{o×n}``: one row per output
unit, one column per input it reads (docs/design.md §3):

========================  ==========================  ===========================
module                    parameter                   row view
========================  ==========================  ===========================
Linear, Embedding         weight [out, in]            as is
Conv1d / Conv2d           weight [out, in/g, *k]      [out, in/g·prod(k)]
ConvTranspose1d           weight [in, out/g, k]       [out, in/g·k]
LSTM / GRU / RNN          weight_ih_l*, weight_hh_l*  [gates·hidden, in]
MultiheadAttention        in_proj_weight [3E, E]      as is, 3 row groups (q, k, v)
MultiheadAttention        out_proj.weight [E, E]      as is (kind "mha_out")
========================  ==========================  ===========================

Rows are split into ``groups`` contiguous blocks that see different inputs
(grouped convs, the q/k/v blocks of an attention in-projection); statistics and
solvers keep one Gram matrix per block.

An attention's ``out_proj`` is a Linear that ``MultiheadAttention`` never calls as a
module (it passes ``out_proj.weight`` to the attention function), so its target has
kind ``"mha_out"`` and ``host`` = the attention: statistics observe the attention's
forward, not the Linear's.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["Target", "TargetSpec", "find_targets", "candidate_targets"]

TargetSpec = Union[str, type]
"""A target selector: an fqn glob (``"encoder.*"``), ``"type:Linear"``, or a module class."""

_RNN_WEIGHT = re.compile(r"^weight_(ih|hh)_l(\d+)(_reverse)?$")


@dataclass(eq=False)
class Target:
    """One prunable weight tensor.

    Attributes:
        fqn: parameter name as in ``model.named_parameters()`` (before parametrization).
        module_fqn: name of the owning module ("" for the root).
        module: the owning module.
        param_name: attribute name on ``module`` ("weight", "weight_ih_l0", "in_proj_weight", ...).
        kind: "linear", "conv", "conv_transpose", "rnn", "mha_in", "mha_q"/"mha_k"/"mha_v",
            "mha_out" (an attention's out_proj), "embedding".
        groups: number of contiguous row blocks that see different inputs.
        host: the module whose forward consumes the weight when it is not ``module`` itself
            (the MultiheadAttention of an ``out_proj``); None: ``module``.
    """

    fqn: str
    module_fqn: str
    module: nn.Module
    param_name: str
    kind: str
    groups: int = 1
    host: nn.Module | None = None  # None: the weight is used by calling ``module``

    @property
    def weight(self) -> torch.Tensor:
        """The effective (masked) weight tensor, original shape."""
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """Row view of a tensor shaped like this target's weight.

        Args:
            weight: tensor of the target's shape.

        Returns:
            [o, n] view (or copy for transposed convs).
        """
        if self.kind == "conv_transpose":
            g = self.groups
            cin, cout_g = weight.shape[0], weight.shape[1]
            k = weight.shape[2:]
            w = weight.reshape(g, cin // g, cout_g, *k).movedim(2, 1)  # [g, out/g, in/g, *k]
            return w.reshape(g * cout_g, -1)
        return weight.reshape(weight.shape[0], -1)

    def unrows(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rows`: [o, n] back to the weight's shape."""
        shape = self.shape
        if self.kind == "conv_transpose":
            g = self.groups
            cin, cout_g = shape[0], shape[1]
            k = tuple(shape[2:])
            w = rows.reshape(g, cout_g, cin // g, *k).movedim(1, 2)
            return w.reshape(shape)
        return rows.reshape(shape)

    @property
    def row_shape(self) -> tuple[int, int]:
        """(o, n) of the row view."""
        shape = self.shape
        numel = shape.numel()
        o = shape[1] * self.groups if self.kind == "conv_transpose" else (shape[0] if len(shape) else 1)
        return o, numel // max(o, 1)


def _module_candidates(module_fqn: str, module: nn.Module, host: nn.Module | None = None) -> list[Target]:
    """Prunable weights a single module owns directly (not its children).

    Args:
        module_fqn: the module's name.
        module: the module.
        host: the MultiheadAttention whose ``out_proj`` ``module`` is, else None.
    """

    def fqn(p: str) -> str:
        return f"{module_fqn}.{p}" if module_fqn else p

    out: list[Target] = []
    if isinstance(module, nn.Linear):
        if host is not None:
            out.append(Target(fqn("weight"), module_fqn, module, "weight", "mha_out", host=host))
        else:
            out.append(Target(fqn("weight"), module_fqn, module, "weight", "linear"))
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        out.append(Target(fqn("weight"), module_fqn, module, "weight", "conv", groups=module.groups))
    elif isinstance(module, nn.ConvTranspose1d):
        out.append(Target(fqn("weight"), module_fqn, module, "weight", "conv_transpose", groups=module.groups))
    elif isinstance(module, nn.RNNBase):
        for name in module._flat_weights_names:  # lists parametrized weights too
            if _RNN_WEIGHT.match(name):
                out.append(Target(fqn(name), module_fqn, module, name, "rnn"))
    elif isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            out.append(Target(fqn("in_proj_weight"), module_fqn, module, "in_proj_weight", "mha_in", groups=3))
        else:
            for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                out.append(Target(fqn(p), module_fqn, module, p, "mha_" + p[0]))
    elif isinstance(module, nn.Embedding):
        out.append(Target(fqn("weight"), module_fqn, module, "weight", "embedding"))
    return out


def candidate_targets(model: nn.Module) -> list[Target]:
    """Every weight csprune knows how to prune, in ``named_modules`` order."""
    found: list[Target] = []
    hosts: dict[int, nn.Module] = {}  # id(out_proj) -> its attention (named_modules yields parents first)
    for module_fqn, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, "out_proj", None), nn.Linear):
            hosts[id(module.out_proj)] = module
        found.extend(_module_candidates(module_fqn, module, hosts.get(id(module))))
    return found


def _spec_matches(spec: TargetSpec, target: Target) -> bool:
    if isinstance(spec, type):
        return isinstance(target.module, spec)
    if spec.startswith("type:"):
        return type(target.module).__name__ == spec[5:] or any(
            c.__name__ == spec[5:] for c in type(target.module).__mro__
        )
    return fnmatch.fnmatchcase(target.fqn, spec) or fnmatch.fnmatchcase(target.module_fqn, spec)


def _names_embedding(spec: TargetSpec, target: Target) -> bool:
    """Embedding tables are pruned only when asked for: by class, type name, or a glob other than a bare '*'."""
    if isinstance(spec, type) or spec.startswith("type:"):
        return _spec_matches(spec, target)
    return spec.strip("*") != "" and _spec_matches(spec, target)


def find_targets(
    model: nn.Module,
    targets: Sequence[TargetSpec] | None = None,
    exclude: Sequence[TargetSpec] | None = None,
) -> list[Target]:
    """Resolve target selectors to the weights to prune.

    Args:
        model: the model.
        targets: selectors of tensors to prune; ``None`` selects every supported weight
            except embedding tables.
        exclude: selectors removed from the selection; a glob here may also name any
            parameter (e.g. ``"*.bias"``), so that a shared config can list it.

    Returns:
        the targets in ``named_modules`` order.

    Raises:
        ValueError: a selector matches nothing (naming it), or no prunable tensor is left.
    """
    candidates = candidate_targets(model)
    if targets is None:
        selected = [t for t in candidates if t.kind != "embedding"]
    else:
        targets = list(targets)
        for spec in targets:
            if not any(_spec_matches(spec, t) for t in candidates):
                raise ConfigError(
                    f"targets: {spec!r} matches no prunable tensor of {type(model).__name__} "
                    f"(prunable: {_preview([t.fqn for t in candidates])})"
                )
        selected = [
            t
            for t in candidates
            if any(_names_embedding(s, t) if t.kind == "embedding" else _spec_matches(s, t) for s in targets)
        ]
    if exclude:
        all_params = [n for n, _ in model.named_parameters()]
        for spec in exclude:
            hits_param = isinstance(spec, str) and not spec.startswith("type:") and any(
                fnmatch.fnmatchcase(p, spec) for p in all_params
            )
            if not hits_param and not any(_spec_matches(spec, t) for t in candidates):
                raise ConfigError(f"exclude: {spec!r} matches no parameter of {type(model).__name__}")
        selected = [t for t in selected if not any(_spec_matches(s, t) for s in exclude)]
    if not selected:
        raise ConfigError(
            f"no prunable tensor in {type(model).__name__} for targets={targets!r}, exclude={exclude!r} "
            "(supported: Linear, Conv1d/2d, ConvTranspose1d, LSTM/GRU/RNN, MultiheadAttention, Embedding)"
        )
    return selected


def _preview(names: Iterable[str], limit: int = 6) -> str:
    names = list(names)
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"
