"""Data providers: ``.npz`` files keyed by graph input name, first axis = samples.

An optional ``label`` array holds class ids. Files are read with
``allow_pickle=False`` and checked against the model's inputs (names, dtypes,
ranks, static dims) so a mismatch is one clear line, not an onnxruntime trace.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxcomp.errors import OnnxcompError

__all__ = ["Dataset", "InputSpec", "load_data", "check_values", "check_label_range", "model_inputs", "synthetic_data"]

LABEL_KEY = "label"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, dims (int, or str/None for dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None


@dataclasses.dataclass
class Dataset:
    """Arrays for every graph input (same first axis) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<arrays>"
    fixed_batch: int | None = None  # the model's static batch size, if it has one

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``batch_size`` samples, in order.

        For a model with a static batch size every feed has exactly that size and
        a trailing remainder is dropped.
        """
        n = len(self)
        if self.fixed_batch:
            batch_size, n = self.fixed_batch, n - n % self.fixed_batch
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def head(self, n: int) -> Dataset:
        """The first ``n`` samples."""
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.source, self.fixed_batch)

    def used_labels(self) -> np.ndarray | None:
        """Labels of the samples :meth:`batches` yields."""
        if self.labels is None:
            return None
        n = len(self)
        if self.fixed_batch:
            n -= n % self.fixed_batch
        return self.labels[:n]


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        dims = None
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else (d.value if d.value else None) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(dtype), dims))
    return specs


def load_data(
    source: str | os.PathLike | Mapping[str, np.ndarray] | Dataset, model: ir.Model, *,
    allow_nonfinite: bool = False,
) -> Dataset:
    """Read ``source`` (a .npz path, a mapping of arrays, or a Dataset), check it fits ``model``.

    Float inputs must be finite unless ``allow_nonfinite`` (see :func:`check_values`);
    labels must be class ids (one-hot rows are converted to ids).
    """
    if isinstance(source, Dataset):
        data = source
    elif isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        labels = arrays.pop(LABEL_KEY, None)
        data = Dataset(arrays, labels)
    else:
        data = _read_npz(Path(source))
    _check(data, model_inputs(model))
    check_values(data, allow_nonfinite=allow_nonfinite)
    return data


def check_values(data: Dataset, *, allow_nonfinite: bool = False) -> None:
    """Values a run can trust: finite float inputs, labels that are class ids.

    A NaN/Inf input makes every output NaN and every comparison meaningless, so it is an
    error naming the input and the first bad index unless ``allow_nonfinite``. Labels must
    be one non-negative integer class id per sample (integral floats are accepted);
    one-hot rows ([samples, classes], a single 1 per row) are converted to ids in place.
    Whether the ids fit the model's class count is checked where the output is known
    (:func:`check_label_range`).
    """
    src = data.source
    if not allow_nonfinite:
        for name, array in data.inputs.items():
            if not np.issubdtype(array.dtype, np.inexact):
                continue
            bad = ~np.isfinite(array)
            if bad.any():
                index = [int(i) for i in np.argwhere(bad)[0]]
                value = array[tuple(index)]
                kind = "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
                raise OnnxcompError(f"{src}: input '{name}' holds {kind} at index {index} ({int(bad.sum())} "
                                    f"non-finite values); pass --allow-nonfinite if the model expects them")
    if data.labels is not None:
        data.labels = _class_ids(np.asarray(data.labels), len(data), src)


def check_label_range(labels: np.ndarray | None, classes: int, source: str, output: str) -> None:
    """Every label must be a class of ``output``'s ``classes`` scores."""
    if labels is None or not len(labels):
        return
    index = int(np.argmax(labels))
    if labels[index] >= classes:
        raise OnnxcompError(f"{source}: label {int(labels[index])} at index {index} is outside output "
                            f"'{output}''s {classes} classes (labels must be class ids 0..{classes - 1})")


