"""The sensitivity fallback of ``quantize_static`` (``sensitivity: true``): mixed precision.

:func:`sensitivity_search` quantizes, measures the recipe's gate on calibration data and, while
it fails, returns layers to float: each quantized node's harm is measured by quantizing
everything but that node (leave-one-out), then the smallest most-harmful-first prefix meeting
the gate is found by doubling and bisection. The measuring is the run's: the pass gets a
:class:`~onnxcomp.passes.base.FidelityEvaluator` through its context (the pipeline gives it one
built from the recipe's gate), so this module does not import the validator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes.base import FidelityEvaluator

__all__ = ["sensitivity_search", "SensitivityReport"]


@dataclasses.dataclass
class SensitivityReport:
    """What :func:`sensitivity_search` measured and chose."""

    target: dict[str, float]
    samples: int
    kept_float: list[str]
    harm: list[tuple[str, float]]  # node -> loss removed by keeping it float alone, most harmful first
    fidelity_all: dict[str, Any]
    fidelity_chosen: dict[str, Any]
    met: bool
    trials: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        keys = ("cosine", "top1_agreement", "kl", "mean_abs_error", "max_abs_error", "accuracy_drop")
        return {"target": self.target, "samples": self.samples, "met": self.met, "kept_float": self.kept_float,
                "harm": [{"node": n, "loss_removed": round(h, 6)} for n, h in self.harm],
                "fidelity_all_quantized": {k: self.fidelity_all.get(k) for k in keys},
                "fidelity_chosen": {k: self.fidelity_chosen.get(k) for k in keys},
                "trials": self.trials, "seconds": round(self.seconds, 2)}


def sensitivity_search(base: ir.Model, data: Dataset, judge: FidelityEvaluator | None,
                       quantize: Callable[[ir.Model, Mapping[str, str], bool], list[str]], *,
                       batch_size: int = 32) -> tuple[Mapping[str, str], SensitivityReport]:
    """Which nodes of the float model ``base`` to keep float so that its quantized copy meets
    ``judge``'s thresholds on ``data``.

    ``quantize(model, keep_float, final)`` quantizes ``model`` in place keeping the named nodes
    float and returns the names of the nodes it quantized; ``final`` False allows a cheaper
    rewrite (no bias correction) for the leave-one-out ranking. ``base`` is not changed.
    """
    if judge is None or not judge.thresholds:
        raise OnnxcompError("quantize_static.sensitivity: needs a fidelity threshold in the recipe's gate "
                            "(min_cosine, max_accuracy_drop, min_top1_agreement, max_kl, max_mean_abs_error "
                            "or max_abs_error) to aim at")
    start = time.perf_counter()
    trials = 0
    reference = judge.reference(base, data, batch_size)

    def evaluate(keep: Mapping[str, str], final: bool = True) -> tuple[dict[str, Any], list[str]]:
        nonlocal trials
        trials += 1
        model = base.clone()
        quantized = quantize(model, keep, final)
        return judge.measure(base, model, data, reference, batch_size), quantized

    fid_all, units = evaluate({})
    failures, unchecked = judge.failures(fid_all)
    if unchecked:
        raise OnnxcompError(f"quantize_static.sensitivity: cannot measure the gate on the calibration data "
                            f"({unchecked[0]}): give the calibration .npz a 'label' array or use min_cosine")
    report = SensitivityReport(dict(judge.target), len(data), [], [], fid_all, fid_all, not failures, trials, 0.0)
    if not failures:
        report.seconds = time.perf_counter() - start
        return {}, report
    loss_all = judge.loss(fid_all)
    harm = []
    for unit in units:  # leave-one-out: how much of the loss this node alone causes
        fid, _ = evaluate({unit: "sensitivity"}, final=False)
        harm.append((unit, loss_all - judge.loss(fid)))
    order = [n for n, _ in sorted(harm, key=lambda item: -item[1])]

    def keep_of(k: int) -> dict[str, str]:
        return {n: f"sensitivity: kept float (harm rank {i + 1} of {len(order)})" for i, n in enumerate(order[:k])}

    results: dict[int, dict[str, Any]] = {}

    def holds(k: int) -> bool:
        if k not in results:
            results[k] = evaluate(keep_of(k))[0]
        return not judge.failures(results[k])[0]

    low, high = 0, 1  # low fails; find the smallest high that holds
    while high < len(order) and not holds(high):
        low, high = high, min(2 * high, len(order))
    if high >= len(order) and not holds(len(order)):
        high = len(order)  # even all float fails (the gate cannot be met by quantize_static): keep all float
    while high - low > 1:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid
    chosen = results.get(high) or evaluate(keep_of(high))[0]
    report.kept_float = order[:high]
    report.harm = sorted(harm, key=lambda item: -item[1])
    report.fidelity_chosen = chosen
    report.met = not judge.failures(chosen)[0]
    report.trials = trials
    report.seconds = time.perf_counter() - start
    return keep_of(high), report
