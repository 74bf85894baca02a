"""The shared test helpers: where the shipped models live, and small ONNX graphs built in code
(tests import builders from here, never from each other)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxcomp.runtime import open_session

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DIGITS = MODELS / "digits"
TINY_BERT = MODELS / "tiny_bert"  # a 2-layer BERT exported like MiniLM (models/tiny_bert/make_tiny_bert.py)


def op_types(model: ir.Model) -> set[str]:
    return {node.op_type for node in model.graph}


def pass_stats(result, name: str) -> dict:
    """The report entry of pass ``name`` in a :func:`onnxcomp.pipeline.compress` result."""
    return next(p for p in result.report["passes"] if p["name"] == name)


def build(nodes, inputs, outputs, inits) -> ir.Model:
    graph = h.make_graph(nodes, "g", inputs, outputs, [nh.from_array(np.asarray(a, np.float32), n)
                                                        for n, a in inits.items()])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def tensor(name, *dims):
    return h.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    with open_session(model) as session:
        return session.run(None, feeds)


def layernorm_block(residual: bool = False, outliers=(3, 17, 40, 55), seed: int = 0) -> ir.Model:
    """LayerNorm (γ ×50 on a few channels) → three MatMuls sharing its output (Q/K/V-like)
    [→ and a residual Add reading it too]."""
    rng = np.random.default_rng(seed)
    k = 64
    gamma = np.ones(k)
    gamma[list(outliers)] = 50.0
    inits = {"gamma": gamma, "beta": rng.normal(0, 0.1, k)}
    nodes = [h.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1)]
    outputs = []
    for name in ("q", "k", "v"):
        inits[f"w{name}"] = rng.normal(0, 0.1, (k, 32))
        nodes.append(h.make_node("MatMul", ["ln", f"w{name}"], [name], name=name))
        outputs.append(tensor(name, "N", 8, 32))
    if residual:
        nodes.append(h.make_node("Add", ["ln", "x"], ["res"], name="residual"))
        outputs.append(tensor("res", "N", 8, k))
    return build(nodes, [tensor("x", "N", 8, k)], outputs, inits)


def block_data(n: int = 64, seed: int = 1) -> dict:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, 8, 64)).astype(np.float32)}


def random_init(seed: int):
    """``init(name, *shape, scale=0.3)``: seeded normal float32 initializers, drawn in call order."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.3):
        return nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
    return init


def kitchen_sink(seed: int = 0) -> onnx.ModelProto:
    """Conv/Relu/residual Add/pools/Concat/Gemm/Sigmoid/3-D MatMul + bias Add/LayerNorm/attention
    MatMul/Softmax/context MatMul, with a Gemm output that is both a graph output and read by another node."""
    init = random_init(seed)

    inits = [
        init("w1", 8, 3, 3, 3), init("b1", 8, scale=0.1), init("w2", 8, 8, 3, 3, scale=0.2),
        init("b2", 8, scale=0.1), init("wg", 10, 16), init("bg", 10, scale=0.1), init("wm", 10, 12),
        init("bm", 12, scale=0.1), nh.from_array(np.ones(12, np.float32), "gamma"),
        nh.from_array(np.zeros(12, np.float32), "beta"), nh.from_array(np.array([1], np.int64), "axes"),
    ]
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        h.make_node("Add", ["c2", "r1"], ["a1"], name="residual"),
        h.make_node("Relu", ["a1"], ["r2"], name="relu2"),
        h.make_node("AveragePool", ["r2"], ["p1"], name="avgpool", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("MaxPool", ["r2"], ["p2"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Concat", ["p1", "p2"], ["cat"], name="concat", axis=1),
        h.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        h.make_node("Gemm", ["flat", "wg", "bg"], ["g"], name="gemm", transB=1),
        h.make_node("Sigmoid", ["g"], ["s"], name="sigmoid"),
        h.make_node("Unsqueeze", ["s", "axes"], ["s3"], name="unsqueeze"),
        h.make_node("MatMul", ["s3", "wm"], ["m"], name="matmul3d"),
        h.make_node("Add", ["m", "bm"], ["mb"], name="bias_add"),
        h.make_node("LayerNormalization", ["mb", "gamma", "beta"], ["ln"], name="layernorm", axis=-1),
        h.make_node("Transpose", ["ln"], ["ln_t"], name="transpose", perm=[0, 2, 1]),
        h.make_node("MatMul", ["ln_t", "ln"], ["att"], name="attention"),
        h.make_node("Softmax", ["att"], ["probs"], name="softmax", axis=-1),
        h.make_node("MatMul", ["probs", "ln_t"], ["y"], name="context"),
    ]
    graph = h.make_graph(
        nodes, "kitchen_sink", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, 1]),
         h.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 10])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def kitchen_sink_data(n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def gemm_variants(seed: int = 0) -> onnx.ModelProto:
    """Gemm with alpha/beta and a [1, N] bias, then MatMul + Add with a [1, N] bias, then a Relu6
    (Clip 0..6); the output is the Clip's."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)
             for name, shape in (("w1", (16, 8)), ("c1", (1, 16)), ("w2", (16, 12)), ("b2", (1, 12)))]
    inits += [nh.from_array(np.array(0.0, np.float32), "lo"), nh.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [
        h.make_node("Gemm", ["x", "w1", "c1"], ["g"], name="gemm", alpha=0.5, beta=2.0, transB=1),
        h.make_node("MatMul", ["g", "w2"], ["m"], name="matmul"),
        h.make_node("Add", ["m", "b2"], ["a"], name="bias"),
        h.make_node("Clip", ["a", "lo", "hi"], ["y"], name="relu6"),
    ]
    graph = h.make_graph(nodes, "gemms", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def masked_attention(seed: int = 0) -> onnx.ModelProto:
    """x [N, 8, 16] -> q = x Wq, k = x Wk -> softmax(q kᵀ + mask) x: the mask adds -1e9 to the
    last three key positions (an attention mask, as exporters write it)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, 8, 8), np.float32)
    mask[..., 5:] = -1e9
    inits = [nh.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "wq"),
             nh.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "wk"),
             nh.from_array(mask, "mask")]
    nodes = [
        h.make_node("MatMul", ["x", "wq"], ["q"], name="query"),
        h.make_node("MatMul", ["x", "wk"], ["k"], name="key"),
        h.make_node("Transpose", ["k"], ["kt"], name="key_t", perm=[0, 2, 1]),
        h.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        h.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        h.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        h.make_node("MatMul", ["probs", "x"], ["y"], name="context"),
    ]
    graph = h.make_graph(nodes, "attention", [h.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
