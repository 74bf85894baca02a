"""Per-channel rescaling of layers with constant parameters (used by ``smooth_quant`` and ``equalize``).

A layer here is something whose output channel j can be multiplied by a factor f_j by
editing its constants alone — :class:`LinearLayer` (a :class:`onnxcomp.graph.Layer`:
Conv/Gemm/MatMul with its bias, Gemm C or a bias Add),
:class:`NormLayer` (γ and β of a layer normalisation), :class:`ConstMul` (Mul by a
constant), :class:`AttentionValue` (a MultiHeadAttention: its output is a per-head weighted
sum of V's rows, so output channel j scales with V's projection column j and bias) — and, for linear layers, whose *input* channel i can be absorbed the same way
(the weights reading it multiplied by f_i). Edits accumulate in float64 in
:class:`WeightEdits` and are written back once as new initializers, so repeated rescaling
(cross-layer equalization sweeps) neither loses precision nor leaves a trail of tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import (
    STANDARD_DOMAINS,
    Layer,
    Names,
    add_initializer,
    constant_array,
    is_standard,
)

__all__ = ["LinearLayer", "NormLayer", "ConstMul", "AttentionValue", "WeightEdits", "STANDARD", "NORMS",
           "HOMOGENEOUS"]

STANDARD = STANDARD_DOMAINS
HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "Identity"}  # f(x/s) = f(x)/s for s > 0, in any layout
NORMS = {  # op type -> (index of γ, index of β or None); both scale along the last axis
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    """A :class:`onnxcomp.graph.Layer` (Conv / Gemm / MatMul with a constant weight, its bias
    wherever kept) whose output and input channels get rescaled through :class:`WeightEdits`."""

    layer: Layer

    @staticmethod
    def of(node: ir.Node) -> LinearLayer | str:
        """``node`` as a rescalable layer, or why it is not one."""
        layer = Layer.of(node)
        if isinstance(layer, str):
            return layer
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and layer.bias() is None:
            return "C is not one bias per output channel"
        return LinearLayer(layer)

    @staticmethod
    def behind(value: ir.Value) -> LinearLayer | None:
        """The MatMul/Gemm whose output (bias included) is ``value``."""
        node = value.producer()
        if node is not None and node.op_type == "Add" and is_standard(node):
            consts = [i for i, v in enumerate(node.inputs) if constant_array(v) is not None]
            inner = node.inputs[1 - consts[0]] if len(consts) == 1 else None
            node = inner.producer() if inner is not None else None
        if node is None or node.op_type not in ("MatMul", "Gemm") or not is_standard(node):
            return None
        layer = LinearLayer.of(node)
        return layer if not isinstance(layer, str) and layer.output is value else None

    @property
    def node(self) -> ir.Node:
        return self.layer.node

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def label(self) -> str:
        return self.layer.label

    @property
    def output(self) -> ir.Value:
        return self.layer.output

    @property
    def channel_axis(self) -> int:
        """Channel axis of the activations this layer reads and writes (NCHW for Conv)."""
        return 1 if self.node.op_type == "Conv" else -1

    def matrix(self, edits: WeightEdits) -> np.ndarray:
        """MatMul/Gemm weight as [in, out]."""
        return edits.weight(self.layer).T

    def out_ranges(self, edits: WeightEdits) -> np.ndarray:
        """max |W| per output channel."""
        return _absmax_along(edits.weight(self.layer), 0)

    def in_ranges(self, edits: WeightEdits) -> np.ndarray:
        """max |W| over the weights reading each input channel."""
        w = edits.weight(self.layer)
        if self.node.op_type != "Conv":
            return _absmax_along(w, 1)
        index = self.layer.input_channel_index()
        per_slice = np.abs(w).reshape(*index.shape, -1).max(axis=-1)
        ranges = np.zeros(index.max() + 1)
        np.maximum.at(ranges, index.ravel(), per_slice.ravel())
        return ranges

    def scale_out(self, edits: WeightEdits, factor: np.ndarray) -> None:
        """Multiply output channel i (weight, bias) by factor[i]."""
        w = edits.weight(self.layer)
        edits.set_weight(self.layer, w * _along(factor, w.ndim, 0))
        bias = edits.bias(self.layer)
        if bias is not None:
            edits.set_bias(self.layer, bias * factor)

    def scale_in(self, edits: WeightEdits, factor: np.ndarray) -> None:
        """Multiply the weights reading input channel i by factor[i]."""
        w = edits.weight(self.layer)
        if self.node.op_type == "Conv":
            index = self.layer.input_channel_index()
            edits.set_weight(self.layer, w * factor[index].reshape(*index.shape, *[1] * (w.ndim - 2)))
        else:
            edits.set_weight(self.layer, w * _along(factor, w.ndim, 1))


@dataclasses.dataclass(frozen=True)
class NormLayer:
    """A layer normalisation: output channel j scales with γ_j and β_j."""

    node: ir.Node

    @staticmethod
    def of(node: ir.Node, value: ir.Value) -> NormLayer | str:
        if value is not node.outputs[0]:
            return f"X '{value.name}' is not the normalised output of '{node.name}'"
        if any(constant_array(node.inputs[i]) is None for i in _present(node)):
            return f"{node.op_type} '{node.name}' has a non-constant scale or bias"
        return NormLayer(node)

    def scale_out(self, edits: WeightEdits, factor: np.ndarray) -> None:
        for index in _present(self.node):
            edits.multiply_last(self.node, index, factor)

    def clone(self, graph: ir.Graph, tag: dict[str, str]) -> NormLayer:
        """A copy of this norm computing the same normalised output, inserted right after it.

        A SkipLayerNormalization is copied as a LayerNormalization (same γ, β, epsilon) of its
        ``input + skip + bias`` sum (its optional output 3, added when absent; needs ONNX opset
        >= 17), not as a second SkipLayerNormalization: onnxruntime's CPU LayerNormalization is
        vectorised, its SkipLayerNormalization is not, so the copy costs a fraction of the norm.
        Other norms are copied whole (only the normalised output).
        """
        out, names = self.node.outputs[0], Names(graph)
        name = names(f"{self.node.name}_smooth")
        value = ir.Value(name=names(f"{out.name}_smooth"), type=out.type, shape=out.shape)
        if self.node.op_type == "SkipLayerNormalization" and graph.opset_imports.get("", 0) >= 17:
            total = _sum_output(self.node, names)
            beta = self.node.inputs[3] if len(self.node.inputs) > 3 else None
            epsilon = self.node.attributes.get_float("epsilon", 1e-12)
            node = ir.Node("", "LayerNormalization", [total, self.node.inputs[2], *([beta] if beta is not None else [])],
                           attributes=[ir.AttrFloat32("epsilon", epsilon), ir.AttrInt64("axis", -1)], name=name,
                           outputs=[value], metadata_props=dict(tag))
        else:
            node = ir.Node(self.node.domain, self.node.op_type, list(self.node.inputs),
                           attributes=list(self.node.attributes.values()), name=name, outputs=[value],
                           metadata_props=dict(tag))
        graph.insert_after(self.node, node)
        return NormLayer(node)


def _sum_output(node: ir.Node, names: Names) -> ir.Value:
    """A SkipLayerNormalization's output 3 (input + skip + bias), added (named) when absent; the
    optional outputs 1 and 2 it needs in front stay unnamed (not computed)."""
    if len(node.outputs) < 4:
        count = len(node.outputs)
        node.resize_outputs(4)
        for value in node.outputs[count:3]:
            value.name = ""
    total = node.outputs[3]
    if not total.name:
        out = node.outputs[0]
        total.name = names(f"{out.name}_sum")
        total.type, total.shape = out.type, out.shape
    return total


@dataclasses.dataclass(frozen=True)
class ConstMul:
    """Mul(A, c) with one constant input c: output channel j scales with c (broadcast on the last axis)."""

    node: ir.Node

    @staticmethod
    def of(node: ir.Node) -> ConstMul | None:
        return ConstMul(node) if sum(constant_array(v) is not None for v in node.inputs) == 1 else None

    def scale_out(self, edits: WeightEdits, factor: np.ndarray) -> None:
        edits.multiply_last(self.node, _const_index(self.node), factor)


@dataclasses.dataclass(frozen=True)
class AttentionValue:
    """A com.microsoft MultiHeadAttention with separate Q, K, V inputs: its output channel j is
    head h's weighted sum of V's channel j (weights = softmax(QKᵀ), independent of V), so it
    scales with the V projection's output column j and the V part of the packed bias (input 3)."""

    node: ir.Node
    value: LinearLayer

    @staticmethod
    def of(node: ir.Node, output: ir.Value) -> AttentionValue | str:
        """``node`` as a rescalable attention, or why it is not one."""
        where = f"{node.op_type} '{node.name}'"
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        if output is not node.outputs[0]:
            return f"X '{output.name}' is not the attention output of {where}"
        query, key, value = inputs[:3]
        if key is None or value is None or value is key or value is query:
            return f"{where} has no separate V input (packed QKV/KV)"
        if inputs[7] is not None or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return f"{where} uses a key/value cache"
        bias = inputs[3]
        if bias is not None and (constant_array(bias) is None or constant_array(bias).ndim != 1):
            return f"{where} has a non-constant bias"
        producer = value.producer()
        layer = LinearLayer.of(producer) if producer is not None and producer.op_type == "MatMul" else None
        if not isinstance(layer, LinearLayer) or layer.output is not value or layer.layer.bias() is not None:
            return f"{where}: V does not come straight from a MatMul with a constant weight"
        if len(value.uses()) != 1 or value.is_graph_output():
            return f"{where}: V '{value.name}' has other uses"
        return AttentionValue(node, layer)

    def scale_out(self, edits: WeightEdits, factor: np.ndarray) -> None:
        self.value.scale_out(edits, factor)
        if len(self.node.inputs) > 3 and self.node.inputs[3] is not None:
            bias = edits.get(self.node, 3)
            edits.multiply_last(self.node, 3, np.concatenate([np.ones(bias.shape[-1] - factor.size), factor]))


