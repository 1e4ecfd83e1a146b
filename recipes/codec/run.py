"""CMRL speech codec recipe on AN4: dense two-phase training (or ``init_from``) → pruning with fine-tuning
→ evaluation with real bitstreams → export.

    python recipes/codec/run.py                                   # dense 2-module CMRL near 16 kbit/s
    python recipes/codec/run.py +prune=csp prune.sparsity=0.7     # ... then CSP + fine-tuning
    python recipes/codec/run.py -m +prune=csp,gmp "prune.sparsity=choice(0.5,0.7,0.9)" init_from=RUN/dense.pt
    python recipes/codec/run.py mode=encode ckpt=RUN/model.safetensors input=x.wav output=x.cmrl
    python recipes/codec/run.py mode=decode ckpt=RUN/model.safetensors input=x.cmrl output=y.wav

Each run folder holds metrics.json, TensorBoard events (losses, entropy and bitrate per module, metrics,
reference vs decoded audio), dense.pt (reusable with ``init_from``), model.safetensors and .hydra/.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `recipes.codec` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import csprune
from csprune.errors import CheckpointError, ConfigError
from csprune.progress import progress
from csprune.train.an4 import AN4_SAMPLE_RATE, default_an4_root, read_an4_split, read_audio
from csprune.train.checkpoint import RESUME_FREE_TRAINER, check_compatible, compat_record, find_resume, load_checkpoint, save_checkpoint
from csprune.train.config import build_pruner
from csprune.train.ddp import check_weights_agree, wrap_ddp
from csprune.train.loop import fit, fit_config, warmup_cosine
from csprune.train.run import (RunContext, check_checkpointing, export_run, finish_pruning, launch, load_export, prune_oneshot,
                               saved_so_far, start_run, training_saver)
from recipes.hydra_run import run_dir
from recipes.codec.codec import CodedUtterance, SpeechCodec
from recipes.codec.config import register_configs
from recipes.codec.data import FrameBank, load_utterance
from recipes.codec.loss import CodecLoss, LossConfig
from recipes.codec.metrics import codec_metrics
from recipes.codec.model import CMRL, count_parameters

# Tensors pruned when prune.targets is null: every conv inside the residual stages and the down/up-sampling
# convs (99% of the weights); the 1-channel input/output convs are tiny and sit on the signal path.
DEFAULT_TARGETS = ["*.stage1.*", "*.stage2.*", "*.down", "*.up"]
log = logging.getLogger("csprune.codec")

SAMPLE_RATE = AN4_SAMPLE_RATE  # 16 kHz: AN4, and the rate the model is built for


# Config keys that do not change the training trajectory: a training checkpoint stays valid when they change.
RESUME_FREE = {"trainer": RESUME_FREE_TRAINER, "data": ("root", "eval_batch_size", "audio_samples"),
               "": ("output_dir", "mode", "ckpt", "input", "output", "deploy", "export_int8")}


def build_codec(model_cfg: dict, lpc_cfg: dict | None) -> SpeechCodec:
    """A SpeechCodec from config dicts: the model, framing, and the LPC front end when ``lpc_cfg``
    (``{"order", "preemph", "lsf_bits"}``) is given; None: no LPC."""
    kwargs = {k: v for k, v in model_cfg.items() if k not in ("name", "overlap")}
    model = CMRL(**kwargs)
    lpc = None
    if lpc_cfg:
        from recipes.codec.lpc import LPCFrontEnd

        lpc = LPCFrontEnd(order=lpc_cfg["order"], preemph=lpc_cfg["preemph"], lsf_bits=lpc_cfg["lsf_bits"], sample_rate=SAMPLE_RATE)
    return SpeechCodec(model, lpc, overlap=model_cfg.get("overlap", 32), sample_rate=SAMPLE_RATE)


class TrainStep:
    """``fit``'s loss function for one stage: frames -> codec loss, logging the terms every ``log_every`` calls.

    Args:
        codec: the codec (its model is the one ``fit`` trains).
        bank: training frames (signal domain).
        loss: the CodecLoss (rate controller state inside).
        upto: modules used; train_only: the module trained greedily (None: all together).
        writer, stage, first_step, log_every: TensorBoard logging.
    """

    def __init__(self, codec: SpeechCodec, bank: FrameBank, loss: CodecLoss, upto: int | None, train_only: int | None,
                 writer, stage: str, first_step: int, log_every: int):
        self.codec, self.bank, self.loss, self.upto, self.train_only = codec, bank, loss, upto, train_only
        self.writer, self.stage, self.step, self.log_every = writer, stage, first_step, log_every
        self.device = next(codec.model.parameters()).device
        self.last_modules: list[dict] = []  # the latest batch's module outputs (their code values, for a re-spread)
        self.amp = False  # trainer.amp: bf16 autocast of the model's forward (the loss stays float32)
        self.applied_steps = 0  # optimizer steps this stage has seen (after_step calls)
        self.respread_stop: int | None = None  # from this applied step on a collapse is warned about, not re-spread

    def __call__(self, model, index: torch.Tensor) -> torch.Tensor:
        frames = self.bank.frames[index].to(self.device)
        view = self.codec.training_view(frames)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = model(view["input"], upto=self.upto, train_only=self.train_only)
        decoded = self.codec.to_signal(out["decoded"].float(), view)
        trained = [self.train_only] if self.train_only is not None else None
        value = self.loss(decoded, view["target"], out["modules"], trained)
        self.last_modules = out["modules"]
        if self.writer is not None and self.step % self.log_every == 0:
            for key, v in self.loss.last.items():
                if key != "loss":
                    self.writer.add_scalar(f"{self.stage}/{key}", v, self.step)
        self.step += 1
        return value

    def after_step(self, applied: bool) -> None:
        """``fit``'s ``on_step``: move λ once per optimizer step; a module below its entropy floor is warned
        about (run log and TensorBoard ``rate/below_floor_m<m>``, never silent) and its centroids re-spread."""
        below = self.loss.step_rate_control(applied)
        self.applied_steps += 1
        late = self.respread_stop is not None and self.applied_steps >= self.respread_stop
        action = "left as is: too late in the stage to re-spread" if late else "its centroids are re-spread over its code values"
        model = self.codec.model.module if hasattr(self.codec.model, "module") else self.codec.model
        for m in below:
            rate = self.loss.rate_ema[m]
            floor = self.loss.floors[m] * self.loss.codes_per_second
            log.warning("codec %s step %d: module %d spends %.0f bit/s, below its entropy floor %.0f bit/s (budget %.0f): "
                        "collapsing; %s", self.stage, self.step, m, rate, floor, self.loss.budget_targets[m], action)
            if self.writer is not None:
                self.writer.add_scalar(f"rate/below_floor_m{m}", 1.0, self.step)
                self.writer.add_text("rate/warnings", f"{self.stage} step {self.step}: module {m} at {rate:.0f} bit/s, "
                                     f"below its floor {floor:.0f} bit/s; {action}", self.step)
            if m < len(self.last_modules) and not late:
                model.stages[m].quantizer.respread(self.last_modules[m]["values"])
                self.loss.respread_done(m)


def respread_stop(stage: str, total: int, until: float) -> int | None:
    """The applied step of a stage from which a collapse is only warned about (None: never).

    A greedy stage is followed by more training, so a re-spread there is always in time; the rule is for
    the stages whose codes get evaluated (joint, fine-tuning): none in their last ``1 − until`` of steps.
    """
    return None if stage.startswith("greedy") else int(math.ceil(until * total))


def shard_batches(batches: list[torch.Tensor], rank: int, world: int, micro: int) -> list:
    """This rank's shards of each global batch of frame indices: rows ``s::S`` for its ``micro`` shards
    ``s = rank·micro … (rank+1)·micro − 1`` of ``S = world·micro`` (the batch itself when S = 1)."""
    shards = world * micro
    if shards == 1:
        return batches
    return [[idx[s::shards] for s in range(rank * micro, (rank + 1) * micro)] for idx in batches]


def train_stage(codec: SpeechCodec, bank: FrameBank, loss: CodecLoss, cfg: DictConfig, *, params, lr: float, epochs: int,
                stage: str, step: int, writer, generator: torch.Generator, upto: int | None = None,
                train_only: int | None = None, pruner=None, optimizer=None, warmup: int | None = None,
                rank: int = 0, world: int = 1, saver: Callable[[str, dict], Callable[[dict], None]] | None = None,
                state: dict | None = None) -> int:
    """One training stage (a greedy module, the joint phase, or fine-tuning under a pruner); returns the step after it.

    Under DDP every rank draws the same global batches (same generator) and trains on its shards of
    them; ``trainer.micro_batches`` cuts them the same way in one process.

    ``saver(stage, extra)`` makes ``fit``'s checkpoint callback (None: no training checkpoints); this stage adds its
    optimizer, LR schedule and the rate controller to ``extra``. ``state``, a training checkpoint of this stage,
    continues it exactly from there (the caller has restored the model and the rate controller).
    """
    tc, d = cfg.trainer, cfg.data
    per_epoch = (d.frames_per_epoch or len(bank)) // d.batch_size or 1
    total = epochs * per_epoch if tc.max_steps is None else min(tc.max_steps, epochs * per_epoch)
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr, weight_decay=tc.weight_decay)
    sched = warmup_cosine(opt, tc.warmup_steps if warmup is None else warmup, max(total, 1))
    progress = None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        progress = state["progress"]
        step = progress["step"]
    count = None if d.frames_per_epoch is None else per_epoch
    step_fn = TrainStep(codec, bank, loss, upto, train_only, writer, stage, step, tc.log_every)
    step_fn.applied_steps = progress["done"] if progress else 0
    step_fn.amp = bool(tc.get("amp", False))
    step_fn.respread_stop = respread_stop(stage, total, loss.cfg.respread_until)
    loss.train()  # the rate controller adapts λ only in training mode
    micro = tc.micro_batches
    batches = lambda epoch: shard_batches(bank.batches(d.batch_size, count, generator), rank, world, micro)  # noqa: E731
    device = next(codec.model.parameters()).device
    # find_unused_parameters: a greedy stage leaves the other modules without gradient.
    trained = wrap_ddp(codec.model, world, device, forward="model", find_unused_parameters=train_only is not None)
    save = None if saver is None else saver(stage, {"optimizer": opt.state_dict, "lr_scheduler": sched.state_dict,
                                                    "loss": loss.controller_state})
    return fit(trained, batches, step_fn, opt, sched, fit_config(cfg, epochs, stage), pruner=pruner, writer=writer, step=step,
               on_step=step_fn.after_step, save=save, resume=progress, data_rng=(generator.get_state, generator.set_state))


@torch.no_grad()
def fit_coders(codec: SpeechCodec, bank: FrameBank, budgets: list[float] | None, frames: int = 16384,
               batch: int = 256) -> list[dict[str, float]]:
    """Fit every module's coder (``code_probs``, and the rate trim μ) on (up to) ``frames`` training frames.

    Module by module, each on the residual the (already fitted) modules before it leave at inference. With
    ``budgets`` (bit/s per module, ``loss.trim_rate``), module m is trimmed (:meth:`SoftToHardQuantizer.fit_coder`)
    to the total budget less what the modules before it now spend and what the later ones will:
    ``cap_m = Σ budgets − Σ_{j<m} bits_j − Σ_{j>m} min(budget_j, untrimmed_j)``. So each module keeps its share,
    except that bits a module cannot use (under its budget untrimmed) go to the others, as ``loss.spill`` gives
    them in training, and the total lands. Training lands a rate within the controller's oscillation; the trim
    takes the excess off (design §9). Returns per module ``{"bitrate_untrimmed", "bitrate", "rate_tradeoff"}``
    (bit/s on these frames).
    """
    if budgets is not None:
        untrimmed = [r["bitrate"] for r in fit_coders(codec, bank, None, frames, batch)]
    model = codec.model
    model.eval()
    step = max(1, len(bank) // frames)
    picked = bank.frames[::step][:frames]
    device = next(model.parameters()).device
    residual = torch.cat([codec.training_view(picked[i:i + batch].to(device))["input"] for i in range(0, picked.shape[0], batch)])
    cps, spent, report = codec.codes_per_second, 0.0, []
    for m, stage in enumerate(model.stages):
        values = torch.cat([torch.tanh(stage.encoder(part)) for part in residual.split(batch)])  # [N, code_len]
        free = stage.quantizer.fit_coder(values, None) * cps
        bits = free
        if budgets is not None:
            cap = sum(budgets) - spent - sum(min(b, r) for b, r in zip(budgets[m + 1:], untrimmed[m + 1:]))
            bits = stage.quantizer.fit_coder(values, cap / cps) * cps
        spent += bits
        report.append({"bitrate_untrimmed": free, "bitrate": bits, "rate_tradeoff": float(stage.quantizer.rate_tradeoff)})
        if m + 1 < len(model.stages):
            decoded = torch.cat([stage.decoder(stage.quantizer.dequantize(stage.quantizer.indices(v))) for v in values.split(batch)])
            residual = residual - decoded
    return report


def _fit_and_report(job: "Job", ctx: RunContext, tag: str) -> None:
    """:func:`fit_coders` after a stage, with ``loss.trim_rate``'s budgets; logged and in TensorBoard."""
    budgets = list(job.loss.budget_targets) if job.loss_cfg.trim_rate else None
    report = fit_coders(job.codec, job.bank, budgets)
    for m, r in enumerate(report):
        if ctx.main_rank:
            print(f"{tag} coder m{m}: {r['bitrate_untrimmed'] / 1000:.2f} -> {r['bitrate'] / 1000:.2f} kbit/s on training frames "
                  f"(rate trim mu={r['rate_tradeoff']:.2e})", flush=True)
            ctx.writer.add_scalar(f"rate/trim_m{m}", r["rate_tradeoff"], job.step)
            ctx.writer.add_scalar(f"rate/untrimmed_m{m}", r["bitrate_untrimmed"], job.step)


