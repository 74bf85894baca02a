"""svd_split: exact reconstruction, the k(m+n) < mn rule, Gemm attributes, whitened vs plain, speed check."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cli import main
from onnxcomp.passes.base import PassContext
from onnxcomp.passes.lowrank import LOWRANK_KEY, SvdSplit, truncated_factors
from onnxcomp.passes.lowrank_speed import matmul_key
from tests.builders import MODELS

RNG = np.random.default_rng(0)
NO_SPEED = {"require_speedup": False}


def _model(nodes, inits, x_shape, y_shape) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _low_rank(m: int, n: int, r: int) -> np.ndarray:
    return (RNG.normal(size=(m, r)) @ RNG.normal(size=(r, n))).astype(np.float32)


def _split(model: ir.Model, calib=None, **options):
    result = SvdSplit(options, PassContext(calib=calib))(model)
    return result.stats


def test_truncated_factors_reconstruct_exactly_at_full_rank():
    w = RNG.normal(size=(7, 12))
    a, b = truncated_factors(w, 7)
    assert a.shape == (7, 7) and b.shape == (7, 12)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)


def test_matmul_of_rank3_input_splits_exactly_at_its_numerical_rank_bias_after_the_second_factor():
    w_logical = _low_rank(24, 16, 4)  # [out, in], rank 4
    bias = RNG.normal(size=24)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                    helper.make_node("Add", ["h", "b"], ["y"], name="add")],
                   {"w": w_logical.T, "b": bias}, [2, 5, 16], [2, 5, 24])
    x = RNG.normal(size=(2, 5, 16)).astype(np.float32)
    before = _run(model, x)
    stats = _split(model, rank=4, **NO_SPEED)
    assert stats.metrics["ranks"] == {"MatMul mm": 4}
    ops = [(n.op_type, n.metadata_props.get(LOWRANK_KEY)) for n in model.graph]
    assert ops == [("MatMul", "mm:B"), ("MatMul", "mm:A"), ("Add", None)]
    assert "w" not in model.graph.initializers and [o.name for o in model.graph.outputs] == ["y"]
    np.testing.assert_allclose(_run(model, x), before, atol=1e-5 * np.abs(before).max())
    assert stats.params_after - stats.params_before == 4 * (24 + 16) - 24 * 16


@pytest.mark.parametrize("rank,min_saving,split", [(4, 0.0, False), (3, 0.0, True), (3, 0.3, False)])
def test_split_only_where_k_m_plus_n_below_mn(rank, min_saving, split):
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": RNG.normal(size=(8, 8))},
                   [1, 8], [1, 8])
    stats = _split(model, rank=rank, min_saving=min_saving, **NO_SPEED)
    assert bool(stats.touched) == split
    if not split:  # 4*(8+8) = 64 is not < 64; 3*16 = 48 is not < 0.7*64
        assert stats.skipped[0][0] == "MatMul mm" and "would not save parameters" in stats.skipped[0][1]
        assert [n.op_type for n in model.graph] == ["MatMul"]


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [(20,), (1, 20), ()])
def test_gemm_trans_alpha_beta_bias(trans_a, trans_b, c_shape):
    w = _low_rank(20, 12, 3)  # logical [out, in]
    c = RNG.normal(size=c_shape)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", alpha=0.7, beta=1.5, transA=trans_a, transB=trans_b)
    x_shape = [12, 6] if trans_a else [6, 12]
    model = _model([node], {"w": w if trans_b else w.T, "c": c}, x_shape, [6, 20])
    x = RNG.normal(size=x_shape).astype(np.float32)
    before = _run(model, x)
    stats = _split(model, rank=3, **NO_SPEED)
    assert stats.touched and [n.metadata_props[LOWRANK_KEY] for n in model.graph] == ["g:B", "g:A"]
    assert [n.op_type for n in model.graph] == ["Gemm" if trans_a else "MatMul", "Gemm"]
    np.testing.assert_allclose(_run(model, x), before, atol=1e-4 * np.abs(before).max())


def test_a_model_without_matmul_says_so():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], {}, [1, 4], [1, 4])
    assert "no MatMul/Gemm in the model" in _split(model, **NO_SPEED).notes[0]


def test_gemm_with_a_matrix_c_is_skipped_with_its_reason():
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", transB=1)
    model = _model([node], {"w": RNG.normal(size=(20, 12)), "c": RNG.normal(size=(6, 20))}, [6, 12], [6, 20])
    stats = _split(model, rank=2, **NO_SPEED)
    assert stats.skipped == [("Gemm g", "Gemm C is not a per-output bias (a [M, N] matrix)")]


def _outlier_activations(n: int, d: int, seed: int) -> np.ndarray:
    """Correlated activations (a fixed mixing of a low-dimensional signal) with a few huge channels."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(1).normal(size=(8, d))
    x = rng.normal(size=(n, 8)) @ mix + 0.05 * rng.normal(size=(n, d))
    x[:, [3, 17]] *= 40.0  # outlier channels, as after a transformer's LayerNorm
    return x.astype(np.float32)


