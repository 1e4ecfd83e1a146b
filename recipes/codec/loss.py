"""The codec's training loss: time-domain MSE + multi-resolution mel + quantization penalty + τ·entropy.

    L = w_time · MSE(x̂, x) / mean(x²)                       (scale-free: −10·log10 of it is the SNR)
      + w_mel · mean_r mean (log10(M_r|X|² + ε) − log10(M_r|X̂|² + ε))²   r ∈ {8, 16, 32, 128} mel bands
      + w_quant · Σ_m mean (soft_m − hard_m)²                 (pulls soft codes onto the centroids)
      + Σ_m τ_m · max(0, H_m − H*_m)                          (H_m: soft-histogram entropy, bits/value)
      [+ w_priority · priority + w_noise · noise_modulation    (loss.psychoacoustic=true)]

Rate control: H*_m is module m's share of ``target_bitrate`` in bits per code value. The hinge leaves a
module that spends fewer bits than its share free to spend more (the reconstruction terms push it up);
above it, τ_m grows after every step, τ_m ← τ_m · exp(η · (R_m / R*_m − 1)) (R_m: the module's entropy
bitrate), and shrinks again while the module is under budget, so the rate settles at the target from
above instead of oscillating around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
from torch import nn

__all__ = ["LossConfig", "MelLoss", "CodecLoss"]


@dataclass
class LossConfig:
    """Weights of the loss terms and the rate controller (``loss.*`` in conf/codec.yaml)."""

    time_weight: float = 1.0  # normalised MSE, ~0.1 at 10 dB SNR
    mel_weight: float = 1.0  # squared log10-mel distance: comparable size to the normalised MSE
    mel_bands: List[int] = field(default_factory=lambda: [8, 16, 32, 128])  # Kankanahalli's resolutions
    quant_weight: float = 10.0  # (soft − hard)² is ~spacing²/12 ≈ 4e-4 per value: needs a large weight to matter
    target_bitrate: float = 16000.0  # bits/s of all modules together (side info included)
    entropy_weight_init: float = 0.02  # τ at the start: small, so the first steps learn to reconstruct
    rate_gain: float = 0.05  # η: τ can change by ~5% per step; 0.02 was too slow to reach the budget within ~1000 steps
    psychoacoustic: bool = False  # add the priority-weighting and noise-modulation terms (Zhen et al. 2020)
    priority_weight: float = 1.0  # psychoacoustic term weights
    noise_weight: float = 0.1


class MelLoss(nn.Module):
    """Mean over resolutions of the squared log-mel distance between frames [B, L] (one Hann FFT per frame)."""

    def __init__(self, frame_len: int, bands: Sequence[int], sample_rate: int = 16000, eps: float = 1e-7):
        super().__init__()
        import torchaudio

        self.n_fft = 2 * frame_len  # zero-padded FFT: 513 bins, so even the 128 narrow low mel bands hold a bin each
        n_freqs = self.n_fft // 2 + 1
        for i, n_mels in enumerate(bands):
            fb = torchaudio.functional.melscale_fbanks(n_freqs, 0.0, sample_rate / 2, int(n_mels), sample_rate)
            self.register_buffer(f"fb{i}", fb, persistent=False)  # [n_freqs, n_mels]
        self.register_buffer("window", torch.hann_window(frame_len), persistent=False)
        self.count, self.eps = len(bands), eps  # ε ≈ −70 dB re a full-scale bin: below what is audible here

    def forward(self, decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        power = lambda x: torch.fft.rfft(x * self.window, n=self.n_fft, dim=-1).abs().pow(2)  # noqa: E731  [B, n_freqs]
        p_hat, p = power(decoded), power(target)
        total = decoded.new_zeros(())
        for i in range(self.count):
            fb = getattr(self, f"fb{i}")
            diff = torch.log10(p_hat @ fb + self.eps) - torch.log10(p @ fb + self.eps)
            total = total + diff.pow(2).mean()
        return total / self.count


class CodecLoss(nn.Module):
    """All loss terms of one training step, and the rate controller's state (τ per module, a buffer).

    The rate controller adapts τ once per optimizer step (:meth:`step_rate_control`), from the mean
    bitrate of all the step's batches: every micro-batch and, under DDP, every rank's. So τ is the same
    on every rank and the same as in one process that cuts each global batch into the same shards.

    Args:
        cfg: weights and rate-control settings.
        num_modules: M (each gets an equal share of the bitrate left after ``side_bits_per_second``).
        codes_per_second: code values each module emits per second (code_len · sample_rate / hop).
        frame_len, sample_rate: framing of the frames the loss sees.
        side_bits_per_second: bits of side information (LPC) the modules' budget leaves out.
    """

    def __init__(self, cfg: LossConfig, num_modules: int, codes_per_second: float, frame_len: int = 512,
                 sample_rate: int = 16000, side_bits_per_second: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.codes_per_second = codes_per_second
        budget = cfg.target_bitrate - side_bits_per_second
        if budget <= 0:
            raise ValueError(f"loss.target_bitrate={cfg.target_bitrate}: below the {side_bits_per_second:.0f} bit/s of side information")
        self.module_bitrate_target = budget / num_modules
        self.mel = MelLoss(frame_len, cfg.mel_bands, sample_rate)
        self.register_buffer("tau", torch.full((num_modules,), float(cfg.entropy_weight_init)))
        self.psycho = None
        if cfg.psychoacoustic:
            from .psychoacoustic import PsychoacousticLoss

            self.psycho = PsychoacousticLoss(noise_domain="db")  # dB excess over the mask: bounded, unlike the power ratio
        self.last: dict[str, float] = {}  # the latest step's terms, for logging
        self._bits = torch.zeros(num_modules, dtype=torch.float64)  # this step's summed module bitrates, not yet applied
        self._calls = torch.zeros(num_modules, dtype=torch.float64)  # batches behind each sum

    def forward(self, decoded: torch.Tensor, target: torch.Tensor, modules: list[dict],
                train_modules: Sequence[int] | None = None) -> torch.Tensor:
        """The loss of one batch.

        Args:
            decoded: [B, L] reconstruction (signal domain).
            target: [B, L] what it should be.
            modules: per-module dicts from :meth:`CMRL.forward` (``entropy``, ``penalty``).
            train_modules: indices of the modules being trained (their entropy/penalty count and their
                τ is adjusted); None: all.
        """
        train_modules = range(len(modules)) if train_modules is None else train_modules
        c = self.cfg
        nmse = (decoded - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-10)
        mel = self.mel(decoded, target)
        loss = c.time_weight * nmse + c.mel_weight * mel
        terms = {"nmse": nmse.item(), "mel": mel.item()}
        for m in train_modules:
            out = modules[m]
            # Hinge on the module's bit budget: below it, the entropy term does not pull the rate further down.
            excess = torch.relu(out["entropy"] - self.module_bitrate_target / self.codes_per_second)
            loss = loss + c.quant_weight * out["penalty"] + float(self.tau[m]) * excess  # τ is a constant of this step
            bitrate = out["entropy"].item() * self.codes_per_second
            terms[f"entropy_m{m}"] = out["entropy"].item()
            terms[f"bitrate_m{m}"] = bitrate
            terms[f"tau_m{m}"] = float(self.tau[m])
            if self.training:
                self._bits[m] += bitrate
                self._calls[m] += 1
        if self.psycho is not None:
            psy = self.psycho(target, decoded)
            loss = loss + c.priority_weight * psy["priority"] + c.noise_weight * psy["noise_modulation"]
            terms.update(priority=psy["priority"].item(), noise_modulation=psy["noise_modulation"].item())
        terms["loss"] = loss.item()
        self.last = terms
        return loss

    @torch.no_grad()
    def step_rate_control(self, applied: bool = True) -> None:
        """Move each trained module's τ toward its bit budget from this step's mean bitrate, then reset.

        Args:
            applied: False when the optimizer step was skipped (a non-finite loss): the step's
                bitrates are dropped and τ stays.
        """
        bits, calls = self._bits.clone(), self._calls.clone()
        self._bits.zero_()
        self._calls.zero_()
        if not applied:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([bits, calls]).to(self.tau.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(both)
            bits, calls = both[: len(bits)].cpu(), both[len(bits):].cpu()
        c = self.cfg
        for m in range(len(bits)):
            if calls[m] > 0:
                ratio = float(bits[m] / calls[m]) / self.module_bitrate_target - 1.0
                self.tau[m] = (self.tau[m] * math.exp(c.rate_gain * max(-1.0, min(1.0, ratio)))).clamp(1e-5, 10.0)
