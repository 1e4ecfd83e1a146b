"""Dense against deployed (``csprune.deploy``) pruned ASR models at batch 1 on one CPU thread, side by side in one run.

For each sparsity the model is pruned per layer with ``Magnitude`` (the deploy forms depend on the zeros, not on
how they were chosen), exported with ``save_sparse``, and loaded twice: dense (``load_sparse`` into the model) and
deployed (``csprune.deploy.load``; ``build_for_load`` builds a model this small on the CPU, since the meta device would
cost more than the dense weights it saves). Then:

- **latency per layer kind**: median over the layers of a kind of the timed µs per call, dense vs csr, on the
  input each layer sees in the workload (one row for the streaming RNN-T, the utterance's frames for the Conformer);
- **real-time factor** (compute seconds per second of audio) of streaming RNN-T transcription (``model=lstm_rnnt``,
  ``recipes/asr/streaming.py``, 4 frames a step, same code for both) and of full-utterance Conformer-CTC greedy
  decoding, on one ``--seconds`` long utterance (an AN4 test utterance cut or tiled to it), medians of interleaved
  repeats; features are computed once outside the timing;
- **weight bytes read per second of audio**: calls of each weight matrix in the run × its bytes in its form (the
  parameters no form touches, norms, biases, depthwise convolutions, are the same in both and left out);
- **memory**: bytes of all tensors each model holds, and peak RSS of a child process that loads the checkpoint (dense: ``load_sparse``; deployed:
  ``csprune.deploy.load``) and transcribes once (torch's import included, the same in both).

Transcripts of dense and deployed must match (printed). Goals (issue #15): RNN-T at 0.9 ≥ 2× faster end to end and
≥ 3× fewer weight bytes read; Conformer-CTC at 0.9 ≥ 1.3× faster.

    AN4_ROOT=../shared/data/an4 python bench/deploy.py [--sparsities 0.5,0.7,0.9,0.95] [--repeats 7]
        [--rnnt outputs/asr/dense_rnnt_v2/model.safetensors] [--conformer outputs/asr/dense_conformer/model.safetensors]

A model whose checkpoint is missing is built untrained from the recipe's defaults (said in the output): timings
hold, but the untrained RNN-T emits other tokens, so its predictor runs a different number of times.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import csprune  # noqa: E402
from csprune import deploy as dep  # noqa: E402
from csprune.methods import Magnitude  # noqa: E402

DEFAULT_CKPTS = {"lstm_rnnt": "outputs/asr/dense_rnnt_v2/model.safetensors",
                 "conformer_ctc": "outputs/asr/dense_conformer/model.safetensors"}


def _recipe():
    from recipes.asr import run as asr_run
    from recipes.asr.features import FbankConfig, GlobalCMVN, compute_fbank
    from recipes.asr.text import CharVocab

    return asr_run, FbankConfig, GlobalCMVN, compute_fbank, CharVocab


def load_meta(ckpt: str | None, name: str) -> dict:
    """The export's metadata, or the recipe's defaults for an untrained model."""
    if ckpt and Path(ckpt).exists():
        return csprune.read_sparse_meta(ckpt)
    from omegaconf import OmegaConf

    from recipes.asr.config import ConformerCTCConfig, LSTMRNNTConfig
    _, FbankConfig, _, _, CharVocab = _recipe()
    import dataclasses

    cfg = OmegaConf.to_container(OmegaConf.structured(LSTMRNNTConfig if name == "lstm_rnnt" else ConformerCTCConfig))
    return {"model": cfg, "vocab": CharVocab().to_dict(), "cmvn": None, "fbank": dataclasses.asdict(FbankConfig())}


def build(meta: dict, device: str = "cpu") -> torch.nn.Module:
    asr_run, _, _, _, CharVocab = _recipe()
    with torch.device(device):
        model = asr_run.make_model(meta["model"], CharVocab.from_dict(meta["vocab"]))
    return model.eval()


def utterance_features(meta: dict, seconds: float) -> torch.Tensor:
    """``[T, F]`` CMVN'd features of an AN4 test utterance cut or tiled to ``seconds`` (noise without AN4)."""
    _, FbankConfig, GlobalCMVN, compute_fbank, _ = _recipe()
    fb = FbankConfig(**meta["fbank"])
    samples = int(seconds * fb.sample_rate)
    root = os.environ.get("AN4_ROOT")
    if root and Path(root).exists():
        from csprune.train.an4 import read_audio
        from recipes.asr.data import read_an4_split

        utt = min(read_an4_split(root, "test"), key=lambda u: abs(u.num_samples - samples))
        wave = read_audio(utt.audio_path, fb.sample_rate)
        wave = wave.repeat(samples // wave.numel() + 1)[:samples]
    else:
        wave = torch.randn(samples, generator=torch.Generator().manual_seed(0)) * 0.05
    feats = compute_fbank(wave, fb)
    return GlobalCMVN.from_dict(meta["cmvn"])(feats) if meta.get("cmvn") else (feats - feats.mean(0)) / feats.std(0)


def transcriber(name: str, feats: torch.Tensor):
    """The workload: model -> token ids (streaming greedy for the RNN-T, full-utterance greedy for the CTC model)."""
    if name == "lstm_rnnt":
        from recipes.asr.streaming import StreamingGreedyRNNT

        def run(model):
            stream = StreamingGreedyRNNT(model)
            for chunk in feats.split(4):
                stream.push(chunk)
            return stream.finish()
    else:
        def run(model):
            with torch.inference_mode():
                return model.greedy_decode(feats.unsqueeze(0), torch.tensor([feats.shape[0]]))[0]
    return run


def targets_of(name: str):
    from recipes.asr.run import DEFAULT_TARGETS

    return DEFAULT_TARGETS.get(name)


def count_bytes(model: torch.nn.Module, run) -> tuple[int, int, dict]:
    """(bytes read as deployed, bytes the same calls read dense, calls per matrix name) in one ``run(model)``.

    A matrix reads its weight once per call: a product over many rows (a whole utterance) once, a streaming
    step's matrix-vector product once per step. LSTM matrices are counted per ``step`` (each layer's ``ih`` and
    ``hh``) and per sequence ``forward`` (``ih`` once, ``hh`` once per time step), since the fused dense cell
    takes the weights without calling the matrix modules.
    """
    calls = defaultdict(int)
    lstm_matrices = {id(m) for lstm in model.modules() if isinstance(lstm, dep.DeployedLSTM) for m in lstm.modules()}
    hooks = [m.register_forward_pre_hook(lambda mod, _args: calls.__setitem__(mod, calls[mod] + 1))
             for m in model.modules() if isinstance(m, dep.SparseMatrix) and id(m) not in lstm_matrices]
    originals = {}
    for lstm in model.modules():
        if isinstance(lstm, dep.DeployedLSTM):
            def counted_step(x, state=None, _lstm=lstm, _step=lstm.step):
                for index in range(_lstm.num_layers):
                    calls[_lstm.ih[index]] += 1
                    calls[_lstm.hh[index]] += 1
                return _step(x, state)

            def on_forward(mod, args):
                steps = args[0].shape[1 if mod.batch_first else 0]
                for index in range(len(mod.ih)):
                    calls[mod.ih[index]] += 1
                    calls[mod.hh[index]] += steps

            originals[lstm] = lstm.step
            lstm.step = counted_step
            hooks.append(lstm.register_forward_pre_hook(on_forward))
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
        for lstm, step in originals.items():
            lstm.step = step
    deployed = sum(n * m.weight_bytes() for m, n in calls.items())
    dense = sum(n * (m.shape[0] * m.shape[1] * 4 + (0 if m.bias is None else m.bias.numel() * 4)) for m, n in calls.items())
    names = {m: name for name, m in model.named_modules()}
    return deployed, dense, {names[m]: n for m, n in calls.items()}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters, buffers, deployed matrices in their form)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.layout == torch.strided)
    total += sum(m.weight_bytes() for m in model.modules() if isinstance(m, dep.SparseMatrix))
    return total


