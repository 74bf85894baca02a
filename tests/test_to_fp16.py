"""to_fp16: half the weight bytes, float32 inputs/outputs, kept ops and nodes stay float32."""

from __future__ import annotations


import onnx_ir as ir
import pytest

from onnxcomp.model import load_model
from onnxcomp.passes.to_fp16 import ToFp16
from onnxcomp.pipeline import compress
from tests.builders import op_types, pass_stats



def _io_types(model: ir.Model) -> list[ir.DataType]:
    return [v.dtype for v in (*model.graph.inputs, *model.graph.outputs)]


# ----------------------------------------------------------------------------- to_fp16


def test_to_fp16_digits_cnn_halves_size_keeps_float32_io_and_accuracy(cnn_path, val_path):
    result = compress(cnn_path, {"passes": ["to_fp16"]}, val=val_path, latency_runs=0)
    report = result.report
    ratio = report["compressed"]["size_bytes"] / report["original"]["size_bytes"]
    assert 0.45 <= ratio <= 0.56
    assert _io_types(result.model) == [ir.DataType.FLOAT, ir.DataType.FLOAT]
    assert report["fidelity"]["accuracy_drop"] <= 0.005
    stats = pass_stats(result, "to_fp16")
    assert stats["metrics"]["weight_bytes_after"] == stats["metrics"]["weight_bytes_before"] // 2
    assert any(note.startswith("CPU: ") for note in stats["notes"])
    assert "cpu_casts" in stats["metrics"]


def test_to_fp16_keep_ops_and_exclude(cnn_path):
    model = load_model(cnn_path)
    result = ToFp16({"keep_ops": ["Gemm"], "exclude": ["/features/features.0/*", "/nope/*"],
                     "cpu_report": False})(model)
    by_op = {}
    for node in model.graph:
        if node.op_type in ("Gemm", "Conv"):
            by_op.setdefault(node.name, (node.inputs[1].dtype, node.outputs[0].dtype))
    assert by_op["/head/head.0/Gemm"] == by_op["/head/head.2/Gemm"] == (ir.DataType.FLOAT, ir.DataType.FLOAT)
    assert by_op["/features/features.0/Conv"] == (ir.DataType.FLOAT, ir.DataType.FLOAT)
    assert by_op["/features/features.3/Conv"] == (ir.DataType.FLOAT16, ir.DataType.FLOAT16)
    skipped = dict(result.stats.skipped)
    assert skipped["2 Gemm node(s)"] == "kept float32: op type in keep_ops"
    assert skipped["Conv /features/features.0/Conv"] == "kept float32: excluded by '/features/features.0/*'"
    assert "selection entry '/nope/*' matches no node" in result.stats.notes


def test_to_fp16_keep_nodes_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'keep_nodes' is deprecated.*use 'exclude'"):
        config = ToFp16.Config(keep_nodes=["/a/*"], exclude=["/b/*"])
    assert config.exclude == ("/b/*", "/a/*")


def test_fused_bert_to_fp16_keeps_embeddings_close(bert_path, bert_val):
    result = compress(bert_path, {"passes": ["fuse_transformer", "to_fp16"]}, val=bert_val, latency_runs=0)
    assert "Attention" in op_types(result.model)
    assert _io_types(result.model) == [ir.DataType.INT64] * 3 + [ir.DataType.FLOAT] * 2
    assert any(v.dtype == ir.DataType.FLOAT16 for v in result.model.graph.initializers.values())
    assert result.report["fidelity"]["cosine"] >= 0.9999
    assert result.report["fidelity"]["max_abs_error"] <= 0.05


def test_to_fp16_twice_finds_nothing_left(cnn_path):
    model = load_model(cnn_path)
    ToFp16({"keep_io_types": False, "cpu_report": False})(model)
    result = ToFp16({"cpu_report": False})(model)
    assert result.stats.touched == [] and result.stats.notes == ["no float32 tensor: nothing to convert"]
