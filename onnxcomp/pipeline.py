"""The pass manager: load, run the recipe's passes in order, verify, validate, gate.

:func:`compress` is the Python API behind ``onnxcomp run``. It never writes
anything itself: call :meth:`Result.save` to write the compressed model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.data import Dataset, load_data, synthetic_data
from onnxcomp.errors import GateFailed, OnnxcompError
from onnxcomp.model import PROTOBUF_LIMIT, has_external_tensors, load_model, model_nbytes, save_model
from onnxcomp.passes.base import PassContext, PassStats
from onnxcomp.recipe import Recipe, load_recipe
from onnxcomp.registry import get_pass
from onnxcomp.report import measure_latency, model_summary
from onnxcomp.runtime import open_session
from onnxcomp.validate import check_gate, compare, select_target

__all__ = ["compress", "run_passes", "verify_model", "Result"]

DataLike = str | os.PathLike | Mapping[str, np.ndarray] | Dataset


@dataclasses.dataclass
class Result:
    """A compressed model (in memory), its report, and the gate's verdict."""

    model: ir.Model
    report: dict[str, Any]
    input_path: Path | None = None

    @property
    def gate_passed(self) -> bool:
        return self.report["gate"]["passed"]

    @property
    def failures(self) -> list[str]:
        return self.report["gate"]["failures"]

    def save(self, path: str | os.PathLike, *, force: bool = False,
             external_data: bool | None = None) -> Path:
        """Write the model atomically; refuses when the gate failed unless ``force``."""
        if not self.gate_passed and not force:
            raise GateFailed("validation gate failed, nothing written: " + "; ".join(self.failures))
        protect = (self.input_path,) if self.input_path else ()
        written = save_model(self.model, path, protect=protect, external_data=external_data)
        self.report["output"] = str(written)
        self.report["compressed"]["size_bytes"] = _file_size(written)
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
) -> Result:
    """Run ``recipe`` on ``model``, validate against the original, and check the gate.

    ``model`` is a path or an onnx-ir model (left untouched: the passes work on a copy).
    ``calib``/``val`` are .npz paths, mappings of arrays, or Datasets. Without ``val``
    fidelity is measured on seeded synthetic inputs and accuracy is not reported.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    input_path = None
    if isinstance(model, ir.Model):
        original = model
    else:
        input_path = Path(model)
        original = load_model(input_path)
    select_target(original, recipe.gate.output, recipe.gate.mask_input,  # a bad name fails before any work
                  fields=(f"{recipe.source}: gate.output", f"{recipe.source}: gate.mask_input"))
    seed = recipe.seed if seed is None else seed
    calib_data = load_data(calib, original) if calib is not None else None
    val_data = load_data(val, original) if val is not None else None
    for step in recipe.steps:  # fail before any work when data is missing
        if get_pass(step.name).calibration_needed(step.config) and calib_data is None:
            raise OnnxcompError(f"{recipe.source}: pass '{step.name}' needs calibration data: pass --calib DATA.npz")

    with open_session(original, what="original model"):
        pass  # a model onnxruntime cannot run is the user's input problem, not a pass bug
    working = original.clone()
    context = PassContext(calib=calib_data, seed=seed, batch_size=batch_size, progress=progress,
                          gate=recipe.gate)
    stats = run_passes(working, recipe, context, verify_each=verify_each)
    verify_model(working, "the compressed model")

    eval_data = val_data if val_data is not None else synthetic_data(original, seed=seed)
    shapes = {k: v.shape for k, v in eval_data.inputs.items()}
    report: dict[str, Any] = {
        "model": str(input_path) if input_path else "<in-memory>",
        "recipe": recipe.source,
        "seed": seed,
        "passes": [s.to_dict() for s in stats],
        "original": model_summary(original, input_path, shapes),
        "compressed": model_summary(working, None, shapes),
    }
    fidelity = compare(original, working, eval_data, batch_size=batch_size,
                       progress=_progress_bar("validating") if progress else None,
                       output=recipe.gate.output, mask_input=recipe.gate.mask_input)
    fidelity["synthetic_inputs"] = val_data is None
    report["fidelity"] = fidelity
    if latency_runs:
        report["original"]["latency"] = measure_latency(original, eval_data, runs=latency_runs)
        report["compressed"]["latency"] = measure_latency(working, eval_data, runs=latency_runs)
    extra = {"size_ratio": report["compressed"]["size_bytes"] / max(report["original"]["size_bytes"], 1)}
    quant = _fusion_report(working)
    if quant is not None:
        report["quantization"] = quant
        extra["fused_ratio"] = quant.get("fused_ratio")
    failures, unchecked = check_gate(recipe.gate, fidelity, extra)
    report["gate"] = {
        "checked": bool(recipe.gate.thresholds()),
        "thresholds": recipe.gate.thresholds(),
        "passed": not failures,
        "failures": failures,
        "unchecked": unchecked,
    }
    return Result(working, report, input_path)


def run_passes(model: ir.Model, recipe: Recipe, context: PassContext, *,
               verify_each: bool = False) -> list[PassStats]:
    """Run every step of ``recipe`` on ``model`` in place; return each pass's stats."""
    all_stats = []
    for index, step in enumerate(recipe.steps):
        cls = get_pass(step.name)
        instance = cls(step.config, context)
        start = time.perf_counter()
        result = instance(model)
        stats = result.stats or PassStats(step.name)
        stats.seconds = time.perf_counter() - start
        all_stats.append(stats)
        if verify_each:
            verify_model(model, f"the model after passes[{index}] ({step.name})")
    return all_stats


def verify_model(model: ir.Model, what: str) -> None:
    """The ONNX checker and onnxruntime both accept ``model``; else a bug in a pass."""
    if model_nbytes(model) < PROTOBUF_LIMIT and not has_external_tensors(model):
        proto = ir.serde.serialize_model(model)
        try:
            onnx.checker.check_model(proto, full_check=False)
        except onnx.checker.ValidationError as exc:
            raise RuntimeError(f"{what} fails the ONNX checker: {str(exc).splitlines()[0]}") from exc
    try:
        with open_session(model, what=what):
            pass
    except OnnxcompError as exc:
        raise RuntimeError(str(exc)) from exc


def _fusion_report(model: ir.Model) -> dict[str, Any] | None:
    """Which quantized nodes onnxruntime turns into int8 kernels (None: nothing quantized)."""
    quantized = any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits",
                                  "DynamicQuantizeLinear", "GatherBlockQuantized") for n in model.graph)
    if not quantized:
        return None
    try:
        from onnxcomp.fusion import fusion_report
    except ImportError:
        return None
    return fusion_report(model)


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


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)
