"""What the int8 passes (``quantize_static``, ``quantize_dynamic``) share: option help texts, the
opset check, the ``reduce_range: auto`` note, embedding quantization (their ``quantize_embeddings``
option, through :func:`onnxcomp.passes.quantize.weights.quantize_gathers`) and how a helper step's
stats are merged into the pass's."""

from __future__ import annotations

import onnx_ir as ir

from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import opset_version
from onnxcomp.passes.base import PassStats
from onnxcomp.passes.quantize.weights import QuantizeWeightsConfig, quantize_gathers
from onnxcomp.qparams import saturating_u8s8

__all__ = ["REDUCE_RANGE_HELP", "EMBEDDINGS_HELP", "quantize_embeddings", "merge_tool_stats", "note_reduce_range",
           "check_opset"]

REDUCE_RANGE_HELP = (
    "7-bit weights ([-63, 63]). auto: on when the CPU running the pass is x86 without VNNI, where ORT's "
    "u8s8 kernels saturate int16 sums of full-range weights (large errors with per-channel weights); "
    "set false for models deployed on VNNI or ARM CPUs")

EMBEDDINGS_HELP = ("Gather on a constant 2-D table (an embedding) -> onnxruntime GatherBlockQuantized, int8 "
                    "with a scale and zero point per embedding_block_size values (error ~0.1 %; per-tensor int8 "
                    "as onnxruntime's quantizer does loses ~3 % on BERT's word table)")


def quantize_embeddings(model: ir.Model, config) -> PassStats:
    """Embedding tables -> GatherBlockQuantized int8 (the ``quantize_embeddings`` option of a
    quantize_static / quantize_dynamic ``config``, with its node selection)."""
    stats = PassStats("quantize_embeddings")
    cfg = QuantizeWeightsConfig(bits=8, block_size=config.embedding_block_size, include=config.include,
                                exclude=config.exclude, min_params=config.min_params)
    before, after = quantize_gathers(model, cfg, stats)
    stats.metrics.update(bytes_before=before, bytes_after=after)
    return stats


def merge_tool_stats(stats: PassStats, tool: PassStats) -> None:
    """A helper step's stats, prefixed with its name, into the pass's stats."""
    stats.notes.append(f"{tool.name}: " + ("; ".join(tool.touched) or "; ".join(tool.notes) or "nothing changed"))
    stats.skipped.extend((what, f"{tool.name}: {why}") for what, why in tool.skipped)
    stats.metrics[tool.name] = tool.metrics


def note_reduce_range(config, stats: PassStats) -> None:
    if config.reduce_range == "auto" and stats.touched:
        stats.notes.append("reduce_range auto: 7-bit weights (x86 CPU without VNNI)" if saturating_u8s8()
                           else "reduce_range auto: full 8-bit weights (this CPU's int8 kernels do not saturate)")


def check_opset(model: ir.Model, pass_name: str) -> None:
    opset = opset_version(model)
    if opset < 13:
        raise OnnxcompError(f"pass '{pass_name}' needs ONNX opset >= 13 (per-channel DequantizeLinear); "
                            f"the model imports opset {opset}: re-export it with a newer opset")
