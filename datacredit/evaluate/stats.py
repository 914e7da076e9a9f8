"""Column-wise correlations (one per query) and the percentile bootstrap of a mean over queries."""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_mean_ci", "pearson_columns", "spearman_columns"]


def pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``a[:, q]`` with ``b[:, q]`` for each column: ``(k, Q), (k, Q) -> (Q,)``.

    NaN for a column where either side is constant (or has fewer than 2 rows).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two equal 2-D shapes, got {a.shape} and {b.shape}")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / denom
    r[~(denom > 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation per column (ties get average ranks): ``(k, Q), (k, Q) -> (Q,)``."""
    from scipy.stats import rankdata  # imported here: scipy.stats is slow to import in every worker process

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two equal 2-D shapes, got {a.shape} and {b.shape}")
    return pearson_columns(rankdata(a, axis=0), rankdata(b, axis=0))


def bootstrap_mean_ci(values: np.ndarray, n_boot: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of ``values.mean()`` resampling the ``(Q,)`` values with replacement.

    ``(nan, nan)`` when ``n_boot == 0``. Resamples in blocks so memory stays ``O(Q · 256)``.
    """
    values = np.asarray(values, dtype=np.float64)
    if n_boot <= 0 or values.size == 0:
        return float("nan"), float("nan")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):
        stop = min(start + 256, n_boot)
        means[start:stop] = values[rng.integers(0, values.size, (stop - start, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
