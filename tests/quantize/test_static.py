"""quantize_static / quantize_dynamic on the shipped digits models and a synthetic graph.

Bounds: every method keeps val accuracy within 1 point of fp32 on both digits models, and every
Conv/MatMul/Gemm becomes an int8 kernel in onnxruntime (fused_ratio 1.0).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from onnxcomp.pipeline import compress
from onnxcomp.qparams import activation_params, weight_params
from onnxcomp.runtime import optimized_graph
from tests.builders import (
    gemm_variants,
    kitchen_sink,
    kitchen_sink_data,
    masked_attention,
    random_init,
)

MAX_DROP = 0.01


def static(model, calib, val=None, **options):
    recipe = {"passes": ["cleanup", {"quantize_static": options}]}
    return compress(model, recipe, calib=calib, val=val, latency_runs=0)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_static_accuracy_and_fusion(name, method, cnn_path, mlp_path, calib_path, val_path):
    result = static(cnn_path if name == "cnn" else mlp_path, calib_path, val_path, method=method)
    fidelity, quant = result.report["fidelity"], result.report["quantization"]
    assert fidelity["accuracy_drop"] <= MAX_DROP
    assert quant["fused_ratio"] == 1.0 and quant["compute"]["quantized"] == (4 if name == "cnn" else 3)
    assert quant["unfused"] == [] and quant["float_ops_reading_dequantized"] == {}
    ops = {n.op_type for n in result.model.graph}
    assert not ops & {"BatchNormalization", "Relu"}  # folded into Conv / into the QuantizeLinear


def test_entropy_method_is_refused_with_the_reason_before_any_work(cnn_path):
    with pytest.raises(OnnxcompError, match=r"method: method 'entropy' was removed: .* use 'percentile'"):
        static(cnn_path, calib=None, method="entropy")  # no calibration data needed to refuse it


def test_static_graph_shape(cnn_path, calib_path):
    result = static(cnn_path, calib_path, weight_method="mse")
    kernels = result.report["quantization"]["int8_kernels"]
    assert kernels["QLinearConv"] == 2 and kernels["QGemm"] == 2
    graph = result.model.graph
    weights = [n for n in graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    by_type = {}
    for dq in weights:
        by_type.setdefault(dq.inputs[0].const_value.dtype, []).append(dq)
    assert len(by_type[onnx.TensorProto.INT8]) == 4 and len(by_type[onnx.TensorProto.INT32]) == 4  # W, bias
    conv_w = next(dq for dq in by_type[onnx.TensorProto.INT8] if dq.outputs[0].consumers()[0].op_type == "Conv")
    assert conv_w.attributes.get_int("axis") == 0 and conv_w.inputs[1].const_value.shape == (16,)
    assert graph.outputs[0].name == "logits"  # the last Gemm keeps a float output (QGemm, no Q/DQ)
    assert graph.outputs[0].producer().op_type == "Gemm"


def test_mlp_matmul_add_becomes_gemm(mlp_path, calib_path):
    result = static(mlp_path, calib_path)
    gemms = [n.name for n in result.model.graph if n.op_type == "Gemm"]
    assert gemms == ["/fc1/Gemm", "/fc2/MatMul", "/fc3/Gemm"]
    assert result.report["quantization"]["int8_kernels"] == {"QGemm": 3}


def test_int8_activations_fuse_on_single_consumer_graphs(cnn_path, calib_path, val_path):
    result = static(cnn_path, calib_path, val_path, activation_type="int8")
    assert result.report["quantization"]["fused_ratio"] == 1.0
    assert result.report["fidelity"]["accuracy_drop"] <= MAX_DROP
    zero_points = [n.inputs[2].const_value.numpy() for n in result.model.graph if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 for z in zero_points)


def test_determinism(tmp_path, cnn_path, calib_path):
    paths = []
    for i in range(2):
        result = static(cnn_path, calib_path, method="mse")
        paths.append(result.save(tmp_path / f"q{i}.onnx"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_exclusions_keep_nodes_float(cnn_path, calib_path, val_path):
    result = static(cnn_path, calib_path, val_path, exclude=["/head/head.0/*", "Conv"])
    graph = result.model.graph
    for name in ("/head/head.0/Gemm", "/features/features.0/Conv", "/features/features.3/Conv"):
        node = next(n for n in graph if n.name == name)
        assert node.inputs[1].const_value is not None  # float weight, no DequantizeLinear
    quant = result.report["quantization"]
    assert quant["compute"]["quantized"] == 1 and quant["fused_ratio"] == 1.0
    assert quant["int8_kernels"].get("QLinearConv", 0) == 0 and quant["int8_kernels"]["QGemm"] == 1
    # onnxruntime does not quantize the excluded Gemm on its own (WeightBiasQuantization)
    optimized = optimized_graph(result.model)
    assert any(n.op_type in ("Gemm", "FusedGemm") and n.name.endswith("/head/head.0/Gemm") for n in optimized.graph)
    assert result.report["fidelity"]["accuracy_drop"] <= MAX_DROP
    skipped = {s["what"] for s in result.report["passes"][1]["skipped"]}
    assert "Gemm /head/head.0/Gemm" in skipped


def test_dynamic_mlp(mlp_path, val_path):
    result = compress(mlp_path, "int8-dynamic", val=val_path, latency_runs=0)
    quant = result.report["quantization"]
    assert quant["fused_ratio"] == 1.0
    assert set(quant["int8_kernels"]) <= {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
    assert sum(quant["int8_kernels"].values()) == 3
    assert result.report["fidelity"]["accuracy_drop"] <= MAX_DROP


def test_dynamic_skips_conv_with_reason(cnn_path, val_path):
    result = compress(cnn_path, "int8-dynamic", val=val_path, latency_runs=0)
    stats = result.report["passes"][1]
    assert len(stats["touched"]) == 4 and len(stats["skipped"]) == 2  # 2 MatMul/Gemm, 2 Convs with int8 weights only
    assert all("ConvInteger" in s["why"] and "stored int8" in s["why"] for s in stats["skipped"])
    assert result.report["quantization"]["int8_kernels"] == {"DynamicQuantizeMatMul": 2}
    assert result.report["quantization"]["weight_only"] == 2 and result.report["quantization"]["fused_ratio"] == 1.0
    assert result.report["fidelity"]["accuracy_drop"] <= MAX_DROP


def test_kitchen_sink_every_int8_capable_op_fuses(tmp_path):
    path = tmp_path / "sink.onnx"
    onnx.save(kitchen_sink(), path)
    data = kitchen_sink_data()
    result = static(path, data, data)
    quant = result.report["quantization"]
    assert quant["fused_ratio"] == 1.0 and quant["unfused"] == []
    assert quant["compute"] == {"quantized": 6, "fused": 6} and quant["other"] == {"quantized": 8, "fused": 8}
    for kernel in ("QLinearAdd", "QLinearAveragePool", "QLinearConcat", "QLinearGlobalAveragePool",
                   "QLinearConv", "QGemm"):
        assert kernel in quant["int8_kernels"]
    assert quant["int8_kernels"]["QLinearAdd"] == 1  # the bias Add before LayerNorm stays float (dead end)
    # the 3-D MatMul, the attention MatMul (before Softmax) and the last keep float outputs
    assert quant["int8_kernels"]["MatMulIntegerToFloat"] == 3
    assert quant["float_ops_reading_dequantized"] == {}  # no DQ in front of a float op
    float_ops = {n.name for n in result.model.graph if n.op_type in ("Add", "LayerNormalization", "Sigmoid", "Softmax")
                 and not any(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                             for v in n.inputs)}
    assert float_ops == {"bias_add", "layernorm", "sigmoid", "softmax"}
    skipped = {s["what"]: s["why"] for s in result.report["passes"][1]["skipped"]}
    assert "reach no other quantized node" in skipped["Add bias_add"]
    # Sigmoid reads the Gemm's output, Softmax the attention MatMul's: both can stay float, so an int8
    # Sigmoid/Softmax would add a rounding; in float, their outputs are rounded once for the next MatMul
    assert skipped["Sigmoid sigmoid"].startswith("input 'g' comes from Gemm gemm, whose output can stay float")
    assert skipped["Softmax softmax"].startswith("input 'att' comes from MatMul attention")
    assert result.report["fidelity"]["cosine"] > 0.999
    assert [v.name for v in result.model.graph.outputs] == ["y", "g"]  # graph outputs keep their names


def conv_elementwise(seed: int = 0) -> onnx.ModelProto:
    """Conv -> SiLU (Sigmoid, Mul) -> 1x1 Conv -> channel Softmax -> 1x1 Conv: elementwise ops on Conv outputs."""
    init = random_init(seed)

    inits = [init("w1", 8, 3, 3, 3), init("b1", 8, scale=0.1), init("w2", 8, 8, 1, 1), init("b2", 8, scale=0.1),
             init("w3", 4, 8, 1, 1), init("b3", 4, scale=0.1)]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Sigmoid", ["c1"], ["s"], name="sigmoid"),
             h.make_node("Mul", ["c1", "s"], ["silu"], name="silu"),
             h.make_node("Conv", ["silu", "w2", "b2"], ["c2"], name="conv2"),
             h.make_node("Softmax", ["c2"], ["p"], name="softmax", axis=1),
             h.make_node("Conv", ["p", "w3", "b3"], ["y"], name="conv3")]
    graph = h.make_graph(nodes, "conv_elementwise", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_elementwise_ops_on_conv_outputs_stay_int8(tmp_path):
    """A Conv's output is int8 anyway (QLinearConv has no float output): Sigmoid, Mul and Softmax
    reading it run as QLinear kernels, nothing is kept float."""
    path = tmp_path / "silu.onnx"
    onnx.save(conv_elementwise(), path)
    data = {"x": np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result = static(path, data, data)
    quant = result.report["quantization"]
    assert quant["int8_kernels"] == {"QLinearConv": 3, "QLinearMul": 1, "QLinearSigmoid": 1, "QLinearSoftmax": 1}
    assert quant["fused_ratio"] == 1.0 and quant["other"] == {"quantized": 3, "fused": 3}
    assert result.report["passes"][1]["skipped"] == []
    assert result.report["fidelity"]["cosine"] > 0.999


def test_gemm_normalised_and_relu6_folded(tmp_path):
    path = tmp_path / "gemms.onnx"
    onnx.save(gemm_variants(), path)
    data = {"x": np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32) * 2}
    result = static(path, data, data)
    graph = result.model.graph
    gemms = [n for n in graph if n.op_type == "Gemm"]
    assert [n.name for n in gemms] == ["gemm", "matmul"] and not any(n.op_type == "Clip" for n in graph)
    assert all(n.attributes.get_float("alpha", 1.0) == 1.0 and n.attributes.get_float("beta", 1.0) == 1.0
               for n in gemms)
    assert result.report["quantization"]["int8_kernels"] == {"QGemm": 2}
    assert result.report["fidelity"]["cosine"] > 0.999
    assert result.report["fidelity"]["max_abs_error"] < 0.25  # outputs in [0, 6]: the output Q clips at 6
    output_scale = graph.outputs[0].producer().inputs[1].const_value.numpy()
    assert output_scale <= np.float32(6 / 255)


def test_attention_mask_stays_float(tmp_path):
    path = tmp_path / "attention.onnx"
    onnx.save(masked_attention(), path)
    data = {"x": np.random.default_rng(0).standard_normal((64, 8, 16)).astype(np.float32)}
    result = static(path, data, data)
    skipped = {s["what"]: s["why"] for s in result.report["passes"][1]["skipped"]}
    # the scores MatMul keeps a float output, so the mask Add and the Softmax after it stay float
    assert skipped["Add add_mask"].startswith("input 'scores' comes from MatMul scores")
    assert skipped["Softmax softmax"].startswith("input 'masked' comes from Add add_mask, which stays float")
    quant = result.report["quantization"]
    assert quant["compute"] == {"quantized": 4, "fused": 4}
    assert result.report["fidelity"]["cosine"] > 0.999


def test_activation_beyond_max_range_stays_float(tmp_path):
    """A -1e9 mask added to a Conv output (int8 anyway): the Add reading it and the Softmax after
    it stay float (8 bits over ±1e9 would zero every real value); the Convs stay int8."""
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 8, 1, 1), np.float32)
    mask[:, 6:] = -1e9
    inits = [nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2"),
             nh.from_array(mask, "mask")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Add", ["c1", "mask"], ["masked"], name="add_mask"),
             h.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=1),
             h.make_node("Conv", ["p", "w2"], ["y"], name="conv2")]
    graph = h.make_graph(nodes, "masked_conv", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    path = tmp_path / "masked_conv.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    data = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    result = static(path, data, data)
    skipped = {s["what"]: s["why"] for s in result.report["passes"][1]["skipped"]}
    assert "beyond max_range" in skipped["Add add_mask"] and "beyond max_range" in skipped["Softmax softmax"]
    quant = result.report["quantization"]
    assert quant["int8_kernels"] == {"QLinearConv": 2} and quant["fused_ratio"] == 1.0
    assert result.report["fidelity"]["cosine"] > 0.999


def test_reused_statistics_skip_calibration(cnn_path, calib_path):
    from onnxcomp.data import load_data
    from onnxcomp.passes.quantize.static import (
        QuantizeStaticConfig,
        quantize_static_model,
    )

    model = load_model(cnn_path)
    config = QuantizeStaticConfig(method="percentile")
    data = load_data(calib_path, model)
    first = quantize_static_model(model.clone(), data, config)
    again = quantize_static_model(model.clone(), data.head(1), config.model_copy(update={"exclude": ("*Gemm",)}),
                                  stats=first.stats)
    assert set(again.ranges) <= set(first.ranges)
    assert all(again.ranges[t] == first.ranges[t] for t in again.ranges)  # same statistics, not recalibrated


def test_quantization_parameters():
    p = activation_params(0.0, 6.0, "uint8")
    assert p.zero_point == 0 and p.scale == np.float32(6 / 255)
    p = activation_params(-1.0, 3.0, "int8")
    assert p.quantize(np.array([0.0]))[0] == p.zero_point  # zero is exact
    w = np.array([[1.0, -0.5], [0.25, 0.1]], np.float32)
    params, q = weight_params(w, 0, reduce_range=False)
    np.testing.assert_allclose(params.scale, [1 / 127, 0.25 / 127], rtol=1e-6)
    assert q.dtype == np.int8 and q[0, 0] == 127 and q[1, 0] == 127
    _, q7 = weight_params(w, 0, reduce_range=True)
    assert np.abs(q7).max() == 63


def test_old_opset_is_upgraded_first(tmp_path, mlp_path, calib_path):
    model = onnx.load(mlp_path)
    model.opset_import[0].version = 12
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    result = static(path, calib_path)  # upgraded to 13 (verified in onnxruntime), then quantized
    upgrade = next(p for p in result.report["passes"] if p["name"] == "opset_upgrade")
    assert "opset 12 -> 13" in upgrade["touched"][0] and result.model.opset_imports[""] == 13


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxcomp.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_int8(tmp_path, cnn_path, calib_path, val_path):
    out = tmp_path / "cnn_int8.onnx"
    done = _cli("run", "int8", "-m", cnn_path, "--calib", calib_path, "--val", val_path, "-o", out)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size < cnn_path.stat().st_size / 2.5


def test_cli_int8_without_calib_exits_2(tmp_path, cnn_path, val_path):
    done = _cli("run", "int8", "-m", cnn_path, "--val", val_path, "-o", tmp_path / "x.onnx")
    assert done.returncode == 2
    assert "needs calibration data: pass --calib" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_old_exclusion_options_still_work_with_a_deprecation_warning():
    from onnxcomp.passes.quantize.static import QuantizeStaticConfig

    with pytest.warns(DeprecationWarning, match="'exclude_(nodes|ops)' is deprecated"):
        config = QuantizeStaticConfig(exclude_nodes=["/head/*"], exclude_ops=["Conv"])
    assert config.exclude == ("/head/*", "Conv")


def test_include_quantizes_only_the_selected_nodes(cnn_path, calib_path):
    result = static(cnn_path, calib_path, include=["/head/*"], min_params=1000)
    stats = result.report["passes"][1]
    assert [t.split(":")[0] for t in stats["touched"]] == ["Gemm /head/head.0/Gemm"]  # head.2 has 10x64 = 640 weights
    why = {s["what"]: s["why"] for s in stats["skipped"]}
    assert why["Conv /features/features.0/Conv"] == "not matched by include"
    assert why["Gemm /head/head.2/Gemm"] == "640 parameters < min_params 1000"
