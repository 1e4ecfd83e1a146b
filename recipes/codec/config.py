"""Structured configs of the codec recipe: a typo or a wrong type fails before training.

Registered in Hydra's ConfigStore by ``run.py``; ``conf/codec.yaml`` and the shared groups fill them in
(``data: an4``, ``model: cmrl``, ``trainer: codec`` or ``smoke``, ``+prune=NAME``). Every hyperparameter the
recipe uses is a field here, reachable from the command line (``model.num_modules=3``, ``loss.target_bitrate=24000``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from csprune.train.config import PruneConfig
from recipes.codec.loss import LossConfig

__all__ = ["CodecDataConfig", "CMRLConfig", "CodecTrainerConfig", "LPCConfig", "CodecConfig", "register_configs"]


@dataclass
class CodecDataConfig:
    root: Optional[str] = None  # None: $AN4_ROOT, else data/an4
    target_dbfs: float = -26.0  # loudness every utterance is normalised to (ITU-T P.56 practice for codec tests)
    batch_size: int = 64  # frames per step (Kankanahalli: 128; halved for the 2-core CPU)
    frames_per_epoch: Optional[int] = 4096  # random frames drawn per epoch (None: all 85k train frames, ~1 h of CPU an epoch)
    eval_batch_size: int = 256  # frames per forward pass at evaluation (no backward: large is cheap)
    max_train_utts: Optional[int] = None  # None: all 948
    max_test_utts: Optional[int] = None  # None: all 130
    audio_samples: int = 2  # test utterances written to TensorBoard as audio (reference and decoded)


@dataclass
class CMRLConfig:
    name: str = "cmrl"
    num_modules: int = 2  # CMRL's ~16 kbps configuration
    frame_len: int = 512  # 32 ms at 16 kHz
    overlap: int = 32  # Hann crossfade between frames (hop 480)
    wide: int = 100  # Kankanahalli-Net widths
    narrow: int = 20
    kernel: int = 9
    dilations: List[int] = field(default_factory=lambda: [1, 2])
    blocks: int = 6  # residual blocks per stage: ~0.46M parameters a module
    centroids: int = 32  # quantizer levels
    straight_through: bool = True  # train on hard values (soft gradients); false: soft values as in Kankanahalli-Net
    signal_scale: float = 0.05  # RMS of -26 dBFS speech: the nets work on unit-scale signals


@dataclass
class LPCConfig:
    """The LPC front end's settings (used when ``lpc=true``)."""

    order: int = 16  # wideband LPC order (AMR-WB uses 16)
    preemph: float = 0.68  # AMR-WB's pre-emphasis factor
    lsf_bits: int = 40  # bits per frame for the 16 LSFs (~1.3 kbit/s at 33.3 frames/s)


@dataclass
class CodecTrainerConfig:
    greedy_epochs: int = 3  # phase 1: epochs per module, trained one at a time on the residual of the ones before
    epochs: int = 6  # phase 2: epochs of all modules together
    lr: float = 1e-3  # Adam; Kankanahalli trains at 1e-4..2e-4 for far longer -- a short CPU budget needs more
    greedy_lr: Optional[float] = None  # None: lr
    weight_decay: float = 0.0  # codec nets are not over-fitting AN4 in a few epochs
    warmup_steps: int = 50  # short linear warm-up, then cosine
    grad_clip: float = 1.0  # the entropy term and the soft quantizer give occasional spikes
    max_steps: Optional[int] = None  # cap on optimizer steps per stage (smoke runs)
    log_every: int = 20  # steps between scalar logs
    device: str = "auto"  # "auto": cuda when available, else cpu
    amp: bool = False  # bf16 autocast of the model's forward (CUDA: tensor cores; on this CPU bf16 convs are slower)
    threads: Optional[int] = None  # torch CPU threads; None: torch's default
    micro_batches: int = 1  # shards per rank of each global batch, gradients accumulated (1 process x N == N DDP ranks)
    max_bad_steps: int = 0  # non-finite loss/gradient steps skipped per stage before stopping (0: a NaN stops the run at once)
    checkpoint_every: int = 0  # optimizer steps between training checkpoints (0: none; SIGTERM always writes one):
    #   trainer=codec_cpu takes 2-3 h, so a run that is stopped continues with trainer.resume=auto
    keep_last: int = 3  # newest training checkpoints kept: enough to survive a corrupt newest one
    resume: str = "false"  # false | true (newest valid checkpoint in output_dir/checkpoints, error if none) | auto (resume if any)


@dataclass
class CodecConfig:
    data: CodecDataConfig = field(default_factory=CodecDataConfig)
    model: Any = field(default_factory=CMRLConfig)
    trainer: CodecTrainerConfig = field(default_factory=CodecTrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lpc: bool = False  # true: the modules code the LPC residual (the collaborative-quantization variant)
    lpc_front_end: LPCConfig = field(default_factory=LPCConfig)
    prune: Optional[PruneConfig] = None  # selected with +prune=NAME
    seed: int = 0  # seeds init and frame sampling
    mode: str = "train"  # train | encode | decode
    init_from: Optional[str] = None  # dense.pt of an earlier run: skips dense training
    ckpt: Optional[str] = None  # encode/decode: an exported model.safetensors
    input: Optional[str] = None  # encode: a WAV; decode: a .cmrl file
    output: Optional[str] = None  # encode: the .cmrl to write; decode: the WAV to write
    export_int8: bool = True  # pruned runs also write model_int8.safetensors (int8 values) and evaluate it: what a deployer ships
    deploy: str = "dense"  # encode/decode: dense | sparse (csprune.deploy: each pruned matrix in its fastest form, measured)
    output_dir: Optional[str] = None  # None: Hydra's run dir


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called before ``@hydra.main`` runs)."""
    from recipes.hydra_run import register_schemas

    register_schemas("codec_schema", CodecConfig, {"cmrl_schema": CMRLConfig})
