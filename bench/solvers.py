"""Solver benchmark: our l0 solvers (omp, obs) vs scikit-learn's ``orthogonal_mp_gram`` and cvxpy.

One layer-sized problem (default 1024×1024): G = XᵀX/N + 0.01·mean(diag)·I from correlated inputs X
(a decaying spectrum, or AN4 fbank features with context when ``AN4_ROOT`` is set and ``--an4`` is
given), W random rows, xy = W·G. For each sparsity s the budget is k = n − round(s·n) per row and
the printed error is the relative output error Σᵢ(wᵢ−θᵢ)ᵀG(wᵢ−θᵢ) / Σᵢ wᵢᵀGwᵢ. Prints, never asserts.

    python bench/solvers.py            # full size (sklearn takes minutes at 50%)
    python bench/solvers.py --quick    # n = 256 smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from csprune.solvers import refit, solve


def correlated_inputs(n: int, samples: int, seed: int) -> torch.Tensor:
    """[samples, n] inputs with a power-law spectrum and smooth (neighbouring-feature) correlation."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, n + 1, dtype=torch.float64) ** -0.7
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    smooth = torch.randn(samples, n + 8, generator=gen, dtype=torch.float64).unfold(1, 9, 1).mean(-1)
    return (torch.randn(samples, n, generator=gen, dtype=torch.float64) * spectrum) @ basis.T + 0.5 * smooth


def an4_inputs(root: str, n: int, seed: int) -> torch.Tensor | None:
    """[frames, n] AN4 80-dim fbank features with ±context frames, truncated/padded to n; None if absent."""
    try:
        import soundfile
        import torchaudio
    except ImportError:
        return None
    wav_dir = os.path.join(root, "wav")
    if not os.path.isdir(wav_dir):
        return None
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(wav_dir) for f in fs if f.endswith((".wav", ".sph", ".raw")))
    rng = np.random.default_rng(seed)
    feats = []
    for path in rng.permutation(files)[:64]:
        try:
            audio, rate = soundfile.read(path, dtype="float32")
        except Exception:
            continue
        fb = torchaudio.compliance.kaldi.fbank(torch.from_numpy(audio).unsqueeze(0), num_mel_bins=80, sample_frequency=rate)
        context = math.ceil(n / 80)
        left = (context - 1) // 2
        padded = torch.nn.functional.pad(fb.T, (left, context - 1 - left), mode="replicate").T
        stacked = padded.unfold(0, context, 1).permute(0, 2, 1).reshape(fb.shape[0], -1)[:, :n]
        feats.append(stacked.double())
    if not feats:
        return None
    x = torch.cat(feats)
    return x - x.mean(0)