def _entropy_bits(counts: torch.Tensor) -> float:
    p = counts / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


@torch.no_grad()
def evaluate(codec: SpeechCodec, utts, waves, writer=None, step: int = 0, prefix: str = "eval", audio_samples: int = 0) -> dict[str, float]:
    """Code every test utterance through a real .cmrl file and score the decoded audio.

    Returns means over utterances of snr, segsnr, pesq, stoi; ``bitrate_entropy`` (empirical entropy of
    the test codes, per module, times codes per second, plus LPC side bits) and ``bitrate_real``
    (8·file bytes / duration), both in bit/s, and ``bitrate_m<m>`` per module.
    """
    codec.model.eval()
    per_utt: list[dict[str, float]] = []
    counts = [torch.zeros(s.quantizer.num_centroids) for s in codec.model.stages]
    total_bytes, total_samples = 0, 0
    with tempfile.TemporaryDirectory(prefix="cmrl-eval-") as tmp:
        for i, (utt, wave) in enumerate(progress(list(zip(utts, waves)), desc=prefix)):
            coded = codec.encode(wave)
            decoded = codec.decode(coded)
            path = Path(tmp) / f"{utt.utt_id}.cmrl"
            total_bytes += codec.write(path, coded)
            back = codec.read(path)
            if not all(torch.equal(a, b) for a, b in zip(coded.indices, back.indices)):
                raise RuntimeError(f"{utt.utt_id}: codes read back from the .cmrl file differ from the ones written")
            total_samples += wave.numel()
            for m, (stage, idx) in enumerate(zip(codec.model.stages, coded.indices)):
                counts[m] += stage.quantizer.count_codes(idx).cpu()
            per_utt.append(codec_metrics(wave.cpu().numpy(), decoded.cpu().numpy(), SAMPLE_RATE, name=utt.utt_id))
            if writer is not None and i < audio_samples:
                peak = max(float(wave.abs().max()), float(decoded.abs().max()), 1e-6)
                writer.add_audio(f"audio/{utt.utt_id}/reference", (wave / peak).unsqueeze(0).cpu(), step, sample_rate=SAMPLE_RATE)
                writer.add_audio(f"audio/{utt.utt_id}/{prefix}", (decoded / peak).unsqueeze(0).cpu(), step, sample_rate=SAMPLE_RATE)
    seconds = total_samples / SAMPLE_RATE
    out = {k: float(np.nanmean([u[k] for u in per_utt])) for k in per_utt[0]}
    module_bits = [_entropy_bits(c) * codec.codes_per_second for c in counts]
    out.update({f"bitrate_m{m}": b for m, b in enumerate(module_bits)})
    out["bitrate_entropy"] = sum(module_bits) + codec.side_bits_per_second
    out["bitrate_real"] = 8 * total_bytes / seconds
    out["pesq_failed"] = int(sum(np.isnan(u["pesq"]) for u in per_utt))
    if writer is not None:
        for k, v in out.items():
            writer.add_scalar(f"{prefix}/{k}", v, step)
    return out


