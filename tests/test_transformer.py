"""fuse_transformer and to_fp16 on the tiny BERT fixture (models/tiny_bert) and the digits models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxcomp.model import load_model
from onnxcomp.passes import proto_roundtrip
from onnxcomp.passes.fuse_transformer import FuseTransformer, detect_attention_shape
from onnxcomp.passes.to_fp16 import ToFp16
from onnxcomp.pipeline import compress

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_bert"
FUSED_OPS = {"Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization"}


@pytest.fixture(scope="module")
def bert_path() -> Path:
    return TINY / "tiny_bert.onnx"


@pytest.fixture(scope="module")
def bert_val() -> Path:
    return TINY / "val.npz"


def _ops(model: ir.Model) -> set[str]:
    return {node.op_type for node in model.graph}


def _stats(result, name: str) -> dict:
    return next(p for p in result.report["passes"] if p["name"] == name)


def _io_types(model: ir.Model) -> list[ir.DataType]:
    return [v.dtype for v in (*model.graph.inputs, *model.graph.outputs)]


# ----------------------------------------------------------------------------- fuse_transformer


def test_fuse_tiny_bert_applies_bert_fusions_and_keeps_outputs(bert_path, bert_val):
    result = compress(bert_path, {"passes": ["fuse_transformer"]}, val=bert_val, latency_runs=0)
    stats = _stats(result, "fuse_transformer")
    assert FUSED_OPS <= _ops(result.model)
    assert {n.domain for n in result.model.graph if n.op_type in FUSED_OPS} == {"com.microsoft"}
    assert stats["metrics"]["fusions"] == {"Attention": 2, "SkipLayerNormalization": 4, "BiasGelu": 2,
                                           "EmbedLayerNormalization": 1}
    assert (stats["metrics"]["num_heads"], stats["metrics"]["hidden_size"]) == (4, 64)
    assert stats["metrics"]["nodes_after"] < stats["metrics"]["nodes_before"] / 3
    assert "Attention: 2 fused" in stats["touched"]
    fid = result.report["fidelity"]
    assert fid["samples"] == 128 and not fid["synthetic_inputs"]
    assert fid["max_abs_error"] <= 1e-4
    assert not any(n.op_type == "Constant" for n in result.model.graph)  # weights stay initializers


def test_fuse_default_mask_is_exact_with_left_padding(bert_path, bert_val):
    """The raw 2-D mask format is right for any padding; mask_index_end assumes right padding."""
    with np.load(bert_val) as z:
        data = {k: z[k][:32] for k in z.files}
    order = np.argsort(data["attention_mask"], axis=1, kind="stable")  # padding first
    left = {k: np.take_along_axis(v, order, axis=1) for k, v in data.items()}
    result = compress(bert_path, {"passes": ["fuse_transformer"]}, val=left, latency_runs=0)
    assert result.report["fidelity"]["max_abs_error"] <= 1e-4
    result = compress(bert_path, {"passes": [{"fuse_transformer": {"attention_mask": "mask_index_end"}}]},
                      val=left, latency_runs=0)
    assert result.report["fidelity"]["max_abs_error"] > 1e-2


def test_fuse_options_switch_fusions_off(bert_path):
    model = load_model(bert_path)
    FuseTransformer({"attention": False, "bias_gelu": False, "embed_layer_norm": False})(model)
    ops = _ops(model)
    assert "SkipLayerNormalization" in ops and "Gelu" in ops
    assert not ops & {"Attention", "BiasGelu", "EmbedLayerNormalization"}


def test_fuse_reports_attention_not_matched_with_wrong_heads(bert_path):
    model = load_model(bert_path)
    result = FuseTransformer({"num_heads": 8, "hidden_size": 64})(model)  # the graph has 4
    assert "Attention" not in _ops(model) and "SkipLayerNormalization" in _ops(model)
    assert [what for what, _ in result.stats.skipped] == ["Attention"]
    assert "num_heads=8" in result.stats.skipped[0][1]


def test_fuse_config_rejects_heads_that_do_not_divide_width():
    from onnxcomp.errors import OnnxcompError
    from onnxcomp.recipe import parse_recipe

    with pytest.raises(OnnxcompError, match="not a multiple of num_heads"):
        parse_recipe({"passes": [{"fuse_transformer": {"num_heads": 3, "hidden_size": 64}}]}, "r.yaml")


def test_detect_attention_shape(bert_path, cnn_path):
    assert detect_attention_shape(load_model(bert_path).graph) == (4, 64)
    assert detect_attention_shape(load_model(cnn_path).graph) is None


def test_fuse_on_a_cnn_applies_nothing_and_says_so(cnn_path, val_path):
    result = compress(cnn_path, {"passes": ["fuse_transformer"]}, val=val_path, latency_runs=0)
    stats = _stats(result, "fuse_transformer")
    assert stats["touched"] == [] and stats["metrics"]["fusions"] == {}
    assert any("not BERT-like" in note for note in stats["notes"])
    assert [n.op_type for n in result.model.graph] == [n.op_type for n in load_model(cnn_path).graph]
    assert result.report["fidelity"]["max_abs_error"] == 0.0


def test_tools_leave_no_files_in_the_working_folder(bert_path, tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference dumps sym_shape_infer_temp.onnx into the cwd."""
    monkeypatch.chdir(tmp_path)
    model = load_model(bert_path)
    FuseTransformer()(model)
    ToFp16({"cpu_report": False})(model)
    assert list(tmp_path.iterdir()) == []


