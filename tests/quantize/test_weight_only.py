"""quantize_static's weight-only layers: a layer whose int8 kernel would run slower than the float
one (a depthwise Conv), or whose activations cannot be int8 (raw 16-bit audio into an STFT filter
bank, a power spectrum near 1e11), computes in float but stores its weight int8 — and says so.

Reproduces two corpus models in small: ppocr_cls_v2 (MobileNetV3, depthwise 5x5 Convs: int8
ran 2.2x slower than fp32) and openWakeWord's melspectrogram (STFT Conv + power + mel MatMul:
nothing quantized, size 1.00x).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcomp.pipeline import compress
from onnxcomp.runtime import optimized_graph
from tests.builders import random_init



def _int8(recipe_options: dict | None = None, *, after: tuple = ()) -> dict:
    options = {"method": "percentile", **(recipe_options or {})}
    return {"passes": ["cleanup", {"quantize_static": options}, *after], "gate": {}}


def mobile_block(seed: int = 0) -> onnx.ModelProto:
    """1x1 Conv -> Relu -> depthwise 5x5 Conv -> Relu -> 1x1 Conv (a MobileNet block)."""
    init = random_init(seed)

    inits = [init("w1", 32, 8, 1, 1), init("b1", 32, scale=0.1), init("wd", 32, 1, 5, 5), init("bd", 32, scale=0.1),
             init("w2", 8, 32, 1, 1), init("b2", 8, scale=0.1)]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"),
             h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "wd", "bd"], ["cd"], name="depthwise", group=32, pads=[2, 2, 2, 2]),
             h.make_node("Relu", ["cd"], ["rd"], name="relu2"),
             h.make_node("Conv", ["rd", "w2", "b2"], ["y"], name="project")]
    graph = h.make_graph(nodes, "mobile_block", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def stft_mel(seed: int = 0) -> onnx.ModelProto:
    """Raw int16-scale audio [N, samples] -> Unsqueeze -> two Conv1d filter banks (cos, sin windows)
    -> squares -> Add -> Transpose -> mel MatMul -> Log (openWakeWord's melspectrogram, smaller)."""
    n_fft, hop, bins, mels = 128, 32, 65, 16
    t = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * t / n_fft)
    k = np.arange(bins)[:, None]
    cos = (np.cos(2 * np.pi * k * t / n_fft) * window)[:, None, :].astype(np.float32)
    sin = (-np.sin(2 * np.pi * k * t / n_fft) * window)[:, None, :].astype(np.float32)
    mel = np.maximum(0, 1 - np.abs(np.linspace(0, mels - 1, bins)[:, None] - np.arange(mels)[None, :]))
    inits = [nh.from_array(cos, "cos"), nh.from_array(sin, "sin"), nh.from_array(mel.astype(np.float32), "mel"),
             nh.from_array(np.array([1], np.int64), "axis1"), nh.from_array(np.array(2.0, np.float32), "two"),
             nh.from_array(np.array(1e-6, np.float32), "eps")]
    conv = {"kernel_shape": [n_fft], "strides": [hop]}
    nodes = [h.make_node("Unsqueeze", ["audio", "axis1"], ["a"], name="unsqueeze"),
             h.make_node("Conv", ["a", "cos"], ["re"], name="stft_real", **conv),
             h.make_node("Conv", ["a", "sin"], ["im"], name="stft_imag", **conv),
             h.make_node("Pow", ["re", "two"], ["re2"], name="re_squared"),
             h.make_node("Pow", ["im", "two"], ["im2"], name="im_squared"),
             h.make_node("Add", ["re2", "im2"], ["power"], name="power"),
             h.make_node("Transpose", ["power"], ["frames"], name="frames", perm=[0, 2, 1]),
             h.make_node("MatMul", ["frames", "mel"], ["m"], name="mel_matmul"),
             h.make_node("Add", ["m", "eps"], ["m_eps"], name="floor"),
             h.make_node("Log", ["m_eps"], ["y"], name="log")]
    graph = h.make_graph(nodes, "stft_mel", [h.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", 1024])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None, 16])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def speech_like(n: int, seed: int = 1) -> np.ndarray:
    """Harmonic tones with a loud and a quiet part, at 16-bit PCM scale (not noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(1024) / 16000
    out = []
    for _ in range(n):
        f0 = rng.uniform(90, 300)
        tone = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
        envelope = np.where(t < t[512], 1.0, 0.03)
        out.append(tone * envelope * rng.uniform(3000, 15000) + rng.standard_normal(1024) * 30)
    return np.stack(out).astype(np.float32)


def _skips(result) -> dict[str, str]:
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    return {s["what"]: s["why"] for s in stats["skipped"]}


def _int8_initializers(model) -> dict[str, tuple]:
    return {v.name: tuple(v.shape) for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype.name == "INT8"}


def test_depthwise_conv_computes_in_float_with_int8_weights(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(mobile_block(), path)
    data = {"x": np.abs(np.random.default_rng(1).standard_normal((64, 8, 12, 12))).astype(np.float32)}
    result = compress(path, _int8(), calib=data, val=data, latency_runs=0)
    why = _skips(result)["Conv depthwise"]
    assert why.startswith("depthwise Conv: onnxruntime's CPU int8 depthwise kernel runs slower than its float one")
    assert "its weight is stored int8" in why
    quant = result.report["quantization"]
    assert quant["int8_kernels"] == {"QLinearConv": 2} and quant["fused_ratio"] == 1.0
    assert quant["weight_only"] == 1 and quant["unfused"] == []
    assert tuple(_int8_initializers(result.model).values()).count((32, 1, 5, 5)) == 1
    # onnxruntime folds the rescale when the session starts: the depthwise Conv runs on a float constant
    optimized = optimized_graph(result.model)
    assert not {"Cast", "Mul"} & {n.op_type for n in optimized.graph}
    assert result.report["fidelity"]["cosine"] > 0.999
    out = tmp_path / "block_int8.onnx"
    result.save(out)
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_depthwise_conv_int8_when_asked(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(mobile_block(), path)
    data = {"x": np.abs(np.random.default_rng(1).standard_normal((64, 8, 12, 12))).astype(np.float32)}
    result = compress(path, _int8({"depthwise_conv": "int8"}), calib=data, val=data, latency_runs=0)
    assert result.report["quantization"]["int8_kernels"] == {"QLinearConv": 3}
    assert result.report["quantization"]["weight_only"] == 0 and "Conv depthwise" not in _skips(result)
    plain = compress(path, _int8({"weight_only": False}), calib=data, val=data, latency_runs=0)
    assert plain.report["quantization"]["weight_only"] == 0  # float weight, float compute
    assert "its weight is stored int8" not in _skips(plain)["Conv depthwise"]
    assert (32, 1, 5, 5) not in _int8_initializers(plain.model).values()


def test_filter_bank_on_raw_audio_keeps_float_activations_and_int8_weights(tmp_path):
    """Audio at ±2e4 and a power spectrum near 1e11 cannot be int8 (8 bits over that range zero
    every quiet frame); the STFT Convs and the mel MatMul keep float activations, their weights go
    int8: the file shrinks to ~1/4 and the log-mel output stays faithful."""
    path = tmp_path / "mel.onnx"
    onnx.save(stft_mel(), path)
    calib, val = {"audio": speech_like(48, seed=1)}, {"audio": speech_like(32, seed=2)}
    result = compress(path, _int8(), calib=calib, val=val, latency_runs=0)
    skips = _skips(result)
    for node in ("Conv stft_real", "Conv stft_imag", "MatMul mel_matmul"):
        assert "beyond max_range" in skips[node] and "its weight is stored int8" in skips[node], node
    report = result.report
    assert report["compressed"]["size_bytes"] < 0.5 * report["original"]["size_bytes"]
    assert report["fidelity"]["cosine"] >= 0.99
    stats = next(p for p in report["passes"] if p["name"] == "quantize_static")
    assert sorted(stats["metrics"]["weight_only"]) == ["mel_matmul", "stft_imag", "stft_real"]
    assert "QuantizeLinear" not in {n.op_type for n in result.model.graph}  # no int8 activation anywhere
    # without the fallback nothing is quantized and the file keeps its size
    plain = compress(path, _int8({"weight_only": False}), calib=calib, val=val, latency_runs=0)
    assert plain.report["compressed"]["size_bytes"] > 0.95 * report["original"]["size_bytes"]


def test_cleanup_after_quantization_keeps_int8_weights(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(mobile_block(), path)
    data = {"x": np.abs(np.random.default_rng(1).standard_normal((32, 8, 12, 12))).astype(np.float32)}
    result = compress(path, _int8(after=("cleanup",)), calib=data, val=data, latency_runs=0)
    assert (32, 1, 5, 5) in _int8_initializers(result.model).values()  # the Cast of an int8 weight is not folded
    assert result.report["quantization"]["weight_only"] == 1


def test_saved_file_has_no_value_info_restating_initializers_or_qdq_outputs(tmp_path):
    path = tmp_path / "block.onnx"
    onnx.save(mobile_block(), path)
    data = {"x": np.abs(np.random.default_rng(1).standard_normal((32, 8, 12, 12))).astype(np.float32)}
    result = compress(path, _int8(), calib=data, val=data, latency_runs=0)
    out = tmp_path / "block_int8.onnx"
    result.save(out)
    proto = onnx.load(out)
    graph = proto.graph
    restated = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output
                                                    if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert restated and not restated & {v.name for v in graph.value_info}
    assert out.stat().st_size == result.report["compressed"]["size_bytes"]
    onnx.checker.check_model(proto, full_check=True)
    x = data["x"][:4]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.999


def test_dynamic_convs_store_int8_weights_and_run_as_float(tmp_path):
    """quantize_dynamic has no int8 Conv (ConvInteger is slower): the Convs compute in float, their
    weights are stored int8, and onnxruntime folds the rescale at load (no Cast/Mul left to run)."""
    path = tmp_path / "block.onnx"
    onnx.save(mobile_block(), path)
    data = {"x": np.abs(np.random.default_rng(1).standard_normal((16, 8, 12, 12))).astype(np.float32)}
    result = compress(path, "int8-dynamic", val=data, latency_runs=0)
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize_dynamic")
    assert stats["metrics"]["weight_only"] == 3
    assert sorted(_int8_initializers(result.model).values()) == [(8, 32, 1, 1), (32, 1, 5, 5), (32, 8, 1, 1)]
    assert not {"Cast", "Mul"} & {n.op_type for n in optimized_graph(result.model).graph}
    assert result.report["fidelity"]["cosine"] > 0.999
    plain = compress(path, {"passes": ["cleanup", {"quantize_dynamic": {"weight_only": False}}], "gate": {}},
                     val=data, latency_runs=0)
    assert not _int8_initializers(plain.model)
