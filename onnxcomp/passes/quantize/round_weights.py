"""``round_weights``: what integer weights of a given width would cost, before choosing a quantizer.

The example pass of docs/writing-a-pass.md (config, node selection, layer view, stats).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxcomp.graph import NodeSelection, find_layers
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register
from onnxcomp.qparams import QParams, weight_absmax

__all__ = ["RoundWeights", "RoundWeightsConfig"]


class RoundWeightsConfig(PassConfig, NodeSelection):
    bits: int = Field(8, ge=2, le=16, description="signed integer width the weights are rounded to")
    per_channel: bool = Field(True, description="one scale per output channel (else one per weight)")


@register
class RoundWeights(CompressionPass):
    """Round every selected MatMul/Gemm/Conv weight to ``bits``-bit symmetric integers times a scale
    (max |w| / (2^(bits-1) - 1), per output channel or per weight) and store it as float again.

    Ops and storage stay float: the run's fidelity metrics show what weight rounding alone costs.
    A weight shared by several layers gets its own rounded copy per layer (the stats say so).
    """

    name = "round_weights"
    summary = "simulate b-bit integer weights: round each layer's weight, keep float ops and storage"
    Config = RoundWeightsConfig

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: RoundWeightsConfig = self.config
        layers, skipped = find_layers(model.graph, cfg)  # MatMul/Gemm/Conv with a constant weight
        for what, why in skipped:
            stats.skip(what, why)
        qmax = 2 ** (cfg.bits - 1) - 1
        for layer in layers:
            w = layer.weight()  # logical layout: axis 0 = output channel, whatever the storage
            axis = 0 if cfg.per_channel else None
            limit = np.asarray(weight_absmax(w, axis), np.float64)
            scale = np.where(limit > 0, limit / qmax, 1.0).astype(np.float32)
            rounded = QParams(scale, np.zeros(scale.shape, np.int32), axis).fake_quant(w)
            how = layer.set_weight(rounded)  # back into the storage layout (Gemm transB/alpha, Transpose)
            error = np.linalg.norm(rounded - w) / max(float(np.linalg.norm(w)), 1e-30)
            stats.touch(f"{layer.label}: {cfg.bits}-bit, rel. error {error:.2e} ({how})")
        stats.metrics["bits"] = cfg.bits
