"""Bias correction of ``quantize_static`` (``bias_correction: true``), on the quantized graph.

After the QDQ rewrite, one streaming pass of the calibration data through the quantized graph
gives, for each Conv/MatMul/Gemm, the per-channel mean of the dequantized input x̂ it really
sees. The expected output error of its weight and bias rounding, (Ŵ − W)·E[x̂] + (b̂ − b), is
subtracted from its bias (Nagel et al. 2019, bias correction, with an empirical E[x̂]). For a
Conv, E[x̂] is taken per input channel *and kernel tap* over the output positions the tap
really reads (zero padding included), so the expectation is exact on short maps too (a 1-D
Conv over 1-4 frames, where most taps read padding, was "corrected" by the sum of all taps). All
layers are corrected from one pass: each one's term is its own. Input clipping is not
corrected: in transformers the clipped values sit on a few tokens (massive activations), and a
mean shift spread over every token hurts (see docs/NOTES.md).

A channel's correction is kept only where it brought the layer's mean output closer to the
float model's (measured on the calibration data before and after correcting, every layer at
once; the float means are taken before the rewrite, :func:`float_output_means`): when errors
upstream already shift the mean the other way (noise rectified by a Pow/Sqrt after an STFT
Conv), the weight rounding error was offsetting them, and removing it alone made the output
worse (faster-whisper's VAD: cosine 0.994 -> 0.980). Three streaming passes in all.
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

__all__ = ["float_layers", "float_output_means", "bias_correct"]


def float_layers(plan: StaticPlan) -> list[Layer]:
    """The plan's Conv/MatMul/Gemm as layers (float weights and biases), read before the rewrite."""
    layers = []
    for node, role in plan.roles.items():
        layer = Layer.of(node) if role == "compute" else None
        if isinstance(layer, Layer) and layer.transpose is None:
            layers.append(_FloatLayer(layer, layer.weight(), layer.bias()))
    return layers


def float_output_means(model: ir.Model, layers: list[_FloatLayer], data: Dataset, *, batch_size: int = 32) -> None:
    """Each layer's per-channel mean output (after its bias) in the float ``model``, before the
    rewrite: what :func:`bias_correct` aims the quantized layer's mean at."""
    reducers: dict[str, list] = {}
    for item in layers:
        item.output_mean = ChannelMean(1 if item.node.op_type == "Conv" else -1)
        reducers.setdefault(item.layer.output.name, []).append(item.output_mean)
    collect(model, data, reducers, batch_size=batch_size)


@dataclasses.dataclass
class _FloatLayer:
    """A layer and its float weight (logical [out, in, ...]) and bias, kept across the rewrite."""

    layer: Layer
    weight: np.ndarray
    bias: np.ndarray | None
    output_mean: ChannelMean | None = None  # in the float model (float_output_means)

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
    checked = [item for item in todo if item.output_mean is not None and item.output_mean.total is not None]
    reducers: dict[str, list] = {}
    mean_of: dict[int, ChannelMean | ConvTapMean] = {}
    for item in todo:
        node = item.node
        mean_of[id(node)] = ConvTapMean(node, item.weight.shape[2:]) if node.op_type == "Conv" else ChannelMean(-1)
        reducers.setdefault(node.inputs[0].name, []).append(mean_of[id(node)])
    before = _output_means(checked, reducers)
    collect(model, data, reducers, batch_size=batch_size)
    applied = {}
    for item in todo:
        layer, node = item.layer, item.node
        m_hat = mean_of[id(node)].mean
        w_hat, b_hat, params = _quantized_weight_bias(layer)
        if layer.bias_add is not None:
            b_hat = item.bias
        target = _expected(layer, item.weight, m_hat) + (0.0 if item.bias is None else item.bias)
        current = _expected(layer, w_hat, m_hat) + (0.0 if b_hat is None else b_hat)
        applied[id(node)] = (b_hat, current - target, params, target)
        _set_bias(model, layer, b_hat, current - target, params)
    reducers = {}
    after = _output_means(checked, reducers)
    collect(model, data, reducers, batch_size=batch_size)
    kept_of = {}
    for item in checked:  # a channel whose mean moved away from the float model's keeps its old bias
        key = id(item.node)
        float_mean, old, new = item.output_mean.mean, before[key].mean, after[key].mean
        if float_mean.shape == old.shape == new.shape == applied[key][1].shape:
            kept_of[key] = np.abs(new - float_mean) <= np.abs(old - float_mean)
            if not kept_of[key].all():
                b_hat, shift, params, _ = applied[key]
                _set_bias(model, item.layer, b_hat, np.where(kept_of[key], shift, 0.0), params)
    touched, sizes = [], {}
    for item in todo:
        node = item.node
        _, shift, _, target = applied[id(node)]
        kept = kept_of.get(id(node), np.ones(shift.shape, bool))
        shift = np.where(kept, shift, 0.0)
        sizes[node.name] = float(np.abs(shift).max()) / max(float(np.abs(target).max()), 1e-12)
        touched.append(f"{label(node)}: bias corrected (max shift {np.abs(shift).max():.3g}; {int(kept.sum())} of "
                       f"{kept.size} channels, the others' mean output moved away from the float model's)")
    return touched, skipped, sizes


