"""Original vs compressed on the same inputs: fidelity metrics and the recipe's gate.

Outputs are compared batch by batch and reduced as they stream. The headline
metrics (cosine, top-1 agreement, KL, accuracy) use the first output; the error
metrics take the worst over all outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.recipe import Gate
from onnxcomp.runtime import open_session, run_batches

__all__ = ["compare", "check_gate"]


def compare(
    original: ir.Model,
    compressed: ir.Model,
    data: Dataset,
    *,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Fidelity of ``compressed`` to ``original`` on ``data`` (accuracy when it has labels)."""
    labels = data.used_labels()
    acc = _Accumulator()
    total = -(-len(data) // (data.fixed_batch or batch_size))
    with open_session(original, what="original model") as s_orig, \
            open_session(compressed, what="compressed model") as s_new:
        names_o = [o.name for o in s_orig.get_outputs()]
        names_n = [o.name for o in s_new.get_outputs()]
        if names_o != names_n:
            raise OnnxcompError(f"the models' outputs differ: {names_o} vs {names_n}")
        start = 0
        batches_o = run_batches(s_orig, data.batches(batch_size))
        batches_n = run_batches(s_new, data.batches(batch_size))
        for index, (out_o, out_n) in enumerate(zip(batches_o, batches_n)):
            for position, (a, b) in enumerate(zip(out_o, out_n)):
                if a.shape != b.shape:
                    raise OnnxcompError(
                        f"output '{names_o[position]}' changed shape: {a.shape} -> {b.shape}"
                    )
                acc.errors(np.asarray(a, np.float64), np.asarray(b, np.float64))
            n = len(out_o[0]) if np.ndim(out_o[0]) else 1
            y = None if labels is None else labels[start : start + n]
            acc.headline(np.asarray(out_o[0], np.float64), np.asarray(out_n[0], np.float64), y)
            start += n
            if progress:
                progress(index + 1, total)
    result = acc.result()
    result.update(samples=start, data=data.source, output=names_o[0])
    return result


def check_gate(gate: Gate, fidelity: dict[str, Any] | None,
               extra: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(failures, unchecked) of ``gate``: it holds when there are no failures.

    A threshold whose metric does not exist for this run (accuracy without labels,
    fused ratio without quantized nodes) is listed as unchecked, not failed.
    ``extra`` carries fused_ratio and size_ratio.
    """
    failures: list[str] = []
    unchecked: list[str] = []
    fid = fidelity or {}

    def need(key: str, value, bound, ok: bool, text: str):
        if bound is None:
            return
        if value is None:
            unchecked.append(f"{key}: not checked, {text}")
        elif not ok:
            failures.append(f"{key}: {value:.6g} does not meet {bound}")

    drop = fid.get("accuracy_drop")
    need("max_accuracy_drop", drop, gate.max_accuracy_drop,
         drop is not None and gate.max_accuracy_drop is not None and drop <= gate.max_accuracy_drop,
         "validation data has no labels")
    for key, metric, higher in (
        ("min_top1_agreement", "top1_agreement", True),
        ("min_cosine", "cosine", True),
        ("max_mean_abs_error", "mean_abs_error", False),
        ("max_abs_error", "max_abs_error", False),
        ("max_kl", "kl", False),
    ):
        bound = getattr(gate, key)
        value = fid.get(metric)
        ok = value is not None and bound is not None and (value >= bound if higher else value <= bound)
        need(key, value, bound, ok, "no validation data")
    fused = extra.get("fused_ratio")
    need("min_fused_ratio", fused, gate.min_fused_ratio,
         fused is not None and gate.min_fused_ratio is not None and fused >= gate.min_fused_ratio,
         "no quantized node to check")
    size = extra.get("size_ratio")
    need("max_size_ratio", size, gate.max_size_ratio,
         size is not None and gate.max_size_ratio is not None and size <= gate.max_size_ratio, "")
    return failures, unchecked


class _Accumulator:
    """Streaming sums for the fidelity metrics."""

    def __init__(self):
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.abs_count = 0
        self.cos_sum = 0.0
        self.rows = 0
        self.agree = 0
        self.kl_sum = 0.0
        self.classes = False
        self.correct_o = 0
        self.correct_n = 0
        self.labelled = 0

    def errors(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size == 0:
            return
        diff = np.abs(a - b)
        self.max_abs = max(self.max_abs, float(np.nanmax(diff)))
        self.abs_sum += float(diff.sum())
        self.abs_count += diff.size

    def headline(self, a: np.ndarray, b: np.ndarray, labels: np.ndarray | None) -> None:
        a2 = a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1)
        b2 = b.reshape(len(b), -1) if b.ndim else b.reshape(1, 1)
        norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
        cos = np.where(norms > 0, (a2 * b2).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
        self.cos_sum += float(cos.sum())
        self.rows += len(a2)
        if a.ndim == 2 and a.shape[1] > 1:
            self.classes = True
            top_o, top_n = a.argmax(axis=1), b.argmax(axis=1)
            self.agree += int((top_o == top_n).sum())
            p = _softmax(a)
            q = _softmax(b)
            self.kl_sum += float((p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum())
            if labels is not None and labels.ndim == 1:
                self.correct_o += int((top_o == labels).sum())
                self.correct_n += int((top_n == labels).sum())
                self.labelled += len(labels)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / max(self.abs_count, 1),
            "cosine": self.cos_sum / max(self.rows, 1),
            "top1_agreement": self.agree / self.rows if self.classes and self.rows else None,
            "kl": self.kl_sum / self.rows if self.classes and self.rows else None,
            "accuracy_original": None,
            "accuracy_compressed": None,
            "accuracy_drop": None,
        }
        if self.labelled:
            out["accuracy_original"] = self.correct_o / self.labelled
            out["accuracy_compressed"] = self.correct_n / self.labelled
            out["accuracy_drop"] = out["accuracy_original"] - out["accuracy_compressed"]
        return out


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
