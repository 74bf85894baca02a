"""Static QDQ quantization in separable steps, shared by ``quantize_static`` and by the tools
that re-run it (sensitivity search, bias correction)::

    prepare_static(model, options)                 # prepare: float rewrites (MatMul+Add -> Gemm)
    plan = plan_static(model, options)             # read-only: which nodes and tensors
    stats = calibrate_plan(model, plan, data, options)   # one streaming pass over the data
    ranges = plan_ranges(model, plan, stats, options)    # tensor -> (lo, hi)
    apply_static(model, plan, ranges, options)     # rewrite: the rewrite

Which nodes (onnxruntime's CPU QDQ selectors decide what fuses):
- ``compute`` — Conv, MatMul, Gemm: DequantizeLinear on the activation, the int8 weight and the
  int32 bias; QuantizeLinear on the output (a MatMul/Gemm whose output feeds only float ops
  keeps a float output: ORT runs MatMulIntegerToFloat / QGemm with float output);
- ``qlinear`` — ops with a QLinear* CPU kernel: DQ on every data input, Q on the output; only
  where the int8 output reaches another quantized node (not a residual Add before LayerNorm)
  AND every activation input is int8 anyway (a Conv or QLinear output, a MatMul/Gemm output
  another Conv/MatMul/Gemm reads): an elementwise op reading a tensor that would otherwise
  stay float (a MatMul's output before its bias Add, Erf inside GELU, a mask Add before
  Softmax) would add a rounding for no int8 compute — in a transformer only the MatMuls are
  int8, each fed by one rounding; in a CNN, Add/Mul/Sigmoid/pools read Conv outputs and stay
  int8 (see :func:`_prune_qlinear`);
- ``shared`` — data movement (Reshape, Transpose, MaxPool, …): their outputs reuse the input's
  scale and zero point, so ORT drops the Q/DQ pair and moves int8 data. Quantized only next
  to another quantized node. A Gather from a constant table (an embedding) stays float when
  the table in int8 with one per-tensor scale is off by more than TABLE_MAX_ERROR.
- a Relu, or a Clip with min 0, right after a compute/qlinear node is folded: the producer's
  output takes its name and its range [0, max], and the QuantizeLinear clips (as ORT's own
  quantizer does).
- ``weight_only`` — a compute node whose int8 kernel costs more than it saves, or whose
  activations cannot be int8, keeps float compute but stores its weight int8, rescaled by a
  Cast and a Mul that onnxruntime constant-folds at load (the file shrinks as much; the
  session runs the float layer at float speed):
  a depthwise Conv (``depthwise_conv: float``: onnxruntime's CPU int8 depthwise kernel runs
  slower than its float one), and a layer reading or writing a tensor wider than ``max_range``
  (:func:`unquantizable`; an STFT filter bank reading raw 16-bit audio). Only where int8
  shrinks the weight (:func:`_costs_more`) and ``options.weight_only`` is on.
Every tensor a quantized node produces goes through its QuantizeLinear, also for float
consumers (which get their own DequantizeLinear), so ORT can fuse the producer. Each node a
rule keeps float is in ``plan.skipped`` with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcomp.calibrate import Gram, Histogram, MinMax, collect
from onnxcomp.data import Dataset
from onnxcomp.graph import NodeSelection, constant_array, label, opset_version
from onnxcomp.int8_ops import COMPUTE_OPS, QLINEAR_OPS, SHARED_SCALE_OPS
from onnxcomp.passes.quantize.prepare import value_types
from onnxcomp.qparams import activation_params
from onnxcomp.ranges import tensor_range

if TYPE_CHECKING:
    from onnxcomp.passes.quantize.static import QuantizeStaticConfig

__all__ = ["StaticPlan", "plan_static", "depthwise", "calibrate_plan", "gptq_inputs", "GRAM", "plan_ranges", "unquantizable", "data_inputs"]

_UNIT_RANGE_OUTPUTS = ("Softmax", "Sigmoid")
GRAM = "gram:"  # calibrate_plan's key prefix for the XᵀX of a tensor (GPTQ weight rounding)
# a constant table (embedding) read by a quantized Gather is stored with one per-tensor scale:
# allowed quantization error of its median row, relative to the row's norm (see _coarse_table)
TABLE_MAX_ERROR = 0.02


@dataclasses.dataclass
class StaticPlan:
    """What :func:`apply_static` will quantize. Tensor names are those of the float graph; a folded
    Relu's output name stands for its producer's output."""

    roles: dict[ir.Node, str] = dataclasses.field(default_factory=dict)  # node -> compute|qlinear|shared
    folded: dict[ir.Node, ir.Node] = dataclasses.field(default_factory=dict)  # Relu/Clip -> its producer
    tensors: list[str] = dataclasses.field(default_factory=list)  # get Q (activations) or DQ (constants)
    constants: set[str] = dataclasses.field(default_factory=set)  # of ``tensors``: initializers
    shares: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> tensor it takes params from
    bounds: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # hard range limits
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    weight_only: dict[ir.Node, str] = dataclasses.field(default_factory=dict)  # float compute, int8 weight -> why
    values: dict[str, ir.Value] = dataclasses.field(default_factory=dict)  # tensor name -> its float value

    def value(self, name: str) -> ir.Value:
        return self.values[name]

    def root(self, name: str) -> str:
        """The tensor whose range sets ``name``'s parameters."""
        while name in self.shares:
            name = self.shares[name]
        return name

    def roots(self) -> list[str]:
        """Tensors that need a range of their own (calibrated, or from a constant's values)."""
        return [t for t in self.tensors if t not in self.shares]


