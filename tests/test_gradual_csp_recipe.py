"""Gradual CSP inside the recipe's training loop (trainer=smoke): several mask updates, monotone masks,
and the optimizer state as designed (masks.reset_moments / enforce_zeros).

Every step writes a training checkpoint, so the test reads the masks and AdamW's moments after each
step from disk, exactly as training left them.
"""

from __future__ import annotations

import torch

from csprune import masks as M

from csprune.train.checkpoint import load_checkpoint
from recipes.asr import run as asr_run

from conftest import cfg_for


def test_gradual_csp_smoke_run_updates_masks_monotonically_and_resets_rewritten_moments(an4_root, tmp_path):
    cfg = cfg_for("trainer=smoke", "+prune=csp", "prune.schedule=cubic", "prune.frequency=2", "prune.ramp_epochs=2",
                  "prune.stats_steps=1", "trainer.max_steps=8", "data.max_train_utts=32", "trainer.checkpoint_every=1",
                  "trainer.keep_last=100", "trainer.threads=1", f"output_dir={tmp_path}", f"data.root={an4_root}",
                  f"data.cache_dir={tmp_path / 'cache'}")
    metrics = asr_run.run(cfg)
    ckpts = sorted((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    states = [load_checkpoint(p) for p in ckpts if load_checkpoint(p)["stage"] == "finetune"]
    assert len(states) == 8
    # AdamW's state is keyed by parameter index, in the model's parameter order (the pruner's parametrizations
    # keep the same Parameter objects, so the order is that of a fresh model).
    names = [n for n, _ in asr_run.make_model(states[0]["compat"]["model"], asr_run.CharVocab()).named_parameters()]
    levels, updates, rewritten, previous = [], 0, [], None
    for state in states:
        masks = state["pruner"]["masks"]
        levels.append(state["pruner"]["level"])
        kept = torch.cat([m.reshape(-1) for m in masks.values()])
        changed = previous is not None and not torch.equal(kept, previous)
        if previous is not None:
            assert not bool((kept & ~previous).any()), "a pruned weight came back (masks must be monotone)"
        updates += int(changed)
        previous = kept
        zero_first = 0
        for index, moments in state["optimizer"]["state"].items():
            mask = masks.get(names[index])
            if mask is None:
                continue
            assert not bool(moments["exp_avg"][~mask].any()), names[index]
            pruned_v = moments["exp_avg_sq"][~mask]  # a positive normal sentinel, decayed by β₂ (masks.py)
            assert bool(((pruned_v >= torch.finfo(pruned_v.dtype).tiny) & (pruned_v <= M.PRUNED_SECOND_MOMENT)).all()), names[index]
            zero_first += int((moments["exp_avg"][mask] == 0).sum())
        rewritten.append((changed, zero_first))
    assert updates >= 2, levels  # three or more distinct mask levels during the ramp
    assert levels == sorted(levels) and len({l for l in levels if l > 0}) >= 3 and levels[-1] <= 0.7 + 1e-9, levels
    # Right after an update the refit's rewritten kept weights restart with a zero first moment; one step later
    # nearly every kept weight has a gradient history again (the few left at zero get no gradient at all: they
    # feed only outputs whose every outgoing weight the update pruned). Before any update: none.
    assert rewritten[0] == (False, 0), rewritten
    for (changed, zeros), (_, after) in zip(rewritten, rewritten[1:]):
        if changed:
            assert zeros > 0 and after < 0.1 * zeros, rewritten
    assert metrics["sparsity_actual"] > 0.3
