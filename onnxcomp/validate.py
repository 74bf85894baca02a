"""Original vs compressed on the same inputs: fidelity metrics and the recipe's gate.

Outputs are compared batch by batch and reduced as they stream. The headline
metrics (cosine, top-1 agreement, KL, accuracy) use one output (the first unless
named); the error metrics take the worst over all outputs. The cosine is the mean over
samples of each sample's cosine, except for an output of one value per sample (a VAD or
wake-word probability, a score), where one sample's cosine only checks its sign: there it is
the cosine of all samples' values as one vector.

With a mask input (e.g. a BERT ``attention_mask`` [batch, seq]), positions where the
mask is 0 (padding) are left out of the headline metrics and of the error metrics of
every output whose leading two dims are the mask's shape: ``last_hidden_state``
[batch, seq, hidden] is compared on real tokens only, a pooled [batch, hidden] output
as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset, check_label_range, model_inputs
from onnxcomp.errors import OnnxcompError
from onnxcomp.gate import FIDELITY_KEYS, Gate
from onnxcomp.int8_ops import INT8_ACTIVATION_OPS
from onnxcomp.runtime import open_session, run_batches, session_options

__all__ = ["Gate", "FidelityCheck", "compare", "reference_outputs", "check_gate", "check_data", "select_target",
           "Target", "AUTO_MASK", "slower_note"]

AUTO_MASK = "auto"


@dataclasses.dataclass(frozen=True)
class Target:
    """What the fidelity metrics measure: the headline output and the padding mask input."""

    output: str
    mask: str | None = None
    note: str | None = None  # why no mask is used although one was asked for


def select_target(model: ir.Model, output: str | None = None, mask_input: str | None = None, *,
                  fields: tuple[str, str] = ("output", "mask_input")) -> Target:
    """Resolve ``output`` (None: the first) and ``mask_input`` (a name, "auto" or None) on ``model``.

    "auto" picks the one integer (or bool) rank-2 input whose name contains "mask"; none or
    several -> no mask, and ``note`` says why. A name the model does not have raises
    OnnxcompError naming ``fields`` (how the caller calls the two settings) and the valid names.
    """
    outputs = [v.name for v in model.graph.outputs]
    if not outputs:
        raise OnnxcompError("the model has no outputs to compare")
    if output is None:
        output = outputs[0]
    elif output not in outputs:
        raise OnnxcompError(f"{fields[0]}: the model has no output '{output}' (outputs: {', '.join(outputs)})")
    if mask_input is None:
        return Target(output)
    specs = model_inputs(model)
    if mask_input == AUTO_MASK:
        found = [s.name for s in specs if "mask" in s.name.lower() and s.dims is not None and len(s.dims) == 2
                 and (np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_)]
        if len(found) == 1:
            return Target(output, found[0])
        why = ("no integer rank-2 input with 'mask' in its name" if not found
               else f"several candidates ({', '.join(found)}): set {fields[1]} to one")
        return Target(output, None, f"{fields[1]} auto: {why}; every position compared")
    spec = next((s for s in specs if s.name == mask_input), None)
    if spec is None:
        names = ", ".join(s.name for s in specs)
        raise OnnxcompError(f"{fields[1]}: the model has no input '{mask_input}' (inputs: {names}; or 'auto')")
    if spec.dims is not None and len(spec.dims) != 2:
        raise OnnxcompError(f"{fields[1]}: input '{mask_input}' has rank {len(spec.dims)}; "
                            f"a mask must be [batch, seq]")
    return Target(output, mask_input)


def check_data(model: ir.Model, data: Dataset, target: Target) -> None:
    """What can be known about ``data`` before running anything: a mask with kept positions,
    labels within the headline output's class count when that count is static."""
    if target.mask is not None and target.mask in data.inputs and not np.any(data.inputs[target.mask]):
        raise OnnxcompError(f"{data.source}: mask input '{target.mask}' is 0 everywhere: every position is "
                            f"padding, nothing left to compare")
    value = next(v for v in model.graph.outputs if v.name == target.output)
    dims = list(value.shape) if value.shape is not None else []
    if data.labels is not None and len(dims) == 2 and isinstance(dims[1], int) and dims[1] > 1:
        check_label_range(data.labels, dims[1], data.source, target.output)


