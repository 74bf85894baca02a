"""The sensitivity fallback of ``quantize_static`` (``sensitivity: true``): mixed precision.

:func:`sensitivity_search` quantizes, measures the recipe's gate on calibration data and, while
it fails, returns layers to float: the quantized nodes are ranked most harmful first, then the
smallest prefix of that ranking meeting the gate is found by doubling and bisection.

Rankings (``sensitivity_ranking``):

- ``leave_one_out``: each node's harm is the gate's loss removed by keeping that node alone
  float (one run per node);
- ``sqnr``: one run of the float and the all-quantized model side by side, each node scored by
  the noise it adds (its output's noise-to-signal ratio minus that of the float tensor its input
  is quantized from);
- ``grouped_loo``: leave-one-out on groups of about √n consecutive nodes, then on each node of
  the most harmful third of the groups (:func:`grouped_loss_removed`): about 2√n runs instead of n;
- ``sqnr_loo``: ``sqnr``, then the top ``2k`` of it (``k``: the prefix meeting the gate by
  ``sqnr``) re-ranked by leave-one-out — the noise a node adds is not always the harm it does to
  the gate's metric (an attention score MatMul before a softmax adds much noise and does little
  harm), so this keeps the sets of ``leave_one_out`` at a fraction of its runs.

Trial models (leave-one-out runs and the bisection) are not re-quantized: each is a copy of the
one all-quantized model with the chosen nodes rewired to their float weights, biases and inputs
(:class:`FloatRestorer`). The chosen set is then quantized for real and measured once; if that
misses the gate (a re-plan differs slightly from an edit), more of the ranking goes float, each
step measured for real, until it holds. The measuring is the run's: the pass gets a
:class:`~onnxcomp.passes.base.FidelityEvaluator` through its context (the pipeline gives it one
built from the recipe's gate), so this module does not import the validator.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import Names
from onnxcomp.int8_ops import SHARED_SCALE_OPS
from onnxcomp.passes.quantize.rewrite import float_guard
from onnxcomp.passes.base import FidelityEvaluator
from onnxcomp.runtime import open_session, run_batches, session_options

__all__ = ["sensitivity_search", "SensitivityReport", "FloatRestorer", "Ranking"]

Ranking = Literal["sqnr", "sqnr_loo", "grouped_loo", "leave_one_out"]


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
    ranking: str = "leave_one_out"
    requantized: int = 0  # trials quantized for real (the others are edits of the all-quantized model)
    loss_removed: dict[str, float] = dataclasses.field(default_factory=dict)  # leave-one-out, where measured
    cpu_seconds: float = 0.0  # process CPU time of the search (all threads): less dependent on other load

    def to_dict(self) -> dict[str, Any]:
        keys = ("cosine", "top1_agreement", "kl", "mean_abs_error", "max_abs_error", "accuracy_drop")
        score = {"leave_one_out": "loss_removed", "grouped_loo": None}.get(self.ranking, "added_noise")
        harm = []
        for node, value in self.harm:  # grouped_loo: loss_removed where measured alone, else only the rank
            item = {"node": node} | ({score: round(value, 6)} if score else {})
            if self.ranking in ("sqnr_loo", "grouped_loo") and node in self.loss_removed:
                item["loss_removed"] = round(self.loss_removed[node], 6)
            harm.append(item)
        return {"target": self.target, "samples": self.samples, "met": self.met, "kept_float": self.kept_float,
                "ranking": self.ranking, "harm": harm,
                "fidelity_all_quantized": {k: self.fidelity_all.get(k) for k in keys},
                "fidelity_chosen": {k: self.fidelity_chosen.get(k) for k in keys},
                "trials": self.trials, "requantized": self.requantized, "seconds": round(self.seconds, 2),
                "cpu_seconds": round(self.cpu_seconds, 2)}


def sensitivity_search(base: ir.Model, data: Dataset, judge: FidelityEvaluator | None,
                       quantize: Callable[[ir.Model, Mapping[str, str], bool], list[str]], *,
                       batch_size: int = 32, ranking: Ranking = "leave_one_out",
                       weight_form: Callable[[ir.Node], np.ndarray] | None = None,
                       ) -> tuple[Mapping[str, str], SensitivityReport]:
    """Which nodes of the float model ``base`` to keep float so that its quantized copy meets
    ``judge``'s thresholds on ``data``.

    ``quantize(model, keep_float, final)`` quantizes ``model`` in place keeping the named nodes
    float and returns the names of the nodes it quantized; ``final`` False allows a cheaper
    rewrite (no bias correction) for the float twin. ``base`` is not changed. ``ranking``: how
    nodes are ordered (module docstring). ``weight_form``: the weight values a node kept float will
    compute with, from the float twin's node (weight-only int8: rounded to int8 and back; None:
    the float weight), which trial models use too.
    The returned set was quantized for real and measured:
    it meets the gate whenever keeping the whole ranking float does, and it is a prefix of the
    ranking — the smallest one by bisection over the edited trial models, extended while the
    real quantization misses.
    """
    if judge is None or not judge.thresholds:
        raise OnnxcompError("quantize_static.sensitivity: needs a fidelity threshold in the recipe's gate "
                            "(min_cosine, max_accuracy_drop, min_top1_agreement, max_kl, max_mean_abs_error "
                            "or max_abs_error) to aim at")
    start, cpu_start = time.perf_counter(), time.process_time()
    reference = judge.reference(base, data, batch_size)
    counts = {"trials": 0, "requantized": 0}

    def measure(model: ir.Model) -> dict[str, Any]:
        counts["trials"] += 1
        return judge.measure(base, model, data, reference, batch_size)

    def requantize(keep: Mapping[str, str]) -> dict[str, Any]:
        counts["requantized"] += 1
        model = base.clone()
        quantize(model, keep, True)
        return measure(model)

    all_quantized = base.clone()
    units = quantize(all_quantized, {}, True)
    counts["requantized"] += 1
    fid_all = measure(all_quantized)
    failures, unchecked = judge.failures(fid_all)
    if len(unchecked) >= len(judge.thresholds):  # some thresholds measurable (min_cosine without labels): aim at those
        raise OnnxcompError(f"quantize_static.sensitivity: cannot measure the gate on the calibration data "
                            f"({unchecked[0]}): give the calibration .npz a 'label' array or use min_cosine")
    report = SensitivityReport(dict(judge.target), len(data), [], [], fid_all, fid_all, not failures, 0, 0.0,
                               ranking)
    if failures:
        float_twin = base.clone()  # prepared like the quantized model (same node names), nothing quantized
        quantize(float_twin, {u: "sensitivity: float twin" for u in units}, False)
        restorer = FloatRestorer(all_quantized, float_twin, weight_form)
        loss_all = judge.loss(fid_all)

        def loss_removed(nodes: Iterable[str]) -> list[tuple[str, float]]:
            return [(u, loss_all - judge.loss(measure(restorer.model([u])))) for u in nodes]

        def edited_holds(order: list[str]) -> Callable[[int], bool]:
            return lambda k: not judge.failures(measure(restorer.model(order[:k])))[0]

        if ranking == "leave_one_out":
            harm = loss_removed(units)
            report.loss_removed = dict(harm)
        elif ranking == "grouped_loo":
            harm, report.loss_removed = grouped_loss_removed(
                units, lambda nodes: loss_all - judge.loss(measure(restorer.model(nodes))))
        else:
            harm = added_noise(float_twin, all_quantized, units, data, batch_size)
        order = [n for n, _ in sorted(harm, key=lambda item: -item[1])]  # stable: ties keep graph order
        high = smallest_prefix(edited_holds(order), len(order))
        if ranking == "sqnr_loo" and high > 0:
            top = order[:min(len(order), 2 * high)]
            report.loss_removed = dict(loss_removed(top))
            order = sorted(top, key=lambda n: -report.loss_removed[n]) + order[len(top):]
            high = smallest_prefix(edited_holds(order), len(order))
        scores = dict(harm)
        report.harm = [(n, scores[n]) for n in order]
        chosen = requantize(_keep(order, high))
        step = 1
        while judge.failures(chosen)[0] and high < len(order):  # an edit is not a re-plan: extend for real
            high = min(len(order), high + step)
            step *= 2
            chosen = requantize(_keep(order, high))
        report.kept_float = order[:high]
        report.fidelity_chosen = chosen
        report.met = not judge.failures(chosen)[0]
    report.trials, report.requantized = counts["trials"], counts["requantized"]
    report.seconds, report.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return _keep(report.kept_float, len(report.kept_float)), report


def grouped_loss_removed(units: list[str], removed: Callable[[list[str]], float],
                         ) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Leave-one-out in two rounds: ``removed(nodes)`` (the loss removed by restoring ``nodes``)
    for groups of about √n consecutive units, then for each unit of the most harmful third of the
    groups (at least two). Returns (an ordering score per unit: measured units by their harm, then
    the others group by group, below them; the measured units' loss removed)."""
    size = max(1, math.isqrt(len(units) - 1) + 1) if units else 1
    groups = [units[i:i + size] for i in range(0, len(units), size)]
    group_harm = [removed(g) if len(groups) > 1 else 0.0 for g in groups]
    ranked = sorted(range(len(groups)), key=lambda i: -group_harm[i])
    expand = ranked[:max(2, -(-len(groups) // 3))]
    scores: dict[str, float] = {}
    for i in expand:
        scores.update({u: removed([u]) if len(groups[i]) > 1 or len(groups) == 1 else group_harm[i]
                       for u in groups[i]})
    measured = dict(scores)
    floor = min(scores.values(), default=0.0)
    rest = [i for i in ranked if i not in expand]
    for rank, i in enumerate(rest):  # below the measured ones, in group order
        scores.update({u: floor - 1.0 - rank for u in groups[i]})
    return [(u, scores[u]) for u in units], measured


def _keep(order: list[str], k: int) -> dict[str, str]:
    return {n: f"sensitivity: kept float (harm rank {i + 1} of {len(order)})" for i, n in enumerate(order[:k])}


def smallest_prefix(holds: Callable[[int], bool], n: int) -> int:
    """The smallest ``k`` in 1..n with ``holds(k)`` by doubling then bisection (``holds(0)`` is
    taken to fail; each ``k`` is asked at most once); ``n`` when none holds."""
    results: dict[int, bool] = {}

    def ask(k: int) -> bool:
        if k not in results:
            results[k] = holds(k)
        return results[k]

    low, high = 0, 1
    while high < n and not ask(high):
        low, high = high, min(2 * high, n)
    if high >= n and not ask(n):
        return n
    while high - low > 1:
        mid = (low + high) // 2
        if ask(mid):
            high = mid
        else:
            low = mid
    return high


class FloatRestorer:
    """Trial models for the search: copies of ``quantized`` with some nodes back in float.

    ``float_twin`` is the same float model prepared like ``quantized`` but not quantized (same
    node and tensor names). A restored node reads the twin's float constants (weight, bias)
    instead of their DequantizeLinear, and for a dequantized activation the float tensor its
    QuantizeLinear reads, unless that tensor still comes quantized: from a quantized node that
    is not restored, or with a Relu/Clip folded into the QuantizeLinear (the clip is the
    activation). A data-movement op (Reshape, Transpose, MaxPool…) between a float source and a
    restored node is rewired to the float source too. Q/DQ nodes left without readers are
    removed. ``weight_form`` (twin node -> weight values): the weight a restored node computes
    with (weight-only int8 rounding), else the float one. Cheap (no calibration, no weight rounding); it can differ from quantizing with the
    nodes excluded where a re-plan would change more neighbours, so the search quantizes its
    final choice for real.
    """

    def __init__(self, quantized: ir.Model, float_twin: ir.Model,
                 weight_form: Callable[[ir.Node], np.ndarray] | None = None):
        self.quantized = quantized
        self.weight_form = weight_form
        self.float_nodes = {n.name: n for n in float_twin.graph}
        self.float_inputs = {n.name: list(n.inputs) for n in float_twin.graph}
        self.float_producers = {v.name: n for n in float_twin.graph for v in n.outputs if v.name}
        self.quantized_nodes = {n.name for n in quantized.graph if _reads_dequantized(n)}  # before any edit

    def model(self, nodes: Iterable[str]) -> ir.Model:
        model = self.quantized.clone()
        graph = model.graph
        restored = set(nodes)
        by_name = {n.name: n for n in graph}
        constants: dict[int, ir.Value] = {}
        names = Names(graph)
        self._edit = (graph, names, {})  # the graph being edited, its names, re-inserted activations
        for name in sorted(restored):
            node, originals = by_name.get(name), self.float_inputs.get(name)
            if node is None or originals is None:
                continue
            for index, (now, original) in enumerate(zip(node.inputs, originals)):
                if not _dequantized(now) or original is None:
                    continue
                if original.const_value is not None:
                    if id(original) not in constants:
                        tensor = original.const_value
                        if index == 1 and self.weight_form is not None:  # weight-only: int8-rounded values
                            tensor = ir.tensor(self.weight_form(self.float_nodes[name]))
                        constants[id(original)] = ir.Value(
                            name=names(f"{original.name}_float"), shape=original.shape,
                            type=original.type, const_value=tensor)
                        graph.register_initializer(constants[id(original)])
                    node.replace_input_with(index, constants[id(original)])
                    continue
                source = self._float_source(now, restored)
                if source is not None:
                    node.replace_input_with(index, source)
            if _dequantized(node.inputs[0]):
                self._guard(node)
        ir_common.RemoveUnusedNodesPass()(model)
        return model

    def _float_source(self, value: ir.Value, restored: set[str]) -> ir.Value | None:
        """The float tensor the dequantized activation ``value`` stands for, when it does not stay
        quantized with ``restored`` in float (None: it does, read it dequantized)."""
        q = value.producer().inputs[0].producer()
        if q is None or q.op_type != "QuantizeLinear":
            return None
        x = q.inputs[0]
        producer = x.producer()
        if producer is None:
            return x
        if producer.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return None
        folded = self.float_producers.get(x.name)
        if folded is not None and folded.op_type != producer.op_type:  # a Relu/Clip folded into the Q
            return self._activation(x, folded) if producer.name in restored else None
        if producer.name in restored or producer.name not in self.quantized_nodes:
            return x
        if producer.op_type in SHARED_SCALE_OPS and _dequantized(producer.inputs[0]):
            source = self._float_source(producer.inputs[0], restored)
            if source is not None:
                producer.replace_input_with(0, source)
                return x
        return None


    def _guard(self, node: ir.Node) -> None:
        """A float Conv/Gemm reading a per-tensor DequantizeLinear whose output is quantized would be
        re-quantized by onnxruntime itself: read a per-axis copy instead (as the rewrite does)."""
        guard = float_guard(node)
        dq = node.inputs[0].producer()
        if guard is None or dq.attributes.get_int("axis") is not None or len(dq.inputs) < 3:
            return
        graph, names, _ = self._edit
        axis, channels = guard
        scale, zero = (ir.Value(name=names(f"{v.name}_per_axis"), const_value=ir.tensor(np.tile(v.const_value.numpy(), channels)))
                       for v in dq.inputs[1:3])
        graph.register_initializer(scale)
        graph.register_initializer(zero)
        copy = ir.node("DequantizeLinear", [dq.inputs[0], scale, zero], {"axis": axis}, name=names(f"{dq.name}_per_axis"))
        copy.outputs[0].name = names(f"{dq.outputs[0].name}_per_axis")
        copy.outputs[0].type, copy.outputs[0].shape = dq.outputs[0].type, dq.outputs[0].shape
        graph.insert_after(dq, copy)
        node.replace_input_with(0, copy.outputs[0])

    def _activation(self, x: ir.Value, float_node: ir.Node) -> ir.Value:
        """``float_node`` (the twin's Relu/Clip whose output name ``x`` took when it was folded)
        applied to ``x`` again, inserted after ``x``'s producer."""
        graph, names, done = self._edit
        if x.name not in done:
            inputs = [x]
            for extra in float_node.inputs[1:]:  # Clip's min/max constants
                value = None
                if extra is not None:
                    value = ir.Value(name=names(f"{extra.name}_float"), shape=extra.shape, type=extra.type,
                                     const_value=extra.const_value)
                    graph.register_initializer(value)
                inputs.append(value)
            node = ir.Node(float_node.domain, float_node.op_type, inputs, attributes=list(float_node.attributes.values()),
                           name=names(f"{float_node.name}_float"))
            node.outputs[0].name = names(f"{x.name}_float")
            node.outputs[0].type, node.outputs[0].shape = x.type, x.shape
            graph.insert_after(x.producer(), node)
            done[x.name] = node.outputs[0]
        return done[x.name]


def _dequantized(value: ir.Value | None) -> bool:
    return value is not None and value.producer() is not None and value.producer().op_type == "DequantizeLinear"


def _reads_dequantized(node: ir.Node) -> bool:
    """``node`` is a quantized node: not a Q/DQ itself, and some input comes from a DequantizeLinear."""
    return node.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(
        v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
        for v in node.inputs)


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
