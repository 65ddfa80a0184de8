"""Statistics of an A/B test where users are the unit of assignment: ratio metrics bootstrapped by
resampling users, percentile intervals, and the sample-ratio-mismatch test."""

from __future__ import annotations

import math

import numpy as np


def ratio_bootstrap(numerators: np.ndarray, denominators: np.ndarray, resamples: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(resamples, columns) bootstrap draws of sum(numerator) / sum(denominator), resampling
    rows (users: the unit traffic is split by) jointly for every column.

    Resampling users rather than requests keeps a heavy user's correlated taps together, which
    is what makes the interval honest when one user makes hundreds of requests.
    """
    numerators = np.asarray(numerators, dtype=np.float64).reshape(len(numerators), -1)
    denominators = np.asarray(denominators, dtype=np.float64).reshape(len(denominators), -1)
    n = len(numerators)
    out = np.empty((resamples, numerators.shape[1]))
    chunk = max(1, 2_000_000 // max(n * numerators.shape[1], 1))
    for s in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - s), n))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + len(idx)] = numerators[idx].sum(axis=1) / denominators[idx].sum(axis=1)
    return out


def percentile_ci(samples: np.ndarray) -> list[float | None]:
    """The 95% percentile interval of the finite `samples` ([None, None] if there are none)."""
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return [None, None]
    low, high = np.quantile(samples, [0.025, 0.975])
    return [round(float(low), 6), round(float(high), 6)]


def srm_p_value(observed: tuple[int, int], expected_share: float) -> float:
    """Chi-square (1 dof) p-value of `observed` (control, treatment) unit counts against the
    configured treatment share: a tiny p-value means assignment or logging is broken."""
    total = sum(observed)
    if total == 0:
        return 1.0
    expected = (total * (1.0 - expected_share), total * expected_share)
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    return math.erfc(math.sqrt(chi2 / 2.0))
