"""The batched Cholesky refit is exact least squares on each row's support (issue #12, defect 1).

Rows of one chunk are padded to the longest support; the padding must be an identity block, so
Cholesky succeeds on every well-conditioned row and the pseudo-inverse fallback never runs.
"""

from __future__ import annotations

import sys

import pytest
import torch

import csprune.solvers  # noqa: F401  (imports the module behind the ``refit`` function name)
from csprune.solvers import refit

refit_module = sys.modules["csprune.solvers.refit"]


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny problems run on one thread


def well_conditioned_gram(n: int, seed: int, scale: float = 1.0, groups: int = 1) -> torch.Tensor:
    """[groups, n, n] float64 SPD Grams with eigenvalues in [scale, 3·scale] (condition number <= 3).

    Args:
        n: size.
        seed: generator seed.
        scale: overall magnitude (the Gram of inputs with RMS sqrt(scale)).
        groups: number of Grams.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(groups, n, n, generator=gen, dtype=torch.float64))
    evals = scale * (1.0 + 2.0 * torch.rand(groups, n, generator=gen, dtype=torch.float64))
    gram = (q * evals.unsqueeze(1)) @ q.mT
    return 0.5 * (gram + gram.mT)


def ragged_mask(o: int, n: int, seed: int) -> torch.Tensor:
    """[o, n] bool supports of sizes 1..n spread over the rows (one empty, one full)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.linspace(0, n, o).round().long()
    mask = torch.zeros(o, n, dtype=torch.bool)
    for i, size in enumerate(sizes.tolist()):
        mask[i, torch.randperm(n, generator=gen)[:size]] = True
    return mask[torch.randperm(o, generator=gen)]


def dense_solve(gram3: torch.Tensor, xy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[o, n] float64 reference: torch.linalg.solve on G[S, S] row by row."""
    o, n = xy.shape
    per_group = o // gram3.shape[0]
    out = torch.zeros(o, n, dtype=torch.float64)
    for i in range(o):
        s = mask[i].nonzero().squeeze(1)
        if len(s):
            g = gram3[i // per_group].double()
            out[i, s] = torch.linalg.solve(g[s][:, s], xy[i, s].double())
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 1e-6])  # 1e-6: the Gram of inputs of RMS 1e-3
@pytest.mark.parametrize("groups", [1, 2])
def test_padded_refit_equals_dense_least_squares(dtype, scale, groups):
    o, n = 40, 32
    gram3 = well_conditioned_gram(n, seed=1, scale=scale, groups=groups)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(o, n, generator=gen, dtype=torch.float64)
    xy = torch.bmm(w.reshape(groups, o // groups, n), gram3).reshape(o, n)
    mask = ragged_mask(o, n, seed=3)
    gram_d, xy_d = gram3.to(dtype), xy.to(dtype)
    assert o * n * n < refit_module._BLOCK_ELEMS  # every row in one padded chunk
    out = refit(gram_d if groups > 1 else gram_d[0], xy_d, mask)
    expected = dense_solve(gram_d, xy_d, mask)  # same (rounded) data, solved in float64
    assert out.dtype == dtype
    assert bool((out[~mask] == 0).all())
    rel = (out.double() - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-300)
    assert float(rel.max()) <= 1e-6, f"max relative error {float(rel.max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_pinv_fallback_on_well_conditioned_rows(monkeypatch, dtype):
    o, n = 24, 20
    gram = well_conditioned_gram(n, seed=4)[0].to(dtype)
    xy = torch.randn(o, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    mask = ragged_mask(o, n, seed=6)

    def no_pinv(*args, **kwargs):
        raise AssertionError("refit fell back to torch.linalg.pinv on a well-conditioned problem")

    monkeypatch.setattr(torch.linalg, "pinv", no_pinv)
    refit(gram, xy, mask)  # raises if any row's padded block failed Cholesky
    refit_module.refit_rows(gram.unsqueeze(0), xy, mask, torch.zeros(o, dtype=torch.int64))  # the solvers' entry


def test_padding_block_is_identity():
    n = 6
    gram3 = well_conditioned_gram(n, seed=7)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, [1, 4]] = True  # three padding slots
    idx, valid = refit_module.support_indices(mask)
    blocks = refit_module.padded_gram_blocks(gram3, torch.zeros(2, dtype=torch.int64), idx)
    assert torch.equal(blocks[1, :2, :2], gram3[0][[1, 4]][:, [1, 4]])
    assert torch.equal(blocks[1, 2:, 2:], torch.eye(3, dtype=torch.float64))
    assert bool((blocks[1, :2, 2:] == 0).all()) and bool((blocks[1, 2:, :2] == 0).all())
    assert torch.equal(blocks[0, :5, :5], gram3[0][:5, :5])
