"""``smooth_quant`` (Xiao et al. 2023, SmoothQuant): move activation outliers of MatMul/Gemm inputs
into the weights so int8 loses less; the float function is unchanged up to rounding.

For a MatMul/Gemm Y = X·W with a constant W: X_j ← X_j / s_j and row j of W ← s_j · W_j, with
s_j = max|X_j|^α / max|W_j|^(1−α) (max|X_j| over the calibration data, all leading axes).
MatMuls reading the same X share one s (max|W_j| over all their weights). The 1/s goes into X's
producer when it can absorb it — a LayerNormalization (γ, β), a MatMul/Gemm with constant
weight (+ constant bias Add), a Mul by a constant, a MultiHeadAttention (into its V projection
and bias: exact, the attention weights do not depend on V), seen through Relu/LeakyRelu/PRelu —
and X feeds nothing else that reads values. Otherwise a normalisation is cloned for the MatMul
branch (``clone_norm``; a SkipLayerNormalization's clone is a LayerNormalization of its
input + skip sum, so onnxruntime's fusions stay as they were) or ``Mul(X, 1/s)`` is inserted
(``insert_mul``); added nodes carry
``metadata_props[SMOOTH_QUANT_TAG]``. ``alpha="auto"`` picks α per X (or no smoothing) by
simulating int8 (uint8 per-tensor X; per-channel W, 7-bit where quantize_static's
reduce_range=auto picks it) on a bounded sample of calibration rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxcomp.calibrate import MinMax, RowSample, collect
from onnxcomp.data import Dataset
from onnxcomp.graph import (
    Names,
    NodeSelection,
    add_initializer,
    find_layers,
    insert_at_producer,
    label,
)
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register
from onnxcomp.passes.quantize.channel_scaling import (
    HOMOGENEOUS,
    NORMS,
    STANDARD,
    AttentionValue,
    ConstMul,
    LinearLayer,
    NormLayer,
    WeightEdits,
)
from onnxcomp.qparams import activation_params, weight_params

__all__ = ["SmoothQuant", "SmoothQuantConfig", "smooth_quant_model", "smoothing_scales", "SMOOTH_QUANT_TAG",
           "AUTO_ALPHAS"]

SMOOTH_QUANT_TAG = "onnxcomp.smooth_quant"  # metadata key on the nodes smooth_quant adds
AUTO_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # tried by alpha="auto", besides no smoothing
_SHAPE_ONLY = {"Shape", "Size"}  # read no values: never block a rewrite


# ---------------------------------------------------------------------------- passes


class SmoothQuantConfig(PassConfig, NodeSelection):
    alpha: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = Field(
        0.5, description="migration strength s = max|X|^α / max|W|^(1−α); 'auto': per input, by simulated int8")
    min_scale: float = Field(1e-5, gt=0, description="smallest per-channel factor s")
    max_scale: float = Field(1e5, gt=0, description="largest per-channel factor s")
    insert_mul: bool = Field(True, description="insert Mul(X, 1/s) where no producer can absorb 1/s")
    clone_norm: bool = Field(True, description="clone a LayerNorm whose output also feeds non-MatMuls "
                                               "(e.g. a residual Add) rather than insert a Mul")
    sample_rows: int = Field(512, ge=16, description="alpha='auto': calibration rows kept per input X")
    target: Literal["any", "vnni", "arm64"] = Field(
        "any", description="alpha='auto': the int8 CPU the simulation assumes (any: 7-bit weights, as "
                           "quantize_static's reduce_range auto; inside quantize_static its target is used)")


@register
class SmoothQuant(CompressionPass):
    """SmoothQuant: divide each MatMul/Gemm input's channels by s_j and multiply the weight's rows
    by s_j, moving activation outliers into the weights before int8 quantization.

    Needs ``--calib`` (max |X_j| per channel). The float function is unchanged up to rounding; 1/s
    goes into the producer where it can absorb it, else a cloned LayerNorm or an inserted Mul
    (tagged), and every input is reported as smoothed or skipped with the reason.
    """

    name = "smooth_quant"
    summary = "SmoothQuant: move activation outliers of MatMul/Gemm inputs into the weights (run before int8)"
    Config = SmoothQuantConfig
    needs_calibration = True

    def run(self, model: ir.Model, stats: PassStats) -> None:
        calib = self.context.require_calib(self.name)
        smooth_quant_model(model, calib, self.config, batch_size=self.context.batch_size,
                           seed=self.context.seed, stats=stats,
                           progress=self.context.progress_bar("smooth_quant: calibrating"))


# ------------------------------------------------------------------------ library API


def smooth_quant_model(model: ir.Model, calib: Dataset, config: SmoothQuantConfig | None = None, *,
                       batch_size: int = 32, seed: int = 0, stats: PassStats | None = None,
                       progress: Callable[[int, int], None] | None = None, **options) -> PassStats:
    """SmoothQuant every eligible MatMul/Gemm of ``model`` in place; return what was done.

    ``config`` (or its fields as keyword ``options``) as the ``smooth_quant`` pass takes them.
    Guarantees: the float function is unchanged up to fp32 rounding; constant inputs are
    replaced by new initializers (the originals are never written) and the only nodes
    added are cloned normalisations or ``Mul`` nodes in front of the smoothed MatMuls,
    tagged ``metadata_props[SMOOTH_QUANT_TAG]`` — leave those in float and quantize their
    output. One calibration run over ``calib``. ``stats.touched`` names each smoothed node,
    ``stats.skipped`` says why the others were left alone; ``progress(done, total)`` is called
    per calibration batch. ``stats.metrics["smoothed"]`` lists per input X its MatMuls, how 1/s was absorbed, α, the range of s and max|X|
    before/after (with ``alpha="auto"`` also the simulated int8 relative error).
    """
    cfg = config or SmoothQuantConfig(**options)
    alpha, min_scale, max_scale, sample_rows = cfg.alpha, cfg.min_scale, cfg.max_scale, cfg.sample_rows
    stats = stats or PassStats("smooth_quant")
    plans = _plan_smoothing(model.graph, cfg, stats)
    if not plans:
        stats.notes.append("no MatMul/Gemm with a constant weight could be smoothed")
        return stats
    ranges = {p.x.name: MinMax(axis=-1) for p in plans}
    samples = {p.x.name: RowSample(sample_rows, seed) for p in plans} if alpha == "auto" else {}
    collect(model, calib, {n: [r, *([samples[n]] if samples else [])] for n, r in ranges.items()},
            batch_size=batch_size, progress=progress)
    edits = WeightEdits(model.graph)
    done = []
    for plan in plans:
        lo, hi = ranges[plan.x.name].min.astype(np.float64), ranges[plan.x.name].max.astype(np.float64)
        act = np.maximum(-lo, hi)
        w_max = np.max([c.in_ranges(edits) for c in plan.consumers], axis=0)
        info = {"x": plan.x.name, "nodes": [c.name for c in plan.consumers], "alpha": alpha}
        if alpha == "auto":
            info["alpha"], s, info["int8_error_before"], info["int8_error_after"] = _choose_alpha(
                samples[plan.x.name].value, lo, hi, [c.matrix(edits) for c in plan.consumers], w_max,
                min_scale, max_scale, cfg.target)
            if s is None:
                for c in plan.consumers:
                    stats.skip(c.label, "alpha=auto: no α lowers the simulated int8 error")
                continue
        else:
            s = smoothing_scales(act, w_max, alpha, min_scale, max_scale)
        info["how"] = plan.apply(model.graph, edits, s)
        for c in plan.consumers:
            stats.touch(f"{c.label}: smoothed (α={info['alpha']}), 1/s {info['how']}")
        info.update(s_min=float(s.min()), s_max=float(s.max()), x_absmax_before=float(act.max()),
                    x_absmax_after=float((act / s).max()))
        done.append(info)
    edits.commit()
    stats.metrics["smoothed"] = done
    stats.metrics["inserted_mul"] = sum(d["how"].startswith("in an inserted Mul") for d in done)
    stats.metrics["cloned_norm"] = sum(d["how"].startswith("in a clone") for d in done)
    return stats


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float = 0.5,
                     min_scale: float = 1e-5, max_scale: float = 1e5) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α), clipped to [min_scale, max_scale]; 1 where either max is 0."""
    act, w = np.asarray(act_absmax, np.float64), np.asarray(weight_absmax, np.float64)
    live = (act > 0) & (w > 0)
    s = np.ones_like(act)
    s[live] = act[live] ** alpha / w[live] ** (1.0 - alpha)
    return np.clip(s, min_scale, max_scale)


