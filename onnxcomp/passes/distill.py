"""``distill``: fit a compressed student to its teacher on the calibration data.

The student is the model in the pipeline (pruned, factorized, or a QDQ model with ``qat``); the
teacher is the model the run started from (``PassContext.original``), another ONNX model
(``teacher``), and/or its exported logits (``teacher_logits``: ``.npy``/``.npz`` aligned sample
for sample with ``--calib``; ``onnxcomp logits TEACHER.onnx CALIB.npz -o logits.npy`` makes one).
Without a logits file the teacher's logits are computed on the calibration data. The "logits"
are the model output the recipe's gate names (``gate.output``), else the first output.

The loss is ``α·CE(labels) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))``
(:mod:`onnxcomp.passes.distill_loss`); labels are the calibration data's ``label`` array. Its
value on the calibration data before and after, split into its two terms, is in the stats.

Engines:
- ``closed_form`` (default, numpy/scipy only; :mod:`onnxcomp.passes.distill_layerwise`):
  layer-wise ridge reconstruction of every selected layer against the teacher's activations
  (masks and low-rank pairs respected, never worse on the calibration data), then the exact
  loss on the final classifier layer with L-BFGS. The refitted model is kept only if its loss on
  the calibration data (for an output that is not [samples, classes] logits — a one-column score,
  a detector's map —: its mean squared error to the teacher) is not higher than before (layer-wise fits are each never worse, but layers
  they cannot reach, e.g. inside subgraphs, can turn them against the logits); otherwise the
  model is left unchanged and the notes say so.
- ``torch`` (the ``[train]`` extra; :mod:`onnxcomp.passes.distill_torch`): end-to-end Adam
  training of every float initializer the selected layers read, the graph executed op by op
  with torch functions (autograd, no hand-written gradients); pruned entries get no gradient;
  values are written back into the same initializers. ``qat`` trains a QDQ student through its
  fake-quant nodes (straight-through estimator) and re-derives the int8 weights. ``l1`` and
  ``nuclear`` add penalties that prepare the weights for a later ``prune`` / ``svd_split``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import NodeSelection, find_layers
from onnxcomp.passes.base import CompressionPass, PassConfig, PassContext, PassStats, register
from onnxcomp.passes.distill_layerwise import capture, fit_classifier, reconstruct
from onnxcomp.passes.distill_loss import check_labels, check_logits, distill_loss, load_teacher_logits

__all__ = ["Distill", "DistillConfig"]


class DistillConfig(PassConfig, NodeSelection):
    teacher_logits: str | None = Field(None, description="teacher logits .npy/.npz aligned with --calib "
                                       "(default: computed from the teacher on --calib)")
    teacher: str | None = Field(None, description="teacher ONNX model (default: the model the run started from)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the cross-entropy with the labels; "
                         "1 - alpha weighs T^2*KL to the teacher")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the KL term")
    engine: Literal["closed_form", "torch"] = Field("closed_form", description="closed_form: layer-wise ridge "
                                                    "reconstruction + L-BFGS on the classifier (numpy/scipy); "
                                                    "torch: end-to-end training (needs the [train] extra)")
    qat: bool = Field(False, description="torch: train a QDQ student through its fake-quant nodes (STE)")
    epochs: int = Field(20, ge=1, description="torch: passes over the calibration data")
    lr: float = Field(3e-3, gt=0, description="torch: Adam learning rate")
    batch_size: int = Field(32, ge=1, description="torch: samples per step")
    seed: int | None = Field(None, ge=0, description="data split / shuffling seed (default: the run's seed)")
    l1: float = Field(0.0, ge=0, description="torch: L1 penalty on the selected weights (for a later prune)")
    nuclear: float = Field(0.0, ge=0, description="torch: nuclear-norm penalty on MatMul/Gemm/Conv weights "
                           "(for a later svd_split)")

    @model_validator(mode="after")
    def _torch_only(self) -> DistillConfig:
        if self.engine != "torch":
            for name in ("qat", "l1", "nuclear"):
                if getattr(self, name):
                    raise ValueError(f"{name} needs engine: torch")
        return self


@register
class Distill(CompressionPass):
    """Distillation from a teacher's logits (and activations) on the calibration data."""

    name = "distill"
    summary = "fit a compressed student to its teacher: layer-wise closed form + logit loss, or torch training"
    Config = DistillConfig
    needs_calibration = True
    uses_original = True

    @classmethod
    def extras_needed(cls, config: DistillConfig) -> tuple[str, ...]:
        return ("train",) if config.engine == "torch" else ()

    @classmethod
    def check(cls, config: DistillConfig, model: ir.Model, context: PassContext) -> None:
        """Teacher files, logits alignment and class count, labels, and the torch engine's
        dependency, before any pass runs."""
        _Inputs.read(config, model, context)
        if config.engine == "torch":
            from onnxcomp.passes.distill_torch import require_torch

            require_torch()
            from onnxcomp.torch_graph import supported_ops

            known = set(supported_ops())
            unknown = sorted({f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                              for n in model.graph if n.op_type not in known or n.domain not in ("", "ai.onnx")})
            if unknown:
                raise OnnxcompError(f"distill engine torch cannot run the ops {', '.join(unknown)} of this model "
                                    "(use engine: closed_form)")

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg, ctx = self.config, self.context
        data = ctx.require_calib(self.name)
        seed = ctx.seed if cfg.seed is None else cfg.seed
        inputs = _Inputs.read(cfg, model, ctx)
        start = time.perf_counter()
        teacher_logits = inputs.logits
        if teacher_logits is None:
            teacher_logits = capture(inputs.teacher, data, [inputs.output], ctx.batch_size)[inputs.output]
        student_before = capture(model, data, [inputs.output], ctx.batch_size)[inputs.output]
        n = len(student_before)
        teacher_logits = teacher_logits[:n]
        if teacher_logits.shape != student_before.shape:
            raise OnnxcompError(f"{inputs.logits_source}: teacher logits of shape {list(teacher_logits.shape)}, "
                                f"the student's '{inputs.output}' is {list(student_before.shape)}")
        labels = data.used_labels() if student_before.ndim == 2 else None
        if data.labels is not None and labels is None:
            stats.notes.append("labels ignored: the logits are not [samples, classes]")
        if labels is None and cfg.alpha > 0:
            stats.notes.append("no labels: the CE term is left out (alpha only weighs the KL term)")
        loss_before = distill_loss(student_before, teacher_logits, labels, alpha=cfg.alpha,
                                   temperature=cfg.temperature, grad=False)

        if cfg.engine == "closed_form":
            # on a copy: layer-wise fits are each never worse, but together they can move the logits away
            # (layers that are not refitted, e.g. inside subgraphs): kept only if the loss is not higher
            work = model.clone()
            self._closed_form(work, data, inputs, teacher_logits, labels, seed, stats)
            student_after = capture(work, data, [inputs.output], ctx.batch_size)[inputs.output]
            loss_after = distill_loss(student_after, teacher_logits, labels, alpha=cfg.alpha,
                                      temperature=cfg.temperature, grad=False)
            # the loss only for [samples, classes] logits; a one-column output (a probability, a score: constant
            # softmax) or a map (a detector's [N, 1, H, W]: softmax over its last axis means nothing): squared error
            logits = student_before.ndim == 2 and student_before.shape[-1] > 1
            what, before, after = ("loss", loss_before.total, loss_after.total) if logits else (
                "squared error to the teacher", _mse(student_before, teacher_logits), _mse(student_after, teacher_logits))
            if stats.touched and after <= before:
                model.graph = work.graph
            elif stats.touched:
                stats.notes.append(f"closed form: the refitted model's {what} on the calibration data was higher "
                                   f"({before:.4g} -> {after:.4g}): weights kept")
                stats.skipped.extend((what, "reverted with the whole refit") for what in stats.touched)
                stats.touched.clear()
                stats.metrics["reverted"] = True
                student_after, loss_after = student_before, loss_before
        else:
            from onnxcomp.passes.distill_torch import train

            train(model, data, teacher_logits, labels, cfg, output=inputs.output, seed=seed,
                  stats=stats, selection=cfg)
            student_after = capture(model, data, [inputs.output], ctx.batch_size)[inputs.output]
            loss_after = distill_loss(student_after, teacher_logits, labels, alpha=cfg.alpha,
                                      temperature=cfg.temperature, grad=False)
        stats.metrics.update({
            "engine": cfg.engine + (" + qat" if cfg.qat else ""),
            "teacher": inputs.teacher_source,
            "teacher_logits": inputs.logits_source,
            "output": inputs.output,
            "samples": n,
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "loss_before": loss_before.as_dict(),
            "loss_after": loss_after.as_dict(),
            "student_teacher_top1_before": _top1(student_before, teacher_logits),
            "student_teacher_top1_after": _top1(student_after, teacher_logits),
            "seconds": round(time.perf_counter() - start, 3),
        })
        if labels is not None:
            stats.metrics["calib_accuracy_before"] = _accuracy(student_before, labels)
            stats.metrics["calib_accuracy_after"] = _accuracy(student_after, labels)

    def _closed_form(self, model, data, inputs, teacher_logits, labels, seed, stats) -> None:
        cfg, ctx = self.config, self.context
        if inputs.teacher is not None:
            layers, skipped = reconstruct(model, inputs.teacher, data, cfg, seed=seed, batch_size=ctx.batch_size)
            stats.metrics["layers"] = layers
            for result in layers:
                if result["rows_refit"]:
                    stats.touch(f"{result['layer']}: refit {result['rows_refit']}/{result['rows']} rows, rel. error "
                                f"{result['rel_error_before']:.4g} -> {result['rel_error_after']:.4g}")
                else:
                    stats.skip(result["layer"], "refit would not lower its error (weights kept)")
            for what, why in skipped:
                stats.skip(what, why)
        else:
            stats.notes.append("no teacher model: layer-wise reconstruction skipped (logit distillation only)")
        layers, _ = find_layers(model.graph, cfg)
        final = next((lay for lay in layers if lay.output.name == inputs.output and lay.node.graph is model.graph),
                     None)
        if final is None:
            stats.notes.append(f"no MatMul/Gemm produces '{inputs.output}': no classifier to fit to the logit loss")
            return
        result = fit_classifier(model, final, data, teacher_logits, labels, alpha=cfg.alpha,
                                temperature=cfg.temperature, seed=seed, batch_size=ctx.batch_size)
        stats.metrics["classifier"] = result
        if "skipped" in result:
            stats.skip(final.label, result["skipped"])
        elif result["accepted"]:
            stats.touch(f"{final.label}: logit loss (held out) {result['held_out_loss_before']:.4g} -> "
                        f"{result['held_out_loss_after']:.4g} by L-BFGS")
        else:
            stats.skip(final.label, "L-BFGS did not lower the held-out logit loss (weights kept)")


