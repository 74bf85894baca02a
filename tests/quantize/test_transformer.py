"""quantize_static on transformer graphs: the tiny BERT fixture (models/tiny_bert, all-MiniLM-L6-v2's
architecture with random weights), raw and after fuse_transformer, and embedding lookups.

The planner's rules under test: an elementwise op (bias Add, GELU, attention scale, mask Add,
Softmax) reading a tensor that would otherwise stay float stays float, so only the MatMuls are
int8, each fed by one rounding; a Gather from a constant table whose per-tensor int8 version would
lose the typical row's detail stays float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcomp.passes.quantize import plan as qdq_static
from onnxcomp.pipeline import compress

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny_bert"
ELEMENTWISE_KERNELS = {"QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearWhere", "QLinearConcat"}


def static(model, calib, val, *pre, **options):
    recipe = {"passes": ["cleanup", *pre, {"quantize_static": options}]}
    return compress(model, recipe, calib=calib, val=val, latency_runs=0)


def tiny(*pre, **options):
    return static(TINY / "tiny_bert.onnx", TINY / "calib.npz", TINY / "val.npz", *pre, **options)


def skipped(result) -> dict[str, str]:
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    return {s["what"]: s["why"] for s in stats["skipped"]}


@pytest.fixture(scope="module")
def raw():
    return tiny()


def test_raw_export_quantizes_every_matmul_and_nothing_elementwise(raw):
    quant = raw.report["quantization"]
    assert quant["fused_ratio"] == 1.0 and quant["unfused"] == []
    # Q, K, V, QKᵀ, PV, attention output, FFN in, FFN out: 8 MatMuls in each of the 2 layers
    assert quant["compute"] == {"quantized": 16, "fused": 16}
    assert not set(quant["int8_kernels"]) & ELEMENTWISE_KERNELS
    assert sum(quant["int8_kernels"].values()) == 16 + 3  # + word, position, token-type embeddings
    assert quant["int8_kernels"]["GatherBlockQuantized"] == 3
    assert quant["float_ops_reading_dequantized"] == {}  # no DequantizeLinear in front of a float op
    stats = next(p for p in raw.report["passes"] if p["name"] == "quantize_static")
    assert stats["metrics"]["quantized_ops"] == {"MatMul": 16, "Reshape": 8, "Transpose": 8}
    assert raw.report["fidelity"]["cosine"] >= 0.9999


def test_raw_export_says_why_each_elementwise_op_stays_float(raw):
    why = skipped(raw)
    layer = "/bert/encoder/layer.0"
    # bias Adds read a MatMul output that can stay float (MatMulIntegerToFloat)
    for proj in ("attention/self/query", "attention/self/key", "attention/self/value", "intermediate/dense"):
        assert why[f"Add {layer}/{proj}/Add"].startswith(f"input '{layer}/{proj}/MatMul_output_0' comes from MatMul")
        assert "can stay float" in why[f"Add {layer}/{proj}/Add"]
    # GELU reads Erf (no int8 kernel); the attention scale Mul, mask Add and Softmax follow a float QKᵀ
    assert "from Erf " in why[f"Add {layer}/intermediate/intermediate_act_fn/Add"]
    assert "from MatMul " in why[f"Mul {layer}/attention/self/Mul"]
    assert "from Mul " in why[f"Add {layer}/attention/self/Add"]
    assert "from Add " in why[f"Softmax {layer}/attention/self/Softmax"]
    # residual Adds feed LayerNormalization only
    assert "reach no other quantized node" in why[f"Add {layer}/attention/output/Add"]
    # every quantized MatMul reads its activation through exactly one QuantizeLinear -> DequantizeLinear
    graph = raw.model.graph
    for node in graph:
        if node.op_type == "MatMul":
            dq = node.inputs[0].producer()
            assert dq.op_type == "DequantizeLinear" and dq.inputs[0].producer().op_type == "QuantizeLinear"
            source = dq.inputs[0].producer().inputs[0].producer()
            assert source is None or source.op_type not in ("DequantizeLinear", "QuantizeLinear")


def test_float_input_rule_lowers_the_error(raw, monkeypatch):
    """The same quantization with elementwise ops int8 wherever they reach a quantized node (the
    rule switched off): QLinearAdd/QLinearMul in the graph, and a larger error."""
    monkeypatch.setattr(qdq_static, "_float_input", lambda *args: None)
    everything = tiny()
    assert {"QLinearAdd", "QLinearMul"} <= set(everything.report["quantization"]["int8_kernels"])
    assert everything.report["quantization"]["fused_ratio"] == 1.0
    error = [r.report["fidelity"]["mean_abs_error"] for r in (raw, everything)]
    assert error[0] < 0.95 * error[1], error  # measured 0.00387 vs 0.00446


@pytest.mark.parametrize("mha,compute", [(False, 6), (True, 12)])
def test_after_fuse_transformer(mha, compute):
    """Attention keeps its Q/K/V projection inside the float contrib op; with MultiHeadAttention
    the projections are MatMuls and int8 too. SkipLayerNormalization, BiasGelu stay float."""
    result = tiny({"fuse_transformer": {"multi_head_attention": mha}})
    quant = result.report["quantization"]
    assert quant["fused_ratio"] == 1.0 and quant["compute"] == {"quantized": compute, "fused": compute}
    assert quant["int8_kernels"] == {"MatMulIntegerToFloat": compute}
    assert quant["float_ops_reading_dequantized"] == {}
    ops = {n.op_type for n in result.model.graph}
    assert ("MultiHeadAttention" if mha else "Attention") in ops and "SkipLayerNormalization" in ops
    assert result.report["fidelity"]["cosine"] >= 0.9999


def embed_project(outlier_rows: bool, seed: int = 0) -> ir.Model:
    """ids -> Gather(table [200, 32]) -> MatMul: an embedding read directly by a quantized MatMul;
    optionally 4 rows 40x wider than the rest (like position embeddings of the first positions)."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((200, 32)) * 0.05).astype(np.float32)
    if outlier_rows:
        table[:4] *= 40
    w = (rng.standard_normal((32, 16)) * 0.2).astype(np.float32)
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             h.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    graph = h.make_graph(nodes, "embed", [h.make_tensor_value_info("ids", TensorProto.INT64, ["N", 12])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, 16])],
                         [nh.from_array(table, "table"), nh.from_array(w, "w")])
    return ir.serde.deserialize_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


