"""Quantization ranges from streamed statistics: each method maps a :class:`~onnxcomp.calibrate.Histogram`
(or :class:`~onnxcomp.calibrate.MinMax`) to the float range ``(lo, hi)``, ``lo <= 0 <= hi``, an
asymmetric quantizer with ``levels`` steps should cover. They only read the reducer.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.calibrate import Histogram, MinMax
from onnxcomp.qparams import shrink_search

__all__ = ["RANGE_METHODS", "tensor_range", "percentile_range", "mse_range"]

RANGE_METHODS = ("minmax", "percentile", "mse")


def tensor_range(stats: Histogram | MinMax, method: str = "minmax", *, percentile: float = 99.999,
                 levels: int = 256) -> tuple[float, float]:
    """The range ``method`` (one of RANGE_METHODS) picks for one tensor; always contains 0."""
    if method == "minmax" or not isinstance(stats, Histogram):
        lo, hi = float(np.min(stats.min)), float(np.max(stats.max))
    elif method == "percentile":
        lo, hi = percentile_range(stats, percentile)
    elif method == "mse":
        lo, hi = mse_range(stats, levels)
    else:
        raise ValueError(f"unknown range method {method!r}")
    if not (np.isfinite(lo) and np.isfinite(hi)):  # nothing was observed
        lo, hi = 0.0, 0.0
    return min(lo, 0.0), max(hi, 0.0)


def percentile_range(hist: Histogram, percentile: float = 99.999) -> tuple[float, float]:
    """Two-sided: the (100 - p)-th and p-th percentiles, linearly interpolated inside bins.

    Clamped to the observed [min, max]; p = 100 gives the min-max range.
    """
    total = hist.counts.sum()
    if total == 0 or percentile >= 100:
        return hist.min, hist.max
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts, dtype=np.float64)]) / total
    q = percentile / 100.0
    lo, hi = _quantile(cdf, hist.edges, 1.0 - q), _quantile(cdf, hist.edges, q)
    return max(lo, hist.min), min(hi, hist.max)


def mse_range(hist: Histogram, levels: int = 256, candidates: int = 200) -> tuple[float, float]:
    """The range (min-max shrunk by a common factor) minimising the expected squared
    quantize-dequantize error of the histogram's values (bin centres weighted by counts)."""
    if hist.counts.sum() == 0:
        return hist.min, hist.max
    centres = 0.5 * (hist.edges[:-1] + hist.edges[1:])
    keep = hist.counts > 0
    values, weights = centres[keep], hist.counts[keep].astype(np.float64)
    lo, hi = min(hist.min, 0.0), max(hist.max, 0.0)
    (best,) = shrink_search(np.linspace(1.0 / candidates, 1.0, candidates),
                            lambda f: (_quantization_error(values, weights, f * lo, f * hi, levels), f))
    return float(best) * lo, float(best) * hi


def _quantization_error(values: np.ndarray, weights: np.ndarray, lo: float, hi: float, levels: int) -> float:
    """Σ weight·(v - dequant(quant(v)))² for an asymmetric quantizer over [lo, hi]."""
    if hi - lo <= 0:
        return float((weights * values**2).sum())
    scale = (hi - lo) / (levels - 1)
    zero = np.round(-lo / scale)
    q = np.clip(np.round(values / scale) + zero, 0, levels - 1)
    return float((weights * (values - (q - zero) * scale) ** 2).sum())


def _quantile(cdf: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The value below which a fraction ``q`` of the histogram lies (uniform inside a bin)."""
    i = int(np.clip(np.searchsorted(cdf, q, side="left"), 1, len(cdf) - 1))
    lo, hi = cdf[i - 1], cdf[i]
    frac = 0.0 if hi <= lo else (q - lo) / (hi - lo)
    return float(edges[i - 1] + frac * (edges[i] - edges[i - 1]))
