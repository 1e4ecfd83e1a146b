"""Backward elimination (solver="obs"): exact recovery, the greedy it claims to be, exact least squares.

References are worked out independently of the solver: a naive per-row loop that refits every
candidate removal with ``torch.linalg.solve`` (the definition of greedy backward elimination), and
planted k-sparse problems whose answer is known.
"""

from __future__ import annotations

import pytest
import torch

from csprune.solvers import refit, solve


def _problem(o=12, n=20, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, n, generator=gen, dtype=dtype) @ (torch.eye(n, dtype=dtype) + 0.3 * torch.randn(n, n, generator=gen, dtype=dtype))
    gram = x.T @ x / 400 + 1e-3 * torch.eye(n, dtype=dtype)
    w = torch.randn(o, n, generator=gen, dtype=dtype)
    return gram, w @ gram, w


def _objective(gram, xy, theta):
    return (0.5 * (theta @ gram) * theta).sum(1) - (theta * xy).sum(1)


def _naive_backward(gram, xy_row, allowed_row, k):
    """One atom at a time: drop the atom whose removal (with an exact refit of the rest) costs least."""
    support = allowed_row.clone()
    while int(support.sum()) > k:
        best, best_j = None, None
        for j in support.nonzero().flatten().tolist():
            trial = support.clone()
            trial[j] = False
            idx = trial.nonzero().flatten()
            theta = torch.zeros_like(xy_row)
            theta[idx] = torch.linalg.solve(gram[idx][:, idx], xy_row[idx])
            value = float(0.5 * theta @ gram @ theta - theta @ xy_row)
            if best is None or value < best:
                best, best_j = value, j
        support[best_j] = False
    return support


def test_planted_sparse_rows_are_recovered_exactly():
    gram, _, _ = _problem()
    gen = torch.Generator().manual_seed(3)
    truth = torch.randn(12, 20, generator=gen, dtype=torch.float64) * (torch.rand(12, 20, generator=gen) < 0.3)
    k = (truth != 0).sum(1)
    result = solve(gram, truth @ gram, k=k, solver="obs")
    assert torch.equal(result.info["support"], truth != 0)
    torch.testing.assert_close(result.coef, truth, rtol=0, atol=1e-10)


def test_one_atom_rounds_equal_the_naive_greedy_elimination():
    gram, xy, _ = _problem(o=6, n=12)
    allowed = torch.rand(6, 12, generator=torch.Generator().manual_seed(1)) < 0.8
    k = torch.tensor([0, 1, 3, 5, 6, 7]).clamp(max=allowed.sum(1))
    result = solve(gram, xy, k=k, solver="obs", rounds=0, allowed=allowed)
    for i in range(6):
        assert torch.equal(result.info["support"][i], _naive_backward(gram, xy[i], allowed[i], int(k[i]))), f"row {i}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("rounds", [0, 3, "auto"])
def test_values_are_the_least_squares_refit_on_the_support(dtype, tol, rounds):
    gram, xy, _ = _problem(dtype=dtype)
    k = torch.arange(12) + 2
    result = solve(gram, xy, k=k, solver="obs", rounds=rounds)
    support = result.info["support"]
    assert torch.equal(support.sum(1), k) and torch.equal(support, result.coef != 0)
    exact = refit(gram, xy, support)
    assert float((result.coef - exact).norm() / exact.norm()) < tol


def test_start_forms_agree_and_respect_the_allowed_atoms():
    gram, xy, _ = _problem()
    allowed = torch.rand(12, 20, generator=torch.Generator().manual_seed(2)) < 0.75
    k = (allowed.sum(1) * 0.6).long()
    direct = solve(gram, xy, k=k, solver="obs", allowed=allowed, start="direct")
    complement = solve(gram, xy, k=k, solver="obs", allowed=allowed, start="complement")
    assert direct.info["start"] == "direct" and complement.info["start"] == "complement"
    assert torch.equal(direct.info["support"], complement.info["support"])
    torch.testing.assert_close(direct.coef, complement.coef, rtol=1e-9, atol=1e-12)
    assert not bool((direct.info["support"] & ~allowed).any())
    assert torch.equal(direct.info["support"].sum(1), k)


def test_no_removal_is_the_least_squares_fit_on_the_allowed_atoms_and_k0_is_zero():
    gram, xy, _ = _problem()
    allowed = torch.rand(12, 20, generator=torch.Generator().manual_seed(4)) < 0.5
    kept = solve(gram, xy, k=allowed.sum(1), solver="obs", allowed=allowed)
    torch.testing.assert_close(kept.coef, refit(gram, xy, allowed), rtol=1e-9, atol=1e-12)
    assert not bool(solve(gram, xy, k=0, solver="obs").coef.any())


def test_backward_elimination_beats_forward_omp_at_low_sparsity_on_correlated_inputs():
    """The reason it is offered: removing few atoms greedily is better informed than adding many."""
    gram, xy, w = _problem(o=32, n=40, seed=5)
    k = 30  # 25% sparsity
    obs = solve(gram, xy, k=k, solver="obs", rounds=0)
    omp = solve(gram, xy, k=k, solver="omp", atoms_per_iter=1, pool_size=1, refine_iters=0)
    assert float(_objective(gram, xy, obs.coef).sum()) < float(_objective(gram, xy, omp.coef).sum())


def test_obs_needs_a_budget():
    gram, xy, _ = _problem()
    with pytest.raises(ValueError, match="solver='obs' solves the l0 form"):
        solve(gram, xy, lam=0.1, solver="obs")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['atoms_per_iter'\] for solver='obs'"):
        solve(gram, xy, k=3, solver="obs", atoms_per_iter=2)
