"""The sensitivity fallback of ``quantize_static`` (``sensitivity: true``): mixed precision.

:func:`sensitivity_search` quantizes, measures the recipe's gate on calibration data and, while
it fails, returns layers to float: the quantized nodes are ranked most harmful first, then the
smallest prefix of that ranking meeting the gate is found by doubling and bisection. Two
rankings: ``sqnr`` (one pass: the float and the all-quantized model run once side by side, each
node scored by the noise it adds — its output's noise-to-signal ratio minus that of its
float input before quantization) or ``leave_one_out`` (each node's harm measured on the gate's
metric by quantizing everything but that node: one quantize and one run per node). The measuring is the run's: the pass gets a
:class:`~onnxcomp.passes.base.FidelityEvaluator` through its context (the pipeline gives it one
built from the recipe's gate), so this module does not import the validator.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.passes.base import FidelityEvaluator
from onnxcomp.runtime import open_session, run_batches, session_options

__all__ = ["sensitivity_search", "SensitivityReport"]


@dataclasses.dataclass
class SensitivityReport:
    """What :func:`sensitivity_search` measured and chose."""

    target: dict[str, float]
    samples: int
    kept_float: list[str]
    harm: list[tuple[str, float]]  # node -> its score (see ranking), most harmful first
    fidelity_all: dict[str, Any]
    fidelity_chosen: dict[str, Any]
    met: bool
    trials: int
    seconds: float
    ranking: str = "leave_one_out"  # sqnr: score = noise added; leave_one_out: score = loss removed by keeping it float

    def to_dict(self) -> dict[str, Any]:
        keys = ("cosine", "top1_agreement", "kl", "mean_abs_error", "max_abs_error", "accuracy_drop")
        score = "loss_removed" if self.ranking == "leave_one_out" else "added_noise"
        return {"target": self.target, "samples": self.samples, "met": self.met, "kept_float": self.kept_float,
                "ranking": self.ranking, "harm": [{"node": n, score: round(h, 6)} for n, h in self.harm],
                "fidelity_all_quantized": {k: self.fidelity_all.get(k) for k in keys},
                "fidelity_chosen": {k: self.fidelity_chosen.get(k) for k in keys},
                "trials": self.trials, "seconds": round(self.seconds, 2)}


def sensitivity_search(base: ir.Model, data: Dataset, judge: FidelityEvaluator | None,
                       quantize: Callable[[ir.Model, Mapping[str, str], bool], list[str]], *,
                       batch_size: int = 32, ranking: Literal["sqnr", "leave_one_out"] = "leave_one_out",
                       ) -> tuple[Mapping[str, str], SensitivityReport]:
    """Which nodes of the float model ``base`` to keep float so that its quantized copy meets
    ``judge``'s thresholds on ``data``.

    ``quantize(model, keep_float, final)`` quantizes ``model`` in place keeping the named nodes
    float and returns the names of the nodes it quantized; ``final`` False allows a cheaper
    rewrite (no bias correction) for the ranking models. ``base`` is not changed. ``ranking``:
    how nodes are ordered (module docstring); whichever, the chosen set meets the gate when
    any prefix of the ranking does, and is the smallest such prefix found by bisection.
    """
    if judge is None or not judge.thresholds:
        raise OnnxcompError("quantize_static.sensitivity: needs a fidelity threshold in the recipe's gate "
                            "(min_cosine, max_accuracy_drop, min_top1_agreement, max_kl, max_mean_abs_error "
                            "or max_abs_error) to aim at")
    start = time.perf_counter()
    trials = 0
    reference = judge.reference(base, data, batch_size)

    def evaluate(keep: Mapping[str, str], final: bool = True) -> tuple[dict[str, Any], list[str], ir.Model]:
        nonlocal trials
        trials += 1
        model = base.clone()
        quantized = quantize(model, keep, final)
        return judge.measure(base, model, data, reference, batch_size), quantized, model

    fid_all, units, all_quantized = evaluate({})
    failures, unchecked = judge.failures(fid_all)
    if len(unchecked) >= len(judge.thresholds):  # some thresholds measurable (min_cosine without labels): aim at those
        raise OnnxcompError(f"quantize_static.sensitivity: cannot measure the gate on the calibration data "
                            f"({unchecked[0]}): give the calibration .npz a 'label' array or use min_cosine")
    report = SensitivityReport(dict(judge.target), len(data), [], [], fid_all, fid_all, not failures, trials, 0.0,
                               ranking)
    if not failures:
        report.seconds = time.perf_counter() - start
        return {}, report
    if ranking == "sqnr":
        float_twin = base.clone()  # prepared like the quantized model (same node names), nothing quantized
        quantize(float_twin, {u: "sensitivity: float twin" for u in units}, False)
        harm = added_noise(float_twin, all_quantized, units, data, batch_size)
    else:
        loss_all = judge.loss(fid_all)
        harm = []
        for unit in units:  # leave-one-out: how much of the loss this node alone causes
            fid = evaluate({unit: "sensitivity"}, final=False)[0]
            harm.append((unit, loss_all - judge.loss(fid)))
    del all_quantized
    order = [n for n, _ in sorted(harm, key=lambda item: -item[1])]  # stable: ties keep graph order

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


def added_noise(float_model: ir.Model, quantized: ir.Model, units: list[str], data: Dataset,
                batch_size: int = 32) -> list[tuple[str, float]]:
    """Per quantized node (``units``, named alike in both models): the noise-to-signal ratio of its
    output in ``quantized`` against ``float_model`` minus that of the float tensor its first
    input is quantized from (the noise it receives), from one run of each model on ``data``.
    Nodes missing from either model score 0."""
    fnodes = {n.name: n for n in float_model.graph}
    qnodes = {n.name: n for n in quantized.graph}
    # unit -> (float name, quantized name, clip) of its output and of the float tensor its input is quantized from
    pairs: dict[str, tuple[tuple, tuple | None]] = {}
    for unit in units:
        f, q = fnodes.get(unit), qnodes.get(unit)
        if f is None or q is None or not f.outputs[0].name or not q.outputs[0].name:
            continue
        src, clip = q.inputs[0], None
        while src is not None and src.producer() is not None and \
                src.producer().op_type in ("DequantizeLinear", "QuantizeLinear"):
            if src.producer().op_type == "QuantizeLinear":
                clip = _representable(src.producer()) if clip is None else clip
            src = src.producer().inputs[0]
        inputs = (f.inputs[0].name, src.name, clip) if src is not None and f.inputs[0] is not None else None
        pairs[unit] = ((f.outputs[0].name, q.outputs[0].name, None), inputs)
    fwant = sorted({p[0] for out, inp in pairs.values() for p in (out, inp) if p})
    qwant = sorted({p[1] for out, inp in pairs.values() for p in (out, inp) if p})
    noise = {k: [0.0, 0.0] for out, inp in pairs.values() for k in (out, inp) if k}
    fwant_, fvals = _probe(float_model, fwant)
    qwant_, qvals = _probe(quantized, qwant)
    opts = session_options(level="basic", spinning=False)
    with open_session(fvals, opts, what="float model") as fs, open_session(qvals, opts, what="quantized model") as qs:
        for feed in data.batches(batch_size):
            fout = dict(zip(fwant_, next(run_batches(fs, [_inputs(fs, feed)], fwant_)))) | \
                _fed(fs, feed, fwant)
            qout = dict(zip(qwant_, next(run_batches(qs, [_inputs(qs, feed)], qwant_)))) | \
                _fed(qs, feed, qwant)
            for (a, b, clip), acc in noise.items():
                if a not in fout or b not in qout:
                    acc[0] = np.nan
                    continue
                x, y = np.asarray(fout[a], np.float32), np.asarray(qout[b], np.float32)
                if clip is not None:  # a Relu folded into the QuantizeLinear, saturation: as quantized
                    y = np.clip(y, *clip)
                if x.shape != y.shape:
                    acc[0] = np.nan
                    continue
                acc[0] += float(np.square(y - x, dtype=np.float64).sum())
                acc[1] += float(np.square(x, dtype=np.float64).sum())

    def nsr(key) -> float:
        if key is None or key not in noise or not np.isfinite(noise[key][0]):
            return 0.0
        return noise[key][0] / max(noise[key][1], 1e-30)

    return [(u, nsr(pairs[u][0]) - nsr(pairs[u][1]) if u in pairs else 0.0) for u in units]


def _representable(q: ir.Node) -> tuple[float, float] | None:
    """The float range a QuantizeLinear with constant per-tensor parameters does not saturate."""
    scale = q.inputs[1].const_value if len(q.inputs) > 1 and q.inputs[1] is not None else None
    zero = q.inputs[2].const_value if len(q.inputs) > 2 and q.inputs[2] is not None else None
    if scale is None or zero is None or scale.numpy().size != 1:
        return None
    info = np.iinfo(zero.numpy().dtype)
    s, z = float(scale.numpy().reshape(())), float(zero.numpy().reshape(()))
    return (info.min - z) * s, (info.max - z) * s


def _probe(model: ir.Model, names: list[str]) -> tuple[list[str], ir.Model]:
    """A copy of ``model`` with the named node outputs added as graph outputs; the names it
    fetches (graph inputs are read from the feed instead)."""
    from onnxcomp.calibrate import tensor_values

    probe = model.clone()
    values = tensor_values(probe)
    existing = {v.name for v in probe.graph.outputs}
    fetch = []
    for name in names:
        value = values.get(name)
        if value is None:
            continue
        if value.is_graph_input():
            continue
        fetch.append(name)
        if name not in existing:
            if value.type is None:
                value.type = ir.TensorType(ir.DataType.FLOAT)
            probe.graph.outputs.append(value)
            existing.add(name)
    return fetch, probe


def _inputs(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def _fed(session, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    return {n: feed[n] for n in names if n in feed}
