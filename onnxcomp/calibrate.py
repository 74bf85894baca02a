"""The one calibration engine: capture activations through onnxruntime and reduce them as they stream.

Everything that needs activations (static quantization ranges, activation-aware
SVD, data-aware pruning, layer-wise distillation) calls :func:`collect`: it clones
the model, exposes the wanted tensors as graph outputs, runs onnxruntime batch by
batch, and hands each batch's arrays to reducers that fold them into statistics.
No batch is kept after its reduction, so memory does not grow with the number of
batches. The reducers are here; turning their statistics into quantization ranges is
:mod:`onnxcomp.ranges`.
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
    "ChannelMean",
    "ChannelSquareSum",
    "RowSample",
    "Paired",
    "Stack",
    "collect",
    "collect_paired",
    "tensor_values",
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
        # uniform bins over [-range, range] (the last one closed), as np.histogram, by index arithmetic
        # and bincount (several times faster than np.histogram on large batches)
        index = ((flat.astype(np.float64) + self.range) * (self.bins / (2.0 * self.range))).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

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
        self.absmax: np.ndarray | None = None  # max |X_j| per channel
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        x = np.asarray(array, dtype=np.float32).reshape(-1, array.shape[-1])
        if self.xtx is None:
            self.xtx = np.zeros((x.shape[1], x.shape[1]), np.float64)
            self.absmax = np.zeros(x.shape[1], np.float64)
        if len(x):
            self.absmax = np.maximum(self.absmax, np.abs(x).max(axis=0))
        for start in range(0, x.shape[0], self.rows):
            chunk = x[start:start + self.rows]
            self.xtx += chunk.T @ chunk
        self.count += x.shape[0]


class ChannelMean:
    """Running mean per channel along ``axis`` (all other axes averaged)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        a = np.asarray(array, np.float64)
        a = np.moveaxis(a, self.axis, -1).reshape(-1, a.shape[self.axis])
        s = a.sum(axis=0)
        self.total = s if self.total is None else self.total + s
        self.count += len(a)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


class ChannelSquareSum:
    """Running Σx² per channel along ``axis`` (all other axes summed) and how many values each
    channel saw; ``norm()`` is each channel's L2 norm over everything streamed (Wanda's ‖x_j‖)."""

    def __init__(self, axis: int = -1):
        self.axis = axis
        self.value: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        moved = np.moveaxis(np.asarray(array, np.float64), self.axis, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        batch = np.einsum("nc,nc->c", flat, flat)
        self.value = batch if self.value is None else self.value + batch
        self.count += moved.size // max(moved.shape[-1], 1)

    def norm(self) -> np.ndarray | None:
        return None if self.value is None else np.sqrt(self.value)


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
    probe = _probe(model, names)
    with open_session(probe, session_options(level="basic", spinning=False), what="calibration model") as session:
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


def collect_paired(
    first: ir.Model,
    second: ir.Model,
    data: Dataset,
    pairs: Mapping[tuple[str, str], Iterable[Callable[[np.ndarray, np.ndarray], None]]],
    *,
    batch_size: int = 32,
) -> None:
    """Run two models with the same inputs on ``data`` in lockstep; for each ``(name in first,
    name in second)`` pair call its folds with both arrays of the same batch (e.g. a running
    ``XᵀY`` between a compressed model's activation and the float model's). Neither model is
    modified; memory holds one batch of the wanted tensors of both models at a time.
    """
    if not pairs:
        return
    names_a = list(dict.fromkeys(a for a, _ in pairs))
    names_b = list(dict.fromkeys(b for _, b in pairs))
    opts = session_options(level="basic", spinning=False)
    with open_session(_probe(first, names_a), opts, what="calibration model") as sa, \
            open_session(_probe(second, names_b), opts, what="calibration model") as sb:
        fetch_a = [n for n in names_a if n not in {i.name for i in sa.get_inputs()}]
        fetch_b = [n for n in names_b if n not in {i.name for i in sb.get_inputs()}]
        for feed in data.batches(batch_size):
            arrays_a = {**feed, **dict(zip(fetch_a, next(run_batches(sa, [feed], fetch_a))))}
            arrays_b = {**feed, **dict(zip(fetch_b, next(run_batches(sb, [feed], fetch_b))))}
            for (a, b), folds in pairs.items():
                for fold in folds:
                    fold(arrays_a[a], arrays_b[b])
            del arrays_a, arrays_b


def _probe(model: ir.Model, names: list[str]) -> ir.Model:
    """A clone of ``model`` whose graph outputs include every tensor of ``names``."""
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
    return probe


def tensor_values(model: ir.Model) -> dict[str, ir.Value]:
    """Name -> value for the graph inputs and every node output of the main graph."""
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values
