"""AN4 ASR recipe: dense training (or ``init_from``) → pruning with fine-tuning → evaluation → export.

    python recipes/asr/run.py                                   # dense Conformer-CTC
    python recipes/asr/run.py +prune=csp                         # ... then CSP to 70% + fine-tuning
    python recipes/asr/run.py -m +prune=csp,gmp prune.sparsity=0.5,0.9 init_from=outputs/.../dense.pt
    python recipes/asr/run.py mode=transcribe ckpt=RUN/model.safetensors input=FILE.wav [deploy=sparse] [streaming=true]

Each run folder holds metrics.json, TensorBoard events, dense.pt (the dense model, reusable with
``init_from``), model.safetensors (the sparse export) and Hydra's .hydra/.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `recipes.asr` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from omegaconf import DictConfig, OmegaConf

import csprune
from csprune.errors import CheckpointError, ConfigError
from csprune.progress import progress
from csprune.train.an4 import read_audio
from csprune.train.checkpoint import RESUME_FREE_TRAINER, check_compatible, compat_record, find_resume, load_checkpoint, save_checkpoint
from csprune.train.config import build_pruner
from csprune.train.ddp import check_weights_agree, wrap_ddp
from csprune.train.loop import fit, fit_config, warmup_cosine
from csprune.train.run import (RunContext, check_checkpointing, export_run, finish_pruning, launch, load_export, prune_oneshot,
                               saved_so_far, start_run, training_saver)
from recipes.hydra_run import run_dir
from recipes.asr.config import register_configs
from recipes.asr.data import ASRBatch, AN4Dataset, LengthBucketBatchSampler, collate_asr, default_an4_root, read_an4_split
from recipes.asr.features import FbankConfig, FeatureCache, GlobalCMVN, SpecAugment, compute_fbank
from recipes.asr.models import build_model, count_parameters
from recipes.asr.text import CharVocab, char_error_rate, word_error_rate

# Tensors the pruner targets when prune.targets is null: the encoder blocks of the Conformer (the
# subsampling convs and the output layer are small and sensitive); every supported weight of the RNN-T.
DEFAULT_TARGETS = {"conformer_ctc": ["encoder.*"], "lstm_rnnt": None}


def model_kwargs(model_cfg: dict) -> tuple[str, dict]:
    cfg = dict(model_cfg)
    return cfg.pop("name"), cfg


def make_model(model_cfg: dict, vocab: CharVocab) -> torch.nn.Module:
    name, kwargs = model_kwargs(model_cfg)
    return build_model(name, len(vocab), **kwargs)


class Data:
    """AN4 splits, features, CMVN and loaders for one run.

    Under DDP (``world`` > 1) every rank draws the same global batches (same sampler, same
    SpecAugment stream) and keeps rows ``rank::world`` of each, padded like the global batch, so
    the ranks' average gradient is the one-process gradient of the same global batch.
    """

    def __init__(self, cfg: DictConfig, vocab: CharVocab, cmvn: GlobalCMVN | None, seed: int, rank: int = 0, world: int = 1):
        d = cfg.data
        micro = cfg.trainer.get("micro_batches", 1)
        if micro < 1 or d.batch_size % (world * micro):
            raise ConfigError(f"data.batch_size={d.batch_size}: must be divisible by {world} DDP ranks x "
                             f"trainer.micro_batches={micro} (each shard takes batch_size/{world * micro} rows)")
        root = Path(d.root) if d.root else default_an4_root()
        self.rank, self.world, self.micro = rank, world, micro
        self.train_utts = read_an4_split(root, "train")[: d.max_train_utts]
        self.test_utts = read_an4_split(root, "test")[: d.max_test_utts]
        self.fbank = FbankConfig()
        self.cache = FeatureCache(d.cache_dir, self.fbank)
        self.cache.precompute(self.train_utts + self.test_utts, progress=sys.stdout.isatty() and rank == 0)
        self.cmvn = cmvn or GlobalCMVN.fit(self.cache.get(u) for u in self.train_utts)
        self.augment = SpecAugment(d.freq_masks, d.freq_mask_width, d.time_masks, d.time_mask_width, seed=seed) if d.spec_augment else None
        self.train = AN4Dataset(self.train_utts, self.cache, vocab, self.cmvn, self.augment)
        self.train_plain = AN4Dataset(self.train_utts, self.cache, vocab, self.cmvn, None)
        self.test = AN4Dataset(self.test_utts, self.cache, vocab, self.cmvn, None)
        self.batch_size, self.eval_batch_size, self.seed = d.batch_size, d.eval_batch_size, seed
        self.sampler = LengthBucketBatchSampler(self.train.num_frames, d.batch_size, shuffle=True, seed=seed)

    def _shard(self, batch: ASRBatch):
        """This rank's micro-batches of a global batch, each with the loss weight that makes the mean exact.

        The global batch is cut into ``S = world·micro`` shards (rows ``s::S``); rank r takes shards
        ``r·micro … (r+1)·micro − 1``. ``Σ weight·mean(shard) / S`` over all shards is the global mean.
        """
        shards = self.world * self.micro
        if shards == 1:
            return batch
        out = []
        for s in range(self.rank * self.micro, (self.rank + 1) * self.micro):
            idx = list(range(s, len(batch), shards))
            frames, tokens = int(batch.feat_lens[idx].max()), max(int(batch.token_lens[idx].max()), 1)
            part = ASRBatch(batch.feats[idx, :frames], batch.feat_lens[idx], batch.tokens[idx, :tokens], batch.token_lens[idx],
                            [batch.utt_ids[i] for i in idx], [batch.texts[i] for i in idx])
            out.append((part, len(idx) * shards / len(batch)))
        return out

    def _global_batches(self, sampler) -> list[list[int]]:
        # A global batch needs a row for every shard; shorter ones (at most a last short batch) are dropped.
        return [idx for idx in sampler if len(idx) >= self.world * self.micro]

    def train_batches(self, epoch: int):
        """This rank's batches of ``epoch`` (ASRBatch, or (ASRBatch, loss weight) under DDP)."""
        self.sampler.set_epoch(epoch)
        return [self._shard(collate_asr([self.train[i] for i in idx])) for idx in self._global_batches(self.sampler)]

    def calib_batches(self, count: int):
        sampler = LengthBucketBatchSampler(self.train_plain.num_frames, self.batch_size, shuffle=True, seed=self.seed + 1)
        out = [self._shard(collate_asr([self.train_plain[i] for i in idx])) for idx in self._global_batches(sampler)[:count]]
        return [part for b in out for part, _ in b] if self.world * self.micro > 1 else out

    def augmented_batches(self, count: int):
        """``count`` SpecAugment'd training batches (one-shot calibration in train mode), all rows of each
        global batch on every rank (the statistics are all-reduced; no shard weights needed)."""
        sampler = LengthBucketBatchSampler(self.train.num_frames, self.batch_size, shuffle=True, seed=self.seed + 1)
        return [collate_asr([self.train[i] for i in idx]) for idx in self._global_batches(sampler)[:count]]

    def test_batches(self):
        sampler = LengthBucketBatchSampler(self.test.num_frames, self.eval_batch_size, shuffle=False)
        return [collate_asr([self.test[i] for i in idx]) for idx in sampler]

    def rng_state(self) -> dict:
        """State of the data pipeline's own randomness (SpecAugment's generator; the sampler is seeded per epoch)."""
        return {"augment": self.augment.generator.get_state()} if self.augment is not None else {}

    def set_rng_state(self, state: dict) -> None:
        if self.augment is not None and "augment" in state:
            self.augment.generator.set_state(state["augment"])

    def state_dict(self) -> dict:
        """Data order record: the sampler's seed and batch size (the epoch and position live in ``progress``)."""
        return {"seed": self.seed, "batch_size": self.batch_size, "world": self.world, **self.rng_state()}

    @property
    def steps_per_epoch(self) -> int:
        return len(self._global_batches(self.sampler))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, vocab: CharVocab, device: torch.device) -> dict[str, float]:
    """Greedy-decoding WER and CER over the given batches."""
    model.eval()
    refs, hyps = [], []
    for batch in progress(batches, desc="evaluate"):
        b = batch.to(device)
        for ids in model.greedy_decode(b.feats, b.feat_lens):
            hyps.append(vocab.decode(ids))
        refs.extend(batch.texts)
    return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps)}


