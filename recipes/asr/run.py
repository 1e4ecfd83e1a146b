"""AN4 ASR recipe: dense training (or ``init_from``) → pruning with fine-tuning → evaluation → export.

    python recipes/asr/run.py                                   # dense Conformer-CTC
    python recipes/asr/run.py +prune=csp                         # ... then CSP to 70% + fine-tuning
    python recipes/asr/run.py -m +prune=csp,gmp prune.sparsity=0.5,0.9 init_from=outputs/.../dense.pt
    python recipes/asr/run.py mode=transcribe ckpt=RUN/model.safetensors input=FILE.wav

Each run folder holds metrics.json, TensorBoard events, dense.pt (the dense model, reusable with
``init_from``), model.safetensors (the sparse export) and Hydra's .hydra/.
"""

from __future__ import annotations

import dataclasses
import os
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
from csprune.train import tblog
from csprune.train.ddp import check_weights_agree, init_distributed, wrap_ddp
from csprune.train.an4 import read_audio
from csprune.train.checkpoint import check_compatible, compat_record, find_resume, load_checkpoint, save_checkpoint
from csprune.progress import progress
from csprune.train.config import build_pruner, method_label, validate_prune_config
from csprune.train.loop import fit, fit_config, warmup_cosine
from csprune.train.run import calibrate, launch, seed_everything, write_json
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


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called outside @hydra.main without output_dir
        return Path("outputs/asr/manual")