# ------------------------------------------------------------------- smoothing plans


@dataclasses.dataclass
class _SmoothingPlan:
    """The MatMuls reading one X, and how 1/s reaches X: fold, clone a norm, or insert a Mul."""

    x: ir.Value
    consumers: list[LinearLayer]
    how: Literal["fold", "clone", "mul"]
    producer: LinearLayer | NormLayer | ConstMul | AttentionValue | None = None

    def apply(self, graph: ir.Graph, edits: WeightEdits, s: np.ndarray) -> str:
        for consumer in self.consumers:
            consumer.scale_in(edits, s)
        if self.how == "fold":
            self.producer.scale_out(edits, 1.0 / s)
            return f"folded into {self.producer.node.op_type} '{self.producer.node.name}'"
        if self.how == "clone":
            norm = self.producer.clone(graph, {SMOOTH_QUANT_TAG: f"clone of {self.producer.node.name} carrying 1/s"})
            norm.scale_out(edits, 1.0 / s)
            self._feed(norm.node.outputs[0])
            original = self.producer.node
            copy = "" if norm.node.op_type == original.op_type else f" (a {norm.node.op_type} of its sum)"
            return f"in a clone of {original.op_type} '{original.name}'{copy}"
        dtype = self.x.dtype.numpy() if self.x.dtype is not None else np.float32
        names = Names(graph)
        inverse = add_initializer(graph, names, f"{self.x.name}_smooth_inv", (1.0 / s).astype(dtype))
        mul = ir.Node("", "Mul", [self.x, inverse], name=names(f"{self.x.name}_smooth_mul"),
                      outputs=[ir.Value(name=names(f"{self.x.name}_smoothed"), type=self.x.type, shape=self.x.shape)],
                      metadata_props={SMOOTH_QUANT_TAG: "inserted 1/s"})
        insert_at_producer(graph, self.x, mul)
        self._feed(mul.outputs[0])
        return f"in an inserted Mul '{mul.name}'"

    def _feed(self, value: ir.Value) -> None:
        for consumer in self.consumers:
            consumer.node.replace_input_with(0, value)


