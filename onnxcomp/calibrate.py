"""The one calibration engine: capture activations through onnxruntime and reduce them as they stream.

Everything that needs activations (static quantization ranges, activation-aware
SVD, data-aware pruning, layer-wise distillation) calls :func:`collect`: it clones
the model, exposes the wanted tensors as graph outputs, runs onnxruntime batch by
batch, and hands each batch's arrays to reducers that fold them into statistics.
No batch is kept after its reduction, so memory does not grow with the number of
batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.runtime import open_session, run_batches, session_options

__all__ = [
    "Reducer",
    "MinMax",
    "Histogram",
    "Gram",
    "ChannelAbsMax",
    "RowSample",
    "Paired",
    "Stack",
    "collect",
    "tensor_values",
    "RANGE_METHODS",
    "tensor_range",
    "minmax_range",
    "percentile_range",
    "entropy_range",
    "mse_range",
    "weight_absmax",
]


class Reducer(Protocol):
    """Folds one batch of one tensor into running statistics."""

    def update(self, array: np.ndarray) -> None: ...


class MinMax:
    """Running min and max (per tensor, or per channel along ``axis``)."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        if array.size == 0:
            return
        if self.axis is None:
            lo, hi = np.min(array), np.max(array)
        else:
            moved = np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
            lo, hi = moved.min(axis=1), moved.max(axis=1)
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)