# Config keys that do not change the training trajectory: a checkpoint stays valid when they change.
# trainer.micro_batches is free because the shard count (DDP ranks x micro-batches) is checked instead:
# 2 ranks resumed as 1 process with micro_batches=2 compute the same steps.
RESUME_FREE = {"trainer": ("resume", "checkpoint_every", "keep_last", "threads", "device", "log_every", "micro_batches", "max_bad_steps"),
               "data": ("root", "cache_dir"), "": ("output_dir", "mode", "ckpt", "input")}


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
    container = OmegaConf.to_container(cfg, resolve=True)
    prune_cfg = container.get("prune")
    if prune_cfg is not None:
        validate_prune_config(prune_cfg)  # before any work
    tc = cfg.trainer
    if tc.checkpoint_every < 0 or tc.keep_last < 1:
        raise ConfigError(f"trainer.checkpoint_every={tc.checkpoint_every} / trainer.keep_last={tc.keep_last}: "
                         f"need checkpoint_every >= 0 and keep_last >= 1")
    wall_start, started_at = time.perf_counter(), time.time()
    run_dir = _run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    rank, world, device = init_distributed(cfg.trainer.device)
    main_rank = rank == 0
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    resumed = find_resume(tc.resume, ckpt_dir)
    state = resumed[1] if resumed else None

    init = load_checkpoint(cfg.init_from) if cfg.init_from else None
    vocab = CharVocab.from_dict(init["vocab"]) if init else CharVocab()
    model_cfg = init["model_config"] if init else container["model"]
    data = Data(cfg, vocab, GlobalCMVN.from_dict(init["cmvn"]) if init else None, cfg.seed, rank=rank, world=world)
    model = make_model(model_cfg, vocab).to(device)
    params = count_parameters(model)
    compat = compat_record(container, model, model_cfg, RESUME_FREE, shards=world * data.micro)
    if state is not None:
        check_compatible(state, compat, resumed[0])
        print(f"resuming from {resumed[0]} (stage {state['stage']}, step {state['progress']['step']})", flush=True)
    if main_rank:
        print(f"model {model_cfg['name']}: {params / 1e6:.2f}M parameters; {len(data.train_utts)} train / "
              f"{len(data.test_utts)} test utterances; {data.steps_per_epoch} steps/epoch; device {device}"
              f"{f'; {world} DDP ranks' if world > 1 else ''}", flush=True)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir)) if main_rank else None
    if writer is not None:
        tblog.log_config(writer, container)
    loss_fn = _loss(device)
    step = 0
    train_seconds = 0.0

    def saver(stage: str, extra: dict):
        """``fit``'s save callback: the whole training state, from the unwrapped module (rank 0 only)."""
        def save(progress: dict) -> None:
            if not main_rank or not (tc.checkpoint_every or progress.get("preempted")):  # SIGTERM always checkpoints
                return
            payload = {"stage": stage, "progress": progress, "model": model.state_dict(), "compat": compat,
                       "data": data.state_dict()}
            payload.update({k: (v() if callable(v) else v) for k, v in extra.items()})
            save_checkpoint(payload, ckpt_dir / f"ckpt-{progress['step']:08d}.pt", keep_last=tc.keep_last)
        return save

    data_rng = (data.rng_state, data.set_rng_state)
    if init is not None:
        model.load_state_dict(init["model"])
        dense_metrics = init.get("dense_metrics") or evaluate(model, data.test_batches(), vocab, device)
        print(f"initialized from {cfg.init_from}: dense WER {dense_metrics['wer']:.4f}", flush=True)
    elif state is not None and state["stage"] == "finetune":
        dense_metrics, train_seconds = state["dense_metrics"], state["train_seconds"]
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        total = tc.epochs * data.steps_per_epoch if tc.max_steps is None else min(tc.max_steps, tc.epochs * data.steps_per_epoch)
        sched = warmup_cosine(opt, tc.warmup_steps, total)
        progress = None
        if state is not None:  # stage "train"
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr_scheduler"])
            progress = state["progress"]
            train_seconds = state["train_seconds"]
        t0 = time.perf_counter() - train_seconds
        trained = wrap_ddp(model, world, device)
        save = saver("train", {"optimizer": opt.state_dict, "lr_scheduler": sched.state_dict,
                               "train_seconds": lambda: time.perf_counter() - t0})
        step = fit(trained, data.train_batches, loss_fn, opt, sched, fit_config(cfg, tc.epochs, "train"), writer=writer,
                   step=step, save=save, resume=progress, data_rng=data_rng)
        train_seconds = time.perf_counter() - t0
        dense_metrics = evaluate(model, data.test_batches(), vocab, device)
        if main_rank:
            save_checkpoint({"model": model.state_dict(), "model_config": model_cfg, "vocab": vocab.to_dict(),
                             "cmvn": data.cmvn.to_dict(), "dense_metrics": dense_metrics, "seed": cfg.seed},
                            run_dir / "dense.pt")
            print(f"dense: WER {dense_metrics['wer']:.4f} CER {dense_metrics['cer']:.4f} after {train_seconds:.0f}s", flush=True)
    if writer is not None:
        for k, v in dense_metrics.items():
            writer.add_scalar(f"eval_dense/{k}", v, step)

    metrics: dict[str, Any] = {
        "recipe": "asr", "model": model_cfg["name"], "params": params, "seed": cfg.seed, "primary_metric": "wer",
        "dense_wer": dense_metrics["wer"], "dense_cer": dense_metrics["cer"], "train_seconds": train_seconds,
        "method": "dense", "sparsity": 0.0, "world_size": world,
    }
    pruner = None
    if prune_cfg is not None:
        p = prune_cfg
        opt = torch.optim.AdamW(model.parameters(), lr=p["finetune_lr"], weight_decay=tc.weight_decay)
        ft_steps = p["finetune_epochs"] * data.steps_per_epoch
        if tc.max_steps is not None:
            ft_steps = min(ft_steps, tc.max_steps)
        sched = warmup_cosine(opt, p["finetune_warmup_steps"], ft_steps)
        pruner = build_pruner(model, p, opt, 0, data.steps_per_epoch, DEFAULT_TARGETS.get(model_cfg["name"]))
        progress, ft_before = None, 0.0
        if state is not None and state["stage"] == "finetune":
            model.load_state_dict(state["model"])
            pruner.load_state_dict(state["pruner"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["lr_scheduler"])
            metrics.update(state["metrics"])
            progress, ft_before = state["progress"], state["finetune_seconds"]
        t0 = time.perf_counter() - ft_before
        if p["schedule"] == "oneshot" and progress is None:
            calib = data.calib_batches(p["calib_batches"]) if p["calib_mode"] == "eval" else data.augmented_batches(p["calib_batches"])
            calibrate(pruner, model, calib, lambda batch: model(*batch.to(device).inputs()), p["calib_mode"])
            report = pruner.prune_to(p["sparsity"])
            if writer is not None:
                tblog.log_pruning(writer, pruner, report, step)
            oneshot = evaluate(model, data.test_batches(), vocab, device)
            metrics.update({f"oneshot_{k}": v for k, v in oneshot.items()})
            if main_rank:
                print(f"one-shot {p['method']} to {p['sparsity']}: WER {oneshot['wer']:.4f} before fine-tuning "
                      f"({report['seconds']:.1f}s pruning)", flush=True)
        trained = wrap_ddp(model, world, device)  # after the pruner's parametrizations exist
        save = saver("finetune", {"optimizer": opt.state_dict, "lr_scheduler": sched.state_dict, "pruner": pruner.state_dict,
                                  "dense_metrics": dense_metrics, "train_seconds": train_seconds,
                                  "metrics": lambda: {k: v for k, v in metrics.items() if k.startswith("oneshot_")},
                                  "finetune_seconds": lambda: time.perf_counter() - t0})
        step = fit(trained, data.train_batches, loss_fn, opt, sched, fit_config(cfg, p["finetune_epochs"], "finetune"),
                   pruner=pruner, writer=writer, step=step, save=save, resume=progress, data_rng=data_rng)
        metrics["finetune_seconds"] = time.perf_counter() - t0
        metrics["sparsity_actual"] = pruner.sparsity()["total"]
        metrics.update(method=p["method"], sparsity=p["sparsity"], schedule=p["schedule"],
                       label=method_label(p))
        if pruner.last_report:
            metrics.update(prune_stats_bytes=pruner.last_report.get("stats_bytes", 0),
                           prune_gram_bytes_peak=pruner.last_report.get("gram_bytes_peak", 0))
        pruner.finalize()
    check_weights_agree(model, world, on_disk=f"rank 0's dense.pt and training checkpoints in {run_dir}")
    if not main_rank:
        return metrics

    final = evaluate(model, data.test_batches(), vocab, device)
    metrics.update(final)
    ckpt = run_dir / "model.safetensors"
    meta = {"recipe": "asr", "model": model_cfg, "vocab": vocab.to_dict(), "cmvn": data.cmvn.to_dict(),
            "fbank": dataclasses.asdict(data.fbank), "metrics": {"wer": final["wer"], "cer": final["cer"]},
            "prune": prune_cfg}
    values_dtype = prune_cfg["values_dtype"] if prune_cfg else "float32"
    csprune.save_sparse(model, ckpt, values_dtype=values_dtype, meta=meta)
    dense_bytes = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    metrics.update(checkpoint_bytes=ckpt.stat().st_size, dense_bytes=dense_bytes,
                   compression_ratio=dense_bytes / ckpt.stat().st_size,
                   wall_seconds=time.perf_counter() - wall_start, started_at=started_at, finished_at=time.time(),
                   pid=os.getpid())
    for k in ("wer", "cer"):
        writer.add_scalar(f"eval/{k}", final[k], step)
    tblog.log_hparams(writer, container, {k: v for k, v in metrics.items() if k in (
        "wer", "cer", "dense_wer", "sparsity_actual", "checkpoint_bytes", "compression_ratio")})
    writer.close()
    write_json(run_dir / "metrics.json", metrics)
    print(f"final: WER {final['wer']:.4f} CER {final['cer']:.4f} | sparsity {metrics.get('sparsity_actual', 0.0):.3f} | "
          f"checkpoint {metrics['checkpoint_bytes'] / 1024:.1f} KiB ({metrics['compression_ratio']:.2f}x smaller than dense fp32) "
          f"| {run_dir}", flush=True)
    return metrics


def transcribe(cfg: DictConfig) -> str:
    """Print the transcript of ``cfg.input`` with the exported model ``cfg.ckpt``."""
    if not cfg.ckpt or not cfg.input:
        raise ConfigError("mode=transcribe needs ckpt=PATH/model.safetensors and input=FILE.wav")
    meta = csprune.read_sparse_meta(cfg.ckpt)
    for key in ("model", "vocab", "cmvn", "fbank"):
        if key not in meta:
            raise CheckpointError(cfg.ckpt, f"metadata lacks {key!r}; not an ASR recipe export")
    vocab = CharVocab.from_dict(meta["vocab"])
    model = make_model(meta["model"], vocab)
    csprune.load_sparse(cfg.ckpt, model=model)
    model.eval()
    fbank = FbankConfig(**meta["fbank"])
    wave = read_audio(cfg.input, fbank.sample_rate)
    feats = GlobalCMVN.from_dict(meta["cmvn"])(compute_fbank(wave, fbank))
    with torch.no_grad():
        ids = model.greedy_decode(feats.unsqueeze(0), torch.tensor([feats.shape[0]]))[0]
    text = vocab.decode(ids)
    print(text)
    return text


register_configs()

import hydra  # noqa: E402


@hydra.main(config_path="../../conf", config_name="asr", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return launch(run, cfg).get("wer")  # SIGTERM: exit 143 after the checkpoint; all ranks leave together


if __name__ == "__main__":
    main()
