"""prune / prune_remove: masks identical to torch.nn.utils.prune on the same weights, masks that
persist between runs, explicit mask nodes, N:M, sparse storage, and bad options."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import find_layers
from onnxcomp.passes.base import PassContext
from onnxcomp.passes.prune import state
from onnxcomp.passes.prune.masks import TorchRandom, unstructured_mask
from onnxcomp.pipeline import run_passes
from onnxcomp.recipe import load_recipe
from tests.builders import DIGITS, MODELS


def _prune(model: ir.Model, *steps, calib=None) -> list:
    from onnxcomp.data import load_data

    ctx = PassContext(calib=load_data(calib, model) if calib else None)
    return run_passes(model, load_recipe({"passes": list(steps)}), ctx)


def _masks(model: ir.Model) -> dict[str, np.ndarray]:
    """Each pruned layer's mask (node name -> logical mask), as stored in the metadata."""
    saved = state.load_masks(model)
    out = {}
    for layer in find_layers(model.graph)[0]:
        mask = state.resolve(saved.get(state.layer_key(layer)), layer.weight())
        if mask is not None:
            out[layer.node.name] = mask
    return out


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {layer.node.name: layer.weight() for layer in find_layers(model.graph)[0]}


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture()
def cnn() -> ir.Model:
    return ir.load(MODELS / "digits_cnn.onnx")


@pytest.fixture()
def mlp() -> ir.Model:
    return ir.load(MODELS / "digits_mlp.onnx")


# --- torch as the reference ------------------------------------------------------------------------

def _torch_params(weights: dict[str, np.ndarray]):
    torch = pytest.importorskip("torch")

    class Holder(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(w)))

    return {name: Holder(w) for name, w in weights.items()}


def _torch_mask(module) -> np.ndarray:
    return module.weight_mask.detach().numpy().astype(bool)


@pytest.mark.parametrize("amounts", [(0.3,), (0.3, 40), (7, 0.5, 0.25)])
def test_l1_unstructured_and_iterations_equal_torch(cnn, amounts, tmp_path):
    prune = pytest.importorskip("torch.nn.utils.prune")
    modules = _torch_params(_weights(cnn))
    path = tmp_path / "m.onnx"
    for amount in amounts:  # each run starts from the saved file: the masks live in its metadata
        _prune(cnn, {"prune": {"method": "l1", "amount": amount}})
        ir.save(cnn, path)
        cnn = ir.load(path)
        for module in modules.values():
            prune.l1_unstructured(module, "weight", amount=amount)
    ours = _masks(cnn)
    assert set(ours) == set(modules)
    for name, module in modules.items():
        np.testing.assert_array_equal(ours[name], _torch_mask(module), err_msg=name)


@pytest.mark.parametrize("n", [1, 2, float("inf")])
@pytest.mark.parametrize("dim", [0, 1])
def test_ln_structured_equals_torch(cnn, n, dim):
    prune = pytest.importorskip("torch.nn.utils.prune")
    modules = _torch_params(_weights(cnn))
    _prune(cnn, {"prune": {"method": "ln", "n": n, "dim": dim, "amount": 0.3}},
           {"prune": {"method": "ln", "n": n, "dim": dim, "amount": 1}})
    ours = _masks(cnn)
    for name, module in modules.items():
        prune.ln_structured(module, "weight", amount=0.3, n=n, dim=dim)
        prune.ln_structured(module, "weight", amount=1, n=n, dim=dim)
        np.testing.assert_array_equal(ours[name], _torch_mask(module), err_msg=name)


def test_structured_after_unstructured_and_global_equal_torch(mlp):
    prune = pytest.importorskip("torch.nn.utils.prune")
    modules = _torch_params(_weights(mlp))
    _prune(mlp, {"prune": {"method": "l1", "amount": 0.5, "scope": "global"}},
           {"prune": {"method": "l1", "amount": 0.25, "dim": 0}},
           {"prune": {"method": "l1", "amount": 100, "scope": "global"}})
    params = [(m, "weight") for m in modules.values()]  # graph order, as the pass concatenates
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
    for module in modules.values():
        prune.ln_structured(module, "weight", amount=0.25, n=1, dim=0)
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=100)
    ours = _masks(mlp)
    for name, module in modules.items():
        np.testing.assert_array_equal(ours[name], _torch_mask(module), err_msg=name)


