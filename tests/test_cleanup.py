"""The cleanup pass: exact rewrites (BatchNorm folding, weight Transposes folded, Identity and dead code removed)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.data import load_data
from onnxcomp.model import load_model
from onnxcomp.passes.cleanup import Cleanup
from onnxcomp.runtime import open_session


def _run(model, x, name="input"):
    with open_session(model) as session:
        return session.run(None, {name: x})[0]


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