def _loss(device):
    def loss_fn(model, batch):
        if isinstance(batch, tuple):  # a shard: (rows of a global batch, weight); model may be the DDP loss wrapper
            part, weight = batch
            forward = model.loss if hasattr(model, "loss") else model
            return forward(*part.to(device).inputs()) * weight
        return model.loss(*batch.to(device).inputs())

    return loss_fn


# Config keys that do not change the training trajectory: a checkpoint stays valid when they change.
# trainer.micro_batches is free because the shard count (DDP ranks x micro-batches) is checked instead:
# 2 ranks resumed as 1 process with micro_batches=2 compute the same steps.
RESUME_FREE = {"trainer": RESUME_FREE_TRAINER,
               "data": ("root", "cache_dir"), "": ("output_dir", "mode", "ckpt", "input", "streaming", "deploy")}


@dataclasses.dataclass
class Job:
    """One training run's model, data and resume state (made by :func:`prepare`)."""

    vocab: CharVocab
    model_cfg: dict
    data: Data
    model: torch.nn.Module
    params: int
    compat: dict
    init: dict | None  # the init_from checkpoint
    state: dict | None  # the training checkpoint resumed from
    loss_fn: Any  # fit's loss function, one for the whole run
    step: int = 0
    train_seconds: float = 0.0

    def saver(self, ctx: RunContext, stage: str, extra: dict):
        """``fit``'s save callback: the whole training state, the data pipeline's included."""
        return training_saver(ctx, stage, self.model, self.compat, {"data": self.data.state_dict, **extra})

    def fit(self, ctx: RunContext, optimizer, scheduler, epochs: int, stage: str, save, resume, pruner=None) -> None:
        trained = wrap_ddp(self.model, ctx.world, ctx.device)  # after any pruner's parametrizations exist
        self.step = fit(trained, self.data.train_batches, self.loss_fn, optimizer, scheduler,
                        fit_config(ctx.cfg, epochs, stage), pruner=pruner, writer=ctx.writer, step=self.step, save=save,
                        resume=resume, data_rng=(self.data.rng_state, self.data.set_rng_state))

    def evaluate(self, ctx: RunContext) -> dict[str, float]:
        return evaluate(self.model, self.data.test_batches(), self.vocab, ctx.device)


