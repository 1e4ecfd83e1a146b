"""Codec rate control: per-module budgets, a dual-ascent λ on the hard-code rate, entropy floors that warn and
re-spread, and real files whose size matches the entropy estimate."""

from __future__ import annotations

import logging
import math
import statistics

import pytest
import torch

from recipes.codec.codec import SpeechCodec
from recipes.codec.loss import CodecLoss, LossConfig
from recipes.codec.model import CMRL
from recipes.codec.run import TrainStep, respread_stop

FRAME = 128
CODES_PER_SECOND = 1000.0  # any unit: budgets below are in bits per code value × this


class _Writer:
    """Records what TrainStep sends to TensorBoard."""

    def __init__(self):
        self.scalars, self.texts = [], []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def _frames(gen: torch.Generator, n: int) -> torch.Tensor:
    """[n, FRAME] sinusoids of random pitch and phase plus noise, at speech-like RMS."""
    t = torch.arange(FRAME) / 16000
    f0 = 100 + 300 * torch.rand(n, 1, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
    return 0.05 * torch.sin(2 * math.pi * f0 * t + phase) + 0.01 * torch.randn(n, FRAME, generator=gen)


def _train(budgets: list[float], steps: int, seed: int = 0, writer=None):
    """A tiny CMRL trained as the recipe trains it, greedily: module m alone for ``steps`` steps on the residual of
    the (frozen, hard) modules before it, with per-module budgets (bits/value). Returns (initial hard entropies,
    per-step hard entropies of each module during its own phase, the TrainStep)."""
    torch.manual_seed(seed)
    model = CMRL(len(budgets), frame_len=FRAME, wide=16, narrow=8, blocks=1)
    total = sum(budgets)
    loss = CodecLoss(LossConfig(target_bitrate=total * CODES_PER_SECOND, module_shares=[b / total for b in budgets],
                                mel_weight=0.0), len(budgets), CODES_PER_SECOND, frame_len=FRAME)
    step = TrainStep(SpeechCodec(model, None, overlap=16, sample_rate=16000), None, loss, None, None, writer, "greedy", 0, 10)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        first = [o["hard_entropy"] for o in model(_frames(gen, 64), hard=True)["modules"]]
    history = [[] for _ in budgets]
    for m in range(len(budgets)):
        opt = torch.optim.Adam(model.stages[m].parameters(), lr=3e-3)
        for _ in range(steps):
            frames = _frames(gen, 32)
            out = model(frames, upto=m + 1, train_only=m)
            value = loss(out["decoded"], frames, out["modules"], [m])
            opt.zero_grad()
            value.backward()
            opt.step()
            step.last_modules = out["modules"]
            step.after_step(True)
            history[m].append(loss.last_rates[m] / CODES_PER_SECOND)
    return first, history, step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_module_moves_to_its_budget_from_above_and_below(seed, single_thread):
    """Module 0 starts above its 0.8 bits/value, module 1 below its 4 bits/value; after 300 steps of its phase the
    median of each module's last 100 step rates has closed most of the gap (seeds 0-5 all pass when tried; at
    0.5 bits/value this tiny module is bistable, landing or collapsing and re-spreading, by seed)."""
    budgets = [0.8, 4.0]
    first, history, _ = _train(budgets, 300, seed)
    assert first[0] > budgets[0] + 0.5 and first[1] < budgets[1] - 0.5, first  # really from above and from below
    for m, budget in enumerate(budgets):
        settled = statistics.median(history[m][-100:])
        assert abs(settled - budget) < 0.4 * abs(first[m] - budget), (m, first[m], settled, budget)


def test_a_module_below_its_floor_is_warned_about_and_respread(caplog, single_thread):
    """A module whose codes (nearly) all sit in one basin: a warning in the run log and in TensorBoard, and its centroids
    move onto its values, so the next batch uses many codes again."""
    torch.manual_seed(0)
    writer = _Writer()
    _, _, step = _train([1.0, 1.0], 0, writer=writer)
    model = step.codec.model
    with torch.no_grad():  # module 1's encoder emits (almost) a constant: one code
        model.stages[1].encoder.out_conv.weight.mul_(0.005)
        model.stages[1].encoder.out_conv.bias.fill_(0.3)
    frames = _frames(torch.Generator().manual_seed(5), 32)
    patience = step.loss.cfg.floor_patience
    with caplog.at_level(logging.WARNING, logger="csprune.codec"):
        for k in range(patience):  # one noisy batch is not a collapse: it must last floor_patience steps
            assert not caplog.records and not writer.scalars, k
            out = model(frames)
            step.loss(out["decoded"], frames, out["modules"])
            step.last_modules = out["modules"]
            assert out["modules"][1]["hard_entropy"] < 0.5
            step.after_step(True)
    assert len(caplog.records) == 1
    assert "module 1" in caplog.records[0].getMessage() and "below its entropy floor" in caplog.records[0].getMessage()
    assert [tag for tag, _, _ in writer.scalars] == ["rate/below_floor_m1"] and len(writer.texts) == 1
    with torch.no_grad():
        again = model(frames, hard=True)["modules"][1]["hard_entropy"]
    assert again > 3.0  # spread over the 32 centroids


def test_budgets_and_floors_are_explicit_and_checked():
    loss = CodecLoss(LossConfig(target_bitrate=16000, module_shares=[0.75, 0.25], entropy_floor=0.5), 2, 8000.0,
                     side_bits_per_second=1200.0)
    assert loss.module_bitrate_targets == pytest.approx([11100.0, 3700.0])
    assert loss.floors == pytest.approx([0.5 * 11100 / 8000, 0.5 * 3700 / 8000])
    with pytest.raises(ValueError, match="module_shares"):
        CodecLoss(LossConfig(module_shares=[0.5, 0.4]), 2, 8000.0)
    with pytest.raises(ValueError, match="module_shares"):
        CodecLoss(LossConfig(module_shares=[1.0]), 2, 8000.0)


def test_rate_weight_is_a_bounded_dual_ascent_on_the_hard_rate():
    """λ rises over budget, falls (below 0) under it, moves at most η a step, stays within ±λ_max, and uses the
    hard-code entropy the bitstream pays, not the soft estimate."""
    cfg = LossConfig(target_bitrate=16000, rate_gain=0.01, rate_weight_max=0.03)
    loss = CodecLoss(cfg, 1, 8000.0)  # budget 2 bits/value
    frames = torch.randn(2, 512)
    over = [{"entropy": torch.tensor(1.0), "hard_entropy": 8.0, "penalty": torch.tensor(0.0)}]  # soft says under
    for expected in (0.01, 0.02, 0.03, 0.03):
        loss(frames, frames, over)
        loss.step_rate_control()
        assert float(loss.rate_weight[0]) == pytest.approx(expected)  # +η per step (error clipped to 1), capped
    under = [{"entropy": torch.tensor(3.0), "hard_entropy": 1.0, "penalty": torch.tensor(0.0)}]
    for _ in range(20):
        loss(frames, frames, under)
        loss.step_rate_control()
    assert float(loss.rate_weight[0]) == pytest.approx(-0.03)  # −0.5 error a step: −0.005 each, floored at −λ_max
    loss(frames, frames, under)
    assert loss.step_rate_control(applied=False) == [] and float(loss.rate_weight[0]) == pytest.approx(-0.03)


@pytest.mark.parametrize("target", [8000, 16000, 24000])
def test_cmrl_files_match_the_entropy_estimate(target, an4_root, tmp_path, single_thread):
    """A smoke codec trained at each target: the real .cmrl bytes of all 130 AN4 test utterances are within 3% above
    the empirical entropy of their codes (the header, length prefixes, CRC and the coder's model mismatch)."""
    import numpy as np

    from csprune.train.an4 import read_an4_split
    from recipes.codec import run as codec_run
    from recipes.codec.data import load_utterance
    from tests.conftest import cfg_for

    out = tmp_path / "codec"
    codec_run.run(cfg_for("trainer=smoke", "trainer.max_steps=150", "trainer.epochs=50", f"loss.target_bitrate={target}",
                          f"output_dir={out}", f"data.root={an4_root}", "trainer.threads=1", recipe="codec"))
    codec = codec_run.load_codec(str(out / "model.safetensors"))
    utts = read_an4_split(an4_root, "test")
    assert len(utts) == 130
    file_bytes, codes = 0, [[] for _ in codec.model.stages]
    for i, utt in enumerate(utts):
        coded = codec.encode(load_utterance(utt, -26.0))
        file_bytes += codec.write(tmp_path / f"{i}.cmrl", coded)
        for m, idx in enumerate(coded.indices):
            codes[m].append(idx.reshape(-1).numpy())
    entropy_bits = 0.0
    for per_module in codes:
        counts = np.bincount(np.concatenate(per_module))
        p = counts[counts > 0] / counts.sum()
        entropy_bits += float(-(p * np.log2(p)).sum()) * counts.sum()
    ratio = 8 * file_bytes / entropy_bits
    assert 1.0 <= ratio <= 1.03, ratio


def _feed(loss: CodecLoss, hard: list[float], steps: int) -> None:
    """``steps`` optimizer steps in which module m's hard codes cost hard[m] bits/value."""
    frames = torch.randn(2, 512)
    modules = [{"entropy": torch.tensor(h), "hard_entropy": h, "penalty": torch.tensor(0.0)} for h in hard]
    for _ in range(steps):
        loss(frames, frames, modules)
        loss.step_rate_control()


def test_the_proportional_term_follows_a_smoothed_rate():
    """One step's rate moves the EMA by β of the gap; the P term k_p·e reads the EMA's relative error, the integral
    the step's own (clipped) error."""
    cfg = LossConfig(target_bitrate=16000, rate_gain=0.01, rate_p_gain=0.1, rate_smoothing=0.1, spill=False)
    loss = CodecLoss(cfg, 1, 8000.0)  # budget 2 bits/value = 16 kbit/s
    _feed(loss, [2.0], 1)  # the first step starts the EMA at its rate: on budget, λ stays 0
    assert loss.rate_ema[0] == pytest.approx(16000.0) and float(loss.rate_weight[0]) == pytest.approx(0.0)
    _feed(loss, [4.0], 1)  # one step at twice the budget: EMA 16k + 0.1·16k, P error +0.1 (not +1)
    assert loss.rate_ema[0] == pytest.approx(17600.0)
    assert float(loss.rate_weight[0]) == pytest.approx(0.01 * 1.0)
    assert loss.applied_weight(0) == pytest.approx(0.01 + 0.1 * 0.1)


def test_a_respread_drops_the_penalty_and_restarts_the_rate():
    cfg = LossConfig(target_bitrate=16000, rate_gain=0.01, rate_weight_max=1.0, spill=False)
    loss = CodecLoss(cfg, 2, 8000.0)
    _feed(loss, [3.0, 3.0], 30)  # both over budget (1 bit/value each): λ > 0
    assert float(loss.rate_weight[1]) > 0.1
    loss.respread_done(1)
    assert float(loss.rate_weight[1]) == 0.0 and float(loss.rate_error[1]) == 0.0 and loss.rate_ema[1] is None
    assert float(loss.rate_weight[0]) > 0.1  # the other module keeps its state
    loss.rate_weight[1] = -0.5
    loss.respread_done(1)
    assert float(loss.rate_weight[1]) == -0.5  # a reward for entropy is kept: the module needs bits


def test_a_module_that_cannot_use_its_budget_spills_it_to_module_0():
    """Module 1 stuck at half its budget drives λ₁ to −λ_max; then module 0's target grows by the shortfall (the EMA's),
    so the total target holds, and module 0, now under its target, is pushed up. Without spill nothing moves."""
    for spill in (True, False):
        cfg = LossConfig(target_bitrate=16000, rate_gain=0.01, rate_weight_max=0.05, spill=spill)
        loss = CodecLoss(cfg, 2, 8000.0)  # budgets 8 kbit/s = 1 bit/value each
        _feed(loss, [1.0, 0.5], 5)
        assert loss.module_bitrate_targets[0] == pytest.approx(8000.0)  # λ₁ not pinned yet: no spill
        _feed(loss, [1.0, 0.5], 40)
        assert float(loss.rate_weight[1]) == pytest.approx(-0.05)
        if spill:
            assert loss.module_bitrate_targets[0] == pytest.approx(8000.0 + (8000.0 - loss.rate_ema[1]))
            assert loss.module_bitrate_targets[0] > 11000.0 and float(loss.rate_weight[0]) < 0.0
        else:
            assert loss.module_bitrate_targets[0] == pytest.approx(8000.0) and float(loss.rate_weight[0]) == pytest.approx(0.0)
        assert loss.budget_targets == pytest.approx([8000.0, 8000.0])


def test_no_respread_late_in_a_stage_but_still_a_warning(caplog, single_thread):
    torch.manual_seed(0)
    writer = _Writer()
    _, _, step = _train([1.0, 1.0], 0, writer=writer)
    step.respread_stop = 0  # every step is "late"
    model = step.codec.model
    with torch.no_grad():
        model.stages[1].encoder.out_conv.weight.mul_(0.005)
        model.stages[1].encoder.out_conv.bias.fill_(0.3)
    centroids = model.stages[1].quantizer.centroids.detach().clone()
    frames = _frames(torch.Generator().manual_seed(5), 32)
    with caplog.at_level(logging.WARNING, logger="csprune.codec"):
        for _ in range(step.loss.cfg.floor_patience):
            out = model(frames)
            step.loss(out["decoded"], frames, out["modules"])
            step.last_modules = out["modules"]
            step.after_step(True)
    assert len(caplog.records) == 1 and "too late in the stage" in caplog.records[0].getMessage()
    assert [tag for tag, _, _ in writer.scalars] == ["rate/below_floor_m1"]
    assert torch.equal(model.stages[1].quantizer.centroids.detach(), centroids)


def test_the_late_stage_rule_spares_greedy_stages():
    assert respread_stop("greedy_m1", 512, 0.9) is None  # the joint phase follows: a re-spread is in time
    assert respread_stop("joint", 3584, 0.9) == 3226 and respread_stop("finetune", 256, 0.9) == 231


def _code_values(n: int = 20000, seed: int = 0) -> torch.Tensor:
    """[n] tanh code values shaped like a trained module's: most near 0 (silence), a wide tail (speech)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.tanh(0.3 * torch.randn(n, generator=gen) * (1 + 2 * torch.rand(n, generator=gen)))


def _nearest_bits(q, values: torch.Tensor) -> float:
    counts = q.count_codes((values.unsqueeze(-1) - q.levels()).abs().argmin(-1)).double() + 0.5
    p = counts / counts.sum()
    return float(-(p * p.log2()).sum())


def test_the_rate_trim_lands_a_module_under_its_budget_and_not_far_below():
    """fit_coder with a budget below what nearest-centroid codes cost: the codes it makes at inference cost at most the
    budget and at least 97% of it (μ is the smallest that fits, to 1e-3); with no budget or a loose one, μ = 0."""
    from recipes.codec.model import SoftToHardQuantizer

    values = _code_values()
    q = SoftToHardQuantizer(32).eval()
    free = q.fit_coder(values, None)
    assert float(q.rate_tradeoff) == 0.0 and free == pytest.approx(_nearest_bits(q, values), rel=1e-3)
    assert q.fit_coder(values, free * 1.2) == pytest.approx(free, rel=1e-9) and float(q.rate_tradeoff) == 0.0
    for fraction in (0.9, 0.7):
        bits = q.fit_coder(values, fraction * free)
        assert float(q.rate_tradeoff) > 0
        idx = q.indices(values)  # the inference-time choice, as the encoder makes it
        counts = q.count_codes(idx).double()
        paid = float(-(counts / counts.sum() * q.code_probs.double().log2()).sum())
        assert paid == pytest.approx(bits, rel=1e-4)
        assert 0.97 * fraction * free <= paid <= fraction * free * (1 + 1e-6), (fraction, paid, free)


def test_a_trimmed_quantizer_assigns_nearest_in_training_and_loads_old_checkpoints():
    """μ acts only at inference (training keeps nearest-centroid codes, which straight-through needs); a state dict
    written before ``rate_tradeoff`` existed loads with μ = 0 (nearest centroid)."""
    from recipes.codec.model import SoftToHardQuantizer

    values = _code_values()
    q = SoftToHardQuantizer(32).eval()
    q.fit_coder(values, 0.7 * q.fit_coder(values, None))
    nearest = (values.unsqueeze(-1) - q.levels()).abs().argmin(-1)
    assert not torch.equal(q.indices(values), nearest)
    assert torch.equal(q.train().indices(values), nearest)
    old = {k: v for k, v in q.state_dict().items() if k != "rate_tradeoff"}
    fresh = SoftToHardQuantizer(32).eval()
    fresh.rate_tradeoff.fill_(1.0)
    fresh.load_state_dict(old)
    assert float(fresh.rate_tradeoff) == 0.0 and torch.equal(fresh.indices(values), nearest)


def test_fit_coders_lands_the_total_and_gives_unused_budget_to_the_others(single_thread):
    """On a tiny untrained 2-module codec, with rates R0, R1 untrimmed:
    - budgets (0.6·R0, R1): module 0 is trimmed to 0.6·R0 and the total lands within 2% under the sum;
    - budgets (0.6·R0, R1 + 0.2·R0): module 1 cannot use 0.2·R0 of its budget, so module 0 gets it (0.8·R0);
    - budgets (1.0001·R0, 0.5·R1): module 0 untrimmed, module 1 trimmed to what is left."""
    from recipes.codec.data import FrameBank
    from recipes.codec.run import fit_coders

    torch.manual_seed(0)
    model = CMRL(2, frame_len=FRAME, wide=16, narrow=8, blocks=1)
    codec = SpeechCodec(model, None, overlap=16, sample_rate=16000)
    bank = FrameBank.__new__(FrameBank)
    bank.frames = _frames(torch.Generator().manual_seed(3), 512)
    free = fit_coders(codec, bank, None, frames=512)
    assert all(r["rate_tradeoff"] == 0.0 for r in free)
    r0, r1 = free[0]["bitrate"], free[1]["bitrate"]

    def total(report):
        return sum(r["bitrate"] for r in report)

    shared = fit_coders(codec, bank, [0.6 * r0, r1], frames=512)
    assert shared[0]["rate_tradeoff"] > 0 and 0.97 * 0.6 * r0 <= shared[0]["bitrate"] <= 0.6 * r0 * (1 + 1e-6)
    assert 0.98 * (0.6 * r0 + r1) <= total(shared) <= (0.6 * r0 + r1) * (1 + 1e-6)
    spare = fit_coders(codec, bank, [0.6 * r0, r1 + 0.2 * r0], frames=512)
    assert 0.97 * 0.8 * r0 <= spare[0]["bitrate"] <= 0.8 * r0 * (1 + 1e-6)
    tight = fit_coders(codec, bank, [1.0001 * r0, 0.5 * r1], frames=512)
    assert tight[0]["rate_tradeoff"] == 0.0 and tight[1]["rate_tradeoff"] > 0
    assert total(tight) <= (1.0001 * r0 + 0.5 * r1) * (1 + 1e-6)