@torch.no_grad()
def frame_snr_db(codec: SpeechCodec, frames: torch.Tensor, batch: int = 256) -> float:
    """SNR in dB of the hard-quantized reconstruction of signal frames [N, L] (a cheap check without PESQ)."""
    codec.model.eval()
    err, ref = 0.0, 0.0
    device = next(codec.model.parameters()).device
    for i in range(0, frames.shape[0], batch):
        view = codec.training_view(frames[i:i + batch].to(device))
        decoded = codec.to_signal(codec.model(view["input"], hard=True)["decoded"], view)
        err += float((decoded - view["target"]).pow(2).sum())
        ref += float(view["target"].pow(2).sum())
    return 10 * float(np.log10(max(ref, 1e-20) / max(err, 1e-20)))


def _describe(tag: str, m: dict[str, float]) -> str:
    return (f"{tag}: PESQ-WB {m['pesq']:.3f}, SNR {m['snr']:.2f} dB, segSNR {m['segsnr']:.2f} dB, STOI {m['stoi']:.3f}, "
            f"bitrate {m['bitrate_entropy'] / 1000:.2f} kbit/s (entropy) / {m['bitrate_real'] / 1000:.2f} kbit/s (file)")


@dataclasses.dataclass
class Job:
    """One codec run's model, loss (with the rate controller), data and position (made by :func:`prepare`)."""

    codec: SpeechCodec
    loss: CodecLoss
    loss_cfg: LossConfig
    bank: FrameBank
    test_utts: list
    test_waves: list
    test_frames: torch.Tensor  # every 8th test frame (~1.5k of 12k): a quick SNR without PESQ
    model_cfg: dict
    lpc_cfg: dict | None
    params: int
    init: dict | None
    generator: torch.Generator
    compat: dict  # what a training checkpoint must match to be resumed
    state: dict | None  # the training checkpoint resumed from
    step: int = 0
    train_seconds: float = 0.0

    def train(self, ctx: RunContext, extra: dict, state: dict | None = None, **stage) -> None:
        """One stage through :func:`train_stage`, with training checkpoints holding ``extra`` too; ``state``:
        the checkpoint of this stage to continue from."""
        def saver(name: str, stage_extra: dict) -> Callable[[dict], None]:
            return training_saver(ctx, name, self.codec.model, self.compat, {**extra, **stage_extra})

        self.step = train_stage(self.codec, self.bank, self.loss, ctx.cfg, step=self.step, writer=ctx.writer,
                                generator=self.generator, rank=ctx.rank, world=ctx.world, saver=saver, state=state, **stage)

    def evaluate(self, ctx: RunContext, prefix: str) -> dict[str, float]:
        return evaluate(self.codec, self.test_utts, self.test_waves, ctx.writer, self.step, prefix, ctx.cfg.data.audio_samples)


