"""The rewrite step of static QDQ quantization: :func:`apply_static` turns a
:class:`~onnxcomp.passes.quantize.plan.StaticPlan` and its ranges into QuantizeLinear /
DequantizeLinear nodes, int8 weights and int32 biases (see :mod:`onnxcomp.passes.quantize.plan`
for which nodes and why).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxcomp.calibrate import tensor_values
from onnxcomp.graph import Layer, Names, add_initializer, insert_at_producer
from onnxcomp.passes.quantize.plan import StaticPlan, data_inputs
from onnxcomp.passes.quantize.qdq import (
    dequantize_linear,
    dequantized_constant,
    int8_rescale,
    int8_weight_rescaled,
    quantize_linear,
)
from onnxcomp.blockquant import gptq_round
from onnxcomp.qparams import QParams, activation_params, bias_params, weight_params, weight_reduce_range

if TYPE_CHECKING:
    from onnxcomp.passes.quantize.static import QuantizeStaticConfig

__all__ = ["apply_static", "float_guard", "weight_only_values"]


def apply_static(model: ir.Model, plan: StaticPlan, ranges: dict[str, tuple[float, float]],
                 options: QuantizeStaticConfig, hessians: Mapping[str, np.ndarray] | None = None,
                 rounded: dict | None = None) -> dict[str, QParams]:
    """Rewrite ``model`` as planned; return the activation parameters of every quantized tensor.

    ``hessians``: input tensor name -> XᵀX / n; the int8 weights of a MatMul reading such a tensor
    are rounded by GPTQ (:func:`onnxcomp.blockquant.gptq_round`) instead of to nearest (same scales).
    ``rounded``: a dict kept across rewrites of copies of one model with the same options and
    hessians (a search): int8 weights already rounded for the same weight tensor, axis and input
    are reused instead of rounded again (same values).
    """
    hessians = hessians or {}
    graph = model.graph
    for act in plan.folded:
        _fold_activation(graph, act)
    names = Names(graph)
    params = {t: activation_params(*ranges[plan.root(t)], options.activation_type) for t in plan.tensors}
    stored: dict[str, tuple[ir.Value, ir.Value]] = {}  # root -> its scale and zero point initializers

    def initializers_of(tensor: str) -> tuple[ir.Value, ir.Value]:
        root = plan.root(tensor)
        if root not in stored:
            p = params[root]
            stored[root] = (add_initializer(graph, names, f"{root}_scale", p.scale),
                            add_initializer(graph, names, f"{root}_zero_point", p.zero_point))
        return stored[root]

    weights: dict[tuple[int, int | None], tuple[ir.Node, QParams]] = {}  # one int8 copy per shared weight
    for node, role in plan.roles.items():
        if role == "compute" and node.inputs[1].const_value is not None:
            _quantize_weights(graph, names, node, params[node.inputs[0].name], options,
                              hessians.get(node.inputs[0].name), weights, rounded)
    values = {**tensor_values(model), **graph.initializers}
    for tensor in plan.tensors:
        value = values[tensor]
        if tensor in plan.constants:
            _dequantize_constant(graph, names, value, params[tensor], plan)
        else:
            _insert_qdq(graph, names, value, *initializers_of(tensor), plan)
    rescaled: dict[int, ir.Value] = {}
    for node in plan.weight_only:  # after the Q/DQ: a float Conv's guard (_float_guard) needs its constant weight
        _quantize_weight_only(graph, names, node, options, rescaled)
    ir_common.RemoveUnusedNodesPass()(model)
    ir_common.TopologicalSortPass()(model)
    return params


def _fold_activation(graph: ir.Graph, act: ir.Node) -> None:
    """Remove ``act``; its producer's output takes the activation's output name."""
    x, y = act.inputs[0], act.outputs[0]
    name = y.name
    x.type, x.shape = y.type or x.type, y.shape or x.shape  # an elementwise op: same type and shape
    y.replace_all_uses_with(x, replace_graph_outputs=True)
    graph.remove(act, safe=True)
    x.name = name


def _weight_axis(node: ir.Node, weight: np.ndarray, per_channel: bool) -> int | None:
    """The axis of the stored weight holding output channels (None: per tensor)."""
    if not per_channel:
        return None
    layer = Layer.of(node)
    if isinstance(layer, str):
        return 1 if node.op_type == "MatMul" and weight.ndim == 2 else None  # MatMul [K, N]: per output column
    return layer.storage_out_axis


def _quantize_weights(graph: ir.Graph, names: Names, node: ir.Node, input_params: QParams, options,
                      hessian: np.ndarray | None = None,
                      done: dict[tuple[int, int | None], tuple[ir.Node, QParams]] | None = None,
                      rounded: dict | None = None) -> None:
    """int8 weight and int32 bias of a compute node, each behind a DequantizeLinear (a MatMul
    weight [K, N] with its input's ``hessian`` [K, K]: GPTQ-rounded with the same scales). A
    weight already quantized for another node along the same axis (``done``) is not stored again:
    this node gets its own DequantizeLinear of the same initializers (GPTQ rounds for the first
    reader's input)."""
    weight = node.inputs[1]
    array = weight.const_value.numpy()
    axis = _weight_axis(node, array, options.per_channel)
    done = {} if done is None else done
    if (id(weight), axis) in done:
        first, wp = done[(id(weight), axis)]
        dq = dequantize_linear(first.inputs[0], first.inputs[1], first.inputs[2], names, weight.name, wp.axis)
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
    else:
        key = (id(weight.const_value), axis, node.inputs[0].name if hessian is not None else None)
        cached = (rounded or {}).get(key)
        if cached is not None and cached[0] is weight.const_value:  # the tensor itself, not a reused id
            wp, wq = cached[1:]
        else:
            wp, wq = weight_params(array, axis, method=options.weight_method, reduce_range=options.reduce_range,
                                   target=options.target)
            if hessian is not None and node.op_type == "MatMul" and array.ndim == 2 and axis == 1:
                qmax = 63 if weight_reduce_range(options.reduce_range, options.target) else 127
                wq = gptq_round(array.T, hessian, wp.scale, qmax).T
            if rounded is not None:
                rounded[key] = (weight.const_value, wp, wq)
        dequantized = dequantized_constant(graph, names, weight.name, wq, wp, node)
        done[(id(weight), axis)] = (dequantized.producer(), wp)
        node.replace_input_with(1, dequantized)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        bp, bq = bias_params(bias.const_value.numpy(), input_params.scale, wp)
        node.replace_input_with(2, dequantized_constant(graph, names, bias.name, bq, bp, node, zero_point=False))


def _quantize_weight_only(graph: ir.Graph, names: Names, node: ir.Node, options,
                          done: dict[int, ir.Value]) -> None:
    """The weight of a float compute node stored int8 (:func:`~.qdq.int8_weight_rescaled`); full
    8-bit: no int8 kernel reads it, so u8s8 saturation (reduce_range) does not apply."""
    weight = node.inputs[1]
    if id(weight) not in done:
        array = weight.const_value.numpy()
        done[id(weight)] = int8_weight_rescaled(graph, names, weight, _weight_axis(node, array, options.per_channel),
                                                options.weight_method, before=node)
    node.replace_input_with(1, done[id(weight)])


def weight_only_values(node: ir.Node, options) -> np.ndarray:
    """The float values :func:`_quantize_weight_only` gives ``node``'s constant weight (its int8
    weight times the per-channel scales, as onnxruntime folds them at load)."""
    array = node.inputs[1].const_value.numpy()
    q, scale = int8_rescale(array, _weight_axis(node, array, options.per_channel), options.weight_method)
    return (q.astype(np.float32) * scale).astype(array.dtype)


def _dequantize_constant(graph: ir.Graph, names: Names, value: ir.Value, params: QParams, plan: StaticPlan) -> None:
    """A constant read by quantized nodes: stored quantized, one DequantizeLinear per use."""
    q = params.quantize(value.const_value.numpy())
    for consumer, index in list(value.uses()):
        if consumer in plan.roles and index in data_inputs(consumer):
            consumer.replace_input_with(index, dequantized_constant(graph, names, value.name, q, params, consumer))


def _insert_qdq(graph: ir.Graph, names: Names, value: ir.Value, scale: ir.Value, zero: ir.Value,
                plan: StaticPlan) -> None:
    """One QuantizeLinear after ``value``; a DequantizeLinear for each use that needs one.

    Quantized consumers always read through Q/DQ. When ``value`` comes from a quantized node,
    float consumers and the graph output do too (the producer must feed only its Q to fuse).
    """
    producer = value.producer()
    from_quantized = producer in plan.roles
    q_node = None

    def dequantized(consumer: ir.Node | None = None) -> ir.Value:
        nonlocal q_node
        if q_node is None:
            q_node = quantize_linear(value, scale, zero, names, value.name)
            insert_at_producer(graph, value, q_node)
        s, z, axis = scale, zero, None
        guard = float_guard(consumer) if consumer is not None and consumer not in plan.roles else None
        if guard is not None:
            axis, channels = guard
            s = add_initializer(graph, names, f"{scale.name}_per_axis", np.tile(scale.const_value.numpy(), channels))
            z = add_initializer(graph, names, f"{zero.name}_per_axis", np.tile(zero.const_value.numpy(), channels))
        dq = dequantize_linear(q_node.outputs[0], s, z, names, value.name, axis)
        graph.insert_after(q_node, dq)
        return dq.outputs[0]

    for consumer, index in list(value.uses()):
        if (consumer in plan.roles and index in data_inputs(consumer)) or from_quantized:
            consumer.replace_input_with(index, dequantized(consumer if index == 0 else None))
    if from_quantized and value.is_graph_output():
        name = value.name
        out = dequantized()
        value.name = names(f"{name}_float")
        graph.outputs[list(graph.outputs).index(value)] = out
        out.name = name


def float_guard(node: ir.Node) -> tuple[int, int] | None:
    """(axis, channels) for a per-axis DequantizeLinear in front of a float Conv/ConvTranspose/Gemm.

    ORT quantizes such a node itself (WeightBiasQuantization: per-tensor weights) when its input
    comes from a per-tensor DequantizeLinear and its output reaches a QuantizeLinear; the same
    scale repeated along the channel axis reads the same values and keeps the node float.
    """
    if node.op_type == "ConvTranspose":
        weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
        return (1, weight.shape[0]) if weight is not None and len(weight.shape) >= 2 else None
    layer = Layer.of(node) if node.op_type in ("Conv", "Gemm") else None
    if not isinstance(layer, Layer):
        return None
    return (0 if node.attributes.get_int("transA", 0) else 1), layer.in_features