IDS = {"ids": np.random.default_rng(1).integers(4, 200, (64, 12))}  # the outlier rows are rare tokens


def test_embedding_lookup_is_int8_when_one_scale_fits_the_table():
    result = static(embed_project(False), IDS, IDS, quantize_embeddings=False)
    quant = result.report["quantization"]
    assert quant["other"] == {"quantized": 1, "fused": 1}  # Gather moves int8 rows in onnxruntime
    table = next(n for n in result.model.graph if n.op_type == "Gather").inputs[0].producer().inputs[0]
    assert table.const_value.dtype == ir.DataType.UINT8
    assert skipped(result) == {}
    assert result.report["fidelity"]["cosine"] > 0.9999


def test_embedding_lookup_stays_float_when_a_few_rows_set_the_scale(monkeypatch):
    result = static(embed_project(True), IDS, IDS, quantize_embeddings=False)
    why = skipped(result)["Gather embed"]
    assert why.startswith("table 'table' [200, 32] in int8 with one per-tensor scale") and "median row" in why
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    assert gather.inputs[0].const_value is not None and gather.inputs[0].dtype == ir.DataType.FLOAT
    assert result.report["quantization"]["fused_ratio"] == 1.0
    monkeypatch.setattr(qdq_static, "TABLE_MAX_ERROR", np.inf)  # the table int8 anyway
    forced = static(embed_project(True), IDS, IDS, quantize_embeddings=False)
    assert forced.report["quantization"]["other"] == {"quantized": 1, "fused": 1}
    error = [r.report["fidelity"]["mean_abs_error"] for r in (result, forced)]
    assert error[0] < error[1] / 5, error  # measured 0.0006 vs 0.0090


def test_embeddings_are_block_quantized_by_default():
    """The table a per-tensor scale cannot fit is fine with a scale per 128 values (GatherBlockQuantized)."""
    result = static(embed_project(True), IDS, IDS)
    ops = {n.op_type for n in result.model.graph}
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert result.report["quantization"]["fused_ratio"] == 1.0
    assert result.report["fidelity"]["cosine"] > 0.9998  # the int8 MatMul included
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    assert stats["metrics"]["quantize_embeddings"]["bytes_after"] < stats["metrics"]["quantize_embeddings"]["bytes_before"] / 3


def test_quantize_dynamic_block_quantizes_embeddings():
    recipe = {"passes": ["cleanup", {"quantize_dynamic": {}}]}
    result = compress(TINY / "tiny_bert.onnx", recipe, val=TINY / "val.npz", latency_runs=0)
    assert result.report["quantization"]["int8_kernels"]["GatherBlockQuantized"] == 3
    assert result.report["fidelity"]["cosine"] > 0.999
    recipe = {"passes": ["cleanup", {"quantize_dynamic": {"quantize_embeddings": False}}]}
    tables_float = compress(TINY / "tiny_bert.onnx", recipe, val=TINY / "val.npz", latency_runs=0)
    size = [r.report["compressed"]["size_bytes"] for r in (result, tables_float)]
    assert size[0] < 0.7 * size[1], size  # tiny tables: 0.62 here; MiniLM 0.26x vs 0.65x overall
