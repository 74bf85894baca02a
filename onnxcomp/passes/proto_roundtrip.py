"""onnxcomp's one ir → proto → ir round trip, for passes that run a protobuf-based tool
(``fuse_transformer``, ``to_fp16``: onnxruntime.transformers): :func:`run_proto_tool` runs the
tool on a copy, :func:`adopt_graph` moves its result back into the onnx-ir model in place. Models
of 2 GB or more, or with external data, go through a temporary file instead of an in-memory proto.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, TopologicalSortPass

from onnxcomp.model import PROTOBUF_LIMIT, has_external_tensors, model_nbytes

__all__ = ["run_proto_tool", "adopt_graph", "op_counts"]


def run_proto_tool(model: ir.Model, tool: Callable[[Any], tuple[Any, Any]]) -> tuple[ir.Model, Any, list[str]]:
    """Run a protobuf-based ``tool(source) -> (ModelProto, extra)`` on a copy of ``model``.

    ``source`` is a ModelProto, or a file path (external data beside it) when the model is too
    large for one proto or holds external tensors. The tool runs in a scratch working folder
    (onnxruntime's symbolic shape inference drops ``sym_shape_infer_temp.onnx`` into the current
    folder when it gives up) with its warnings captured; returns (result as ir.Model, extra,
    warnings).
    """
    with tempfile.TemporaryDirectory(prefix="onnxcomp-ort-") as tmp, _scratch_cwd(tmp), _captured_warnings() as said:
        if model_nbytes(model) < PROTOBUF_LIMIT and not has_external_tensors(model):
            source: Any = ir.serde.serialize_model(model)
        else:
            source = os.path.join(tmp, "model.onnx")
            ir.save(model, source, external_data="model.onnx.data")
        proto, extra = tool(source)
        result = ir.serde.deserialize_model(proto)  # in memory: the tool loaded any external data
    return result, extra, said


def adopt_graph(target: ir.Model, source: ir.Model) -> None:
    """Make ``target`` (changed in place) hold ``source``'s graph: nodes, values, initializers, opsets."""
    old, new = target.graph, source.graph
    old.remove(list(old), safe=False)
    old.inputs.clear()
    old.outputs.clear()
    old.initializers.clear()
    nodes, inputs, outputs = list(new), list(new.inputs), list(new.outputs)
    initializers = list(new.initializers.values())
    new.remove(nodes, safe=False)
    new.inputs.clear()
    new.outputs.clear()
    new.initializers.clear()
    old.inputs.extend(inputs)
    old.extend(nodes)
    old.outputs.extend(outputs)
    for value in initializers:
        old.register_initializer(value)
    target.opset_imports.update(source.opset_imports)
    for node in old:  # onnxruntime.transformers adds its com.microsoft import only when saving to a file
        target.opset_imports.setdefault(node.domain, 1)
    # one weight form for every pass: tensor Constant nodes become initializers (as at load)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(target)
    TopologicalSortPass()(target)  # the fp16 converter appends its Casts at the end


@contextlib.contextmanager
def _scratch_cwd(path: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Warnings logged meanwhile (onnxruntime.transformers logs under bare module names)."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage().strip().split("\n")[0][:300]
            if text and text not in said:
                said.append(text)

    handler, root = Collect(logging.WARNING), logging.getLogger()
    root.addHandler(handler)
    try:
        yield said
    finally:
        root.removeHandler(handler)


def op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)
