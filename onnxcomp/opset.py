"""Opset upgrade as a recorded, verified step: old exports (opset 9-12) made usable by passes that
need newer operators (per-channel DequantizeLinear needs opset 13).

:func:`upgrade_opset` converts the default-domain opset with ``onnx.version_converter``, checks the
result with the ONNX checker, runs the original and the upgraded model in onnxruntime on the
calibration feeds (or seeded synthetic ones) and keeps the upgrade only when every output
matches. It reports what it did, or why it could not, as an :class:`OpsetUpgrade`; the pipeline lists it
among the run's passes as ``opset_upgrade``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.data import Dataset, synthetic_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import opset_version
from onnxcomp.runtime import open_session, run_batches

__all__ = ["upgrade_opset", "OpsetUpgrade", "VERIFY_FEEDS"]

VERIFY_FEEDS = 16  # calibration feeds the upgraded model is checked on
_RTOL, _ATOL = 1e-4, 1e-5


@dataclasses.dataclass
class OpsetUpgrade:
    """What :func:`upgrade_opset` did: ``done``, and one line saying what (``touched``) or why not."""

    done: bool
    what: str
    touched: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    metrics: dict = dataclasses.field(default_factory=dict)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append((what, why))

    def touch(self, what: str) -> None:
        self.touched.append(what)


def upgrade_opset(model: ir.Model, target: int, data: Dataset | None, *, needed_by: str,
                  seed: int = 0) -> OpsetUpgrade:
    """Upgrade ``model``'s default-domain opset to ``target`` in place when it is verified equal.

    On failure the model is left exactly as it was and the result says why.
    """
    current = opset_version(model)
    what = f"opset {current} -> {target} (needed by {needed_by})"
    stats = OpsetUpgrade(False, what)
    try:
        proto = ir.serde.serialize_model(model)
        converted = onnx.version_converter.convert_version(proto, target)
        onnx.checker.check_model(converted)
        upgraded = ir.serde.deserialize_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises anything (RuntimeError, ValueError, C++ errors)
        stats.skip(what, f"onnx.version_converter cannot convert this model: {_short(exc)}")
        return stats
    feeds = _verification_feeds(model, data, seed)
    try:
        worst = _compare(model, upgraded, feeds)
    except OnnxcompError as exc:
        stats.skip(what, f"the upgraded model does not run in onnxruntime: {exc}")
        return stats
    if worst is not None:
        stats.skip(what, f"the upgraded model's outputs differ in onnxruntime ({worst}): kept opset {current}")
        return stats
    model.graph = upgraded.graph
    model.ir_version = max(model.ir_version, upgraded.ir_version)
    for name, function in upgraded.functions.items():
        model.functions[name] = function
    source = "calibration" if data is not None else "synthetic"
    stats.touch(f"default-domain opset {current} -> {target} with onnx.version_converter for {needed_by}; "
                f"outputs equal in onnxruntime on {len(feeds)} {source} feeds (rtol {_RTOL:g})")
    stats.metrics.update(opset_before=current, opset_after=target, verified_feeds=len(feeds))
    stats.done = True
    return stats


def _verification_feeds(model: ir.Model, data: Dataset | None, seed: int) -> list[dict[str, np.ndarray]]:
    data = data if data is not None else synthetic_data(model, n=VERIFY_FEEDS, seed=seed)
    feeds = []
    for feed in data.batches(8):
        feeds.append(feed)
        if len(feeds) >= VERIFY_FEEDS:
            break
    return feeds


def _compare(original: ir.Model, upgraded: ir.Model, feeds) -> str | None:
    """None when every output of every feed matches, else the first difference in words."""
    with open_session(original, what="original model") as s_old, \
            open_session(upgraded, what="upgraded model") as s_new:
        names = [o.name for o in s_old.get_outputs()]
        for old, new in zip(run_batches(s_old, feeds), run_batches(s_new, feeds)):
            for name, a, b in zip(names, old, new):
                a, b = np.asarray(a), np.asarray(b)
                if a.shape != b.shape:
                    return f"output '{name}' shape {list(a.shape)} -> {list(b.shape)}"
                if a.dtype.kind in "fc":
                    scale = float(np.max(np.abs(a))) if a.size else 0.0
                    if not np.allclose(a, b, rtol=_RTOL, atol=_ATOL * max(1.0, scale), equal_nan=True):
                        return f"output '{name}' max abs diff {float(np.max(np.abs(a - b))):.3g}"
                elif not np.array_equal(a, b):
                    return f"output '{name}' values changed"
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)
