"""QuantizeLinear / DequantizeLinear nodes and quantized constants on onnx-ir graphs (the graph side
of :mod:`onnxcomp.qparams`), shared by the static QDQ rewrite and its accuracy tools."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import Names, add_initializer
from onnxcomp.qparams import QParams, weight_params

__all__ = ["quantize_linear", "dequantize_linear", "dequantized_constant", "dequantize_node", "int8_weight_rescaled",
           "int8_rescale"]


def quantize_linear(x: ir.Value, scale: ir.Value, zero: ir.Value, names: Names, base: str) -> ir.Node:
    """QuantizeLinear(x, scale, zero) -> ``base``_quantized (per tensor)."""
    out = ir.Value(name=names(f"{base}_quantized"), type=zero.type, shape=x.shape)
    return ir.node("QuantizeLinear", [x, scale, zero], outputs=[out], name=names(f"{base}_QuantizeLinear"))


def dequantize_linear(q: ir.Value, scale: ir.Value, zero: ir.Value | None, names: Names, base: str,
                      axis: int | None = None) -> ir.Node:
    """DequantizeLinear(q, scale[, zero]) -> float ``base``_dequantized (per ``axis`` if given)."""
    out = ir.Value(name=names(f"{base}_dequantized"), type=ir.TensorType(ir.DataType.FLOAT), shape=q.shape)
    inputs = [q, scale] if zero is None else [q, scale, zero]
    attributes = {} if axis is None else {"axis": axis}
    return ir.node("DequantizeLinear", inputs, attributes, outputs=[out], name=names(f"{base}_DequantizeLinear"))


def dequantized_constant(graph: ir.Graph, names: Names, base: str, q: np.ndarray, params: QParams,
                         before: ir.Node, zero_point: bool = True) -> ir.Value:
    """Store ``q`` (already quantized) with ``params`` and return the value of its DequantizeLinear,
    inserted before ``before``."""
    q_value = add_initializer(graph, names, f"{base}_quantized", q)
    scale = add_initializer(graph, names, f"{base}_scale", params.scale)
    zero = add_initializer(graph, names, f"{base}_zero_point", params.zero_point) if zero_point else None
    node = dequantize_linear(q_value, scale, zero, names, base, params.axis)
    graph.insert_before(before, node)
    return node.outputs[0]


def dequantize_node(dq: ir.Node) -> np.ndarray:
    """What a DequantizeLinear of constants computes, in float64 (its axis respected)."""
    q = dq.inputs[0].const_value.numpy()
    scale = dq.inputs[1].const_value.numpy()
    zero = dq.inputs[2].const_value.numpy() if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros((), np.int32)
    axis = dq.attributes.get_int("axis", 1) if np.ndim(scale) == 1 and q.ndim > 1 else None
    params = QParams(scale, zero, axis % q.ndim if axis is not None else None)
    return params.dequantize(q)


def int8_weight_rescaled(graph: ir.Graph, names: Names, weight: ir.Value, axis: int | None, method: str = "minmax",
                         *, before: ir.Node) -> ir.Value:
    """``weight`` (a constant float tensor) stored int8 — symmetric, full 8-bit, one scale per
    slice along ``axis`` (None: per tensor) — and rescaled in float by ``Mul(Cast(W_int8), scale)``,
    inserted before ``before``; returns the rescaled float value for the float layer to read.

    Not a DequantizeLinear: onnxruntime keeps those for its QDQ fusions and runs them at every
    inference (and a float Conv whose weight is computed at run time loses its NCHWc kernel),
    while it constant-folds Cast and Mul when the session starts — the file holds int8, the
    session runs the float layer at float speed. (``cleanup`` never folds this Cast back.)
    """
    q, scale_array = int8_rescale(weight.const_value.numpy(), axis, method)
    stored = add_initializer(graph, names, f"{weight.name}_int8", q)
    scale = add_initializer(graph, names, f"{weight.name}_scale", scale_array)
    cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT}, name=names(f"{weight.name}_Cast"))
    cast.outputs[0].name = names(f"{weight.name}_int8_float")
    mul = ir.node("Mul", [cast.outputs[0], scale], name=names(f"{weight.name}_rescale"))
    mul.outputs[0].name = names(f"{weight.name}_weight_only")
    mul.outputs[0].type, mul.outputs[0].shape = weight.type, weight.shape
    graph.insert_before(before, [cast, mul])
    return mul.outputs[0]


def int8_rescale(array: np.ndarray, axis: int | None, method: str = "minmax") -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scales shaped to broadcast against ``array``) of the symmetric, full
    8-bit weight-only form: ``q * scale`` is what onnxruntime folds the stored weight to at load."""
    params, q = weight_params(array, axis, method=method, reduce_range=False)
    shape = [1] * array.ndim
    if axis is not None:
        shape[axis] = array.shape[axis]
    return q, params.scale.reshape(shape).astype(np.float32)
