"""Statistics for benchmark runs: medians with bootstrap confidence intervals, speedups, means.

Percentile bootstrap with a fixed seed, so a stored run's intervals can be recomputed exactly
from its samples. A speedup is baseline median / candidate median; its interval resamples the
two samples independently. Aggregates (arithmetic mean of per-workload speedups, the contest's
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


def median(xs: Sequence[float]) -> float:
    if len(xs) == 0:
        raise ValueError("median of no samples")
    return float(np.median(np.asarray(xs, dtype=float)))


def bootstrap_medians(xs: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        raise ValueError("bootstrap of no samples")
    idx = _rng(seed).integers(0, a.size, size=(n_boot, a.size))
    return np.median(a[idx], axis=1)


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