def compare(
    original: ir.Model,
    compressed: ir.Model,
    data: Dataset,
    *,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    output: str | None = None,
    mask_input: str | None = None,
    reference: Sequence[Sequence[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Fidelity of ``compressed`` to ``original`` on ``data`` (accuracy when it has labels).

    ``reference``: the original's outputs per batch from :func:`reference_outputs` on the same
    data and batch size, so repeated comparisons (a search) run the original once.

    ``output``: the output the headline metrics use (default: the first). ``mask_input``:
    an input name or "auto" (see :func:`select_target`); where it is 0 the positions are
    left out (see the module docstring). The result names the ``output`` and ``mask`` used,
    the ``masked_outputs``, the fraction of [batch, seq] positions kept (``mask_kept``) and,
    when an asked-for mask is not used, ``mask_note``.
    """
    target = select_target(original, output, mask_input)
    check_data(original, data, target)
    labels = data.used_labels()
    labels_note = None
    acc = _Accumulator()
    total = -(-len(data) // (1 if data.feedwise else data.fixed_batch or batch_size))
    masked: dict[str, None] = {}
    kept = positions = 0
    opts = session_options(spinning=False)  # throughput: idle threads of a shared CPU must not spin
    with (open_session(original, opts, what="original model") if reference is None else contextlib.nullcontext()) \
            as s_orig, open_session(compressed, opts, what="compressed model") as s_new:
        names_o = [o.name for o in (s_orig.get_outputs() if s_orig else original.graph.outputs)]
        names_n = [o.name for o in s_new.get_outputs()]
        if names_o != names_n:
            raise OnnxcompError(f"the models' outputs differ: {names_o} vs {names_n}")
        head = names_o.index(target.output)
        start = 0
        for index, feed in enumerate(data.batches(batch_size)):
            out_o = next(run_batches(s_orig, [feed])) if reference is None else reference[index]
            out_n = next(run_batches(s_new, [feed]))
            keep = None
            if target.mask is not None:
                keep = np.asarray(feed[target.mask]) != 0
                if keep.ndim != 2:
                    raise OnnxcompError(f"mask input '{target.mask}' has shape {list(keep.shape)}; "
                                        f"a mask must be [batch, seq]")
                kept += int(keep.sum())
                positions += keep.size
            for position, (a, b) in enumerate(zip(out_o, out_n)):
                if a.shape != b.shape:
                    raise OnnxcompError(
                        f"output '{names_o[position]}' changed shape: {a.shape} -> {b.shape}"
                    )
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                select = keep if keep is not None and a.shape[:2] == keep.shape else None
                if select is not None:
                    masked[names_o[position]] = None
                    acc.errors(a[select], b[select])
                else:
                    acc.errors(a, b)
                if position == head:
                    n = len(a) if a.ndim else 1
                    if labels is not None and index == 0:
                        if a.ndim == 2 and a.shape[1] > 1:
                            check_label_range(data.labels, a.shape[1], data.source, target.output)
                        else:
                            labels_note = (f"labels not used: output '{target.output}' has shape "
                                           f"{list(a.shape)}, not [batch, classes]")
                    y = None if labels is None or labels_note else labels[start : start + n]
                    # a feed of one sample whose output has no batch axis ([seq_len] speech
                    # probabilities): the whole output is that sample's, compared as one vector
                    whole = data.feedwise and select is None and (a.ndim == 0 or len(a) != 1)
                    acc.headline(a, b, y, select, whole=whole)
            start += data.samples_in(feed)
            if progress:
                progress(index + 1, total)
    result = acc.result()
    result.update(samples=start, data=data.source, output=target.output, mask=target.mask,
                  masked_outputs=list(masked),
                  mask_kept=kept / positions if positions else None)
    if labels_note:
        result["labels_note"] = labels_note
    if target.note:
        result["mask_note"] = target.note
    elif target.mask is not None and not masked:
        result["mask_note"] = f"mask '{target.mask}' matches no output's leading dims: every position compared"
    return result


def reference_outputs(model: ir.Model, data: Dataset, batch_size: int = 32, *,
                      path: str | None = None) -> list[list[np.ndarray]]:
    """``model``'s outputs per batch of ``data``, for :func:`compare`'s ``reference``.
    ``path``: the unchanged file of ``model`` (see :func:`onnxcomp.runtime.open_session`)."""
    with open_session(model, session_options(spinning=False), what="original model", path=path) as session:
        return [list(out) for out in run_batches(session, data.batches(batch_size))]


def check_gate(gate: Gate, fidelity: dict[str, Any] | None,
               extra: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(failures, unchecked) of ``gate``: it holds when there are no failures.

    A threshold whose metric does not exist for this run (accuracy without labels,
    fused ratio without quantized nodes) is listed as unchecked, not failed. Non-finite
    compressed outputs where the original's are finite always fail, thresholds or not.
    ``extra`` carries fused_ratio, size_ratio, latency_ratio (None when latency was not measured) and
    lost_fusions (the float fusion families onnxruntime no longer makes; None when not checked).
    """
    failures: list[str] = []
    unchecked: list[str] = []
    fid = fidelity or {}
    if fid.get("nonfinite_values"):  # whatever the thresholds: a NaN/Inf result is never a match
        failures.append(f"the compressed model gives {fid['nonfinite_values']} non-finite (NaN/Inf) output "
                        f"values where the original's are finite or different")

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
    if gate.keep_fusions:
        lost = extra.get("lost_fusions")
        if lost is None:
            unchecked.append("keep_fusions: not checked, nothing quantized (or the original is too large)")
        elif lost:
            failures.append("keep_fusions: onnxruntime no longer fuses " + ", ".join(lost))
    size = extra.get("size_ratio")
    need("max_size_ratio", size, gate.max_size_ratio,
         size is not None and gate.max_size_ratio is not None and size <= gate.max_size_ratio, "")
    latency = extra.get("latency_ratio")
    need("max_latency_ratio", latency, gate.max_latency_ratio,
         latency is not None and gate.max_latency_ratio is not None and latency <= gate.max_latency_ratio,
         "latency not measured (latency_runs 0)")
    return failures, unchecked


_TINY_MACS = 5_000_000  # per sample: below this, per-op overheads (quantize/dequantize, launches) dominate


def slower_note(ratio: float | None, compressed: dict[str, Any], *, saturating: bool | None = None) -> str | None:
    """One line when the compressed model ran slower than the original on this CPU (``ratio`` =
    compressed / original median latency > 1): the likely cause and what to try instead.
    ``compressed``: its model summary (ops, macs). ``saturating``: this CPU is x86 without VNNI
    (default: asked)."""
    if ratio is None or not ratio > 1.0:
        return None
    if saturating is None:
        from onnxcomp.qparams import saturating_u8s8

        saturating = saturating_u8s8()
    ops = {op.split(".")[-1] for op in compressed.get("ops", {})}
    causes, tries = [], []
    if ops & INT8_ACTIVATION_OPS:
        if saturating:
            causes.append("this CPU is x86 without VNNI, where onnxruntime's int8 kernels are barely faster than fp32")
            tries.append("deploy on a VNNI / ARM CPU (quantize_static target: vnni | arm64)")
        macs = compressed.get("macs")
        if macs is not None and macs < _TINY_MACS:
            causes.append(f"the layers are tiny ({macs:,} MACs per sample): quantize/dequantize overhead dominates")
        tries.append("the int8-dynamic recipe or fewer quantized nodes (exclude / min_params)")
    if "MatMulNBits" in ops:
        causes.append("weight-only int4/int8 (MatMulNBits) dequantizes its weights on every run: it saves size, "
                      "not time, on this CPU")
        tries.append("int8-dynamic for speed")
    if not causes:
        causes.append("the rewritten graph has more or slower ops than the original here, or the measurement is "
                      "noisy (a shared machine)")
    tries.append("the gate key max_latency_ratio to refuse such results")
    return (f"the compressed model is {ratio:.2f}x the original's latency on this CPU (slower): likely "
            + "; ".join(causes) + ". Try: " + "; ".join(tries) + ".")


class _Accumulator:
    """Streaming sums for the fidelity metrics."""

    def __init__(self):
        self.nonfinite = 0
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.abs_count = 0
        self.cos_sum = 0.0
        self.rows = 0
        self.set_dot = np.zeros(3)  # Σab, Σa², Σb² of an output with one value per sample
        self.set_bad = False
        self.set_rows = 0
        self.agree = 0
        self.kl_sum = 0.0
        self.classes = False
        self.correct_o = 0
        self.correct_n = 0
        self.labelled = 0

    def errors(self, a: np.ndarray, b: np.ndarray) -> None:
        """Absolute errors; a value non-finite in one model and not equal in the other is an infinite error."""
        if a.size == 0:
            return
        diff, mismatch = _abs_diff(a, b)
        self.nonfinite += int(mismatch.sum())
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.abs_sum += float(diff.sum())
        self.abs_count += diff.size

    def headline(self, a: np.ndarray, b: np.ndarray, labels: np.ndarray | None,
                 keep: np.ndarray | None = None, whole: bool = False) -> None:
        """Per-sample metrics; ``keep`` [batch, seq] leaves out positions (and samples with none kept);
        ``whole``: ``a`` is one sample's whole output (no batch axis): one cosine, no top-1.

        A sample whose compressed output has a non-finite value where the original's differs
        is the worst case of every metric: cosine -1, top-1 disagreement, infinite KL, wrong.
        """
        if keep is not None:
            rows = keep.any(axis=1)
            a, b, keep = a[rows], b[rows], keep[rows]
            labels = None if labels is None else labels[rows]
            weight = keep.reshape(keep.shape + (1,) * (a.ndim - 2))
            a2 = np.where(weight, a, 0.0).reshape(len(a), -1)  # zeros at padding: the kept positions' cosine
            b2 = np.where(weight, b, 0.0).reshape(len(b), -1)
        elif whole:
            a2, b2 = a.reshape(1, -1), b.reshape(1, -1)
        else:
            a2 = a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1)
            b2 = b.reshape(len(b), -1) if b.ndim else b.reshape(1, 1)
        _, mismatch = _abs_diff(a2, b2)
        bad = mismatch.any(axis=1)
        finite = np.isfinite(a2) & np.isfinite(b2)  # equal non-finite values: left out of the cosine
        a2, b2 = np.where(finite, a2, 0.0), np.where(finite, b2, 0.0)
        if keep is None and a2.shape[1] == 1:
            x, y = a2.astype(np.float64), b2.astype(np.float64)
            self.set_dot += [float((x * y).sum()), float((x * x).sum()), float((y * y).sum())]
            self.set_bad |= bool(bad.any())
            self.set_rows += len(a2)
        norm_a, norm_b = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
        norms = norm_a * norm_b
        with np.errstate(invalid="ignore", over="ignore"):
            cos = np.where(norms > 0, (a2 * b2).sum(axis=1) / np.where(norms > 0, norms, 1), 0.0)
        cos = np.where((norm_a == 0) & (norm_b == 0), 1.0, cos)  # both zero: identical; one zero: cosine 0
        cos = np.where(bad, -1.0, np.clip(cos, -1.0, 1.0))
        self.cos_sum += float(cos.sum())
        self.rows += len(a2)
        if a.ndim == 2 and a.shape[1] > 1 and not whole:
            self.classes = True
            if keep is not None:  # scores over positions: padding can be neither top-1 nor probable
                a, b = np.where(keep, a, -np.inf), np.where(keep, b, -np.inf)
            top_o, top_n = a.argmax(axis=1), b.argmax(axis=1)
            self.agree += int(((top_o == top_n) & ~bad).sum())
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                p = _softmax(a)
                q = _softmax(b)
                kl = (p * (np.log(p + 1e-12) - np.log(q + 1e-12))).sum(axis=1)
            kl = np.where(bad, np.inf, np.where(np.isfinite(kl), kl, 0.0))
            self.kl_sum += float(kl.sum())
            if labels is not None and labels.ndim == 1:
                self.correct_o += int((top_o == labels).sum())
                self.correct_n += int(((top_n == labels) & ~bad).sum())
                self.labelled += len(labels)

    def _set_cosine(self) -> float:
        dot, aa, bb = self.set_dot
        if self.set_bad:
            return -1.0
        if aa == 0 and bb == 0:
            return 1.0
        return float(np.clip(dot / np.sqrt(aa * bb), -1.0, 1.0)) if aa > 0 and bb > 0 else 0.0

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nonfinite_values": self.nonfinite,
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.abs_sum / max(self.abs_count, 1),
            "cosine": self._set_cosine() if self.set_rows else self.cos_sum / max(self.rows, 1),
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


def _abs_diff(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(|a - b|, mismatch): where a value is non-finite in either model and the two differ
    (NaN vs NaN counts as equal) the error is infinite and ``mismatch`` is set."""
    finite = np.isfinite(a) & np.isfinite(b)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    mismatch = ~finite & ~same
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a - b), np.where(mismatch, np.inf, 0.0))
    return diff, mismatch


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class FidelityCheck:
    """The fidelity part of a gate as something a pass can aim at (the pipeline hands one to the
    passes as ``PassContext.fidelity``; see :class:`onnxcomp.passes.base.FidelityEvaluator`):
    compare a candidate with its float original on some data, judge the thresholds, rank by loss.
    Size and fusion thresholds are left out (a pass cannot measure them on a candidate)."""

    def __init__(self, gate: Gate):
        self.thresholds = {k: getattr(gate, k) for k in FIDELITY_KEYS if getattr(gate, k) is not None}
        self.gate = Gate(**self.thresholds, output=gate.output, mask_input=gate.mask_input)
        self.target = self.gate.model_dump(exclude_none=True)
        self.output = gate.output

    def reference(self, model: ir.Model, data: Dataset, batch_size: int = 32) -> list[list[np.ndarray]]:
        return reference_outputs(model, data, batch_size)

    def measure(self, original: ir.Model, candidate: ir.Model, data: Dataset,
                reference: list[list[np.ndarray]] | None = None, batch_size: int = 32) -> dict[str, Any]:
        return compare(original, candidate, data, batch_size=batch_size, output=self.gate.output,
                       mask_input=self.gate.mask_input, reference=reference)

    def failures(self, fidelity: dict[str, Any]) -> tuple[list[str], list[str]]:
        return check_gate(self.gate, fidelity, {})

    def loss(self, fidelity: dict[str, Any]) -> float:
        """One smooth number to rank candidates by (lower is better): 1 − cosine for a cosine
        target, else KL of the class probabilities when the output has classes (accuracy itself
        is too coarse to rank by), else the mean absolute error."""
        if self.gate.min_cosine is not None:
            return 1.0 - fidelity["cosine"]
        if fidelity.get("kl") is not None:
            return fidelity["kl"]
        if self.gate.max_mean_abs_error is not None or self.gate.max_abs_error is not None:
            return fidelity["mean_abs_error"]
        return 1.0 - fidelity["cosine"]
