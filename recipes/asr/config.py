"""Structured configs of the ASR recipe: a typo or a wrong type fails before training.

Registered in Hydra's ConfigStore by ``run.py``; the YAML files under ``conf/`` fill
them in. Every hyperparameter the recipe uses is a field here, so every knob is
reachable from the command line (``model.num_layers=4``, ``prune.solver=fista``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from csprune.train.config import PruneConfig


@dataclass
class DataConfig:
    root: Optional[str] = None  # None: $AN4_ROOT, else data/an4
    cache_dir: Optional[str] = None  # fbank cache; None: ~/.cache/csprune/an4-fbank (the corpus is read-only)
    batch_size: int = 16  # fits the 2-core CPU step budget; AN4 has 948 train utterances
    eval_batch_size: int = 32  # decoding has no backward pass: larger batches are cheap
    max_train_utts: Optional[int] = None  # None: all 948 (smoke runs use a few)
    max_test_utts: Optional[int] = None  # None: all 130
    spec_augment: bool = True  # on for training only
    freq_masks: int = 2  # LibriSpeech LD policy
    freq_mask_width: int = 27  # LD policy F=27 of 80 bins
    time_masks: int = 2  # LD policy
    time_mask_width: int = 40  # 0.4 s: AN4 utterances are short


@dataclass
class ConformerCTCConfig:
    name: str = "conformer_ctc"
    d_model: int = 144  # Conformer-S width
    num_heads: int = 4  # Conformer-S
    ffn_dim: int = 576  # 4 x d_model
    num_layers: int = 5  # ~2.5M parameters, the size the founding design measured
    depthwise_conv_kernel_size: int = 15  # 0.6 s of context at 40 ms steps
    dropout: float = 0.1  # Conformer paper's P_drop
    use_group_norm: bool = False  # torchaudio default BatchNorm; GroupNorm is batch-independent (exact DDP equivalence)


@dataclass
class LSTMRNNTConfig:
    name: str = "lstm_rnnt"
    encoder_hidden_dim: int = 256  # ~1.6M transcriber parameters with 3 layers
    encoder_layers: int = 3  # enough depth for 28 characters on 40 min of audio
    bidirectional: bool = False  # streamable, the on-device RNN-T family
    embedding_dim: int = 64  # 29 symbols need no larger embedding
    predictor_hidden_dim: int = 256  # matches the encoder
    predictor_layers: int = 1  # short character context
    joint_dim: int = 128  # the joiner is most of a step's time; 128 cuts a step from 0.24 to 0.16 s, 29 outputs need no more
    dropout: float = 0.1  # light regularization for a small corpus
    layer_norm: bool = True  # LayerNorm after every transcriber layer: without it the transcriber learns too slowly and the transducer collapses onto its predictor
    ctc_weight: float = 0.3  # auxiliary CTC on the transcriber (ESPnet's usual 0.3): aligns it to the audio early


@dataclass
class TrainerConfig:
    epochs: int = 30  # dense training epochs (0 with init_from)
    lr: float = 2e-3  # AdamW peak LR; Conformer-S on small data trains well at 1e-3..3e-3
    weight_decay: float = 1e-2  # AdamW default-ish decoupled decay
    warmup_steps: int = 300  # ~5 epochs of linear warm-up: attention models need it
    grad_clip: float = 5.0  # CTC/RNN-T losses spike early; clipping keeps AdamW stable
    max_steps: Optional[int] = None  # cap on optimizer steps per stage (smoke runs)
    log_every: int = 20  # steps between scalar logs
    device: str = "auto"  # "auto": cuda when available, else cpu
    threads: Optional[int] = None  # torch CPU threads; None: torch's default
    micro_batches: int = 1  # shards per rank of each global batch, gradients accumulated (1 process x N == N DDP ranks)
    checkpoint_every: int = 0  # optimizer steps between training checkpoints (0: none; >0 also writes one at each stage's end)
    keep_last: int = 3  # newest training checkpoints kept: enough to survive a corrupt newest one
    resume: str = "false"  # false | true (newest valid checkpoint in output_dir/checkpoints, error if none) | auto (resume if any)
    max_bad_steps: int = 0  # non-finite loss/gradient steps skipped per stage before stopping (0: a NaN stops the run at once)


@dataclass
class ASRConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING  # ConformerCTCConfig or LSTMRNNTConfig, from the model/ group
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    prune: Optional[PruneConfig] = None  # selected with +prune=NAME
    seed: int = 0  # seeds data order, init, augmentation
    mode: str = "train"  # train | transcribe
    init_from: Optional[str] = None  # dense training checkpoint to start from (skips dense training)
    ckpt: Optional[str] = None  # transcribe: an exported model.safetensors
    input: Optional[str] = None  # transcribe: a WAV/FLAC file
    streaming: bool = False  # transcribe, lstm_rnnt: decode frame by frame (look-ahead: one encoder step), printing partials
    deploy: str = "dense"  # transcribe: dense | sparse (csprune.deploy: each pruned matrix in its fastest form, measured)
    output_dir: Optional[str] = None  # None: Hydra's run dir


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called before ``@hydra.main`` runs)."""
    from recipes.hydra_run import register_schemas

    register_schemas("asr_schema", ASRConfig, {"conformer_ctc_schema": ConformerCTCConfig, "lstm_rnnt_schema": LSTMRNNTConfig})
