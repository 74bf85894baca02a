"""The int8 ``target`` option: the deployment CPU decides 7- vs 8-bit weights, never the CPU
running onnxcomp; the target is recorded in the model's metadata_props and the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxcomp.passes.quantize.int8_common as int8_common
import onnxcomp.qparams as qparams
from onnxcomp.pipeline import compress


def _run(model, calib, tmp_path, name, pass_name="quantize_static", **options):
    recipe = {"passes": ["cleanup", {pass_name: options}], "gate": {}}
    result = compress(model, recipe, calib=calib, latency_runs=0)
    out = tmp_path / f"{name}.onnx"
    result.save(out, force=True)
    return result, out


def _host(monkeypatch, saturating: bool) -> None:
    monkeypatch.setattr(qparams, "saturating_u8s8", lambda: saturating)
    monkeypatch.setattr(int8_common, "saturating_u8s8", lambda: saturating)


def _int8_weight_max(path) -> int:
    proto = onnx.load(path)
    return max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
               for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8)


@pytest.mark.parametrize("pass_name", ["quantize_static", "quantize_dynamic"])
def test_host_cpu_never_changes_output_bytes(pass_name, mlp_path, calib_path, tmp_path, monkeypatch):
    outputs = []
    for saturating in (True, False):
        _host(monkeypatch, saturating)
        _, out = _run(mlp_path, calib_path, tmp_path, f"{pass_name}_{saturating}", pass_name)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("target, bits", [("any", 7), ("vnni", 8), ("arm64", 8)])
def test_target_decides_weight_range_and_is_recorded(target, bits, mlp_path, calib_path, tmp_path, monkeypatch):
    _host(monkeypatch, True)  # an AVX2-only build machine
    result, out = _run(mlp_path, calib_path, tmp_path, target, target=target)
    assert _int8_weight_max(out) == (63 if bits == 7 else 127)
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["onnxcomp.target"] == target and meta["onnxcomp.weight_bits"] == str(bits)
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    assert stats["metrics"]["target"] == target and stats["metrics"]["weight_bits"] == bits
    assert result.report["compressed"]["metadata"]["onnxcomp.target"] == target
    saturation_note = any("saturate" in n for n in stats["notes"])
    assert saturation_note == (bits == 8)  # validation on this no-VNNI host is pessimistic for 8-bit targets


def test_explicit_reduce_range_wins_over_target():
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    assert np.abs(qparams.weight_params(w, 1, reduce_range=True, target="vnni")[1]).max() == 63
    assert np.abs(qparams.weight_params(w, 1, reduce_range=False, target="any")[1]).max() == 127
    with pytest.raises(ValueError):
        qparams.weight_reduce_range("auto", "x86")

