"""Tests of csprune.solvers against independent references (numpy, scikit-learn, cvxpy, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from csprune.solvers import SOLVERS, SolverResult, refit, solve

sklearn_omp = pytest.importorskip("sklearn.linear_model").orthogonal_mp_gram


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny problems run on one thread


def correlated_gram(n: int, samples: int, seed: int, unit_diag: bool = False) -> torch.Tensor:
    """[n, n] float64 Gram XᵀX/samples of inputs with correlated neighbouring features."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, n + 4, generator=gen, dtype=torch.float64)
    x = x[:, :n] + 0.5 * x[:, 2 : n + 2] + 0.3 * torch.randn(samples, n, generator=gen, dtype=torch.float64)
    gram = x.T @ x / samples
    if unit_diag:
        d = gram.diagonal().sqrt()
        gram = gram / d[:, None] / d[None, :]
    return gram


def l1_objective(gram: np.ndarray, xy: np.ndarray, lam: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per-row ½θᵀGθ − θᵀxy + λ‖θ‖₁ in numpy."""
    return 0.5 * np.einsum("ij,jk,ik->i", theta, gram, theta) - (theta * xy).sum(1) + lam * np.abs(theta).sum(1)


# ---------------------------------------------------------------------------------------------
# 1. FISTA reaches the cvxpy objective.


@pytest.mark.parametrize("seed", range(20))
def test_fista_matches_cvxpy_objective(seed):
    pytest.importorskip("cvxpy")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 40))
    samples = n // 2 if seed % 5 == 4 else 3 * n  # every fifth problem: rank-deficient (PSD only) G
    gram = correlated_gram(n, samples, seed)
    w = torch.from_numpy(rng.standard_normal((3, n)))
    xy = w @ gram
    lam = torch.from_numpy(rng.uniform(0.05, 0.5, 3)) * xy.abs().amax(1)
    fista = solve(gram, xy, lam=lam, solver="fista")
    ref = solve(gram, xy, lam=lam, solver="cvxpy")
    assert fista.converged and ref.converged
    obj_fista = l1_objective(gram.numpy(), xy.numpy(), lam.numpy(), fista.coef.numpy())
    obj_ref = l1_objective(gram.numpy(), xy.numpy(), lam.numpy(), ref.coef.numpy())
    assert np.all(obj_fista <= obj_ref + 1e-4 * np.abs(obj_ref))
    assert np.allclose(fista.objective.numpy(), obj_fista)


def test_sklearn_lasso_matches_cvxpy_objective():
    """The 1/n_samples scaling of sklearn's Lasso is converted exactly."""
    pytest.importorskip("cvxpy")
    gram = correlated_gram(24, 60, 3)
    w = torch.randn(4, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xy = w @ gram
    lam = 0.2 * xy.abs().amax(1)
    sk = solve(gram, xy, lam=lam, solver="sklearn")
    ref = solve(gram, xy, lam=lam, solver="cvxpy")
    obj_sk = l1_objective(gram.numpy(), xy.numpy(), lam.numpy(), sk.coef.numpy())
    obj_ref = l1_objective(gram.numpy(), xy.numpy(), lam.numpy(), ref.coef.numpy())
    assert np.allclose(obj_sk, obj_ref, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. OMP gives scikit-learn's supports.


def _sklearn_support(gram: torch.Tensor, xy: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    out = np.zeros(tuple(xy.shape), dtype=bool)
    for i in range(xy.shape[0]):
        if int(k[i]) > 0:
            out[i] = sklearn_omp(gram.numpy(), xy[i].numpy(), n_nonzero_coefs=int(k[i])) != 0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_omp_support_matches_sklearn(seed):
    n, o = 48, 12
    gram = correlated_gram(n, 200, seed, unit_diag=True)
    gen = torch.Generator().manual_seed(100 + seed)
    xy = torch.randn(o, n, generator=gen, dtype=torch.float64) @ gram
    k = torch.randint(1, 30, (o,), generator=gen)
    res = solve(gram, xy, k=k)
    assert isinstance(res, SolverResult) and res.solver == "omp" and res.converged
    assert np.array_equal(res.coef.numpy() != 0, _sklearn_support(gram, xy, k))
    # The values are the least-squares fit on that support, as sklearn's.
    for i in range(o):
        ref = sklearn_omp(gram.numpy(), xy[i].numpy(), n_nonzero_coefs=int(k[i]))
        assert np.allclose(res.coef[i].numpy(), ref, atol=1e-9)


def test_omp_non_unit_diagonal_selects_like_normalized_sklearn():
    """Selection by |c_j|/sqrt(G_jj): same support as sklearn on D^-½GD^-½."""
    gram = correlated_gram(32, 100, 7)
    xy = torch.randn(5, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ gram
    k = torch.tensor([1, 4, 9, 16, 31])
    d = gram.diagonal().sqrt()
    expected = _sklearn_support(gram / d[:, None] / d[None, :], xy / d, k)
    assert np.array_equal(solve(gram, xy, k=k).coef.numpy() != 0, expected)


def test_omp_grouped_gram_matches_sklearn_per_group():
    n, per_group, g = 40, 4, 3
    grams = torch.stack([correlated_gram(n, 150, 10 + j, unit_diag=True) for j in range(g)])
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(g * per_group, n, generator=gen, dtype=torch.float64)
    xy = torch.cat([w[j * per_group : (j + 1) * per_group] @ grams[j] for j in range(g)])
    k = torch.randint(1, 25, (g * per_group,), generator=gen)
    res = solve(grams, xy, k=k)
    for j in range(g):
        rows = slice(j * per_group, (j + 1) * per_group)
        assert np.array_equal(res.coef[rows].numpy() != 0, _sklearn_support(grams[j], xy[rows], k[rows]))


def test_multi_atom_with_full_pool_is_exact_omp():
    """With a pool holding every atom, the in-pool greedy is exactly OMP (a atoms per round)."""
    gram = correlated_gram(40, 120, 4, unit_diag=True)
    gen = torch.Generator().manual_seed(8)
    xy = torch.randn(6, 40, generator=gen, dtype=torch.float64) @ gram
    k = torch.tensor([3, 7, 12, 20, 25, 33])
    res = solve(gram, xy, k=k, atoms_per_iter=4, pool_size=40, refine_iters=0)
    assert np.array_equal(res.coef.numpy() != 0, _sklearn_support(gram, xy, k))


def test_refinement_never_worse_than_greedy():
    gram = correlated_gram(64, 100, 9)
    xy = torch.randn(8, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) @ gram
    plain = solve(gram, xy, k=20, atoms_per_iter=4, refine_iters=0)
    refined = solve(gram, xy, k=20, atoms_per_iter=4, refine_iters=5)
    assert torch.all(refined.objective <= plain.objective + 1e-12)
    assert torch.all((refined.coef != 0).sum(1) == 20)
    direct = (0.5 * (refined.coef @ gram) * refined.coef).sum(1) - (refined.coef * xy).sum(1)
    assert torch.allclose(refined.objective, direct)


# ---------------------------------------------------------------------------------------------
# 3. Classic compressed-sensing recovery.


@pytest.mark.parametrize("atoms_per_iter", [1, 2])
def test_omp_recovers_sparse_signal(atoms_per_iter):
    n, k, rows = 256, 8, 6
    m = math.ceil(4 * k * math.log(n / k))  # 111 measurements
    gen = torch.Generator().manual_seed(11)
    phi = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(m)
    x0 = torch.zeros(rows, n, dtype=torch.float64)
    for i in range(rows):
        idx = torch.randperm(n, generator=gen)[:k]
        x0[i, idx] = torch.randn(k, generator=gen, dtype=torch.float64).sign() * (1 + torch.rand(k, generator=gen, dtype=torch.float64))
    y = x0 @ phi.T
    res = solve(phi.T @ phi, y @ phi, k=k, atoms_per_iter=atoms_per_iter)
    assert torch.equal(res.coef != 0, x0 != 0)
    assert torch.allclose(res.coef, x0, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# 4. Budget edge cases.


@pytest.mark.parametrize("options", [{}, {"atoms_per_iter": 3}])
def test_omp_budget_edges(options):
    n = 20
    gram = correlated_gram(n, 60, 1)
    xy = torch.randn(5, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) @ gram
    full = solve(gram, xy, k=n, **options)
    expected = torch.linalg.solve(gram, xy.T).T
    assert torch.allclose(full.coef, expected, atol=1e-8)
    zero = solve(gram, xy, k=0, **options)
    assert torch.equal(zero.coef, torch.zeros_like(xy))
    k = torch.tensor([0, 1, 7, 19, 20])
    mixed = solve(gram, xy, k=k, **options)
    assert torch.equal((mixed.coef != 0).sum(1), k)
    assert torch.allclose(mixed.coef[4], expected[4], atol=1e-8)


def test_fista_budget_edges():
    n = 16
    gram = correlated_gram(n, 50, 2)
    xy = torch.randn(3, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) @ gram
    res = solve(gram, xy, k=torch.tensor([0, 5, n]), solver="fista")
    assert torch.equal(res.coef[0], torch.zeros(n, dtype=torch.float64))
    assert torch.allclose(res.coef[2], torch.linalg.solve(gram, xy[2]), atol=1e-8)
    assert float(res.lam[2]) == 0.0 and float(res.lam[0]) >= float(xy[0].abs().max())


def test_float32_omp_runs_and_keeps_budget():
    gram = correlated_gram(64, 200, 6).float()
    xy = torch.randn(10, 64, generator=torch.Generator().manual_seed(6)) @ gram
    res = solve(gram, xy, k=torch.arange(10) * 6)
    assert res.coef.dtype == torch.float32
    assert torch.equal((res.coef != 0).sum(1), torch.arange(10) * 6)


# ---------------------------------------------------------------------------------------------
# 5. λ bisection to a k budget.


@pytest.mark.parametrize("reweight_rounds", [0, 2])
def test_fista_bisection_respects_budget(reweight_rounds):
    n, o = 48, 6
    gram = correlated_gram(n, 150, 12)
    xy = torch.randn(o, n, generator=torch.Generator().manual_seed(12), dtype=torch.float64) @ gram
    k = torch.tensor([1, 4, 10, 17, 25, 40])
    res = solve(gram, xy, k=k, solver="fista", reweight_rounds=reweight_rounds)
    nnz = (res.coef != 0).sum(1)
    assert torch.all(nnz <= k)
    assert torch.all(nnz >= k - 2)  # the l1 path adds atoms (almost always) one at a time
    assert res.lam.shape == (o,) and torch.all(res.lam > 0)
    # Warm start from the λ found: lands on the same supports.
    again = solve(gram, xy, k=k, solver="fista", reweight_rounds=reweight_rounds, lam_init=res.lam)
    assert torch.all((again.coef != 0).sum(1) <= k)


def test_cvxpy_bisection_respects_budget():
    pytest.importorskip("cvxpy")
    gram = correlated_gram(16, 40, 13)
    xy = torch.randn(2, 16, generator=torch.Generator().manual_seed(13), dtype=torch.float64) @ gram
    k = torch.tensor([3, 9])
    res = solve(gram, xy, k=k, solver="cvxpy", bisect_steps=25, bisect_rtol=1e-3)
    assert torch.all((res.coef != 0).sum(1) <= k)


# ---------------------------------------------------------------------------------------------
# 6. Refit.


@pytest.mark.parametrize("grouped", [False, True])
def test_refit_equals_per_row_solve(grouped):
    n, o = 30, 8
    grams = torch.stack([correlated_gram(n, 90, 20 + j) for j in range(2)])
    gram = grams if grouped else grams[0]
    gen = torch.Generator().manual_seed(21)
    xy = torch.randn(o, n, generator=gen, dtype=torch.float64)
    mask = torch.rand(o, n, generator=gen) < 0.4
    mask[0] = False  # empty support
    mask[1] = True  # full support
    out = refit(gram, xy, mask)
    for i in range(o):
        g_i = grams[i // (o // 2)] if grouped else grams[0]
        expected = torch.zeros(n, dtype=torch.float64)
        s = mask[i].nonzero().squeeze(1)
        if len(s):
            expected[s] = torch.linalg.solve(g_i[s][:, s], xy[i, s])
        assert torch.allclose(out[i], expected, atol=1e-10)
    cg = refit(gram, xy, mask, method="cg", tol=1e-12, max_iter=200)
    assert torch.allclose(cg, out, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 7. Bad input.


def _bad_cases():
    gram = torch.eye(4, dtype=torch.float64)
    xy = torch.ones(6, 4, dtype=torch.float64)
    nan_gram = gram.clone()
    nan_gram[1, 1] = float("nan")
    inf_xy = xy.clone()
    inf_xy[2, 3] = float("inf")
    return [
        ((gram, torch.ones(6, 5, dtype=torch.float64)), {"k": 2}, "xy"),
        ((torch.ones(4, 5, dtype=torch.float64), xy), {"k": 2}, "gram"),
        ((torch.eye(4, dtype=torch.float64).expand(4, 4, 4), xy), {"k": 2}, "g = 4"),
        ((gram, xy), {"k": 5}, "k"),
        ((gram, xy), {"k": -1}, "k"),
        ((gram, xy), {"k": torch.tensor([1, 2])}, "k"),
        ((gram, xy), {}, "exactly one of k"),
        ((gram, xy), {"k": 2, "lam": 0.1}, "exactly one of k"),
        ((gram, xy), {"lam": -0.1, "solver": "fista"}, "lam"),
        ((nan_gram, xy), {"k": 2}, "gram"),
        ((gram, inf_xy), {"k": 2}, "xy"),
        ((gram, xy), {"k": 2, "solver": "lars"}, "solver"),
        ((gram, xy.float()), {"k": 2}, "xy"),
        ((gram, xy), {"lam": 0.1, "solver": "omp"}, "k"),
        ((gram, xy), {"k": 2, "atoms_per_iterr": 3}, "atoms_per_iterr"),
    ]


@pytest.mark.parametrize("args,kwargs,needle", _bad_cases())
def test_bad_input_raises_value_error(args, kwargs, needle):
    with pytest.raises(ValueError, match=needle) as info:
        solve(*args, **kwargs)
    if "solver" in kwargs and kwargs["solver"] == "lars":
        for name in SOLVERS:
            assert name in str(info.value)


def test_bad_shapes_message_names_shapes():
    with pytest.raises(ValueError, match=r"\(6, 5\)"):
        solve(torch.eye(4), torch.ones(6, 5), k=2)
    with pytest.raises(ValueError, match="mask"):
        refit(torch.eye(4), torch.ones(6, 4), torch.ones(6, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# 8. Non-convergence is reported.


def test_iteration_limit_is_reported():
    gram = correlated_gram(40, 60, 30)
    xy = torch.randn(4, 40, generator=torch.Generator().manual_seed(30), dtype=torch.float64) @ gram
    res = solve(gram, xy, lam=0.01 * float(xy.abs().max()), solver="fista", max_iter=2)
    assert res.converged is False
    assert res.gap > 0 and res.n_iter == 2
    done = solve(gram, xy, lam=0.01 * float(xy.abs().max()), solver="fista")
    assert done.converged and done.gap <= 1e-7
