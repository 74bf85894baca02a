"""``quantize_dynamic`` (onnxruntime's QOperator form): int8 weights, activations quantized at run
time by DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> Add bias), which onnxruntime
fuses into DynamicQuantizeMatMul for MatMul and Gemm. :func:`quantize_dynamic_model` is the
Python entry point.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxcomp.graph import (
    Layer,
    Names,
    NodeSelection,
    add_initializer,
    is_standard,
    label,
    release_mapped,
)
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register, skip_subgraph_nodes
from onnxcomp.passes.quantize.int8_common import (
    EMBEDDINGS_HELP,
    REDUCE_RANGE_HELP,
    TARGET_HELP,
    check_opset,
    merge_tool_stats,
    note_reduce_range,
    quantize_embeddings,
    record_target,
)
from onnxcomp.passes.quantize.lstm import quantize_lstms
from onnxcomp.passes.quantize.qdq import int8_weight_rescaled
from onnxcomp.qparams import weight_params

__all__ = ["QuantizeDynamic", "QuantizeDynamicConfig", "quantize_dynamic_model"]


class QuantizeDynamicConfig(PassConfig, NodeSelection):
    renamed_options: ClassVar[dict[str, str]] = {"exclude_nodes": "exclude", "exclude_ops": "exclude"}

    per_channel: bool = Field(True, description="one weight scale per output column (else per tensor)")
    weight_method: Literal["minmax", "mse"] = Field(
        "minmax", description="weight clipping per channel: max |w|, or the clip minimising squared error")
    target: Literal["any", "vnni", "arm64"] = Field("any", description=TARGET_HELP)
    reduce_range: bool | Literal["auto"] = Field("auto", description=REDUCE_RANGE_HELP)
    quantize_embeddings: bool = Field(True, description=EMBEDDINGS_HELP)
    weight_only: bool = Field(
        True, description="Convs (no fast dynamic int8 kernel in onnxruntime) compute in float but store their "
                          "weights int8, one scale per output channel (Cast and Mul, which onnxruntime folds when "
                          "the session starts): the file shrinks, the speed is the float model's")
    embedding_block_size: Literal[32, 64, 128] = Field(128, description="values per scale in quantized embeddings")


@register
class QuantizeDynamic(CompressionPass):
    """Dynamic int8 quantization: int8 weights, activation scales computed at run time.

    MatMul and Gemm with a constant weight become DynamicQuantizeLinear -> MatMulInteger ->
    Cast -> Mul (-> Add bias), which onnxruntime fuses into DynamicQuantizeMatMul. Conv computes
    in float (ORT's CPU ConvInteger has no fused kernel and runs slower than the float Conv);
    with ``weight_only`` its weight is stored int8 and rescaled in float, which onnxruntime
    constant-folds at load.
    """

    name = "quantize_dynamic"
    min_opset = 13  # per-channel DequantizeLinear (older models are upgraded first, verified)
    summary = "int8 weights, activations quantized at run time (DynamicQuantizeMatMul for MatMul/Gemm)"
    Config = QuantizeDynamicConfig

    def run(self, model: ir.Model, stats: PassStats) -> None:
        check_opset(model, self.name)
        if self.config.quantize_embeddings:
            merge_tool_stats(stats, quantize_embeddings(model, self.config))
        report = quantize_dynamic_model(model, self.config)
        report += quantize_lstms(model, self.config)
        for what, why in report:
            if why:
                stats.skip(what, why)
            else:
                stats.touch(what)
        convs = sum(1 for what, why in report if why and why.startswith(_CONV_WHY))
        weights_only = sum(1 for what, why in report if why and why.endswith(_WEIGHT_ONLY))
        if convs and len(stats.touched) == weights_only:  # the one line a Conv-only model's summary shows first
            stored = f"; {weights_only} of them store int8 weights" if weights_only else ""
            stats.notes.insert(0, f"no int8 compute: the {convs} Conv layers compute in float (onnxruntime's dynamic "
                                  f"ConvInteger is slower than the float Conv){stored} and no MatMul/Gemm was "
                                  "eligible; for int8 Convs run the 'int8' recipe (static, calibrated QLinearConv)")
        if weights_only:
            stats.metrics["weight_only"] = weights_only
        skip_subgraph_nodes(stats, model.graph, ("MatMul", "Gemm", "Conv", "LSTM"),
                            "left float (quantize_dynamic rewrites the main graph only)")
        note_reduce_range(self.config, stats)
        if stats.touched:
            record_target(model, self.config)


def quantize_dynamic_model(model: ir.Model, config: QuantizeDynamicConfig) -> list[tuple[str, str | None]]:
    """Rewrite every eligible MatMul/Gemm of ``model`` in place; return (node, why skipped or None)."""
    graph = model.graph
    names = Names(graph)
    report = []
    rescaled: dict[int, ir.Value] = {}  # weight -> its int8 rescaled form (a weight shared by Convs: stored once)
    for node in list(graph):
        if not is_standard(node) or node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        layer = None if node.op_type == "Conv" else Layer.of(node, graph)
        why = _dynamic_ineligible(node, layer) or config.why_not(node, layer.params if isinstance(layer, Layer) else None)
        if why is None:
            _dynamic_matmul(graph, names, layer, config)
        elif why == _CONV_WHY and config.weight_only and config.why_not(node) is None:
            stored = _conv_weight_only(graph, names, node, config, rescaled)
            if stored is None:
                why += _WEIGHT_ONLY
                report.append((f"{label(node)}: int8 weights only (rescaled in float, folded by onnxruntime at "
                               "load), float compute", None))
            else:
                why += f"; its weight stays float: {stored}"
        report.append((label(node), why))
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return report


_CONV_WHY = "ORT's CPU ConvInteger has no fused kernel (slower than the float Conv): left in float"
_WEIGHT_ONLY = "; its weight is stored int8 (Cast and Mul by per-channel scales, folded by onnxruntime at load)"


def _conv_weight_only(graph: ir.Graph, names: Names, node: ir.Node, config: QuantizeDynamicConfig,
                      done: dict[int, ir.Value]) -> str | None:
    """Store a float Conv's weight int8 (:func:`~.qdq.int8_weight_rescaled`); return why not, or None."""
    layer = Layer.of(node, graph)
    if isinstance(layer, str):
        return layer
    weight = node.inputs[1]
    if any(user.op_type != "Conv" or index != 1 for user, index in weight.uses()) or weight.is_graph_output():
        return "its weight is also read by another node"
    channels = layer.out_features if config.per_channel else 1
    if layer.params + 4 * channels >= 4 * layer.params:
        return "int8 would not shrink its weight"
    if id(weight) not in done:
        done[id(weight)] = int8_weight_rescaled(graph, names, weight, 0 if config.per_channel else None,
                                                config.weight_method, before=node)
    node.replace_input_with(1, done[id(weight)])
    return None


def _dynamic_ineligible(node: ir.Node, layer: Layer | str | None) -> str | None:
    if node.op_type == "Conv":
        return _CONV_WHY
    if isinstance(layer, str):
        return layer
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and layer.bias() is None:
        return "the bias C is not one value per output column"
    return None


def _dynamic_matmul(graph: ir.Graph, names: Names, layer: Layer, config: QuantizeDynamicConfig) -> None:
    """x @ W (+ bias) -> DynamicQuantizeLinear(x) · MatMulInteger(int8 W) · Cast · Mul(scales) (· Add)."""
    node = layer.node
    base = node.name or node.outputs[0].name
    w = layer.weight().T  # [K, N]
    bias = layer.bias() if node.op_type == "Gemm" else None
    wp, wq = weight_params(w.astype(np.float32), 1 if config.per_channel else None,
                           method=config.weight_method, reduce_range=config.reduce_range, target=config.target)
    del w
    release_mapped(layer.weight_value)
    w_q = add_initializer(graph, names, f"{base}_weight_quantized", wq)
    w_scale = add_initializer(graph, names, f"{base}_weight_scale", wp.scale)
    w_zero = add_initializer(graph, names, f"{base}_weight_zero_point", wp.zero_point)
    dql = ir.node("DynamicQuantizeLinear", [node.inputs[0]], num_outputs=3, name=names(f"{base}_DynamicQuantizeLinear"))
    for out, suffix, dtype in zip(dql.outputs, ("quantized", "scale", "zero_point"),
                                  (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)):
        out.name, out.type = names(f"{base}_input_{suffix}"), ir.TensorType(dtype)
    mmi = ir.node("MatMulInteger", [dql.outputs[0], w_q, dql.outputs[2], w_zero], name=node.name)
    cast = ir.node("Cast", mmi.outputs, {"to": ir.DataType.FLOAT}, name=names(f"{base}_cast"))
    scales = ir.node("Mul", [dql.outputs[1], w_scale], name=names(f"{base}_scales"))
    rescale = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=names(f"{base}_rescale"))
    new_nodes = [dql, mmi, cast, scales, rescale]
    if bias is not None:
        b = add_initializer(graph, names, f"{base}_bias", bias.astype(np.float32))
        new_nodes.append(ir.node("Add", [rescale.outputs[0], b], name=names(f"{base}_bias_add")))
    for n in new_nodes:
        for out in n.outputs:
            out.name = out.name or names(f"{n.name}_output")
    graph.insert_before(node, new_nodes)
    y, final = node.outputs[0], new_nodes[-1].outputs[0]
    final.type, final.shape = y.type or ir.TensorType(ir.DataType.FLOAT), y.shape
    y.replace_all_uses_with(final, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    final.name = y.name
