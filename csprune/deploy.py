"""Inference on the zeros: pruned layers in the form that runs fastest, chosen per weight matrix by measurement.

A finalized model multiplies by its zeros. :func:`deploy` replaces its pruned layers (Linear, Conv1d with
``groups=1``, LSTM, MultiheadAttention) by equivalents whose weight matrices are :class:`SparseMatrix`
leaves, runs an example of the real workload once to record the input shape each matrix sees, times every
candidate form on that shape, and keeps the fastest (docs/design.md §8). Forms (:data:`FORMS`):

* ``dense``: the weight as it is (``F.linear``); the fallback whenever nothing else is faster.
* ``csr``: ``torch.sparse_csr_tensor`` with int32 indices (``torch.mv`` / ``torch.addmm`` on CSR, MKL
  sparse BLAS on CPU). It reads 8 bytes per non-zero against 4 per dense entry, so it reads less from
  about 50% sparsity on, and it is faster from about 80-85% on in batch-1 products here.
* ``semi_structured``: ``torch.sparse.to_sparse_semi_structured`` (CUDA, 2:4 masks, fp16/bf16).

Nothing multiplies by hand: every product is a torch kernel. Outputs equal the dense pruned model's up to
float32 summation order (``|Δy| <= 1e-5·max|y| + 1e-6`` in the tests).

    report = csprune.deploy.deploy(model, example=lambda m: m(x))        # a finalized, pruned model
    report = csprune.deploy.load("model.safetensors", model, example=...) # straight from a sparse checkpoint
    print(report.table())                                                  # every decision, with its timings
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, ConfigError
from .export.format import SparseParts, load_sparse_parts

__all__ = [
    "FORMS", "SparseMatrix", "DeployedLinear", "DeployedConv1d", "DeployedLSTM", "DeployedMultiheadAttention",
    "Decision", "DeployReport", "deploy", "load", "build_for_load", "as_deployed_lstm",
]

log = logging.getLogger("csprune.deploy")

FORMS = ("dense", "csr", "semi_structured")
"""The forms a :class:`SparseMatrix` can take (module docstring)."""

DEFAULT_FORMS = ("dense", "csr")  # what runs on a CPU; semi_structured is added on CUDA for 2:4 weights
MIN_SPEEDUP = 1.05  # a sparse form must beat dense by 5%: below that, timing noise decides and dense is the safe default
MIN_SPARSITY = 0.3  # below this no sparse form reads less than dense (CSR: 8 B per non-zero vs 4 B per entry)


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """torch's CSR tensor with int32 indices (half the index bytes of torch's default int64); its "beta" warning,
    once per process, says nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow.to(torch.int32), col.to(torch.int32), values, tuple(shape), check_invariants=False)


