"""AN4 ASR recipe: dense training (or ``init_from``) → pruning with fine-tuning → evaluation → export.

    python recipes/asr/run.py                                   # dense Conformer-CTC
    python recipes/asr/run.py +prune=csp                         # ... then CSP to 70% + fine-tuning
    python recipes/asr/run.py -m +prune=csp,gmp prune.sparsity=0.5,0.9 init_from=outputs/.../dense.pt
    python recipes/asr/run.py mode=transcribe ckpt=RUN/model.safetensors input=FILE.wav

Each run folder holds metrics.json, TensorBoard events, dense.pt (the dense model, reusable with
``init_from``), model.safetensors (the sparse export) and Hydra's .hydra/.
"""

from __future__ import annotations

import copy
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
from csprune import tblog
from csprune.checkpoint import load_checkpoint, save_checkpoint
from csprune.recipe import build_pruner, fit, seed_everything, validate_prune_config, warmup_cosine, write_json
from recipes.asr.config import register_configs
from recipes.asr.data import AN4Dataset, LengthBucketBatchSampler, collate_asr, default_an4_root, read_an4_split
from recipes.asr.features import FbankConfig, FeatureCache, GlobalCMVN, SpecAugment, compute_fbank
from recipes.asr.models import build_model, count_parameters
from recipes.asr.text import CharVocab, char_error_rate, word_error_rate

# Tensors the pruner targets when prune.targets is null: the encoder blocks of the Conformer (the
# subsampling convs and the output layer are small and sensitive); every supported weight of the RNN-T.
DEFAULT_TARGETS = {"conformer_ctc": ["encoder.*"], "lstm_rnnt": None}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_kwargs(model_cfg: dict) -> tuple[str, dict]:
    cfg = dict(model_cfg)
    return cfg.pop("name"), cfg


def make_model(model_cfg: dict, vocab: CharVocab) -> torch.nn.Module:
    name, kwargs = model_kwargs(model_cfg)
    return build_model(name, len(vocab), **kwargs)


class Data:
    """AN4 splits, features, CMVN and loaders for one run."""

    def __init__(self, cfg: DictConfig, vocab: CharVocab, cmvn: GlobalCMVN | None, seed: int):
        d = cfg.data
        root = Path(d.root) if d.root else default_an4_root()
        self.train_utts = read_an4_split(root, "train")[: d.max_train_utts]
        self.test_utts = read_an4_split(root, "test")[: d.max_test_utts]
        self.fbank = FbankConfig()
        self.cache = FeatureCache(d.cache_dir, self.fbank)
        self.cache.precompute(self.train_utts + self.test_utts, progress=sys.stdout.isatty())
        self.cmvn = cmvn or GlobalCMVN.fit(self.cache.get(u) for u in self.train_utts)
        augment = SpecAugment(d.freq_masks, d.freq_mask_width, d.time_masks, d.time_mask_width, seed=seed) if d.spec_augment else None
        self.train = AN4Dataset(self.train_utts, self.cache, vocab, self.cmvn, augment)
        self.train_plain = AN4Dataset(self.train_utts, self.cache, vocab, self.cmvn, None)
        self.test = AN4Dataset(self.test_utts, self.cache, vocab, self.cmvn, None)
        self.batch_size, self.eval_batch_size, self.seed = d.batch_size, d.eval_batch_size, seed
        self.sampler = LengthBucketBatchSampler(self.train.num_frames, d.batch_size, shuffle=True, seed=seed)

    def train_batches(self, epoch: int):
        self.sampler.set_epoch(epoch)
        return [collate_asr([self.train[i] for i in idx]) for idx in self.sampler]

    def calib_batches(self, count: int):
        sampler = LengthBucketBatchSampler(self.train_plain.num_frames, self.batch_size, shuffle=True, seed=self.seed + 1)
        return [collate_asr([self.train_plain[i] for i in idx]) for idx in list(sampler)[:count]]

    def test_batches(self):
        sampler = LengthBucketBatchSampler(self.test.num_frames, self.eval_batch_size, shuffle=False)
        return [collate_asr([self.test[i] for i in idx]) for idx in sampler]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, vocab: CharVocab, device: torch.device) -> dict[str, float]:
    """Greedy-decoding WER and CER over the given batches."""
    model.eval()
    refs, hyps = [], []
    for batch in batches:
        b = batch.to(device)
        for ids in model.greedy_decode(b.feats, b.feat_lens):
            hyps.append(vocab.decode(ids))
        refs.extend(batch.texts)
    return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps)}


