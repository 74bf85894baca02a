"""Data providers: ``.npz`` files keyed by graph input name (layouts: see :class:`Dataset`).

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

__all__ = ["Dataset", "InputSpec", "load_data", "padding_mask_input", "resolve_layouts", "check_values", "check_label_range", "model_inputs", "synthetic_data",
           "SYNTHETIC_DIM"]

LABEL_KEY = "label"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, dims (int >= 0, or str/None for dynamic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None


BATCH, SAMPLE, SHARED = "batch", "sample", "shared"
LAYOUT_TEXT = {BATCH: "axis 0 = batch (samples are rows)", SAMPLE: "one whole feed per sample (array[i])",
               SHARED: "one array shared by every sample"}


@dataclasses.dataclass
class Dataset:
    """Arrays for every graph input and optional labels.

    ``layouts`` says how each input's array holds the samples (missing: ``"batch"``):
    ``"batch"`` axis 0 is the model's batch axis, consecutive rows are samples and feeds
    are slices; ``"sample"`` ``array[i]`` is sample ``i``'s whole feed (rank r + 1 for an
    input of rank r); ``"shared"`` the same array in every feed (a 0-d scalar or one feed's
    worth). With any per-sample input, or a shared array that is not a scalar, every feed
    is one sample (batch inputs give ``array[i:i+1]``).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "<arrays>"
    fixed_batch: int | None = None  # the model's static batch size, if it has one
    layouts: dict[str, str] = dataclasses.field(default_factory=dict)
    trim_mask: str | None = None  # set by by_length(): feeds end after the last position this mask marks

    def layout(self, name: str) -> str:
        return self.layouts.get(name, BATCH)

    @property
    def feedwise(self) -> bool:
        """Every feed is exactly one sample (some input is per-sample or a shared feed)."""
        return any(self.layout(k) == SAMPLE or (self.layout(k) == SHARED and v.ndim > 0)
                   for k, v in self.inputs.items())

    def __len__(self) -> int:
        rows = [v for k, v in self.inputs.items() if self.layout(k) != SHARED]
        return len(rows[0]) if rows else 1

    def batches(self, batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``batch_size`` samples, in order.

        For a model with a static batch size every feed has exactly that size and
        a trailing remainder is dropped; with :attr:`feedwise` data every feed is one sample.
        """
        n = len(self)
        if self.feedwise:
            batch_size = 1
        elif self.fixed_batch:
            batch_size, n = self.fixed_batch, n - n % self.fixed_batch
        for start in range(0, n, batch_size):
            yield self.window(start, batch_size)

    def window(self, start: int, size: int) -> dict[str, np.ndarray]:
        """The feed of samples ``start .. start + size`` (one sample when :attr:`feedwise`)."""
        feed = {}
        for k, v in self.inputs.items():
            layout = self.layout(k)
            feed[k] = v if layout == SHARED else v[start] if layout == SAMPLE else v[start : start + size]
        if self.trim_mask is not None and not self.feedwise:
            mask = feed[self.trim_mask]
            marked = np.flatnonzero(np.any(mask != 0, axis=0))
            width = int(marked[-1]) + 1 if marked.size else 1
            for k, v in feed.items():
                if self.layout(k) == BATCH and v.ndim >= 2 and v.shape[1] == mask.shape[1]:
                    feed[k] = v[:, :width]
        return feed

    def by_length(self, mask: str) -> Dataset:
        """The same samples ordered by their number of marked ``mask`` positions (stable), each
        feed cut after the last sequence position (axis 1) that any of its rows marks: batches
        of similar lengths without the padding columns none of their rows needs.

        Every batch-layout input whose axis 1 has the mask's length is cut. Meant for models
        whose outputs at marked positions do not depend on the padding (an attention mask):
        calibration then sees no activations of padding-only columns and runs far fewer
        positions. The data must be batch-layout with a rank-2 ``mask``; else returned unchanged.
        """
        values = self.inputs.get(mask)
        if values is None or values.ndim != 2 or self.feedwise or self.layout(mask) != BATCH:
            return self
        order = np.argsort(np.count_nonzero(values, axis=1), kind="stable")
        inputs = {k: v if self.layout(k) == SHARED else v[order] for k, v in self.inputs.items()}
        labels = None if self.labels is None else self.labels[order]
        return Dataset(inputs, labels, self.source, self.fixed_batch, dict(self.layouts), trim_mask=mask)

    def samples_in(self, feed: Mapping[str, np.ndarray]) -> int:
        """How many samples ``feed`` (from :meth:`batches`) holds."""
        if self.feedwise:
            return 1
        rows = [v for k, v in feed.items() if self.layout(k) == BATCH]
        return len(rows[0]) if rows else 1

    def feed_shapes(self) -> dict[str, tuple[int, ...]]:
        """Input shapes of the first feed of :meth:`batches` (what one run of the model sees)."""
        return {k: v.shape for k, v in next(self.batches()).items()}

    def layout_summary(self) -> dict[str, str]:
        """Input name -> the layout used, in words (for reports)."""
        return {k: LAYOUT_TEXT[self.layout(k)] + f" {list(v.shape)}" for k, v in self.inputs.items()}

    def head(self, n: int) -> Dataset:
        """The first ``n`` samples."""
        labels = None if self.labels is None else self.labels[:n]
        inputs = {k: v if self.layout(k) == SHARED else v[:n] for k, v in self.inputs.items()}
        return Dataset(inputs, labels, self.source, self.fixed_batch, dict(self.layouts), self.trim_mask)

    def spread(self, n: int) -> Dataset:
        """``n`` samples evenly spaced over the data, in order (all of them when ``n >= len``): on
        :meth:`by_length` data, short and long samples alike, still batched by length."""
        if n >= len(self):
            return self
        keep = np.linspace(0, len(self) - 1, n).round().astype(np.int64)
        labels = None if self.labels is None else self.labels[keep]
        inputs = {k: v if self.layout(k) == SHARED else v[keep] for k, v in self.inputs.items()}
        return Dataset(inputs, labels, self.source, self.fixed_batch, dict(self.layouts), self.trim_mask)

    def used_labels(self) -> np.ndarray | None:
        """Labels of the samples :meth:`batches` yields."""
        if self.labels is None:
            return None
        n = len(self)
        if self.fixed_batch and not self.feedwise:
            n -= n % self.fixed_batch
        return self.labels[:n]


def padding_mask_input(model: ir.Model) -> str | None:
    """The model's padding mask input: its one integer (or bool) rank-2 input with "mask" in its
    name and a dynamic axis 1 (a BERT ``attention_mask`` [batch, seq]); None when none or several."""
    found = [s.name for s in model_inputs(model) if "mask" in s.name.lower() and s.dims is not None
             and len(s.dims) == 2 and not isinstance(s.dims[1], int)
             and (np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_)]
    return found[0] if len(found) == 1 else None


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        dims = None
        if value.shape is not None:
            # a negative dim_value (paddle2onnx writes -1) is a dynamic axis, as onnxruntime reads it
            dims = tuple((d if d >= 0 else None) if isinstance(d, int) else (d.value if d.value else None)
                         for d in value.shape)
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


SYNTHETIC_DIM = 8  # a dynamic non-batch dim (a sequence length) when no data says otherwise


def synthetic_data(model: ir.Model, n: int = 32, seed: int = 0) -> Dataset:
    """Seeded random inputs of the model's shapes that the model accepts.

    When every input's axis 0 is dynamic it is the batch axis: ``n`` samples there, other dynamic
    dims :data:`SYNTHETIC_DIM`. When some input has a static axis 0 (a fixed batch, a recurrent
    state ``[layers, 1, hidden]``) the data holds ``n`` whole feeds (layout ``"sample"``), each with
    the model's static dims and :data:`SYNTHETIC_DIM` for every dynamic one.
    """
    rng = np.random.default_rng(seed)
    specs = model_inputs(model)
    for spec in specs:
        if spec.dims is None:
            raise OnnxcompError(f"input '{spec.name}' has no shape: pass --val DATA.npz")
    batch_axis = all(not spec.dims or not isinstance(spec.dims[0], int) for spec in specs)
    arrays = {}
    for spec in specs:
        feed_dims = [d if isinstance(d, int) else SYNTHETIC_DIM for d in spec.dims]
        dims = ([n] + feed_dims[1:] if spec.dims else []) if batch_axis else [n] + feed_dims
        if np.issubdtype(spec.dtype, np.floating):
            arrays[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            arrays[spec.name] = rng.integers(0, 2, dims).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            arrays[spec.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            raise OnnxcompError(f"input '{spec.name}' of type {spec.dtype}: pass --val DATA.npz")
    if batch_axis:  # a 0-d input: one value for all
        layouts = {k: SHARED for k, v in arrays.items() if v.ndim == 0}
    else:
        layouts = dict.fromkeys(arrays, SAMPLE)
    return Dataset(arrays, None, "<synthetic>", layouts=layouts)


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
    for spec in specs:
        array = data.inputs[spec.name]
        if array.dtype != spec.dtype:
            raise OnnxcompError(f"{src}: input '{spec.name}' has dtype {array.dtype}, the model expects {spec.dtype}")
    data.layouts = resolve_layouts(data, specs)
    n = len(data)
    if n == 0:
        raise OnnxcompError(f"{src}: holds no samples")
    for spec in specs:
        if spec.dims and data.layout(spec.name) == BATCH and isinstance(spec.dims[0], int) and not data.feedwise:
            if n < spec.dims[0]:
                raise OnnxcompError(
                    f"{src}: model input '{spec.name}' has a fixed batch of {spec.dims[0]}; "
                    f"the file holds only {n} samples"
                )
            data.fixed_batch = spec.dims[0]


def resolve_layouts(data: Dataset, specs: list[InputSpec]) -> dict[str, str]:
    """Decide how each input's array holds the samples (see :class:`Dataset`), from the model's shapes.

    Rank r + 1 for an input of rank r: one feed per sample. Rank r: axis 0 is the batch axis,
    unless the array is exactly one feed (every static dim matches) and the other inputs hold a
    different number of samples — then it is shared by all samples; a 0-d array for a 0-d input
    is shared. Anything else is an error naming the input.
    """
    src = data.source
    layouts: dict[str, str] = {}
    undecided = []
    for spec in specs:
        array = data.inputs[spec.name]
        if spec.dims is None:
            layouts[spec.name] = BATCH if array.ndim else SHARED
            continue
        rank = len(spec.dims)
        if array.ndim == rank + 1:
            layouts[spec.name] = SAMPLE
            _check_dims(src, spec, array.shape[1:], array.shape, first_axis=True)
        elif array.ndim == rank == 0:
            layouts[spec.name] = SHARED
        elif array.ndim == rank:
            undecided.append(spec)
        else:
            raise OnnxcompError(
                f"{src}: input '{spec.name}' has shape {list(array.shape)}, the model expects rank {rank} "
                f"{_dims_text(spec.dims)}: give rank {rank} (axis 0 = batch, or one feed shared by all "
                f"samples) or rank {rank + 1} (one whole feed per sample)")
    lengths = {len(data.inputs[k]) for k, v in layouts.items() if v == SAMPLE}
    if len(lengths) > 1:
        raise OnnxcompError(f"{src}: per-sample inputs hold different numbers of samples: {sorted(lengths)}")
    n = lengths.pop() if lengths else None
    # an axis 0 fixed to a size other than 1 is not a batch axis when another input's axis 0 is dynamic
    dynamic_first = [s for s in undecided if not isinstance(s.dims[0], int)]
    if n is None and undecided:  # samples: the longest array whose axis 0 is the batch axis
        n = max(len(data.inputs[s.name]) for s in (dynamic_first or undecided))
    for spec in undecided:
        array = data.inputs[spec.name]
        not_batch = dynamic_first and isinstance(spec.dims[0], int) and spec.dims[0] != 1
        if len(array) == n and _dims_fit(spec.dims[1:], array.shape[1:]) and not not_batch:
            layouts[spec.name] = BATCH
        elif _one_feed(spec, array):
            layouts[spec.name] = SHARED
        else:
            _check_dims(src, spec, array.shape[1:], array.shape, first_axis=False)
            raise OnnxcompError(
                f"{src}: input '{spec.name}' has {len(array)} samples (shape {list(array.shape)}), the other "
                f"inputs {n}; nor is it one feed of {_dims_text(spec.dims)} to share with every sample")
    feedwise = any(v == SAMPLE for v in layouts.values()) or any(
        v == SHARED and data.inputs[k].ndim for k, v in layouts.items())
    for spec in undecided:
        first = spec.dims[0]
        if feedwise and layouts[spec.name] == BATCH and isinstance(first, int) and first != 1:
            raise OnnxcompError(
                f"{src}: input '{spec.name}' has a fixed batch of {first} but other inputs give one feed per "
                f"sample; give '{spec.name}' as one feed per sample too (shape [samples, "
                f"{', '.join('?' if d is None else str(d) for d in spec.dims)}])")
    return layouts


def _dims_fit(want, got) -> bool:
    return all(not isinstance(w, int) or w == g for w, g in zip(want, got))


def _one_feed(spec: InputSpec, array: np.ndarray) -> bool:
    return spec.dims is not None and array.ndim == len(spec.dims) and _dims_fit(spec.dims, array.shape)


def _check_dims(src, spec: InputSpec, feed_shape, shape, *, first_axis: bool) -> None:
    for axis, (got, want) in enumerate(zip(feed_shape, spec.dims if first_axis else spec.dims[1:])):
        if isinstance(want, int) and got != want:
            where = axis if first_axis else axis + 1
            raise OnnxcompError(
                f"{src}: input '{spec.name}' has shape {list(shape)}, the model expects "
                f"{_dims_text(spec.dims)} (axis {where}{' of each sample' if first_axis else ''})"
            )


def _dims_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
