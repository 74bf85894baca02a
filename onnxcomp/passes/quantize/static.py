"""``quantize_static`` (QDQ): calibrated activation ranges, per-channel int8 weights, int32 biases;
onnxruntime fuses the DQ -> op -> Q groups into QLinearConv / QGemm / QLinearMatMul / QLinearAdd …
(checked per node by :func:`onnxcomp.fusion.fusion_report`).

The steps: :mod:`~onnxcomp.passes.quantize.prepare` (float rewrites), :mod:`~.plan` (which
nodes and tensors, calibration, ranges), :mod:`~.rewrite` (the QDQ rewrite), and the accuracy
tools :mod:`~.smooth_quant`, :mod:`~.equalize`, :mod:`~.bias_correction`, :mod:`~.sensitivity`.
:func:`quantize_static_model` is the Python entry point (with reusable calibration statistics).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from onnxcomp.calibrate import Histogram, MinMax
from onnxcomp.data import Dataset
from onnxcomp.graph import Names, NodeSelection, label
from onnxcomp.int8_ops import COMPUTE_OPS
from onnxcomp.passes.base import CompressionPass, FidelityEvaluator, PassConfig, PassStats, register, skip_subgraph_nodes
from onnxcomp.passes.quantize.bias_correction import bias_correct, float_layers, float_output_means
from onnxcomp.passes.quantize.branches import quantize_if_branches
from onnxcomp.passes.quantize.equalize import EqualizeConfig, equalize_model
from onnxcomp.passes.quantize.lstm import quantize_lstms
from onnxcomp.passes.quantize.padding import PADDING_MASK_HELP, without_padding
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
from onnxcomp.passes.quantize.plan import (
    GRAM,
    StaticPlan,
    gptq_inputs,
    calibrate_plan,
    plan_ranges,
    plan_static,
    unquantizable,
)
from onnxcomp.passes.quantize.prepare import prepare_static
from onnxcomp.passes.quantize.rewrite import apply_static, weight_only_values
from onnxcomp.passes.quantize.sensitivity import SensitivityReport, sensitivity_search
from onnxcomp.passes.quantize.smooth_quant import (
    SMOOTH_QUANT_TAG,
    SmoothQuantConfig,
    smooth_quant_model,
)
from onnxcomp.qparams import QParams, is_x86

__all__ = ["QuantizeStatic", "QuantizeStaticConfig", "StaticResult", "quantize_static_model"]

# KL-divergence (TensorRT "entropy") thresholds weigh a range by how many values it keeps, so they clip
# the rare large activations transformers depend on (LayerNorm outlier channels) and, on ReLU outputs,
# the spike at zero; no variant tried was as faithful as percentile (bench/quantize.py figures in README).
REMOVED_ENTROPY = ("method 'entropy' was removed: its KL threshold clips rare large activations that the "
                   "output depends on; use 'percentile' (or 'mse')")

_ACTIVATION_TYPE_HELP = (
    "activation integer type. Default uint8 because onnxruntime on x86 fuses int8 activations only "
    "when the session sets session.qdqisint8allowed=1 or every QuantizeLinear has one consumer; "
    "uint8 activations with int8 weights (u8s8) fuse on every CPU.")


class QuantizeStaticConfig(PassConfig, NodeSelection):
    renamed_options: ClassVar[dict[str, str]] = {"exclude_nodes": "exclude", "exclude_ops": "exclude"}

    method: Literal["minmax", "percentile", "mse"] = Field(
        "minmax", description="activation range from calibration data: min-max, two-sided percentile, or the "
                              "range minimising quantization MSE")
    percentile: float = Field(99.999, gt=50, le=100, description="kept fraction (%) for method=percentile")
    weight_method: Literal["minmax", "mse"] = Field(
        "minmax", description="weight clipping per channel: max |w|, or the clip minimising squared error")
    weight_rounding: Literal["nearest", "gptq"] = Field(
        "nearest", description="int8 MatMul weights (per channel, same scales) rounded to nearest, or by GPTQ: each "
                               "input row's rounding error compensated in the rows not yet rounded through XᵀX of "
                               "the MatMul's calibration inputs (collected in the same calibration pass)")
    gptq_tail_damp: float = Field(
        0.0, ge=0, description="weight_rounding=gptq: add this × max|X_j|² (calibration) to XᵀX/n's diagonal, so an "
        "input that is rare but large is not used to absorb the others' rounding error (its weights then break "
        "the tokens where it fires)")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description=_ACTIVATION_TYPE_HELP)
    target: Literal["any", "vnni", "arm64"] = Field("any", description=TARGET_HELP)
    reduce_range: bool | Literal["auto"] = Field("auto", description=REDUCE_RANGE_HELP)
    max_range: float = Field(1e4, gt=0, description="activations whose range reaches beyond ±max_range (attention "
                                                    "masks, -inf sentinels) stay float with the nodes touching them")
    depthwise_conv: Literal["float", "int8"] = Field(
        "float", description="depthwise Convs (group = channels): 'float' computes them in float (onnxruntime's CPU int8 "
                             "depthwise kernel runs slower than its float one at batch 1); their weights are int8 when "
                             "weight_only is on")
    weight_only: bool = Field(
        True, description="a Conv/MatMul/Gemm left float for its activations (a range beyond max_range) or for speed "
                          "(depthwise_conv: float) stores its weight int8 (Cast and Mul by per-channel scales) and computes "
                          "in float: the file shrinks as for int8, onnxruntime folds the rescale when the session "
                          "starts and runs the float layer")
    calib_samples: int = Field(512, ge=1, description="use at most this many calibration samples")
    padding_mask: str | None = Field(None, min_length=1, description=PADDING_MASK_HELP)
    histogram_bins: int = Field(2048, ge=128, multiple_of=2,
                                description="histogram bins per tensor (percentile, mse)")
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
                           "(ranked by sensitivity_ranking, then doubling + bisection); the chosen set is reported")
    sensitivity_ranking: Literal["sqnr", "sqnr_loo", "grouped_loo", "leave_one_out"] = Field(
        "leave_one_out", description="how the sensitivity search orders nodes, most harmful first: leave_one_out = "
        "the gate's metric with all but that node quantized (one run per node: the smallest sets); sqnr = one run "
        "of the float and the quantized model, each node scored by the noise-to-signal ratio it adds (fastest, may "
        "keep more nodes float); sqnr_loo = sqnr, then its top 2k re-ranked by leave-one-out (k: the set sqnr "
        "alone would keep float); grouped_loo = leave-one-out on groups of ~√n consecutive nodes, then on each node "
        "of the most harmful third of the groups (~2√n runs instead of n)")
    quantize_embeddings: bool = Field(True, description=EMBEDDINGS_HELP)
    embedding_block_size: Literal[32, 64, 128] = Field(128, description="values per scale in quantized embeddings")
    sensitivity_weight_only: bool = Field(
        False, description="nodes the sensitivity search keeps float store their weights int8 like weight_only ones "
                           "(computed in float: their quantized activations were the harm, as in transformers' FFN "
                           "output MatMuls) instead of float: the file stays int8-sized; the search ranks and checks "
                           "them in that form. Needs weight_only (on by default)")
    sensitivity_samples: int = Field(64, ge=1, description="calibration samples the sensitivity search evaluates "
                                                           "each trial on (the ranking, then a bisection); with "
                                                           "padding_mask, spread over all lengths")


    @field_validator("method", mode="before")
    @classmethod
    def _entropy_removed(cls, value: Any) -> Any:
        if value == "entropy":
            raise ValueError(REMOVED_ENTROPY)
        return value

    @field_validator("smooth_quant", mode="before")
    @classmethod
    def _alpha_shorthand(cls, value: Any) -> Any:
        return {"alpha": value} if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value

    @field_validator("equalize", mode="before")
    @classmethod
    def _equalize_shorthand(cls, value: Any) -> Any:
        return ({} if value else None) if isinstance(value, bool) else value


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
    gptq_rounded: list[str] = dataclasses.field(default_factory=list)  # MatMuls whose weights GPTQ rounded


def quantize_static_model(model: ir.Model, data: Dataset, config: QuantizeStaticConfig, *,
                          stats: dict[str, Histogram | MinMax] | None = None, batch_size: int = 32,
                          progress=None, keep_float: Mapping[str, str] | None = None,
                          target: FidelityEvaluator | None = None, seed: int = 0) -> StaticResult:
    """Quantize ``model`` in place with static QDQ as ``config`` says.

    ``stats`` from an earlier result on the same float model are reused (only tensors they lack
    are calibrated), so a search over ``exclude`` streams the data once. ``keep_float``:
    node name -> why, kept float on top of the config's exclusions. ``target``: how the
    sensitivity search measures the fidelity it aims at (needed when ``config.sensitivity``; a
    pass gets it from ``PassContext.fidelity``). ``seed``: the recipe's seed,
    passed on to the steps that sample (smooth_quant's alpha search).
    """
    check_opset(model, "quantize_static")
    tools = []
    if config.quantize_embeddings:
        tools.append(quantize_embeddings(model, config))
    if config.equalize is not None:
        tools.append(equalize_model(model, config.equalize, stats=PassStats("equalize")))
    if config.smooth_quant is not None:
        smooth = config.smooth_quant.model_copy(update={"target": config.target})
        tools.append(smooth_quant_model(model, data, smooth, batch_size=batch_size, seed=seed,
                                        stats=PassStats("smooth_quant"), progress=progress))
    _name_nodes(model)
    keep = {n.name: "inserted by smooth_quant: stays float, its output is quantized"
            for n in model.graph if SMOOTH_QUANT_TAG in n.metadata_props}
    keep.update(keep_float or {})
    stats = dict(stats or {})
    report = None
    int8_kept = config.sensitivity_weight_only and config.weight_only
    weight_cache: dict = {}  # int8 weights (GPTQ) rounded once for all the search's quantizations and the final one
    if config.sensitivity:
        def trial(m: ir.Model, extra: Mapping[str, str], final: bool) -> list[str]:
            cfg = config if final else config.model_copy(update={"bias_correction": False})
            r = _quantize_once(m, data, cfg, stats, batch_size, progress, {**keep, **extra},
                               weights_only=set(extra) if final and int8_kept else set(), weight_cache=weight_cache)
            stats.update(r.stats)
            return [n.name for n, role in r.plan.roles.items() if role != "shared"]

        sample = data.spread(config.sensitivity_samples) if data.trim_mask else data.head(config.sensitivity_samples)
        chosen, report = sensitivity_search(model.clone(), sample,
                                            target, trial, batch_size=batch_size,
                                            ranking=config.sensitivity_ranking,
                                            weight_form=partial(weight_only_values, options=config) if int8_kept
                                            else None)
        keep.update(chosen)
    result = _quantize_once(model, data, config, stats, batch_size, progress, keep,
                            weights_only=set(report.kept_float) if report and int8_kept else set(), weight_cache=weight_cache)
    result.tools, result.sensitivity = tools, report
    return result


def _quantize_once(model: ir.Model, data: Dataset, config: QuantizeStaticConfig, stats: dict,
                   batch_size: int, progress, keep_float: Mapping[str, str],
                   weights_only: Collection[str] = (), weight_cache: dict | None = None) -> StaticResult:
    """One prepare/plan/calibrate/rewrite. ``weights_only``: names of ``keep_float`` nodes whose
    weights are stored int8 anyway when ``config.weight_only`` (the sensitivity search's choice)."""
    rewrites = prepare_static(model, config)
    stats = dict(stats)
    kept_float = {n: keep_float[n.name] for n in model.graph if n.name in keep_float}
    out_of_range: dict[ir.Node, str] = {n: why for n, why in kept_float.items() if n.name in weights_only}
    while True:  # nodes touching a tensor with an absurd range (a mask) go back to float, then re-plan
        plan = plan_static(model, config, kept_float, weights_only=out_of_range)
        missing = StaticPlan(tensors=[t for t in plan.roots() if t not in stats and t not in plan.constants])
        grams = [t for t in gptq_inputs(plan) if GRAM + t not in stats] if config.weight_rounding == "gptq" else []
        if missing.tensors or grams:
            stats.update(calibrate_plan(model, missing, data, config, batch_size=batch_size, progress=progress,
                                        grams=grams))
        ranges = plan_ranges(model, plan, stats, config)
        more = unquantizable(plan, ranges, config.max_range)
        if not more:
            break
        kept_float.update(more)
        out_of_range.update(more)
    layers = float_layers(plan) if config.bias_correction else None
    if layers:
        float_output_means(model, layers, data, batch_size=batch_size)
    hessians = {t: _gptq_hessian(stats[GRAM + t], config.gptq_tail_damp) for t in gptq_inputs(plan)
                if GRAM + t in stats} if config.weight_rounding == "gptq" else None
    rounded = [n.name for n, role in plan.roles.items()
               if role == "compute" and n.op_type == "MatMul" and n.inputs[0].name in (hessians or {})]
    params = apply_static(model, plan, ranges, config, hessians, weight_cache)
    result = StaticResult(plan, stats, ranges, params, rewrites, gptq_rounded=rounded)
    if layers:
        result.bias = bias_correct(model, layers, data, batch_size=batch_size)
    return result


def _gptq_hessian(gram, tail_damp: float) -> np.ndarray:
    """XᵀX/n, its diagonal raised by ``tail_damp`` · max|X_j|²: an input that is large but rare in the
    calibration data (a small mean square) is not treated as free to absorb the other inputs' error."""
    h = gram.xtx / max(gram.count, 1)
    if tail_damp > 0 and gram.absmax is not None:
        h = h.copy()
        h[np.diag_indices(len(h))] += tail_damp * np.square(gram.absmax)
    return h


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
    min_opset = 13  # per-channel DequantizeLinear (older models are upgraded first, verified)
    summary = "int8 QDQ with calibrated activations (minmax/percentile/mse), per-channel weights"
    Config = QuantizeStaticConfig
    needs_calibration = True

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: QuantizeStaticConfig = self.config
        data = self.context.require_calib(self.name)
        data = data.head(cfg.calib_samples) if len(data) > cfg.calib_samples else data
        data = without_padding(model, data, cfg.padding_mask, stats, f"{self.name}.padding_mask")
        result = quantize_static_model(model, data, cfg, batch_size=self.context.batch_size,
                                       target=self.context.fidelity, seed=self.context.seed,
                                       progress=self.context.progress_bar("quantize_static: calibrating"))
        _report_static(model, result, cfg, stats)
        for what, why in quantize_lstms(model, cfg):  # no QDQ form: int8 weights, run-time activation scales
            if why:
                stats.skip(what, why)
            else:
                stats.touch(f"{what}: DynamicQuantizeLSTM (int8 W and R, activations quantized at run time)")
        branch_cfg = cfg.model_copy(update={"sensitivity": False})
        touched, skipped = quantize_if_branches(
            model, data, cfg, lambda m, d: quantize_static_model(m, d, branch_cfg, batch_size=self.context.batch_size,
                                                                 seed=self.context.seed),
            batch_size=self.context.batch_size)
        stats.touched.extend(touched)
        stats.skipped.extend(skipped)
        skip_subgraph_nodes(stats, model.graph, (*COMPUTE_OPS, "LSTM"), "left float (calibration sees the main "
                            "graph's tensors only, and the If branches its feeds take)", done=_quantized)
        stats.metrics["calib_samples"] = len(data)


def _quantized(node: ir.Node) -> bool:
    """A compute node whose weight is dequantized (int8), or an LSTM made DynamicQuantizeLSTM."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return weight is not None and weight.producer() is not None and weight.producer().op_type == "DequantizeLinear"


def _report_static(model: ir.Model, result: StaticResult, cfg: QuantizeStaticConfig, stats: PassStats) -> None:
    plan = result.plan
    for tool in result.tools:
        merge_tool_stats(stats, tool)
    stats.notes.extend(result.rewrites)
    for what, why in plan.skipped:
        stats.skip(what, why)
    for node, role in plan.roles.items():
        if role == "compute":
            stats.touch(f"{label(node)}: int8 weights, {cfg.activation_type} activations")
    for node in plan.weight_only:
        stats.touch(f"{label(node)}: int8 weights only (rescaled in float, folded by onnxruntime at load), float compute")
    if plan.weight_only:
        stats.metrics["weight_only"] = [node.name for node in plan.weight_only]
    if plan.folded:
        stats.notes.append(f"{len(plan.folded)} Relu/Clip folded into the QuantizeLinear of their producer")
        stats.metrics["folded_activations"] = [act.name for act in plan.folded]
    boundary = _float_neighbours(model, plan)
    if boundary:
        stats.notes.append("float ops reading dequantized tensors (no int8 CPU kernel, or excluded): " +
                           ", ".join(f"{op} x{n}" for op, n in sorted(boundary.items())))
    if cfg.weight_rounding == "gptq":
        stats.notes.append(f"weight rounding gptq: {len(result.gptq_rounded)} MatMul weights rounded with XᵀX "
                           "error feedback")
        stats.metrics["gptq_rounded"] = len(result.gptq_rounded)
    note_reduce_range(cfg, stats)
    if stats.touched:
        record_target(model, cfg)
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
        labels = {node.name: label(node) for node in model.graph}
        kept = ", ".join(labels.get(name, name) for name in rep.kept_float) or "none"
        how = " (weights stored int8: weight_only)" if cfg.sensitivity_weight_only and cfg.weight_only and \
            rep.kept_float else ""
        stats.notes.append(f"sensitivity: {len(rep.kept_float)} nodes kept float{how} to meet {rep.target} on "
                           f"{rep.samples} calibration samples ({'met' if rep.met else 'NOT met'}; "
                           f"{rep.trials} trials, {rep.seconds:.1f} s, {rep.cpu_seconds:.1f} s CPU): {kept}")
        stats.metrics["sensitivity"] = rep.to_dict()
    kinds = Counter(node.op_type for node in plan.roles)
    stats.metrics.update(quantized_ops=dict(sorted(kinds.items())), method=cfg.method,
                         activation_tensors=len(plan.tensors))


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
