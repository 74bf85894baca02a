"""onnxruntime sessions for onnx-ir models: the one place models meet the runtime."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxcomp.errors import OnnxcompError

__all__ = ["session_options", "open_session", "run_batches", "optimized_graph", "IN_MEMORY_LIMIT"]

# Above this many weight bytes a model reaches onnxruntime through a temporary file with external
# data (written tensor by tensor, mapped by onnxruntime) instead of serialized bytes: the bytes,
# the protobuf they come from and onnxruntime's copy would each hold the whole model at once.
IN_MEMORY_LIMIT = 256 * 2**20


def session_options(
    *, threads: int = 0, level: str = "all", optimized_path: str | None = None, prepack: bool = True,
    spinning: bool = True,
) -> ort.SessionOptions:
    """Options every onnxcomp session uses, so latencies are comparable.

    ``prepack=False`` for a session that only proves the model loads: onnxruntime then keeps no
    packed copy of the weights (and leaves mapped external data unread). ``spinning=False``: idle
    intra-op threads sleep instead of spinning (``session.intra_op.allow_spinning`` 0) — for
    throughput work (calibration) on a CPU shared with other processes, where spinning threads
    steal the cores the working ones need.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@contextlib.contextmanager
def open_session(
    model: ir.Model, options: ort.SessionOptions | None = None, what: str = "model", *,
    path: str | os.PathLike | None = None,
) -> Iterator[ort.InferenceSession]:
    """An InferenceSession on the CPU for ``model`` (in memory below IN_MEMORY_LIMIT, else via a temp file).

    ``path``: the file ``model`` was loaded from, unchanged since; a model that would need a
    temporary file (external data, past 2 GB) is then opened from it directly.
    A model onnxruntime refuses raises OnnxcompError naming ``what``.
    """
    from onnxcomp.model import PROTOBUF_LIMIT, has_external_tensors, model_nbytes, release_external

    options = options or session_options()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-") as tmp:
        try:
            if model_nbytes(model) < min(IN_MEMORY_LIMIT, PROTOBUF_LIMIT) and not has_external_tensors(model):
                source: bytes | str = ir.serde.serialize_model(model).SerializeToString()
            elif path is not None:
                source = os.fspath(path)
            else:
                source = os.path.join(tmp, "model.onnx")
                ir.save(model, source, external_data="model.onnx.data")
                release_external(model)  # the save read every mapped weight: unmap them
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            del source  # the serialized bytes: onnxruntime holds its own copy
        except Exception as exc:  # onnxruntime raises Fail/InvalidGraph/RuntimeError...
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise OnnxcompError(f"onnxruntime cannot load the {what}: {first}") from None
        yield session


def run_batches(
    session: ort.InferenceSession, batches, outputs: list[str] | None = None
) -> Iterator[list[np.ndarray]]:
    """Run ``session`` on each feed of ``batches``; yield the requested outputs per batch."""
    for feed in batches:
        try:
            yield session.run(outputs, feed)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise OnnxcompError(f"onnxruntime failed to run the model: {first}") from None


def optimized_graph(model: ir.Model, level: str = "all") -> ir.Model:
    """The graph onnxruntime actually executes on the CPU (after its fusions)."""
    with tempfile.TemporaryDirectory(prefix="onnxcomp-opt-") as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        with open_session(model, session_options(level=level, optimized_path=path)):
            pass
        import onnx

        proto = onnx.load(path, load_external_data=False)
        return ir.serde.deserialize_model(proto)