def test_random_seed_is_torch_manual_seed(mlp):
    torch = pytest.importorskip("torch")
    prune = pytest.importorskip("torch.nn.utils.prune")
    modules = _torch_params(_weights(mlp))
    _prune(mlp, {"prune": {"method": "random", "amount": 0.4, "seed": 123}},
           {"prune": {"method": "random", "amount": 3, "dim": 1, "seed": 7}})
    torch.manual_seed(123)
    for module in modules.values():
        prune.random_unstructured(module, "weight", amount=0.4)
    torch.manual_seed(7)
    for module in modules.values():
        prune.random_structured(module, "weight", amount=3, dim=1)
    ours = _masks(mlp)
    for name, module in modules.items():
        np.testing.assert_array_equal(ours[name], _torch_mask(module), err_msg=name)
    # the generator itself: bit-exact torch.rand
    torch.manual_seed(5)
    np.testing.assert_array_equal(TorchRandom(5).rand24(1000) / 2**24, torch.rand(1000).double().numpy())


def test_wanda_is_torch_with_activation_importance(mlp):
    """Wanda = torch's l1_unstructured with importance_scores |W|·‖x_j‖ (x: the layer input)."""
    torch = pytest.importorskip("torch")
    prune = pytest.importorskip("torch.nn.utils.prune")
    w = _weights(mlp)["/fc1/Gemm"]
    x = np.load(DIGITS / "calib.npz")["input"].reshape(300, -1).astype(np.float64)
    importance = np.abs(w) * np.sqrt((x ** 2).sum(axis=0))[None, :]
    module = _torch_params({"fc1": w})["fc1"]
    prune.l1_unstructured(module, "weight", amount=0.6, importance_scores=torch.from_numpy(importance))
    _prune(mlp, {"prune": {"method": "wanda", "amount": 0.6, "include": ["/fc1/Gemm"]}}, calib=DIGITS / "calib.npz")
    np.testing.assert_array_equal(_masks(mlp)["/fc1/Gemm"], _torch_mask(module))


def test_global_cut_equals_the_concatenated_reference_with_ties():
    """The layer-by-layer global cut (bisection, no concatenation) prunes exactly what one
    unstructured cut over the concatenated scores prunes: ties, earlier masks, int and float amounts."""
    from onnxcomp.passes.prune.masks import global_unstructured_masks

    rng = np.random.default_rng(0)
    for trial in range(200):
        shapes = [tuple(rng.integers(1, 7, size=rng.integers(1, 4))) for _ in range(rng.integers(1, 5))]
        dtype = np.float32 if trial % 2 else np.float64
        scores = [rng.integers(0, 5, size=sh).astype(dtype) * (0.5 if trial % 3 else 1.0) for sh in shapes]
        masks = [rng.random(sh) > 0.3 for sh in shapes]
        if trial % 5 == 0:  # logical views of transposed storage are not C-contiguous
            scores, masks = [x.T for x in scores], [m.T for m in masks]
        total = sum(int(m.sum()) for m in masks)
        amount = float(rng.random()) if trial % 4 else int(rng.integers(0, total + 1))
        flat = np.concatenate([np.abs(np.asarray(x, np.float64)).reshape(-1) for x in scores])
        expected = unstructured_mask(flat, np.concatenate([m.reshape(-1) for m in masks]), amount)
        got = global_unstructured_masks(scores, masks, amount)
        np.testing.assert_array_equal(np.concatenate([g.reshape(-1) for g in got]), expected)


