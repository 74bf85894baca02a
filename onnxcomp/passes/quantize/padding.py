"""Calibration without padding: the ``padding_mask`` option of the passes that calibrate on
transformer inputs (``quantize_static`` for activation ranges, ``quantize_weights`` for GPTQ's
Hessians). Padding is most of a padded text batch (70 % of MiniLM's calibration positions); its
activations widen ranges and bias ``XᵀX`` toward inputs the model's real positions never see."""

from __future__ import annotations

import onnx_ir as ir

from onnxcomp.data import Dataset, model_inputs, padding_mask_input
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes.base import PassStats

__all__ = ["PADDING_MASK_HELP", "without_padding"]

PADDING_MASK_HELP = (
    "a padding mask input [batch, seq] ('auto': the one integer rank-2 input named *mask* with a dynamic seq "
    "axis): calibrate on batches of similar lengths, each cut after the last position any of its rows marks, "
    "so padding-only columns neither skew the statistics nor cost run time (for models whose real positions "
    "ignore padding, like BERT's attention_mask)")


def without_padding(model: ir.Model, data: Dataset, padding_mask: str | None, stats: PassStats,
                    option: str) -> Dataset:
    """``data`` batched by length and cut after the padding (:meth:`Dataset.by_length`) when
    ``padding_mask`` asks for it; ``option`` names the option in errors (``pass.padding_mask``).
    A named mask the model lacks is an error; ``auto`` without a mask input leaves ``data`` as it is
    (with a note)."""
    if padding_mask is None:
        return data
    mask = padding_mask_input(model) if padding_mask == "auto" else padding_mask
    if padding_mask != "auto" and mask not in {s.name for s in model_inputs(model)}:
        raise OnnxcompError(f"{option}: the model has no input '{mask}' "
                            f"(inputs: {', '.join(s.name for s in model_inputs(model))}; or 'auto')")
    trimmed = data.by_length(mask) if mask is not None else data
    if trimmed is data:
        stats.notes.append(f"padding_mask {padding_mask}: no rank-2 mask input in the model and data "
                           "(calibrating on full-width batches)")
        return data
    full = sum(v.shape[1] * len(v) for v in [data.inputs[mask]])
    kept = sum(feed[mask].shape[1] * len(feed[mask]) for feed in trimmed.batches(32))
    stats.metrics["calib_positions"] = {"mask": mask, "full_width": int(full), "after_trim_at_batch_32": int(kept)}
    stats.notes.append(f"calibration batched by '{mask}' length: {kept:,} of {full:,} positions run (batch 32)")
    return trimmed
