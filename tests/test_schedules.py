import pytest

from csprune.schedules import Cubic, Linear, OneShot


def zhu_gupta(t, si, sf, t0, n, dt):
    """Zhu & Gupta (2017) eq. 1, written out independently of the library."""
    return sf + (si - sf) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("si,sf,t0,n,dt", [(0.0, 0.9, 0, 20, 100), (0.1, 0.7, 50, 7, 30)])
def test_cubic_matches_formula_at_every_step(si, sf, t0, n, dt):
    sched = Cubic(final_sparsity=sf, start_step=t0, end_step=t0 + n * dt, frequency=dt, initial_sparsity=si)
    last = None
    for t in range(0, t0 + n * dt + 3 * dt):
        s = sched.sparsity_at(t)
        if t < t0:
            assert s == 0.0 and not sched.is_update(t)
            continue
        on_grid = (t - t0) % dt == 0 and t <= t0 + n * dt
        assert sched.is_update(t) == on_grid
        if on_grid:
            assert s == pytest.approx(zhu_gupta(t, si, sf, t0, n, dt), abs=1e-12)
            last = s
        elif t > t0 + n * dt:
            assert s == pytest.approx(sf)
        else:
            assert s == last  # constant between pruning steps
    assert sched.sparsity_at(t0 + n * dt) == pytest.approx(sf)


def test_linear_and_oneshot():
    lin = Linear(final_sparsity=0.8, start_step=10, end_step=50, frequency=10)
    assert [round(lin.sparsity_at(t), 6) for t in (9, 10, 19, 20, 30, 40, 50, 99)] == [0, 0, 0, 0.2, 0.4, 0.6, 0.8, 0.8]
    one = OneShot(0.5, step=3)
    assert [one.sparsity_at(t) for t in range(5)] == [0, 0, 0, 0.5, 0.5]
    assert [one.is_update(t) for t in range(5)] == [False, False, False, True, False]


def test_cubic_is_front_loaded():
    sched = Cubic(0.9, 0, 1000, 100)
    values = [sched.sparsity_at(t) for t in range(0, 1001, 100)]
    gains = [b - a for a, b in zip(values, values[1:])]
    assert all(g1 > g2 for g1, g2 in zip(gains, gains[1:]))


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan")])
def test_bad_sparsity_names_the_key(bad):
    with pytest.raises(ValueError, match="final_sparsity"):
        Cubic(final_sparsity=bad)
    with pytest.raises(ValueError, match="final_sparsity"):
        OneShot(bad)


def test_bad_frequency():
    with pytest.raises(ValueError, match="frequency"):
        Cubic(0.5, frequency=0)