def _loss(device):
    def loss_fn(model, batch):
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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, prune, evaluate and export; returns the metrics (also written to metrics.json)."""
    if cfg.mode == "transcribe":
        return {"transcript": transcribe(cfg)}
    if cfg.mode != "train":
        raise ValueError(f"mode={cfg.mode!r}: expected train or transcribe")
    container = OmegaConf.to_container(cfg, resolve=True)
    prune_cfg = container.get("prune")
    if prune_cfg is not None:
        validate_prune_config(prune_cfg)  # before any work
    wall_start = time.perf_counter()
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = resolve_device(cfg.trainer.device)
    seed_everything(cfg.seed)

    init = load_checkpoint(cfg.init_from) if cfg.init_from else None
    vocab = CharVocab.from_dict(init["vocab"]) if init else CharVocab()
    model_cfg = init["model_config"] if init else container["model"]
    data = Data(cfg, vocab, GlobalCMVN.from_dict(init["cmvn"]) if init else None, cfg.seed)
    model = make_model(model_cfg, vocab).to(device)
    params = count_parameters(model)
    print(f"model {model_cfg['name']}: {params / 1e6:.2f}M parameters; {len(data.train_utts)} train / "
          f"{len(data.test_utts)} test utterances; {data.steps_per_epoch} steps/epoch; device {device}", flush=True)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    tblog.log_config(writer, container)
    loss_fn = _loss(device)
    tc = cfg.trainer
    step = 0
    train_seconds = 0.0
    if init is not None:
        model.load_state_dict(init["model"])
        dense_metrics = init.get("dense_metrics") or evaluate(model, data.test_batches(), vocab, device)
        print(f"initialized from {cfg.init_from}: dense WER {dense_metrics['wer']:.4f}", flush=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        total = tc.epochs * data.steps_per_epoch if tc.max_steps is None else min(tc.max_steps, tc.epochs * data.steps_per_epoch)
        sched = warmup_cosine(opt, tc.warmup_steps, total)
        t0 = time.perf_counter()
        step = fit(model, data.train_batches, loss_fn, opt, sched, tc.epochs, writer=writer, step=step,
                   max_steps=tc.max_steps, grad_clip=tc.grad_clip, log_every=tc.log_every, stage="train")
        train_seconds = time.perf_counter() - t0
        dense_metrics = evaluate(model, data.test_batches(), vocab, device)
        save_checkpoint({"model": model.state_dict(), "model_config": model_cfg, "vocab": vocab.to_dict(),
                         "cmvn": data.cmvn.to_dict(), "dense_metrics": dense_metrics, "seed": cfg.seed},
                        run_dir / "dense.pt")
        print(f"dense: WER {dense_metrics['wer']:.4f} CER {dense_metrics['cer']:.4f} after {train_seconds:.0f}s", flush=True)
    for k, v in dense_metrics.items():
        writer.add_scalar(f"eval_dense/{k}", v, step)

    metrics: dict[str, Any] = {
        "recipe": "asr", "model": model_cfg["name"], "params": params, "seed": cfg.seed, "primary_metric": "wer",
        "dense_wer": dense_metrics["wer"], "dense_cer": dense_metrics["cer"], "train_seconds": train_seconds,
        "method": "dense", "sparsity": 0.0,
    }
    pruner = None
    if prune_cfg is not None:
        p = prune_cfg
        opt = torch.optim.AdamW(model.parameters(), lr=p["finetune_lr"], weight_decay=tc.weight_decay)
        ft_steps = p["finetune_epochs"] * data.steps_per_epoch
        if tc.max_steps is not None:
            ft_steps = min(ft_steps, tc.max_steps)
        sched = warmup_cosine(opt, 0, ft_steps)
        pruner = build_pruner(model, p, opt, 0, data.steps_per_epoch, DEFAULT_TARGETS.get(model_cfg["name"]))
        t0 = time.perf_counter()
        if p["schedule"] == "oneshot":
            if pruner.stats is not None:  # observe clean training batches, then prune once
                pruner.stats.enabled = True
                model.eval()
                with torch.no_grad():
                    for batch in data.calib_batches(p["calib_batches"]):
                        model(*batch.to(device).inputs())
                pruner.stats.enabled = False
            report = pruner.prune_to(p["sparsity"])
            tblog.log_pruning(writer, pruner, report, step)
            oneshot = evaluate(model, data.test_batches(), vocab, device)
            metrics.update({f"oneshot_{k}": v for k, v in oneshot.items()})
            print(f"one-shot {p['method']} to {p['sparsity']}: WER {oneshot['wer']:.4f} before fine-tuning "
                  f"({report['seconds']:.1f}s pruning)", flush=True)
        step = fit(model, data.train_batches, loss_fn, opt, sched, p["finetune_epochs"], pruner=pruner, writer=writer,
                   step=step, max_steps=tc.max_steps, grad_clip=tc.grad_clip, log_every=tc.log_every, stage="finetune")
        metrics["finetune_seconds"] = time.perf_counter() - t0
        metrics["sparsity_actual"] = pruner.sparsity()["total"]
        metrics.update(method=p["method"], sparsity=p["sparsity"])
        pruner.finalize()

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
                   wall_seconds=time.perf_counter() - wall_start)
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
        raise ValueError("mode=transcribe needs ckpt=PATH/model.safetensors and input=FILE.wav")
    meta = csprune.read_sparse_meta(cfg.ckpt)
    for key in ("model", "vocab", "cmvn", "fbank"):
        if key not in meta:
            raise ValueError(f"{cfg.ckpt}: metadata lacks {key!r}; not an ASR recipe export")
    vocab = CharVocab.from_dict(meta["vocab"])
    model = make_model(meta["model"], vocab)
    csprune.load_sparse(cfg.ckpt, model=model)
    model.eval()
    fbank = FbankConfig(**meta["fbank"])
    wave = read_any_audio(cfg.input, fbank.sample_rate)
    feats = GlobalCMVN.from_dict(meta["cmvn"])(compute_fbank(wave, fbank))
    with torch.no_grad():
        ids = model.greedy_decode(feats.unsqueeze(0), torch.tensor([feats.shape[0]]))[0]
    text = vocab.decode(ids)
    print(text)
    return text


def read_any_audio(path: str, sample_rate: int) -> torch.Tensor:
    """Mono waveform [samples] at ``sample_rate`` from any file soundfile reads (resampled if needed)."""
    import soundfile as sf
    import torchaudio

    if not Path(path).is_file():
        raise FileNotFoundError(f"input={path}: no such file")
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = torch.from_numpy(audio.mean(axis=1))
    if rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave


register_configs()

import hydra  # noqa: E402


@hydra.main(config_path="../../conf", config_name="asr", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    return metrics.get("wer")


if __name__ == "__main__":
    main()