def test_wanda_global_spends_global_l1_budget_per_layer(mlp):
    """Global wanda: each layer loses exactly what global L1 takes from it; within the layer the
    activation-aware score (torch l1_unstructured with |W|·‖x_j‖ importance) picks the weights."""
    l1 = mlp.clone()
    _prune(l1, {"prune": {"method": "l1", "amount": 0.5, "scope": "global"}})
    _prune(mlp, {"prune": {"method": "wanda", "amount": 0.5, "scope": "global"}}, calib=DIGITS / "calib.npz")
    l1_masks, wanda_masks, weights = _masks(l1), _masks(mlp), _weights(ir.load(MODELS / "digits_mlp.onnx"))
    assert l1_masks.keys() == wanda_masks.keys() and len(l1_masks) >= 2
    for name in l1_masks:
        assert (~wanda_masks[name]).sum() == (~l1_masks[name]).sum()
    assert len({int((~m).sum()) for m in l1_masks.values()}) > 1  # layers lose different shares
    x = np.load(DIGITS / "calib.npz")["input"].reshape(300, -1).astype(np.float64)
    importance = np.abs(weights["/fc1/Gemm"]) * np.sqrt((x ** 2).mean(axis=0))[None, :]
    expected = unstructured_mask(importance, np.ones_like(importance, bool), int((~l1_masks["/fc1/Gemm"]).sum()))
    np.testing.assert_array_equal(wanda_masks["/fc1/Gemm"], expected)
    assert not np.array_equal(wanda_masks["/fc1/Gemm"], l1_masks["/fc1/Gemm"])