def _csr(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` dense -> CSR."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = weight.to_sparse_csr()
    return _csr_tensor(csr.crow_indices(), csr.col_indices(), csr.values(), weight.shape)


def csr_from_positions(shape: Sequence[int], positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CSR matrix from sorted flat positions of its non-zeros (a sparse checkpoint's mask), no dense copy.

    Args:
        shape: ``(out, in)``.
        positions: ``[nnz]`` int64 flat row-major indices, increasing.
        values: ``[nnz]`` the stored values at those positions.
    """
    rows, cols = int(shape[0]), int(shape[1])
    row_of = torch.div(positions, cols, rounding_mode="floor")
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(row_of, minlength=rows).cumsum(0)
    if positions.numel() and (int(positions[-1]) >= rows * cols or bool((positions[1:] <= positions[:-1]).any())):
        raise ConfigError(f"csr_from_positions: positions must increase and stay below {rows}×{cols}")
    return _csr_tensor(crow, positions % cols, values, (rows, cols))


class SparseMatrix(nn.Module):
    """One weight matrix ``W [out, in]`` (and bias ``[out]``) in one form: ``forward(x [..., in]) -> [..., out]``.

    Args:
        weight: ``[out, in]`` dense or CSR (from a checkpoint) weight.
        bias: ``[out]`` or None.
        form: one of :data:`FORMS`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, form: str = "dense"):
        super().__init__()
        if weight.dim() != 2:
            raise ConfigError(f"SparseMatrix: weight must be 2-D [out, in], got shape {list(weight.shape)}")
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.nnz = int(weight.values().count_nonzero()) if weight.layout == torch.sparse_csr else int(weight.count_nonzero())
        self.bias = None if bias is None else bias.detach()
        self._source = weight.detach()  # what the other forms are made from (dropped by keep_only)
        self.form = ""
        self.weight: torch.Tensor = weight
        self.to_form(form)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(self.shape[0] * self.shape[1], 1)

    def dense_weight(self) -> torch.Tensor:
        """``[out, in]`` the weight as a dense tensor (a copy for sparse forms)."""
        w = self._source if self._source is not None else self.weight
        return w.to_dense() if w.layout != torch.strided else w

    def to_form(self, form: str) -> "SparseMatrix":
        """Switch to ``form`` (built from the kept source)."""
        if form not in FORMS:
            raise ConfigError(f"unknown deploy form {form!r}; choose one of {FORMS}")
        if form == self.form:
            return self
        if self._source is None:
            raise ConfigError(f"SparseMatrix {self.shape}: its source was released by keep_only(); cannot switch to {form!r}")
        src = self._source
        if form == "dense":
            self.weight = src.to_dense() if src.layout != torch.strided else src
        elif form == "csr":
            self.weight = src if src.layout == torch.sparse_csr and src.crow_indices().dtype == torch.int32 else _csr(self.dense_weight())
        else:
            self.weight = _semi_structured(self.dense_weight())
        self.form = form
        return self

    def keep_only(self) -> None:
        """Release the source so only the chosen form stays in memory."""
        self._source = None

    def weight_bytes(self) -> int:
        """Bytes of weight (and bias) one call reads in this form."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        w = self.weight
        if self.form == "csr":
            return w.values().numel() * w.values().element_size() + w.col_indices().numel() * 4 + w.crow_indices().numel() * 4 + bias
        if self.form == "semi_structured":
            return self.nnz * w.dtype.itemsize * 9 // 8 + bias  # values + 2-bit metadata per kept value (approx.)
        return w.numel() * w.element_size() + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form != "csr":
            return F.linear(x, self.weight, self.bias)
        lead, rows = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 1:  # batch 1 (streaming): a sparse matrix-vector product
            y = torch.mv(self.weight, rows[0]) if self.bias is None else torch.addmv(self.bias, self.weight, rows[0])
            return y.reshape(*lead, self.shape[0])
        # CSR [out, in] @ [in, n]: torch's sparse-dense product wants the sparse operand first
        y = torch.mm(self.weight, rows.t()) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, rows.t())
        return y.t().reshape(*lead, self.shape[0])

    def extra_repr(self) -> str:
        return f"{self.shape[1]} -> {self.shape[0]}, form={self.form}, sparsity={self.sparsity:.3f}"


def _semi_structured(weight: torch.Tensor) -> torch.Tensor:
    if not weight.is_cuda:
        raise ConfigError("deploy form 'semi_structured' needs a CUDA weight (torch's 2:4 kernels are GPU-only)")
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(weight)


def _is_2_4(weight: torch.Tensor) -> bool:
    if weight.shape[-1] % 4:
        return False
    return bool(weight.reshape(-1, 4).ne(0).sum(1).le(2).all())


# ---------------------------------------------------------------------------------------------- layers


class DeployedLinear(nn.Module):
    """``nn.Linear`` with its weight a :class:`SparseMatrix`."""

    def __init__(self, matrix: SparseMatrix):
        super().__init__()
        self.matrix = matrix

    @classmethod
    def from_module(cls, module: nn.Linear, weight: torch.Tensor | None = None) -> "DeployedLinear":
        w = module.weight.detach() if weight is None else weight
        return cls(SparseMatrix(w, None if module.bias is None else module.bias.detach(), _initial_form(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x)


class DeployedConv1d(nn.Module):
    """``nn.Conv1d`` (``groups=1``, zero padding) as an unfolded product: ``[B, C·k, T']`` windows times ``W [O, C·k]``.

    Pointwise convolutions (``k=1``) are a plain product over ``B·T`` rows.
    """

    def __init__(self, matrix: SparseMatrix, kernel: int, stride: int, padding: int, dilation: int):
        super().__init__()
        self.matrix, self.kernel, self.stride, self.padding, self.dilation = matrix, kernel, stride, padding, dilation

    @staticmethod
    def supports(module: nn.Module) -> bool:
        return (type(module) is nn.Conv1d and module.groups == 1 and module.padding_mode == "zeros"
                and isinstance(module.padding, tuple))

    @classmethod
    def from_module(cls, module: nn.Conv1d, weight: torch.Tensor | None = None) -> "DeployedConv1d":
        w = module.weight.detach().reshape(module.out_channels, -1) if weight is None else weight
        matrix = SparseMatrix(w, None if module.bias is None else module.bias.detach(), _initial_form(w))
        return cls(matrix, module.kernel_size[0], module.stride[0], module.padding[0], module.dilation[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``[B, C, T]``. Returns ``[B, O, T']``."""
        if self.padding:
            x = F.pad(x, (self.padding, self.padding))
        if self.kernel == 1:
            windows = x[:, :, :: self.stride].transpose(1, 2)  # [B, T', C]
        else:
            span = self.dilation * (self.kernel - 1) + 1
            windows = x.unfold(2, span, self.stride)[..., :: self.dilation]  # [B, C, T', k]
            windows = windows.permute(0, 2, 1, 3).reshape(x.shape[0], windows.shape[2], -1)  # [B, T', C·k]
        return self.matrix(windows).transpose(1, 2)


class DeployedLSTM(nn.Module):
    """``nn.LSTM`` (batch_first or not, any layers/directions, no projections) with :class:`SparseMatrix` gates.

    Each layer and direction has ``ih`` (``W_ih [4H, in]``, bias ``b_ih + b_hh``) and ``hh`` (``W_hh [4H, H]``).
    :meth:`forward` runs a whole sequence (the input products of all steps at once); :meth:`step` advances one
    time step, for streaming. While every matrix is dense, :meth:`forward` calls torch's fused LSTM instead.
    """

    def __init__(self, module: nn.LSTM, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if module.proj_size:
            raise ConfigError("DeployedLSTM: LSTMs with proj_size are not supported")
        weights = weights or {}
        self.hidden_size, self.num_layers, self.batch_first = module.hidden_size, module.num_layers, module.batch_first
        self.directions = 2 if module.bidirectional else 1
        self.fused = module  # kept for the all-dense sequence path (same weights, fused kernel)
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        for layer in range(self.num_layers):
            for direction in range(self.directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                w_ih = weights.get("weight_ih" + sfx, getattr(module, "weight_ih" + sfx).detach())
                w_hh = weights.get("weight_hh" + sfx, getattr(module, "weight_hh" + sfx).detach())
                bias = None
                if module.bias:
                    bias = (getattr(module, "bias_ih" + sfx) + getattr(module, "bias_hh" + sfx)).detach()
                self.ih.append(SparseMatrix(w_ih, bias, _initial_form(w_ih)))
                self.hh.append(SparseMatrix(w_hh, None, _initial_form(w_hh)))
        if weights:  # the fused path would read the module's own (not loaded) weights
            self.fused = None

    def _all_dense(self) -> bool:
        return self.fused is not None and all(m.form == "dense" for m in [*self.ih, *self.hh])

    def release_fused(self) -> None:
        """Drop the fused module once a sparse form is chosen (its dense weights would double the memory)."""
        if not self._all_dense():
            self.fused = None

    def init_state(self, batch: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero ``(h, c)`` per layer·direction, each ``[batch, H]``."""
        zero = like.new_zeros(batch, self.hidden_size)
        return [(zero, zero) for _ in range(self.num_layers * self.directions)]

    def _cell(self, index: int, gates_x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One LSTM cell from the input's gate pre-activations ``[B, 4H]`` (gate order i, f, g, o as torch's)."""
        h, c = state
        hh = self.hh[index]
        if hh.form == "csr" and h.shape[0] == 1:  # batch 1: the recurrent product accumulates into the gates (one op)
            gates = torch.addmv(gates_x[0], hh.weight, h[0]).unsqueeze(0)
        else:
            gates = gates_x + hh(h)
        act = torch.sigmoid(gates)  # all four gates in one op; g's sigmoid is unused (fewer ops beat less arithmetic here)
        size = self.hidden_size
        i, f, o = act[:, :size], act[:, size: 2 * size], act[:, 3 * size:]
        c = torch.addcmul(f * c, i, torch.tanh(gates[:, 2 * size: 3 * size]))
        return o * torch.tanh(c), c

    def step(self, x: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """One time step of a unidirectional LSTM.

        Args:
            x: ``[B, in]``.
            state: from :meth:`init_state` or the previous step (None: zeros).

        Returns:
            ``(h of the last layer [B, H], new state)``.
        """
        if self.directions != 1:
            raise ConfigError("DeployedLSTM.step: a bidirectional LSTM cannot run step by step (it needs the future)")
        state = state if state is not None else self.init_state(x.shape[0], x)
        new_state = []
        for layer in range(self.num_layers):
            ih, hh = self.ih[layer], self.hh[layer]
            if ih.form == "dense" and hh.form == "dense":  # torch's fused cell: products and gates in one op
                h, c = torch.lstm_cell(x, state[layer], ih.weight, hh.weight, ih.bias, None)
            else:
                h, c = self._cell(layer, ih(x), state[layer])
            new_state.append((h, c))
            x = h
        return x, new_state

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Same contract as ``nn.LSTM.forward`` (no packed sequences)."""
        if self._all_dense():
            return self.fused(x, hx)
        seq = x if self.batch_first else x.transpose(0, 1)  # [B, T, in]
        batch, steps = seq.shape[0], seq.shape[1]
        states = self.init_state(batch, seq) if hx is None else list(zip(hx[0].unbind(0), hx[1].unbind(0)))
        h_out, c_out = [], []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.directions):
                index = layer * self.directions + direction
                gates_x = self.ih[index](seq)  # [B, T, 4H]: every step's input product at once
                state = states[index]
                hs = [None] * steps
                order = range(steps - 1, -1, -1) if direction else range(steps)
                for t in order:
                    state = self._cell(index, gates_x[:, t], state)
                    hs[t] = state[0]
                outs.append(torch.stack(hs, dim=1))
                h_out.append(state[0])
                c_out.append(state[1])
            seq = outs[0] if self.directions == 1 else torch.cat(outs, dim=-1)
        out = seq if self.batch_first else seq.transpose(0, 1)
        return out, (torch.stack(h_out), torch.stack(c_out))


def as_deployed_lstm(module: nn.Module) -> DeployedLSTM:
    """``module`` itself if already a :class:`DeployedLSTM`, else a dense-form one of the ``nn.LSTM``
    (what a streaming decoder steps through, deployed or not)."""
    if isinstance(module, DeployedLSTM):
        return module
    if not isinstance(module, nn.LSTM):
        raise ConfigError(f"expected an nn.LSTM or DeployedLSTM, got {type(module).__name__}")
    lstm = DeployedLSTM(module)
    for m in [*lstm.ih, *lstm.hh]:
        m.to_form("dense")
    return lstm


class DeployedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed in-projection, no bias_k/v, eval) with :class:`SparseMatrix` projections.

    The in-projection is one ``[3E, E]`` matrix: self-attention (query, key and value the same tensor) runs
    it once; otherwise each input runs it and keeps its third. Attention itself is
    ``F.scaled_dot_product_attention``.
    """

    def __init__(self, module: nn.MultiheadAttention, weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            raise ConfigError("DeployedMultiheadAttention: needs a packed in_proj_weight, no bias_k/bias_v, no add_zero_attn")
        weights = weights or {}
        self.embed_dim, self.num_heads, self.batch_first = module.embed_dim, module.num_heads, module.batch_first
        in_w = weights.get("in_proj_weight", module.in_proj_weight.detach())
        out_w = weights.get("out_proj.weight", module.out_proj.weight.detach())
        in_b = None if module.in_proj_bias is None else module.in_proj_bias.detach()
        out_b = None if module.out_proj.bias is None else module.out_proj.bias.detach()
        self.in_proj = SparseMatrix(in_w, in_b, _initial_form(in_w))
        self.out_proj = SparseMatrix(out_w, out_b, _initial_form(out_w))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Same contract as ``nn.MultiheadAttention.forward`` with ``need_weights=False`` (returns ``(out, None)``)."""
        if need_weights:
            raise ConfigError("DeployedMultiheadAttention: need_weights=True is not supported (it runs fused attention)")
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        steps, batch, embed = query.shape  # [T, B, E]
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q = self.in_proj(query)[..., :embed]
            k = self.in_proj(key)[..., embed: 2 * embed]
            v = self.in_proj(value)[..., 2 * embed:]
        heads, head_dim = self.num_heads, embed // self.num_heads
        split = lambda t: t.reshape(t.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)  # noqa: E731  [B, h, T, d]
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask.bool()[:, None, None, :]  # True = attend
        if attn_mask is not None:
            extra = ~attn_mask.bool() if attn_mask.dtype == torch.bool else attn_mask
            mask = extra if mask is None else (mask & extra if extra.dtype == torch.bool else extra.masked_fill(~mask, -math.inf))
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, is_causal=is_causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(steps, batch, embed))
        return (out.transpose(0, 1) if self.batch_first else out), None


def _initial_form(weight: torch.Tensor) -> str:
    return "csr" if weight.layout == torch.sparse_csr else "dense"


# ------------------------------------------------------------------------------------- choice by measurement


@dataclass
class Decision:
    """What :func:`deploy` chose for one weight matrix, and why."""

    name: str  # module fqn + matrix ("encoder.lstm.ih0")
    kind: str  # linear | conv1d | lstm | attention
    shape: tuple[int, int]
    sparsity: float
    rows: int  # rows of the input it was timed on (1 = matrix-vector)
    calls: int  # calls seen in the example
    micros: dict[str, float]  # form -> median µs per call
    form: str
    bytes_dense: int
    bytes_chosen: int

    @property
    def speedup(self) -> float:
        return self.micros["dense"] / self.micros[self.form]


@dataclass
class DeployReport:
    """Every decision of one :func:`deploy` call (``decisions``), and modules left as they were (``skipped``)."""

    decisions: list[Decision] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # fqn -> reason

    def forms(self) -> Counter:
        return Counter(d.form for d in self.decisions)

    def table(self) -> str:
        lines = ["| matrix | kind | shape | sparsity | rows | " + " | ".join(f"{f} µs" for f in DEFAULT_FORMS) + " | chosen |",
                 "|---|---|---|---|---|" + "---|" * len(DEFAULT_FORMS) + "---|"]
        for d in self.decisions:
            times = " | ".join(f"{d.micros[f]:.1f}" if f in d.micros else "-" for f in DEFAULT_FORMS)
            lines.append(f"| {d.name} | {d.kind} | {d.shape[0]}×{d.shape[1]} | {d.sparsity:.3f} | {d.rows} | {times} | {d.form} |")
        return "\n".join(lines)


def _kind(module: nn.Module) -> str | None:
    if type(module) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "linear"
    if DeployedConv1d.supports(module):
        return "conv1d"
    if type(module) is nn.LSTM and not module.proj_size:
        return "lstm"
    if type(module) is nn.MultiheadAttention and module._qkv_same_embed_dim and module.bias_k is None:
        return "attention"
    return None


def _weight_names(kind: str, module: nn.Module) -> list[str]:
    if kind in ("linear", "conv1d"):
        return ["weight"]
    if kind == "attention":
        return ["in_proj_weight", "out_proj.weight"]
    return [name for name, _ in module.named_parameters() if name.startswith("weight_")]


def _build(kind: str, module: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    if kind == "linear":
        return DeployedLinear.from_module(module, weights.get("weight"))
    if kind == "conv1d":
        return DeployedConv1d.from_module(module, weights.get("weight"))
    if kind == "lstm":
        return DeployedLSTM(module, weights)
    return DeployedMultiheadAttention(module, weights)


def _sparsity_of(tensors: Iterable[torch.Tensor]) -> float:
    total = nonzero = 0
    for t in tensors:
        total += t.numel() if t.layout == torch.strided else t.shape[0] * t.shape[1]
        nonzero += int(t.count_nonzero()) if t.layout == torch.strided else int(t.values().count_nonzero())
    return 1.0 - nonzero / max(total, 1)


def _median_micros(fn: Callable[[], Any], budget_s: float) -> float:
    """Median µs per call of ``fn`` over 5 rounds sized to ``budget_s`` in all (after a warm-up)."""
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(budget_s / 5 / once))
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(rounds)[2]


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _matrices(module: nn.Module) -> list[tuple[str, SparseMatrix]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, SparseMatrix)]


@torch.no_grad()
def deploy(model: nn.Module, example: Callable[[nn.Module], Any] | None = None, *, forms: Sequence[str] | None = None,
           min_speedup: float = MIN_SPEEDUP, min_sparsity: float = MIN_SPARSITY, budget_s: float = 0.02,
           _weights: dict[str, dict[str, torch.Tensor]] | None = None) -> DeployReport:
    """Replace the pruned layers of ``model`` (in place) by the fastest form of each weight matrix.

    Args:
        model: a finalized model (plain modules, exact zeros), in eval mode for the example.
        example: runs ``model`` on a representative workload (``lambda m: m(x)``, a streaming decode ...). It
            is run once with every candidate matrix dense, to record the input each matrix sees; each matrix
            is then timed on its most frequent input shape. None: every matrix is timed on one row
            (batch-1 matrix-vector products).
        forms: candidate forms (default: dense and csr; semi_structured is added on CUDA for 2:4 weights).
            Dense is always timed, for the report; leaving it out forces a sparse form (tests, benchmarks).
        min_speedup: a form other than dense must be this much faster than dense to be chosen.
        min_sparsity: layers sparser than this are candidates; the others stay as they are (logged).
        budget_s: timing budget per form per matrix.

    Returns:
        The :class:`DeployReport`; every decision is also logged (logger ``csprune.deploy``, INFO).
    """
    forms = tuple(forms) if forms is not None else None
    for form in forms or ():
        if form not in FORMS:
            raise ConfigError(f"deploy forms: unknown {form!r}; choose from {FORMS}")
    report = DeployReport()
    candidates: dict[str, tuple[str, nn.Module]] = {}
    claimed: list[str] = []  # every supported module seen: its children are never deployed alone (MHA reads out_proj.weight)
    for fqn, module in list(model.named_modules()):
        kind = _kind(module)
        if kind is None or any(fqn.startswith(prefix + ".") for prefix in claimed):
            continue
        claimed.append(fqn)
        weights = (_weights or {}).get(fqn, {})
        tensors = [weights.get(n) if n in weights else module.get_parameter(n) for n in _weight_names(kind, module)]
        sparsity = _sparsity_of(tensors)
        if sparsity < min_sparsity and not weights:
            report.skipped[fqn] = f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"
            log.info("deploy %s (%s): kept as is, sparsity %.3f < %.2f", fqn, kind, sparsity, min_sparsity)
            continue
        deployed = _build(kind, module, weights)
        candidates[fqn] = (kind, deployed)
        _replace(model, fqn, deployed)
    # Record the inputs each matrix sees, all of them dense, in the real workload.
    seen: dict[SparseMatrix, Counter] = {}
    hooks = []
    for _, (_, deployed) in candidates.items():
        for _, matrix in _matrices(deployed):
            matrix.to_form("dense")
            seen[matrix] = Counter()
            hooks.append(matrix.register_forward_pre_hook(
                lambda mod, args: seen[mod].update([(tuple(args[0].reshape(-1, args[0].shape[-1]).shape), args[0].dtype, args[0].device)])))
    try:
        if example is not None:
            example(model)
    finally:
        for hook in hooks:
            hook.remove()
    for fqn, (kind, deployed) in candidates.items():
        for name, matrix in _matrices(deployed):
            report.decisions.append(_choose(f"{fqn}.{name}", kind, matrix, seen[matrix], forms, min_speedup, budget_s))
        if isinstance(deployed, DeployedLSTM):
            deployed.release_fused()
    return report


def _choose(name: str, kind: str, matrix: SparseMatrix, seen: Counter, forms: tuple[str, ...] | None,
            min_speedup: float, budget_s: float) -> Decision:
    device = matrix.weight.device
    if seen:
        (rows_in, dtype, device), calls = seen.most_common(1)[0]
        rows = rows_in[0]
    else:
        rows, dtype, calls = 1, matrix.weight.dtype, 0
    candidates = forms or DEFAULT_FORMS + (("semi_structured",) if device.type == "cuda" else ())  # dense is always timed
    x = torch.randn(rows, matrix.shape[1], dtype=dtype, device=device)
    micros, sizes = {}, {}
    for form in ("dense",) + tuple(f for f in candidates if f != "dense"):
        if form == "semi_structured" and (device.type != "cuda" or not _is_2_4(matrix.dense_weight())):
            continue
        matrix.to_form(form)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        micros[form] = _median_micros(lambda: (matrix(x), sync()), budget_s)
        sizes[form] = matrix.weight_bytes()
    allowed = {f: t for f, t in micros.items() if f in candidates}
    if not allowed:
        raise ConfigError(f"deploy {name}: none of the forms {candidates} applies to this matrix")
    best = min(allowed, key=allowed.get)
    if best != "dense" and "dense" in candidates and micros["dense"] < min_speedup * micros[best]:
        best = "dense"
    matrix.to_form(best)
    matrix.keep_only()
    decision = Decision(name, kind, matrix.shape, matrix.sparsity, rows, calls, micros, best, sizes["dense"], sizes[best])
    log.info("deploy %s (%s %d×%d, sparsity %.3f, %d-row input): %s -> %s (%.2f× dense)", name, kind, *matrix.shape,
             matrix.sparsity, rows, ", ".join(f"{f} {t:.1f} µs" for f, t in micros.items()), best, decision.speedup)
    return decision


META_BUILD_MIN_BYTES = 256 << 20  # building on "meta" costs ~160 MB once (torch's meta init kernels import sympy/mpmath)


def build_for_load(path: Any, factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` under ``torch.device("meta")`` when the checkpoint's dense tensors would take at least
    :data:`META_BUILD_MIN_BYTES` (its dense weights are then never allocated), else on the CPU: for a smaller
    model the meta device's one-time cost exceeds the dense weights it saves."""
    from .export.format import read_sparse_header

    header = read_sparse_header(path)
    dense_bytes = sum(info.numel * torch.empty((), dtype=_dtype_of(info.dtype)).element_size()
                      for info in header.tensors.values())
    with torch.device("meta" if dense_bytes >= META_BUILD_MIN_BYTES else "cpu"):
        return factory()


def _dtype_of(name: str) -> torch.dtype:
    from .export.format import _TORCH_DTYPES

    return _TORCH_DTYPES[name]


def load(path: Any, model: nn.Module, example: Callable[[nn.Module], Any] | None = None, *, verify: bool | str = True,
         **deploy_kwargs: Any) -> DeployReport:
    """Load a sparse checkpoint straight into the deployed form (a documented one-liner for ``load_sparse`` + :func:`deploy`).

    Weights stored sparse in the file become CSR matrices from their stored positions and values, never a
    dense copy of the whole model; int8-stored values are dequantized per row, exactly as ``load_sparse``
    returns them. Everything else is loaded into ``model`` as ``load_sparse(path, model=model)`` would.

    Args:
        path: a file written by ``csprune.save_sparse``.
        model: the architecture the file was saved from (its own weights are replaced). Built under
            ``with torch.device("meta"):`` its dense weights are never allocated at all (:func:`build_for_load`
            does that for large models).
        example, **deploy_kwargs: as for :func:`deploy`.
        verify: as for ``csprune.load_sparse``.
    """
    parts, path_str = load_sparse_parts(path, verify=verify), str(path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(parts)), sorted(set(parts) - set(own))
    if missing or unexpected:
        raise CheckpointError(path_str, f"does not match the model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    sparse_weights: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, module in model.named_modules():
        kind = _kind(module)
        if kind is None or fqn in sparse_weights:
            continue
        for wname in _weight_names(kind, module):
            key = f"{fqn}.{wname}" if fqn else wname
            item = parts.get(key)
            if isinstance(item, SparseParts) and tuple(item.shape) == tuple(own[key].shape):
                rows, cols = own[key].shape[0], own[key].numel() // own[key].shape[0]
                sparse_weights.setdefault(fqn, {})[wname] = csr_from_positions((rows, cols), item.positions, item.values.to(own[key].dtype))
    as_csr = {f"{fqn}.{w}" if fqn else w for fqn, ws in sparse_weights.items() for w in ws}
    dense_state = {k: (v.to_dense() if isinstance(v, SparseParts) else v) for k, v in parts.items() if k not in as_csr}
    for name, tensor in dense_state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
                raise CheckpointError(path_str, f"shape {list(tensor.shape)} does not match the model's {list(own[name].shape)}", name)
    # A model built under torch.device("meta") takes the loaded tensors as they are: its dense weights never exist.
    model.load_state_dict(dense_state, strict=False, assign=any(t.is_meta for t in model.state_dict().values()))
    return deploy(model, example, _weights=sparse_weights, **deploy_kwargs)

