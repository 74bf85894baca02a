"""QuantizeLinear / DequantizeLinear nodes and quantized constants on onnx-ir graphs (the graph side
of :mod:`onnxcomp.qparams`), shared by the static QDQ rewrite and its accuracy tools."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import Names, add_initializer
from onnxcomp.qparams import QParams

__all__ = ["quantize_linear", "dequantize_linear", "dequantized_constant", "dequantize_node"]


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
