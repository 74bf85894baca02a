"""``equalize`` (Nagel et al. 2019, cross-layer equalization): even out per-channel weight ranges
of consecutive layers so per-tensor int8 loses less; the float function is unchanged up to
rounding.

For layer 1 → f → layer 2, layers Conv/Gemm/MatMul with constant weights and f positively
homogeneous (f(x/s) = f(x)/s for s > 0: Relu, LeakyRelu, PRelu, Identity, max/average pooling
between Convs, or nothing): output channel i of layer 1 (weights, bias) ← /s_i, input channel i
of layer 2 ← ·s_i, s_i = sqrt(r1_i / r2_i) (r = per-channel max|W|), so both ranges become
sqrt(r1_i·r2_i). Swept over all pairs until the factors settle. Grouped and depthwise Convs are
exact (input channel i of a grouped Conv is column i mod C/g of its group's filters).
Data-free; biases are only rescaled (no bias absorption).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxcomp.graph import NodeSelection, is_standard, label
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register
from onnxcomp.passes.quantize.channel_scaling import (
    HOMOGENEOUS,
    STANDARD,
    LinearLayer,
    WeightEdits,
)

__all__ = ["Equalize", "EqualizeConfig", "equalize_model", "equalization_scales"]

_CHANNEL_POOLS = {"MaxPool", "AveragePool", "GlobalMaxPool", "GlobalAveragePool"}  # NCHW (Conv) only


class EqualizeConfig(PassConfig, NodeSelection):
    iterations: int = Field(20, ge=1, le=1000, description="most sweeps over all layer pairs")
    tolerance: float = Field(1e-3, gt=0, description="stop when every factor s is within 1±tolerance")


@register
class Equalize(CompressionPass):
    """Cross-layer equalization: for layer 1 → (Relu-like) → layer 2, scale output channel i of
    layer 1 by 1/s_i and input channel i of layer 2 by s_i so both weight ranges become
    sqrt(r1_i·r2_i); helps per-tensor int8 weights.

    Data-free; the float function is unchanged up to rounding. Pairs that do not qualify (a
    non-homogeneous op between them, a shared weight or activation) are skipped with the reason.
    """

    name = "equalize"
    summary = "cross-layer equalization: Conv/Gemm/MatMul → ReLU → Conv/Gemm/MatMul weight ranges (data-free)"
    Config = EqualizeConfig

    def run(self, model: ir.Model, stats: PassStats) -> None:
        equalize_model(model, self.config, stats=stats)


def equalize_model(model: ir.Model, config: EqualizeConfig | None = None, *, stats: PassStats | None = None,
                   **options) -> PassStats:
    """Cross-layer-equalize every eligible layer pair of ``model`` in place; return what was done.

    ``config`` (or its fields as keyword ``options``) as the ``equalize`` pass takes them.
    Guarantees: the float function is unchanged up to fp32 rounding; only weight and bias
    inputs of the paired layers are replaced (new initializers); no node is added or
    removed. For each pair, r1 (layer 1 output-channel ranges) and r2 (layer 2 input-channel
    ranges) become equal per channel, so their max/min spread drops to about the geometric
    mean of the two (``stats.metrics["pairs"]``: spreads before/after). Needs no data.
    """
    cfg = config or EqualizeConfig(**options)
    iterations, tolerance = cfg.iterations, cfg.tolerance
    stats = stats or PassStats("equalize")
    edits = WeightEdits(model.graph)
    pairs = _find_pairs(model.graph, cfg, edits, stats)
    if not pairs:
        stats.notes.append("no Conv/Gemm/MatMul → (Relu) → Conv/Gemm/MatMul pair to equalize")
        return stats
    before = [(_spread(a.out_ranges(edits)), _spread(b.in_ranges(edits))) for a, b, _ in pairs]
    sweeps = 0
    for sweeps in range(1, iterations + 1):
        worst = 0.0
        for first, second, _ in pairs:
            s = equalization_scales(first.out_ranges(edits), second.in_ranges(edits))
            first.scale_out(edits, 1.0 / s)
            second.scale_in(edits, s)
            worst = max(worst, float(np.max(np.abs(np.log(s)))))
        if worst < np.log1p(tolerance):
            break
    report = []
    for (first, second, via), (b1, b2) in zip(pairs, before):
        a1, a2 = _spread(first.out_ranges(edits)), _spread(second.in_ranges(edits))
        stats.touch(f"{first.label} → {second.label}: equalized{via} "
                    f"(range spread {b1:.3g}→{a1:.3g} and {b2:.3g}→{a2:.3g})")
        report.append({"first": first.label, "second": second.label, "spread_first_before": b1,
                       "spread_first_after": a1, "spread_second_before": b2, "spread_second_after": a2})
    edits.commit()
    stats.metrics["pairs"] = report
    stats.metrics["sweeps"] = sweeps
    return stats


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i) (Nagel et al. 2019); 1 where either range is 0."""
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    live = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[live] = np.sqrt(r1[live] / r2[live])
    return s


def _find_pairs(graph: ir.Graph, cfg: EqualizeConfig, edits: WeightEdits,
                stats: PassStats) -> list[tuple[LinearLayer, LinearLayer, str]]:
    """(layer 1, layer 2, " via Relu…") for every chain cross-layer equalization can rescale."""
    pairs = []
    for node in graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not is_standard(node):
            continue
        first = LinearLayer.of(node)
        why = first if isinstance(first, str) else cfg.why_not(node, first.layer.params)
        found = _following_layer(first, edits) if why is None else why
        if not isinstance(found, str):
            second = found[0]
            unselected = cfg.why_not(second.node, second.layer.params)
            found = f"next layer {second.label}: {unselected}" if unselected else found
        if isinstance(found, str):
            stats.skip(label(node), found)
        else:
            pairs.append((first, *found))
    return pairs


def _following_layer(first: LinearLayer, edits: WeightEdits) -> tuple[LinearLayer, str] | str:
    """The layer reading ``first``'s output through positively homogeneous ops (and the path), or why none."""
    value, path = first.output, []
    while True:
        if value.is_graph_output():
            return "output is a graph output"
        uses = value.uses()
        if len(uses) != 1:
            return f"output '{value.name}' has {len(uses)} consumers"
        node, index = uses[0].node, uses[0].idx
        homogeneous = node.op_type in HOMOGENEOUS or (node.op_type in _CHANNEL_POOLS and first.channel_axis == 1)
        if node.domain in STANDARD and homogeneous and index == 0:
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                return f"{node.op_type} '{node.name}' has a second output in use"
            path.append(node.op_type)
            value = node.outputs[0]
            continue
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in STANDARD:
            return f"followed by {node.op_type} '{node.name}', which is not positively homogeneous per channel"
        if index != 0 or node.attributes.get_int("transA", 0):
            return f"next layer '{node.name}' does not read it as its activation"
        second = LinearLayer.of(node)
        if isinstance(second, str):
            return f"next layer '{node.name}': {second}"
        if second.channel_axis != first.channel_axis:
            return f"next layer '{node.name}' ({node.op_type}) has another channel layout"
        if len(second.in_ranges(edits)) != len(first.out_ranges(edits)):
            return f"next layer '{node.name}' has a different channel count"
        return second, (" via " + "→".join(path) if path else "")


def _spread(ranges: np.ndarray) -> float:
    """max/min of the nonzero per-channel ranges."""
    live = ranges[ranges > 0]
    return float(live.max() / live.min()) if live.size else 1.0
