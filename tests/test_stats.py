"""Statistics: bootstrap intervals cover what they should, speedups and means combine correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kda.tools import stats


def _samples(center: float, n: int, seed: int, spread: float = 0.05) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(center * (1 + spread * rng.standard_normal(n)))


def test_median_ci_contains_the_median_and_narrows_with_more_samples():
    few = stats.median_ci(_samples(100.0, 30, 1))
    many = stats.median_ci(_samples(100.0, 3000, 2))
    assert few.lo <= few.value <= few.hi
    assert many.lo <= 100.0 <= many.hi
    assert (many.hi - many.lo) < (few.hi - few.lo) / 3


def test_median_ci_coverage_is_near_95_percent():
    hits = 0
    for s in range(200):
        ci = stats.median_ci(_samples(50.0, 60, 1000 + s), n_boot=500, seed=s)
        hits += ci.lo <= 50.0 <= ci.hi
    assert 0.85 <= hits / 200 <= 1.0


def test_median_ci_is_reproducible_from_the_samples():
    xs = _samples(10.0, 100, 7)
    assert stats.median_ci(xs, seed=3) == stats.median_ci(xs, seed=3)


def test_speedup_ci_recovers_a_known_ratio():
    base = _samples(200.0, 400, 11)
    cand = _samples(100.0, 400, 12)
    sp, reps = stats.speedup_ci(base, cand)
    assert sp.value == pytest.approx(2.0, rel=0.02)
    assert sp.lo <= 2.0 <= sp.hi
    assert len(reps) == stats.N_BOOT


def test_equal_distributions_give_an_interval_around_one():
    sp, _ = stats.speedup_ci(_samples(80.0, 300, 21), _samples(80.0, 300, 22))
    assert sp.lo <= 1.0 <= sp.hi


def test_mean_and_geomean_with_intervals():
    pairs = [(_samples(b, 300, 30 + i), _samples(c, 300, 60 + i)) for i, (b, c) in
             enumerate([(100, 50), (100, 100), (100, 200)])]
    vals, reps = [], []
    for b, c in pairs:
        sp, r = stats.speedup_ci(b, c)
        vals.append(sp.value)
        reps.append(r)
    m = stats.mean_ci(vals, reps)
    g = stats.geomean_ci(vals, reps)
    assert m.value == pytest.approx((2.0 + 1.0 + 0.5) / 3, rel=0.03)
    assert g.value == pytest.approx(1.0, rel=0.03)  # 2 * 1 * 0.5 = 1
    assert m.lo <= m.value <= m.hi and g.lo <= g.value <= g.hi
    assert g.value < m.value  # AM >= GM


def test_errors_and_spread():
    with pytest.raises(ValueError):
        stats.median([])
    with pytest.raises(ValueError):
        stats.geomean_ci([1.0, 0.0], [np.ones(3), np.ones(3)])
    assert stats.spread([99.0, 100.0, 101.0]) == pytest.approx(0.02)
    assert math.isclose(stats.median([3.0, 1.0, 2.0]), 2.0)
    iv = stats.Interval(1.0, 0.9, 1.1)
    assert iv.overlaps(stats.Interval(1.05, 1.0, 1.2)) and not iv.overlaps(stats.Interval(2, 1.5, 2.5))


def test_samples_on_a_timer_grid_get_the_grouped_median():
    import statistics

    rng = np.random.default_rng(5)
    tick = 0.032  # device timestamps on Hopper
    true = 3.137
    # Spans of a ~3 us kernel as the device clock reports them: a few ticks, many ties.
    spans = list(np.round((true + 0.02 * rng.standard_normal(400)) / tick) * tick + 0.977)
    assert stats.grid_us(spans) == pytest.approx(tick)
    m = stats.median(spans)
    assert m == pytest.approx(statistics.median_grouped(spans, tick))
    assert m != pytest.approx(float(np.median(spans)))  # the plain median sits on a tick
    assert abs(m - (true + 0.977)) < tick / 4
    ci = stats.median_ci(spans)
    assert ci.lo <= m <= ci.hi and ci.hi - ci.lo < tick
    # Resamples of gridded data: counts drawn over its values, medians grouped the same way.
    reps = stats.bootstrap_medians(spans, n_boot=300, seed=1)
    assert reps.shape == (300,) and abs(float(np.median(reps)) - m) < tick / 4


def test_grouped_median_varies_less_between_runs_than_the_plain_one():
    tick, true = 0.032, 2.192  # the true median halfway between two ticks
    plain, grouped = [], []
    for s in range(20):
        rng = np.random.default_rng(100 + s)
        xs = list(np.round((true + 0.03 * rng.standard_normal(300)) / tick) * tick)
        plain.append(float(np.median(xs)))
        grouped.append(stats.median(xs))
    assert stats.spread(grouped) < stats.spread(plain) / 2


def test_samples_off_any_grid_keep_the_plain_median():
    xs = _samples(10.0, 101, 9)
    assert stats.grid_us(xs) == 0.0
    assert stats.median(xs) == float(np.median(xs))
    assert stats.grid_us([2.5, 2.5, 2.5]) == 0.0 and stats.median([2.5, 2.5, 2.5]) == 2.5