class Histogram:
    """A symmetric histogram over [-R, R] whose range doubles when data exceeds it.

    Doubling merges neighbouring bins pairwise, so the bin count is fixed and the
    cost of one update is O(batch size + bins), independent of how many came before.
    Also keeps the exact min and max.
    """

    def __init__(self, bins: int = 2048):
        if bins % 2:
            raise ValueError("bins must be even")
        self.bins = bins
        self.range = 0.0
        self.counts = np.zeros(bins, dtype=np.int64)
        self.min = np.inf
        self.max = -np.inf

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.range, self.range, self.bins + 1)

    def update(self, array: np.ndarray) -> None:
        flat = np.asarray(array, dtype=np.float32).ravel()
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        bound = max(abs(self.min), abs(self.max))
        if self.range == 0.0:
            self.range = bound if bound > 0 else 1e-8
        while bound > self.range:
            self._double()
        counts, _ = np.histogram(flat, bins=self.bins, range=(-self.range, self.range))
        self.counts += counts

    def _double(self) -> None:
        half = self.bins // 2
        merged = self.counts.reshape(-1, 2).sum(axis=1)  # bins now twice as wide
        counts = np.zeros_like(self.counts)
        counts[half // 2 : half // 2 + half] = merged
        self.counts = counts
        self.range *= 2.0


class Gram:
    """Running XᵀX over the last axis (all leading axes are samples) and the sample count.

    Products in float32 (BLAS sgemm, several times faster than float64), summed in float32 over
    at most ``rows`` rows at a time; the running total is float64, so rounding does not grow with
    the number of batches.
    """

    def __init__(self, rows: int = 4096):
        self.rows = rows
        self.xtx: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        x = np.asarray(array, dtype=np.float32).reshape(-1, array.shape[-1])
        if self.xtx is None:
            self.xtx = np.zeros((x.shape[1], x.shape[1]), np.float64)
        for start in range(0, x.shape[0], self.rows):
            chunk = x[start:start + self.rows]
            self.xtx += chunk.T @ chunk
        self.count += x.shape[0]


class ChannelAbsMax:
    """Running max |x| per channel along ``axis`` (default: the last axis)."""

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.value: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        moved = np.moveaxis(np.abs(array), self.axis, -1).reshape(-1, array.shape[self.axis])
        batch = moved.max(axis=0)
        self.value = batch if self.value is None else np.maximum(self.value, batch)


class RowSample:
    """A uniform random sample of at most ``rows`` rows over the last axis (leading axes = samples).

    Bottom-k sampling: every row gets a seeded random key and the ``rows`` smallest keys
    are kept, so memory stays O(rows + batch) however many batches stream past.
    """

    def __init__(self, rows: int = 512, seed: int = 0):
        self.rows = rows
        self.value: np.ndarray | None = None
        self._keys = np.empty(0)
        self._rng = np.random.default_rng(seed)

    def update(self, array: np.ndarray) -> None:
        flat = np.asarray(array).reshape(-1, array.shape[-1])
        keys = np.concatenate([self._keys, self._rng.random(len(flat))])
        flat = flat if self.value is None else np.concatenate([self.value, flat])
        if len(flat) > self.rows:
            keep = np.sort(np.argpartition(keys, self.rows)[: self.rows])
            flat, keys = flat[keep], keys[keep]
        self.value, self._keys = np.array(flat), keys


class Paired:
    """Joins two tensors of the same batch: register ``paired.first`` under one tensor name and
    ``paired.second`` under another; once both arrays of a batch have arrived,
    ``fold(first, second)`` is called and both are dropped (e.g. a running XᵀY between a layer's
    input and a target). Works because :func:`collect` feeds every tensor of a batch before the next.
    """

    def __init__(self, fold: Callable[[np.ndarray, np.ndarray], None]):
        self.fold = fold
        self._arrays: list[np.ndarray | None] = [None, None]
        self.first, self.second = _Port(self, 0), _Port(self, 1)

    def _arrive(self, index: int, array: np.ndarray) -> None:
        self._arrays[index] = array
        if self._arrays[0] is not None and self._arrays[1] is not None:
            a, b = self._arrays
            self._arrays = [None, None]
            self.fold(a, b)


class _Port:
    def __init__(self, owner: Paired, index: int):
        self.owner, self.index = owner, index

    def update(self, array: np.ndarray) -> None:
        self.owner._arrive(self.index, array)


class Stack:
    """Keeps every batch, in order (``value``: their concatenation along axis 0). Memory grows
    with the data: only for small tensors that must stay aligned sample for sample (logits)."""

    def __init__(self):
        self._parts: list[np.ndarray] = []

    def update(self, array: np.ndarray) -> None:
        self._parts.append(np.array(array))

    @property
    def value(self) -> np.ndarray | None:
        return np.concatenate(self._parts) if self._parts else None


def collect(
    model: ir.Model,
    data: Dataset,
    reducers: Mapping[str, Iterable[Reducer]],
    *,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    memory_budget: int = 256 << 20,
) -> None:
    """Run ``model`` on ``data`` and feed each wanted tensor to its reducers, batch by batch.

    ``reducers`` maps tensor names (graph inputs, node outputs of the main graph) to
    reducers. ``model`` is not modified. ``progress(done, total)`` is called per batch.
    Memory stays flat in the number of batches, and the batch is sized so that one batch of
    the wanted tensors stays under ``memory_budget`` bytes (measured on the first sample;
    never above ``batch_size``; models with a static batch keep theirs).
    """
    names = list(reducers)
    if not names:
        return
    probe = model.clone()
    values = tensor_values(probe)
    unknown = [n for n in names if n not in values]
    if unknown:
        raise OnnxcompError(f"calibration: tensor '{unknown[0]}' is not in the main graph")
    existing = {v.name for v in probe.graph.outputs}
    for name in names:
        value = values[name]
        if name in existing or value.is_graph_input():
            continue
        if value.type is None:  # onnxruntime needs a type on graph outputs
            value.type = ir.TensorType(ir.DataType.FLOAT)
        probe.graph.outputs.append(value)
        existing.add(name)
    with open_session(probe, session_options(level="basic"), what="calibration model") as session:
        input_names = {i.name for i in session.get_inputs()}
        fetch = [n for n in names if n not in input_names]
        done = 0

        def feed_reducers(feed: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
            nonlocal done
            arrays = dict(zip(fetch, outputs))
            for name in names:
                array = arrays[name] if name in arrays else feed[name]
                for reducer in reducers[name]:
                    reducer.update(array)
            done += 1
            if progress:
                progress(done, max(done, -(-len(data) // (1 if data.feedwise else data.fixed_batch or batch_size))))

        if data.fixed_batch or data.feedwise:
            for feed, outputs in zip(data.batches(batch_size), run_batches(session, data.batches(batch_size), fetch)):
                feed_reducers(feed, outputs)
            return
        size = batch_size
        first = data.window(0, 1)
        try:  # one sample first: size the batches to the memory budget
            outputs = next(run_batches(session, [first], fetch)) if len(data) > 1 else None
        except OnnxcompError:  # a graph with a static batch dim inside: keep batch_size
            outputs = None
        if outputs is not None:  # not fed to the reducers: the batches stay those of batch_size when it fits
            per_sample = max(sum(a.nbytes for a in outputs), 1)
            del outputs
            size = max(1, min(batch_size, memory_budget // per_sample))
        for begin in range(0, len(data), size):
            feed = data.window(begin, size)
            feed_reducers(feed, next(run_batches(session, [feed], fetch)))


def tensor_values(model: ir.Model) -> dict[str, ir.Value]:
    """Name -> value for the graph inputs and every node output of the main graph."""
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


# --- quantization ranges from the streamed statistics -------------------------------------------
#
# Each function maps a Histogram (or MinMax) to a float range (lo, hi) with lo <= 0 <= hi, the
# range an asymmetric quantizer with ``levels`` steps should cover. They only read the reducer.

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


def minmax_range(hist: Histogram) -> tuple[float, float]:
    """The exact smallest and largest value seen."""
    return hist.min, hist.max


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
    factors = np.linspace(1.0 / candidates, 1.0, candidates)
    errors = [_quantization_error(values, weights, f * lo, f * hi, levels) for f in factors]
    best = factors[int(np.argmin(errors))]
    return best * lo, best * hi


def weight_absmax(weight: np.ndarray, axis: int | None, method: str = "minmax", qmax: int = 127,
                  candidates: int = 36) -> np.ndarray | float:
    """Per-channel (along ``axis``; None = per tensor) clipping threshold for symmetric weights.

    ``minmax``: max |w|. ``mse``: the fraction of max |w| (grid of ``candidates`` ratios in
    [0.3, 1]) minimising each channel's squared rounding + clipping error with steps of t/qmax.
    """
    w = np.asarray(weight, dtype=np.float32)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    absmax = np.abs(rows).max(axis=1)
    if method == "minmax":
        return absmax.astype(np.float64) if axis is not None else float(absmax[0])
    if method != "mse":
        raise ValueError(f"unknown weight method {method!r}")
    best, best_err = absmax.astype(np.float64), np.full(len(absmax), np.inf)
    for ratio in np.linspace(0.3, 1.0, candidates):
        limit = np.maximum(ratio * absmax, 1e-12)[:, None]
        scale = (limit / qmax).astype(np.float32)
        err = ((rows - np.clip(np.round(rows / scale), -qmax, qmax) * scale) ** 2).sum(axis=1, dtype=np.float64)
        better = err < best_err
        best[better], best_err[better] = limit[better, 0], err[better]
    return best if axis is not None else best[0]


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


def _clipped_kl(counts: np.ndarray, stop: int, levels: int) -> float:
    """KL(P || Q): P = counts[:stop] with the clipped tail added to its last bin; Q = the first
    ``stop`` bins merged into ``levels`` groups, each group's mass spread over its non-empty bins."""
    p = counts[:stop].astype(np.float64)
    p[-1] += counts[stop:].sum()
    groups = (np.arange(stop) * levels) // stop
    starts = np.flatnonzero(np.diff(groups, prepend=-1))
    nonzero = p > 0
    mass = np.add.reduceat(counts[:stop].astype(np.float64), starts)
    filled = np.add.reduceat(nonzero.astype(np.float64), starts)
    q = np.where(nonzero, (mass / np.maximum(filled, 1))[groups], 0.0)
    if q.sum() == 0:
        return np.inf
    mask = p > 0
    p = p[mask] / p.sum()
    q = np.maximum(q[mask] / q.sum(), 1e-8)  # a bin P has and Q lacks costs a lot, not infinity
    return float((p * np.log(p / q)).sum())


def _clipped_kl_many(counts: np.ndarray, stops: np.ndarray, levels: int) -> np.ndarray:
    """:func:`_clipped_kl` for every clipping point in ``stops`` (each >= ``levels``) at once.

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