def _tiny(weight_stored: np.ndarray, nodes, x_shape, y_shape) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(weight_stored.astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def test_ties_and_integer_amount():
    prune = pytest.importorskip("torch.nn.utils.prune")
    w = np.array([[0.1, -0.2, 0.1, 0.3], [0.2, 0.1, -0.3, 0.4], [0.5, 0.6, -0.1, 0.7]], np.float32)  # four 0.1s
    for amount, exact in ((4, True), (6, True), (2, False), (5, False)):
        model = _tiny(w, [helper.make_node("Gemm", ["x", "w"], ["y"], name="g", transB=1)], [1, 4], [1, 3])
        _prune(model, {"prune": {"amount": amount}})
        ours = _masks(model)["g"]
        module = _torch_params({"g": w})["g"]
        prune.l1_unstructured(module, "weight", amount=amount)
        theirs = _torch_mask(module)
        assert (~ours).sum() == (~theirs).sum() == amount
        tied = np.abs(w) == (0.1 if amount in (2, 4) else 0.2)
        if exact:  # the tie group lies wholly on one side of the cut
            np.testing.assert_array_equal(ours, theirs)
        else:  # torch's choice inside a straddling tie is libstdc++'s; ours: lowest index first
            np.testing.assert_array_equal(ours[~tied], theirs[~tied])
            assert list(np.flatnonzero(~ours[tied])) == list(range((~ours[tied]).sum()))


def test_mask_follows_logical_layout_behind_transpose_and_in_if_branch():
    prune = pytest.importorskip("torch.nn.utils.prune")
    rng = np.random.default_rng(1)
    logical = rng.normal(size=(5, 6)).astype(np.float32)
    then = helper.make_graph([helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
                              helper.make_node("MatMul", ["x", "wt"], ["t_out"], name="inner")], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 5])])
    other = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["e_out"], name="inner_gemm", transB=1)], "else",
                              [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 5])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
         helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], [numpy_helper.from_array(logical, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    _prune(model, {"prune": {"method": "ln", "dim": 1, "amount": 2, "include": ["inner"]}})
    module = _torch_params({"inner": logical})["inner"]
    prune.ln_structured(module, "weight", amount=2, n=2, dim=1)
    np.testing.assert_array_equal(_masks(model)["inner"], _torch_mask(module))
    x = rng.normal(size=(2, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), x @ (logical * _torch_mask(module)).T, rtol=1e-5, atol=1e-6)


# --- how masks land ------------------------------------------------------------------------------

def test_mask_nodes_then_prune_remove_equal_fold(cnn):
    x = np.load(DIGITS / "val.npz")["input"][:64]
    folded = cnn.clone()
    _prune(folded, {"prune": {"amount": 0.4}}, {"prune": {"amount": 0.4}})
    masked = cnn.clone()
    _prune(masked, {"prune": {"amount": 0.4, "apply": "mask"}}, {"prune": {"amount": 0.4, "apply": "mask"}})
    marks = [n for n in masked.graph if n.metadata_props.get("onnxcomp.prune") == "mask"]
    assert len(marks) == 4 and all(n.op_type == "Mul" for n in marks)
    np.testing.assert_allclose(_run(masked, x), _run(folded, x), rtol=1e-5, atol=1e-5)
    _prune(masked, "prune_remove")
    assert not any(n.op_type == "Mul" for n in masked.graph)
    assert state.METADATA_KEY not in masked.metadata_props  # as torch's prune.remove: the mask is gone
    for name, w in _weights(folded).items():
        np.testing.assert_array_equal(_weights(masked)[name], w)
        assert (w == 0).mean() == pytest.approx(0.64, abs=0.01)


def test_nm_2_4(mlp):
    before = _weights(mlp)
    _prune(mlp, {"prune": {"nm": "2:4", "include": ["Gemm"]}})
    for name, w in _weights(mlp).items():
        if name == "/fc2/MatMul":
            np.testing.assert_array_equal(w, before[name])
            continue
        runs = w.reshape(w.shape[0], -1, 4)
        assert ((runs != 0).sum(axis=2) <= 2).all()
        kept = np.sort(np.argsort(-np.abs(before[name].reshape(runs.shape)), axis=2, kind="stable")[..., :2], axis=2)
        np.testing.assert_array_equal(np.sort(np.argwhere(runs != 0)[:, 2].reshape(kept.shape), axis=2), kept)


def test_sparse_storage_shrinks_the_file_and_runs(mlp, tmp_path):
    x = np.load(DIGITS / "val.npz")["input"]
    dense = mlp.clone()
    _prune(dense, {"prune": {"amount": 0.9}})
    stats = _prune(mlp, {"prune": {"amount": 0.9, "storage": "sparse"}})[0]
    ir.save(dense, tmp_path / "dense.onnx")
    ir.save(mlp, tmp_path / "sparse.onnx")
    ratio = (tmp_path / "sparse.onnx").stat().st_size / (tmp_path / "dense.onnx").stat().st_size
    assert ratio <= 0.3, ratio
    assert len(stats.touched) == 2 * 3  # three pruned + three stored sparse
    sess = ort.InferenceSession(str(tmp_path / "sparse.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"input": x})[0], _run(dense, x))


# --- bad options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, fragment", [
    ({"amount": 1.0}, "[0, 1)"),
    ({"amount": -3}, ">= 0"),
    ({}, "amount is required"),
    ({"method": "ln", "amount": 0.5}, "set dim"),
    ({"amount": 0.5, "apply": "remove_channels"}, "set dim"),
    ({"amount": 0.5, "dim": 0, "scope": "global"}, "unstructured only"),
    ({"nm": "4:2"}, "0 < N < M"),
    ({"nm": "2:4", "amount": 0.5}, "exclude each other"),
    ({"amount": 0.5, "storage": "sparse", "apply": "mask"}, "needs apply fold"),
    ({"amount": 0.5, "dim": 2}, "dim"),
    ({"amount": 0.5, "methd": "l1"}, "unknown option"),
])
def test_bad_options_fail_before_work(options, fragment):
    with pytest.raises(OnnxcompError, match="passes\\[0\\].prune") as err:
        load_recipe({"passes": [{"prune": options}]})
    assert fragment in str(err.value)


def test_count_larger_than_layer_is_a_clear_error(mlp):
    with pytest.raises(OnnxcompError, match="more than"):
        _prune(mlp, {"prune": {"amount": 100000}})


def test_cli_bad_option_exit_2(tmp_path, mlp_path):
    from onnxcomp.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - prune: {amount: 0.5, apply: remove_channels}\n")
    assert main(["run", str(recipe), "-m", str(mlp_path), "-o", str(tmp_path / "o.onnx")]) == 2
    assert not (tmp_path / "o.onnx").exists()


def test_unstructured_mask_helper_counts_remaining():
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    new = unstructured_mask(np.arange(6.0), mask, 0.5)  # 4 remaining -> 2 more
    np.testing.assert_array_equal(new, [0, 0, 0, 1, 0, 1])


# --- remove_channels ------------------------------------------------------------------------------

def _run_all(model: ir.Model, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_remove_channels_cnn_shapes_params_and_outputs(cnn):
    from onnxcomp.report import count_params

    x = np.load(DIGITS / "val.npz")["input"][:50]
    _prune(cnn, "cleanup")
    reference = cnn.clone()
    before = _weights(cnn)
    stats = _prune(cnn, {"prune": {"method": "ln", "n": 2, "dim": 0, "amount": 0.5, "apply": "remove_channels"}})[0]
    after = _weights(cnn)
    shapes = {name: w.shape for name, w in after.items()}
    assert shapes == {"/features/features.0/Conv": (8, 1, 3, 3), "/features/features.3/Conv": (16, 8, 3, 3),
                      "/head/head.0/Gemm": (32, 256), "/head/head.2/Gemm": (10, 32)}
    assert stats.skipped[-1][0] == "group [Gemm /head/head.2/Gemm]" and "graph output" in stats.skipped[-1][1]
    assert count_params(cnn) < 0.3 * count_params(reference)
    # the kept channels are torch's ln_structured(dim=0) choice, and removing them is the same
    # function as zeroing, in the original, every column that reads a removed channel
    keep = {}
    for name in ("/features/features.0/Conv", "/features/features.3/Conv", "/head/head.0/Gemm"):
        w = before[name]
        norms = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
        keep[name] = np.sort(np.argsort(-norms, kind="stable")[: w.shape[0] // 2])
    np.testing.assert_array_equal(after["/features/features.0/Conv"], before["/features/features.0/Conv"][
        keep["/features/features.0/Conv"]])
    zeroed = {name: w.copy() for name, w in before.items()}
    conv1, head0, head2 = "/features/features.3/Conv", "/head/head.0/Gemm", "/head/head.2/Gemm"
    zeroed[conv1][:, np.setdiff1d(np.arange(16), keep["/features/features.0/Conv"])] = 0
    dead = np.setdiff1d(np.arange(32), keep[conv1])
    zeroed[head0].reshape(64, 32, 16)[:, dead] = 0
    zeroed[head2][:, np.setdiff1d(np.arange(64), keep[head0])] = 0
    for layer in find_layers(reference.graph)[0]:
        layer.set_weight(zeroed[layer.node.name])
    np.testing.assert_allclose(_run(cnn, x), _run(reference, x), rtol=1e-4, atol=1e-4)


def _block_model() -> ir.Model:
    """Conv A -> Relu -> Split -> Conv B / Conv C -> Add (residual join) -> Relu -> Concat with Conv D
    -> BatchNorm -> GlobalAveragePool -> Flatten -> Gemm, plus an attention-like Transpose branch."""
    rng = np.random.default_rng(3)
    inits = {
        "wa": rng.normal(size=(8, 3, 3, 3)), "ba": rng.normal(size=8),
        "wb": rng.normal(size=(6, 4, 1, 1)), "wc": rng.normal(size=(6, 4, 3, 3)),
        "wd": rng.normal(size=(5, 3, 1, 1)), "scale": rng.uniform(0.5, 1.5, 11), "bias": rng.normal(size=11),
        "mean": rng.normal(size=11), "var": rng.uniform(0.5, 1.5, 11), "wg": rng.normal(size=(7, 11)),
        "we": rng.normal(size=(4, 3, 1, 1)), "split": np.array([4, 4]),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="A", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Split", ["ar", "split"], ["s1", "s2"], axis=1),
        helper.make_node("Conv", ["s1", "wb"], ["b"], name="B"),
        helper.make_node("Conv", ["s2", "wc"], ["c"], name="C", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "c"], ["bc"]),
        helper.make_node("Relu", ["bc"], ["bcr"]),
        helper.make_node("Conv", ["x", "wd"], ["d"], name="D"),
        helper.make_node("Concat", ["bcr", "d"], ["cat"], axis=1),
        helper.make_node("BatchNormalization", ["cat", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("GlobalAveragePool", ["bn"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wg"], ["y"], name="G", transB=1),
        helper.make_node("Conv", ["x", "we"], ["e"], name="E"),
        helper.make_node("Transpose", ["e"], ["z"], perm=[0, 2, 3, 1]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 6, 6, 4])],
                              [numpy_helper.from_array(a.astype(np.int64 if k == "split" else np.float32), k)
                               for k, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def test_remove_channels_groups_residual_split_concat_and_skips():
    model = _block_model()
    x = np.random.default_rng(0).normal(size=(2, 3, 6, 6)).astype(np.float32)
    before = _weights(model)
    stats = _prune(model, {"prune": {"method": "l1", "dim": 0, "amount": 0.5, "apply": "remove_channels"}})[0]
    touched = "\n".join(stats.touched)
    assert "group [Conv A]: 4 of 8" in touched
    assert "group [Conv B, Conv C]: 3 of 6" in touched  # the residual Add joins them
    assert "group [Conv D]: 2 of 5" in touched  # round(0.5 * 5) = 2 (half to even)
    skipped = dict(stats.skipped)
    assert "Transpose" in skipped["group [Conv E]"] and "graph output" in skipped["group [Gemm G]"]
    after = _weights(model)
    assert after["A"].shape == (4, 3, 3, 3) and after["B"].shape[:2] == (3, 2) and after["C"].shape[:2] == (3, 2)
    assert after["G"].shape == (7, 6)
    # reference: the original with every column that reads a removed channel zeroed
    def kept(w, k, extra=None):
        norms = np.abs(w).reshape(w.shape[0], -1).sum(axis=1) if extra is None else extra
        return np.sort(np.argsort(norms, kind="stable")[k:])
    keep_a = kept(before["A"], 4)
    joint = np.abs(before["B"]).reshape(6, -1).sum(1) + np.abs(before["C"]).reshape(6, -1).sum(1)
    keep_bc, keep_d = kept(None, 3, joint), kept(before["D"], 2)
    ref = _block_model()
    zero = {n: w.copy() for n, w in before.items()}
    zero["B"][:, np.setdiff1d(np.arange(4), keep_a[keep_a < 4])] = 0
    zero["C"][:, np.setdiff1d(np.arange(4), keep_a[keep_a >= 4] - 4)] = 0
    zero["G"][:, np.setdiff1d(np.arange(6), keep_bc)] = 0
    zero["G"][:, 6 + np.setdiff1d(np.arange(5), keep_d)] = 0
    for layer in find_layers(ref.graph)[0]:
        layer.set_weight(zero[layer.node.name])
    np.testing.assert_allclose(_run(model, x), _run(ref, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["prune-unstructured", "prune-channels"])
def test_shipped_recipes_pass_their_gates_on_digits(recipe, cnn_path, mlp_path, val_path):
    import onnxcomp

    for path in (cnn_path, mlp_path):
        result = onnxcomp.compress(path, recipe, val=val_path, latency_runs=0)
        assert result.gate_passed, (path.name, result.failures)
        stats = result.report["passes"][1]
        assert stats["name"] == "prune" and stats["touched"]
        if recipe == "prune-channels":
            assert result.report["compressed"]["params"] < 0.8 * result.report["original"]["params"]


def test_shared_weight_pruned_once_for_all_readers():
    w = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("MatMul", ["h", "w"], ["y"], name="b")]
    model = _tiny(w, nodes, [1, 4], [1, 4])
    stats = _prune(model, {"prune": {"amount": 0.5}})[0]
    assert stats.skipped == [("MatMul b", "shares its weight with MatMul a: pruned once for both")]
    assert len(model.graph.initializers) == 1
    stored = next(iter(model.graph.initializers.values())).const_value.numpy()
    np.testing.assert_array_equal(stored != 0, np.abs(w) > np.median(np.abs(w)))
    x = np.random.default_rng(3).normal(size=(1, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), x @ stored @ stored, rtol=1e-5, atol=1e-6)
