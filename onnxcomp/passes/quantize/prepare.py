"""Float rewrites before static quantization (results unchanged), so onnxruntime fuses more:
Gemm alpha/beta folded into its weight and bias, and MatMul + bias Add -> Gemm (the bias becomes
QGemm's int32 bias). Also :func:`value_types`, the element types the planner needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxcomp.calibrate import tensor_values
from onnxcomp.graph import Layer, Names, add_initializer, constant_array, is_standard, label
from onnxcomp.runtime import open_session, session_options

if TYPE_CHECKING:
    from onnxcomp.passes.quantize.static import QuantizeStaticConfig

__all__ = ["prepare_static", "value_types"]


def prepare_static(model: ir.Model, options: QuantizeStaticConfig) -> list[str]:
    """Rewrite ``model`` in place: every Gemm gets alpha = beta = 1 and a 1-D bias; a MatMul with
    a 2-D input and constant weight followed by an Add of a constant bias becomes one Gemm (named
    as the MatMul; neither excluded). Returns what was merged."""
    graph, done = model.graph, []
    types = value_types(model)
    for node in list(graph):
        if not is_standard(node) or node.op_type not in ("MatMul", "Gemm"):
            continue
        layer = Layer.of(node, graph)
        if isinstance(layer, str) or layer.transpose is not None:
            continue
        if node.op_type == "Gemm":
            _normalise_gemm(layer)
        elif options.selects(node) and options.selects(ir.Node("", "Gemm", [], name=node.name)):
            add = layer.bias_add  # merged only where the Gemm it becomes is selected as well
            if add is not None and options.selects(add) and _gemm_bias(layer, types) is not None:
                _matmul_add_to_gemm(graph, layer)
                done.append(f"{label(node)} + {label(add)} -> Gemm")
    return done


def value_types(model: ir.Model) -> dict[str, tuple[ir.DataType | None, int | None]]:
    """Element type and rank of every named value: ONNX shape inference on a copy, then
    onnxruntime's own inference for what ONNX cannot type (outputs of com.microsoft ops)."""
    probe = model.clone()
    ir_common.ShapeInferencePass()(probe)
    values = {**tensor_values(probe), **probe.graph.initializers}
    found = {name: (v.dtype, len(v.shape) if v.shape is not None else None) for name, v in values.items()}
    for node in probe.graph:  # a Reshape to a computed shape (paddle2onnx: Shape -> Slice -> Concat) that
        # inference leaves rankless: its rank is the length of the shape tensor when that is static
        shape = node.inputs[1].shape if node.op_type == "Reshape" and len(node.inputs) > 1 else None
        out = node.outputs[0]
        if shape is not None and len(shape) == 1 and isinstance(shape[0], int) and found.get(out.name, (None, None))[1] is None:
            found[out.name] = (found.get(out.name, (None, None))[0] or node.inputs[0].dtype, shape[0])
    untyped = [v for v in tensor_values(probe).values() if v.dtype is None and not v.is_graph_output()]
    if untyped:
        probe.graph.outputs.extend(untyped)
        with open_session(probe, session_options(level="disable"), what="model (type inference)") as session:
            for out in session.get_outputs():
                if found.get(out.name, (None,))[0] is None:
                    dtype = ir.DataType.FLOAT if out.type == "tensor(float)" else ir.DataType.UNDEFINED
                    found[out.name] = (dtype, len(out.shape) if isinstance(out.shape, list) else None)
    return found


def _gemm_bias(layer: Layer, types) -> ir.Value | None:
    """The constant of a MatMul's bias Add when the pair can become one Gemm (2-D input, same dtype)."""
    if types.get(layer.input.name, (None, None))[1] != 2:
        return None
    bias = layer._bias_value()
    return bias if constant_array(bias).dtype == constant_array(layer.weight_value).dtype else None


def _matmul_add_to_gemm(graph: ir.Graph, layer: Layer) -> None:
    matmul, add = layer.node, layer.bias_add
    out = add.outputs[0]
    bias_1d = layer._bias_value()
    if len(bias_1d.shape) != 1:
        bias_1d = add_initializer(graph, Names(graph), bias_1d.name, constant_array(bias_1d).reshape(-1))
    gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], bias_1d], name=matmul.name)
    gemm.outputs[0].type, gemm.outputs[0].shape = out.type, out.shape
    graph.insert_before(matmul, gemm)
    out.replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
    graph.remove([add, matmul], safe=True)
    gemm.outputs[0].name = out.name


def _normalise_gemm(layer: Layer) -> None:
    """alpha into the weight, beta into the bias, a [1, N] bias to [N] (same results)."""
    gemm = layer.node
    if gemm.attributes.get_float("alpha", 1.0) != 1.0:
        layer.set_weight(layer.weight())
    c = constant_array(gemm.inputs[2]) if len(gemm.inputs) > 2 and gemm.inputs[2] is not None else None
    row = c is not None and c.ndim == 2 and c.shape[0] == 1
    if c is not None and (gemm.attributes.get_float("beta", 1.0) != 1.0 or row):
        bias = layer.bias()
        if bias is not None:
            layer.set_bias(bias)