class _Inputs:
    """The teacher model, teacher logits and logits output of one distill step, checked."""

    def __init__(self):
        self.teacher: ir.Model | None = None
        self.teacher_source = ""
        self.logits: np.ndarray | None = None
        self.logits_source = ""
        self.output = ""

    @classmethod
    def read(cls, cfg: DistillConfig, model: ir.Model, ctx: PassContext) -> _Inputs:
        from onnxcomp.model import load_model

        self = cls()
        data: Dataset | None = ctx.calib
        gate_output = ctx.fidelity.output if ctx.fidelity is not None else None
        outputs = [v.name for v in model.graph.outputs]
        self.output = gate_output or outputs[0]
        if self.output not in outputs:
            raise OnnxcompError(f"distill: the model has no output '{self.output}' (outputs: {', '.join(outputs)})")
        classes = _static_last_dim(next(v for v in model.graph.outputs if v.name == self.output))
        if cfg.teacher:
            path = Path(cfg.teacher)
            if not path.is_file():
                raise OnnxcompError(f"{path}: no such teacher model")
            self.teacher = load_model(path)
            self.teacher_source = str(path)
            if self.output not in [v.name for v in self.teacher.graph.outputs]:
                raise OnnxcompError(f"{path}: the teacher has no output '{self.output}'")
        elif ctx.original is not None:
            self.teacher, self.teacher_source = ctx.original, "the run's input model"
        if cfg.teacher_logits:
            self.logits = load_teacher_logits(cfg.teacher_logits)
            self.logits_source = str(cfg.teacher_logits)
            samples = None if data is None else len(data)
            check_logits(self.logits, self.logits_source, samples=samples, classes=classes,
                         data_source=data.source if data is not None else "the calibration data")
        elif self.teacher is None:
            raise OnnxcompError("distill: no teacher: give teacher_logits (a .npy aligned with --calib) or teacher "
                                "(an ONNX model)")
        else:
            self.logits_source = f"computed from {self.teacher_source}"
        if data is not None:
            check_labels(data.labels, classes if classes is not None else (
                None if self.logits is None else self.logits.shape[-1]), cfg.alpha, data.source)
        return self


def _static_last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    last = value.shape[-1]
    return last if isinstance(last, int) else None


def _mse(student: np.ndarray, teacher: np.ndarray) -> float:
    return float(np.mean((student.astype(np.float64) - teacher.astype(np.float64)) ** 2))


def _top1(student: np.ndarray, teacher: np.ndarray) -> float:
    return round(float((student.argmax(-1) == teacher.argmax(-1)).mean()), 6)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return round(float((logits.argmax(-1) == labels[: len(logits)]).mean()), 6)
