"""Float rewrites before static quantization (results unchanged), so onnxruntime fuses more:
Gemm alpha/beta folded into its weight and bias, and MatMul + bias Add -> Gemm (the bias becomes
QGemm's int32 bias). Also :func:`value_types`, the element types the planner needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxcomp.calibrate import tensor_values
from onnxcomp.passes.qdq import Names, add_initializer, constant_array, is_excluded
from onnxcomp.runtime import open_session, session_options

if TYPE_CHECKING:
    from onnxcomp.passes.quantize import QuantizeStaticConfig

__all__ = ["prepare_static", "value_types"]


def prepare_static(model: ir.Model, options: QuantizeStaticConfig) -> list[str]:
    """Rewrite ``model`` in place: every Gemm gets alpha = beta = 1 and a 1-D bias; a MatMul with
    a 2-D input and constant weight followed by an Add of a constant bias becomes one Gemm (named
    as the MatMul; neither excluded). Returns what was merged."""
    graph, done = model.graph, []
    types = value_types(model)
    names = Names(graph)
    for node in list(graph):
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and not is_excluded(node, options) \
                and "Gemm" not in options.exclude_ops:
            add = _bias_add(node, types, options)
            if add is not None:
                _matmul_add_to_gemm(graph, names, node, add)
                done.append(f"{node.name}: MatMul + {add.name} -> Gemm")
        elif node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
            _normalise_gemm(graph, names, node)
    return done


def value_types(model: ir.Model) -> dict[str, tuple[ir.DataType | None, int | None]]:
    """Element type and rank of every named value: ONNX shape inference on a copy, then
    onnxruntime's own inference for what ONNX cannot type (outputs of com.microsoft ops)."""
    probe = model.clone()
    ir_common.ShapeInferencePass()(probe)
    values = {**tensor_values(probe), **probe.graph.initializers}
    found = {name: (v.dtype, len(v.shape) if v.shape is not None else None) for name, v in values.items()}
    untyped = [v for v in tensor_values(probe).values() if v.dtype is None and not v.is_graph_output()]
    if untyped:
        probe.graph.outputs.extend(untyped)
        with open_session(probe, session_options(level="disable"), what="model (type inference)") as session:
            for out in session.get_outputs():
                if found.get(out.name, (None,))[0] is None:
                    dtype = ir.DataType.FLOAT if out.type == "tensor(float)" else ir.DataType.UNDEFINED
                    found[out.name] = (dtype, len(out.shape) if isinstance(out.shape, list) else None)
    return found


def _bias_add(matmul: ir.Node, types, options) -> ir.Node | None:
    """The Add after ``matmul`` that can become a Gemm bias, or None."""
    a, w, y = matmul.inputs[0], constant_array(matmul.inputs[1]), matmul.outputs[0]
    if w is None or w.ndim != 2 or types.get(a.name, (None, None))[1] != 2:
        return None
    if len(y.uses()) != 1 or y.is_graph_output():
        return None
    add = y.consumers()[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or is_excluded(add, options):
        return None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    bias = constant_array(other)
    if bias is None or bias.size != w.shape[1] or bias.shape[-1] != w.shape[1] or bias.dtype != w.dtype:
        return None
    return add


def _matmul_add_to_gemm(graph: ir.Graph, names: Names, matmul: ir.Node, add: ir.Node) -> None:
    y, out = matmul.outputs[0], add.outputs[0]
    bias_1d = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if len(bias_1d.shape) != 1:
        bias_1d = add_initializer(graph, names, bias_1d.name, constant_array(bias_1d).reshape(-1))
    gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], bias_1d], name=matmul.name)
    gemm.outputs[0].type, gemm.outputs[0].shape = out.type, out.shape
    graph.insert_before(matmul, gemm)
    out.replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
    graph.remove([add, matmul], safe=True)
    gemm.outputs[0].name = out.name


def _normalise_gemm(graph: ir.Graph, names: Names, gemm: ir.Node) -> None:
    """alpha into the weight, beta into the bias, a [1, N] bias to [N] (same results)."""
    alpha, beta = gemm.attributes.get_float("alpha", 1.0), gemm.attributes.get_float("beta", 1.0)
    w = constant_array(gemm.inputs[1])
    if alpha != 1.0 and w is not None:
        gemm.replace_input_with(1, add_initializer(graph, names, gemm.inputs[1].name, (w * alpha).astype(w.dtype)))
        gemm.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
    c = constant_array(gemm.inputs[2]) if len(gemm.inputs) > 2 else None
    row = c is not None and c.ndim == 2 and c.shape[0] == 1
    if c is not None and (beta != 1.0 or row):
        c = (c * beta).astype(c.dtype)
        gemm.replace_input_with(2, add_initializer(graph, names, gemm.inputs[2].name, c.reshape(-1) if row else c))
        gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
