"""Gradual pruning with refits (issue #12, defect 5).

(a) A refit rewrites kept weights: their first optimizer moment is reset, their second moment kept,
    pruned entries' state stays zero, and masks never regrow.
(b) Without regrowth the solvers only pick atoms inside the current mask (``allowed``), so no budget
    goes to weights that are already pruned.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import csprune
import csprune.methods.csp as csp_module
from csprune import masks as M
from csprune.methods import CSP
from csprune.schedules import Cubic, OneShot
from csprune.solvers import solve


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny problems run on one thread


def spd_gram(n: int, seed: int) -> torch.Tensor:
    """[n, n] float64 Gram of correlated inputs, damped by 1% (as CSP's activation Gram)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=gen, dtype=torch.float64)
    x = x + 0.5 * torch.roll(x, 1, dims=1)
    gram = x.T @ x / x.shape[0]
    return gram + 0.01 * gram.diagonal().mean() * torch.eye(n, dtype=torch.float64)


def allowed_and_budget(o: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random current mask ([o, n] bool) and budgets 0 <= k_i <= its row count (both ends hit)."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.rand(o, n, generator=gen) < 0.6
    counts = allowed.sum(dim=1)
    k = (counts.double() * torch.rand(o, generator=gen, dtype=torch.float64)).floor().long()
    k[0], k[1] = 0, counts[1]  # an empty budget and a budget equal to the allowed count
    return allowed, k


# ---------------------------------------------------------------------------------------------
# (b) allowed atoms


@pytest.mark.parametrize("options", [
    {"atoms_per_iter": 1, "refine_iters": 0},  # textbook OMP
    {"atoms_per_iter": 4, "pool_size": 6, "refine_iters": 2},  # pooled rounds and HTP proposals
], ids=["exact", "pooled-htp"])
def test_omp_support_inside_allowed_with_exactly_k_atoms(options):
    o, n = 12, 40
    gram = spd_gram(n, seed=0)
    gen = torch.Generator().manual_seed(1)
    xy = torch.randn(o, n, generator=gen, dtype=torch.float64) @ gram
    allowed, k = allowed_and_budget(o, n, seed=2)
    out = solve(gram, xy, k=k, solver="omp", allowed=allowed, **options)
    support = out.info["support"]
    assert bool((support <= allowed).all()), "an atom outside the allowed set was selected"
    assert torch.equal(support.sum(dim=1), k)
    nonzero = out.coef != 0
    assert bool((nonzero <= support).all())
    assert torch.equal(nonzero.sum(dim=1), k)  # well-conditioned: no atom wasted on a zero coefficient


def test_restricted_omp_is_omp_on_the_allowed_columns():
    o, n = 8, 30
    gram = spd_gram(n, seed=3)
    xy = torch.randn(o, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64) @ gram
    allowed, k = allowed_and_budget(o, n, seed=5)
    out = solve(gram, xy, k=k, solver="omp", allowed=allowed, atoms_per_iter=1, refine_iters=0)
    for i in range(o):
        cols = allowed[i].nonzero().squeeze(1)
        sub = solve(gram[cols][:, cols], xy[i, cols].unsqueeze(0), k=int(k[i]), solver="omp", atoms_per_iter=1,
                    refine_iters=0)
        expected = torch.zeros(n, dtype=torch.float64)
        expected[cols] = sub.coef[0]
        assert torch.allclose(out.coef[i], expected, rtol=1e-9, atol=1e-12), i


def test_fista_restricted_to_allowed():
    o, n = 8, 24
    gram = spd_gram(n, seed=6)
    xy = torch.randn(o, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64) @ gram
    allowed, k = allowed_and_budget(o, n, seed=8)
    out = solve(gram, xy, k=k, solver="fista", allowed=allowed)
    nonzero = out.coef != 0
    assert out.converged
    assert bool((nonzero <= allowed).all())
    assert bool((nonzero.sum(dim=1) <= k).all())
    # l1 form with a given λ: the same solution as FISTA on the allowed columns alone.
    lam = 0.05 * xy.abs().amax(dim=1)
    full = solve(gram, xy, lam=lam, solver="fista", allowed=allowed, tol=1e-10, max_iter=20000)
    for i in range(o):
        cols = allowed[i].nonzero().squeeze(1)
        sub = solve(gram[cols][:, cols], xy[i, cols].unsqueeze(0), lam=lam[i : i + 1], solver="fista", tol=1e-10,
                    max_iter=20000)
        expected = torch.zeros(n, dtype=torch.float64)
        expected[cols] = sub.coef[0]
        assert torch.allclose(full.coef[i], expected, atol=1e-6), i


def test_allowed_is_validated():
    gram = spd_gram(6, seed=9)
    xy = torch.ones(2, 6, dtype=torch.float64)
    allowed = torch.zeros(2, 6, dtype=torch.bool)
    allowed[:, :2] = True
    with pytest.raises(ValueError, match="k exceeds the allowed atoms"):
        solve(gram, xy, k=3, solver="omp", allowed=allowed)
    with pytest.raises(ValueError, match="allowed must be a bool tensor"):
        solve(gram, xy, k=1, solver="omp", allowed=allowed[:, :3])
    with pytest.raises(ValueError, match="allowed is supported by the solvers"):
        solve(gram, xy, k=1, solver="cvxpy", allowed=allowed)


def _calibrate(pruner, model, batches):
    pruner.stats.enabled = True
    with torch.no_grad():
        for x in batches:
            model(x)
    pruner.stats.enabled = False


def test_csp_gradual_step_spends_no_atom_on_pruned_weights(monkeypatch):
    torch.manual_seed(0)
    n, o = 64, 32
    model = nn.Sequential(nn.Linear(n, o))
    mix = torch.randn(n, n) / n**0.5 + torch.eye(n)  # correlated inputs: OMP would like to regrow
    batches = [torch.randn(128, n) @ mix for _ in range(4)]
    seen = []
    real_solve = csp_module.solve

    def spy(gram, xy, **kwargs):
        result = real_solve(gram, xy, **kwargs)
        seen.append((result.coef != 0, kwargs["k"]))
        return result

    monkeypatch.setattr(csp_module, "solve", spy)
    pruner = csprune.Pruner(model, CSP(safeguard=False), OneShot(0.5), scope="layer")
    _calibrate(pruner, model, batches)
    pruner.prune_to(0.35)
    before = pruner.masks()["0.weight"]
    _calibrate(pruner, model, batches)
    pruner.prune_to(0.5)
    chosen, k = seen[-1]
    assert int((chosen & ~before).sum()) == 0, "the solver chose atoms that were already pruned"
    assert torch.equal(chosen.sum(dim=1), k)
    assert bool((pruner.masks()["0.weight"] <= before).all())


def test_csp_l1_solver_writes_least_squares_values():
    """An l1 solution is shrunk: CSP refits it even where its support is exactly the mask."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 6))
    dense = model[0].weight.detach().clone()
    pruner = csprune.Pruner(model, CSP(sensing="identity", solver="fista", safeguard=False), OneShot(0.5))
    pruner.prune_to(0.5)
    mask = pruner.masks()["0.weight"]
    # Identity sensing: the least-squares refit on the support is the dense weight itself.
    assert torch.allclose(model[0].weight[mask], dense[mask], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (a) optimizer state of refit weights


def test_adamw_moments_of_refit_weights_through_a_gradual_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    schedule = Cubic(0.75, start_step=0, end_step=24, frequency=6)
    pruner = csprune.Pruner(model, CSP(), schedule, optimizer=opt, stats_steps=2)
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=gen) + 2 * torch.eye(12)
    updates, refit_entries = 0, 0
    for _ in range(40):
        x = torch.randn(32, 12, generator=gen) @ mix
        loss = model(x).sub(x[:, :8]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        snapshot = {}
        for t in pruner.targets:
            original = M.original_param(t.module, t.param_name)
            state = opt.state[original]
            snapshot[t.fqn] = (M.get_mask(t.module, t.param_name).clone(), original.detach().clone(),
                               state["exp_avg"].clone(), state["exp_avg_sq"].clone())
        report = pruner.step()
        for t in pruner.targets:
            old_mask, old_w, old_m, old_v = snapshot[t.fqn]
            original = M.original_param(t.module, t.param_name)
            state = opt.state[original]
            mask = M.get_mask(t.module, t.param_name)
            assert bool((mask <= old_mask).all()), f"{t.fqn}: a pruned weight regrew"
            # Pruned entries: weight and first moment exactly zero; the second moment holds the positive
            # sentinel decayed by β₂ (masks.PRUNED_SECOND_MOMENT: exact, since the update there is 0 / sqrt(v)).
            assert bool((original[~mask] == 0).all())
            assert bool((state["exp_avg"][~mask] == 0).all())
            pruned_v = state["exp_avg_sq"][~mask]
            assert bool(((pruned_v >= torch.finfo(pruned_v.dtype).tiny) & (pruned_v <= M.PRUNED_SECOND_MOMENT)).all())
            if report is None:
                continue
            changed = mask & (original != old_w)
            same = mask & ~changed
            refit_entries += int(changed.sum())
            assert bool((state["exp_avg"][changed] == 0).all()), f"{t.fqn}: stale first moment on refit weights"
            assert torch.equal(state["exp_avg"][same], old_m[same])  # untouched weights keep their moment
            assert torch.equal(state["exp_avg_sq"][mask], old_v[mask])  # second moment kept (the gradient scale)
            assert report["tensors"][t.fqn]["moments_reset"] == float(changed.sum())
        updates += report is not None
    assert updates >= 3
    assert refit_entries > 0
    assert pruner.sparsity()["total"] == pytest.approx(0.75, abs=0.02)


def test_prune_to_gradual_runs_the_update_as_step_does(monkeypatch):
    """prune_to(gradual=True) is an in-training update: CSP's safeguard="auto" skips its two candidate
    refits (the magnitude and the saliency supports), as Pruner.step() does on a gradual schedule; the
    one-shot form runs them. Same model, statistics and masks either way."""
    calls = []
    real_refit = csp_module.refit
    monkeypatch.setattr(csp_module, "refit", lambda *a, **k: calls.append(1) or real_refit(*a, **k))
    counts, masks = {}, {}
    for gradual in (False, True):
        torch.manual_seed(0)
        n, o = 32, 16
        model = nn.Sequential(nn.Linear(n, o))
        batches = [torch.randn(64, n) @ (torch.randn(n, n) / n**0.5 + torch.eye(n)) for _ in range(3)]
        pruner = csprune.Pruner(model, CSP(solver="omp"), OneShot(0.5))
        _calibrate(pruner, model, batches)
        calls.clear()
        report = pruner.prune_to(0.5, gradual=gradual)
        counts[gradual], masks[gradual] = len(calls), pruner.masks()["0.weight"]
        assert report["tensors"]["0.weight"]["safeguard_rows"] == 0 or not gradual
    assert counts[False] - counts[True] == 2
    assert masks[True].sum() == masks[False].sum()


def test_solve_updates_final_prunes_by_magnitude_until_the_last_update():
    """CSP(solve_updates="final") on a cubic schedule: the updates before the last observe nothing and keep the
    layer's top-|w| (values untouched, like gmp); only the stats_steps before the final update are observed, and
    that update solves (values refit) from the mask the others left. The default ("all") solves at every update."""
    for mode in ("final", "all"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        schedule = Cubic(0.75, start_step=0, end_step=24, frequency=6)
        pruner = csprune.Pruner(model, CSP(solve_updates=mode), schedule, optimizer=opt, stats_steps=2)
        gen = torch.Generator().manual_seed(0)
        mix = torch.randn(12, 12, generator=gen) + 2 * torch.eye(12)
        observed, solvers = [], []
        for step in range(30):
            observed.append(pruner.stats.enabled)
            x = torch.randn(32, 12, generator=gen) @ mix
            loss = model(x).sub(x[:, :8]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            before = {t.fqn: (M.original_param(t.module, t.param_name).detach().clone(),
                              M.get_mask(t.module, t.param_name).clone()) for t in pruner.targets}
            report = pruner.step()
            if report is None:
                continue
            level = report["scheduled_sparsity"]
            final = level >= 0.75 - 1e-9
            for t in pruner.targets:
                info = report["tensors"][t.fqn]
                solvers.append((step, info["solver"]))
                w_old, mask_old = before[t.fqn]
                w_new = M.original_param(t.module, t.param_name).detach()
                mask = M.get_mask(t.module, t.param_name)
                assert bool((mask <= mask_old).all())
                if mode == "final" and not final:
                    assert info["solver"] == "magnitude"
                    assert torch.equal(w_new[mask], w_old[mask])  # no refit
                    scores = (w_old * mask_old).abs()  # layer scope: the kept weights are the layer's largest |w|
                    assert float(scores[mask].min()) >= float(scores[mask_old & ~mask].max())
                else:
                    assert info["solver"] != "magnitude"
                    assert not torch.equal(w_new[mask], w_old[mask])  # least-squares values written
        updates = [s for s, _ in solvers[::2]]
        assert len(updates) >= 3
        last = updates[-1]
        if mode == "final":
            # observed only in the stats_steps (2) before the final update
            assert [s for s, on in enumerate(observed) if on] == [last - 1, last]
        else:
            assert sum(observed) >= 2 * len(updates) - 1
    assert pruner.sparsity()["total"] == pytest.approx(0.75, abs=0.02)
