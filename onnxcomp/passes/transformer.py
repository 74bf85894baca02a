"""``fuse_transformer`` and ``to_fp16``: onnxruntime.transformers' graph tools as passes.

Both run a tool from ``onnxruntime.transformers`` (the maintained home of what the old
``onnxruntime-tools`` package did; that package is never imported) on a protobuf copy of the
model and move the result back into the onnx-ir model in place. This module holds onnxcomp's
one ir → proto → ir round trip (:func:`run_proto_tool`); models of 2 GB or more, or with
external data, go through a temporary file instead of an in-memory proto.

- ``fuse_transformer``: ``optimize_model(model_type="bert")`` fuses BERT-like encoders into
  onnxruntime's contrib ops (Attention, SkipLayerNormalization, BiasGelu/Gelu/FastGelu,
  EmbedLayerNormalization). The pass reports each fusion with its count (result minus
  original, so a LayerNormalization the exporter already emitted is not a "fusion"), and
  leaves a graph where nothing fused untouched, saying it is not BERT-like.
- ``to_fp16``: float32 → float16 with fp32 islands (``OnnxModel.convert_float_to_float16``,
  symbolic shape inference so fused contrib ops are typed): inputs/outputs stay float32 behind
  boundary Casts, ``keep_ops`` op types and the nodes the selection leaves out (``exclude``) stay
  float32. On the CPU
  it saves size, not time: the pass reads the graph onnxruntime's CPU provider really runs and
  reports which ops have fp16 kernels there and how many Casts it inserts around the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, TopologicalSortPass
from pydantic import Field, model_validator

from onnxcomp.graph import NodeSelection, label
from onnxcomp.model import PROTOBUF_LIMIT, has_external_tensors, model_nbytes
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats
from onnxcomp.registry import register

__all__ = ["FuseTransformer", "ToFp16", "detect_attention_shape", "run_proto_tool", "FP16_KEEP_OPS"]

# Op types onnxruntime.transformers can fuse into (what get_fused_operator_statistics() counts).
_ATTENTION_OPS = ("Attention", "MultiHeadAttention")

# to_fp16's default fp32 islands: onnxruntime.transformers.float16.DEFAULT_OP_BLOCK_LIST (ops with
# no fp16 kernel in any provider, or whose fp16 results are wrong: Range/CumSum accumulate, TopK/NMS
# compare) plus reductions whose intermediate squares/products overflow fp16 (max 65504: |x| > 256
# squared is inf). LayerNormalization is NOT kept: ONNX computes its statistics in float32
# (stash_type=1) and the CPU provider has an fp16 kernel for it.
FP16_KEEP_OPS = (
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer",
    "FeatureVectorizer", "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor",
    "Normalizer", "OneHotEncoder", "RandomUniformLike", "SVMClassifier", "SVMRegressor", "Scaler",
    "TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble", "ZipMap", "NonMaxSuppression",
    "TopK", "RoiAlign", "Range", "CumSum", "Min", "Max", "Upsample",
    "Pow", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ReduceProd",
)
_FP16_MIN_POSITIVE, _FP16_MAX = 5.96e-08, 65504.0  # smallest subnormal, largest finite float16


# --------------------------------------------------------------------------- fuse_transformer


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
    name = "fuse_transformer"
    summary = "onnxruntime.transformers' BERT fusions (Attention, SkipLayerNorm, Gelu, EmbedLayerNorm)"
    Config = FuseTransformerConfig

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: FuseTransformerConfig = self.config
        heads, hidden, how = self._attention_shape(model)
        stats.metrics.update(num_heads=heads, hidden_size=hidden, heads_from=how)
        before = _op_counts(model)

        def optimize(source):
            from onnxruntime.transformers.optimizer import optimize_model

            optimized = optimize_model(source, model_type="bert", num_heads=heads, hidden_size=hidden,
                                       optimization_options=self._fusion_options(),
                                       opt_level=cfg.opt_level, use_gpu=False)
            return optimized.model, list(optimized.get_fused_operator_statistics())

        fused_model, fusion_ops, messages = run_proto_tool(model, optimize)
        after = _op_counts(fused_model)
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

    def _fusion_options(self):
        from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

        cfg: FuseTransformerConfig = self.config
        options = FusionOptions("bert")
        options.enable_attention = cfg.attention
        options.use_multi_head_attention = cfg.multi_head_attention
        options.enable_skip_layer_norm = cfg.skip_layer_norm
        options.enable_bias_skip_layer_norm = cfg.bias_skip_layer_norm
        options.enable_embed_layer_norm = cfg.embed_layer_norm
        options.enable_layer_norm = cfg.layer_norm
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


# --------------------------------------------------------------------------- to_fp16


class ToFp16Config(PassConfig, NodeSelection):
    """Node selection: nodes not selected (``exclude``, or outside ``include``) stay float32."""

    renamed_options: ClassVar[dict[str, str]] = {"keep_nodes": "exclude"}

    keep_io_types: bool = Field(True, description="graph inputs/outputs stay float32 (Casts at the boundaries)")
    keep_ops: tuple[str, ...] = Field(FP16_KEEP_OPS, description="op types left in float32 (replaces the default list)")
    cpu_report: bool = Field(True, description="report which ops onnxruntime's CPU provider runs in fp16 (one session)")


@register
class ToFp16(CompressionPass):
    name = "to_fp16"
    summary = "float16 weights and compute with float32 islands (inputs/outputs stay float32); for GPUs"
    Config = ToFp16Config

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: ToFp16Config = self.config
        if not any(v.dtype == ir.DataType.FLOAT for v in _float_values(model)):
            stats.notes.append("no float32 tensor: nothing to convert")
            return
        kept_nodes = self._kept_nodes(model, stats)
        bytes_before, casts_before = model_nbytes(model), _op_counts(model)["Cast"]

        def convert(source):
            import onnx
            from onnxruntime.transformers.onnx_model import OnnxModel

            onnx_model = OnnxModel(source if isinstance(source, onnx.ModelProto) else onnx.load(source))
            onnx_model.convert_float_to_float16(
                use_symbolic_shape_infer=True, keep_io_types=cfg.keep_io_types, op_block_list=list(cfg.keep_ops),
                node_block_list=list(kept_nodes), min_positive_val=_FP16_MIN_POSITIVE, max_finite_val=_FP16_MAX)
            return onnx_model.model, None

        converted, _, messages = run_proto_tool(model, convert)
        stats.notes.extend(f"onnxruntime.transformers: {m}" for m in messages)
        adopt_graph(model, converted)
        self._record(model, stats, bytes_before, casts_before, kept_nodes)
        if cfg.cpu_report:
            _cpu_fp16_report(model, stats)

    def _kept_nodes(self, model: ir.Model, stats: PassStats) -> dict[str, tuple[str, str]]:
        """Node name -> (label, why) of the nodes the selection leaves in float32."""
        return {node.name: (label(node), self.config.why_not(node)) for node in model.graph
                if node.name and not self.config.selects(node)}

    def _record(self, model: ir.Model, stats: PassStats, bytes_before: int, casts_before: int,
                kept_nodes: dict[str, tuple[str, str]]) -> None:
        halves = sum(1 for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16)
        bytes_after = model_nbytes(model)
        stats.touch(f"{halves} initializers now float16 (weights {bytes_before:,} -> {bytes_after:,} bytes)")
        fp32_ops = Counter(n.op_type for n in model.graph
                           if n.op_type != "Cast" and any(o.dtype == ir.DataType.FLOAT for o in n.outputs))
        keep_ops = set(self.config.keep_ops)
        for op, count in sorted(fp32_ops.items()):
            if op in keep_ops:
                stats.skip(f"{count} {op} node(s)", "kept float32: op type in keep_ops")
        for what, why in kept_nodes.values():
            stats.skip(what, f"kept float32: {why}")
        stats.metrics.update(weight_bytes_before=bytes_before, weight_bytes_after=bytes_after,
                             cast_nodes_before=casts_before, cast_nodes_after=_op_counts(model)["Cast"],
                             fp32_nodes=dict(sorted(fp32_ops.items())))


def _cpu_fp16_report(model: ir.Model, stats: PassStats) -> None:
    """What onnxruntime's CPU provider does with the fp16 graph: it has fp16 kernels for few ops
    and runs the rest in fp32 behind Casts it inserts (InsertCastTransformer)."""
    from onnxcomp.runtime import optimized_graph

    executed = optimized_graph(model)
    native, upcast = Counter(), Counter()
    for node in executed.graph:
        if node.op_type == "Cast":
            continue
        types = {v.dtype for v in (*node.inputs, *node.outputs) if v is not None}
        if ir.DataType.FLOAT16 in types:
            native[node.op_type] += 1
        elif ir.DataType.FLOAT in types:
            upcast[node.op_type] += 1
    casts = _op_counts(executed)["Cast"]
    stats.metrics.update(cpu_fp16_ops=dict(sorted(native.items())), cpu_fp32_ops=dict(sorted(upcast.items())),
                         cpu_casts=casts)
    stats.notes.append(
        f"CPU: onnxruntime's CPU provider runs {', '.join(sorted(native)) or 'no op of this graph'} in float16; "
        f"the other {sum(upcast.values())} float nodes run in float32 behind {casts} Casts, so on the CPU fp16 "
        "halves the weights but does not speed up (measured 1.0-1.3x slower); it pays off on GPUs")


# --------------------------------------------------------------------------- proto round trip


def run_proto_tool(model: ir.Model, tool: Callable[[Any], tuple[Any, Any]]) -> tuple[ir.Model, Any, list[str]]:
    """Run a protobuf-based ``tool(source) -> (ModelProto, extra)`` on a copy of ``model``.

    ``source`` is a ModelProto, or a file path (external data beside it) when the model is too
    large for one proto or holds external tensors. The tool runs in a scratch working folder
    (onnxruntime's symbolic shape inference drops ``sym_shape_infer_temp.onnx`` into the current
    folder when it gives up) with its warnings captured; returns (result as ir.Model, extra,
    warnings).
    """
    with tempfile.TemporaryDirectory(prefix="onnxcomp-ort-") as tmp, _scratch_cwd(tmp), _captured_warnings() as said:
        if model_nbytes(model) < PROTOBUF_LIMIT and not has_external_tensors(model):
            source: Any = ir.serde.serialize_model(model)
        else:
            source = os.path.join(tmp, "model.onnx")
            ir.save(model, source, external_data="model.onnx.data")
        proto, extra = tool(source)
        result = ir.serde.deserialize_model(proto)  # in memory: the tool loaded any external data
    return result, extra, said


def adopt_graph(target: ir.Model, source: ir.Model) -> None:
    """Make ``target`` (changed in place) hold ``source``'s graph: nodes, values, initializers, opsets."""
    old, new = target.graph, source.graph
    old.remove(list(old), safe=False)
    old.inputs.clear()
    old.outputs.clear()
    old.initializers.clear()
    nodes, inputs, outputs = list(new), list(new.inputs), list(new.outputs)
    initializers = list(new.initializers.values())
    new.remove(nodes, safe=False)
    new.inputs.clear()
    new.outputs.clear()
    new.initializers.clear()
    old.inputs.extend(inputs)
    old.extend(nodes)
    old.outputs.extend(outputs)
    for value in initializers:
        old.register_initializer(value)
    target.opset_imports.update(source.opset_imports)
    for node in old:  # onnxruntime.transformers adds its com.microsoft import only when saving to a file
        target.opset_imports.setdefault(node.domain, 1)
    # one weight form for every pass: tensor Constant nodes become initializers (as at load)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(target)
    TopologicalSortPass()(target)  # the fp16 converter appends its Casts at the end


@contextlib.contextmanager
def _scratch_cwd(path: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """Warnings logged meanwhile (onnxruntime.transformers logs under bare module names)."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage().strip().split("\n")[0][:300]
            if text and text not in said:
                said.append(text)

    handler, root = Collect(logging.WARNING), logging.getLogger()
    root.addHandler(handler)
    try:
        yield said
    finally:
        root.removeHandler(handler)


def _float_values(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in model.graph:
        yield from node.outputs


def _op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)