def prepare(ctx: RunContext) -> Job:
    """Stage 1: the dense start (``init_from``), the data, the model and the checkpoint to resume from."""
    cfg = ctx.cfg
    resumed = find_resume(cfg.trainer.resume, ctx.run_dir / "checkpoints")
    init = load_checkpoint(cfg.init_from) if cfg.init_from else None
    vocab = CharVocab.from_dict(init["vocab"]) if init else CharVocab()
    model_cfg = init["model_config"] if init else ctx.config["model"]
    data = Data(cfg, vocab, GlobalCMVN.from_dict(init["cmvn"]) if init else None, cfg.seed, rank=ctx.rank, world=ctx.world)
    model = make_model(model_cfg, vocab).to(ctx.device)
    params = count_parameters(model)
    compat = compat_record(ctx.config, model, model_cfg, RESUME_FREE, shards=ctx.world * data.micro)
    state = resumed[1] if resumed else None
    if state is not None:
        check_compatible(state, compat, resumed[0])
        print(f"resuming from {resumed[0]} (stage {state['stage']}, step {state['progress']['step']})", flush=True)
    if ctx.main_rank:
        print(f"model {model_cfg['name']}: {params / 1e6:.2f}M parameters; {len(data.train_utts)} train / "
              f"{len(data.test_utts)} test utterances; {data.steps_per_epoch} steps/epoch; device {ctx.device}"
              f"{f'; {ctx.world} DDP ranks' if ctx.world > 1 else ''}", flush=True)
    return Job(vocab, model_cfg, data, model, params, compat, init, state, _loss(ctx.device))


