"""Statistics for benchmark runs: medians with bootstrap confidence intervals, speedups, means.

Device timestamps come on a grid (32 ns on Hopper), so the spans of a ~3 us kernel take a handful
of values and the plain median jumps a whole tick (1-2 %) between runs of the same kernel. Samples
that all lie on a nanosecond grid get the grouped median instead (`statistics.median_grouped`:
each sample spread evenly over its tick), which moves by fractions of a tick; other samples get
the plain median. Percentile bootstrap with a fixed seed, so a stored run's intervals can be
recomputed exactly from its samples. A speedup is baseline median / candidate median; its
interval resamples the two samples independently. Aggregates (arithmetic mean of per-workload speedups, the contest's
rule, and the geometric mean) combine the per-workload bootstrap replicates index by index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

N_BOOT = 2000
CONFIDENCE = 0.95


@dataclass
class Interval:
    value: float
    lo: float
    hi: float

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]

    def overlaps(self, other: "Interval") -> bool:
        return self.lo <= other.hi and other.lo <= self.hi


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def grid_us(xs: Sequence[float]) -> float:
    """The tick (us) of samples that all lie on a nanosecond grid, 0.0 for any others (or when
    all are equal): the greatest common divisor of their distances from the smallest."""
    a = np.asarray(xs, dtype=float)
    if a.size < 2:
        return 0.0
    ns = (a - a.min()) * 1e3
    steps = np.rint(ns)
    if np.abs(ns - steps).max() > 1e-3:
        return 0.0
    return float(np.gcd.reduce(steps.astype(np.int64))) / 1e3


def _grouped(values: np.ndarray, counts: np.ndarray, n: int, tick: float) -> np.ndarray:
    """Grouped medians, one per row of `counts` (how often each of the sorted `values` occurs):
    the median class is the one holding sample n // 2, interpolated within its tick."""
    cum = np.cumsum(counts, axis=-1)
    i = np.argmax(cum > n // 2, axis=-1)
    f = np.take_along_axis(counts, i[..., None], axis=-1)[..., 0]
    below = np.take_along_axis(cum, i[..., None], axis=-1)[..., 0] - f
    return values[i] - tick / 2 + tick * (n / 2 - below) / f


def _ticks(a: np.ndarray, tick: float) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of gridded samples (as multiples of the tick, so float noise cannot
    split one value in two) and how often each occurs."""
    steps, counts = np.unique(np.rint((a - a.min()) / tick).astype(np.int64), return_counts=True)
    return a.min() + steps * tick, counts


def median(xs: Sequence[float]) -> float:
    """The grouped median of samples on a grid (see the module's docstring), else the median."""
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        raise ValueError("median of no samples")
    tick = grid_us(a)
    if tick == 0.0:
        return float(np.median(a))
    values, counts = _ticks(a, tick)
    return float(_grouped(values, counts, a.size, tick))


def bootstrap_medians(xs: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Medians (as `median` computes them) of `n_boot` resamples with replacement."""
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        raise ValueError("bootstrap of no samples")
    tick = grid_us(a)
    if tick == 0.0:
        idx = _rng(seed).integers(0, a.size, size=(n_boot, a.size))
        return np.median(a[idx], axis=1)
    # A resample of gridded data is a draw of counts over its distinct values.
    values, counts = _ticks(a, tick)
    draws = _rng(seed).multinomial(a.size, counts / a.size, size=n_boot)
    return _grouped(values, draws, a.size, tick)


def _percentiles(reps: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def median_ci(xs: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Median with a percentile-bootstrap confidence interval."""
    lo, hi = _percentiles(bootstrap_medians(xs, n_boot, seed))
    return Interval(median(xs), lo, hi)


def speedup_reps(baseline: Sequence[float], candidate: Sequence[float], n_boot: int = N_BOOT,
                 seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of baseline median / candidate median (independent resampling)."""
    b = bootstrap_medians(baseline, n_boot, seed)
    c = bootstrap_medians(candidate, n_boot, seed + 1)
    return b / c


def speedup_ci(baseline: Sequence[float], candidate: Sequence[float], n_boot: int = N_BOOT,
               seed: int = 0) -> tuple[Interval, np.ndarray]:
    reps = speedup_reps(baseline, candidate, n_boot, seed)
    lo, hi = _percentiles(reps)
    return Interval(median(baseline) / median(candidate), lo, hi), reps


def mean_ci(values: Sequence[float], reps: Sequence[np.ndarray]) -> Interval:
    """Arithmetic mean of per-item values, interval from their aligned bootstrap replicates."""
    if not values:
        raise ValueError("mean of no values")
    m = np.mean(np.vstack(reps), axis=0)
    lo, hi = _percentiles(m)
    return Interval(float(np.mean(values)), lo, hi)


def geomean_ci(values: Sequence[float], reps: Sequence[np.ndarray]) -> Interval:
    if not values:
        raise ValueError("geometric mean of no values")
    if any(v <= 0 for v in values):
        raise ValueError("geometric mean needs positive values")
    g = np.exp(np.mean(np.log(np.vstack(reps)), axis=0))
    lo, hi = _percentiles(g)
    return Interval(float(math.exp(np.mean(np.log(values)))), lo, hi)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: the run-to-run spread of repeated medians."""
    a = np.asarray(values, dtype=float)
    return float((a.max() - a.min()) / np.median(a))