def plan_static(model: ir.Model, options: QuantizeStaticConfig,
                exclude: Mapping[ir.Node, str] | None = None,
                weights_only: Collection[ir.Node] = ()) -> StaticPlan:
    """Decide which nodes and tensors to quantize (the model is not changed).

    ``exclude`` keeps more nodes float, each with the reason to report (on top of the options'
    node selection: ``include`` / ``exclude`` / ``min_params``); those of them in
    ``weights_only`` may still store int8 weights (``plan.weight_only``).
    """
    graph, plan, exclude = model.graph, StaticPlan(), exclude or {}
    types = value_types(model)
    opset = opset_version(model)
    shared, coarse = [], []
    for node in graph:
        role = _role(node, opset)
        if role is None:
            continue
        unselected = options.why_not(node, _params(node) if role == "compute" else None)
        why = unselected or exclude.get(node) or _ineligible(node, role, types)
        if why is None and role == "compute":
            why = _costs_more(node, options.per_channel) or _slower_in_int8(node, options)
        if why and role == "compute" and not unselected and options.weight_only and _constant_weight(node) \
                and (node in weights_only or why == _slower_in_int8(node, options)) \
                and _ineligible(node, role, types) is None and _costs_more(node, options.per_channel) is None:
            plan.weight_only[node] = why
            why = f"{why}; its weight is stored int8 (Cast and Mul by per-channel scales, which onnxruntime folds at load), the layer computes in float"
        if why and (role == "compute" or unselected or node in exclude):
            plan.skipped.append((label(node), why))
        if why:
            continue
        coarse_why = _coarse_table(node, options.activation_type) if role == "shared" else None
        if coarse_why:
            coarse.append((node, coarse_why))
            continue
        if role == "shared":
            shared.append(node)
        else:
            plan.roles[node] = role
    for node, why in _prune_qlinear(plan, set(shared)).items():
        plan.skipped.append((label(node), why))
    for node in graph:
        if node.op_type in ("Relu", "Clip") and not _excluded(node, options) and node not in exclude:
            producer = _foldable_into(node, plan.roles)
            if producer is not None:
                plan.folded[node] = producer
    _add_shared(graph, plan, shared)
    for node, why in coarse:  # reported only where the lookup would have been quantized
        if _touches_quantized(node, plan):
            plan.skipped.append((label(node), why))
    _plan_tensors(plan, types)
    return plan


def calibrate_plan(model: ir.Model, plan: StaticPlan, data: Dataset, options: QuantizeStaticConfig,
                   *, batch_size: int = 32, progress=None, grams: list[str] = ()) -> dict[str, Histogram | MinMax | Gram]:
    """Stream ``data`` through the float ``model`` once: one reducer per tensor needing a range, and
    a :class:`~onnxcomp.calibrate.Gram` (XᵀX) per tensor of ``grams``, returned under ``GRAM + name``."""
    wanted = [t for t in plan.roots() if t not in plan.constants]
    reducers = {t: [MinMax() if options.method == "minmax" else Histogram(options.histogram_bins)] for t in wanted}
    found = {}
    for tensor in grams:
        found[GRAM + tensor] = Gram()
        reducers.setdefault(tensor, []).append(found[GRAM + tensor])
    collect(model, data, reducers, batch_size=batch_size, progress=progress)
    return {**{t: reducers[t][0] for t in wanted}, **found}


