"""The fusion contract: which quantized nodes onnxruntime really runs as int8 kernels.

:func:`fusion_report` finds the quantized nodes of a model (DequantizeLinear -> op -> QuantizeLinear
groups, DynamicQuantizeLinear -> MatMulInteger chains, MatMulNBits, GatherBlockQuantized), lets
onnxruntime optimize it for the CPU (:func:`onnxcomp.runtime.optimized_graph`), and decides for
each node whether it became an int8 kernel (QLinearConv, QGemm, DynamicQuantizeMatMul, …, or a
data-movement op now moving int8 data) or still runs as a float op between DequantizeLinear and
QuantizeLinear.

:func:`float_fusions` is the other half of the contract for transformers: the float fusions
onnxruntime makes on the original model (attention, LayerNorm, SkipLayerNorm, Gelu, …) must
still be made on the compressed one (quantize/dequantize nodes in the wrong place break them).

ORT renames nodes when it fuses (``/conv_token_1``), so nodes are matched through the tensors
they touch: their int8 weights, their DequantizeLinear inputs, their (quantized) outputs.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Any

import onnx_ir as ir

from onnxcomp.int8_ops import INT8_KERNELS, QLINEAR_OPS, SHARED_SCALE_OPS
from onnxcomp.runtime import optimized_graph

__all__ = ["fusion_report", "float_fusions", "weight_only_nodes", "FLOAT_FUSIONS", "INT8_KERNELS", "COMPUTE_OPS"]

COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "MatMulInteger", "ConvInteger", "MatMulNBits"})
# non-compute ops ORT can run on int8 (QLinear* kernels, int8 data movement, Relu/Clip folded into Q)
_INT8_CAPABLE = frozenset({*QLINEAR_OPS, *SHARED_SCALE_OPS, "Relu", "Clip"})
# already integer before ORT runs (GatherBlockQuantized: an int8/int4 embedding lookup, not a compute op)
_INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "MatMulNBits", "GatherBlockQuantized"})
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# float forms ORT may give an op it did not quantize (graph fusions, NCHWc layout)
_FLOAT_FORMS = {"Conv": {"FusedConv", "ReorderInput"}, "Gemm": {"FusedGemm"},
                "MatMul": {"FusedMatMul", "Gemm", "FusedGemm"}}
_LAYOUT_OPS = frozenset({"Transpose", "ReorderOutput"})
_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization")
_SKIP_NORMS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
_EMBED_NORMS = ("EmbedLayerNormalization", "QEmbedLayerNormalization")
# float fusion families: the op types (in onnxruntime's optimized CPU graph) that count as each
FLOAT_FUSIONS = {
    "attention": ("Attention", "MultiHeadAttention", "QAttention", "GroupQueryAttention"),
    "layer_norm": (*_NORMS, *_SKIP_NORMS, *_EMBED_NORMS),  # a normalisation not left as ReduceMean/Pow/Sqrt…
    "skip_layer_norm": _SKIP_NORMS,  # the residual Add fused into the norm
    "embed_layer_norm": _EMBED_NORMS,
    "gelu": ("Gelu", "BiasGelu", "FastGelu", "QuickGelu"),  # not left as Div/Erf/Add/Mul
}


@dataclasses.dataclass
class _Quantized:
    """A quantized node of the model as written, and the tensors that identify it."""

    name: str
    op: str
    weights: set[str]  # int8 initializers its DequantizeLinear nodes read
    dequantized: set[str]  # its inputs that DequantizeLinear / DynamicQuantizeLinear produce
    outputs: list[str]  # its own outputs
    after: list[str]  # outputs of the QuantizeLinear nodes after it (int8), or of its Cast/Mul/Add chain

    @property
    def compute(self) -> bool:
        return self.op in COMPUTE_OPS


def fusion_report(model: ir.Model, original: ir.Model | None = None) -> dict[str, Any]:
    """Per quantized node: int8 kernel or float op, as onnxruntime (CPU, all optimizations) runs it.

    With ``original`` (the float model it was made from), also ``float_fusions``
    (:func:`float_fusions`: the transformer fusions of the original, and which were lost).

    Returns counts, ``fused_ratio`` (fused / quantized Conv, MatMul, Gemm and integer matmuls;
    None when there are none), ``unfused`` nodes with the op they run as, per-node ``nodes``, the
    int8 kernel op counts of the optimized graph, and the float ops there that still read a
    DequantizeLinear of an activation.
    """
    quantized = quantized_nodes(model)
    weight_only = weight_only_nodes(model)
    optimized_model = optimized_graph(model)
    optimized = _Index(optimized_model.graph)
    nodes, unfused = [], []
    for q in quantized:
        kernel, fused = optimized.implementation(q)
        nodes.append({"name": q.name, "op": q.op, "kernel": kernel, "fused": fused})
        if not fused:
            unfused.append({"name": q.name, "op": q.op, "runs_as": kernel})
    compute = [n for n, q in zip(nodes, quantized) if q.compute]
    other = [n for n, q in zip(nodes, quantized) if not q.compute]
    fused_compute = sum(n["fused"] for n in compute)
    return {
        "quantized_nodes": len(nodes),
        "fused_nodes": sum(n["fused"] for n in nodes),
        "compute": {"quantized": len(compute), "fused": fused_compute},
        "other": {"quantized": len(other), "fused": sum(n["fused"] for n in other)},
        "fused_ratio": fused_compute / len(compute) if compute else None,
        "unfused": unfused,
        "weight_only": len(weight_only),
        "int8_kernels": dict(sorted(optimized.kernel_counts().items())),
        "float_ops_reading_dequantized": dict(sorted(optimized.float_readers_of_dq().items())),
        "nodes": nodes,
        **({"float_fusions": float_fusions(original, optimized_model)} if original is not None else {}),
    }


def float_fusions(original: ir.Model, compressed: ir.Model) -> dict[str, Any]:
    """Does onnxruntime (CPU, all optimizations) fuse the compressed model as it fuses the original?

    Per family of :data:`FLOAT_FUSIONS`: the fused ops in each optimized graph (``original``,
    ``compressed``; a family with none in either is left out). ``lost`` names each family with fewer
    fused ops in the compressed graph ("skip_layer_norm: 12 -> 0"): int8 nodes inserted
    between the parts of a pattern stop ORT from fusing it, and the leftover float ops run
    slower. A family the compressed model has *more* of (a pass fused it, or cloned a norm) is
    not lost. Either model may already be ORT's optimized graph (optimizing it again is a no-op).
    """
    before, after = _family_counts(optimized_graph(original)), _family_counts(compressed)
    families = [f for f in FLOAT_FUSIONS if before[f] or after[f]]
    lost = [f"{f}: {before[f]} -> {after[f]}" for f in families if after[f] < before[f]]
    return {"original": {f: before[f] for f in families}, "compressed": {f: after[f] for f in families},
            "lost": lost}


def _family_counts(model: ir.Model) -> Counter:
    ops = Counter(node.op_type for node in model.graph)
    return Counter({family: sum(ops[op] for op in members) for family, members in FLOAT_FUSIONS.items()})


def quantized_nodes(model: ir.Model) -> list[_Quantized]:
    """The nodes a quantization pass wrapped, in graph order.

    Quantized = reads a DequantizeLinear (or DynamicQuantizeLinear) output and either is a
    compute op with a dequantized weight or a quantized output, or is an op with an int8 path
    in ORT that writes only QuantizeLinear nodes; MatMulInteger / ConvInteger / MatMulNBits
    count as quantized compute nodes, GatherBlockQuantized as a quantized non-compute node. Other
    ops between DQ and Q (LayerNormalization …) are boundaries, counted in
    ``float_ops_reading_dequantized``.
    """
    found = []
    for node in model.graph:
        if node.op_type in _QDQ:
            continue
        dequantized = {v.name for v in node.inputs if _producer_op(v) in _QDQ}
        weights = {v.producer().inputs[0].name for v in node.inputs
                   if _producer_op(v) == "DequantizeLinear" and v.producer().inputs[0].const_value is not None}
        weights |= {v.name for v in node.inputs if v is not None and v.const_value is not None
                    and node.op_type in _INTEGER_OPS}
        outs = [o for o in node.outputs if o.name]
        consumers = [c for o in outs for c in o.consumers()]
        feeds_q = bool(consumers) and all(c.op_type == "QuantizeLinear" for c in consumers)
        if node.op_type in _INTEGER_OPS:
            pass
        elif not dequantized:
            continue
        elif node.op_type in COMPUTE_OPS:
            if not weights and not feeds_q and not all(_producer_op(v) in _QDQ for v in node.inputs[:2]):
                continue  # a float compute node reading a dequantized activation: a boundary
            if _weight_only(node):
                continue  # int8 weight, float compute by design (weight_only_nodes)
        elif not feeds_q or node.op_type not in _INT8_CAPABLE:
            continue  # a float op reading a dequantized activation (LayerNormalization …): a boundary
        after = [c.outputs[0].name for c in consumers if c.op_type == "QuantizeLinear"] + _rescale_chain(node)
        found.append(_Quantized(node.name or outs[0].name, node.op_type, weights, dequantized,
                                [o.name for o in outs], after))
    return found


def weight_only_nodes(model: ir.Model) -> list[str]:
    """Compute nodes that store an int8 weight but compute in float by design: the weight is
    ``Mul(Cast(int8 constant), constant scale)`` (quantize_static's ``weight_only`` layers, which
    onnxruntime constant-folds when the session starts)."""
    return [node.name for node in model.graph if node.op_type in COMPUTE_OPS and _weight_only(node)]


def _weight_only(node: ir.Node) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    mul = weight.producer() if weight is not None else None
    if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
        return False
    cast = mul.inputs[0].producer() if mul.inputs[0] is not None else None
    return cast is not None and cast.op_type == "Cast" and mul.inputs[1] is not None \
        and mul.inputs[1].const_value is not None and cast.inputs[0].const_value is not None \
        and cast.inputs[0].const_value.dtype in (ir.DataType.INT8, ir.DataType.UINT8)


def _producer_op(value: ir.Value | None) -> str | None:
    producer = value.producer() if value is not None else None
    return producer.op_type if producer is not None else None


def _rescale_chain(node: ir.Node) -> list[str]:
    """Outputs of the Cast -> Mul -> Add chain after an integer matmul (what ORT fuses into it)."""
    names, value = [], node.outputs[0]
    for op in ("Cast", "Mul", "Add"):
        consumers = value.consumers()
        if node.op_type not in ("MatMulInteger", "ConvInteger") or len(consumers) != 1 or consumers[0].op_type != op:
            break
        value = consumers[0].outputs[0]
        names.append(value.name)
    return names


class _Index:
    """Producers and consumers of every tensor of the optimized graph."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.producer: dict[str, ir.Node] = {}
        self.consumers: dict[str, list[ir.Node]] = defaultdict(list)
        for node in graph:
            for out in node.outputs:
                if out.name:
                    self.producer[out.name] = node
            for value in node.inputs:
                if value is not None and value.name:
                    self.consumers[value.name].append(node)

    def implementation(self, q: _Quantized) -> tuple[str | None, bool]:
        """(op type that runs ``q``, whether that is an int8 kernel or int8 data movement)."""
        if q.op in _INTEGER_OPS:  # fused further (DynamicQuantizeMatMul) or left as it is: int8 either way
            kernels = [self.producer.get(n) for n in [*reversed(q.after), *q.outputs]]
            return next((k.op_type for k in kernels if k is not None and k.op_type in INT8_KERNELS), q.op), True
        for name in sorted(q.dequantized):  # still reads a DequantizeLinear: runs in float
            for node in self.consumers.get(name, []):
                if node.op_type == q.op or node.op_type in _FLOAT_FORMS.get(q.op, ()) or node.name == q.name:
                    return node.op_type, False
        for name in sorted(q.weights):
            for node in self.consumers.get(name, []):
                if node.op_type not in _QDQ:
                    return node.op_type, self._runs_integer(node)
        for name in q.after:  # int8 tensors: whatever writes them now works on int8
            node = self.producer.get(name)
            if node is not None:
                if node.op_type == "QuantizeLinear":
                    return q.op, False
                while node.op_type in _LAYOUT_OPS and q.op not in _LAYOUT_OPS and self._from_op(node):
                    node = self._from_op(node)
                return node.op_type, True
        for name in q.outputs:  # float outputs (QGemm / MatMulIntegerToFloat without a Q)
            node = self.producer.get(name)
            if node is not None:
                return node.op_type, self._runs_integer(node)
        same = [n for n in self.graph if n.name == q.name or n.name.startswith(f"{q.name}_token")]
        if same:
            return same[0].op_type, self._runs_integer(same[0])
        return None, True  # nothing of it is left in the optimized graph

    def _runs_integer(self, node: ir.Node) -> bool:
        """An int8 kernel, or an op neither reading a DequantizeLinear nor writing a QuantizeLinear."""
        if node.op_type in INT8_KERNELS:
            return True
        reads_dq = any(self.producer.get(v.name) is not None and self.producer[v.name].op_type == "DequantizeLinear"
                       for v in node.inputs if v is not None)
        writes_q = any(c.op_type == "QuantizeLinear" for o in node.outputs for c in self.consumers.get(o.name, []))
        return not (reads_dq or writes_q)

    def _from_op(self, node: ir.Node) -> ir.Node | None:
        value = node.inputs[0] if node.inputs else None
        producer = self.producer.get(value.name) if value is not None else None
        return producer if producer is not None and producer.op_type not in _QDQ else None

    def kernel_counts(self) -> Counter:
        return Counter(n.op_type for n in self.graph if n.op_type in INT8_KERNELS)

    def float_readers_of_dq(self) -> Counter:
        """Non-Q/DQ ops reading a DequantizeLinear of a non-constant tensor."""
        found = Counter()
        for node in self.graph:
            if node.op_type in _QDQ:
                continue
            for value in node.inputs:
                producer = self.producer.get(value.name) if value is not None else None
                if producer is not None and producer.op_type == "DequantizeLinear" \
                        and producer.inputs[0].const_value is None:
                    found[node.op_type] += 1
                    break
        return found
