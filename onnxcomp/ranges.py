"""Quantization ranges from streamed statistics: each method maps a :class:`~onnxcomp.calibrate.Histogram`
(or :class:`~onnxcomp.calibrate.MinMax`) to the float range ``(lo, hi)``, ``lo <= 0 <= hi``, an
asymmetric quantizer with ``levels`` steps should cover. They only read the reducer.
"""

from __future__ import annotations

import numpy as np

from onnxcomp.calibrate import Histogram, MinMax
from onnxcomp.qparams import shrink_search

__all__ = ["RANGE_METHODS", "tensor_range", "percentile_range", "entropy_range", "mse_range"]

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")


def tensor_range(stats: Histogram | MinMax, method: str = "minmax", *, percentile: float = 99.999,
                 levels: int = 256) -> tuple[float, float]:
    """The range ``method`` (one of RANGE_METHODS) picks for one tensor; always contains 0."""
    if method == "minmax" or not isinstance(stats, Histogram):
        lo, hi = float(np.min(stats.min)), float(np.max(stats.max))
    elif method == "percentile":
        lo, hi = percentile_range(stats, percentile)
    elif method == "entropy":
        lo, hi = entropy_range(stats, levels)
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


def entropy_range(hist: Histogram, levels: int = 256, max_candidates: int = 512) -> tuple[float, float]:
    """TensorRT's KL-divergence calibration: the clipping threshold whose quantized distribution
    (``levels`` steps over the clipped range) diverges least from the observed one.

    One-signed data is searched on its own side with all ``levels`` steps; two-signed data on
    |x| with half of them (the quantizer spends the other half on the negative side).
    """
    magnitudes, levels, sign = _one_sided_counts(hist, levels)
    used = int(np.flatnonzero(magnitudes)[-1]) + 1 if magnitudes.any() else 0
    if used <= levels:
        return hist.min, hist.max
    width = hist.range / (hist.bins // 2)
    step = max(1, (used - levels) // max_candidates)
    stops = np.arange(levels, used + 1, step)
    kl = _clipped_kl_many(magnitudes, stops, levels)
    best = used
    if np.isfinite(kl).any():  # the first of the minima (equal up to rounding: sparse histograms tie)
        low = kl.min()
        best = int(stops[np.flatnonzero(kl <= low + 1e-12 * max(1.0, abs(low)))[0]])
    return _signed_range(hist, best * width, sign)


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


def _one_sided_counts(hist: Histogram, levels: int) -> tuple[np.ndarray, int, int]:
    """Counts over |x| from 0 outwards, the levels available there, and the sign (+1, -1, 0=both)."""
    half = hist.bins // 2
    positive, negative = hist.counts[half:], hist.counts[:half][::-1]
    if hist.min >= 0:
        return positive, levels, 1
    if hist.max <= 0:
        return negative, levels, -1
    return positive + negative, levels // 2, 0


def _signed_range(hist: Histogram, threshold: float, sign: int) -> tuple[float, float]:
    lo = 0.0 if sign > 0 else max(-threshold, hist.min)
    hi = 0.0 if sign < 0 else min(threshold, hist.max)
    return lo, hi


def _clipped_kl_many(counts: np.ndarray, stops: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) for every clipping point in ``stops`` (each >= ``levels``) at once: P = the first
    ``stop`` bins with the clipped tail added to the last one, Q = those bins merged into
    ``levels`` groups, each group's mass spread over its non-empty bins.

    Works per group of merged bins instead of per bin, from prefix sums over the counts: the
    groups of stop s are contiguous, [ceil(g·s/levels), ceil((g+1)·s/levels)), and Q is constant
    over a group's non-empty bins, so with P's mass p_g in group g (the clipped tail included in
    the last) and Q's value q_g there, KL = Σ_j p_j·log p_j − Σ_g p_g·log q_g. The first sum is
    a prefix sum except for the last bin (which takes the tail). Cost O(stops × levels).
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()  # P's mass for every stop (the clipped tail goes into its last bin)
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    cum_nonzero = np.concatenate([[0], np.cumsum(counts > 0)])
    share = counts / total
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(counts > 0, share * np.log(share), 0.0)
    cum_plogp = np.concatenate([[0.0], np.cumsum(plogp)])

    s = np.asarray(stops, np.int64)[:, None]  # [C, 1]
    last = s[:, 0] - 1
    tail = total - cum[s[:, 0]]
    p_last = counts[last] + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        last_share = p_last / total
        entropy = cum_plogp[last] + np.where(p_last > 0, last_share * np.log(last_share), 0.0)

    bounds = -(-(np.arange(levels + 1) * s) // levels)  # [C, levels + 1]: group starts, then s
    mass = np.diff(cum[bounds], axis=1)  # Q's mass per group: counts without the tail
    filled = np.diff(cum_nonzero[bounds], axis=1)  # P's non-empty bins per group
    filled[:, -1] += (counts[last] == 0) & (p_last > 0)  # an empty last bin that took the tail
    per_bin = mass / np.maximum(filled, 1)
    q_total = (per_bin * filled).sum(axis=1)
    p_mass = mass.copy()
    p_mass[:, -1] += tail
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.maximum(per_bin / q_total[:, None], 1e-8)  # a bin P has and Q lacks costs a lot, not infinity
        cross = np.where(p_mass > 0, p_mass / total * np.log(q), 0.0).sum(axis=1)
    kl = entropy - cross
    kl[q_total == 0] = np.inf
    return kl


def _quantile(cdf: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The value below which a fraction ``q`` of the histogram lies (uniform inside a bin)."""
    i = int(np.clip(np.searchsorted(cdf, q, side="left"), 1, len(cdf) - 1))
    lo, hi = cdf[i - 1], cdf[i]
    frac = 0.0 if hi <= lo else (q - lo) / (hi - lo)
    return float(edges[i - 1] + frac * (edges[i] - edges[i - 1]))