def prepare(ctx: RunContext) -> Job:
    """Stage 1: the dense start (``init_from``), the codec, its loss and the frames."""
    cfg, d = ctx.cfg, ctx.cfg.data
    if d.batch_size % (ctx.world * cfg.trainer.micro_batches):
        raise ConfigError(f"data.batch_size={d.batch_size}: must be divisible by {ctx.world} DDP ranks x "
                          f"trainer.micro_batches={cfg.trainer.micro_batches}")
    init = load_checkpoint(cfg.init_from) if cfg.init_from else None
    model_cfg = init["model_config"] if init else ctx.config["model"]
    lpc_cfg = init["lpc_config"] if init else (ctx.config["lpc_front_end"] if ctx.config["lpc"] else None)
    codec = build_codec(model_cfg, lpc_cfg)
    codec.model.to(ctx.device)
    root = Path(d.root) if d.root else default_an4_root()
    train_utts = read_an4_split(root, "train")[: d.max_train_utts]
    test_utts = read_an4_split(root, "test")[: d.max_test_utts]
    bank = FrameBank(train_utts, d.target_dbfs, codec.signal_frames)  # pre-emphasised frames with LPC
    test_waves = [load_utterance(u, d.target_dbfs) for u in test_utts]
    params = count_parameters(codec.model)
    if ctx.main_rank:
        print(f"model cmrl: {codec.model.num_modules} modules, {params / 1e6:.3f}M parameters"
              f"{' + LPC front end' if codec.lpc is not None else ''}; {len(train_utts)} train utterances ({len(bank)} frames), "
              f"{len(test_utts)} test; device {ctx.device}{f'; {ctx.world} DDP ranks' if ctx.world > 1 else ''}", flush=True)
    loss_cfg = LossConfig(**ctx.config["loss"])
    loss = CodecLoss(loss_cfg, codec.model.num_modules, codec.codes_per_second, codec.frame_len, SAMPLE_RATE,
                     codec.side_bits_per_second).to(ctx.device)
    test_frames = torch.cat([codec.signal_frames(w) for w in test_waves])[::8]
    compat = compat_record(ctx.config, codec.model, model_cfg, RESUME_FREE, shards=ctx.world * cfg.trainer.micro_batches)
    resumed = find_resume(cfg.trainer.resume, ctx.run_dir / "checkpoints")
    state = None
    if resumed is not None:
        check_compatible(resumed[1], compat, resumed[0])
        state = resumed[1]
        if ctx.main_rank:
            print(f"resuming from {resumed[0]} (stage {state['stage']}, step {state['progress']['step']})", flush=True)
    return Job(codec, loss, loss_cfg, bank, test_utts, test_waves, test_frames, model_cfg, lpc_cfg, params, init,
               torch.Generator().manual_seed(cfg.seed), compat, state)


