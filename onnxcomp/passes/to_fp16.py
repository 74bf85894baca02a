"""``to_fp16``: float32 → float16 with fp32 islands, through onnxruntime.transformers.

``OnnxModel.convert_float_to_float16`` (symbolic shape inference so fused contrib ops are typed)
runs on a protobuf copy of the model (:func:`onnxcomp.passes.proto_roundtrip.run_proto_tool`):
inputs/outputs stay float32 behind boundary Casts, ``keep_ops`` op types and the nodes the
selection leaves out (``exclude``) stay float32. On the CPU it saves size, not time: the pass
reads the graph onnxruntime's CPU provider really runs and reports which ops have fp16 kernels
there and how many Casts it inserts around the rest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import ClassVar

import onnx_ir as ir
from pydantic import Field

from onnxcomp.graph import NodeSelection, label
from onnxcomp.model import model_nbytes
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register
from onnxcomp.passes.proto_roundtrip import adopt_graph, op_counts, run_proto_tool

__all__ = ["ToFp16", "ToFp16Config", "FP16_KEEP_OPS"]

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


class ToFp16Config(PassConfig, NodeSelection):
    """Node selection: nodes not selected (``exclude``, or outside ``include``) stay float32."""

    renamed_options: ClassVar[dict[str, str]] = {"keep_nodes": "exclude"}

    keep_io_types: bool = Field(True, description="graph inputs/outputs stay float32 (Casts at the boundaries)")
    keep_ops: tuple[str, ...] = Field(FP16_KEEP_OPS, description="op types left in float32 (replaces the default list)")
    cpu_report: bool = Field(True, description="report which ops onnxruntime's CPU provider runs in fp16 (one session)")


@register
class ToFp16(CompressionPass):
    """float32 → float16 weights and compute, with float32 islands: graph inputs/outputs (behind
    Casts), ``keep_ops`` op types and unselected nodes stay float32.

    Halves the weight bytes; on the CPU it saves size, not time (reported: which ops have fp16
    kernels in onnxruntime's CPU provider and how many Casts were added).
    """

    name = "to_fp16"
    summary = "float16 weights and compute with float32 islands (inputs/outputs stay float32); for GPUs"
    Config = ToFp16Config

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: ToFp16Config = self.config
        if not any(v.dtype == ir.DataType.FLOAT for v in _float_values(model)):
            stats.notes.append("no float32 tensor: nothing to convert")
            return
        kept_nodes = self._kept_nodes(model, stats)
        bytes_before, casts_before = model_nbytes(model), op_counts(model)["Cast"]

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
                             cast_nodes_before=casts_before, cast_nodes_after=op_counts(model)["Cast"],
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
    casts = op_counts(executed)["Cast"]
    stats.metrics.update(cpu_fp16_ops=dict(sorted(native.items())), cpu_fp32_ops=dict(sorted(upcast.items())),
                         cpu_casts=casts)
    stats.notes.append(
        f"CPU: onnxruntime's CPU provider runs {', '.join(sorted(native)) or 'no op of this graph'} in float16; "
        f"the other {sum(upcast.values())} float nodes run in float32 behind {casts} Casts, so on the CPU fp16 "
        "halves the weights but does not speed it up; it pays off on GPUs")


def _float_values(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in model.graph:
        yield from node.outputs
