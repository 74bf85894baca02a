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
    "collect",
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
    """Running XᵀX over the last axis (all leading axes are samples) and the sample count."""

    def __init__(self):
        self.xtx: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        x = np.asarray(array, dtype=np.float64).reshape(-1, array.shape[-1])
        gram = x.T @ x
        self.xtx = gram if self.xtx is None else self.xtx + gram
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


def collect(
    model: ir.Model,
    data: Dataset,
    reducers: Mapping[str, Iterable[Reducer]],
    *,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run ``model`` on ``data`` and feed each wanted tensor to its reducers, batch by batch.

    ``reducers`` maps tensor names (graph inputs, node outputs of the main graph) to
    reducers. ``model`` is not modified. ``progress(done, total)`` is called per batch.
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
    total = -(-len(data) // (data.fixed_batch or batch_size))
    with open_session(probe, session_options(level="basic"), what="calibration model") as session:
        input_names = {i.name for i in session.get_inputs()}
        fetch = [n for n in names if n not in input_names]
        for index, (feed, outputs) in enumerate(
            zip(data.batches(batch_size), run_batches(session, data.batches(batch_size), fetch))
        ):
            arrays = dict(zip(fetch, outputs))
            for name in names:
                array = arrays[name] if name in arrays else feed[name]
                for reducer in reducers[name]:
                    reducer.update(array)
            del arrays, outputs
            if progress:
                progress(index + 1, total)


def tensor_values(model: ir.Model) -> dict[str, ir.Value]:
    """Name -> value for the graph inputs and every node output of the main graph."""
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values