class WeightEdits:
    """Pending float64 edits of layer weights / biases (logical layout) and of constant node
    inputs, written back once, in the order first edited, under the names they had."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._arrays: dict[tuple, np.ndarray] = {}
        self._layers: dict[ir.Node, Layer] = {}

    def get(self, node: ir.Node, index: int) -> np.ndarray:
        key = (node, index)
        if key not in self._arrays:
            return np.asarray(constant_array(node.inputs[index]), np.float64)
        return self._arrays[key]

    def set(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        self._arrays[(node, index)] = array

    def multiply_last(self, node: ir.Node, index: int, factor: np.ndarray) -> None:
        """node.inputs[index] × factor along its last axis (a size-1 or scalar axis broadcasts to it)."""
        self.set(node, index, self.get(node, index) * factor)

    def weight(self, layer: Layer) -> np.ndarray:
        """The layer's logical weight with the pending edits."""
        key = (layer.node, "weight")
        return self._arrays[key] if key in self._arrays else np.asarray(layer.weight(), np.float64)

    def set_weight(self, layer: Layer, array: np.ndarray) -> None:
        self._layers[layer.node] = layer
        self._arrays[(layer.node, "weight")] = array

    def bias(self, layer: Layer) -> np.ndarray | None:
        key = (layer.node, "bias")
        if key in self._arrays:
            return self._arrays[key]
        bias = layer.bias()
        return None if bias is None else np.asarray(bias, np.float64)

    def set_bias(self, layer: Layer, array: np.ndarray) -> None:
        self._layers[layer.node] = layer
        self._arrays[(layer.node, "bias")] = array

    def commit(self) -> None:
        """Replace each edited constant by a new initializer of its dtype (the old one goes when
        unused, and then the new one takes its name)."""
        for (node, index), array in self._arrays.items():
            if index == "weight":
                layer = self._layers[node]
                _keeping_name(lambda: layer.weight_value, lambda: layer.set_weight(  # noqa: B023
                    array.astype(constant_array(layer.weight_value).dtype)))
            elif index == "bias":
                layer = self._layers[node]
                _keeping_name(layer.bias_value, lambda: layer.set_bias(array))  # noqa: B023 (called at once)
            else:
                old = node.inputs[index]
                node.replace_input_with(index, None)
                reuse = not old.uses() and not old.is_graph_output() and old.name in self.graph.initializers
                if reuse:
                    self.graph.initializers.pop(old.name)
                new = add_initializer(self.graph, Names(self.graph), old.name,
                                      array.astype(old.const_value.dtype.numpy()))
                node.replace_input_with(index, new)
        self._arrays.clear()


def _keeping_name(current: Callable[[], ir.Value], write: Callable[[], None]) -> None:
    """Run ``write`` (which replaces the value ``current()`` returns by a new initializer); the new
    initializer takes the old name when the old one is gone."""
    old = current()
    name, graph = old.name, old.graph
    write()
    new = current()
    if new is not old and graph is not None and name not in graph.initializers and new.is_initializer():
        new.name = name


def _present(node: ir.Node) -> list[int]:
    """Indices of a norm's γ and β inputs that are present."""
    return [i for i in NORMS[node.op_type] if i is not None and i < len(node.inputs) and node.inputs[i] is not None]


def _const_index(node: ir.Node) -> int:
    return next(i for i, v in enumerate(node.inputs) if constant_array(v) is not None)


def _along(factor: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """``factor`` shaped to broadcast along ``axis`` of an ``ndim``-d array."""
    shape = [1] * ndim
    shape[axis] = -1
    return factor.reshape(shape)


def _absmax_along(w: np.ndarray, axis: int) -> np.ndarray:
    return np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
