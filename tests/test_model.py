"""model.py: safe loading, Constant lifting, external data, atomic and deterministic saving."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model, runtime_limits, save_model, tensor_protos
from tests.builders import DIGITS, MODELS


def _logits(path_or_bytes, x):
    sess = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def val_x():
    return np.load(DIGITS / "val.npz")["input"][:64]


def test_loads_initializer_model(cnn_path):
    model = load_model(cnn_path)
    assert len(model.graph.initializers) >= 10
    assert not any(n.op_type == "Constant" for n in model.graph)


def test_constant_nodes_lifted_and_same_outputs(val_x):
    raw = onnx.load(MODELS / "digits_mlp_constants.onnx")
    assert sum(n.op_type == "Constant" for n in raw.graph.node) == 6
    model = load_model(MODELS / "digits_mlp_constants.onnx")
    assert not any(n.op_type == "Constant" for n in model.graph)
    assert len(model.graph.initializers) == 6
    proto = ir.serde.serialize_model(model).SerializeToString()
    ref = _logits(str(MODELS / "digits_mlp.onnx"), val_x)
    np.testing.assert_allclose(_logits(proto, val_x), ref, rtol=0, atol=1e-6)


def test_external_data_model_loads_and_saves_self_contained(tmp_path, val_x):
    model = load_model(MODELS / "digits_cnn_external.onnx")
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    out = save_model(model, tmp_path / "copy.onnx")
    assert not (tmp_path / "copy.onnx.data").exists()
    ref = _logits(str(MODELS / "digits_cnn.onnx"), val_x)
    np.testing.assert_allclose(_logits(str(out), val_x), ref, atol=1e-6)


def test_save_with_external_data_roundtrip(tmp_path, cnn_path, val_x):
    model = load_model(cnn_path)
    out = save_model(model, tmp_path / "ext.onnx", external_data=True)
    (data,) = tmp_path.glob("ext.onnx.*.data")  # named by the weights' digest
    assert data.stat().st_size > 100_000
    assert out.stat().st_size < 20_000
    reloaded = load_model(out)
    np.testing.assert_allclose(_logits(str(out), val_x), _logits(str(cnn_path), val_x), atol=1e-6)
    assert len(reloaded.graph.initializers) == len(model.graph.initializers)


def test_save_is_deterministic(tmp_path, cnn_path):
    a = save_model(load_model(cnn_path), tmp_path / "a.onnx")
    b = save_model(load_model(cnn_path), tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()


def test_save_refuses_input_and_its_data(tmp_path):
    for name in ("digits_cnn_external.onnx", "digits_cnn_external.onnx.data"):
        shutil.copy(MODELS / name, tmp_path / name)
    before = (tmp_path / "digits_cnn_external.onnx.data").read_bytes()
    model = load_model(tmp_path / "digits_cnn_external.onnx")
    with pytest.raises(OnnxcompError, match="refusing to overwrite"):
        save_model(model, tmp_path / "digits_cnn_external.onnx", external_data=True)
    with pytest.raises(OnnxcompError, match="refusing to overwrite"):
        save_model(model, tmp_path / "digits_cnn_external.onnx", protect=(tmp_path / "digits_cnn_external.onnx",))
    assert (tmp_path / "digits_cnn_external.onnx.data").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["digits_cnn_external.onnx", "digits_cnn_external.onnx.data"]


def test_save_to_missing_folder(tmp_path, cnn_path):
    with pytest.raises(OnnxcompError, match="does not exist"):
        save_model(load_model(cnn_path), tmp_path / "nope" / "m.onnx")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not a model at all", "not a readable ONNX model|not an ONNX model"),
        (b"", "not an ONNX model"),
    ],
)
def test_rejects_non_onnx(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxcompError, match=message):
        load_model(path)


def test_rejects_truncated(tmp_path, cnn_path):
    data = cnn_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxcompError, match=str(path.name)):
        load_model(path)


def test_rejects_missing_file(tmp_path):
    with pytest.raises(OnnxcompError, match="no such file"):
        load_model(tmp_path / "missing.onnx")


def _external_model(tmp_path, location: str):
    proto = onnx.load(MODELS / "digits_cnn_external.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path = tmp_path / "sub" / "m.onnx"
    path.parent.mkdir()
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize(
    "location, message",
    [
        ("../secret.data", "outside the model's folder"),
        ("/etc/passwd", "absolute path"),
        ("missing.data", "is missing"),
    ],
)
def test_rejects_bad_external_data(tmp_path, location, message):
    (tmp_path / "secret.data").write_bytes(b"\0" * 200_000)
    with pytest.raises(OnnxcompError, match=message):
        load_model(_external_model(tmp_path, location))


def test_rejects_short_external_data(tmp_path):
    path = _external_model(tmp_path, "short.data")
    (path.parent / "short.data").write_bytes(b"\0" * 16)
    with pytest.raises(OnnxcompError, match="runs past the end"):
        load_model(path)


def test_rejects_opset_onnxruntime_cannot_run(tmp_path):
    _, max_opset = runtime_limits()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max_opset + 1)])
    model.ir_version = 8
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(OnnxcompError, match=f"opset {max_opset + 1} is newer"):
        load_model(path)


def test_subgraph_constants_lifted(tmp_path):
    """Weights inside If branches are normalised too."""
    def branch(name, value):
        const = helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(np.full((2,), value, np.float32)))
        add = helper.make_node("Add", ["x", f"{name}_w"], [f"{name}_y"])
        return helper.make_graph([const, add], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2])])

    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("t", 1.0), else_branch=branch("e", -1.0))
    proto = helper.make_model(helper.make_graph([node], "g", [cond, x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "if.onnx"
    onnx.save(proto, path)
    model = load_model(path)
    assert not any(n.op_type == "Constant" for n in ir.traversal.RecursiveGraphIterator(model.graph))
    out = save_model(model, tmp_path / "if_out.onnx")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"c": np.array(False), "x": np.zeros(2, np.float32)})[0]
    np.testing.assert_array_equal(got, [-1.0, -1.0])


def test_external_data_chosen_automatically_past_the_limit(tmp_path, cnn_path, val_x, monkeypatch):
    """Past the protobuf limit (lowered here to 100 kB) the weights go to <name>.data by themselves."""
    import onnxcomp.model as model_module

    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT", 100_000)
    out = save_model(load_model(cnn_path), tmp_path / "big.onnx")
    (data,) = tmp_path.glob("big.onnx.*.data")
    assert data.stat().st_size > 100_000
    np.testing.assert_allclose(_logits(str(out), val_x), _logits(str(cnn_path), val_x), atol=1e-6)


def test_tensor_protos_walks_initializers_attributes_and_subgraphs():
    def const(name):
        return numpy_helper.from_array(np.zeros(2, np.float32), name)

    then = helper.make_graph([helper.make_node("Constant", [], ["t"], value=const("then_attr"))], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])], [const("then_init")])
    other = helper.make_graph([helper.make_node("Identity", ["else_init"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])], [const("else_init")])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=const("main_attr")),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [const("main_init")])
    names = sorted(t.name for t in tensor_protos(helper.make_model(graph)))
    assert names == ["else_init", "main_attr", "main_init", "then_attr", "then_init"]
