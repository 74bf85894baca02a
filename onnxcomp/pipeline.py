"""The pass manager: load, run the recipe's passes in order, verify, validate, gate.

:func:`compress` is the Python API behind ``onnxcomp run``. It never writes
anything itself: call :meth:`Result.save` to write the compressed model.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.data import Dataset, load_data, synthetic_data
from onnxcomp.errors import GateFailed, OnnxcompError
from onnxcomp.graph import opset_version
from onnxcomp.model import (
    PROTOBUF_LIMIT,
    has_external_tensors,
    input_files,
    load_model,
    model_nbytes,
    release_external,
    save_model,
)
from onnxcomp.passes.base import PassContext, PassStats
from onnxcomp.recipe import Recipe, load_recipe
from onnxcomp.registry import get_pass
from onnxcomp.report import measure_latencies, model_summary
from onnxcomp.runtime import IN_MEMORY_LIMIT, open_session, session_options
from onnxcomp.validate import (
    FidelityCheck,
    check_data,
    check_gate,
    compare,
    reference_outputs,
    select_target,
    slower_note,
)

__all__ = ["compress", "run_passes", "verify_model", "Result"]

DataLike = str | os.PathLike | Mapping[str, np.ndarray] | Dataset


@dataclasses.dataclass
class Result:
    """A compressed model (in memory), its report, and the gate's verdict."""

    model: ir.Model
    report: dict[str, Any]
    input_path: Path | None = None
    protect: tuple[str, ...] = ()  # the input model and its external data files

    @property
    def gate_passed(self) -> bool:
        return self.report["gate"]["passed"]

    @property
    def failures(self) -> list[str]:
        return self.report["gate"]["failures"]

    def save(self, path: str | os.PathLike, *, force: bool = False,
             external_data: bool | None = None, report: str | os.PathLike | None = None) -> Path:
        """Write the model atomically (and the JSON ``report`` with it); refuses when the gate
        failed unless ``force``. Never over the input model or its external data."""
        if not self.gate_passed and not force:
            raise GateFailed("validation gate failed, nothing written: " + "; ".join(self.failures))
        from onnxcomp.report import report_json

        def render(size: int) -> str:
            self.report["output"] = str(path)
            self.report["compressed"]["size_bytes"] = size
            return report_json(self.report)

        if external_data is None:
            external_data = model_nbytes(self.model) > PROTOBUF_LIMIT
        extra = [(report, render)] if report is not None else []
        written = save_model(self.model, path, protect=self.protect, external_data=external_data, extra=extra)
        if not extra:
            render(_file_size(written, external_data))
        return written


