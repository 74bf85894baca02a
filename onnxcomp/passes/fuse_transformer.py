"""``fuse_transformer``: onnxruntime.transformers' BERT fusions as a pass.

``optimize_model(model_type="bert")`` (from ``onnxruntime.transformers``, the maintained home of
what the old ``onnxruntime-tools`` package did; that package is never imported) fuses BERT-like
encoders into onnxruntime's contrib ops (Attention, SkipLayerNormalization, BiasGelu/Gelu/
FastGelu, EmbedLayerNormalization), on a protobuf copy of the model
(:func:`onnxcomp.passes.proto_roundtrip.run_proto_tool`). The pass reports each fusion with its
count (result minus original, so a LayerNormalization the exporter already emitted is not a
"fusion"), and leaves a graph where nothing fused untouched, saying it is not BERT-like.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import onnx_ir as ir
from pydantic import Field, model_validator

from onnxcomp.graph import opset_version
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register
from onnxcomp.passes.proto_roundtrip import adopt_graph, op_counts, run_proto_tool

__all__ = ["FuseTransformer", "FuseTransformerConfig", "detect_attention_shape"]

# Op types onnxruntime.transformers can fuse into (what get_fused_operator_statistics() counts).
_ATTENTION_OPS = ("Attention", "MultiHeadAttention")


class FuseTransformerConfig(PassConfig):
    num_heads: int = Field(0, ge=0, description="attention heads; 0 = detect from the graph's Q/K/V reshapes")
    hidden_size: int = Field(0, ge=0, description="model width; 0 = detect from LayerNormalization weights")
    opt_level: Literal[0, 1] = Field(
        0, description="0: the Python fusions only; 1: onnxruntime's basic graph optimizations first")
    attention: bool = Field(True, description="fuse Q/K/V MatMuls, scores, mask, Softmax into Attention")
    multi_head_attention: bool = Field(
        False, description="fuse into MultiHeadAttention (Q/K/V MatMuls stay separate) instead of Attention")
    attention_mask: Literal["attention_mask", "mask_index_end", "no_mask"] = Field(
        "attention_mask", description="mask given to Attention: the raw 2-D mask (any padding); "
        "mask_index_end = a length per row (onnxruntime's BERT default: right padding only); no_mask")
    skip_layer_norm: bool = Field(True, description="residual Add + LayerNormalization -> SkipLayerNormalization")
    bias_skip_layer_norm: bool = Field(True, description="also fold the preceding bias Add into it")
    embed_layer_norm: bool = Field(True, description="word/position/segment Gathers + LayerNorm -> EmbedLayerNormalization")
    layer_norm: bool = Field(True, description="decomposed ReduceMean/Sub/Pow/Sqrt chains -> LayerNormalization")
    gelu: bool = Field(True, description="Erf-based GELU subgraph -> Gelu")
    bias_gelu: bool = Field(True, description="bias Add + Gelu -> BiasGelu")
    gelu_approximation: bool = Field(False, description="Gelu -> FastGelu (tanh approximation: changes results slightly)")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.num_heads and self.hidden_size and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        return self


@register
class FuseTransformer(CompressionPass):
    """onnxruntime.transformers' BERT fusions (Attention or MultiHeadAttention, SkipLayerNormalization,
    BiasGelu/Gelu, EmbedLayerNormalization) applied to the graph.

    Reports each fusion with its count; a graph where nothing fuses is left unchanged and the
    pass says it is not BERT-like. The fused graph computes the same outputs up to float rounding.
    """

    name = "fuse_transformer"
    summary = "onnxruntime.transformers' BERT fusions (Attention, SkipLayerNorm, Gelu, EmbedLayerNorm)"
    Config = FuseTransformerConfig
    min_opset = 17  # the fused LayerNormalization is a default-domain op from opset 17 (older: upgraded first)

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: FuseTransformerConfig = self.config
        heads, hidden, how = self._attention_shape(model)
        stats.metrics.update(num_heads=heads, hidden_size=hidden, heads_from=how)
        before = op_counts(model)
        layer_norm = cfg.layer_norm
        if layer_norm and opset_version(model) < 17:  # the verified upgrade failed: LayerNorm stays primitives
            layer_norm = False
            stats.skip("LayerNormalization", f"opset {opset_version(model)} < 17 (the upgrade failed): "
                                             "LayerNorm primitives left unfused")

        def optimize(source):
            from onnxruntime.transformers.optimizer import optimize_model

            optimized = optimize_model(source, model_type="bert", num_heads=heads, hidden_size=hidden,
                                       optimization_options=self._fusion_options(layer_norm),
                                       opt_level=cfg.opt_level, use_gpu=False)
            return optimized.model, list(optimized.get_fused_operator_statistics())

        fused_model, fusion_ops, messages = run_proto_tool(model, optimize)
        after = op_counts(fused_model)
        applied = {op: after[op] - before[op] for op in fusion_ops if after[op] > before[op]}
        stats.metrics.update(fusions=applied, nodes_before=sum(before.values()), nodes_after=sum(after.values()))
        stats.notes.extend(f"onnxruntime.transformers: {m}" for m in messages)
        if not applied:
            stats.notes.append("no fusion applied: the graph is not BERT-like (no Attention, LayerNorm or "
                               "Gelu pattern matched); the model is left unchanged")
            stats.metrics["nodes_after"] = stats.metrics["nodes_before"]
            return
        adopt_graph(model, fused_model)
        for op, count in sorted(applied.items()):
            stats.touch(f"{op}: {count} fused")
        if cfg.attention and not any(op in applied for op in _ATTENTION_OPS):
            stats.skip("Attention", f"pattern not matched with num_heads={heads}, hidden_size={hidden} "
                                    f"({how}); set num_heads/hidden_size if they are wrong")

    def _attention_shape(self, model: ir.Model) -> tuple[int, int, str]:
        cfg: FuseTransformerConfig = self.config
        if cfg.num_heads and cfg.hidden_size:
            return cfg.num_heads, cfg.hidden_size, "configured"
        detected = detect_attention_shape(model.graph)
        if detected is None:
            return 0, 0, "not detected (set both num_heads and hidden_size): left to onnxruntime.transformers"
        heads, hidden = cfg.num_heads or detected[0], cfg.hidden_size or detected[1]
        if hidden % heads:  # one configured, the other detected, and they disagree
            return 0, 0, f"num_heads={heads} does not divide hidden_size={hidden}: left to onnxruntime.transformers"
        return heads, hidden, "detected" if not (cfg.num_heads or cfg.hidden_size) else "configured + detected"

    def _fusion_options(self, layer_norm: bool):
        from onnxruntime.transformers.fusion_options import (
            AttentionMaskFormat,
            FusionOptions,
        )

        cfg: FuseTransformerConfig = self.config
        options = FusionOptions("bert")
        options.enable_attention = cfg.attention
        options.use_multi_head_attention = cfg.multi_head_attention
        options.enable_skip_layer_norm = cfg.skip_layer_norm
        options.enable_bias_skip_layer_norm = cfg.bias_skip_layer_norm
        options.enable_embed_layer_norm = cfg.embed_layer_norm
        options.enable_layer_norm = layer_norm
        options.enable_gelu = cfg.gelu
        options.enable_bias_gelu = cfg.bias_gelu
        options.enable_gelu_approximation = cfg.gelu_approximation
        options.attention_mask_format = {
            "attention_mask": AttentionMaskFormat.AttentionMask,
            "mask_index_end": AttentionMaskFormat.MaskIndexEnd,
            "no_mask": AttentionMaskFormat.NoMask,
        }[cfg.attention_mask]
        return options


def detect_attention_shape(graph: ir.Graph) -> tuple[int, int] | None:
    """(num_heads, hidden_size) of a transformer graph, or None when it shows neither.

    hidden_size is the most common LayerNormalization weight length. The head size is the last
    element of the 4-D shapes that split Q/K/V into heads (``Reshape(x, [batch, seq, heads,
    head_size])``, built by a Concat when batch/seq are dynamic); heads is their third element,
    or hidden_size / head_size when the exporter wrote -1 there (transformers >= 4.48 does, which
    is why onnxruntime.transformers' own detection fails on such exports).
    """
    widths = Counter()
    for node in graph:
        if node.op_type == "LayerNormalization" and len(node.inputs) > 1:
            scale = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
            if scale is not None and scale.shape.rank() == 1:
                widths[scale.shape[0]] += 1
    if not widths:
        return None
    hidden = widths.most_common(1)[0][0]
    heads = Counter()
    for node in graph:
        if node.op_type != "Reshape" or len(node.inputs) < 2:
            continue
        dims = _shape_elements(node.inputs[1])
        if dims is None or len(dims) != 4 or not dims[3] or dims[3] <= 0 or hidden % dims[3]:
            continue
        n = dims[2] if dims[2] and dims[2] > 0 else hidden // dims[3]
        if n * dims[3] == hidden:
            heads[n] += 1
    return (heads.most_common(1)[0][0], hidden) if heads else None


def _shape_elements(value: ir.Value | None) -> list[int | None] | None:
    """The elements of a shape tensor: constants as ints, dynamic ones (Concat parts) as None."""
    if value is None:
        return None
    const = ir.convenience.get_const_tensor(value)
    if const is not None:
        return [int(x) for x in const.numpy().reshape(-1)]
    producer = value.producer()
    if producer is None or producer.op_type != "Concat":
        return None
    out: list[int | None] = []
    for part in producer.inputs:
        part_const = ir.convenience.get_const_tensor(part) if part is not None else None
        if part_const is None:
            out.append(None)  # assume one element (an Unsqueeze'd dynamic dim)
        else:
            out.extend(int(x) for x in part_const.numpy().reshape(-1))
    return out
