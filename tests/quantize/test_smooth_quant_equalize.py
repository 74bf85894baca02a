"""smooth_quant and equalize: float function unchanged, int8 error lower on cases built to need them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper as h
from onnx import numpy_helper as nh
from pydantic import ValidationError

from onnxcomp.calibrate import collect
from onnxcomp.data import Dataset
from onnxcomp.model import load_model
from onnxcomp.passes.quantize.equalize import Equalize, equalize_model
from onnxcomp.passes.quantize.smooth_quant import (
    SMOOTH_QUANT_TAG,
    SmoothQuant,
    smooth_quant_model,
)
from onnxcomp.pipeline import compress
from onnxcomp.registry import all_passes
from tests.builders import block_data, build, layernorm_block, run, tensor

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------ helpers


def assert_same_function(a: ir.Model, b: ir.Model, feeds: dict, rtol: float = 1e-4) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds)):
        assert np.abs(x - y).max() <= rtol * np.abs(x).max(), np.abs(x - y).max()


def activations(model: ir.Model, name: str, feeds: dict) -> np.ndarray:
    arrays: list[np.ndarray] = []

    class Keep:
        def update(self, array):
            arrays.append(array)

    collect(model, Dataset(feeds), {name: [Keep()]})
    return np.concatenate(arrays).astype(np.float64)


def fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """uint8 asymmetric per tensor (min-max range containing 0)."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (hi - lo) / 255
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def fake_quant_weight(w: np.ndarray, axis: int | None) -> np.ndarray:
    """int8 symmetric, per channel along ``axis`` (None: per tensor)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    scale = np.abs(w).max(axis=reduce, keepdims=True) / 127
    return np.round(w / scale) * scale


def matmul_int8_error(model: ir.Model, node_name: str, feeds: dict) -> float:
    """Mean squared error of X·W with X uint8 per tensor and W int8 per output channel."""
    node = next(n for n in model.graph if n.name == node_name)
    x = activations(model, node.inputs[0].name, feeds)
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    return float(np.mean((x @ w - fake_quant_activation(x) @ fake_quant_weight(w, 1)) ** 2))


def with_weights_fake_quantized_per_tensor(model: ir.Model) -> ir.Model:
    """A copy whose Conv/Gemm/MatMul weights went through per-tensor int8."""
    proto = ir.serde.serialize_model(model)
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    for i, init in enumerate(proto.graph.initializer):
        if init.name in weights:
            array = nh.to_array(init).astype(np.float64)
            proto.graph.initializer[i].CopyFrom(nh.from_array(fake_quant_weight(array, None).astype(np.float32),
                                                              init.name))
    return ir.serde.deserialize_model(proto)


def const(model: ir.Model, node_name: str, index: int) -> np.ndarray:
    return next(n for n in model.graph if n.name == node_name).inputs[index].const_value.numpy()


# --------------------------------------------------------------- models built to need it


def badly_scaled_conv_chain() -> ir.Model:
    """Conv(3→8) → Relu → Conv(8→4) with output channel i of conv1 ×c_i and input channel i of
    conv2 ×1/c_i, c spanning 1e-2..1e2: same function as a well-scaled pair, awful ranges."""
    c = np.logspace(-2, 2, 8)
    w1 = RNG.normal(0, 0.3, (8, 3, 3, 3)) * c[:, None, None, None]
    b1 = np.abs(RNG.normal(0, 0.1, 8)) * c
    w2 = RNG.normal(0, 0.3, (4, 8, 3, 3)) / c[None, :, None, None]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r1"], name="relu"),
             h.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return build(nodes, [tensor("x", "N", 3, 8, 8)], [tensor("y", "N", 4, 8, 8)],
                 {"w1": w1, "b1": b1, "w2": w2, "b2": RNG.normal(0, 0.1, 4)})


def image_data(channels: int = 3, n: int = 16) -> dict:
    return {"x": np.random.default_rng(2).normal(0, 1, (n, channels, 8, 8)).astype(np.float32)}


# ------------------------------------------------------------------------- SmoothQuant


def test_smooth_quant_lowers_int8_error_of_layernorm_outliers():
    model, feeds = layernorm_block(), block_data()
    smoothed = model.clone()
    stats = smooth_quant_model(smoothed, Dataset(block_data(seed=3)), alpha=0.5)

    assert sorted(stats.touched) == sorted(f"MatMul {n}: smoothed (α=0.5), 1/s folded into LayerNormalization 'ln'"
                                           for n in "qkv")
    assert len(list(smoothed.graph)) == len(list(model.graph))  # folded: no node added
    assert_same_function(model, smoothed, feeds)
    for name in "qkv":
        before, after = matmul_int8_error(model, name, feeds), matmul_int8_error(smoothed, name, feeds)
        assert after * 2 <= before, (name, before, after)
    # one s for the three MatMuls sharing X: the same row factors everywhere
    factors = [const(smoothed, n, 1) / const(model, n, 1) for n in "qkv"]
    np.testing.assert_allclose(factors[0], factors[1], rtol=1e-5)
    np.testing.assert_allclose(factors[0], factors[2], rtol=1e-5)
    info = stats.metrics["smoothed"][0]
    assert info["x_absmax_after"] < info["x_absmax_before"] / 4


def test_smooth_quant_auto_alpha_simulates_int8():
    model = layernorm_block()
    stats = smooth_quant_model(model, Dataset(block_data(seed=3)), alpha="auto")
    info = stats.metrics["smoothed"][0]
    assert info["alpha"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert info["int8_error_after"] * 2 <= info["int8_error_before"]


def test_smooth_quant_before_our_quantize_static():
    if "quantize_static" not in all_passes():
        pytest.skip("quantize_static pass not available")
    model, feeds = layernorm_block(), block_data()
    recipe = {"passes": [{"quantize_static": {"reduce_range": False}}]}
    plain = compress(model, recipe, calib=block_data(seed=3), val=feeds, latency_runs=0)
    smoothed = compress(model, {"passes": ["smooth_quant", *recipe["passes"]]}, calib=block_data(seed=3),
                        val=feeds, latency_runs=0)
    assert smoothed.report["passes"][0]["touched"]
    error = {name: result.report["fidelity"]["mean_abs_error"] for name, result in
             (("plain", plain), ("smoothed", smoothed))}
    assert error["smoothed"] * 2 <= error["plain"], error


def test_smooth_quant_shared_norm_output_is_cloned_or_multiplied():
    model, feeds = layernorm_block(residual=True), block_data()
    calib = Dataset(block_data(seed=3))

    cloned = model.clone()
    stats = smooth_quant_model(cloned, calib)
    assert stats.metrics["cloned_norm"] == 1 and len(stats.touched) == 3
    clones = [n for n in cloned.graph if SMOOTH_QUANT_TAG in n.metadata_props]
    assert [n.op_type for n in clones] == ["LayerNormalization"]
    assert {u.node.name for u in clones[0].outputs[0].uses()} == {"q", "k", "v"}
    assert_same_function(model, cloned, feeds)

    multiplied = model.clone()
    stats = smooth_quant_model(multiplied, calib, clone_norm=False)
    assert stats.metrics["inserted_mul"] == 1
    muls = [n for n in multiplied.graph if SMOOTH_QUANT_TAG in n.metadata_props]
    assert [n.op_type for n in muls] == ["Mul"]
    assert_same_function(model, multiplied, feeds)

    untouched = model.clone()
    stats = smooth_quant_model(untouched, calib, clone_norm=False, insert_mul=False)
    assert not stats.touched
    assert {why for _, why in stats.skipped} == {"X 'ln' also feeds Add 'residual'; insert_mul is off"}


def test_smooth_quant_folds_through_relu_into_gemm_and_skips_with_reasons():
    inits = {"w1": RNG.normal(0, 0.3, (16, 8)), "b1": RNG.normal(0, 0.1, 16),
             "w2": RNG.normal(0, 0.3, (16, 4)) * np.linspace(0.1, 3, 16)[:, None], "w3": RNG.normal(0, 0.3, (8, 4))}
    nodes = [h.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="gemm1", transB=1),
             h.make_node("Relu", ["g1"], ["r1"], name="relu"),
             h.make_node("MatMul", ["r1", "w2"], ["y"], name="fc2"),
             h.make_node("MatMul", ["x", "w3"], ["z"], name="fc3"),
             h.make_node("MatMul", ["y", "z2"], ["t"], name="dynamic")]
    model = build(nodes, [tensor("x", "N", 8), tensor("z2", 4, 2)], [tensor("t", "N", 2), tensor("z", "N", 4)],
                  inits)
    feeds = {"x": RNG.normal(0, 1, (32, 8)).astype(np.float32), "z2": RNG.normal(0, 1, (4, 2)).astype(np.float32)}
    smoothed = model.clone()
    stats = smooth_quant_model(smoothed, Dataset(feeds), insert_mul=False)
    assert stats.touched == ["MatMul fc2: smoothed (α=0.5), 1/s folded into Gemm 'gemm1'"]
    assert dict(stats.skipped) == {
        "MatMul dynamic": "weight is not a constant",
        "Gemm gemm1": "X 'x' is a graph input; insert_mul is off",
        "MatMul fc3": "X 'x' is a graph input; insert_mul is off",
    }
    assert_same_function(model, smoothed, feeds)
    assert not np.allclose(const(smoothed, "gemm1", 1), const(model, "gemm1", 1))  # transB rows scaled


def test_smooth_quant_pass_config_and_registry():
    assert all_passes()["smooth_quant"] is SmoothQuant and SmoothQuant.needs_calibration
    assert all_passes()["equalize"] is Equalize and not Equalize.needs_calibration
    assert SmoothQuant.Config(alpha="auto").alpha == "auto"
    for bad in ({"alpha": 1.5}, {"alpha": "best"}, {"alhpa": 0.5}):
        with pytest.raises(ValidationError):
            SmoothQuant.Config(**bad)
    with pytest.raises(ValidationError):
        Equalize.Config(iterations=0)


def test_smooth_quant_digits_mlp_through_pipeline(mlp_path, calib_path, val_path):
    result = compress(mlp_path, {"passes": ["cleanup", "smooth_quant"]}, calib=calib_path, val=val_path,
                      latency_runs=0)
    stats = result.report["passes"][1]
    assert len(stats["touched"]) == 3  # fc1 (inserted Mul after Flatten), fc2 → fc1, fc3 → fc2 + bias Add
    assert result.report["fidelity"]["accuracy_drop"] == 0
    original = load_model(mlp_path)
    assert_same_function(original, result.model, {"input": np.load(val_path)["input"]})


# ------------------------------------------------------------------------ equalization


def test_equalize_badly_scaled_conv_chain_cuts_per_tensor_int8_error():
    model, feeds = badly_scaled_conv_chain(), image_data()
    equalized = model.clone()
    stats = equalize_model(equalized)

    assert stats.touched and stats.touched[0].startswith("Conv conv1 → Conv conv2: equalized via Relu")
    assert_same_function(model, equalized, feeds)
    pair = stats.metrics["pairs"][0]
    assert pair["spread_first_after"] < pair["spread_first_before"] / 100
    reference = run(model, feeds)[0]

    def int8_mse(m):
        return float(np.mean((run(with_weights_fake_quantized_per_tensor(m), feeds)[0] - reference) ** 2))

    before, after = int8_mse(model), int8_mse(equalized)
    assert after * 10 <= before, (before, after)


@pytest.mark.parametrize("group", [1, 2, 8])
def test_equalize_grouped_and_depthwise_convs_exact(group):
    c = np.logspace(-1, 1, 8)
    inits = {"w1": RNG.normal(0, 0.3, (8, 3, 3, 3)) * c[:, None, None, None], "b1": RNG.normal(0, 0.1, 8),
             "w2": RNG.normal(0, 0.3, (8, 8 // group, 3, 3))}
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("LeakyRelu", ["c1"], ["r1"], name="act", alpha=0.1),
             h.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             h.make_node("Conv", ["p1", "w2"], ["y"], name="conv2", group=group)]
    model = build(nodes, [tensor("x", "N", 3, 8, 8)], [tensor("y", "N", 8, 2, 2)], inits)
    equalized = model.clone()
    stats = equalize_model(equalized, iterations=1)
    assert stats.touched[0].startswith("Conv conv1 → Conv conv2: equalized via LeakyRelu→MaxPool")
    assert_same_function(model, equalized, image_data())
    # one pair, one sweep: per channel, r1 (conv1 outputs) == r2 (inputs of conv2) exactly
    r1 = np.abs(const(equalized, "conv1", 1)).reshape(8, -1).max(axis=1)
    w2 = np.abs(const(equalized, "conv2", 1))
    r2 = np.concatenate([w2[g * (8 // group):(g + 1) * (8 // group)].max(axis=(0, 2, 3)) for g in range(group)])
    np.testing.assert_allclose(r1, r2, rtol=1e-5)


def test_equalize_skips_with_reasons():
    inits = {"w1": RNG.normal(0, 0.3, (4, 3, 1, 1)), "w2": RNG.normal(0, 0.3, (4, 4, 1, 1)),
             "w3": RNG.normal(0, 0.3, (4, 4, 1, 1)), "w4": RNG.normal(0, 0.3, (4, 4, 1, 1))}
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             h.make_node("Sigmoid", ["c1"], ["s1"], name="sigmoid"),
             h.make_node("Conv", ["s1", "w2"], ["c2"], name="conv2"),
             h.make_node("Conv", ["c2", "w3"], ["c3"], name="conv3"),
             h.make_node("Conv", ["c2", "w4"], ["c4"], name="conv4"),
             h.make_node("Conv", ["c3", "c4"], ["y"], name="dynamic")]
    model = build(nodes, [tensor("x", "N", 3, 4, 4)], [tensor("y", "N", 4, 4, 4)], inits)
    stats = equalize_model(model)
    assert not stats.touched
    assert dict(stats.skipped) == {
        "Conv conv1": "followed by Sigmoid 'sigmoid', which is not positively homogeneous per channel",
        "Conv conv2": "output 'c2' has 2 consumers",
        "Conv conv3": "next layer 'dynamic': weight is not a constant",
        "Conv conv4": "next layer 'dynamic' does not read it as its activation",
        "Conv dynamic": "weight is not a constant",
    }
    assert stats.notes == ["no Conv/Gemm/MatMul → (Relu) → Conv/Gemm/MatMul pair to equalize"]


def test_equalize_digits_cnn_keeps_accuracy_and_logits(cnn_path, val_path):
    result = compress(cnn_path, {"passes": ["cleanup", "equalize"]}, val=val_path, latency_runs=0)
    stats = result.report["passes"][1]
    touched = [t.split(":")[0] for t in stats["touched"]]
    assert touched == ["Conv /features/features.0/Conv → Conv /features/features.3/Conv",
                       "Gemm /head/head.0/Gemm → Gemm /head/head.2/Gemm"]
    assert dict((s["what"], s["why"]) for s in stats["skipped"])["Conv /features/features.3/Conv"].startswith(
        "followed by Flatten")
    fidelity = result.report["fidelity"]
    assert fidelity["accuracy_compressed"] == fidelity["accuracy_original"] == pytest.approx(0.992, abs=1e-3)
    assert_same_function(load_model(cnn_path), result.model, {"input": np.load(val_path)["input"]})
    assert all(p["spread_first_after"] * p["spread_second_after"] < p["spread_first_before"] * p["spread_second_before"]
               for p in stats["metrics"]["pairs"])


def test_equalize_digits_mlp_gemm_relu_matmul_chain(mlp_path, val_path):
    model = load_model(mlp_path)
    equalized = model.clone()
    stats = equalize_model(equalized)
    assert [t.split(":")[0] for t in stats.touched] == ["Gemm /fc1/Gemm → MatMul /fc2/MatMul", "MatMul /fc2/MatMul → Gemm /fc3/Gemm"]
    assert stats.skipped == [("Gemm /fc3/Gemm", "output is a graph output")]
    assert_same_function(model, equalized, {"input": np.load(val_path)["input"]})
    # fc2's bias Add moved with its output channels; fc1 rows and fc2 rows/columns were rescaled
    assert not np.allclose(const(equalized, "/fc2/Add", 1), const(model, "/fc2/Add", 1))
    assert not np.allclose(const(equalized, "/fc1/Gemm", 1), const(model, "/fc1/Gemm", 1))
