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
from onnxcomp.qparams import saturating_u8s8, weight_reduce_range

__all__ = ["REDUCE_RANGE_HELP", "TARGET_HELP", "TARGET_KEY", "EMBEDDINGS_HELP", "quantize_embeddings",
           "merge_tool_stats", "note_reduce_range", "record_target", "check_opset"]

TARGET_KEY = "onnxcomp.target"  # model metadata_props: the CPU the int8 weights were made for

REDUCE_RANGE_HELP = (
    "7-bit weights ([-63, 63]). auto: decided by target (on for 'any', off for 'vnni' / 'arm64'), never by "
    "the CPU running onnxcomp")

TARGET_HELP = (
    "the CPU the model will run on. any: safe on every x86 CPU — 7-bit weights (reduce_range auto), because "
    "ORT's u8s8 kernels on x86 without VNNI sum u8xs8 pairs in int16 and saturate with full-range weights; "
    "vnni: x86 with AVX512-VNNI / AVX-VNNI, full 8-bit weights; arm64: full 8-bit weights. Recorded in the "
    "model's metadata_props ('onnxcomp.target') and the report")

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
    """Say which weight range the target gave, and when validation on this CPU is not the target's."""
    if not stats.touched:
        return
    seven = weight_reduce_range(config.reduce_range, config.target)
    why = f"target {config.target}" if config.reduce_range == "auto" else f"reduce_range {config.reduce_range}"
    stats.notes.append(f"{'7-bit' if seven else 'full 8-bit'} weights ({why})")
    stats.metrics.update(target=config.target, weight_bits=7 if seven else 8)
    if not seven and saturating_u8s8():
        stats.notes.append("this CPU is x86 without VNNI: its u8s8 kernels saturate with full 8-bit weights, so the "
                           "errors measured here are larger than on the target CPU")


def record_target(model: ir.Model, config) -> None:
    """The deployment target and weight range in the model's metadata_props."""
    seven = weight_reduce_range(config.reduce_range, config.target)
    model.metadata_props[TARGET_KEY] = config.target
    model.metadata_props["onnxcomp.weight_bits"] = "7" if seven else "8"


def check_opset(model: ir.Model, pass_name: str) -> None:
    opset = opset_version(model)
    if opset < 13:
        raise OnnxcompError(f"pass '{pass_name}' needs ONNX opset >= 13 (per-channel DequantizeLinear); "
                            f"the model imports opset {opset}: re-export it with a newer opset")