def dense_stage(ctx: RunContext, job: Job) -> dict[str, float]:
    """Stage 2: load the dense codec, or train it greedily module by module, then jointly; save ``dense.pt``."""
    cfg, tc, model = ctx.cfg, ctx.cfg.trainer, job.codec.model
    if job.init is not None:
        model.load_state_dict(job.init["model"])
        if "rate_weight" in job.init:  # dense.pt files before the dual-ascent controller hold a τ of other meaning
            job.loss.rate_weight.copy_(job.init["rate_weight"])
        print(f"initialized from {cfg.init_from}: dense PESQ-WB {job.init['dense_metrics']['pesq']:.3f}", flush=True)
        return job.init["dense_metrics"]
    state = job.state
    if state is not None and state["stage"] == "finetune":  # stopped after dense.pt was written: fine-tuning resumes
        model.load_state_dict(load_checkpoint(ctx.run_dir / "dense.pt")["model"])
        job.train_seconds = state["train_seconds"]
        return state["dense_metrics"]
    # phase 1: greedy, module by module (each on the residual of the frozen ones before it); phase 2: all together
    stages = [{"params": model.stages[m].parameters(), "lr": tc.greedy_lr or tc.lr, "epochs": tc.greedy_epochs,
               "stage": f"greedy_m{m}", "upto": m + 1, "train_only": m} for m in range(model.num_modules)]
    stages.append({"params": model.parameters(), "lr": tc.lr, "epochs": tc.epochs, "stage": "joint"})
    first, before = 0, 0.0
    if state is not None:
        names = [s["stage"] for s in stages]
        if state["stage"] not in names:
            raise CheckpointError(ctx.run_dir / "checkpoints", f"a checkpoint of stage {state['stage']!r}; this run has {names}")
        first, before = names.index(state["stage"]), state["train_seconds"]
        model.load_state_dict(state["model"])
        job.loss.load_controller_state(state["loss"])
    t0 = time.perf_counter() - before
    extra = {"train_seconds": lambda: time.perf_counter() - t0}
    for i, stage in enumerate(stages[first:], start=first):
        job.train(ctx, extra, state if i == first else None, **stage)
    _fit_and_report(job, ctx, "dense")
    job.train_seconds = time.perf_counter() - t0
    if not ctx.main_rank:  # the other ranks wait in the next collective (or at the final barrier)
        return {}
    dense = job.evaluate(ctx, "eval_dense")
    save_checkpoint({"model": model.state_dict(), "model_config": job.model_cfg, "lpc_config": job.lpc_cfg,
                     "rate_weight": job.loss.rate_weight.detach().cpu(), "dense_metrics": dense, "seed": cfg.seed}, ctx.run_dir / "dense.pt")
    print(_describe(f"dense after {job.train_seconds:.0f}s", dense), flush=True)
    return dense


