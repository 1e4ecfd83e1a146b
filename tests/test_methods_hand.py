"""Masks computed by hand on tiny tensors, for every method and for N:M."""

import torch
from torch import nn

import csprune
from csprune.methods import CSP, Magnitude, Random, Wanda

W = torch.tensor([[1.0, -8.0, 3.0, -2.0, 7.0, 0.5, -6.0, 4.0]])


def linear_with(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def test_magnitude_1x8():
    layer = csprune.prune_once(linear_with(W), Magnitude(), sparsity=0.5, scope="row")
    # |w| = 1, 8, 3, 2, 7, .5, 6, 4: the four smallest are .5, 1, 2, 3
    assert layer.weight.tolist() == [[0.0, -8.0, 0.0, 0.0, 7.0, 0.0, -6.0, 4.0]]


def test_magnitude_2_4():
    layer = csprune.prune_once(linear_with(W), Magnitude(), sparsity=0.5, pattern="2:4")
    # groups [1,-8,3,-2] -> keep -8, 3; [7,.5,-6,4] -> keep 7, -6
    assert layer.weight.tolist() == [[0.0, -8.0, 3.0, 0.0, 7.0, 0.0, -6.0, 0.0]]


def test_wanda_1x8():
    # Input norms ‖x_j‖ ∝ [10,1,1,1,1,30,1,1]: scores |w|·‖x‖ = 10, 8, 3, 2, 7, 15, 6, 4
    scale = torch.tensor([10.0, 1, 1, 1, 1, 30, 1, 1])
    calib = [(torch.diag(scale),)]
    layer = csprune.prune_once(linear_with(W), Wanda(), sparsity=0.5, calib=calib, scope="row")
    # drop the four smallest scores: 2 (j=3), 3 (j=2), 4 (j=7), 6 (j=6)
    assert layer.weight.tolist() == [[1.0, -8.0, 0.0, 0.0, 7.0, 0.5, 0.0, 0.0]]


def test_random_counts_and_seed():
    w = torch.randn(4, 50)
    a = csprune.prune_once(linear_with(w), Random(seed=1), sparsity=0.3, scope="row").weight
    b = csprune.prune_once(linear_with(w), Random(seed=1), sparsity=0.3, scope="row").weight
    c = csprune.prune_once(linear_with(w), Random(seed=2), sparsity=0.3, scope="row").weight
    assert ((a == 0).sum(1) == 15).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_csp_identity_is_magnitude_1x8():
    layer = csprune.prune_once(linear_with(W), CSP(sensing="identity"), sparsity=0.5, scope="row")
    assert layer.weight.tolist() == [[0.0, -8.0, 0.0, 0.0, 7.0, 0.0, -6.0, 4.0]]


def test_csp_picks_the_correlated_atom():
    # G = [[1, .9, 0], [.9, 1, 0], [0, 0, 1]] (unit diagonal), w = [1, 1.1, 1.5], k = 1.
    # Correlations G·w = [1.99, 2.0, 1.5]: OMP takes j=1 with θ_1 = 2.0, although |w_2| is largest.
    # Error ½(w-θ)ᵀG(w-θ): CSP 2.44/2 vs magnitude+refit (keep j=2, θ_2 = 1.5) 4.19/2.
    gram = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    x = torch.linalg.cholesky(gram).T.float()  # rows x_r with Σ x xᵀ = G
    w = torch.tensor([[1.0, 1.1, 1.5]])
    layer = csprune.prune_once(linear_with(w), CSP(damping=0.0), sparsity=0.67, calib=[(x,)], scope="row")
    assert torch.allclose(layer.weight, torch.tensor([[0.0, 2.0, 0.0]]), atol=1e-5)
    mag = csprune.prune_once(linear_with(w), Magnitude(refit=True, damping=0.0), sparsity=0.67, calib=[(x,)], scope="row")
    assert torch.allclose(mag.weight, torch.tensor([[0.0, 0.0, 1.5]]), atol=1e-5)


def test_csp_2_4_keeps_pattern():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    calib = [(torch.randn(64, 16),)]
    layer = csprune.prune_once(linear_with(w), CSP(), sparsity=0.5, calib=calib, pattern="2:4")
    kept = (layer.weight != 0).reshape(6, 4, 4).sum(-1)
    assert (kept == 2).all()


def test_achieved_sparsity_within_one_weight():
    torch.manual_seed(0)
    w = torch.randn(7, 33)
    calib = [(torch.randn(128, 33),)]
    for method in (Magnitude(), Wanda(), CSP(), Random()):
        for scope in ("row", "layer"):
            for s in (0.1, 0.5, 0.77, 0.95):
                layer = csprune.prune_once(linear_with(w), method, sparsity=s, calib=calib, scope=scope)
                zeros = (layer.weight == 0).sum(1)
                if scope == "row":
                    assert (zeros - round(s * 33)).abs().max() <= 1, (method, scope, s)
                else:
                    assert abs(int(zeros.sum()) - round(s * 7 * 33)) <= 1, (method, scope, s)
