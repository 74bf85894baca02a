"""The cleanup pass (exact rewrites) and report measurements (params, MACs, sizes)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.data import load_data
from onnxcomp.model import load_model
from onnxcomp.passes.cleanup import Cleanup
from onnxcomp.report import count_params, estimate_macs, model_summary
from onnxcomp.runtime import open_session


def _run(model, x, name="input"):
    with open_session(model) as session:
        return session.run(None, {name: x})[0]


def test_batchnorm_folded_exactly(cnn_path, val_path):
    original = load_model(cnn_path)
    model = original.clone()
    result = Cleanup({"fold_constants": False})(model)
    ops = [n.op_type for n in model.graph]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2
    assert sum("folded into Conv" in t for t in result.stats.touched) == 2
    x = load_data(val_path, original).inputs["input"]
    np.testing.assert_allclose(_run(model, x), _run(original, x), rtol=1e-5, atol=1e-5)
    assert [v.name for v in model.graph.outputs] == ["logits"]


def _tf_like_model():
    """MatMul whose weight is Transpose(Constant) behind an Identity, as TF/JAX exporters emit."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w_t"], value=numpy_helper.from_array(w.T.copy(), "w_t")),
        helper.make_node("Transpose", ["w_t"], ["w"], perm=[1, 0]),
        helper.make_node("Identity", ["x"], ["x_id"]),
        helper.make_node("MatMul", ["x_id", "w"], ["y0"]),
        helper.make_node("Identity", ["y0"], ["y"]),
        helper.make_node("Relu", ["x"], ["dead"]),
    ]
    graph = helper.make_graph(nodes, "tf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto), w


def test_folds_weight_transpose_and_removes_identity_and_dead_code():
    model, w = _tf_like_model()
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    before = _run(model, x, "x")
    result = Cleanup()(model)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    weight = model.graph.node(0).inputs[1]
    assert weight.is_initializer()
    np.testing.assert_array_equal(weight.const_value.numpy(), w)
    np.testing.assert_allclose(_run(model, x, "x"), before, rtol=1e-6)
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert result.stats.metrics == {"nodes_before": 6, "nodes_after": 1}


def test_cleanup_on_clean_graph_says_nothing_to_do():
    model, _ = _tf_like_model()
    Cleanup()(model)
    result = Cleanup()(model)
    assert not result.modified and result.stats.notes == ["nothing eligible: no node was changed"]


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
    assert estimate_macs(model) == 8 * 16
    assert estimate_macs(model, {"x": (4, 10, 8)}) == 10 * 8 * 16


@pytest.mark.parametrize("name", ["digits_mlp.onnx"])
def test_param_count_mlp(mlp_path, name):
    assert count_params(load_model(mlp_path)) == 17_226