def test_whitened_keeps_more_fidelity_than_plain_at_equal_parameters():
    d, out = 32, 48
    w = RNG.normal(size=(d, out)).astype(np.float32)  # flat spectrum: plain SVD has nothing to exploit
    calib = _outlier_activations(256, d, seed=2)
    val = _outlier_activations(256, d, seed=3)
    results = {}
    for method in ("plain", "asvd", "whitened"):
        model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": w}, ["n", d], ["n", out])
        from onnxcomp.data import load_data

        data = load_data({"x": calib}, model)
        stats = _split(model, calib=data if method != "plain" else None, method=method, param_ratio=0.5, **NO_SPEED)
        assert stats.metrics["ranks"] == {"MatMul mm": 9}  # equal parameters: 0.5*32*48/80
        y, ref = _run(model, val), val @ w
        results[method] = float(np.sum(y * ref) / np.linalg.norm(y) / np.linalg.norm(ref))
    assert results["whitened"] > 0.999 > results["plain"]
    assert results["whitened"] >= results["asvd"] >= results["plain"]


def test_whitened_beats_plain_on_the_tiny_transformer(tmp_path):
    import onnxcomp

    cos = {}
    for method in ("plain", "whitened"):
        recipe = {"passes": [{"svd_split": {"method": method, "param_ratio": 0.6, **NO_SPEED}}],
                  "gate": {"output": "sentence_embedding", "mask_input": "auto"}}
        result = onnxcomp.compress(MODELS / "tiny_bert/tiny_bert.onnx", recipe,
                                   calib=MODELS / "tiny_bert/calib.npz", val=MODELS / "tiny_bert/val.npz", latency_runs=0)
        assert len(result.report["passes"][0]["touched"]) == 12  # Q, K, V, O, FFN in, FFN out x 2 layers
        cos[method] = result.report["fidelity"]["cosine"]
    assert cos["whitened"] > 0.995 and cos["whitened"] - cos["plain"] > 0.01


def test_global_budget_spends_the_ratio_and_keeps_small_layers_dense(mlp_path, calib_path):
    from onnxcomp.data import load_data
    from onnxcomp.model import load_model

    model = load_model(mlp_path)
    stats = _split(model, calib=load_data(calib_path, model), method="whitened", param_ratio=0.6, budget="global",
                   **NO_SPEED)
    ranks = stats.metrics["ranks"]
    spent = sum(k * (m + n) for k, (m, n) in zip(ranks.values(), [(128, 64), (64, 128)]))
    assert set(ranks) == {"Gemm /fc1/Gemm", "MatMul /fc2/MatMul"} and ranks["Gemm /fc1/Gemm"] > ranks["MatMul /fc2/MatMul"]
    assert spent + 640 <= stats.metrics["global_budget_params"]  # fc3 (10x64) kept dense, paid from the budget
    assert ("Gemm /fc3/Gemm", "global budget leaves it near full rank: kept dense") in stats.skipped


def _chain(weights: list[np.ndarray], d: int) -> ir.Model:
    nodes, inits, x = [], {}, "x"
    for i, w in enumerate(weights):
        y = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y], name=f"mm{i}"))
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Tanh", [y], [f"t{i}"], name=f"tanh{i}"))
            y = f"t{i}"
        inits[f"w{i}"], x = w, y
    return _model(nodes, inits, ["n", d], ["n", weights[-1].shape[1]])


def _chain_error(weights, sequential: bool, **options) -> tuple[float, dict]:
    from onnxcomp.data import load_data

    d = weights[0].shape[0]
    calib, val = _outlier_activations(512, d, seed=4), _outlier_activations(256, d, seed=5)
    reference = _run(_chain(weights, d), val)
    model = _chain(weights, d)
    stats = _split(model, calib=load_data({"x": calib}, model), method="whitened", sequential=sequential,
                   **options, **NO_SPEED)
    return float(np.linalg.norm(_run(model, val) - reference) / np.linalg.norm(reference)), stats.metrics