def compress(
    model: str | os.PathLike | ir.Model,
    recipe: str | os.PathLike | dict | Recipe,
    *,
    calib: DataLike | None = None,
    val: DataLike | None = None,
    seed: int | None = None,
    verify_each: bool = False,
    latency_runs: int = 30,
    batch_size: int = 32,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> Result:
    """Run ``recipe`` on ``model``, validate against the original, and check the gate.

    ``model`` is a path or an onnx-ir model (left untouched: the passes work on a copy).
    ``calib``/``val`` are .npz paths, mappings of arrays, or Datasets. Without ``val``
    fidelity is measured on ``calib`` (``report["fidelity"]["data_kind"]`` says which), and
    without either on seeded synthetic inputs: then the gate was not checked on real data.
    NaN/Inf in float inputs is an error unless ``allow_nonfinite``.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    for name, value in (("seed", seed), ("latency_runs", latency_runs), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                  or value < (1 if name == "batch_size" else 0)):
            raise OnnxcompError(f"{name} must be a non-negative integer (got {value!r})")
    input_path = None
    protect: tuple[str, ...] = ()
    if isinstance(model, ir.Model):
        original = model
    else:
        input_path = Path(model)
        original = load_model(input_path)
        protect = tuple(sorted(input_files(input_path)))
    target = select_target(original, recipe.gate.output, recipe.gate.mask_input,  # a bad name fails early
                           fields=(f"{recipe.source}: gate.output", f"{recipe.source}: gate.mask_input"))
    seed = recipe.seed if seed is None else seed
    calib_data = load_data(calib, original, allow_nonfinite=allow_nonfinite) if calib is not None else None
    val_data = load_data(val, original, allow_nonfinite=allow_nonfinite) if val is not None else None
    if val_data is not None:
        eval_data, data_kind = val_data, "validation"
    elif calib_data is not None:
        eval_data, data_kind = calib_data, "calibration"
    else:
        eval_data, data_kind = synthetic_data(original, seed=seed), "synthetic"
    check_data(original, eval_data, target)
    for step in recipe.steps:  # fail before any work when data is missing
        if get_pass(step.name).calibration_needed(step.config) and calib_data is None:
            raise OnnxcompError(f"{recipe.source}: pass '{step.name}' needs calibration data: pass --calib DATA.npz")

    with open_session(original, session_options(prepack=False), what="original model", path=input_path):
        pass  # a model onnxruntime cannot run is the user's input problem, not a pass bug
    working = original.clone()
    context = PassContext(calib=calib_data, seed=seed, batch_size=batch_size, progress=progress,
                          fidelity=FidelityCheck(recipe.gate), original=original)
    for step in recipe.steps:  # files the passes read: checked before any work
        get_pass(step.name).check(step.config, original, context)
    stats = run_passes(working, recipe, context, verify_each=verify_each)
    release_external(original)  # the passes read the mapped weights: unmap them (shared with working)
    verify_model(working, "the compressed model")

    shapes = eval_data.feed_shapes()
    report: dict[str, Any] = {
        "model": str(input_path) if input_path else "<in-memory>",
        "recipe": recipe.source,
        "seed": seed,
        "passes": [s.to_dict() for s in stats],
        "original": model_summary(original, input_path, shapes),
        "compressed": model_summary(working, None, shapes),
    }
    layouts = _data_layouts(calib=calib_data, val=val_data)
    if layouts:
        report["data_layout"] = layouts
    reference = None
    if has_external_tensors(original) or model_nbytes(original) >= PROTOBUF_LIMIT:
        # a large original runs alone (its outputs kept), never beside the compressed model
        reference = reference_outputs(original, eval_data, batch_size, path=input_path)
    fidelity = compare(original, working, eval_data, batch_size=batch_size,
                       progress=_progress_bar("validating") if progress else None,
                       output=recipe.gate.output, mask_input=recipe.gate.mask_input, reference=reference)
    del reference
    fidelity["synthetic_inputs"] = data_kind == "synthetic"
    fidelity["data_kind"] = data_kind
    report["fidelity"] = fidelity
    if latency_runs:
        report["original"]["latency"], report["compressed"]["latency"] = measure_latencies(
            [(original, input_path), (working, None)], eval_data, runs=latency_runs)
    extra = {"size_ratio": report["compressed"]["size_bytes"] / max(report["original"]["size_bytes"], 1)}
    if latency_runs and report["original"]["latency"]["median_ms"] > 0:
        extra["latency_ratio"] = report["compressed"]["latency"]["median_ms"] / report["original"]["latency"]["median_ms"]
        report["latency_ratio"] = round(extra["latency_ratio"], 4)
        note = slower_note(extra["latency_ratio"], report["compressed"])
        if note:
            report["latency_note"] = note
    quant = _fusion_report(working, original)
    if quant is not None:
        report["quantization"] = quant
        extra["fused_ratio"] = quant.get("fused_ratio")
        if "float_fusions" in quant:
            extra["lost_fusions"] = quant["float_fusions"]["lost"]
    failures, unchecked = check_gate(recipe.gate, fidelity, extra)
    report["gate"] = {
        "checked": bool(recipe.gate.thresholds()),
        "thresholds": recipe.gate.thresholds(),
        "passed": not failures,
        "failures": failures,
        "unchecked": unchecked,
        "data_kind": data_kind,  # validation | calibration | synthetic (then not checked on real data)
    }
    return Result(working, report, input_path, protect)


def run_passes(model: ir.Model, recipe: Recipe, context: PassContext, *,
               verify_each: bool = False) -> list[PassStats]:
    """Run every step of ``recipe`` on ``model`` in place; return each pass's stats.

    A pass that reads ``context.original`` (distill's teacher) gets a copy of ``model`` as it
    came in when the context has none (Python use outside :func:`compress`)."""
    all_stats = []
    if context.original is None and any(get_pass(step.name).uses_original for step in recipe.steps):
        context = dataclasses.replace(context, original=model.clone())
    tried: set[int] = set()
    for index, step in enumerate(recipe.steps):
        cls = get_pass(step.name)
        if cls.min_opset > opset_version(model) and cls.min_opset not in tried:
            tried.add(cls.min_opset)
            all_stats.append(_upgrade_opset(model, cls.min_opset, context, step.name))
        instance = cls(step.config, context)
        start = time.perf_counter()
        weights = weight_bytes(model)
        result = instance(model)
        stats = result.stats or PassStats(step.name)
        stats.seconds = time.perf_counter() - start
        grown = weight_bytes(model)
        if grown > weights * 1.001 + 64:
            stats.notes.append(f"the model grew: weights {weights:,} -> {grown:,} bytes")
        all_stats.append(stats)
        if verify_each:
            verify_model(model, f"the model after passes[{index}] ({step.name})")
    return all_stats


def _upgrade_opset(model: ir.Model, target: int, context: PassContext, needed_by: str) -> PassStats:
    """The verified opset upgrade (onnxcomp.opset) as a step of the run, with its own stats."""
    from onnxcomp.opset import upgrade_opset

    start = time.perf_counter()
    result = upgrade_opset(model, target, context.calib, needed_by=f"pass '{needed_by}'", seed=context.seed)
    stats = PassStats("opset_upgrade", touched=result.touched, skipped=result.skipped, metrics=result.metrics)
    stats.seconds = time.perf_counter() - start
    return stats


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every constant tensor (initializers of all graphs, Constant nodes)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        total += sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
        for node in graph:
            if node.op_type == "Constant" and "value" in node.attributes:
                value = node.attributes["value"].value
                total += getattr(value, "nbytes", 0)
    return total


def verify_model(model: ir.Model, what: str) -> None:
    """The ONNX checker and onnxruntime both accept ``model``; else a bug in a pass.

    A large model is checked from a temporary file (external data, mapped weights released after
    the write), never as one protobuf in memory; the session keeps no packed weights (nothing runs).
    """
    large = model_nbytes(model) >= IN_MEMORY_LIMIT or has_external_tensors(model)
    with tempfile.TemporaryDirectory(prefix="onnxcomp-verify-") as tmp:
        path = os.path.join(tmp, "model.onnx") if large else None
        if large:
            ir.save(model, path, external_data="model.onnx.data")
            release_external(model)  # the save read every mapped weight: unmap them
            _check(lambda: onnx.checker.check_model(path, full_check=False), what)
        else:
            _check(lambda: onnx.checker.check_model(ir.serde.serialize_model(model), full_check=False), what)
        try:
            with open_session(model, session_options(prepack=False), what=what, path=path):
                pass
        except OnnxcompError as exc:
            raise RuntimeError(str(exc)) from exc


def _check(checker, what: str) -> None:
    try:
        checker()
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"{what} fails the ONNX checker: {str(exc).splitlines()[0]}") from exc


def _fusion_report(model: ir.Model, original: ir.Model) -> dict[str, Any] | None:
    """Which quantized nodes onnxruntime turns into int8 kernels (None: nothing quantized), and
    whether the original's float fusions survived (not checked for an original too large to
    optimize in memory)."""
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits",
                                  "DynamicQuantizeLinear", "GatherBlockQuantized") for n in model.graph)
    if not quantized:
        return None
    try:
        from onnxcomp.fusion import fusion_report
    except ImportError:
        return None
    small = model_nbytes(original) < PROTOBUF_LIMIT and not has_external_tensors(original)
    return fusion_report(model, original if small else None)


def _data_layouts(**sets: Dataset | None) -> dict[str, dict[str, str]]:
    """Which layout each input's array used, per data set (empty when every input is batch-first)."""
    out = {}
    for what, data in sets.items():
        if data is not None and any(data.layout(k) != "batch" for k in data.inputs):
            out[what] = data.layout_summary()
    return out


def _progress_bar(label: str):
    from rich.progress import Progress

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = Progress(transient=True)
            state["bar"].start()
            state["task"] = state["bar"].add_task(label, total=total)
        state["bar"].update(state["task"], completed=done)
        if done >= total:
            state["bar"].stop()
            state.clear()

    return update


def _file_size(path: Path, external: bool) -> int:
    from onnxcomp.model import input_files

    files = input_files(path) if external else {str(path)}
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))
