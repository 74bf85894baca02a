"""report.py: parameters, MACs and sizes, float and quantized forms counted alike; inspect and run count the same MACs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import load_model
from onnxcomp.passes.base import PassContext
from onnxcomp.passes.quantize.weights import QuantizeWeights
from onnxcomp.pipeline import compress
from onnxcomp.data import SYNTHETIC_DIM
from onnxcomp.report import count_params, estimate_macs, model_summary


# -- block-quantized weights count as the float weights they encode -------------------------------


def _quantize_weights(model: ir.Model, **options) -> ir.Model:
    work = model.clone()
    QuantizeWeights(options, PassContext())(work)
    return work


def _embed_then_matmul(vocab=50, dim=32, n=16):
    """Gather(table [vocab, dim], ids [b, s]) -> MatMul(W [dim, n])."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((dim, n)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
         helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], [table, w])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_params_and_macs_of_cnn(cnn_path):
    model = load_model(cnn_path)
    # conv1 16x8x8 outputs x 9 taps + conv2 32x8x8 x 144 + fc 64x512 + fc 10x64
    assert estimate_macs(model) == 16 * 64 * 9 + 32 * 64 * 144 + 64 * 512 + 10 * 64
    assert count_params(model) == 38_378 + 96  # weights + BatchNorm statistics
    summary = model_summary(model, cnn_path)
    assert summary["size_bytes"] == cnn_path.stat().st_size
    assert summary["ops"]["Conv"] == 2 and summary["sparsity"] == 0.0


def test_macs_scale_with_sequence_dims():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(proto)
    assert estimate_macs(model) == SYNTHETIC_DIM * 8 * 16  # a dynamic sequence: as run without data
    assert estimate_macs(model, {"x": (4, 10, 8)}) == 10 * 8 * 16


@pytest.mark.parametrize("name", ["digits_mlp.onnx"])
def test_param_count_mlp(mlp_path, name):
    assert count_params(load_model(mlp_path)) == 17_226


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False)])
def test_matmulnbits_params_and_macs_match_the_float_matmul(bits, symmetric):
    k, n = 80, 24  # K not a multiple of the block: the packed data is padded, the count is not
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], [w])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    out = _quantize_weights(model, bits=bits, symmetric=symmetric)
    assert [node.op_type for node in out.graph] == ["MatMulNBits"]
    assert count_params(out) == count_params(model) == k * n
    assert estimate_macs(out) == estimate_macs(model) == SYNTHETIC_DIM * k * n
    assert estimate_macs(out, {"x": (4, 10, k)}) == 10 * k * n


def test_quantized_mlp_keeps_its_params_and_macs(mlp_path):
    model = load_model(mlp_path)
    out = _quantize_weights(model)
    assert [node.op_type for node in out.graph].count("MatMulNBits") == 3
    assert count_params(out) == count_params(model) == 17_226  # biases stay, scales/zero points not counted
    assert estimate_macs(out) == estimate_macs(model) == 64 * 128 + 128 * 64 + 64 * 10


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_gather_block_quantized_counts_vocab_times_dim(bits, symmetric):
    model = _embed_then_matmul()
    out = _quantize_weights(model, bits=bits, symmetric=symmetric, quantize_embeddings=True)
    assert [node.op_type for node in out.graph] == ["GatherBlockQuantized", "MatMulNBits"]
    assert count_params(out) == count_params(model) == 50 * 32 + 32 * 16
    # shapes flow through both com.microsoft ops: the MatMul after the lookup keeps its MACs
    assert estimate_macs(out, {"ids": (1, 7)}) == estimate_macs(model, {"ids": (1, 7)}) == 7 * 32 * 16


def test_only_gather_block_quantized_still_gets_a_fusion_report():
    model = _embed_then_matmul()
    ids = np.random.default_rng(1).integers(0, 50, size=(8, 7))
    result = compress(model, {"passes": [{"quantize_weights": {"quantize_embeddings": True, "exclude": ["proj"]}}]},
                      val={"ids": ids}, latency_runs=0)
    assert [node.op_type for node in result.model.graph] == ["GatherBlockQuantized", "MatMul"]
    quant = result.report["quantization"]
    assert quant["other"] == {"quantized": 1, "fused": 1} and quant["compute"] == {"quantized": 0, "fused": 0}
    assert quant["int8_kernels"] == {"GatherBlockQuantized": 1} and quant["fused_ratio"] is None
    assert result.report["compressed"]["params"] == result.report["original"]["params"]


def test_latencies_interleaved_for_small_models_one_by_one_for_external_data(cnn_path, mlp_path, val_path,
                                                                              tmp_path):
    """Two small models are timed round by round in one pass; a model with external data alone;
    every entry has its runs and a positive median; a run's report says how it was timed."""
    import onnx

    from onnxcomp.data import load_data
    from onnxcomp.report import measure_latencies

    cnn = load_model(cnn_path)
    data = load_data(val_path, cnn)
    pair = measure_latencies([(cnn, cnn_path), (cnn.clone(), None)], data, runs=5, warmup=1)
    assert [p["interleaved"] for p in pair] == [True, True]
    assert all(p["runs"] == 5 and p["median_ms"] > 0 and p["p90_ms"] >= p["median_ms"] for p in pair)
    onnx.save(onnx.load(str(cnn_path)), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data",
              size_threshold=0)
    external = load_model(tmp_path / "ext.onnx")
    apart = measure_latencies([(external, tmp_path / "ext.onnx"), (cnn, None)], data, runs=3, warmup=1)
    assert [p["interleaved"] for p in apart] == [False, False]
    report = compress(str(mlp_path), "int8-dynamic", val=str(val_path), latency_runs=4).report
    assert report["original"]["latency"]["interleaved"] and report["compressed"]["latency"]["runs"] == 4
