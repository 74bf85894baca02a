"""Bias correction of ``quantize_static`` (``bias_correction: true``), on the quantized graph.

After the QDQ rewrite, one streaming pass of the calibration data through the quantized graph
gives, for each Conv/MatMul/Gemm, the per-channel mean of the dequantized input x̂ it really
sees. The expected output error of its weight and bias rounding, (Ŵ − W)·E[x̂] + (b̂ − b), is
subtracted from its bias (Nagel et al. 2019, bias correction, with an empirical E[x̂]). All
layers are corrected from one pass: each one's term is its own. Input clipping is not
corrected: in transformers the clipped values sit on a few tokens (massive activations), and a
mean shift spread over every token hurts (see docs/NOTES.md).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcomp.calibrate import ChannelMean, collect
from onnxcomp.data import Dataset
from onnxcomp.graph import Layer, Names, add_initializer, constant_array, label
from onnxcomp.passes.quantize.qdq import dequantize_node, dequantized_constant
from onnxcomp.qparams import QParams, bias_qparams

if TYPE_CHECKING:
    from onnxcomp.passes.quantize.plan import StaticPlan

__all__ = ["float_layers", "bias_correct"]


def float_layers(plan: StaticPlan) -> list[Layer]:
    """The plan's Conv/MatMul/Gemm as layers (float weights and biases), read before the rewrite."""
    layers = []
    for node, role in plan.roles.items():
        layer = Layer.of(node) if role == "compute" else None
        if isinstance(layer, Layer) and layer.transpose is None:
            layers.append(_FloatLayer(layer, layer.weight(), layer.bias()))
    return layers


@dataclasses.dataclass
class _FloatLayer:
    """A layer and its float weight (logical [out, in, ...]) and bias, kept across the rewrite."""

    layer: Layer
    weight: np.ndarray
    bias: np.ndarray | None

    @property
    def node(self) -> ir.Node:
        return self.layer.node


def bias_correct(model: ir.Model, layers: list[_FloatLayer], data: Dataset, *,
                 batch_size: int = 32) -> tuple[list[str], list[tuple[str, str]], dict[str, float]]:
    """Correct the int32 biases of the quantized ``layers`` in place (see the module docstring).

    Returns (touched, skipped with why, per layer the largest shift relative to the largest
    expected float output |W·E[x̂] + b|).
    """
    todo, skipped = [], []
    for item in layers:
        why = _correctable(item.layer)
        if why:
            skipped.append((label(item.node), why))
        else:
            todo.append(item)
    means = {item.node.inputs[0].name: [ChannelMean(1 if item.node.op_type == "Conv" else -1)] for item in todo}
    collect(model, data, means, batch_size=batch_size)
    touched, sizes = [], {}
    for item in todo:
        layer, node = item.layer, item.node
        m_hat = means[node.inputs[0].name][0].mean
        w_hat, b_hat, params = _quantized_weight_bias(layer)
        if layer.bias_add is not None:
            b_hat = item.bias
        target = _expected(layer, item.weight, m_hat) + (0.0 if item.bias is None else item.bias)
        current = _expected(layer, w_hat, m_hat) + (0.0 if b_hat is None else b_hat)
        shift = current - target
        new_bias = (0.0 if b_hat is None else b_hat) - shift
        if layer.bias_add is not None:
            layer.set_bias(np.asarray(new_bias, np.float32))
        else:
            _set_quantized_bias(model.graph, node, new_bias, params)
        ref = max(float(np.abs(target).max()), 1e-12)
        sizes[node.name] = float(np.abs(shift).max()) / ref
        touched.append(f"{label(node)}: bias corrected (max shift {np.abs(shift).max():.3g})")
    return touched, skipped, sizes


def _correctable(layer: Layer) -> str | None:
    node = layer.node
    if node.op_type == "MatMul":
        add = layer.bias_add
        if add is None:
            return "MatMul without a bias Add after it: nowhere to put the correction (QLinearMatMul has no bias)"
        if node.outputs[0].consumers() != (add,) or constant_array(layer._bias_value()) is None:
            return "its bias Add is quantized too (QLinearAdd): a uint8 bias cannot carry a fine correction"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    dq = node.inputs[0].producer() if node.inputs[0] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return "its input is not dequantized"
    wdq = node.inputs[1].producer()
    if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.inputs[0].const_value is None:
        return "its weight is not a dequantized constant"
    return None


def _quantized_weight_bias(layer: Layer) -> tuple[np.ndarray, np.ndarray | None, QParams]:
    """The dequantized weight (logical layout) and bias of a quantized compute node, and the bias
    parameters (scale = input scale × weight scale) to store a new bias with."""
    node = layer.node
    w_dq = node.inputs[1].producer()
    w_hat = dequantize_node(w_dq)
    w_hat = w_hat.T if layer.weight_transposed else w_hat
    x_scale = node.inputs[0].producer().inputs[1].const_value.numpy().astype(np.float64)
    params = bias_qparams(x_scale, w_dq.inputs[1].const_value.numpy())
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    b_hat = dequantize_node(bias.producer()) if bias is not None and bias.producer() is not None else None
    return w_hat, b_hat, params


def _expected(layer: Layer, weight: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """E[layer output] per output channel for an input with per-channel mean ``mean`` (no bias),
    ``weight`` in the logical layout ([out, in] / [out, in/group, *kernel]).

    Conv: each output channel sums its filter taps times the input channel means (exact away
    from zero-padded borders)."""
    w = np.asarray(weight, np.float64)
    if layer.node.op_type == "Conv":
        group = layer.group
        taps = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # [Cout, Cin/group]
        per_group = w.shape[0] // group
        means = mean.reshape(group, -1)  # [group, Cin/group]
        return np.einsum("gok,gk->go", taps.reshape(group, per_group, -1), means).reshape(-1)
    return w @ mean


def _set_quantized_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray, params: QParams) -> None:
    """Store ``bias`` as the node's int32 bias (a new initializer; a new DequantizeLinear when it had none)."""
    names = Names(graph)
    q = params.quantize(np.asarray(bias, np.float64).reshape(-1))
    base = node.name or node.outputs[0].name
    current = node.inputs[2] if len(node.inputs) > 2 else None
    if current is not None and current.producer() is not None:
        dq = current.producer()
        old = dq.inputs[0]
        dq.replace_input_with(0, add_initializer(graph, names, f"{base}_bias_corrected_quantized", q))
        if old is not None and not old.uses() and not old.is_graph_output() and graph.initializers.get(old.name) is old:
            graph.initializers.pop(old.name)  # the uncorrected int32 bias (left, onnxruntime warned on load)
        return
    out = dequantized_constant(graph, names, f"{base}_bias", q, params, node, zero_point=False)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, out)
