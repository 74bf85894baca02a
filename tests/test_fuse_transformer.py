"""fuse_transformer on the tiny BERT fixture: fusions applied and reported, outputs kept; and the transformer-int8 recipe."""

from __future__ import annotations


import numpy as np
import pytest

from onnxcomp.model import load_model
from onnxcomp.passes import proto_roundtrip
from onnxcomp.passes.fuse_transformer import FuseTransformer, detect_attention_shape
from onnxcomp.passes.to_fp16 import ToFp16
from onnxcomp.pipeline import compress
from tests.builders import op_types, pass_stats

FUSED_OPS = {"Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization"}


# ----------------------------------------------------------------------------- fuse_transformer


def test_fuse_tiny_bert_applies_bert_fusions_and_keeps_outputs(bert_path, bert_val):
    result = compress(bert_path, {"passes": ["fuse_transformer"]}, val=bert_val, latency_runs=0)
    stats = pass_stats(result, "fuse_transformer")
    assert FUSED_OPS <= op_types(result.model)
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
    ops = op_types(model)
    assert "SkipLayerNormalization" in ops and "Gelu" in ops
    assert not ops & {"Attention", "BiasGelu", "EmbedLayerNormalization"}


def test_fuse_reports_attention_not_matched_with_wrong_heads(bert_path):
    model = load_model(bert_path)
    result = FuseTransformer({"num_heads": 8, "hidden_size": 64})(model)  # the graph has 4
    assert "Attention" not in op_types(model) and "SkipLayerNormalization" in op_types(model)
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
    stats = pass_stats(result, "fuse_transformer")
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
    assert "Attention" in op_types(result.model)
    assert result.report["fidelity"]["max_abs_error"] <= 1e-4


# ----------------------------------------------------------------------------- recipe


def test_transformer_int8_recipe_quantizes_every_matmul_of_tiny_bert(bert_path, bert_val):
    result = compress(bert_path, "transformer-int8", val=bert_val, latency_runs=0)
    assert [p["name"] for p in result.report["passes"]] == ["cleanup", "fuse_transformer", "quantize_dynamic"]
    ops = [n.op_type for n in result.model.graph]
    assert "MultiHeadAttention" in ops and "SkipLayerNormalization" in ops
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 12  # Q, K, V, out, 2 FFN x 2 layers
    assert result.gate_passed and result.report["quantization"]["fused_ratio"] == 1.0
    assert result.report["fidelity"]["cosine"] >= 0.999