def dense_stage(ctx: RunContext, job: Job) -> dict[str, float]:
    """Stage 2: load the dense model, or train it (resumably) and save ``dense.pt``; returns its WER/CER."""
    cfg, tc, model, state = ctx.cfg, ctx.cfg.trainer, job.model, job.state
    if job.init is not None:
        model.load_state_dict(job.init["model"])
        dense = job.init.get("dense_metrics") or job.evaluate(ctx)
        print(f"initialized from {cfg.init_from}: dense WER {dense['wer']:.4f}", flush=True)
    elif state is not None and state["stage"] == "finetune":
        dense, job.train_seconds = state["dense_metrics"], state["train_seconds"]
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        steps = job.data.steps_per_epoch * tc.epochs
        sched = warmup_cosine(opt, tc.warmup_steps, steps if tc.max_steps is None else min(tc.max_steps, steps))
        progress = None
        if state is not None:  # stage "train"
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr_scheduler"])
            progress, job.train_seconds = state["progress"], state["train_seconds"]
        t0 = time.perf_counter() - job.train_seconds
        save = job.saver(ctx, "train", {"optimizer": opt.state_dict, "lr_scheduler": sched.state_dict,
                                        "train_seconds": lambda: time.perf_counter() - t0})
        job.fit(ctx, opt, sched, tc.epochs, "train", save, progress)
        job.train_seconds = time.perf_counter() - t0
        dense = job.evaluate(ctx)
        if ctx.main_rank:
            save_checkpoint({"model": model.state_dict(), "model_config": job.model_cfg, "vocab": job.vocab.to_dict(),
                             "cmvn": job.data.cmvn.to_dict(), "dense_metrics": dense, "seed": cfg.seed},
                            ctx.run_dir / "dense.pt")
            print(f"dense: WER {dense['wer']:.4f} CER {dense['cer']:.4f} after {job.train_seconds:.0f}s", flush=True)
    if ctx.writer is not None:
        for k, v in dense.items():
            ctx.writer.add_scalar(f"eval_dense/{k}", v, job.step)
    return dense


