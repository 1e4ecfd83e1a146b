"""One-shot calibration modes (prune.calib_mode): what the statistics see."""

from __future__ import annotations

import torch
from torch import nn

from csprune import Pruner
from csprune.methods import CSP
from csprune.train.run import calibrate
from csprune.schedules import OneShot


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4))


def _gram(mode):
    model = _model()
    pruner = Pruner(model, CSP(), OneShot(0.5), targets=["3.weight"])
    batches = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    before = model[1].running_mean.clone(), model[1].running_var.clone()
    torch.manual_seed(1)
    assert calibrate(pruner, model, batches, lambda x: model(x), mode) == 3
    assert not model.training and not pruner.stats.enabled  # left in eval mode, hooks off
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])  # BN frozen
    return pruner.stats.gram(pruner.targets[0])


def test_train_mode_sees_dropout_and_keeps_batchnorm_frozen():
    eval_gram, train_gram = _gram("eval"), _gram("train")
    # Dropout(0.5) zeroes half the inputs and doubles the rest: E[x²] doubles on the diagonal.
    ratio = torch.diagonal(train_gram, dim1=-2, dim2=-1) / torch.diagonal(eval_gram, dim1=-2, dim2=-1)
    assert float(ratio.mean()) > 1.5, ratio