def prune_stage(ctx: RunContext, job: Job, metrics: dict, dense: dict) -> None:
    """Stage 3: prune (one-shot after calibration, or gradually) and fine-tune, resumably; a plain model after."""
    p, cfg, d, codec = ctx.prune, ctx.cfg, ctx.cfg.data, job.codec
    per_epoch = (d.frames_per_epoch or len(job.bank)) // d.batch_size or 1
    opt = torch.optim.Adam(codec.model.parameters(), lr=p["finetune_lr"], weight_decay=cfg.trainer.weight_decay)
    pruner = build_pruner(codec.model, p, opt, 0, per_epoch, DEFAULT_TARGETS)
    state = job.state if job.state is not None and job.state["stage"] == "finetune" else None
    before = 0.0
    if state is not None:  # after build_pruner: the checkpoint holds the masked parametrizations
        codec.model.load_state_dict(state["model"])
        pruner.load_state_dict(state["pruner"])
        job.loss.load_controller_state(state["loss"])
        metrics.update(state["metrics"])
        before = state["finetune_seconds"]
    t0 = time.perf_counter() - before
    if p["schedule"] == "oneshot" and state is None:
        calib = torch.Generator().manual_seed(cfg.seed + 1)  # clean training frames, hard-quantized as at inference
        frames = [job.bank.frames[torch.randint(len(job.bank), (d.batch_size,), generator=calib)] for _ in range(p["calib_batches"])]
        report = prune_oneshot(ctx, pruner, codec.model, frames,
                               lambda f: codec.model(codec.training_view(f.to(ctx.device))["input"], hard=True), job.step)
        if ctx.main_rank:
            metrics["oneshot_frame_snr"] = frame_snr_db(codec, job.test_frames)
            ctx.writer.add_scalar("eval_oneshot/frame_snr", metrics["oneshot_frame_snr"], job.step)
            print(f"one-shot {p['method']} to {p['sparsity']}: frame SNR {metrics['dense_frame_snr']:.2f} -> "
                  f"{metrics['oneshot_frame_snr']:.2f} dB before fine-tuning ({report['seconds']:.1f}s pruning)", flush=True)
    extra = {"pruner": pruner.state_dict, "dense_metrics": dense, "train_seconds": job.train_seconds,
             "metrics": lambda: {k: v for k, v in metrics.items() if k.startswith("oneshot_")},
             "finetune_seconds": lambda: time.perf_counter() - t0}
    job.train(ctx, extra, state, params=None, lr=p["finetune_lr"], epochs=p["finetune_epochs"], stage="finetune", pruner=pruner,
              optimizer=opt, warmup=p["finetune_warmup_steps"])
    _fit_and_report(job, ctx, "pruned")  # the coder's distribution must describe the pruned model's codes
    finish_pruning(ctx, pruner, metrics, time.perf_counter() - t0)