def output_error(gram: torch.Tensor, w: torch.Tensor, theta: torch.Tensor) -> float:
    """Σ (w−θ)ᵀG(w−θ) / Σ wᵀGw over the given rows."""
    diff = w - theta
    return float(((diff @ gram) * diff).sum() / ((w @ gram) * w).sum())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 256 smoke run")
    parser.add_argument("--n", type=int, default=None, help="inputs = rows (default 1024, 256 with --quick)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--sklearn-rows", type=int, default=None, help="rows given to sklearn (default all; fewer are extrapolated)")
    parser.add_argument("--cvxpy-rows", type=int, default=1, help="rows given to cvxpy (extrapolated; 0 skips; ~20 s a solve at n=1024)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="dtype of our solver")
    parser.add_argument("--an4", action="store_true", help="AN4 fbank features from $AN4_ROOT instead of synthetic X")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solvers", nargs="+", default=["omp", "obs"], help="our solvers, each timed against sklearn")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.n or (256 if args.quick else 1024)
    rows = n
    x = an4_inputs(os.environ.get("AN4_ROOT", ""), n, args.seed) if args.an4 else None
    source = "AN4 fbank+context" if x is not None else "synthetic power-law spectrum"
    if x is None:
        x = correlated_inputs(n, 4 * n, args.seed)
    gram = x.T @ x / x.shape[0]
    gram = gram + 0.01 * gram.diagonal().mean() * torch.eye(n, dtype=gram.dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    w = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    xy = w @ gram
    dtype = getattr(torch, args.dtype)
    sk_rows = min(rows, args.sklearn_rows or rows)
    cv_rows = min(rows, args.cvxpy_rows)
    print(f"problem: {rows} rows x {n} inputs, X = {source} ({x.shape[0]} samples), G damped 1%; "
          f"ours in {args.dtype}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (timings are noisy when the load exceeds the cores)")
    print(f"sklearn on {sk_rows}/{rows} rows" + (" (time extrapolated linearly)" if sk_rows < rows else "")
          + f"; cvxpy (l1, λ bisected to k, then top-k + refit) on {cv_rows} rows, time extrapolated")
    header = (f"{'solver':>6} {'sparsity':>8} {'k':>5} {'ours s':>8} {'sklearn s':>10} {'speedup':>8} {'err ours':>10} "
              f"{'err sklearn':>11} {'err ratio':>9} {'cvxpy s':>9} {'err cvxpy':>10} {'variant':>12}")
    print(header)
    diag_scale = gram.diagonal().sqrt()
    gram_unit = gram / diag_scale[:, None] / diag_scale[None, :]
    for s in args.sparsity:
        k = n - round(s * n)
        from sklearn.linear_model import orthogonal_mp_gram

        xy_unit = (xy[:sk_rows] / diag_scale).numpy().T
        sk, t_sk = timed(lambda: orthogonal_mp_gram(gram_unit.numpy(), xy_unit, n_nonzero_coefs=k))
        theta_sk = torch.from_numpy(np.asarray(sk).reshape(n, -1).T) / diag_scale
        err_sk = output_error(gram, w[:sk_rows], theta_sk)
        t_sk_full = t_sk * rows / sk_rows
        for solver in args.solvers:
            res, t_ours = timed(lambda: solve(gram.to(dtype), xy.to(dtype), k=k, solver=solver))
            report_row(solver, s, k, res, t_ours, t_sk_full, err_sk, gram, w, xy, sk_rows, cv_rows, rows)
    print("err ratio = ours / sklearn on the same rows; err cvxpy = cvxpy-l1+refit error / ours on its rows; "
          "speedup = sklearn time (all rows) / ours.")


def report_row(solver, s, k, res, t_ours, t_sk_full, err_sk, gram, w, xy, sk_rows, cv_rows, rows) -> None:
    """Print one solver's row: time, error, and the sklearn / cvxpy comparisons."""
    theta = res.coef.double()
    err_ours_sub = output_error(gram, w[:sk_rows], theta[:sk_rows])
    err_ours = output_error(gram, w, theta)
    cv_time, cv_err = float("nan"), float("nan")
    if cv_rows:
        cv, t_cv = timed(lambda: solve(gram, xy[:cv_rows], k=k, solver="cvxpy", bisect_steps=8, bisect_rtol=1e-2))
        top = torch.zeros_like(cv.coef, dtype=torch.bool)
        top.scatter_(1, cv.coef.abs().topk(k, dim=1).indices, True)
        cv_theta = refit(gram, xy[:cv_rows], top)
        cv_time = t_cv * rows / cv_rows
        cv_err = output_error(gram, w[:cv_rows], cv_theta) / max(output_error(gram, w[:cv_rows], theta[:cv_rows]), 1e-300)
    if res.solver == "obs":
        variant = f"rounds={res.info['rounds']},{res.info['start']}"
    else:
        variant = f"a={res.info['atoms_per_iter']},p={res.info['pool_size']},r={res.info['refine_iters_run']}"
    print(f"{solver:>6} {s:>8.2f} {k:>5d} {t_ours:>8.2f} {t_sk_full:>10.2f} {t_sk_full / t_ours:>7.1f}x {err_ours:>10.5f} "
          f"{err_sk:>11.5f} {err_ours_sub / err_sk:>9.4f} {cv_time:>9.1f} {cv_err:>10.3f} {variant:>12}")


if __name__ == "__main__":
    main()