def _plan_smoothing(graph: ir.Graph, cfg: SmoothQuantConfig, stats: PassStats) -> list[_SmoothingPlan]:
    """Group smoothable MatMul/Gemm by their input X and decide how each X takes 1/s."""
    insert_mul, clone_norm = cfg.insert_mul, cfg.clone_norm
    layers, skipped = find_layers(graph, cfg, ops=("MatMul", "Gemm"))
    for what, why in skipped:
        stats.skip(what, why)
    by_x: dict[ir.Value, list[LinearLayer]] = {}
    for found in layers:
        node = found.node
        layer = LinearLayer.of(node)
        if node.graph is not graph:
            stats.skip(label(node), "inside a subgraph")
        elif isinstance(layer, str):
            stats.skip(label(node), layer)
        elif node.attributes.get_int("transA", 0):
            stats.skip(label(node), "Gemm with transA=1 (X channels are not its last axis)")
        else:
            by_x.setdefault(node.inputs[0], []).append(layer)
    plans = []
    for x, consumers in by_x.items():
        members = {c.node for c in consumers}
        others = [u.node for u in x.uses() if u.node not in members and u.node.op_type not in _SHAPE_ONLY]
        producer = _absorber(x)
        if not isinstance(producer, str) and not others and not x.is_graph_output():
            plans.append(_SmoothingPlan(x, consumers, "fold", producer))
        elif clone_norm and isinstance(producer, NormLayer) and producer.node is x.producer():
            plans.append(_SmoothingPlan(x, consumers, "clone", producer))
        elif insert_mul:
            plans.append(_SmoothingPlan(x, consumers, "mul"))
        else:
            why = (producer if isinstance(producer, str) else
                   f"X '{x.name}' also feeds {others[0].op_type} '{others[0].name}'" if others else
                   f"X '{x.name}' is a graph output")
            for consumer in consumers:
                stats.skip(consumer.label, f"{why}; insert_mul is off")
    return plans


