"""The gate: thresholds a compressed model must meet against its original (the judge side;
checked by :func:`onnxcomp.validate.check_gate`). Only pydantic here, so recipes load fast."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Gate", "FIDELITY_KEYS"]

# the thresholds measured on model outputs (the rest: size and int8 fusion of the result)
FIDELITY_KEYS = ("max_accuracy_drop", "min_top1_agreement", "min_cosine", "max_mean_abs_error",
                 "max_abs_error", "max_kl")


class Gate(BaseModel):
    """Thresholds the compressed model must meet against the original.

    ``output`` and ``mask_input`` are not thresholds: they say what the fidelity metrics
    measure (see :func:`onnxcomp.validate.compare`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="accuracy points (0-1)")
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    min_cosine: float | None = Field(None, ge=-1, le=1)
    max_mean_abs_error: float | None = Field(None, ge=0)
    max_abs_error: float | None = Field(None, ge=0)
    max_kl: float | None = Field(None, ge=0)
    min_fused_ratio: float | None = Field(None, ge=0, le=1, description="int8 kernels / quantized nodes")
    keep_fusions: bool | None = Field(None, description="true: every float fusion onnxruntime makes on the "
                                      "original (attention, LayerNorm, SkipLayerNorm, Gelu) is still made on the "
                                      "compressed model (report quantization.float_fusions)")
    max_size_ratio: float | None = Field(None, gt=0)
    max_latency_ratio: float | None = Field(None, gt=0, description="compressed / original median latency on "
                                            "the CPU running the check (not checked with latency_runs 0)")
    output: str | None = Field(None, min_length=1, description="model output the headline metrics use "
                               "(default: the first output)")
    mask_input: str | None = Field(None, min_length=1, description="model input whose 0 entries mark padding "
                                   "left out of the metrics, or 'auto' (default: no mask)")

    def thresholds(self) -> dict[str, Any]:
        """The thresholds that are set (``output`` / ``mask_input`` are not thresholds)."""
        return self.model_dump(exclude_none=True, exclude={"output", "mask_input"})
