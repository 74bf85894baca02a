"""Integer quantization numerics shared by every family: scale / zero point (:class:`QParams`)
for activations, weights and biases, the one clip-range search (:func:`shrink_search`, used by
weight clipping, activation ranges and block quantization), and the CPU check behind
``reduce_range: auto`` (decided by the deployment ``target``, never by the CPU running onnxcomp).
Pure numpy: the graph side lives in the passes.

Conventions (what onnxruntime's CPU kernels expect):
- weights: symmetric, zero point 0, int8 in [-127, 127] ([-63, 63] with ``reduce_range``),
  per channel along the output axis or per tensor;
- activations: asymmetric per tensor, uint8 [0, 255] or int8 [-128, 127], range widened to
  contain 0 so that 0 is exact;
- bias: int32, zero point 0, scale = input scale × weight scale (per channel).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "QParams",
    "ACTIVATION_TYPES",
    "activation_params",
    "weight_params",
    "bias_params",
    "bias_qparams",
    "weight_absmax",
    "shrink_search",
    "saturating_u8s8",
    "is_x86",
    "TARGETS",
    "weight_reduce_range",
]

TARGETS = ("any", "vnni", "arm64")  # the CPU a quantized model is meant to run on
ACTIVATION_TYPES = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}
_INT32 = np.iinfo(np.int32)


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point (scalars, or 1-D along ``axis``) of one quantized tensor."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # uint8 / int8 / int32
    axis: int | None = None

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """round(x / scale) + zero point, saturated to the zero point's integer type."""
        info = np.iinfo(self.zero_point.dtype)
        scale, zero = self._broadcast(self.scale, x.ndim), self._broadcast(self.zero_point, x.ndim)
        q = np.round(np.asarray(x, np.float64) / scale) + zero
        return np.clip(q, info.min, info.max).astype(self.zero_point.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """(q - zero point) * scale in float64 (what DequantizeLinear computes)."""
        q = np.asarray(q, np.float64)
        return (q - self._broadcast(self.zero_point, q.ndim)) * self._broadcast(self.scale, q.ndim)

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        """x quantized and dequantized again (float64): what int8 makes of it."""
        return self.dequantize(self.quantize(x))

    def _broadcast(self, a: np.ndarray, ndim: int) -> np.ndarray:
        if self.axis is None or a.ndim == 0:
            return a.astype(np.float64)
        shape = [1] * ndim
        shape[self.axis] = -1
        return a.astype(np.float64).reshape(shape)


def activation_params(lo: float, hi: float, dtype: str = "uint8") -> QParams:
    """Asymmetric per-tensor parameters covering [min(lo, 0), max(hi, 0)] with ``dtype`` steps."""
    np_type, qmin, qmax = ACTIVATION_TYPES[dtype]
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / (qmax - qmin))
    if not scale > 0:  # a constant-zero tensor: any scale is exact
        scale = np.float32(1.0)
    zero = np.clip(np.round(qmin - lo / float(scale)), qmin, qmax)
    return QParams(np.asarray(scale, np.float32), np.asarray(zero, np_type))


def weight_reduce_range(reduce_range: bool | str, target: str = "any") -> bool:
    """Whether weights are 7-bit: ``reduce_range`` itself, or for "auto" whether ``target`` may be
    an x86 CPU without VNNI (``any``: yes; ``vnni`` / ``arm64``: no). The machine running
    onnxcomp plays no part: the same recipe gives the same bytes everywhere."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    return target == "any" if reduce_range == "auto" else bool(reduce_range)


def weight_params(weight: np.ndarray, axis: int | None, *, method: str = "minmax",
                  reduce_range: bool | str = False, target: str = "any") -> tuple[QParams, np.ndarray]:
    """Symmetric int8 parameters (per channel along ``axis``, or per tensor) and the int8 weight.

    ``reduce_range``: 7-bit weights; "auto" = :func:`weight_reduce_range` for ``target``.
    """
    qmax = 63 if weight_reduce_range(reduce_range, target) else 127
    limit = np.asarray(weight_absmax(weight, axis, method, qmax), np.float64)
    scale = np.where(limit > 0, limit / qmax, 1.0).astype(np.float32)
    params = QParams(scale, np.zeros(scale.shape, np.int8), axis if scale.ndim else None)
    q = np.clip(params.quantize(weight), -qmax, qmax).astype(np.int8)
    return params, q


def bias_params(bias: np.ndarray, input_scale: np.ndarray, weight: QParams) -> tuple[QParams, np.ndarray]:
    """int32 bias with scale input_scale × weight scale (per channel when the weight is)."""
    params = bias_qparams(input_scale, weight.scale)
    q = np.round(np.asarray(bias, np.float64) / params.scale.astype(np.float64))
    return params, np.clip(q, _INT32.min, _INT32.max).astype(np.int32)


def bias_qparams(input_scale: np.ndarray, weight_scale: np.ndarray) -> QParams:
    """The int32 parameters of a bias: scale = input scale × weight scale, zero point 0."""
    scale = (np.float32(input_scale) * np.asarray(weight_scale, np.float32)).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, np.int32), 0 if scale.ndim else None)


def weight_absmax(weight: np.ndarray, axis: int | None, method: str = "minmax", qmax: int = 127,
                  candidates: int = 36) -> np.ndarray | float:
    """Per-channel (along ``axis``; None = per tensor) clipping threshold for symmetric weights.

    ``minmax``: max |w|. ``mse``: the fraction of max |w| (grid of ``candidates`` ratios in
    [0.3, 1]) minimising each channel's squared rounding + clipping error with steps of t/qmax.
    """
    w = np.asarray(weight, dtype=np.float32)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    absmax = np.abs(rows).max(axis=1)
    if method == "minmax":
        return absmax.astype(np.float64) if axis is not None else float(absmax[0])
    if method != "mse":
        raise ValueError(f"unknown weight method {method!r}")

    def clipped(ratio: float) -> tuple[np.ndarray, np.ndarray]:
        limit = np.maximum(ratio * absmax, 1e-12)[:, None]
        scale = (limit / qmax).astype(np.float32)
        err = ((rows - np.clip(np.round(rows / scale), -qmax, qmax) * scale) ** 2).sum(axis=1, dtype=np.float64)
        return err, limit[:, 0]

    (best,) = shrink_search(np.linspace(0.3, 1.0, candidates), clipped)
    return best if axis is not None else best[0]


def shrink_search(factors: Iterable[float], evaluate: Callable[[float], tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """The clip-range search: per element, the candidate with the least error.

    ``evaluate(factor)`` returns ``(error, *values)``, arrays of one shape (one element per
    channel, block or tensor); for each element the values of the first factor with the least
    error are kept (ties go to the earlier factor). Returns those values.
    """
    best_err, best = None, None
    for factor in factors:
        err, *values = evaluate(factor)
        err = np.asarray(err, np.float64)
        if best_err is None:
            best_err, best = err, [np.asarray(v) for v in values]
            continue
        better = err < best_err
        best = [np.where(better, v, b) for v, b in zip(values, best)]
        best_err = np.where(better, err, best_err)
    return best


@functools.cache
def saturating_u8s8() -> bool:
    """True on x86 CPUs without VNNI: ORT's u8s8 kernels there sum u8×s8 pairs in int16
    (VPMADDUBSW), which saturates once |w| uses the full int8 range; 7-bit weights avoid it.
    About the CPU running this process: used for notes (validation here vs the target), never to
    choose output bytes."""
    if not is_x86():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # cannot tell: assume the common AVX2-only case
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
