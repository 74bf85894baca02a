"""fusion_report: which quantized nodes onnxruntime runs as int8 kernels, matched by tensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcomp.fusion import fusion_report
from onnxcomp.model import load_model
from onnxcomp.pipeline import compress


@pytest.fixture(scope="module")
def cnn_int8(cnn_path, calib_path):
    return compress(cnn_path, {"passes": ["cleanup", "quantize_static"]}, calib=calib_path, latency_runs=0).model


def test_report_on_our_cnn(cnn_int8):
    report = fusion_report(cnn_int8)
    assert report["fused_ratio"] == 1.0 and report["compute"] == {"quantized": 4, "fused": 4}
    kernels = {n["name"]: n["kernel"] for n in report["nodes"]}
    assert kernels == {"/features/features.0/Conv": "QLinearConv", "/features/features.3/Conv": "QLinearConv",
                       "/features/features.6/MaxPool": "NhwcMaxPool", "/features/features.7/Flatten": "Flatten",
                       "/head/head.0/Gemm": "QGemm", "/head/head.2/Gemm": "QGemm"}


def test_unfused_nodes_are_reported(cnn_int8):
    model = cnn_int8.clone()
    conv1, conv2 = [n for n in model.graph if n.op_type == "Conv"]
    conv2.replace_input_with(0, conv1.outputs[0])  # bypass the Q/DQ between the two convolutions
    ir.passes.common.RemoveUnusedNodesPass()(model)
    report = fusion_report(model)
    assert report["fused_ratio"] == 0.5
    assert {(u["name"], u["op"]) for u in report["unfused"]} == {
        ("/features/features.0/Conv", "Conv"), ("/features/features.3/Conv", "Conv")}
    assert report["int8_kernels"].get("QLinearConv", 0) == 0


def test_float_model_has_nothing_quantized(cnn_path):
    report = fusion_report(load_model(cnn_path))
    assert report["quantized_nodes"] == 0 and report["fused_ratio"] is None


def test_report_on_onnxruntime_quantizers(tmp_path, mlp_path, calib_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    calib = np.load(calib_path)["input"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calib[i:i + 50]} for i in range(0, len(calib), 50)])

        def get_next(self):
            return next(self.batches, None)

    static_path, dynamic_path = tmp_path / "static.onnx", tmp_path / "dynamic.onnx"
    quantize_static(str(mlp_path), str(static_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    quantize_dynamic(str(mlp_path), str(dynamic_path))
    static = fusion_report(load_model(static_path))
    assert static["compute"]["quantized"] == 3 and static["fused_ratio"] == 1.0
    dynamic = fusion_report(load_model(dynamic_path))
    assert dynamic["compute"]["quantized"] == 3 and dynamic["int8_kernels"] == {"DynamicQuantizeMatMul": 3}


def test_blockwise_int4_matmul_becomes_matmulnbits():
    k, n, block = 64, 32, 32
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (k, n)).astype(np.int8)
    weight = onnx.helper.make_tensor("w_q", TensorProto.INT4, (k, n), q.flatten().tolist())
    scale = nh.from_array(rng.uniform(0.01, 0.1, (k // block, n)).astype(np.float32), "w_scale")
    nodes = [h.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dq", axis=0, block_size=block),
             h.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    graph = h.make_graph(nodes, "int4", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], [weight, scale])
    model = ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]))
    report = fusion_report(model)
    assert report["nodes"] == [{"name": "fc", "op": "MatMul", "kernel": "MatMulNBits", "fused": True}]
    assert report["fused_ratio"] == 1.0
