"""Block-wise weight quantization numerics for onnxruntime's MatMulNBits / GatherBlockQuantized.

A weight matrix ``W [N, K]`` (one row per output feature) is split, row by row, into blocks of
``block_size`` consecutive K elements (the last block padded with the zero point). A block holds codes
``q`` in ``[0, 2^bits)`` and dequantizes to ``(q - zero_point) · scale``. Symmetric blocks use ORT's
default zero point ``2^(bits-1)`` and the scale ``-extreme / 2^(bits-1)``: the signed largest-magnitude
value maps to code 0 exactly, so all ``2^bits`` codes are usable (as ORT's own quantizer does).
Asymmetric blocks map ``[min(w, 0), max(w, 0)]`` onto the codes.

- :func:`quantize_rtn`: round to nearest.
- :func:`quantize_gptq`: GPTQ (Frantar et al., 2023): columns are quantized one at a time and each
  column's rounding error is spread over the columns not yet quantized, through the upper Cholesky
  factor of the damped inverse Hessian ``H = XᵀX / n`` of the layer's inputs; updates are applied
  lazily in batches of 128 columns. ``act_order`` visits columns by decreasing ``diag(H)``.
- :func:`gptq_round`: the same error feedback with fixed per-row scales and symmetric signed codes
  (zero point 0): per-channel int8 weights of a QDQ graph.
- :func:`pack_bits`: codes -> bytes in the MatMulNBits layout (first code in the lowest bits).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.linalg

from onnxcomp.qparams import shrink_search

__all__ = ["BlockQuant", "quantize_rtn", "quantize_gptq", "gptq_round", "block_params", "pack_bits", "relative_error"]

_RTN_CHUNK = 1 << 22  # weights quantized at once by quantize_rtn (float64 temporaries of 32 MB each)
_GPTQ_LAZY_COLUMNS = 128  # columns updated together (a multiple of every allowed block size)
_SHRINK_GRID = tuple(np.round(np.arange(1.0, 0.49, -0.025), 3))  # range factors tried by search


@dataclasses.dataclass(frozen=True)
class BlockQuant:
    """Block-quantized ``[N, K]`` weights: ``codes [N, n_blocks·block_size]`` (uint8, padding = zero
    point), ``scales [N, n_blocks]`` (the weight dtype) and ``zero_points [N, n_blocks]`` (uint8)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        """The ``[N, K]`` float32 weights MatMulNBits computes with: ``(codes - zp) · scale`` per block."""
        n, blocks = self.scales.shape
        q = self.codes.reshape(n, blocks, self.block_size).astype(np.float32)
        zp = self.zero_points[:, :, None].astype(np.float32)
        w = (q - zp) * self.scales.astype(np.float32)[:, :, None]
        return w.reshape(n, -1)[:, : self.k]


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool, dtype=np.float32, *,
                 search: bool = False) -> BlockQuant:
    """Round-to-nearest block quantization of ``w [N, K]``; scales are stored (and used) in ``dtype``.
    ``search``: per-block range search (see :func:`block_params`). Rows are quantized in chunks of
    about ``_RTN_CHUNK`` weights (blocks are independent: the same result, bounded temporaries)."""
    rows = max(1, _RTN_CHUNK // max(w.shape[1], 1))
    if w.shape[0] > rows:
        parts = [quantize_rtn(w[i : i + rows], bits, block_size, symmetric, dtype, search=search)
                 for i in range(0, w.shape[0], rows)]
        return BlockQuant(np.concatenate([q.codes for q in parts]), np.concatenate([q.scales for q in parts]),
                          np.concatenate([q.zero_points for q in parts]), bits, block_size, w.shape[1])
    blocks = _pad_blocks(np.asarray(w, np.float64), block_size)
    scale, zp = block_params(blocks, bits, symmetric, dtype, search=search)
    codes = _round(blocks, scale[:, :, None], zp[:, :, None], bits)
    return BlockQuant(codes.reshape(w.shape[0], -1), scale.astype(dtype), zp, bits, block_size, w.shape[1])


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool,
                  dtype=np.float32, *, damp: float = 0.01, act_order: bool = False,
                  search: bool = False) -> BlockQuant:
    """GPTQ block quantization of ``w [N, K]`` minimising ``tr(ΔW H ΔWᵀ)`` greedily, column by column.

    ``hessian`` is ``XᵀX / n`` over the layer's inputs (``[K, K]``). Inputs never seen (zero
    diagonal) get a unit diagonal so the factorisation exists. Block scales are computed when a
    block's first column is reached, from the error-updated weights (with ``act_order``: from the
    original weights, before any update). Deterministic for the same inputs.
    """
    n, k = w.shape
    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    n_blocks = -(-k // block_size)
    scale = np.zeros((n_blocks, n), np.float64)
    zp = np.zeros((n_blocks, n), np.uint8)
    ready = np.zeros(n_blocks, bool)
    if act_order:
        s, z = block_params(_pad_blocks(w, block_size), bits, symmetric, dtype, search=search)
        scale[:], zp[:], ready[:] = s.T, z.T, True
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = _upper_cholesky_of_inverse(h)
    wt = w.T[order]  # [K, N] in visiting order: row i is the i-th column quantized
    codes = np.zeros((k, n), np.uint8)
    for start in range(0, k, _GPTQ_LAZY_COLUMNS):
        stop = min(start + _GPTQ_LAZY_COLUMNS, k)
        errors = np.zeros((stop - start, n))
        for i in range(start, stop):
            col = order[i]
            b = col // block_size
            if not ready[b]:  # columns are in natural order here: the block lies in this lazy batch
                block = _pad_blocks(wt[i : i + block_size].T, block_size)
                s, z = block_params(block, bits, symmetric, dtype, search=search)
                scale[b], zp[b], ready[b] = s[:, 0], z[:, 0], True
            q = _round(wt[i], scale[b], zp[b], bits)
            codes[col] = q
            err = (wt[i] - (q - zp[b].astype(np.float64)) * scale[b]) / hinv[i, i]
            wt[i:stop] -= hinv[i, i:stop, None] * err
            errors[i - start] = err
        wt[stop:] -= hinv[start:stop, stop:].T @ errors
    padded = np.zeros((n, n_blocks * block_size), np.uint8)
    padded[:, :k] = codes.T
    padded[:, k:] = zp[-1][:, None]
    return BlockQuant(padded, scale.T.astype(dtype), np.ascontiguousarray(zp.T), bits, block_size, k)


def gptq_round(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, qmax: int, *,
               damp: float = 0.01) -> np.ndarray:
    """Signed codes ``q [N, K]`` in ``[-qmax, qmax]`` for ``w [N, K]`` with the fixed per-row
    ``scale [N]`` (zero point 0; ``w ≈ q · scale``), chosen by GPTQ's error feedback instead of
    rounding each weight to nearest: column k is rounded, and its error, divided by the inverse
    Hessian's diagonal, is spread over the columns not yet rounded (``H = XᵀX / n`` of the layer's
    inputs, ``[K, K]``; damped by ``damp`` × its mean diagonal; unseen inputs get a unit diagonal).
    Reduces ``tr(ΔW H ΔWᵀ)``, the layer's output error on the calibration inputs, not ``|ΔW|``.
    Deterministic for the same inputs.
    """
    n, k = w.shape
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    hinv = _upper_cholesky_of_inverse(h)
    step = np.asarray(scale, np.float64)
    step = np.where(step > 0, step, 1.0)
    wt = np.array(w, np.float64).T  # [K, N]: row i is input column i
    codes = np.zeros((k, n), np.int8)
    for start in range(0, k, _GPTQ_LAZY_COLUMNS):
        stop = min(start + _GPTQ_LAZY_COLUMNS, k)
        errors = np.zeros((stop - start, n))
        for i in range(start, stop):
            q = np.clip(np.round(wt[i] / step), -qmax, qmax)
            codes[i] = q
            err = (wt[i] - q * step) / hinv[i, i]
            wt[i:stop] -= hinv[i, i:stop, None] * err
            errors[i - start] = err
        wt[stop:] -= hinv[start:stop, stop:].T @ errors
    return np.ascontiguousarray(codes.T)


def block_params(blocks: np.ndarray, bits: int, symmetric: bool, dtype=np.float32, *,
                 search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float64 holding ``dtype`` values) and zero point (uint8) of each block ``[..., block_size]``.

    With ``search`` the range is also shrunk by each factor of ``_SHRINK_GRID`` (1 down to 0.5) and,
    per block, the factor with the least squared rounding error is kept (:func:`onnxcomp.qparams.shrink_search`).
    """
    if not search:
        return _range_params(blocks, bits, symmetric, dtype, 1.0)

    def shrunk(shrink: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale, zp = _range_params(blocks, bits, symmetric, dtype, shrink)
        q = _round(blocks, scale[..., None], zp[..., None], bits)
        err = ((blocks - (q.astype(np.float64) - zp[..., None]) * scale[..., None]) ** 2).sum(axis=-1)
        return err, scale, zp

    scale, zp = shrink_search(_SHRINK_GRID, shrunk)
    return scale, zp


def _range_params(blocks: np.ndarray, bits: int, symmetric: bool, dtype,
                  shrink: float) -> tuple[np.ndarray, np.ndarray]:
    levels = (1 << bits) - 1
    if symmetric:
        idx = np.argmax(np.abs(blocks), axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0] * shrink
        scale = extreme / -float(1 << (bits - 1))
        zp = np.full(scale.shape, 1 << (bits - 1), np.uint8)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0) * shrink
        hi = np.maximum(blocks.max(axis=-1), 0.0) * shrink
        scale = (hi - lo) / levels
        safe = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(-lo / safe), 0, levels).astype(np.uint8)
    return scale.astype(dtype).astype(np.float64), zp


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-wide codes along the last axis into bytes, first code in the lowest bits
    (ORT's MatMulNBits/GatherBlockQuantized layout); the last axis is zero-padded to whole bytes."""
    per_byte = 8 // bits
    codes = np.asarray(codes, np.uint8)
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= grouped[..., i] << np.uint8(bits * i)
    return packed


def relative_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray | None = None) -> float:
    """``|ΔW|²/|W|²``, or with ``hessian`` the output error on its inputs ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)``."""
    w = np.asarray(w, np.float64)
    dw = np.asarray(w_hat, np.float64) - w
    if hessian is None:
        return float((dw * dw).sum() / max((w * w).sum(), 1e-30))
    return float(((dw @ hessian) * dw).sum() / max(((w @ hessian) * w).sum(), 1e-30))


def _round(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    safe = np.where(scale == 0, 1.0, scale)
    q = np.where(scale == 0, 0.0, np.round(x / safe)) + zp
    return np.clip(q, 0, (1 << bits) - 1).astype(np.uint8)


def _pad_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w [N, K]`` zero-padded to whole blocks, as ``[N, n_blocks, block_size]``."""
    pad = (-w.shape[1]) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((w.shape[0], pad))], axis=1)
    return w.reshape(w.shape[0], -1, block_size)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper-triangular U with ``H⁻¹ = UᵀU``: with J the order reversal and ``JHJ = LLᵀ``,
    ``H = (JLJ)(JLJ)ᵀ`` and so ``U = (JLJ)⁻¹ = J L⁻¹ J`` (one Cholesky, one triangular inverse)."""
    lower = scipy.linalg.cholesky(h[::-1, ::-1], lower=True)
    inverse, info = scipy.linalg.lapack.dtrtri(lower, lower=1)
    if info:
        raise np.linalg.LinAlgError(f"triangular inverse failed (info={info})")
    return np.ascontiguousarray(inverse[::-1, ::-1])