def export_stage(ctx: RunContext, job: Job, metrics: dict, dense: dict) -> dict[str, Any]:
    """Stage 4 (rank 0): evaluate through real .cmrl files, export, metrics.json."""
    if ctx.prune is not None:
        final = job.evaluate(ctx, "eval")
        metrics["frame_snr"] = frame_snr_db(job.codec, job.test_frames)
        print(_describe(f"{ctx.prune['method']} {ctx.prune['sparsity']}", final), flush=True)
    else:
        final = dense
        for k, v in final.items():
            ctx.writer.add_scalar(f"eval/{k}", v, job.step)
    metrics.update(final)
    meta = {"recipe": "codec", "model": job.model_cfg, "lpc": job.lpc_cfg, "sample_rate": SAMPLE_RATE,
            "target_dbfs": ctx.cfg.data.target_dbfs, "metrics": {k: final[k] for k in ("pesq", "snr", "stoi", "bitrate_real")},
            "prune": ctx.prune}
    if ctx.prune is not None and ctx.cfg.get("export_int8", False):
        metrics.update(int8_export(ctx, job, meta))
    return export_run(ctx, job.codec.model, metrics, meta, HPARAM_METRICS,
                      f"PESQ-WB {final['pesq']:.3f} | {final['bitrate_real'] / 1000:.2f} kbit/s")


def int8_export(ctx: RunContext, job: Job, meta: dict) -> dict[str, float]:
    """What a deployer ships: the pruned model with int8 values (per-row scales), written as
    ``model_int8.safetensors`` and evaluated through real .cmrl files like the float model. Returns its
    ``int8_*`` metrics and ``checkpoint_int8_bytes``."""
    path = ctx.run_dir / "model_int8.safetensors"
    csprune.save_sparse(job.codec.model, path, values_dtype="int8", meta=meta)
    int8 = load_codec(str(path))
    int8.model.to(next(job.codec.model.parameters()).device)
    scores = evaluate(int8, job.test_utts, job.test_waves, ctx.writer, job.step, "eval_int8")
    print(_describe(f"int8 values ({path.stat().st_size / 1024:.1f} KiB)", scores), flush=True)
    return {"checkpoint_int8_bytes": path.stat().st_size, **{f"int8_{k}": v for k, v in scores.items()}}


