"""The codec's training loss: time-domain MSE + multi-resolution mel + quantization penalty + λ·entropy.

    L = w_time · MSE(x̂, x) / mean(x²)                       (scale-free: −10·log10 of it is the SNR)
      + w_mel · mean_r mean (log10(M_r|X|² + ε) − log10(M_r|X̂|² + ε))²   r ∈ {8, 16, 32, 128} mel bands
      + w_quant · Σ_m mean (soft_m − hard_m)²                 (pulls soft codes onto the centroids)
      + Σ_m λ_m · H_m / H*_m                                  (H_m: soft-histogram entropy, bits/value)
      [+ w_priority · priority + w_noise · noise_modulation    (loss.psychoacoustic=true)]

Rate control. Each module m has an explicit budget: ``module_shares[m]`` of the bitrate left after the LPC
side information, i.e. H*_m bits per code value. λ_m is a Lagrange multiplier, moved by dual ascent once
per optimizer step from what the bitstream will really cost: the entropy of the step's *hard* codes R_m,

    e_m = clip(R_m / R*_m − 1, −1, 1),   λ_m ← clip(λ_m + η · e_m, −λ_max, λ_max),

and the weight applied is λ_m + k_p · e_m (a PI controller: the proportional part reacts at once when a module
falls through its budget, before the integral has unwound). The rate settles where the reconstruction's marginal gain per bit equals λ_m, on both sides of the target:
over budget λ grows (entropy is penalised), under budget it falls and turns negative (entropy is rewarded,
so a module left with too few bits is pushed up, not just left free). The bound λ_max stops the windup
that, with a multiplicative τ and a one-sided hinge, let τ grow for hundreds of steps of overshoot and then
drive a module to a single code. Below ``entropy_floor`` × its budget a module is collapsing: the
recipe warns (log and TensorBoard) and re-spreads its centroids over its values
(``SoftToHardQuantizer.respread``), since a module whose values all sit in one centroid's basin gets
almost no gradient from the soft assignment.

Three details keep the loop from cycling (recipes/codec/RESULTS.md, the 0.6/0.4 shares run):
- the proportional term and the floor check read an EMA of each module's per-step hard rate
  (β = ``rate_smoothing``), not the single step's: per-batch rates of a residual module are too noisy
  for them (the integral averages by itself; feeding it the EMA too added lag and made a tiny module
  overshoot into collapse in tests/test_codec_rate.py);
- a re-spread hands the controller a state it can hold: λ_m ← min(λ_m, 0) (the penalty that pushed the
  module through its floor is dropped), the EMA restarts from the next step, and the recipe does not
  re-spread in the last ``1 − respread_until`` of a joint or fine-tuning stage's steps (it still warns;
  a greedy stage is followed by more training, so a re-spread there is always in time);
- ``spill``: a later module that stays under budget with λ_m at −λ_max (it cannot use more bits however
  much they are rewarded) hands its shortfall to module 0's target, so the total rate lands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

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
    module_shares: Optional[List[float]] = None  # each module's share of the code bitrate (sum 1); None: equal shares
    rate_weight_init: float = 0.0  # λ at the start: 0, so the first steps learn to reconstruct before the rate binds
    rate_gain: float = 0.03  # η: λ moves at most 0.03 a step; 0.01 was too slow to follow a real module's falling rate
    rate_p_gain: float = 0.1  # k_p: the weight applied is λ + k_p·e (e: last step's clipped relative error), damping windup
    rate_weight_max: float = 3.0  # |λ| bound (anti-windup); a tiny model needed λ ≈ 1 to hold 0.5 bits/value
    entropy_floor: float = 0.5  # a module below this fraction of its budget (bits/value) is collapsing: warned, re-spread
    floor_patience: int = 10  # steps in a row below the floor before it counts: one batch's entropy is noisy
    floor_cooldown: int = 50  # steps after a re-spread before the next: the module needs time to use its new codes
    rate_smoothing: float = 0.1  # β of the EMA of each module's hard rate behind k_p·e and the floor check (~10 steps):
    # one batch's module-1 rate swung 0.5-40 kbit/s, and a per-step integrator on it limit-cycled (RESULTS.md)
    respread_until: float = 0.9  # fraction of a joint/fine-tuning stage's steps after which a collapse is warned about, not re-spread:
    # a re-spread 21 steps before the end left near-uniform test codes (34 kbit/s against a 6.4 budget)
    spill: bool = True  # budget a later module cannot use at λ = −λ_max goes to module 0, so the total lands on target
    trim_rate: bool = True  # after training, trim each module's coder to its budget (entropy-constrained assignment):
    # the controller lands within its oscillation (+8.8% measured on a dense run), the trim takes the excess off
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
    """All loss terms of one training step, and the rate controller's state (λ per module, a buffer).

    The rate controller adapts λ once per optimizer step (:meth:`step_rate_control`), from the mean hard-code
    bitrate of all the step's batches: every micro-batch and, under DDP, every rank's. So λ is the same on
    every rank and the same as in one process that cuts each global batch into the same shards.

    Args:
        cfg: weights and rate-control settings.
        num_modules: M.
        codes_per_second: code values each module emits per second (code_len · sample_rate / hop).
        frame_len, sample_rate: framing of the frames the loss sees.
        side_bits_per_second: bits of side information (LPC) the modules' budget leaves out.

    Attributes:
        module_bitrate_targets: [M] each module's budget in bit/s.
        floors: [M] entropy floors in bits/value.
        rate_weight: [M] buffer, λ.
    """

    def __init__(self, cfg: LossConfig, num_modules: int, codes_per_second: float, frame_len: int = 512,
                 sample_rate: int = 16000, side_bits_per_second: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.codes_per_second = codes_per_second
        budget = cfg.target_bitrate - side_bits_per_second
        if budget <= 0:
            raise ValueError(f"loss.target_bitrate={cfg.target_bitrate}: below the {side_bits_per_second:.0f} bit/s of side information")
        shares = list(cfg.module_shares) if cfg.module_shares is not None else [1.0 / num_modules] * num_modules
        if len(shares) != num_modules or min(shares) <= 0 or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"loss.module_shares={cfg.module_shares}: need {num_modules} positive shares summing to 1")
        if not 0.0 <= cfg.entropy_floor < 1.0:
            raise ValueError(f"loss.entropy_floor={cfg.entropy_floor}: must lie in [0, 1)")
        self.module_bitrate_targets = [budget * share for share in shares]
        self.floors = [cfg.entropy_floor * target / codes_per_second for target in self.module_bitrate_targets]
        self.mel = MelLoss(frame_len, cfg.mel_bands, sample_rate)
        self.register_buffer("rate_weight", torch.full((num_modules,), float(cfg.rate_weight_init)))
        self.register_buffer("rate_error", torch.zeros(num_modules))  # last applied step's clipped relative rate error
        self.psycho = None
        if cfg.psychoacoustic:
            from .psychoacoustic import PsychoacousticLoss

            self.psycho = PsychoacousticLoss(noise_domain="db")  # dB excess over the mask: bounded, unlike the power ratio
        self.last: dict[str, float] = {}  # the latest step's terms, for logging
        self._bits = torch.zeros(num_modules, dtype=torch.float64)  # this step's summed hard-code bitrates, not yet applied
        self._calls = torch.zeros(num_modules, dtype=torch.float64)  # batches behind each sum
        self.last_rates: dict[int, float] = {}  # module -> the last applied step's mean hard bitrate (bit/s)
        self._below = [0] * num_modules  # steps in a row each module has been below its floor
        self._cooldown = [0] * num_modules  # steps left before a module may be reported again
        self.rate_ema: list[Optional[float]] = [None] * num_modules  # smoothed hard rate (bit/s); None: restart
        self.budget_targets = list(self.module_bitrate_targets)  # the explicit budgets; module_bitrate_targets may spill

    def applied_weight(self, m: int) -> float:
        """The entropy weight used this step: λ_m + k_p·e_m, within ±λ_max (a PI controller on the rate)."""
        c = self.cfg
        return max(-c.rate_weight_max, min(c.rate_weight_max, float(self.rate_weight[m]) + c.rate_p_gain * float(self.rate_error[m])))

    def value_budget(self, m: int) -> float:
        """Module m's budget in bits per code value (H*_m)."""
        return self.module_bitrate_targets[m] / self.codes_per_second

    def forward(self, decoded: torch.Tensor, target: torch.Tensor, modules: list[dict],
                train_modules: Sequence[int] | None = None) -> torch.Tensor:
        """The loss of one batch.

        Args:
            decoded: [B, L] reconstruction (signal domain).
            target: [B, L] what it should be.
            modules: per-module dicts from :meth:`CMRL.forward` (``entropy``, ``hard_entropy``, ``penalty``).
            train_modules: indices of the modules being trained (their entropy/penalty count and their
                λ is adjusted); None: all.
        """
        train_modules = range(len(modules)) if train_modules is None else train_modules
        c = self.cfg
        nmse = (decoded - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-10)
        mel = self.mel(decoded, target)
        loss = c.time_weight * nmse + c.mel_weight * mel
        terms = {"nmse": nmse.item(), "mel": mel.item()}
        for m in train_modules:
            out = modules[m]
            weight = self.applied_weight(m)  # a constant of this step
            loss = loss + c.quant_weight * out["penalty"] + weight * out["entropy"] / self.value_budget(m)
            hard = float(out.get("hard_entropy", out["entropy"]))
            terms[f"entropy_m{m}"] = out["entropy"].item()
            terms[f"hard_entropy_m{m}"] = hard
            terms[f"bitrate_m{m}"] = hard * self.codes_per_second
            terms[f"rate_weight_m{m}"] = weight
            terms[f"target_m{m}"] = self.module_bitrate_targets[m]  # module 0's moves when a later module spills
            if self.rate_ema[m] is not None:
                terms[f"rate_ema_m{m}"] = self.rate_ema[m]  # what the P term and the floor read (up to the last step)
            if self.training:
                self._bits[m] += hard * self.codes_per_second
                self._calls[m] += 1
        if self.psycho is not None:
            psy = self.psycho(target, decoded)
            loss = loss + c.priority_weight * psy["priority"] + c.noise_weight * psy["noise_modulation"]
            terms.update(priority=psy["priority"].item(), noise_modulation=psy["noise_modulation"].item())
        terms["loss"] = loss.item()
        self.last = terms
        return loss

    @torch.no_grad()
    def step_rate_control(self, applied: bool = True) -> list[int]:
        """Move each trained module's λ toward its budget from this step's mean hard-code bitrate, then reset.

        Args:
            applied: False when the optimizer step was skipped (a non-finite loss): the step's
                bitrates are dropped and λ stays.

        Returns:
            The trained modules that are collapsing: below their entropy floor for ``floor_patience`` steps in a
            row, and not reported within the last ``floor_cooldown`` steps.
        """
        bits, calls = self._bits.clone(), self._calls.clone()
        self._bits.zero_()
        self._calls.zero_()
        if not applied:
            return []
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            both = torch.cat([bits, calls]).to(self.rate_weight.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(both)
            bits, calls = both[: len(bits)].cpu(), both[len(bits):].cpu()
        c, below = self.cfg, []
        self.last_rates = {}
        for m in range(len(bits)):
            if calls[m] > 0:
                rate = float(bits[m] / calls[m])
                self.last_rates[m] = rate
                ema = self.rate_ema[m]
                ema = rate if ema is None else ema + c.rate_smoothing * (rate - ema)
                self.rate_ema[m] = ema
                target = self.module_bitrate_targets[m]
                error = max(-1.0, min(1.0, rate / target - 1.0))  # ≤ η a step, however far off
                self.rate_error[m] = max(-1.0, min(1.0, ema / target - 1.0))  # the P term: smoothed
                self.rate_weight[m] = float(self.rate_weight[m] + c.rate_gain * error)  # the integral: itself a low-pass
                self.rate_weight[m] = self.rate_weight[m].clamp(-c.rate_weight_max, c.rate_weight_max)
                self._cooldown[m] = max(0, self._cooldown[m] - 1)
                self._below[m] = self._below[m] + 1 if ema / self.codes_per_second < self.floors[m] else 0
                if self._below[m] >= c.floor_patience and self._cooldown[m] == 0:
                    below.append(m)
                    self._below[m], self._cooldown[m] = 0, c.floor_cooldown
        if c.spill:
            self._spill()
        return below

    def _spill(self) -> None:
        """Module 0's target: its budget plus what the later modules pinned at λ = −λ_max leave unused."""
        c, spare = self.cfg, 0.0
        for m in range(1, len(self.budget_targets)):
            ema = self.rate_ema[m]
            if ema is not None and float(self.rate_weight[m]) <= -c.rate_weight_max * (1 - 1e-6):
                spare += max(0.0, self.budget_targets[m] - ema)
        self.module_bitrate_targets[0] = self.budget_targets[0] + spare

    def controller_state(self) -> dict:
        """The rate controller's whole state, for a training checkpoint: λ and the last error (the buffers), the
        smoothed rates, the floor counters and the targets (module 0's moves with spill)."""
        return {"rate_weight": self.rate_weight.detach().cpu().clone(), "rate_error": self.rate_error.detach().cpu().clone(),
                "rate_ema": list(self.rate_ema), "below": list(self._below), "cooldown": list(self._cooldown),
                "targets": list(self.module_bitrate_targets)}

    def load_controller_state(self, state: dict) -> None:
        """Restore :meth:`controller_state` (a resumed run then moves λ exactly as the uninterrupted one)."""
        if len(state["targets"]) != len(self.module_bitrate_targets):
            raise ValueError(f"rate controller state for {len(state['targets'])} modules, this loss has {len(self.module_bitrate_targets)}")
        self.rate_weight.copy_(state["rate_weight"])
        self.rate_error.copy_(state["rate_error"])
        self.rate_ema = list(state["rate_ema"])
        self._below, self._cooldown = list(state["below"]), list(state["cooldown"])
        self.module_bitrate_targets = list(state["targets"])

    def respread_done(self, m: int) -> None:
        """Module m's centroids were re-spread: drop the penalty that pushed it through its floor
        (λ_m ← min(λ_m, 0), no proportional term) and restart its smoothed rate from the next step."""
        self.rate_weight[m] = min(float(self.rate_weight[m]), 0.0)
        self.rate_error[m] = 0.0
        self.rate_ema[m] = None