def test_sequential_fits_the_split_prefix_better_than_one_shot_whitening():
    rng = np.random.default_rng(7)
    weights = [rng.normal(size=(32, 48)).astype(np.float32) / 4, rng.normal(size=(48, 48)).astype(np.float32) / 6,
               rng.normal(size=(48, 16)).astype(np.float32) / 6]
    errors = {}
    for sequential in (False, True):
        errors[sequential], metrics = _chain_error(weights, sequential, param_ratio=0.5)
        assert len(metrics["ranks"]) == 3
    assert errors[True] < errors[False]  # the last two layers see the split inputs they will get
    assert metrics["sequential_stages"] == 3 and metrics["method"] == "whitened sequential"


def test_sequential_equals_one_shot_when_the_prefix_is_exact():
    """A first layer of exact rank 4 split at rank 4 leaves the second layer's inputs unchanged:
    the least-squares target is the float weight and sequential = one-shot whitened."""
    rng = np.random.default_rng(8)
    weights = [_low_rank(32, 40, 4), rng.normal(size=(40, 24)).astype(np.float32)]
    out = {}
    for sequential in (False, True):
        out[sequential] = _chain_error(weights, sequential, rank=4)
    assert out[True][1]["ranks"] == out[False][1]["ranks"] == {"MatMul mm0": 4, "MatMul mm1": 4}
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-3)


@pytest.mark.parametrize("ratio,split", [(1.4, False), (0.6, True)])
def test_speed_check_uses_the_cached_measurement(tmp_path, ratio, split):
    cache = tmp_path / "speed.json"
    cache.write_text(json.dumps({matmul_key(16, 16, 4, r): ratio for r in (1, 256)}))
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": RNG.normal(size=(16, 16))},
                   [1, 16], [1, 16])
    stats = _split(model, rank=4, speed_cache=str(cache))
    assert bool(stats.touched) == split
    assert stats.metrics["speed_ratio"] == {"MatMul mm": {"1": ratio, "256": ratio}}
    if not split:
        assert "not faster in onnxruntime (split/dense time 1.40x at 1 rows, 1.40x at 256 rows)" in stats.skipped[0][1]


@pytest.mark.parametrize("model", ["digits_mlp", "digits_cnn"])
def test_shipped_lowrank_int8_recipe_splits_then_still_fuses(model, calib_path, val_path):
    import onnxcomp

    result = onnxcomp.compress(MODELS / f"{model}.onnx", "lowrank-int8", calib=calib_path, val=val_path, latency_runs=0)
    split = next(p for p in result.report["passes"] if p["name"] == "svd_split")
    assert split["metrics"]["ranks"] and result.report["compressed"]["params"] < result.report["original"]["params"]
    assert result.report["quantization"]["fused_ratio"] == 1.0 and result.gate_passed


def test_same_recipe_same_bytes(mlp_path, calib_path, tmp_path):
    import onnxcomp

    recipe = {"passes": [{"svd_split": {"method": "whitened", "param_ratio": 0.5, **NO_SPEED}}]}
    written = [onnxcomp.compress(mlp_path, recipe, calib=calib_path, latency_runs=0).save(tmp_path / f"{i}.onnx")
               for i in range(2)]
    assert written[0].read_bytes() == written[1].read_bytes()


@pytest.mark.parametrize("options,message", [
    ("{rank: 4, energy: 0.9}", "set one of rank, energy, param_ratio"),
    ("{param_ratio: 1.5}", "param_ratio: must be < 1"),
    ("{rank: 4, budget: global}", "set param_ratio"),
    ("{methd: plain}", "methd: unknown option"),
    ("{method: whitened}", "needs calibration data"),
    ("{method: asvd, sequential: true}", "sequential needs method 'whitened'"),
])
def test_bad_options_exit_2_before_any_work(tmp_path, mlp_path, capsys, options, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"passes:\n  - svd_split: {options}\n")
    out = tmp_path / "o.onnx"
    assert main(["run", str(recipe), "-m", str(mlp_path), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_factors_are_ordinary_layers_for_prune(mlp_path, calib_path, val_path):
    import onnxcomp

    recipe = {"passes": [{"svd_split": {"method": "whitened", "param_ratio": 0.5, "budget": "global", **NO_SPEED}},
                         {"prune": {"amount": 0.3}}]}
    result = onnxcomp.compress(mlp_path, recipe, calib=calib_path, val=val_path, latency_runs=0)
    split, pruned = result.report["passes"]
    factors = [t.split(":")[0] for t in pruned["touched"] if "_lowrank_" in t]
    assert len(factors) == 2 * len(split["metrics"]["ranks"]) > 0
    assert result.report["fidelity"]["cosine"] > 0.9  # both lossy steps, still the same function