def _absorber(x: ir.Value) -> LinearLayer | NormLayer | ConstMul | AttentionValue | str:
    """What can take a per-channel (last axis) factor on ``x``, seen through Relu & co; else why not."""
    value = x
    while True:
        node = value.producer()
        if node is None:
            return f"X '{x.name}' is a graph input"
        if node.op_type in NORMS and node.domain in (*STANDARD, "com.microsoft"):
            return NormLayer.of(node, value)
        if node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft":
            return AttentionValue.of(node, value)
        if node.domain in STANDARD and node.op_type == "Mul" and ConstMul.of(node):
            return ConstMul.of(node)
        if node.domain in STANDARD and node.op_type in ("MatMul", "Gemm", "Add") and LinearLayer.behind(value):
            return LinearLayer.behind(value)
        if node.op_type not in HOMOGENEOUS or node.domain not in STANDARD:
            return f"X '{x.name}' comes from {node.op_type} '{node.name}', which cannot absorb 1/s"
        inner = node.inputs[0]
        if inner is None or len(inner.uses()) != 1 or inner.is_graph_output():
            return f"X '{x.name}' comes from {node.op_type} '{node.name}' whose input has other uses"
        value = inner


def _choose_alpha(sample: np.ndarray, lo: np.ndarray, hi: np.ndarray, matrices: list[np.ndarray],
                  w_max: np.ndarray, min_scale: float, max_scale: float, target: str = "any") -> tuple:
    """(α, s, error without smoothing, error with s) for the α of AUTO_ALPHAS with the least
    simulated int8 error on ``sample``; s is None when none beats no smoothing."""
    x = np.asarray(sample, np.float32)  # float32 products: the errors compared are ~1e-3, rounding ~1e-7
    matrices = [np.asarray(w, np.float32) for w in matrices]
    refs = [x @ w for w in matrices]
    norms = [max(float(np.sum(np.square(ref, dtype=np.float64))), 1e-30) for ref in refs]
    act = np.maximum(-lo, hi)

    def error(s: np.ndarray) -> float:
        """Relative squared error of X·W with X/s per-tensor uint8 and W·s per-channel int8."""
        params = activation_params(float((lo / s).min()), float((hi / s).max()))
        xq = params.fake_quant(x / s.astype(np.float32)).astype(np.float32)
        total = 0.0
        for w, ref, norm in zip(matrices, refs, norms):
            wp, wq = weight_params(w * s[:, None].astype(np.float32), 1, reduce_range="auto", target=target)
            restored = wq.astype(np.float32) * wp.scale.astype(np.float32)  # symmetric: zero point 0, axis 1
            total += float(np.sum(np.square(xq @ restored - ref), dtype=np.float64)) / norm
        return total / len(matrices)

    base = error(np.ones_like(act))
    best = (None, None, base)
    for alpha in AUTO_ALPHAS:
        s = smoothing_scales(act, w_max, alpha, min_scale, max_scale)
        err = error(s)
        if err < best[2]:
            best = (alpha, s, err)
    return best[0], best[1], base, best[2]