def prune_stage(ctx: RunContext, job: Job, metrics: dict, dense: dict) -> None:
    """Stage 3: prune (one-shot after calibration, or gradually) and fine-tune, resumably; a plain model after."""
    p, tc, model, state, data = ctx.prune, ctx.cfg.trainer, job.model, job.state, job.data
    opt = torch.optim.AdamW(model.parameters(), lr=p["finetune_lr"], weight_decay=tc.weight_decay)
    steps = p["finetune_epochs"] * data.steps_per_epoch
    sched = warmup_cosine(opt, p["finetune_warmup_steps"], steps if tc.max_steps is None else min(steps, tc.max_steps))
    pruner = build_pruner(model, p, opt, 0, data.steps_per_epoch, DEFAULT_TARGETS.get(job.model_cfg["name"]))
    progress, before = None, 0.0
    if state is not None and state["stage"] == "finetune":
        model.load_state_dict(state["model"])
        pruner.load_state_dict(state["pruner"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        metrics.update(state["metrics"])
        progress, before = state["progress"], state["finetune_seconds"]
    t0 = time.perf_counter() - before
    if p["schedule"] == "oneshot" and progress is None:
        calib = data.calib_batches(p["calib_batches"]) if p["calib_mode"] == "eval" else data.augmented_batches(p["calib_batches"])
        report = prune_oneshot(ctx, pruner, model, calib, lambda batch: model(*batch.to(ctx.device).inputs()), job.step)
        oneshot = job.evaluate(ctx)
        metrics.update({f"oneshot_{k}": v for k, v in oneshot.items()})
        if ctx.main_rank:
            print(f"one-shot {p['method']} to {p['sparsity']}: WER {oneshot['wer']:.4f} before fine-tuning "
                  f"({report['seconds']:.1f}s pruning)", flush=True)
    save = job.saver(ctx, "finetune", {"optimizer": opt.state_dict, "lr_scheduler": sched.state_dict, "pruner": pruner.state_dict,
                                       "dense_metrics": dense, "train_seconds": job.train_seconds,
                                       "metrics": lambda: {k: v for k, v in metrics.items() if k.startswith("oneshot_")},
                                       "finetune_seconds": lambda: time.perf_counter() - t0})
    job.fit(ctx, opt, sched, p["finetune_epochs"], "finetune", save, progress, pruner=pruner)
    finish_pruning(ctx, pruner, metrics, time.perf_counter() - t0)


def export_stage(ctx: RunContext, job: Job, metrics: dict) -> dict[str, Any]:
    """Stage 4 (rank 0): final WER/CER, the sparse export and metrics.json."""
    final = job.evaluate(ctx)
    metrics.update(final)
    for k in ("wer", "cer"):
        ctx.writer.add_scalar(f"eval/{k}", final[k], job.step)
    meta = {"recipe": "asr", "model": job.model_cfg, "vocab": job.vocab.to_dict(), "cmvn": job.data.cmvn.to_dict(),
            "fbank": dataclasses.asdict(job.data.fbank), "metrics": final, "prune": ctx.prune}
    return export_run(ctx, job.model, metrics, meta, HPARAM_METRICS, f"WER {final['wer']:.4f} CER {final['cer']:.4f}")


# Metrics shown in TensorBoard's HParams dashboard.
HPARAM_METRICS = ("wer", "cer", "dense_wer", "sparsity_actual", "checkpoint_bytes", "compression_ratio")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, prune, evaluate and export; returns the metrics (also written to metrics.json).

    Under torchrun (``WORLD_SIZE`` > 1) every rank runs this; rank 0 alone writes checkpoints,
    events, metrics and the export. With ``trainer.checkpoint_every`` > 0 a training checkpoint is
    written every that many steps and at the end of each stage; ``trainer.resume`` continues from the
    newest valid one.
    """
    if cfg.mode == "transcribe":
        return {"transcript": transcribe(cfg)}
    if cfg.mode != "train":
        raise ConfigError(f"mode={cfg.mode!r}: expected train or transcribe")
    check_checkpointing(cfg.trainer)
    ctx = start_run(cfg, OmegaConf.to_container(cfg, resolve=True), run_dir(cfg, "outputs/asr/manual"))
    job = prepare(ctx)
    dense = dense_stage(ctx, job)
    metrics: dict[str, Any] = {
        "recipe": "asr", "model": job.model_cfg["name"], "params": job.params, "seed": cfg.seed, "primary_metric": "wer",
        "dense_wer": dense["wer"], "dense_cer": dense["cer"], "train_seconds": job.train_seconds,
        "method": "dense", "sparsity": 0.0, "world_size": ctx.world,
    }
    if ctx.prune is not None:
        prune_stage(ctx, job, metrics, dense)
    check_weights_agree(job.model, ctx.world, on_disk=saved_so_far(ctx))
    return export_stage(ctx, job, metrics) if ctx.main_rank else metrics


def transcribe(cfg: DictConfig) -> str:
    """Print the transcript of ``cfg.input`` with the exported model ``cfg.ckpt`` (``deploy=sparse``: in its deployed
    form; ``streaming=true``: frame by frame, partial hypotheses on stderr as they grow)."""
    if not cfg.ckpt or not cfg.input:
        raise ConfigError("mode=transcribe needs ckpt=PATH/model.safetensors and input=FILE.wav")
    meta = csprune.read_sparse_meta(cfg.ckpt)
    for key in ("model", "vocab", "cmvn", "fbank"):
        if key not in meta:
            raise CheckpointError(cfg.ckpt, f"metadata lacks {key!r}; not an ASR recipe export")
    if cfg.streaming and meta["model"]["name"] != "lstm_rnnt":
        raise ConfigError(f"streaming=true needs an lstm_rnnt export; {cfg.ckpt} holds {meta['model']['name']}")
    vocab = CharVocab.from_dict(meta["vocab"])
    fbank = FbankConfig(**meta["fbank"])
    wave = read_audio(cfg.input, fbank.sample_rate)
    feats = GlobalCMVN.from_dict(meta["cmvn"])(compute_fbank(wave, fbank))
    decode = _streaming_decode(vocab, feats, show=True) if cfg.streaming else _full_decode(feats)
    model = load_export(cfg.ckpt, lambda: make_model(meta["model"], vocab), cfg.deploy,
                        _streaming_decode(vocab, feats, show=False) if cfg.streaming else decode)
    text = vocab.decode(decode(model))
    print(text)
    return text


def _full_decode(feats: torch.Tensor):
    def decode(model) -> list[int]:
        with torch.inference_mode():
            return model.greedy_decode(feats.unsqueeze(0), torch.tensor([feats.shape[0]]))[0]
    return decode


def _streaming_decode(vocab: CharVocab, feats: torch.Tensor, show: bool):
    """Frame-by-frame decoding of ``feats`` (fed one encoder step at a time, as a microphone would)."""
    from recipes.asr.streaming import StreamingGreedyRNNT

    def decode(model) -> list[int]:
        stream = StreamingGreedyRNNT(model)
        for chunk in feats.split(stream.reduction):
            if stream.push(chunk) and show:
                print(f"partial: {vocab.decode(stream.tokens)}", file=sys.stderr, flush=True)
        return stream.finish()
    return decode


register_configs()

import hydra  # noqa: E402


@hydra.main(config_path="../../conf", config_name="asr", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return launch(run, cfg).get("wer")  # SIGTERM: exit 143 after the checkpoint; all ranks leave together


if __name__ == "__main__":
    main()
