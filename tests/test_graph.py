"""The layer view and graph toolkit: logical weights whatever the storage, exact write-back."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.graph import Layer, Names, NodeSelection, constant_array, find_layers, insert_at_producer, label

RNG = np.random.default_rng(0)


def _model(nodes, inits, x_shape, y_shape, outputs=("y",)) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape) for o in outputs],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _only_layer(model: ir.Model) -> Layer:
    layers, _ = find_layers(model.graph)
    assert len(layers) == 1
    return layers[0]


def test_matmul_weight_is_out_in_and_bias_add_found():
    w, b = RNG.normal(size=(6, 4)), RNG.normal(size=4)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                    helper.make_node("Add", ["h", "b"], ["y"], name="add")], {"w": w, "b": b}, [3, 6], [3, 4])
    layer = _only_layer(model)
    np.testing.assert_allclose(layer.weight(), w.T.astype(np.float32))
    np.testing.assert_allclose(layer.bias(), b.astype(np.float32))
    assert (layer.out_features, layer.in_features) == (4, 6)
    assert layer.output.name == "y" and layer.label == "MatMul mm"


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_trans_b_folded_on_write_back(trans_b):
    w = RNG.normal(size=(5, 3))  # logical [out=5, in=3]
    c = RNG.normal(size=5)
    stored = w if trans_b else w.T
    model = _model([helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", alpha=0.5, beta=2.0, transB=trans_b)],
                   {"w": stored, "c": c}, [2, 3], [2, 5])
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    before = _run(model, x)[0]
    layer = _only_layer(model)
    np.testing.assert_allclose(layer.weight(), 0.5 * w, rtol=1e-6)
    np.testing.assert_allclose(layer.bias(), 2.0 * c, rtol=1e-6)
    np.testing.assert_allclose(x @ layer.weight().T + layer.bias(), before, rtol=1e-5, atol=1e-5)
    # write the same logical values back: attributes fold to 1, outputs unchanged
    assert layer.set_weight(layer.weight()) == "replaced"
    layer.set_bias(layer.bias())
    node = layer.node
    assert node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_float("beta", 1.0) == 1.0
    np.testing.assert_allclose(_run(model, x)[0], before, rtol=1e-5, atol=1e-5)
    assert set(model.graph.initializers) == {layer.weight_value.name, node.inputs[2].name}


def test_matmul_weight_behind_transpose_written_to_the_stored_tensor():
    w = RNG.normal(size=(4, 6))  # stored [out, in], MatMul reads Transpose(w) = [in, out]
    model = _model([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                    helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")], {"w": w}, [2, 6], [2, 4])
    layer = _only_layer(model)
    assert layer.transpose is not None
    np.testing.assert_allclose(layer.weight(), w.astype(np.float32))
    new = np.zeros_like(layer.weight())
    new[1] = 1.0
    layer.set_weight(new)
    x = RNG.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], x @ new.T, atol=1e-6)


def test_shared_weight_is_split_or_changed_for_all():
    w = RNG.normal(size=(3, 3))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    model = _model(nodes, {"w": w}, [1, 3], [1, 3])
    first, second = find_layers(model.graph)[0]
    assert first.shared and second.shared
    assert first.set_weight(np.eye(3, dtype=np.float32)) == "split from a shared weight"
    x = RNG.normal(size=(1, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], x @ w.astype(np.float32), rtol=1e-5)
    assert not Layer.of(second.node).shared
    model2 = _model(nodes, {"w": w}, [1, 3], [1, 3])
    a2 = find_layers(model2.graph)[0][0]
    assert a2.set_weight(np.eye(3, dtype=np.float32), for_all_users=True) == "replaced for all users"
    np.testing.assert_allclose(_run(model2, x)[0], x, rtol=1e-6)


def test_set_bias_on_bare_matmul_keeps_the_output_name():
    w = RNG.normal(size=(3, 2))
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w}, [4, 3], [4, 2])
    layer = _only_layer(model)
    layer.set_bias(np.array([1.0, -2.0]))
    assert layer.bias_add is not None and [o.name for o in model.graph.outputs] == ["y"]
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], x @ w.astype(np.float32) + [1.0, -2.0], rtol=1e-5)
    np.testing.assert_allclose(Layer.of(layer.node).bias(), [1.0, -2.0])


def test_conv_layer_grouped_and_bias():
    w, b = RNG.normal(size=(4, 1, 3, 3)), RNG.normal(size=4)
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c", group=2, pads=[1, 1, 1, 1])],
                   {"w": w, "b": b}, [1, 2, 5, 5], [1, 4, 5, 5])
    layer = _only_layer(model)
    assert layer.shape == (4, 1, 3, 3) and layer.group == 2 and layer.in_features == 2
    np.testing.assert_allclose(layer.bias(), b.astype(np.float32))
    x = RNG.normal(size=(1, 2, 5, 5)).astype(np.float32)
    before = _run(model, x)[0]
    layer.set_weight(layer.weight() * 2)
    layer.set_bias(layer.bias() * 2)
    np.testing.assert_allclose(_run(model, x)[0], 2 * before, rtol=1e-5, atol=1e-5)


def test_not_layers_say_why():
    model = _model([helper.make_node("Identity", ["x"], ["x2"]),
                    helper.make_node("MatMul", ["x", "x2"], ["y"], name="mm")], {}, [2, 2], [2, 2])
    layers, skipped = find_layers(model.graph)
    assert layers == [] and skipped == [("MatMul mm", "weight is not a constant")]


def test_node_selection_op_types_globs_min_params():
    w1, w2 = RNG.normal(size=(8, 8)), RNG.normal(size=(8, 2))
    model = _model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="/enc/fc1"),
                    helper.make_node("Gemm", ["h", "w2"], ["y"], name="/head/fc")], {"w1": w1, "w2": w2}, [1, 8], [1, 2])
    names = lambda sel: [layer.name for layer in find_layers(model.graph, sel)[0]]  # noqa: E731
    assert names(NodeSelection()) == ["/enc/fc1", "/head/fc"]
    assert names(NodeSelection(include=("Gemm",))) == ["/head/fc"]
    assert names(NodeSelection(exclude=("/enc/*",))) == ["/head/fc"]
    assert names(NodeSelection(min_params=20)) == ["/enc/fc1"]
    _, skipped = find_layers(model.graph, NodeSelection(exclude=("/enc/*",)))
    assert skipped == [("MatMul /enc/fc1", "excluded by '/enc/*'")]
    assert NodeSelection(include=("Conv", "/nope*")).unmatched(model.graph) == ["Conv", "/nope*"]
    with pytest.raises(Exception):
        NodeSelection(min_params=-1)


def test_names_constants_insert_and_label():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")], {"c": np.ones(2)}, [2], [2])
    names = Names(model.graph)
    assert names("y") == "y_1" and names("fresh") == "fresh" and names("fresh") == "fresh_1"
    np.testing.assert_array_equal(constant_array(model.graph.initializers["c"]), np.ones(2, np.float32))
    assert constant_array(model.graph.inputs[0]) is None
    x = model.graph.inputs[0]
    neg = ir.Node("", "Neg", [x], outputs=[ir.Value(name="n")], name="neg")
    insert_at_producer(model.graph, x, neg)
    assert next(iter(model.graph)) is neg and label(neg) == "Neg neg"


def test_replace_node_by_a_chain_takes_over_the_output_and_drops_dead_inputs():
    w = RNG.normal(size=(4, 6))  # stored [out, in] behind a Transpose
    model = _model([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="t"),
                    helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")], {"w": w}, [2, 6], [2, 4])
    layer = _only_layer(model)
    graph, names = model.graph, Names(model.graph)
    from onnxcomp.graph import add_initializer, replace_node

    b = add_initializer(graph, names, "b", np.eye(6, 3, dtype=np.float32))
    a = add_initializer(graph, names, "a", np.ones((3, 4), np.float32))
    first = ir.Node("", "MatMul", [layer.input, b], name=names("first"))
    second = ir.Node("", "MatMul", [first.outputs[0], a], name=names("second"))
    replace_node(layer.node, [first, second], second.outputs[0])
    assert [n.op_type for n in graph] == ["MatMul", "MatMul"]  # the Transpose went with the MatMul
    assert set(graph.initializers) == {"b", "a"} and [o.name for o in graph.outputs] == ["y"]
    x = RNG.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], x[:, :3].sum(axis=1, keepdims=True) * np.ones((1, 4)), rtol=1e-5)


def test_matmul_reading_a_transposed_activation_is_not_a_layer():
    model = _model([helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
                    helper.make_node("MatMul", ["x", "xt"], ["y"], name="mm")], {}, [2, 2], [2, 2])
    assert find_layers(model.graph)[1] == [("MatMul mm", "weight is not a constant")]


def test_storage_axis_bias_value_and_input_channel_index():
    w = RNG.normal(size=(6, 4))  # MatMul stores [in, out]
    model = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                    helper.make_node("Add", ["h", "b"], ["y"], name="add")], {"w": w, "b": np.ones(4)}, [3, 6], [3, 4])
    layer = _only_layer(model)
    assert layer.storage_out_axis == 1 and layer.bias_value().name == "b"
    np.testing.assert_array_equal(layer.input_channel_index(), np.tile(np.arange(6), (4, 1)))
    conv = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c", group=2)],
                  {"w": RNG.normal(size=(4, 1, 1, 1))}, [1, 2, 3, 3], [1, 4, 3, 3])
    layer = _only_layer(conv)
    assert layer.storage_out_axis == 0 and layer.bias_value() is None
    np.testing.assert_array_equal(layer.input_channel_index().ravel(), [0, 0, 1, 1])  # 2 filters per group


def test_runtime_bias_is_accepted_only_when_asked():
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(RNG.normal(size=(4, 3)).astype(np.float32), "w")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    node = next(iter(model.graph))
    assert Layer.of(node) == "bias is not a constant"
    layer = Layer.of(node, runtime_bias=True)
    assert layer.bias() is None and layer.bias_value().name == "c"


def test_set_weight_and_bias_with_fewer_output_channels():
    """Channel removal writes a smaller weight and bias; a bias Add constant [1, out] keeps its rank."""
    w, b = RNG.normal(size=(6, 4)), RNG.normal(size=(1, 4))
    model = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                    helper.make_node("Add", ["h", "b"], ["y"], name="add")], {"w": w, "b": b}, [3, 6], [3, None])
    layer = _only_layer(model)
    layer.set_weight(layer.weight()[[0, 2]])
    layer.set_bias(layer.bias()[[0, 2]])
    assert constant_array(layer.bias_value()).shape == (1, 2)
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x)[0], x @ w[:, [0, 2]].astype(np.float32) + b[:, [0, 2]], rtol=1e-5, atol=1e-6)