def _output_means(items: list[_FloatLayer], reducers: dict[str, list]) -> dict[int, ChannelMean]:
    """A per-channel mean reducer on each layer's output, added to ``reducers``."""
    means = {}
    for item in items:
        means[id(item.node)] = ChannelMean(1 if item.node.op_type == "Conv" else -1)
        reducers.setdefault(item.layer.output.name, []).append(means[id(item.node)])
    return means


def _set_bias(model: ir.Model, layer: Layer, b_hat: np.ndarray | None, shift: np.ndarray, params: QParams) -> None:
    new_bias = (0.0 if b_hat is None else b_hat) - shift
    if layer.bias_add is not None:
        layer.set_bias(np.asarray(new_bias, np.float32))
    else:
        _set_quantized_bias(model.graph, layer.node, new_bias, params)


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
    """E[layer output] per output channel (no bias), ``weight`` in the logical layout
    ([out, in] / [out, in/group, *kernel]); ``mean``: per input channel (MatMul/Gemm), or per
    input channel and kernel tap [in, taps] (Conv, :class:`ConvTapMean`)."""
    w = np.asarray(weight, np.float64)
    if layer.node.op_type == "Conv":
        group = layer.group
        taps = w.reshape(w.shape[0], w.shape[1], -1)  # [Cout, Cin/group, taps]
        per_group = w.shape[0] // group
        means = mean.reshape(group, w.shape[1], -1)  # [group, Cin/group, taps]
        return np.einsum("goik,gik->go", taps.reshape(group, per_group, w.shape[1], -1), means).reshape(-1)
    return w @ mean


class ConvTapMean:
    """Streaming mean, per input channel and kernel tap of a Conv, of the input value the tap
    multiplies, over samples and output positions (a padded position reads 0): the exact
    E[x̂] of each weight, so Σ w·mean is the Conv's mean output whatever the map size."""

    def __init__(self, node: ir.Node, kernel: tuple[int, ...]):
        self.node = node
        self.kernel = tuple(int(k) for k in kernel)
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        a = np.asarray(array, np.float64)
        if a.ndim < 3 or not len(a):
            return
        spatial = a.shape[2:]
        kernel, strides, dilations, begin, end = _conv_geometry(self.node, self.kernel, spatial)
        padded = np.pad(a.mean(axis=0), [(0, 0)] + list(zip(begin, end)))
        out = [(s + b + e - d * (k - 1) - 1) // st + 1
               for s, b, e, d, k, st in zip(spatial, begin, end, dilations, kernel, strides)]
        if min(out) < 1:
            return
        taps = np.empty((a.shape[1], int(np.prod(kernel))))
        for index, tap in enumerate(np.ndindex(*kernel)):
            window = tuple(slice(d * t, d * t + st * (o - 1) + 1, st)
                           for t, d, st, o in zip(tap, dilations, strides, out))
            taps[:, index] = padded[(slice(None), *window)].reshape(a.shape[1], -1).mean(axis=1)
        self.total = taps * len(a) if self.total is None else self.total + taps * len(a)
        self.count += len(a)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def _conv_geometry(node: ir.Node, kernel: tuple[int, ...], spatial: tuple[int, ...]) -> tuple[list[int], ...]:
    """(kernel, strides, dilations, pads at the start, pads at the end) of a Conv with this
    kernel on an input of spatial shape ``spatial`` (auto_pad resolved as onnxruntime does)."""
    rank = len(spatial)
    kernel = list(kernel)
    strides = list(node.attributes.get_ints("strides", (1,) * rank))
    dilations = list(node.attributes.get_ints("dilations", (1,) * rank))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((-(-s // st) - 1) * st + d * (k - 1) + 1 - s, 0)
                 for s, st, d, k in zip(spatial, strides, dilations, kernel)]
        small = [t // 2 for t in total]
        begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
        return kernel, strides, dilations, begin, [t - b for t, b in zip(total, begin)]
    pads = list(node.attributes.get_ints("pads", (0,) * (2 * rank))) if auto_pad == "NOTSET" else [0] * (2 * rank)
    return kernel, strides, dilations, pads[:rank], pads[rank:]


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
