"""CMRL: cascaded Kankanahalli-Net modules with soft-to-hard scalar quantizers.

One component module (Kankanahalli, ICASSP 2018; Zhen et al., Interspeech 2019) maps a frame of
512 samples to a 256-value tanh code and back::

    encoder  [B, 512] -> conv(1->W) -> R blocks -> conv stride 2 -> R blocks -> conv(W->1) -> tanh -> [B, 256]
    quantize [B, 256] -> soft assignment to K learnable centroids (hard at inference)
    decoder  [B, 256] -> conv(1->W) -> R blocks -> conv(W->2W) + sub-pixel shuffle -> R blocks -> conv(W->1) -> [B, 512]

A residual block is the bottleneck ``x + conv1x1(N->W)(prelu(conv_k(N->N, dilation)(prelu(conv1x1(W->N)(x)))))``
with wide W = 100, narrow N = 20 channels, kernel 9 and dilations alternating 1, 2. :class:`CMRL`
cascades M modules: module m codes the frame residual left by modules 0..m-1, and the decoded
frame is the sum of the modules' outputs.

Tensor shapes: frames [B, frame_len] float32; codes [B, code_len]; centroid indices int64 [B, code_len].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ModuleConfig", "ResidualBlock", "Encoder", "Decoder", "SoftToHardQuantizer", "CodecModule", "CMRL",
           "value_histogram", "entropy_constrained_rate",
           "count_parameters"]


@dataclass
class ModuleConfig:
    """Hyperparameters of one CMRL component module (the defaults are Kankanahalli-Net's)."""

    frame_len: int = 512  # 32 ms at 16 kHz: Kankanahalli's window
    wide: int = 100  # channels outside the bottleneck
    narrow: int = 20  # bottleneck channels
    kernel: int = 9  # every non-1x1 conv
    dilations: tuple[int, ...] = field(default=(1, 2))  # cycled over a stage's blocks
    blocks: int = 6  # residual blocks per stage (4 stages: 2 encoder, 2 decoder) -> ~0.45M parameters
    centroids: int = 32  # scalar quantizer levels (Kankanahalli: 32)
    straight_through: bool = True  # hard values forward in training (see SoftToHardQuantizer)
    signal_scale: float = 0.05  # typical RMS of the input (-26 dBFS speech): the nets see unit-scale signals

    @property
    def code_len(self) -> int:
        """Code values per frame: the frame is downsampled once by 2."""
        return self.frame_len // 2


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv1d:
    """Length-preserving (stride 1) or halving (stride 2) conv with 'same'-style padding."""
    return nn.Conv1d(c_in, c_out, kernel, stride=stride, dilation=dilation, padding=dilation * (kernel - 1) // 2)


class ResidualBlock(nn.Module):
    """Bottleneck residual block: [B, W, T] -> [B, W, T]."""

    def __init__(self, wide: int, narrow: int, kernel: int, dilation: int):
        super().__init__()
        self.squeeze = nn.Conv1d(wide, narrow, 1)
        self.act1 = nn.PReLU(narrow)
        self.conv = _conv(narrow, narrow, kernel, dilation=dilation)
        self.act2 = nn.PReLU(narrow)
        self.expand = nn.Conv1d(narrow, wide, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(self.act2(self.conv(self.act1(self.squeeze(x)))))


def _stage(cfg: ModuleConfig) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(cfg.wide, cfg.narrow, cfg.kernel, cfg.dilations[i % len(cfg.dilations)])
                           for i in range(cfg.blocks)])


class Encoder(nn.Module):
    """Frame [B, frame_len] -> code pre-activation [B, frame_len // 2] (the code is its tanh, see CodecModule)."""

    def __init__(self, cfg: ModuleConfig):
        super().__init__()
        self.in_conv = _conv(1, cfg.wide, cfg.kernel)
        self.in_act = nn.PReLU(cfg.wide)
        self.stage1 = _stage(cfg)
        self.down = _conv(cfg.wide, cfg.wide, cfg.kernel, stride=2)
        self.down_act = nn.PReLU(cfg.wide)
        self.stage2 = _stage(cfg)
        self.out_conv = _conv(cfg.wide, 1, cfg.kernel)
        self.signal_scale = cfg.signal_scale

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.in_act(self.in_conv((frames / self.signal_scale).unsqueeze(1)))
        x = self.down_act(self.down(self.stage1(x)))
        return self.out_conv(self.stage2(x)).squeeze(1)


class Decoder(nn.Module):
    """Code [B, code_len] -> frame [B, 2·code_len], upsampling by a 1-D sub-pixel shuffle."""

    def __init__(self, cfg: ModuleConfig):
        super().__init__()
        self.in_conv = _conv(1, cfg.wide, cfg.kernel)
        self.in_act = nn.PReLU(cfg.wide)
        self.stage1 = _stage(cfg)
        self.up = _conv(cfg.wide, 2 * cfg.wide, cfg.kernel)
        self.up_act = nn.PReLU(cfg.wide)
        self.stage2 = _stage(cfg)
        self.out_conv = _conv(cfg.wide, 1, cfg.kernel)
        with torch.no_grad():  # start near "decode to silence": the first steps need not undo a loud random output
            self.out_conv.weight.mul_(0.1)
        self.signal_scale = cfg.signal_scale

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.in_act(self.in_conv(code.unsqueeze(1))))
        y = self.up(x)  # [B, 2W, T]: channel pairs (c, W + c) become samples 2t and 2t+1 of channel c
        b, c2, t = y.shape
        y = y.view(b, 2, c2 // 2, t).permute(0, 2, 3, 1).reshape(b, c2 // 2, 2 * t)
        x = self.stage2(self.up_act(y))
        return self.out_conv(x).squeeze(1) * self.signal_scale


CENTROID_RANGE = 0.9  # centroids stay within ±0.9 (tanh pre-activation ±1.47): see SoftToHardQuantizer
MAX_PREACTIVATION = 2.0  # |z| past this costs (|z| − 2)²: tanh(2) = 0.96 reaches every centroid, and tanh' stays ≥ 0.07


class SoftToHardQuantizer(nn.Module):
    """Scalar quantizer with K learnable centroids (Agustsson et al. 2017; Kankanahalli 2018).

    Soft assignment ``a_k = softmax_k(−α·(x − c_k)²)``; the soft value is ``Σ a_k c_k``, the hard value
    the nearest centroid. Inference is hard. Training is soft: the gradient, the entropy estimate and the
    quantization penalty come from the soft assignment; with ``straight_through`` (the default) the value
    passed on is the hard one (``hard + soft − stop_grad(soft)``), so the decoder trains on exactly what
    it will receive at inference. Without it the decoder sees soft values in training and learns to read
    information the hard codes do not carry (measured: a 2-module model trained that way reached 18 dB
    SNR with soft codes but 5.9 dB with hard ones). The entropy estimate comes from the soft
    histogram ``p_k = mean over values of a_k``. ``code_probs`` (a buffer) is the distribution the
    bitstream's entropy coder uses: a running average of the hard histogram during training,
    recomputed exactly by :meth:`set_code_probs` after training.

    Attributes:
        centroids: [K] learnable levels, initialised evenly over the tanh range.
        log_alpha: learnable log-sharpness α.
        code_probs: [K] buffer, the coder's symbol distribution.
    """

    def __init__(self, num_centroids: int = 32, ema: float = 0.99, straight_through: bool = True):
        super().__init__()
        self.straight_through = straight_through
        # Inside tanh's range, not at its asymptotes: a centroid at ±1 is reached only as the encoder's
        # pre-activation goes to ±∞, and the soft entropy pulls values toward the outer centroids; measured on a
        # tiny model, a module whose budget was too high for it saturated all its values at ±1 within 50 steps,
        # after which tanh passes no gradient and the module is dead (one code forever).
        self.centroids = nn.Parameter(torch.linspace(-CENTROID_RANGE, CENTROID_RANGE, num_centroids))
        spacing = 2.0 * CENTROID_RANGE / (num_centroids - 1)
        # α·spacing² = 1 at the start: neighbours overlap (useful gradients) but assignments are not uniform.
        self.log_alpha = nn.Parameter(torch.tensor(math.log(1.0 / spacing**2)))
        self.register_buffer("code_probs", torch.full((num_centroids,), 1.0 / num_centroids))
        # μ of the entropy-constrained assignment at inference (squared code error one bit is worth; 0: nearest
        # centroid). Training always assigns to the nearest centroid; :meth:`fit_coder` sets μ after training.
        self.register_buffer("rate_tradeoff", torch.zeros(()))
        self._register_load_state_dict_pre_hook(_default_rate_tradeoff)  # exports written before μ existed
        self.ema = ema  # running hard histogram: ~100 batches of memory

    @property
    def num_centroids(self) -> int:
        return self.centroids.numel()

    def assignments(self, x: torch.Tensor) -> torch.Tensor:
        """Soft assignments [..., K] of values x [...]."""
        levels = self.levels()
        dist = (x.unsqueeze(-1) - levels) ** 2
        # α·spacing² ≤ 4 (spacing: the centroids' mean gap): a value at a centroid still gives its neighbours
        # e⁻⁴ ≈ 2% of the assignment, so the soft entropy keeps a gradient even when every value sits in one
        # centroid's basin (a collapsing module), and after a re-spread to a narrow range.
        spacing = ((levels.max() - levels.min()) / (levels.numel() - 1)).detach().clamp_min(1e-6)
        alpha = torch.minimum(self.log_alpha.exp(), 4.0 / spacing**2)
        return torch.softmax(-alpha * dist, dim=-1)

    def levels(self) -> torch.Tensor:
        """The centroids as used: [K], clamped to ±CENTROID_RANGE (the parameter may drift past it)."""
        return self.centroids.clamp(-CENTROID_RANGE, CENTROID_RANGE)

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        """Centroid indices int64 [...] of values x [...]: the nearest centroid in training; at inference the
        entropy-constrained choice ``argmin_k (x − c_k)² − μ·log2 q_k`` (q: ``code_probs``, μ: ``rate_tradeoff``),
        which is the nearest centroid when μ = 0."""
        cost = (x.unsqueeze(-1) - self.levels()) ** 2
        if not self.training:  # μ = 0 adds exact zeros: no host sync on μ's value (a GPU would stall on it)
            cost = cost - self.rate_tradeoff * torch.log2(self.code_probs.clamp_min(1e-12))
        return cost.argmin(dim=-1)

    def count_codes(self, idx: torch.Tensor) -> torch.Tensor:
        """How often each centroid occurs in indices [...]: float [K]."""
        return torch.bincount(idx.reshape(-1), minlength=self.num_centroids).float()

    def dequantize(self, idx: torch.Tensor) -> torch.Tensor:
        """Centroid values [...] of indices [...]."""
        return self.levels()[idx]

    def forward(self, x: torch.Tensor, hard: bool | None = None) -> dict[str, torch.Tensor]:
        """Quantize a code.

        Args:
            x: [B, C] tanh code.
            hard: nearest centroid (True) or soft assignment (False); None: soft in training mode only.

        Returns:
            ``{"q": [B, C] quantized code, "idx": [B, C] int64 nearest centroids, "entropy": soft-histogram
            entropy in bits per value (0-dim; 0 when hard), "hard_entropy": the empirical entropy of ``idx`` in
            bits per value (a float: what the bitstream costs), "penalty": mean (soft − hard)² (0-dim),
            "values": x detached (what :meth:`respread` re-spreads over)}``.
        """
        hard = (not self.training) if hard is None else hard
        idx = self.indices(x)
        q_hard = self.dequantize(idx)
        counts = self.count_codes(idx).detach()
        freq = counts[counts > 0] / counts.sum()
        hard_entropy = float(-(freq * torch.log2(freq)).sum())
        if hard:
            zero = x.new_zeros(())
            return {"q": q_hard, "idx": idx, "entropy": zero, "hard_entropy": hard_entropy, "penalty": zero, "values": x.detach()}
        a = self.assignments(x)
        q_soft = (a * self.levels()).sum(-1)
        p = a.reshape(-1, a.shape[-1]).mean(0)
        entropy = -(p * torch.log2(p.clamp_min(1e-12))).sum()
        with torch.no_grad():
            counts = counts.to(self.code_probs)
            self.code_probs.mul_(self.ema).add_(counts / counts.sum(), alpha=1 - self.ema)
        # Commitment (x − hard)², not (soft − hard)²: beyond the outermost centroid the soft value only nears
        # the hard one as x → ±∞, so (soft − hard)² pushed such values into tanh's saturation, where no gradient
        # flows (measured: a whole module saturated at ±1 within 50 steps). (x − hard)² pulls them back inward.
        penalty = ((x - q_hard.detach()) ** 2).mean()
        if self.straight_through:  # hard values forward, the soft assignment's gradient backward
            q_soft = q_hard.detach() + (q_soft - q_soft.detach())
        return {"q": q_soft, "idx": idx, "entropy": entropy, "hard_entropy": hard_entropy, "penalty": penalty,
                "values": x.detach()}

    @torch.no_grad()
    def respread(self, values: torch.Tensor) -> None:
        """Move the centroids to the quantiles ``(k + ½)/K`` of ``values`` [...] (a collapsing module's codes).

        Every value then lies near a centroid of its own range, so the decoder sees almost what it saw, but the
        codes are spread over all K symbols again and the soft assignment has a gradient (the sharpness bound
        keeps neighbours overlapping). Under DDP rank 0's centroids are broadcast.
        """
        k = self.num_centroids
        flat = values.detach().reshape(-1).float()
        levels = torch.quantile(flat[:: max(1, flat.numel() // 65536)], (torch.arange(k, dtype=torch.float32) + 0.5) / k)
        levels = levels + 1e-6 * torch.arange(k, dtype=torch.float32)  # strictly increasing even where quantiles tie
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            levels = levels.to(self.centroids.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(levels, 0)
        self.centroids.copy_(levels.to(self.centroids))
        spacing = float(levels[-1] - levels[0]) / (k - 1)
        self.log_alpha.fill_(math.log(1.0 / max(spacing, 1e-6) ** 2))  # the initial sharpness, for the new spacing
        self.code_probs.fill_(1.0 / k)
        self.rate_tradeoff.zero_()

    @torch.no_grad()
    def set_code_probs(self, counts: torch.Tensor, pseudo_count: float = 0.5) -> None:
        """Set the coder's distribution from hard-code counts [K] (+ a pseudo-count so no symbol has p = 0)."""
        counts = counts.to(self.code_probs) + pseudo_count
        self.code_probs.copy_(counts / counts.sum())

    @torch.no_grad()
    def fit_coder(self, values: torch.Tensor, max_bits: float | None = None, pseudo_count: float = 0.5) -> float:
        """Fit the coder to this module's code values [...] on training data; returns the bits per value it pays.

        With ``max_bits`` None, or at least what nearest-centroid codes cost, μ = 0 and ``code_probs`` is their
        histogram. Otherwise the codes are trimmed to ``max_bits`` (bits/value) by entropy-constrained scalar
        quantization: ``rate_tradeoff`` μ is the smallest that brings the rate under ``max_bits``
        (:func:`entropy_constrained_rate`), and ``code_probs`` the distribution of the codes it gives. The
        centroids and the decoder stay as trained; only the encoder's choice between neighbouring centroids
        changes (measured on the 16 kbit/s dense model, RESULTS.md: 6% fewer bits for −0.09 dB SNR, −0.06 PESQ-WB).
        """
        levels = self.levels().detach().cpu().double()
        flat = values.detach().reshape(-1).cpu().double()
        self.rate_tradeoff.zero_()
        self.set_code_probs(torch.bincount(_assign(flat, levels, 0.0, None), minlength=levels.numel()), pseudo_count)
        bits = self._exact_bits(flat, levels)
        counts, centers, aim = *value_histogram(flat), max_bits
        for _ in range(5):  # the search runs on binned values: aim lower by what the exact codes overshoot, if they do
            if max_bits is None or bits <= max_bits:
                break
            mu, probs = _smallest_tradeoff(counts, centers, levels, aim, pseudo_count)
            self.rate_tradeoff.fill_(mu)
            self.code_probs.copy_(probs.to(self.code_probs))
            bits = self._exact_bits(flat, levels)
            aim = aim * max_bits / bits * (1 - 1e-4)
        return bits

    def _exact_bits(self, flat: torch.Tensor, levels: torch.Tensor) -> float:
        """Bits per value the coder (``code_probs`` as stored, μ) pays for the inference-time codes of flat [N]."""
        stored = self.code_probs.detach().cpu().double()
        codes = torch.bincount(_assign(flat, levels, float(self.rate_tradeoff), stored), minlength=levels.numel()).double()
        return float(-(codes / codes.sum() * stored.log2()).sum())


def _default_rate_tradeoff(state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint without ``rate_tradeoff`` (written before it existed) codes with μ = 0."""
    state_dict.setdefault(prefix + "rate_tradeoff", torch.zeros(()))


RATE_TRIM_BINS = 8192  # histogram bins over tanh's range [−1, 1]: 2.4e-4 wide, ~1/240 of the 32 centroids' spacing


def value_histogram(values: torch.Tensor, bins: int = RATE_TRIM_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [bins] and bin centres [bins] (float64) of code values [...] in [−1, 1]: the rate trim's search
    runs on these, not on the millions of values."""
    flat = values.detach().reshape(-1).double().cpu().clamp(-1.0, 1.0)
    counts = torch.histc(flat, bins=bins, min=-1.0, max=1.0)
    centers = -1.0 + (torch.arange(bins, dtype=torch.float64) + 0.5) * (2.0 / bins)
    return counts, centers


def _assign(x: torch.Tensor, levels: torch.Tensor, mu: float, probs: torch.Tensor | None) -> torch.Tensor:
    """Entropy-constrained assignment int64 [N] of values x [N] (float64) to levels [K] under code
    distribution probs [K] (None or μ = 0: the nearest level)."""
    bias = -mu * torch.log2(probs.double().clamp_min(1e-12)) if probs is not None and mu > 0 else 0.0
    chunk = 1 << 16  # [chunk, K] float64 costs: 16 MB at K = 32, whatever N is
    return torch.cat([((part.unsqueeze(-1) - levels) ** 2 + bias).argmin(dim=-1) for part in x.split(chunk)])


def _code_histogram(counts: torch.Tensor, assignment: torch.Tensor, k: int, pseudo_count: float) -> torch.Tensor:
    """Code distribution [K] when bin b (weight counts[b]) goes to centroid assignment[b], plus a pseudo-count."""
    codes = torch.zeros(k, dtype=torch.float64).index_add_(0, assignment, counts.double()) + pseudo_count
    return codes / codes.sum()


def _cross_entropy(counts: torch.Tensor, assignment: torch.Tensor, probs: torch.Tensor) -> float:
    """Bits per value the coder pays (distribution probs [K]) for bins of weight counts [B] assigned to codes [B]."""
    return float((counts.double() * -torch.log2(probs.double()[assignment])).sum() / counts.sum().clamp_min(1.0))


def entropy_constrained_rate(counts: torch.Tensor, centers: torch.Tensor, levels: torch.Tensor, mu: float,
                             pseudo_count: float = 0.5, iterations: int = 10) -> tuple[float, torch.Tensor]:
    """Bits per value, and the code distribution [K], of entropy-constrained scalar quantization at trade-off μ.

    Alternates the assignment ``argmin_k (x − c_k)² − μ·log2 q_k`` and ``q ← histogram of the codes``
    (Chou, Lookabaugh and Gray 1989), from the nearest-centroid histogram, on a value histogram (counts,
    centers [B], :func:`value_histogram`); the centroids stay fixed.
    """
    k = levels.numel()
    probs = _code_histogram(counts, _assign(centers, levels, 0.0, None), k, pseudo_count)
    for _ in range(iterations):
        probs = _code_histogram(counts, _assign(centers, levels, mu, probs), k, pseudo_count)
    return _cross_entropy(counts, _assign(centers, levels, mu, probs), probs), probs


def _smallest_tradeoff(counts: torch.Tensor, centers: torch.Tensor, levels: torch.Tensor, max_bits: float,
                       pseudo_count: float, steps: int = 40) -> tuple[float, torch.Tensor]:
    """The smallest μ (to a relative 1e-3 by bisection) whose rate is at most max_bits, and its distribution [K]."""
    spacing = float(levels.max() - levels.min()) / max(levels.numel() - 1, 1)
    lo, hi = 0.0, spacing**2 / 64  # a bit is worth a 1/8-spacing error: a mild trim, doubled until it is enough
    rate, probs = entropy_constrained_rate(counts, centers, levels, hi, pseudo_count)
    for _ in range(steps):
        if rate <= max_bits:
            break
        lo, hi = hi, 2 * hi
        rate, probs = entropy_constrained_rate(counts, centers, levels, hi, pseudo_count)
    for _ in range(steps):
        if hi - lo <= 1e-3 * hi:
            break
        mid = 0.5 * (lo + hi)
        mid_rate, mid_probs = entropy_constrained_rate(counts, centers, levels, mid, pseudo_count)
        if mid_rate <= max_bits:
            hi, probs = mid, mid_probs
        else:
            lo = mid
    return hi, probs


class CodecModule(nn.Module):
    """One CMRL component: encoder, quantizer, decoder."""

    def __init__(self, cfg: ModuleConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quantizer = SoftToHardQuantizer(cfg.centroids, straight_through=cfg.straight_through)
        self.decoder = Decoder(cfg)

    def forward(self, frames: torch.Tensor, hard: bool | None = None) -> dict[str, torch.Tensor]:
        """frames [B, L] -> ``{"decoded": [B, L], "idx": [B, L/2], "entropy", "hard_entropy", "penalty", "values"}``.

        The penalty adds ``mean relu(|z| − MAX_PREACTIVATION)²`` on the encoder's pre-activation z: a module
        whose codes saturate tanh gets no gradient back and stays at one code (measured on a tiny model: the
        entropy term pushed every value of an over-budget module past the outer centroid into saturation).
        """
        pre = self.encoder(frames)
        out = self.quantizer(torch.tanh(pre), hard=hard)
        if out["penalty"].requires_grad or self.training:
            out["penalty"] = out["penalty"] + torch.relu(pre.abs() - MAX_PREACTIVATION).pow(2).mean()
        out["decoded"] = self.decoder(out["q"])
        return out


class CMRL(nn.Module):
    """Cascade of M component modules, each coding the residual of the ones before it.

    Args:
        num_modules: M (CMRL uses 2 for ~16 kbps).
        **module_kwargs: :class:`ModuleConfig` fields.
    """

    def __init__(self, num_modules: int = 2, **module_kwargs):
        super().__init__()
        if num_modules < 1:
            raise ValueError(f"model.num_modules={num_modules}: need at least one module")
        if "dilations" in module_kwargs:
            module_kwargs["dilations"] = tuple(module_kwargs["dilations"])
        self.cfg = ModuleConfig(**module_kwargs)
        if self.cfg.frame_len % 2:
            raise ValueError(f"model.frame_len={self.cfg.frame_len}: must be even (the encoder halves it)")
        self.stages = nn.ModuleList(CodecModule(self.cfg) for _ in range(num_modules))

    @property
    def num_modules(self) -> int:
        return len(self.stages)

    def forward(self, frames: torch.Tensor, upto: int | None = None, hard: bool | None = None,
                train_only: int | None = None) -> dict[str, object]:
        """Code frames through modules 0..upto-1.

        Args:
            frames: [B, L] target frames (time domain, or LPC residual).
            upto: modules used (None: all).
            hard: quantization mode for every module (None: soft in training mode).
            train_only: greedy training of this module: the ones before it run hard-quantized and
                without gradient (as they will at inference), so it learns the residual it will get.

        Returns:
            ``{"decoded": [B, L] sum of the modules' outputs, "modules": list of each module's dict
            (see :meth:`CodecModule.forward`), "target": [B, L] residual the last module coded}``.
        """
        upto = self.num_modules if upto is None else upto
        residual, decoded, outs = frames, torch.zeros_like(frames), []
        for m in range(upto):
            if train_only is not None and m < train_only:
                with torch.no_grad():
                    out = self.stages[m](residual, hard=True)
            else:
                out = self.stages[m](residual, hard=hard)
            outs.append(out)
            target = residual
            decoded = decoded + out["decoded"]
            residual = residual - out["decoded"]
        return {"decoded": decoded, "modules": outs, "target": target}

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Hard centroid indices of every module: list of M int64 [B, L/2]."""
        return [out["idx"] for out in self.forward(frames, hard=True)["modules"]]

    @torch.no_grad()
    def decode(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Frames [B, L] from every module's centroid indices (the sum of the decoders' outputs)."""
        if len(indices) != self.num_modules:
            raise ValueError(f"decode: {len(indices)} code streams for a {self.num_modules}-module model")
        return sum(stage.decoder(stage.quantizer.dequantize(idx)) for stage, idx in zip(self.stages, indices))