# Metrics shown in TensorBoard's HParams dashboard.
HPARAM_METRICS = ("pesq", "snr", "stoi", "bitrate_real", "dense_pesq", "sparsity_actual", "checkpoint_bytes", "compression_ratio",
                  "int8_pesq", "checkpoint_int8_bytes")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or load), prune, evaluate and export; returns the metrics (also written to metrics.json)."""
    if cfg.mode == "encode":
        return encode_file(cfg)
    if cfg.mode == "decode":
        return decode_file(cfg)
    if cfg.mode != "train":
        raise ConfigError(f"mode={cfg.mode!r}: expected train, encode or decode")
    check_checkpointing(cfg.trainer)
    ctx = start_run(cfg, OmegaConf.to_container(cfg, resolve=True), run_dir(cfg, "outputs/codec/manual"))
    job = prepare(ctx)
    dense = dense_stage(ctx, job)
    metrics: dict[str, Any] = {
        "recipe": "codec", "model": "cmrl", "params": job.params, "seed": cfg.seed, "primary_metric": "pesq",
        "lpc": job.codec.lpc is not None, "psychoacoustic": job.loss_cfg.psychoacoustic,
        "target_bitrate": job.loss_cfg.target_bitrate, "train_seconds": job.train_seconds, "method": "dense", "sparsity": 0.0,
        **{f"dense_{k}": v for k, v in dense.items()},
    }
    if ctx.main_rank:
        metrics["dense_frame_snr"] = frame_snr_db(job.codec, job.test_frames)  # the model as loaded, before any pruning
    if ctx.prune is not None:
        prune_stage(ctx, job, metrics, dense)
    check_weights_agree(job.codec.model, ctx.world, on_disk=saved_so_far(ctx))
    return export_stage(ctx, job, metrics, dense) if ctx.main_rank else metrics


def load_codec(ckpt: str, deploy: str = "dense", example: Callable[[SpeechCodec], Any] | None = None) -> SpeechCodec:
    """The codec of an exported model.safetensors (its metadata says how to build it).

    Args:
        ckpt: the export.
        deploy: ``dense`` | ``sparse`` (``csprune.train.run.load_export``).
        example: with ``deploy="sparse"``, the workload to time the matrices on (run once on the loaded codec).
    """
    meta = csprune.read_sparse_meta(ckpt)
    if meta.get("recipe") != "codec" or "model" not in meta:
        raise CheckpointError(ckpt, f"not a codec recipe export (metadata recipe={meta.get('recipe')!r})")
    codec = build_codec(meta["model"], meta.get("lpc"))
    # built here with its LPC front end and framing, so it is deployed in place (small: no meta device needed)
    codec.model = load_export(ckpt, lambda: codec.model, deploy, None if example is None else (lambda _model: example(codec)))
    return codec


def _need(cfg: DictConfig, *keys: str) -> None:
    missing = [k for k in keys if not cfg.get(k)]
    if missing:
        raise ConfigError(f"mode={cfg.mode} needs {', '.join(f'{k}=...' for k in missing)} "
                         f"(e.g. ckpt=RUN/model.safetensors input=x.wav output=x.cmrl)")


def encode_file(cfg: DictConfig) -> dict[str, Any]:
    """mode=encode: WAV (any rate: resampled to 16 kHz, channels averaged) -> .cmrl file."""
    _need(cfg, "ckpt", "input", "output")
    wave = read_audio(cfg.input, SAMPLE_RATE)
    codec = load_codec(cfg.ckpt, cfg.deploy, lambda c: c.encode(wave[:SAMPLE_RATE]))  # deploy times on the first second
    coded = codec.encode(wave)
    size = codec.write(cfg.output, coded)
    seconds = wave.numel() / SAMPLE_RATE
    print(f"{cfg.input} -> {cfg.output}: {size} bytes, {seconds:.2f} s, {8 * size / max(seconds, 1e-9) / 1000:.2f} kbit/s")
    return {"bytes": size, "seconds": seconds, "bitrate_real": 8 * size / max(seconds, 1e-9)}


def decode_file(cfg: DictConfig) -> dict[str, Any]:
    """mode=decode: .cmrl file -> 16-bit WAV at 16 kHz."""
    import soundfile as sf

    _need(cfg, "ckpt", "input", "output")
    codec = load_codec(cfg.ckpt, cfg.deploy, lambda c: c.decode(c.encode(torch.zeros(SAMPLE_RATE))))  # 1 s: the shapes decode sees
    coded: CodedUtterance = codec.read(cfg.input)
    wave = codec.decode(coded)
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    sf.write(cfg.output, wave.cpu().numpy(), SAMPLE_RATE, subtype="FLOAT")  # float: the exact decoded samples
    print(f"{cfg.input} -> {cfg.output}: {wave.numel()} samples at {SAMPLE_RATE} Hz")
    return {"samples": wave.numel(), "wave": wave}


register_configs()

import hydra  # noqa: E402


@hydra.main(config_path="../../conf", config_name="codec", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return launch(run, cfg).get("pesq")  # all ranks leave together; SIGTERM exits 143


if __name__ == "__main__":
    main()
