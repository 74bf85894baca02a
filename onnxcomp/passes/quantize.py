"""``quantize_static`` and ``quantize_dynamic``: int8 graphs that onnxruntime's CPU provider
really runs with int8 kernels (checked per node by :func:`onnxcomp.fusion.fusion_report`).

- ``quantize_static`` (QDQ): calibrated activation ranges, per-channel int8 weights, int32
  biases; ORT fuses the DQ -> op -> Q groups into QLinearConv / QGemm / QLinearMatMul /
  QLinearAdd … The steps live in :mod:`onnxcomp.passes.qdq_static`.
- ``quantize_dynamic`` (ORT's QOperator form): int8 weights, activations quantized at run time
  by DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> Add bias), which ORT fuses into
  DynamicQuantizeMatMul for MatMul and Gemm.

Python entry points for other tools: :func:`quantize_static_model` (with ``exclude`` in
the config and reusable calibration statistics) and :func:`quantize_dynamic_model`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from onnxcomp.calibrate import Histogram, MinMax
from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats
from onnxcomp.passes.equalize import (
    SMOOTH_QUANT_TAG,
    EqualizeConfig,
    SmoothQuantConfig,
    equalize_model,
    smooth_quant_model,
)
from onnxcomp.graph import Layer, Names, NodeSelection, add_initializer, is_standard, label, opset_version
from onnxcomp.passes.qdq import QParams, is_x86, saturating_u8s8, weight_params
from onnxcomp.passes.qdq_accuracy import (
    SensitivityReport,
    bias_correct,
    fidelity_target,
    float_layers,
    sensitivity_search,
)
from onnxcomp.passes.qdq_prepare import prepare_static
from onnxcomp.passes.qdq_rewrite import apply_static
from onnxcomp.passes.qdq_static import (
    StaticPlan,
    calibrate_plan,
    plan_ranges,
    plan_static,
    unquantizable,
)
from onnxcomp.passes.quantize_weights import QuantizeWeightsConfig, quantize_gathers
from onnxcomp.registry import register

if TYPE_CHECKING:
    from onnxcomp.recipe import Gate

__all__ = ["QuantizeStatic", "QuantizeStaticConfig", "QuantizeDynamic", "QuantizeDynamicConfig",
           "StaticResult", "quantize_static_model", "quantize_dynamic_model"]

_ACTIVATION_TYPE_HELP = (
    "activation integer type. Default uint8 because onnxruntime on x86 fuses int8 activations only "
    "when the session sets session.qdqisint8allowed=1 or every QuantizeLinear has one consumer; "
    "uint8 activations with int8 weights (u8s8) fuse on every CPU.")
_REDUCE_RANGE_HELP = (
    "7-bit weights ([-63, 63]). auto: on when the CPU running the pass is x86 without VNNI, where ORT's "
    "u8s8 kernels saturate int16 sums of full-range weights (large errors with per-channel weights); "
    "set false for models deployed on VNNI or ARM CPUs")

_EMBEDDINGS_HELP = ("Gather on a constant 2-D table (an embedding) -> onnxruntime GatherBlockQuantized, int8 "
                    "with a scale and zero point per embedding_block_size values (error ~0.1 %; per-tensor int8 "
                    "as onnxruntime's quantizer does loses ~3 % on BERT's word table)")


class QuantizeStaticConfig(PassConfig, NodeSelection):
    renamed_options: ClassVar[dict[str, str]] = {"exclude_nodes": "exclude", "exclude_ops": "exclude"}

    method: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "minmax", description="activation range from calibration data: min-max, two-sided percentile, "
                              "KL-divergence threshold (TensorRT), or the range minimising quantization MSE")
    percentile: float = Field(99.999, gt=50, le=100, description="kept fraction (%) for method=percentile")
    weight_method: Literal["minmax", "mse"] = Field(
        "minmax", description="weight clipping per channel: max |w|, or the clip minimising squared error")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description=_ACTIVATION_TYPE_HELP)
    reduce_range: bool | Literal["auto"] = Field("auto", description=_REDUCE_RANGE_HELP)
    max_range: float = Field(1e4, gt=0, description="activations whose range reaches beyond ±max_range (attention "
                                                    "masks, -inf sentinels) stay float with the nodes touching them")
    calib_samples: int = Field(512, ge=1, description="use at most this many calibration samples")
    histogram_bins: int = Field(2048, ge=128, multiple_of=2,
                                description="histogram bins per tensor (percentile, entropy, mse)")
    bias_correction: bool = Field(
        False, description="after quantizing, shift each Conv/Gemm int32 bias by the mean output error the layer "
                           "adds itself (weight rounding, its input's clipping), measured on the calibration data")
    smooth_quant: SmoothQuantConfig | None = Field(
        None, description="run the smooth_quant pass first with these options (its config; a number or 'auto' is "
                          "short for {alpha: ...}; 'auto' = per input, by simulated int8 — use it for transformers); "
                          "the nodes it inserts stay float")
    equalize: EqualizeConfig | None = Field(
        None, description="run the equalize pass first with these options (its config; true = its defaults): "
                          "cross-layer equalization of Conv/Gemm/MatMul -> Relu -> Conv/Gemm/MatMul pairs "
                          "(data-free; helps per-tensor weights)")
    sensitivity: bool = Field(
        False, description="mixed precision: while the recipe's gate (min_cosine, max_accuracy_drop, ...) fails "
                           "on the calibration data, return the most harmful quantized nodes to float "
                           "(leave-one-out ranking); the chosen set is reported")
    quantize_embeddings: bool = Field(True, description=_EMBEDDINGS_HELP)
    embedding_block_size: Literal[32, 64, 128] = Field(128, description="values per scale in quantized embeddings")
    sensitivity_samples: int = Field(64, ge=1, description="calibration samples the sensitivity search evaluates "
                                                           "each trial on (one trial per quantized node, then a bisection)")


    @field_validator("smooth_quant", mode="before")
    @classmethod
    def _alpha_shorthand(cls, value: Any) -> Any:
        return {"alpha": value} if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value

    @field_validator("equalize", mode="before")
    @classmethod
    def _equalize_shorthand(cls, value: Any) -> Any:
        return ({} if value else None) if isinstance(value, bool) else value


class QuantizeDynamicConfig(PassConfig, NodeSelection):
    renamed_options: ClassVar[dict[str, str]] = {"exclude_nodes": "exclude", "exclude_ops": "exclude"}

    per_channel: bool = Field(True, description="one weight scale per output column (else per tensor)")
    weight_method: Literal["minmax", "mse"] = Field(
        "minmax", description="weight clipping per channel: max |w|, or the clip minimising squared error")
    reduce_range: bool | Literal["auto"] = Field("auto", description=_REDUCE_RANGE_HELP)
    quantize_embeddings: bool = Field(True, description=_EMBEDDINGS_HELP)
    embedding_block_size: Literal[32, 64, 128] = Field(128, description="values per scale in quantized embeddings")


@dataclasses.dataclass
class StaticResult:
    """What :func:`quantize_static_model` did: the plan, the statistics (reusable), ranges, params."""

    plan: StaticPlan
    stats: dict[str, Histogram | MinMax]
    ranges: dict[str, tuple[float, float]]
    params: dict[str, QParams]
    rewrites: list[str]
    tools: list[PassStats] = dataclasses.field(default_factory=list)  # equalize / smooth_quant before quantizing
    bias: tuple[list[str], list[tuple[str, str]], dict[str, float]] | None = None  # bias_correct's result
    sensitivity: SensitivityReport | None = None


def quantize_static_model(model: ir.Model, data: Dataset, config: QuantizeStaticConfig, *,
                          stats: dict[str, Histogram | MinMax] | None = None, batch_size: int = 32,
                          progress=None, keep_float: Mapping[str, str] | None = None,
                          target: Gate | None = None, seed: int = 0) -> StaticResult:
    """Quantize ``model`` in place with static QDQ as ``config`` says.

    ``stats`` from an earlier result on the same float model are reused (only tensors they lack
    are calibrated), so a search over ``exclude`` streams the data once. ``keep_float``:
    node name -> why, kept float on top of the config's exclusions. ``target``: the gate the
    sensitivity search aims at (needed when ``config.sensitivity``). ``seed``: the recipe's seed,
    passed on to the steps that sample (smooth_quant's alpha search).
    """
    _check_opset(model, "quantize_static")
    tools = []
    if config.quantize_embeddings:
        tools.append(quantize_embeddings(model, config))
    if config.equalize is not None:
        tools.append(equalize_model(model, config.equalize, stats=PassStats("equalize")))
    if config.smooth_quant is not None:
        tools.append(smooth_quant_model(model, data, config.smooth_quant, batch_size=batch_size, seed=seed,
                                        stats=PassStats("smooth_quant")))
    _name_nodes(model)
    keep = {n.name: "inserted by smooth_quant: stays float, its output is quantized"
            for n in model.graph if SMOOTH_QUANT_TAG in n.metadata_props}
    keep.update(keep_float or {})
    stats = dict(stats or {})
    report = None
    if config.sensitivity:
        goal = fidelity_target(target)

        def trial(m: ir.Model, extra: Mapping[str, str], final: bool) -> list[str]:
            cfg = config if final else config.model_copy(update={"bias_correction": False})
            r = _quantize_once(m, data, cfg, stats, batch_size, progress, {**keep, **extra})
            stats.update(r.stats)
            return [n.name for n, role in r.plan.roles.items() if role != "shared"]

        chosen, report = sensitivity_search(model.clone(), data.head(min(len(data), config.sensitivity_samples)),
                                            goal, trial, batch_size=batch_size)
        keep.update(chosen)
    result = _quantize_once(model, data, config, stats, batch_size, progress, keep)
    result.tools, result.sensitivity = tools, report
    return result


def _quantize_once(model: ir.Model, data: Dataset, config: QuantizeStaticConfig, stats: dict,
                   batch_size: int, progress, keep_float: Mapping[str, str]) -> StaticResult:
    rewrites = prepare_static(model, config)
    stats = dict(stats)
    kept_float = {n: keep_float[n.name] for n in model.graph if n.name in keep_float}
    while True:  # nodes touching a tensor with an absurd range (a mask) go back to float, then re-plan
        plan = plan_static(model, config, kept_float)
        missing = StaticPlan(tensors=[t for t in plan.roots() if t not in stats and t not in plan.constants])
        if missing.tensors:
            stats.update(calibrate_plan(model, missing, data, config, batch_size=batch_size, progress=progress))
        ranges = plan_ranges(model, plan, stats, config)
        more = unquantizable(plan, ranges, config.max_range)
        if not more:
            break
        kept_float.update(more)
    layers = float_layers(plan) if config.bias_correction else None
    params = apply_static(model, plan, ranges, config)
    result = StaticResult(plan, stats, ranges, params, rewrites)
    if layers:
        result.bias = bias_correct(model, layers, data, batch_size=batch_size)
    return result


def _name_nodes(model: ir.Model) -> None:
    """Give unnamed nodes a unique name: exclusions, the sensitivity search and reports refer to
    nodes by name."""
    names = Names(model.graph)
    for index, node in enumerate(model.graph):
        if not node.name:
            node.name = names(f"{node.op_type}_{index}")


@register
class QuantizeStatic(CompressionPass):
    """Static int8 QDQ quantization with calibrated activation ranges.

    Conv / MatMul / Gemm get per-channel int8 weights (Conv axis 0, MatMul axis 1, Gemm
    axis 0 if transB else 1) and int32 biases; Add, Mul, Concat, pools, Softmax, Sigmoid,
    LeakyRelu and Where run as QLinear* kernels where their inputs are int8 anyway (Conv or
    QLinear outputs) and their output feeds another quantized node — after a MatMul/Gemm that
    can keep a float output, or a float op, they stay float (one rounding, in front of the
    next MatMul); data-movement ops share their input's scale; Relu/Clip(0, x) after a quantized node
    fold into its QuantizeLinear. Ops without an int8 CPU kernel (LayerNormalization, Gelu, …)
    and tensors wider than max_range (attention masks) stay float. Run cleanup first so
    BatchNormalization is folded into Conv.
    """

    name = "quantize_static"
    summary = "int8 QDQ with calibrated activations (minmax/percentile/entropy/mse), per-channel weights"
    Config = QuantizeStaticConfig
    needs_calibration = True

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: QuantizeStaticConfig = self.config
        data = self.context.require_calib(self.name)
        data = data.head(cfg.calib_samples) if len(data) > cfg.calib_samples else data
        result = quantize_static_model(model, data, cfg, batch_size=self.context.batch_size,
                                       target=self.context.gate, seed=self.context.seed)
        _report_static(model, result, cfg, stats)
        stats.metrics["calib_samples"] = len(data)


@register
class QuantizeDynamic(CompressionPass):
    """Dynamic int8 quantization: int8 weights, activation scales computed at run time.

    MatMul and Gemm with a constant weight become DynamicQuantizeLinear -> MatMulInteger ->
    Cast -> Mul (-> Add bias), which onnxruntime fuses into DynamicQuantizeMatMul. Conv is left
    in float: ORT's CPU ConvInteger has no fused kernel and runs slower than the float Conv.
    """

    name = "quantize_dynamic"
    summary = "int8 weights, activations quantized at run time (DynamicQuantizeMatMul for MatMul/Gemm)"
    Config = QuantizeDynamicConfig

    def run(self, model: ir.Model, stats: PassStats) -> None:
        _check_opset(model, self.name)
        if self.config.quantize_embeddings:
            _merge_tool(stats, quantize_embeddings(model, self.config))
        for what, why in quantize_dynamic_model(model, self.config):
            if why:
                stats.skip(what, why)
            else:
                stats.touch(what)
        _note_reduce_range(self.config, stats)


def quantize_embeddings(model: ir.Model, config: QuantizeStaticConfig | QuantizeDynamicConfig) -> PassStats:
    """Embedding tables -> GatherBlockQuantized int8 (the ``quantize_embeddings`` option)."""
    stats = PassStats("quantize_embeddings")
    cfg = QuantizeWeightsConfig(bits=8, block_size=config.embedding_block_size, include=config.include,
                                exclude=config.exclude, min_params=config.min_params)
    before, after = quantize_gathers(model, cfg, stats)
    stats.metrics.update(bytes_before=before, bytes_after=after)
    return stats


def _merge_tool(stats: PassStats, tool: PassStats) -> None:
    """A helper step's stats, prefixed with its name, into the pass's stats."""
    stats.notes.append(f"{tool.name}: " + ("; ".join(tool.touched) or "; ".join(tool.notes) or "nothing changed"))
    stats.skipped.extend((what, f"{tool.name}: {why}") for what, why in tool.skipped)
    stats.metrics[tool.name] = tool.metrics


def quantize_dynamic_model(model: ir.Model, config: QuantizeDynamicConfig) -> list[tuple[str, str | None]]:
    """Rewrite every eligible MatMul/Gemm of ``model`` in place; return (node, why skipped or None)."""
    graph = model.graph
    names = Names(graph)
    report = []
    for node in list(graph):
        if not is_standard(node) or node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        layer = None if node.op_type == "Conv" else Layer.of(node, graph)
        why = _dynamic_ineligible(node, layer) or config.why_not(node, layer.params if isinstance(layer, Layer) else None)
        if why is None:
            _dynamic_matmul(graph, names, layer, config)
        report.append((label(node), why))
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return report


def _dynamic_ineligible(node: ir.Node, layer: Layer | str | None) -> str | None:
    if node.op_type == "Conv":
        return "ORT's CPU ConvInteger has no fused kernel (slower than the float Conv): left in float"
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
                           method=config.weight_method, reduce_range=config.reduce_range)
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


def _report_static(model: ir.Model, result: StaticResult, cfg: QuantizeStaticConfig, stats: PassStats) -> None:
    plan = result.plan
    for tool in result.tools:
        _merge_tool(stats, tool)
    stats.notes.extend(result.rewrites)
    for what, why in plan.skipped:
        stats.skip(what, why)
    for node, role in plan.roles.items():
        if role == "compute":
            stats.touch(f"{label(node)}: int8 weights, {cfg.activation_type} activations")
    if plan.folded:
        stats.notes.append(f"{len(plan.folded)} Relu/Clip folded into the QuantizeLinear of their producer")
        stats.metrics["folded_activations"] = [act.name for act in plan.folded]
    boundary = _float_neighbours(model, plan)
    if boundary:
        stats.notes.append("float ops reading dequantized tensors (no int8 CPU kernel, or excluded): " +
                           ", ".join(f"{op} x{n}" for op, n in sorted(boundary.items())))
    _note_reduce_range(cfg, stats)
    shared_q = sum(1 for n in model.graph if n.op_type == "QuantizeLinear" and len(n.outputs[0].consumers()) > 1)
    if cfg.activation_type == "int8" and shared_q and is_x86():
        stats.notes.append(f"int8 activations: {shared_q} QuantizeLinear nodes have several consumers; ORT on "
                           "x86 fuses their nodes only with session option session.qdqisint8allowed=1")
    if result.bias is not None:
        touched, skipped, sizes = result.bias
        stats.notes.append(f"bias correction: {len(touched)} layers corrected")
        stats.skipped.extend((what, f"bias correction: {why}") for what, why in skipped)
        stats.metrics["bias_correction"] = {name: round(v, 6) for name, v in sizes.items()}
    if result.sensitivity is not None:
        rep = result.sensitivity
        kept = ", ".join(rep.kept_float) or "none"
        stats.notes.append(f"sensitivity: {len(rep.kept_float)} nodes kept float to meet {rep.target} on "
                           f"{rep.samples} calibration samples ({'met' if rep.met else 'NOT met'}; "
                           f"{rep.trials} trials, {rep.seconds:.1f} s): {kept}")
        stats.metrics["sensitivity"] = rep.to_dict()
    kinds = Counter(node.op_type for node in plan.roles)
    stats.metrics.update(quantized_ops=dict(sorted(kinds.items())), method=cfg.method,
                         activation_tensors=len(plan.tensors))


def _note_reduce_range(config, stats: PassStats) -> None:
    if config.reduce_range == "auto" and stats.touched:
        stats.notes.append("reduce_range auto: 7-bit weights (x86 CPU without VNNI)" if saturating_u8s8()
                           else "reduce_range auto: full 8-bit weights (this CPU's int8 kernels do not saturate)")


def _check_opset(model: ir.Model, pass_name: str) -> None:
    opset = opset_version(model)
    if opset < 13:
        raise OnnxcompError(f"pass '{pass_name}' needs ONNX opset >= 13 (per-channel DequantizeLinear); "
                            f"the model imports opset {opset}: re-export it with a newer opset")


def _float_neighbours(model: ir.Model, plan: StaticPlan) -> Counter:
    """Op types of float nodes reading a dequantized activation (the quantization boundaries)."""
    found = Counter()
    for node in model.graph:
        if node in plan.roles or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(_is_dequantized_activation(v) for v in node.inputs):
            found[node.op_type] += 1
    return found


def _is_dequantized_activation(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0].const_value is None