def _class_ids(labels: np.ndarray, n: int, src: str) -> np.ndarray:
    if labels.ndim == 0 or labels.ndim > 2:
        raise OnnxcompError(f"{src}: 'label' must hold one class id per sample (or one-hot rows); "
                            f"got shape {list(labels.shape)}")
    if len(labels) != n:
        raise OnnxcompError(f"{src}: 'label' has {len(labels)} entries for {n} samples")
    if labels.dtype == np.bool_ and labels.ndim == 1 or not (np.issubdtype(labels.dtype, np.number)
                                                          or labels.dtype == np.bool_):
        raise OnnxcompError(f"{src}: 'label' must hold integer class ids (got dtype {labels.dtype})")
    if labels.ndim == 2:
        values = labels.astype(np.float64)
        if not (np.isin(values, (0, 1)).all() and (values.sum(axis=1) == 1).all()):
            row = int(np.argmax(~(np.isin(values, (0, 1)).all(axis=1) & (values.sum(axis=1) == 1))))
            raise OnnxcompError(f"{src}: 2-D 'label' must be one-hot rows (a single 1 per row); row {row} is not")
        return values.argmax(axis=1).astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            index = int(np.argmin(whole))
            raise OnnxcompError(f"{src}: 'label' must hold integer class ids; entry {index} is {labels[index]!r}")
        labels = labels.astype(np.int64)
    if len(labels) and labels.min() < 0:
        index = int(np.argmin(labels))
        raise OnnxcompError(f"{src}: 'label' holds a negative class id {int(labels[index])} at index {index}")
    return labels


def synthetic_data(model: ir.Model, n: int = 32, seed: int = 0) -> Dataset:
    """Seeded random inputs of the model's shapes (dynamic dims: 1 for batch-like, else 8)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in model_inputs(model):
        if spec.dims is None:
            raise OnnxcompError(f"input '{spec.name}' has no shape: pass --val DATA.npz")
        dims = [n] + [d if isinstance(d, int) else 8 for d in spec.dims[1:]] if spec.dims else []
        if np.issubdtype(spec.dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            arrays[spec.name] = rng.integers(0, 2, dims).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            arrays[spec.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            raise OnnxcompError(f"input '{spec.name}' of type {spec.dtype}: pass --val DATA.npz")
    return Dataset(arrays, None, "<synthetic>")


def _read_npz(path: Path) -> Dataset:
    try:
        found = path.is_file()
    except OSError as exc:  # e.g. a name too long for the file system
        raise OnnxcompError(f"{str(path)[:60]}…: cannot open data file ({exc.strerror}; too long?)") from None
    if not found:
        raise OnnxcompError(f"{path}: no such data file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise OnnxcompError(f"{path}: a .npy array, not an .npz of arrays keyed by input name "
                                f"(np.savez(path, {{input_name: array, ...}}))")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise OnnxcompError(f"{path}: not a readable .npz data file ({str(exc).splitlines()[0][:160]})") from None
    labels = arrays.pop(LABEL_KEY, None)
    if not arrays:
        raise OnnxcompError(f"{path}: holds no input arrays")
    return Dataset(arrays, labels, str(path))


def _check(data: Dataset, specs: list[InputSpec]) -> None:
    src = data.source
    expected = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in data.inputs]
    if missing:
        raise OnnxcompError(
            f"{src}: missing input '{missing[0]}' (model inputs: {', '.join(sorted(expected))}; "
            f"file has: {', '.join(sorted(data.inputs)) or 'nothing'})"
        )
    extra = sorted(set(data.inputs) - expected)
    if extra:
        raise OnnxcompError(f"{src}: array '{extra[0]}' is not a model input (inputs: {', '.join(sorted(expected))})")
    lengths = {len(a) if a.ndim else -1 for a in data.inputs.values()}
    if len(lengths) != 1 or -1 in lengths:
        raise OnnxcompError(f"{src}: arrays must share their first axis (samples); got lengths {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise OnnxcompError(f"{src}: holds no samples")
    for spec in specs:
        array = data.inputs[spec.name]
        if array.dtype != spec.dtype:
            raise OnnxcompError(f"{src}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.dims is None:
            continue
        if array.ndim != len(spec.dims):
            raise OnnxcompError(
                f"{src}: input '{spec.name}' has shape {list(array.shape)}, the model expects rank "
                f"{len(spec.dims)} {_dims_text(spec.dims)}"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
            if axis > 0 and isinstance(want, int) and got != want:
                raise OnnxcompError(
                    f"{src}: input '{spec.name}' has shape {list(array.shape)}, the model expects "
                    f"{_dims_text(spec.dims)} (axis {axis})"
                )
        if spec.dims and isinstance(spec.dims[0], int):
            if n < spec.dims[0]:
                raise OnnxcompError(
                    f"{src}: model input '{spec.name}' has a fixed batch of {spec.dims[0]}; "
                    f"the file holds only {n} samples"
                )
            data.fixed_batch = spec.dims[0]


def _dims_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
