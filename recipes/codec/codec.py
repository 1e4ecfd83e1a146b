"""The whole codec around a CMRL model: framing, the optional LPC front end, encode and decode.

    codec = SpeechCodec(model, lpc=None)              # or lpc=LPCFrontEnd(...)
    coded = codec.encode(wave)                        # CodedUtterance: indices per module (+ LSF indices)
    wave_hat = codec.decode(coded)                    # [T], the hard-quantized reconstruction
    batch = codec.training_view(frames)               # what the model codes and what the loss compares

Without LPC the modules code the time-domain frames. With LPC (the collaborative-quantization variant)
the signal is pre-emphasised, each frame gets quantized order-16 LPC coefficients, the modules code
the frame's LPC residual, and the decoder runs the synthesis filter with the same quantized
coefficients before overlap-add and de-emphasis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import frame_signal, num_frames, overlap_add
from .model import CMRL

__all__ = ["CodedUtterance", "SpeechCodec"]


@dataclass
class CodedUtterance:
    """What the bitstream carries for one utterance.

    Attributes:
        indices: M tensors int64 [F, code_len], centroid indices of each module.
        lsf_idx: int64 [F, order] LSF quantizer indices (LPC mode) or None.
        num_samples: length of the waveform.
    """

    indices: list[torch.Tensor]
    lsf_idx: torch.Tensor | None
    num_samples: int


class SpeechCodec:
    """CMRL model + framing + optional LPC front end.

    Args:
        model: the cascade.
        lpc: an ``LPCFrontEnd`` (lpc=true) or None.
        overlap: samples shared by neighbouring frames.
        sample_rate: Hz.
    """

    def __init__(self, model: CMRL, lpc=None, overlap: int = 32, sample_rate: int = 16000):
        self.model, self.lpc, self.overlap, self.sample_rate = model, lpc, overlap, sample_rate
        self.frame_len = model.cfg.frame_len

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / (self.frame_len - self.overlap)

    @property
    def codes_per_second(self) -> float:
        """Code values one module emits per second."""
        return self.model.cfg.code_len * self.frames_per_second

    @property
    def side_bits_per_second(self) -> float:
        """LSF side information (0 without LPC)."""
        return self.lpc.bits_per_frame * self.frames_per_second if self.lpc is not None else 0.0

    def signal_frames(self, wave: torch.Tensor) -> torch.Tensor:
        """Frames [F, L] of the signal the codec reconstructs (pre-emphasised with LPC)."""
        if self.lpc is not None:
            wave = self.lpc.emphasize(wave)
        return frame_signal(wave, self.frame_len, self.overlap)

    def training_view(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """For signal frames [B, L]: ``{"input": what the modules code [B, L], "target": [B, L],
        "lsf_idx": [B, order] or absent}``."""
        if self.lpc is None:
            return {"input": frames, "target": frames}
        residual, lsf_idx = self.lpc.analyze(frames)
        return {"input": residual, "target": frames, "lsf_idx": lsf_idx}

    def to_signal(self, decoded: torch.Tensor, view: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model output [B, L] -> signal frames [B, L] (LPC synthesis with the frames' quantized LSFs)."""
        return self.lpc.synthesize(decoded, view["lsf_idx"]) if self.lpc is not None else decoded

    def _to_wave(self, frames: torch.Tensor, num_samples: int) -> torch.Tensor:
        wave = overlap_add(frames, num_samples, self.overlap)
        if self.lpc is not None:
            wave = self.lpc.deemphasize(wave)
        return wave

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> CodedUtterance:
        """Waveform [T] (16 kHz) -> hard codes of every module (and LSF indices)."""
        view = self.training_view(self.signal_frames(wave))
        indices = self.model.encode(view["input"])
        return CodedUtterance(indices, view.get("lsf_idx"), wave.numel())

    @torch.no_grad()
    def decode(self, coded: CodedUtterance) -> torch.Tensor:
        """Hard codes -> waveform [num_samples]."""
        decoded = self.model.decode(coded.indices)
        view = {"lsf_idx": coded.lsf_idx} if coded.lsf_idx is not None else {}
        return self._to_wave(self.to_signal(decoded, view), coded.num_samples)

    def probs(self) -> list:
        """Each module's coder distribution (float64 numpy [K])."""
        return [stage.quantizer.code_probs.detach().double().cpu().numpy() for stage in self.model.stages]

    def digest(self) -> bytes:
        """8-byte model digest written into .cmrl headers (coder distributions + centroids)."""
        from .bitstream import model_digest

        centroids = b"".join(stage.quantizer.centroids.detach().float().cpu().numpy().tobytes() for stage in self.model.stages)
        return model_digest(self.probs(), extra=centroids)

    def write(self, path, coded: CodedUtterance) -> int:
        """Write a .cmrl file; returns its size in bytes."""
        from .bitstream import write_cmrl

        return write_cmrl(path, [i.cpu().numpy() for i in coded.indices], self.probs(), sample_rate=self.sample_rate,
                          num_samples=coded.num_samples,
                          lsf_idx=coded.lsf_idx.cpu().numpy() if coded.lsf_idx is not None else None,
                          lsf_bits=tuple(self.lpc.bits_per_dim) if self.lpc is not None else None,
                          digest=self.digest())

    def read(self, path) -> CodedUtterance:
        """Read a .cmrl file written by this model (another model's file is refused by digest)."""
        from .bitstream import read_cmrl

        # Everything the decode depends on is checked against this model: digest (probs + centroids), LSF widths
        # (none without LPC), codes per frame, rate, and the frame count the declared length takes.
        stream = read_cmrl(path, self.probs(), digest=self.digest(),
                           lsf_bits=tuple(self.lpc.bits_per_dim) if self.lpc is not None else (),
                           code_length=self.model.cfg.code_len, sample_rate=self.sample_rate,
                           num_frames_for=lambda n: num_frames(n, self.frame_len, self.overlap))
        device = next(self.model.parameters()).device
        indices = [torch.as_tensor(c, dtype=torch.long, device=device) for c in stream.codes]
        lsf = torch.as_tensor(stream.lsf_idx, dtype=torch.long, device=device) if stream.lsf_idx is not None else None
        return CodedUtterance(indices, lsf, stream.num_samples)