def gptq_inputs(plan: StaticPlan) -> list[str]:
    """The activation tensors whose XᵀX GPTQ rounding needs: inputs of quantized MatMuls with a
    constant 2-D weight."""
    found = []
    for node, role in plan.roles.items():
        weight = constant_array(node.inputs[1]) if role == "compute" and node.op_type == "MatMul" else None
        if weight is not None and weight.ndim == 2 and node.inputs[0].name not in found:
            found.append(node.inputs[0].name)
    return found


def plan_ranges(model: ir.Model, plan: StaticPlan, stats: dict[str, Histogram | MinMax],
                options: QuantizeStaticConfig) -> dict[str, tuple[float, float]]:
    """(lo, hi) for every root tensor: ``options.method`` over its statistics, a constant's own
    min/max, then the plan's hard bounds (Softmax/Sigmoid [0, 1], folded Relu/Clip limits)."""
    initializers = model.graph.initializers
    ranges = {}
    for name in plan.roots():
        if name in plan.constants:
            array = initializers[name].const_value.numpy()
            lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        else:
            lo, hi = tensor_range(stats[name], options.method, percentile=options.percentile)
        if name in plan.bounds:
            low, high = plan.bounds[name]
            lo, hi = max(lo, low), min(hi, high)
        ranges[name] = (min(lo, 0.0), max(hi, 0.0))
    return ranges


def unquantizable(plan: StaticPlan, ranges: dict[str, tuple[float, float]],
                  limit: float) -> dict[ir.Node, str]:
    """Nodes to keep float because a tensor they read or must quantize has a range beyond
    ±``limit`` (attention masks, -inf sentinels): 8 bits over it would zero every real value.

    The quantized consumers of such a tensor, and its producer unless that is a MatMul/Gemm
    (which can keep a float output), each with the reason.
    """
    found = {}
    for tensor in plan.tensors:
        lo, hi = ranges[plan.root(tensor)]
        if max(-lo, hi) < limit:
            continue
        why = f"tensor '{tensor}' spans [{lo:.3g}, {hi:.3g}], beyond max_range (a mask?)"
        value = plan.value(tensor)
        producer = plan.folded.get(value.producer(), value.producer())
        if producer in plan.roles and producer.op_type not in ("MatMul", "Gemm"):
            found[producer] = why
        for consumer, index in value.uses():
            if consumer in plan.roles and index in data_inputs(consumer):
                found[consumer] = why
    return found


# --- planning helpers ---------------------------------------------------------------------------

def _constant_weight(node: ir.Node) -> bool:
    """The node's second input is a constant (a weight to store int8), not an activation (Q·Kᵀ)."""
    return len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None


def _role(node: ir.Node, opset: int) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in COMPUTE_OPS:
        return "compute"
    if node.op_type in QLINEAR_OPS:
        return "qlinear"
    if node.op_type in SHARED_SCALE_OPS:
        newest = SHARED_SCALE_OPS[node.op_type]
        return "shared" if newest is None or opset <= newest else None
    return None


def _params(node: ir.Node) -> int | None:
    """Size of a compute node's constant weight (for ``min_params``)."""
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if weight is None else int(weight.size)


def _excluded(node: ir.Node, options: NodeSelection) -> bool:
    """An ``exclude`` entry matches ``node`` (``include`` does not apply to a Relu/Clip folded into its producer)."""
    return NodeSelection(exclude=options.exclude).why_not(node) is not None


def data_inputs(node: ir.Node) -> list[int]:
    """Indices of the inputs a quantized ``node`` reads through DequantizeLinear."""
    op = node.op_type
    if op in COMPUTE_OPS:
        return [i for i in range(min(len(node.inputs), 3)) if node.inputs[i] is not None]
    if op in QLINEAR_OPS and QLINEAR_OPS[op] is not None:
        return [i for i in QLINEAR_OPS[op] if i < len(node.inputs)]
    if op in QLINEAR_OPS:
        return list(range(len(node.inputs)))
    return [0]


def _is_float(value: ir.Value | None, types) -> bool:
    """float32 (a value of unknown type is not)."""
    if value is None:
        return False
    return (value.dtype or types.get(value.name, (None, None))[0]) == ir.DataType.FLOAT