def test_large_or_external_models_go_through_a_file(bert_path, bert_val, monkeypatch):
    monkeypatch.setattr(proto_roundtrip, "PROTOBUF_LIMIT", 0)  # as if the model were > 2 GB
    result = compress(bert_path, {"passes": ["fuse_transformer"]}, val=bert_val, latency_runs=0)
    assert "Attention" in _ops(result.model)
    assert result.report["fidelity"]["max_abs_error"] <= 1e-4


# ----------------------------------------------------------------------------- to_fp16


def test_to_fp16_digits_cnn_halves_size_keeps_float32_io_and_accuracy(cnn_path, val_path):
    result = compress(cnn_path, {"passes": ["to_fp16"]}, val=val_path, latency_runs=0)
    report = result.report
    ratio = report["compressed"]["size_bytes"] / report["original"]["size_bytes"]
    assert 0.45 <= ratio <= 0.56
    assert _io_types(result.model) == [ir.DataType.FLOAT, ir.DataType.FLOAT]
    assert report["fidelity"]["accuracy_drop"] <= 0.005
    stats = _stats(result, "to_fp16")
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
    assert "Attention" in _ops(result.model)
    assert _io_types(result.model) == [ir.DataType.INT64] * 3 + [ir.DataType.FLOAT] * 2
    assert any(v.dtype == ir.DataType.FLOAT16 for v in result.model.graph.initializers.values())
    assert result.report["fidelity"]["cosine"] >= 0.9999
    assert result.report["fidelity"]["max_abs_error"] <= 0.05


def test_to_fp16_twice_finds_nothing_left(cnn_path):
    model = load_model(cnn_path)
    ToFp16({"keep_io_types": False, "cpu_report": False})(model)
    result = ToFp16({"cpu_report": False})(model)
    assert result.stats.touched == [] and result.stats.notes == ["no float32 tensor: nothing to convert"]


# ----------------------------------------------------------------------------- recipe


def test_transformer_int8_recipe_quantizes_every_matmul_of_tiny_bert(bert_path, bert_val):
    result = compress(bert_path, "transformer-int8", val=bert_val, latency_runs=0)
    assert [p["name"] for p in result.report["passes"]] == ["cleanup", "fuse_transformer", "quantize_dynamic"]
    ops = [n.op_type for n in result.model.graph]
    assert "MultiHeadAttention" in ops and "SkipLayerNormalization" in ops
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 12  # Q, K, V, out, 2 FFN x 2 layers
    assert result.gate_passed and result.report["quantization"]["fused_ratio"] == 1.0
    assert result.report["fidelity"]["cosine"] >= 0.999
