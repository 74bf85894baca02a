"""Per-channel rescaling of layers with constant parameters (used by ``smooth_quant`` and ``equalize``).

A layer here is something whose output channel j can be multiplied by a factor f_j by
editing its constants alone — :class:`LinearLayer` (Conv/Gemm/MatMul, + a bias Add),
:class:`NormLayer` (γ and β of a layer normalisation), :class:`ConstMul` (Mul by a
constant) — and, for linear layers, whose *input* channel i can be absorbed the same way
(the weights reading it multiplied by f_i). Edits accumulate in float64 in
:class:`WeightEdits` and are written back once as new initializers, so repeated rescaling
(cross-layer equalization sweeps) neither loses precision nor leaves a trail of tensors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcomp.passes.qdq import Names, add_initializer, constant_array

__all__ = ["LinearLayer", "NormLayer", "ConstMul", "WeightEdits", "STANDARD", "NORMS"]

STANDARD = ("", "ai.onnx")
NORMS = {  # op type -> (index of γ, index of β or None); both scale along the last axis
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1, None),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2, None),
}


@dataclasses.dataclass(frozen=True)
class LinearLayer:
    """Conv / Gemm / MatMul with a constant weight, optionally followed by an Add of a constant bias."""

    node: ir.Node
    bias_add: ir.Node | None = None

    @staticmethod
    def of(node: ir.Node) -> LinearLayer | str:
        """``node`` as a rescalable layer, or why it is not one."""
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None:
            return "weight is not a constant"
        if constant_array(node.inputs[0]) is not None:
            return "activation input is a constant too"
        if node.op_type in ("MatMul", "Gemm") and weight.ndim != 2:
            return f"weight of rank {weight.ndim}"
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
            return "bias is not a constant"
        if node.op_type == "Conv" and weight.shape[0] % node.attributes.get_int("group", 1):
            return "Conv output channels not divisible by group"
        return LinearLayer(node)

    @staticmethod
    def behind(value: ir.Value) -> LinearLayer | None:
        """The MatMul/Gemm whose output is ``value``, directly or through an Add of a constant bias."""
        node, bias_add = value.producer(), None
        if node is not None and node.op_type == "Add":
            consts = [i for i, v in enumerate(node.inputs) if constant_array(v) is not None]
            inner = node.inputs[1 - consts[0]] if len(consts) == 1 else None
            if inner is None or len(inner.uses()) != 1 or inner.is_graph_output():
                return None
            bias_add, node = node, inner.producer()
        if node is None or node.op_type not in ("MatMul", "Gemm") or node.domain not in STANDARD:
            return None
        layer = LinearLayer.of(node)
        return None if isinstance(layer, str) else LinearLayer(node, bias_add)

    def with_bias_add(self) -> LinearLayer:
        """This MatMul/Gemm together with the constant-bias Add that alone reads its output, if any."""
        out = self.node.outputs[0]
        uses = out.uses()
        if self.node.op_type == "Conv" or len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add":
            return self
        layer = LinearLayer.behind(uses[0].node.outputs[0])
        return layer if layer is not None and layer.node is self.node else self

    @property
    def name(self) -> str:
        return self.node.name or self.node.op_type

    @property
    def output(self) -> ir.Value:
        return (self.bias_add or self.node).outputs[0]

    @property
    def channel_axis(self) -> int:
        """Channel axis of the activations this layer reads and writes (NCHW for Conv)."""
        return 1 if self.node.op_type == "Conv" else -1

    def matrix(self, edits: WeightEdits) -> np.ndarray:
        """MatMul/Gemm weight as [in, out] (Gemm transB undone)."""
        w = edits.get(self.node, 1)
        return w.T if self._axes() == (1, 0) else w

    def out_ranges(self, edits: WeightEdits) -> np.ndarray:
        """max |W| per output channel."""
        return _absmax_along(edits.get(self.node, 1), self._axes()[1])

    def in_ranges(self, edits: WeightEdits) -> np.ndarray:
        """max |W| over the weights reading each input channel."""
        w = edits.get(self.node, 1)
        if self.node.op_type != "Conv":
            return _absmax_along(w, self._axes()[0])
        index = self._conv_in_index(w)
        per_slice = np.abs(w).reshape(*index.shape, -1).max(axis=-1)
        ranges = np.zeros(index.max() + 1)
        np.maximum.at(ranges, index.ravel(), per_slice.ravel())
        return ranges

    def scale_out(self, edits: WeightEdits, factor: np.ndarray) -> None:
        """Multiply output channel i (weight, bias) by factor[i]."""
        w = edits.get(self.node, 1)
        edits.set(self.node, 1, w * _along(factor, w.ndim, self._axes()[1]))
        if len(self.node.inputs) > 2 and self.node.inputs[2] is not None:
            edits.multiply_last(self.node, 2, factor)  # Conv B [O]; Gemm C broadcasts on its last axis
        if self.bias_add is not None:
            edits.multiply_last(self.bias_add, _const_index(self.bias_add), factor)

    def scale_in(self, edits: WeightEdits, factor: np.ndarray) -> None:
        """Multiply the weights reading input channel i by factor[i]."""
        w = edits.get(self.node, 1)
        if self.node.op_type == "Conv":
            index = self._conv_in_index(w)
            edits.set(self.node, 1, w * factor[index].reshape(*index.shape, *[1] * (w.ndim - 2)))
        else:
            edits.set(self.node, 1, w * _along(factor, w.ndim, self._axes()[0]))

    def _axes(self) -> tuple[int, int]:
        """(input-channel axis, output-channel axis) of the weight."""
        if self.node.op_type == "Conv" or self.node.attributes.get_int("transB", 0):
            return 1, 0
        return 0, 1

    def _conv_in_index(self, w: np.ndarray) -> np.ndarray:
        """[O, C/g]: the input channel weight slice W[o, j] reads (grouped and depthwise exact)."""
        out_channels, per_group = w.shape[0], w.shape[1]
        group_of = np.arange(out_channels) // (out_channels // self.node.attributes.get_int("group", 1))
        return group_of[:, None] * per_group + np.arange(per_group)[None, :]


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
        """A copy of this norm (same inputs, only the normalised output) inserted right after it."""
        out, names = self.node.outputs[0], Names(graph)
        node = ir.Node(self.node.domain, self.node.op_type, list(self.node.inputs),
                       attributes=list(self.node.attributes.values()), name=names(f"{self.node.name}_smooth"),
                       outputs=[ir.Value(name=names(f"{out.name}_smooth"), type=out.type, shape=out.shape)],
                       metadata_props=dict(tag))
        graph.insert_after(self.node, node)
        return NormLayer(node)


@dataclasses.dataclass(frozen=True)
class ConstMul:
    """Mul(A, c) with one constant input c: output channel j scales with c (broadcast on the last axis)."""

    node: ir.Node

    @staticmethod
    def of(node: ir.Node) -> ConstMul | None:
        return ConstMul(node) if sum(constant_array(v) is not None for v in node.inputs) == 1 else None

    def scale_out(self, edits: WeightEdits, factor: np.ndarray) -> None:
        edits.multiply_last(self.node, _const_index(self.node), factor)


class WeightEdits:
    """Pending float64 edits of constant node inputs, written back once as new initializers."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._arrays: dict[tuple[ir.Node, int], np.ndarray] = {}

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

    def commit(self) -> None:
        """Replace each edited input by a new initializer of its dtype (the old one goes when unused)."""
        for (node, index), array in self._arrays.items():
            old = node.inputs[index]
            node.replace_input_with(index, None)
            reuse = not old.uses() and not old.is_graph_output() and old.name in self.graph.initializers
            if reuse:
                self.graph.initializers.pop(old.name)
            new = add_initializer(self.graph, Names(self.graph), old.name, array.astype(old.const_value.dtype.numpy()))
            node.replace_input_with(index, new)
        self._arrays.clear()


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
