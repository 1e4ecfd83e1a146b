"""Input statistics of target layers, gathered by forward hooks.

For each target the collector accumulates, per row group,

* ``full`` mode: ``S = Σ x xᵀ`` ([g, n, n]) and the sample count, so that
  ``G = S / count = E[x xᵀ]`` is the activation Gram matrix CSP senses with;
* ``diag`` mode: only ``Σ x²`` ([g, n]), all that Wanda needs (‖x_j‖).

Here ``x`` is the input one output row reads: a Linear's input vector, an unfolded
conv patch (positions subsampled to bound the cost), the query/key/value of an
attention in-projection, an attention's concatenated heads (the input of its
``out_proj``), an RNN's layer input (``weight_ih_l0``) or output (``weight_hh`` of
the last layer). ``MultiheadAttention`` never calls its ``out_proj`` as a module, so
that input is recomputed in a hook on the attention (:func:`attention_heads`).
Tensors whose inputs a hook cannot see (inner RNN layers, transposed convs) simply
have no statistics: callers fall back to magnitude (identity sensing) and say so.

Sums are kept in float64 so long windows do not lose precision; under DDP they are
all-reduced (:meth:`InputStats.all_reduce`) so every rank computes the same masks.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .targets import Target
from .errors import ConfigError, NumericalError

__all__ = ["InputStats", "gram_block_size", "attention_heads"]


class _Accumulator:
    """Running Σxxᵀ (or Σx²) and counts for one target, per row group.

    With ``block`` set (full mode only), only the block diagonal of each group's Gram is kept:
    the n inputs are cut into n/block contiguous column blocks and the sum has shape
    [groups·n/block, block, block] (group-major), i.e. n·block instead of n² numbers per group.
    """

    def __init__(self, groups: int, n: int, full: bool, device: torch.device, block: int | None = None):
        self.groups, self.n, self.full = groups, n, full
        self.block = block if (full and block and block < n) else None
        if self.block:
            nb = n // self.block
            shape = (groups * nb, self.block, self.block)
        else:
            shape = (groups, n, n) if full else (groups, n)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros(groups, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, group: int | None = None) -> None:
        """Add samples.

        Args:
            x: [N, n] samples for one group (``group`` given) or [N, g, n] for all groups.
            group: group index, or None when ``x`` carries every group.
        """
        x = x.detach().float()
        if self.block:
            b = self.block
            if group is None:
                xb = x.reshape(x.shape[0], -1, b)  # [N, g·nb, b], group-major like self.sum
                self.sum += torch.einsum("bki,bkj->kij", xb, xb).double()
                self.count += x.shape[0]
            else:
                nb = self.n // b
                xb = x.reshape(x.shape[0], nb, b)
                self.sum[group * nb:(group + 1) * nb] += torch.einsum("bki,bkj->kij", xb, xb).double()
                self.count[group] += x.shape[0]
            return
        if group is None:
            if self.full:
                self.sum += torch.einsum("bgi,bgj->gij", x, x).double()
            else:
                self.sum += (x * x).sum(0).double()
            self.count += x.shape[0]
        else:
            if self.full:
                self.sum[group] += (x.T @ x).double()
            else:
                self.sum[group] += (x * x).sum(0).double()
            self.count[group] += x.shape[0]

    def per_row_group_count(self) -> torch.Tensor:
        """Counts aligned with the leading dim of ``sum`` ([g] or [g·nb])."""
        if self.block:
            return self.count.repeat_interleave(self.n // self.block)
        return self.count


def gram_block_size(n: int, groups: int, max_bytes: int | None, multiple: int = 1, fqn: str = "?") -> int | None:
    """Column block size that keeps a target's float64 Gram accumulator under ``max_bytes``.

    The full accumulator takes ``8·g·n²`` bytes; a block diagonal with blocks of ``b`` columns
    takes ``8·g·n·b``. ``b`` is the largest divisor of ``n`` that is a multiple of ``multiple``
    (the M of an N:M pattern, so pattern groups never straddle blocks) and fits.

    Args:
        n: row width (number of inputs).
        groups: row groups of the target (one Gram each).
        max_bytes: the cap (None or 0: no cap).
        multiple: the block size must be a multiple of this.
        fqn: target name, for the error message.

    Returns:
        None when the full Gram fits (or there is no cap), else the block size.

    Raises:
        ValueError: not even the smallest allowed block fits under the cap.
    """
    if not max_bytes or 8 * groups * n * n <= max_bytes:
        return None
    fits = [b for b in range(multiple, n, multiple) if n % b == 0 and 8 * groups * n * b <= max_bytes]
    if not fits:
        smallest = multiple if n % multiple == 0 and multiple < n else n
        raise ConfigError(f"max_gram_bytes={max_bytes}: the Gram of {fqn} ([{groups}, {n}, {n}]) cannot be blocked under "
                         f"the cap; the smallest allowed block ({smallest} columns) needs {8 * groups * n * smallest} bytes")
    return max(fits)


def _subsample(x: torch.Tensor, limit: int) -> torch.Tensor:
    """Deterministic strided subsample of the leading dim to at most ``limit`` rows (no RNG state)."""
    n = x.shape[0]
    if n <= limit:
        return x
    stride = math.ceil(n / limit)
    return x[::stride]


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfold a conv input into patches.

    Args:
        module: the conv.
        x: [B, C, L] (Conv1d) or [B, C, H, W] (Conv2d); unbatched inputs are accepted.

    Returns:
        [B·positions, g, C/g·prod(kernel)], ordered like ``weight.reshape(out, -1)``.
    """
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, module.kernel_size[0]), (1, module.stride[0]), (1, module.dilation[0])
        pad = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    else:
        kernel, stride, dilation, pad = module.kernel_size, module.stride, module.dilation, module.padding
    if isinstance(pad, str):  # "same" / "valid"
        if pad == "valid":
            pad = (0, 0)
        else:
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            x = F.pad(x, (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2))
            pad = (0, 0)
    if module.padding_mode != "zeros" and any(pad):
        mode = "circular" if module.padding_mode == "circular" else module.padding_mode
        x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]), mode=mode)
        pad = (0, 0)
    cols = F.unfold(x, kernel, dilation=dilation, padding=pad, stride=stride)  # [B, C·k, P]
    b, ck, p = cols.shape
    g = module.groups
    return cols.permute(0, 2, 1).reshape(b * p, g, ck // g)


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")  # positional order of MultiheadAttention.forward


def attention_heads(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input of ``mha.out_proj`` for one call ``mha(*args, **kwargs)``: the concatenated heads.

    ``MultiheadAttention`` passes ``out_proj.weight`` to the attention function instead of calling
    ``out_proj``, so no hook on the Linear ever fires. This recomputes the call with an identity
    output projection and no output bias: same query/key/value, the (masked) in-projection weights
    and biases, ``bias_k``/``bias_v``, ``add_zero_attn``, ``key_padding_mask``, ``attn_mask`` and
    ``is_causal``, and ``batch_first`` handled as ``MultiheadAttention.forward`` does. Attention
    dropout is left out (``training=False``): in eval mode it is off anyway; in train mode the
    statistics are those of the dropout-free attention, the input the pruned layer sees at inference
    (re-drawing the forward's own dropout mask is not possible from a hook). ``need_weights`` and
    ``average_attn_weights`` only change the returned weights, not the heads. Run under ``no_grad``.

    Args:
        mha: the attention.
        args: positional arguments of the call (query [L, N, E] or [N, L, E] with ``batch_first``,
            or unbatched [L, E]; key/value [S, N, kdim/vdim] likewise; then the optional arguments).
        kwargs: keyword arguments of the call.

    Returns:
        [N·L, E] (batched) or [L, E] (unbatched) rows, one per query position; None for nested inputs.
    """
    call = dict(zip(_MHA_ARGS, args))
    call.update({k: v for k, v in kwargs.items() if k in _MHA_ARGS})
    query, key, value = call.get("query"), call.get("key"), call.get("value")
    if query is None or key is None or value is None or any(t.is_nested for t in (query, key, value)):
        return None
    if mha.batch_first and query.dim() == 3:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e = mha.embed_dim
    eye = torch.eye(e, dtype=query.dtype, device=query.device)
    separate = not mha._qkv_same_embed_dim
    with torch.no_grad():
        heads, _ = F.multi_head_attention_forward(
            query, key, value, e, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
            mha.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=call.get("key_padding_mask"),
            need_weights=False, attn_mask=call.get("attn_mask"), use_separate_proj_weight=separate,
            q_proj_weight=mha.q_proj_weight if separate else None, k_proj_weight=mha.k_proj_weight if separate else None,
            v_proj_weight=mha.v_proj_weight if separate else None, is_causal=bool(call.get("is_causal", False)))
    return heads.reshape(-1, e)


class InputStats:
    """Forward-hook collector of per-target input statistics.

    Args:
        targets: the targets to observe.
        mode: "full" (Gram matrices, for CSP) or "diag" (squared norms, for Wanda).
        max_positions: cap on samples taken from one forward call of one module;
            conv patches and long sequences are strided down to it, so a window of
            a few batches costs a bounded amount whatever the input size (4096 keeps
            a 1024-wide Gram update under ~10 GFLOP).
        max_gram_bytes: cap on one target's float64 Gram accumulator ("full" mode); a target
            whose ``8·g·n²`` bytes exceed it keeps only a block diagonal of column blocks
            (:func:`gram_block_size`), and :meth:`gram` returns ``[g·n/b, b, b]``. None: no cap.
        block_multiple: block sizes are multiples of this (the M of an N:M pattern).

    Collection is off until :attr:`enabled` is set; the hooks stay registered
    and return at once while disabled, so toggling costs nothing.
    """

    def __init__(self, targets: list[Target], mode: str = "full", max_positions: int = 4096,
                 max_gram_bytes: int | None = None, block_multiple: int = 1):
        if mode not in ("full", "diag"):
            raise ConfigError(f"mode={mode!r}: expected 'full' or 'diag'")
        if max_gram_bytes is not None and max_gram_bytes < 0:
            raise ConfigError(f"max_gram_bytes={max_gram_bytes}: must be >= 0 (0 or None: no cap)")
        self.targets = targets
        self.mode = mode
        self.max_positions = max_positions
        self.max_gram_bytes = max_gram_bytes
        # fqn -> column block size of its block-diagonal Gram (absent: full Gram); fixed up front so the
        # statistics' shapes never depend on which batches were seen.
        self.blocks: dict[str, int] = {}
        if mode == "full":
            for t in targets:
                b = gram_block_size(t.row_shape[1], t.groups, max_gram_bytes, block_multiple, t.fqn)
                if b is not None:
                    self.blocks[t.fqn] = b
        self.enabled = False
        self._acc: dict[str, _Accumulator] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "InputStats":
        """Register one hook per module that owns observable targets."""
        by_module: dict[int, list[Target]] = {}
        modules: dict[int, nn.Module] = {}
        for t in self.targets:
            owner = t.module if t.host is None else t.host  # an out_proj is observed on its attention
            by_module.setdefault(id(owner), []).append(t)
            modules[id(owner)] = owner
        for key, targets in by_module.items():
            module = modules[key]
            observer = self._observer(module, targets)
            if observer is None:
                continue
            fn, kind = observer
            if kind == "pre":
                h = module.register_forward_pre_hook(fn, with_kwargs=True)
            else:
                h = module.register_forward_hook(fn, with_kwargs=True)
            self._handles.append(h)
        return self

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _acc_for(self, target: Target, n: int, device: torch.device) -> _Accumulator:
        acc = self._acc.get(target.fqn)
        if acc is None:
            acc = _Accumulator(target.groups, n, self.mode == "full", device, self.blocks.get(target.fqn))
            self._acc[target.fqn] = acc
        return acc

    def _observer(self, module: nn.Module, targets: list[Target]) -> tuple[Callable, str] | None:
        cap = lambda x: _subsample(x, self.max_positions)  # noqa: E731
        t0 = targets[0]
        if t0.kind == "linear":

            def linear_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if self.enabled and args:
                    x = args[0]
                    x = cap(x.reshape(-1, x.shape[-1]))
                    self._acc_for(t0, x.shape[-1], x.device).add(x, 0)

            return linear_hook, "pre"
        if t0.kind == "conv":

            def conv_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if self.enabled and args:
                    patches = cap(_conv_patches(mod, args[0]))
                    self._acc_for(t0, patches.shape[-1], patches.device).add(patches)

            return conv_hook, "pre"
        if t0.kind.startswith("mha"):

            def mha_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if not self.enabled:
                    return
                names = ("query", "key", "value")
                qkv = [args[i] if len(args) > i else kwargs.get(names[i]) for i in range(3)]
                flat = {}
                for i, x in enumerate(qkv):
                    if x is None:
                        continue
                    key = id(x)
                    if key not in flat:
                        flat[key] = cap(x.reshape(-1, x.shape[-1]))
                for t in targets:
                    if t.kind == "mha_out":
                        heads = attention_heads(mod, args, kwargs)
                        if heads is not None:
                            heads = cap(heads)
                            self._acc_for(t, heads.shape[-1], heads.device).add(heads, 0)
                    elif t.kind == "mha_in":
                        for i, x in enumerate(qkv):
                            if x is not None:
                                xs = flat[id(x)]
                                self._acc_for(t, xs.shape[-1], xs.device).add(xs, i)
                    else:
                        x = qkv["qkv".index(t.kind[-1])]
                        if x is not None:
                            xs = flat[id(x)]
                            self._acc_for(t, xs.shape[-1], xs.device).add(xs, 0)

            return mha_hook, "pre"
        if t0.kind == "rnn":
            rnn: nn.RNNBase = module
            directions = 2 if rnn.bidirectional else 1
            last = rnn.num_layers - 1
            h_out = rnn.proj_size if getattr(rnn, "proj_size", 0) else rnn.hidden_size
            observable = {}
            for t in targets:
                part, layer, reverse = t.param_name.split("_")[1], int(t.param_name.split("_l")[1].split("_")[0]), t.param_name.endswith("_reverse")
                if part == "ih" and layer == 0:
                    observable[t.fqn] = ("input", 0)
                elif part == "hh" and layer == last:
                    observable[t.fqn] = ("output", int(reverse))
            if not observable:
                return None

            def rnn_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                if not self.enabled or not args:
                    return
                x_in = args[0]
                x_in = x_in.data if isinstance(x_in, nn.utils.rnn.PackedSequence) else x_in
                y = output[0]
                y = y.data if isinstance(y, nn.utils.rnn.PackedSequence) else y
                for t in targets:
                    src = observable.get(t.fqn)
                    if src is None:
                        continue
                    if src[0] == "input":
                        x = x_in.reshape(-1, x_in.shape[-1])
                    else:
                        d = src[1]
                        x = y.reshape(-1, directions * h_out)[:, d * h_out:(d + 1) * h_out]
                    x = cap(x)
                    self._acc_for(t, x.shape[-1], x.device).add(x, 0)

            return rnn_hook, "post"
        return None  # conv_transpose, embedding: inputs not observed

    # ------------------------------------------------------------ statistics
    def observed(self, target: Target) -> bool:
        """Whether every row group of ``target`` has at least one sample."""
        acc = self._acc.get(target.fqn)
        return acc is not None and bool((acc.count > 0).all())

    def _mean(self, target: Target) -> torch.Tensor | None:
        acc = self._acc.get(target.fqn)
        if acc is None or not bool((acc.count > 0).all()):
            return None
        if not torch.isfinite(acc.sum).all():
            raise NumericalError(f"input statistics of {target.fqn} contain NaN/Inf (non-finite activations)")
        shape = (-1,) + (1,) * (acc.sum.dim() - 1)
        return (acc.sum / acc.per_row_group_count().view(shape)).float()

    def gram(self, target: Target) -> torch.Tensor | None:
        """E[x xᵀ] per row group, [g, n, n] float32, or None when unobserved.

        For a target blocked by ``max_gram_bytes`` (``fqn in self.blocks``): the diagonal blocks,
        [g·n/b, b, b], group-major (the Gram of the Pruner's blocked row view).
        """
        if self.mode != "full":
            raise RuntimeError("gram() needs mode='full'")
        return self._mean(target)

    def sq_norms(self, target: Target) -> torch.Tensor | None:
        """E[x_j²] per row group, [g, n] float32, or None when unobserved."""
        mean = self._mean(target)
        if mean is None:
            return None
        return mean if self.mode == "diag" else torch.diagonal(mean, dim1=-2, dim2=-1)

    def reset(self) -> None:
        """Drop all accumulated statistics (after each pruning step)."""
        self._acc.clear()

    def nbytes(self) -> int:
        """Bytes held by the accumulators (reported; bounded by the targets' widths and ``max_gram_bytes``)."""
        return sum(a.sum.numel() * a.sum.element_size() + a.count.numel() * 8 for a in self._acc.values())

    def all_reduce(self, group: Any = None, bucket_bytes: int = 64 << 20) -> None:
        """Sum statistics over DDP ranks (no-op unless torch.distributed is initialized).

        Two collectives in the common case: one all_reduce of a presence vector (so a rank that
        saw no input of a target contributes zeros instead of deadlocking), then the sums and
        counts of every present target flattened into float64 buckets of at most ``bucket_bytes``
        (one all_reduce per bucket; 64 MiB bounds the extra copy while keeping calls few).

        Args:
            group: process group (None: the default group).
            bucket_bytes: largest flattened buffer reduced at once.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        device = self._device_hint()
        present = torch.tensor([1.0 if t.fqn in self._acc else 0.0 for t in self.targets], dtype=torch.float64, device=device)
        dist.all_reduce(present, group=group)
        tensors: list[torch.Tensor] = []
        for t, flag in zip(self.targets, present.tolist()):
            if flag == 0:
                continue
            acc = self._acc.get(t.fqn)
            if acc is None:  # this rank saw nothing but others did: contribute zeros
                acc = self._acc_for(t, t.row_shape[1], device)
            tensors += [acc.sum, acc.count]
        bucket: list[torch.Tensor] = []
        size = 0
        for i, tensor in enumerate(tensors + [None]):
            if tensor is not None and (not bucket or size + tensor.numel() * 8 <= bucket_bytes):
                bucket.append(tensor)
                size += tensor.numel() * 8
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                del flat
            bucket, size = ([tensor], tensor.numel() * 8) if tensor is not None else ([], 0)

    def _device_hint(self) -> torch.device:
        return self.targets[0].weight.device

    def state_dict(self) -> dict:
        """Accumulated sums and counts, keyed by target fqn (for exact resume)."""
        return {fqn: {"sum": a.sum.clone(), "count": a.count.clone()} for fqn, a in self._acc.items()}

    def load_state_dict(self, state: dict) -> None:
        self._acc.clear()
        by_fqn = {t.fqn: t for t in self.targets}
        for fqn, s in state.items():
            if fqn not in by_fqn:
                raise KeyError(f"statistics for {fqn!r}, which is not a target of this pruner")
            t = by_fqn[fqn]
            acc = _Accumulator(t.groups, t.row_shape[1], self.mode == "full", t.weight.device, self.blocks.get(fqn))
            if acc.sum.shape != s["sum"].shape:
                raise ConfigError(f"statistics of {fqn!r}: saved sum has shape {tuple(s['sum'].shape)}, this pruner expects "
                                 f"{tuple(acc.sum.shape)} (a different max_gram_bytes or model?)")
            acc.sum.copy_(s["sum"])
            acc.count.copy_(s["count"])
            self._acc[fqn] = acc
