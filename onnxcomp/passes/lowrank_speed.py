"""Is a factorized layer faster than the dense one in onnxruntime? Measured once per shape, cached.

:func:`matmul_split_ratio` times ``x·W`` (``W`` [n, m]) against ``(x·B)·A`` (``B`` [n, k], ``A``
[k, m]) for ``rows`` rows of ``x`` in two tiny onnxruntime models, interleaved (dense, split,
dense, split, …), and returns median(split) / median(dense): below 1 means the split is faster.

Each ratio is cached in memory for the process and, when a cache file is given, in that JSON file
(keyed by shape, dtype, onnxruntime version and thread count). A decision read from the file is
the one measured the first time, so once a shape is in the file the same machine makes the same
choice on every run: the file is what makes a speed-checked pass repeatable. Timings are noisy on
a busy machine; a pass that must be byte-for-byte reproducible everywhere turns the check off.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.runtime import open_session, session_options

__all__ = ["matmul_split_ratio", "matmul_key", "DEFAULT_CACHE"]

DEFAULT_CACHE = "~/.cache/onnxcomp/lowrank-speed.json"

_MEMORY: dict[str, float] = {}
_LOADED: set[str] = set()


def matmul_split_ratio(m: int, n: int, k: int, rows: int, *, dtype: str = "float32",
                       cache: str | None = DEFAULT_CACHE, threads: int = 0) -> tuple[float, bool]:
    """(median split time / median dense time, True when the ratio came from a cache)."""
    key = matmul_key(m, n, k, rows, dtype=dtype, threads=threads)
    path = _cache_path(cache)
    if path is not None and str(path) not in _LOADED:
        _MEMORY.update(_read(path))
        _LOADED.add(str(path))
    if key in _MEMORY:
        return _MEMORY[key], True
    ratio = _measure(m, n, k, rows, np.dtype(dtype), threads)
    _MEMORY[key] = ratio
    if path is not None:
        _write(path, key, ratio)
    return _MEMORY[key], False


def matmul_key(m: int, n: int, k: int, rows: int, *, dtype: str = "float32", threads: int = 0) -> str:
    """The cache key of one measurement (shape, dtype, onnxruntime version, threads)."""
    return f"matmul out={m} in={n} k={k} rows={rows} {dtype} ort={ort.__version__} threads={threads}"


def _measure(m: int, n: int, k: int, rows: int, dtype: np.dtype, threads: int) -> float:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, n)).astype(dtype)
    dense = _chain([rng.standard_normal((n, m)).astype(dtype)], rows, dtype)
    split = _chain([rng.standard_normal((n, k)).astype(dtype), rng.standard_normal((k, m)).astype(dtype)], rows, dtype)
    options = session_options(threads=threads)
    with open_session(dense, options, "speed probe") as a, open_session(split, options, "speed probe") as b:
        feed = {"x": x}
        inner = _inner_runs(a, feed)
        for session in (a, b):  # warm-up
            _time(session, feed, inner)
        ta, tb = [], []
        deadline = time.perf_counter() + 0.4
        while len(ta) < 7 or (len(ta) < 41 and time.perf_counter() < deadline):
            ta.append(_time(a, feed, inner))
            tb.append(_time(b, feed, inner))
    return round(statistics.median(tb) / statistics.median(ta), 4)


def _chain(weights: list[np.ndarray], rows: int, dtype: np.dtype) -> ir.Model:
    """x [rows, n] · weights[0] · weights[1] … as an onnx-ir model."""
    elem = ir.DataType.from_numpy(dtype)
    x = ir.Value(name="x", type=ir.TensorType(elem), shape=ir.Shape([rows, weights[0].shape[0]]))
    graph = ir.Graph([x], [], nodes=[], name="probe", opset_imports={"": 17})
    current = x
    for i, w in enumerate(weights):
        init = ir.Value(name=f"w{i}", type=ir.TensorType(elem), shape=ir.Shape(w.shape),
                        const_value=ir.Tensor(w, name=f"w{i}"))
        graph.register_initializer(init)
        node = ir.Node("", "MatMul", [current, init], name=f"mm{i}")
        node.outputs[0].name, node.outputs[0].type = f"h{i}", ir.TensorType(elem)
        graph.append(node)
        current = node.outputs[0]
    graph.outputs.append(current)
    return ir.Model(graph, ir_version=8)


def _inner_runs(session, feed) -> int:
    """Runs per timing sample so that one sample takes ~2 ms (short kernels are timed in bulk)."""
    session.run(None, feed)
    start = time.perf_counter()
    session.run(None, feed)
    once = max(time.perf_counter() - start, 1e-6)
    return int(min(200, max(1, 0.002 / once)))


def _time(session, feed, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        session.run(None, feed)
    return (time.perf_counter() - start) / inner


def _cache_path(cache: str | None) -> Path | None:
    return None if not cache else Path(os.path.expanduser(cache))


def _read(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}


def _write(path: Path, key: str, ratio: float) -> None:
    """Add one entry (re-reading the file first: other processes may have added theirs)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data.setdefault(key, ratio)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lowrank-speed-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(data.items())), f, indent=0)
        os.replace(tmp, path)
        _MEMORY[key] = data[key]  # a value another process wrote first wins everywhere
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