def _ineligible(node: ir.Node, role: str, types) -> str | None:
    """Why ``node`` cannot be quantized, or None."""
    inputs = data_inputs(node)
    if role == "compute":
        inputs = [0] if constant_array(node.inputs[1]) is not None else [0, 1]
    if not all(_is_float(node.inputs[i], types) for i in inputs):
        return "an input is not float32"
    if not all(_is_float(o, types) for o in node.outputs):
        return "an output is not float32"
    op = node.op_type
    weight = constant_array(node.inputs[1]) if role == "compute" else None
    if op in ("Conv", "Gemm") and weight is None:
        return "the weight is not a constant"
    if op == "Gemm" and weight.ndim != 2:
        return "the weight is not 2-D"
    bias = node.inputs[2] if op in ("Conv", "Gemm") and len(node.inputs) > 2 else None
    if bias is not None and (constant_array(bias) is None or constant_array(bias).ndim != 1):
        return "the bias is not a constant vector (run cleanup first)"
    return None


def _costs_more(node: ir.Node, per_channel: bool) -> str | None:
    """Why quantizing a compute node's constant weight would not make the model smaller, or None.

    Its weight is also read by a node that is not a Conv/MatMul/Gemm weight input (the float copy
    stays: int8 would store it twice), or is a graph output; or int8 values plus a float scale and
    an int8 zero point per channel (and the activation's pair) take as many bytes as the float
    weight (a 1x1 depthwise Conv: one weight per channel). Compute nodes sharing one weight are
    fine: it is quantized once (:mod:`~.rewrite`).
    """
    value = node.inputs[1]
    weight = constant_array(value)
    if weight is None:
        return None
    others = [user for user, index in value.uses() if user.op_type not in COMPUTE_OPS or index != 1]
    if others or value.is_graph_output():
        what = label(others[0]) if others else "a graph output"
        return f"its weight is also read by {what} (kept float there): an int8 copy would store it twice"
    out_axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)) else -1
    channels = weight.shape[out_axis] if per_channel else 1
    int8_bytes, float_bytes = weight.size + 5 * channels + 10, 4 * weight.size
    if int8_bytes >= float_bytes:
        return (f"int8 would not shrink it: {weight.size} weights in {channels} channels take {int8_bytes} bytes "
                f"as int8 with their scales vs {float_bytes} as float")
    return None


def depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel per group and more than one group (MobileNet's 3x3 / 5x5)."""
    if node.op_type != "Conv" or node.attributes.get_int("group", 1) <= 1:
        return False
    shape = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return shape is not None and len(shape) >= 3 and shape[1] == 1


def _slower_in_int8(node: ir.Node, options: QuantizeStaticConfig) -> str | None:
    """Why an int8 kernel for this compute node would run slower than the float one, or None.

    onnxruntime's CPU QLinearConv for a depthwise Conv (group = channels) runs slower at batch 1
    than its float (NCHWc) depthwise Conv over MobileNet's 3x3/5x5 shapes (``bench/depthwise.py``
    measures it per shape), while the layer holds few weights: it computes in float.
    """
    if options.depthwise_conv == "float" and depthwise(node):
        return ("depthwise Conv: onnxruntime's CPU int8 depthwise kernel runs slower than its float one "
                "(depthwise_conv: float)")
    return None


def _coarse_table(node: ir.Node, activation_type: str) -> str | None:
    """Why a lookup in a constant table (Gather of an embedding) stays float, or None.

    A quantized Gather moves int8 rows of a table stored with ONE per-tensor scale (ORT drops
    the Q/DQ pair only for per-tensor parameters): a few rows far wider than the rest (position
    embeddings, outlier tokens) set that scale for all, and the typical row loses its detail.
    The table stays float when the median row's quantization error, relative to that row's
    norm, exceeds TABLE_MAX_ERROR (a Gaussian table spread over ±5.5σ gives ~1.3 %).
    """
    if node.op_type != "Gather":
        return None
    table = constant_array(node.inputs[0])
    if table is None or table.size == 0 or table.ndim == 0:
        return None
    axis = node.attributes.get_int("axis", 0) % table.ndim
    key = (activation_type, axis, id(node.inputs[0].const_value))
    cached = node.inputs[0].meta.get("onnxcomp.table_error")  # planning runs several times per pass
    if cached is not None and cached[0] == key:
        error, lo, hi = cached[1]
    else:
        rows = np.moveaxis(table.astype(np.float32), axis, 0).reshape(table.shape[axis], -1)
        lo, hi = float(rows.min()), float(rows.max())
        restored = activation_params(lo, hi, activation_type).fake_quant(rows)
        norms = np.linalg.norm(rows, axis=1)
        errors = np.linalg.norm(restored - rows, axis=1) / np.where(norms > 0, norms, 1.0)
        error = float(np.median(errors))
        node.inputs[0].meta["onnxcomp.table_error"] = (key, (error, lo, hi))
    if error <= TABLE_MAX_ERROR:
        return None
    return (f"table '{node.inputs[0].name}' {list(table.shape)} in int8 with one per-tensor scale (range "
            f"[{lo:.3g}, {hi:.3g}]) would be off by {error:.1%} on the median row "
            f"(limit {TABLE_MAX_ERROR:.0%}): the lookup stays float")


def _foldable_into(act: ir.Node, roles: dict[ir.Node, str]) -> ir.Node | None:
    """The compute/qlinear producer a Relu (or Clip with min 0) can be folded into, or None."""
    x = act.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None or roles.get(producer) not in ("compute", "qlinear"):
        return None
    if len(x.uses()) != 1 or x.is_graph_output() or len(producer.outputs) != 1:
        return None
    if act.op_type == "Clip":
        low = _clip_bounds(act)[0]
        if low != 0.0:
            return None
    return producer


def _clip_bounds(clip: ir.Node) -> tuple[float | None, float]:
    """Clip's (min, max) when constant; min None when it is not."""
    low = constant_array(clip.inputs[1]) if len(clip.inputs) > 1 and clip.inputs[1] is not None else None
    high = constant_array(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2] is not None else None
    if len(clip.inputs) > 2 and clip.inputs[2] is not None and high is None:
        return None, np.inf
    return (None if low is None else float(low)), (np.inf if high is None else float(high))


def _effective_output(value: ir.Value, plan: StaticPlan) -> ir.Value:
    """``value``, or the output of the Relu/Clip folded into its producer."""
    consumers = value.consumers()
    if len(consumers) == 1 and consumers[0] in plan.folded:
        return consumers[0].outputs[0]
    return value


def _effective_producer(value: ir.Value, plan: StaticPlan) -> ir.Node | None:
    producer = value.producer()
    return plan.folded.get(producer, producer)


def _prune_qlinear(plan: StaticPlan, shared: set[ir.Node]) -> dict[ir.Node, str]:
    """Take back to float the qlinear nodes (Add, Mul, Softmax, …) that would cost accuracy
    without saving a rounding; return them with the reason. Repeated until nothing changes (a
    node taken back can strand its neighbours):

    - dead end: its int8 output reaches no other quantized node (a residual Add before
      LayerNorm): a QLinear kernel there saves no Q/DQ and re-quantizes its inputs per tensor;
    - float input: an activation input is a tensor that would otherwise stay float — the output
      of an op without an int8 kernel (Erf, LayerNormalization, a graph input …) or of a
      MatMul/Gemm that can keep a float output (MatMulIntegerToFloat / QGemm with float output)
      because no Conv/MatMul/Gemm reads it. An int8 elementwise op there rounds that tensor once
      more (and its own output again), where in float the chain is rounded once, in front of the
      next Conv/MatMul/Gemm. This keeps a transformer's bias Adds, GELU, attention scale and
      Softmax float and each MatMul fed by one rounding; in CNNs these ops read Conv outputs
      (int8 anyway) and stay int8.
    """
    dropped: dict[ir.Node, str] = {}
    changed = True
    while changed:
        changed = False
        for node in [n for n, role in plan.roles.items() if role == "qlinear"]:
            why = _dead_end(node, plan, shared) or _float_input(node, plan, shared)
            if why:
                del plan.roles[node]
                dropped[node] = why
                changed = True
    return dropped


def _dead_end(node: ir.Node, plan: StaticPlan, shared: set[ir.Node]) -> str | None:
    if any(_reaches_quantized(o, plan, shared) for o in node.outputs):
        return None
    return (f"its int8 output would reach no other quantized node: QLinear{node.op_type} would only "
            f"re-quantize its inputs")


def _float_input(node: ir.Node, plan: StaticPlan, shared: set[ir.Node]) -> str | None:
    for i in data_inputs(node):
        value = node.inputs[i]
        if value is None or _int8_anyway(value, plan, shared):
            continue
        producer = value.producer()
        if producer is None:
            source = "a graph input"
        elif plan.roles.get(producer) == "compute":
            source = f"{label(producer)}, whose output can stay float (no Conv/MatMul/Gemm reads it)"
        else:
            source = f"{label(producer)}, which stays float"
        return (f"input '{value.name}' comes from {source}: an int8 {node.op_type} would round it once more; "
                f"in float the result is rounded once, before the next quantized node")
    return None


def _int8_anyway(value: ir.Value, plan: StaticPlan, shared: set[ir.Node]) -> bool:
    """``value`` is quantized whatever its qlinear consumers become: a constant, the output of a
    Conv or qlinear node (or a Relu/Clip folded into one), a MatMul/Gemm output some Conv/MatMul/
    Gemm reads, or data movement of one of these."""
    if constant_array(value) is not None:
        return True
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type in ("Relu", "Clip") and _foldable_into(producer, plan.roles) is not None:
        return True  # folded: its producer's output is quantized over the activation's range
    role = plan.roles.get(producer)
    if role == "qlinear":
        return True
    if role == "compute":
        return producer.op_type not in ("MatMul", "Gemm") or _feeds_compute(value, plan, shared)
    if producer in shared and producer.inputs[0] is not None:
        return _int8_anyway(producer.inputs[0], plan, shared)
    return False


def _feeds_compute(value: ir.Value, plan: StaticPlan, shared: set[ir.Node]) -> bool:
    """A quantized Conv/MatMul/Gemm reads ``value`` (directly or through data movement)."""
    for consumer, index in value.uses():
        if plan.roles.get(consumer) == "compute" and index in data_inputs(consumer):
            return True
        if consumer in shared and index == 0 and any(_feeds_compute(o, plan, shared) for o in consumer.outputs):
            return True
    return False


def _reaches_quantized(value: ir.Value, plan: StaticPlan, shared: set[ir.Node]) -> bool:
    for consumer in value.consumers():
        if consumer in plan.roles:
            return True
        if consumer in shared or consumer.op_type in ("Relu", "Clip"):
            if any(_reaches_quantized(o, plan, shared) for o in consumer.outputs):
                return True
    return False


def _add_shared(graph: ir.Graph, plan: StaticPlan, candidates: list[ir.Node]) -> None:
    """Quantize data-movement ops that touch a quantized node (repeated until nothing changes)."""
    changed = True
    while changed:
        changed = False
        for node in candidates:
            if node not in plan.roles and _touches_quantized(node, plan):
                plan.roles[node] = "shared"
                changed = True
    plan.roles = {n: plan.roles[n] for n in graph if n in plan.roles}  # graph order


def _touches_quantized(node: ir.Node, plan: StaticPlan) -> bool:
    """A quantized node produces ``node``'s data input, reads it too, or reads its output."""
    x = node.inputs[0]
    neighbours = [_effective_producer(x, plan), *x.consumers()]
    neighbours += [c for o in node.outputs for c in o.consumers()]
    return any(n is not node and n in plan.roles for n in neighbours)


def _plan_tensors(plan: StaticPlan, types) -> None:
    seen = set()

    def add(value: ir.Value) -> None:
        if value.name not in seen:
            seen.add(value.name)
            plan.tensors.append(value.name)
            plan.values[value.name] = value
            if constant_array(value) is not None:
                plan.constants.add(value.name)

    for node, role in plan.roles.items():
        for i in data_inputs(node):
            value = node.inputs[i]
            if value is None or (role == "compute" and i > 0 and constant_array(value) is not None):
                continue  # weights and bias are quantized with the node
            add(value)
        for out in node.outputs:
            if not _is_float(out, types):
                continue
            final = _effective_output(out, plan)
            wanted = role != "compute" or node.op_type == "Conv" or final is not out
            if wanted or any(c in plan.roles for c in final.consumers()):
                add(final)
            if role == "shared":
                plan.shares[final.name] = node.inputs[0].name
            elif node.op_type in _UNIT_RANGE_OUTPUTS:
                plan.bounds[final.name] = (0.0, 1.0)
            if final is not out:
                act = final.producer()
                low, high = _clip_bounds(act) if act.op_type == "Clip" else (0.0, np.inf)
                plan.bounds[final.name] = (low, high)