def child(args) -> None:
    """Peak RSS of loading one checkpoint (dense or deployed) and transcribing once: prints JSON."""
    torch.set_num_threads(1)
    meta = csprune.read_sparse_meta(args.child_ckpt)
    feats = utterance_features(meta, args.seconds)
    run = transcriber(meta["model"]["name"], feats)
    if args.child_mode == "dense":
        model = build(meta)
        csprune.load_sparse(args.child_ckpt, model=model)
        if meta["model"]["name"] == "lstm_rnnt":
            from recipes.asr.streaming import prepare_streaming

            prepare_streaming(model)
    else:
        model = dep.build_for_load(args.child_ckpt, lambda: build(meta))
        dep.load(args.child_ckpt, model, run)
    run(model)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": int(hwm.split()[1]) / 1024}))


def peak_rss(ckpt: str, mode: str, seconds: float) -> float:
    out = subprocess.run([sys.executable, __file__, "--child-ckpt", ckpt, "--child-mode", mode, "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, interleaved so drifts in machine load hit both."""
    times = defaultdict(list)
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, ckpt: str | None, sparsities: list[float], seconds: float, repeats: int, tmp: Path) -> list[dict]:
    meta = load_meta(ckpt, name)
    trained = bool(ckpt and Path(ckpt).exists())
    base = build(meta)
    if trained:
        csprune.load_sparse(ckpt, model=base)
    feats = utterance_features(meta, seconds)
    run = transcriber(name, feats)
    print(f"\n## {name} ({'trained: ' + ckpt if trained else 'untrained recipe defaults'}), {seconds:.1f} s utterance, "
          f"{feats.shape[0]} frames", flush=True)
    rows = []
    for sparsity in sparsities:
        model = copy.deepcopy(base)
        csprune.prune_once(model, Magnitude(), sparsity=sparsity, targets=targets_of(name), exclude=["*.bias"])
        path = tmp / f"{name}_{sparsity}.safetensors"
        csprune.save_sparse(model, path, meta={k: v for k, v in meta.items() if v is not None} | {"model": meta["model"]})
        dense = build(meta)
        csprune.load_sparse(path, model=dense)
        dense_mb = model_bytes(dense) / 1e6  # before streaming gives its LSTMs a stepper (which shares nothing)
        deployed = dep.build_for_load(path, lambda: build(meta))
        report = dep.load(path, deployed, run)
        if name == "lstm_rnnt":
            from recipes.asr.streaming import prepare_streaming

            prepare_streaming(dense)  # the same streaming code: the dense LSTMs step through torch's fused lstm_cell
        same = run(dense) == run(deployed)
        t = interleaved({"dense": lambda: run(dense), "deployed": lambda: run(deployed)}, repeats)
        read, read_dense, calls = count_bytes(deployed, run)  # the same calls, each matrix counted in its form and dense
        # Amdahl: the share of the dense run spent in weight products bounds what any sparse form can gain
        by_name = {d.name: d for d in report.decisions}
        products_dense = sum(n * by_name[name].micros["dense"] for name, n in calls.items()) * 1e-6
        kinds = defaultdict(lambda: defaultdict(list))
        for d in report.decisions:
            for form, micros in d.micros.items():
                kinds[d.kind][form].append(micros)
            kinds[d.kind]["chosen"].append(d.micros[d.form])
        row = {"model": name, "sparsity": sparsity, "rtf_dense": t["dense"] / seconds, "rtf_deployed": t["deployed"] / seconds,
               "speedup": t["dense"] / t["deployed"], "same_transcript": same,
               "products_share": products_dense / t["dense"], "speedup_bound": 1 / max(1 - products_dense / t["dense"], 1e-9),
               "bytes_per_s_dense": read_dense / seconds, "bytes_per_s_deployed": read / seconds,
               "forms": dict(report.forms()), "model_mb_dense": dense_mb, "model_mb_deployed": model_bytes(deployed) / 1e6,
               "kinds": {k: {f: statistics.median(v) for f, v in fv.items()} for k, fv in kinds.items()},
               "peak_rss_mb_dense": peak_rss(str(path), "dense", seconds),
               "peak_rss_mb_deployed": peak_rss(str(path), "deployed", seconds)}
        rows.append(row)
        print(f"sparsity {sparsity}: RTF dense {row['rtf_dense']:.4f} deployed {row['rtf_deployed']:.4f} "
              f"({row['speedup']:.2f}× faster; weight products {100 * row['products_share']:.0f}% of the dense time, so at most "
              f"{row['speedup_bound']:.2f}×); weight MB/s of audio {read_dense / seconds / 1e6:.1f} -> {read / seconds / 1e6:.1f} "
              f"({read_dense / max(read, 1):.2f}× less); model {row['model_mb_dense']:.1f} -> {row['model_mb_deployed']:.1f} MB; peak RSS {row['peak_rss_mb_dense']:.0f} -> {row['peak_rss_mb_deployed']:.0f} MB; "
              f"forms {row['forms']}; same transcript: {same}", flush=True)
    return rows


def print_tables(rows: list[dict]) -> None:
    print("\n| model | sparsity | RTF dense | RTF deployed | speed-up | weight MB read / s audio (dense → deployed) | "
          "less read | model MB (dense → deployed) | peak RSS MB (dense → deployed) | csr matrices | same transcript | "
          "products' share of dense time | speed-up bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        forms = r["forms"]
        print(f"| {r['model']} | {r['sparsity']} | {r['rtf_dense']:.4f} | {r['rtf_deployed']:.4f} | {r['speedup']:.2f}× | "
              f"{r['bytes_per_s_dense'] / 1e6:.1f} → {r['bytes_per_s_deployed'] / 1e6:.1f} | "
              f"{r['bytes_per_s_dense'] / max(r['bytes_per_s_deployed'], 1):.2f}× | {r['model_mb_dense']:.1f} → {r['model_mb_deployed']:.1f} | {r['peak_rss_mb_dense']:.0f} → "
              f"{r['peak_rss_mb_deployed']:.0f} | {forms.get('csr', 0)}/{sum(forms.values())} | {r['same_transcript']} | "
              f"{100 * r['products_share']:.0f}% | {r['speedup_bound']:.2f}× |")
    print("\nLatency per layer kind (median µs per call over the layers of the kind; csr/dense < 1 is faster):\n")
    print("| model | kind | sparsity | dense µs | csr µs | csr / dense | chosen µs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for kind, t in r["kinds"].items():
            print(f"| {r['model']} | {kind} | {r['sparsity']} | {t['dense']:.1f} | {t.get('csr', float('nan')):.1f} | "
                  f"{t.get('csr', float('nan')) / t['dense']:.2f} | {t['chosen']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.5,0.7,0.9,0.95")
    parser.add_argument("--models", default="lstm_rnnt,conformer_ctc")
    parser.add_argument("--rnnt", default=DEFAULT_CKPTS["lstm_rnnt"])
    parser.add_argument("--conformer", default=DEFAULT_CKPTS["conformer_ctc"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child-ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ckpt:
        return child(args)
    torch.set_num_threads(1)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    ckpts = {"lstm_rnnt": args.rnnt, "conformer_ctc": args.conformer}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, ckpts[name], sparsities, args.seconds, args.repeats, Path(tmp))
    print_tables(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
