"""Graph forms third-party exporters produce: old opsets with Constant-node weights, If/Loop subgraphs,
weights shared between nodes. Each test is a small graph reproducing a failure seen on the corpus
(bench/corpus.py), checked against onnxruntime running the original."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxcomp
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from onnxcomp.pipeline import weight_bytes

from .conftest import DIGITS, ROOT

RECIPES = sorted(p.stem for p in (ROOT / "passes").glob("*.yaml"))


def run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- old opset, Constant-node weights
def paddle_like_model(path, opset=11):
    """Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm, every weight in a Constant
    node (as paddle2onnx and old torch.onnx write them), at an old opset."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 1, 3, 3)).astype(np.float32) / 3
    w2 = rng.standard_normal((32, 16, 3, 3)).astype(np.float32) / 12
    w3 = rng.standard_normal((10, 32)).astype(np.float32) / 6

    def const(name, array):
        return h.make_node("Constant", [], [name], value=nh.from_array(array, name + "_value"))

    nodes = [const("w1", w1), const("b1", np.full(16, 0.1, np.float32)), const("w2", w2), const("w3", w3),
             h.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c2"], ["r2"]),
             h.make_node("GlobalAveragePool", ["r2"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
             h.make_node("Gemm", ["f", "w3"], ["y"], transB=1)]
    graph = h.make_graph(nodes, "paddle_like", [h.make_tensor_value_info("input", T.FLOAT, ["n", 1, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 10])])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=7), path)
    return path


def test_old_opset_is_upgraded_verified_and_recorded(tmp_path):
    path = paddle_like_model(tmp_path / "old.onnx")
    assert not load_model(path).graph.initializers or all(n.op_type != "Constant" for n in load_model(path).graph)
    result = onnxcomp.compress(path, "int8", calib=DIGITS / "calib.npz", val=DIGITS / "val.npz", latency_runs=0)
    steps = {p["name"]: p for p in result.report["passes"]}
    assert "opset 11 -> 13" in steps["opset_upgrade"]["touched"][0]
    assert "outputs equal in onnxruntime" in steps["opset_upgrade"]["touched"][0]
    assert result.model.opset_imports[""] == 13
    assert steps["quantize_static"]["touched"], "the Convs and the Gemm are quantized after the upgrade"
    out = result.save(tmp_path / "int8.onnx")
    x = np.load(DIGITS / "val.npz")["input"][:64]
    ref, new = run(path, [{"input": x}])[0][0], run(out, [{"input": x}])[0][0]
    assert cosine(ref, new) > 0.99


def test_failed_upgrade_leaves_the_model_and_says_why(tmp_path, monkeypatch):
    path = paddle_like_model(tmp_path / "old.onnx")

    def refuse(proto, target):
        raise RuntimeError("no adapter for Conv")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    with pytest.raises(OnnxcompError, match="opset"):
        onnxcomp.compress(path, "int8-dynamic", latency_runs=0)
    from onnxcomp.opset import upgrade_opset
    model = load_model(path)
    result = upgrade_opset(model, 13, None, needed_by="test")
    assert not result.done and "cannot convert" in result.skipped[0][1] and "no adapter for Conv" in result.skipped[0][1]
    assert model.opset_imports[""] == 11


# ---------------------------------------------------------------- If / Loop subgraphs
def subgraph_model(path):
    """A main-graph MatMul, then an If whose then-branch passes an outer value straight through
    (Identity) and whose else-branch holds its own weight, then a Loop with a MatMul in its body.
    Graph outputs: the Loop's, the If's, a graph input passed through Identity, an initializer."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 16)).astype(np.float32) / 3
    w_else = rng.standard_normal((16, 16)).astype(np.float32) / 4
    w_loop = rng.standard_normal((16, 16)).astype(np.float32) / 4
    then_g = h.make_graph([h.make_node("Identity", ["hmain"], ["t_out"])], "then", [],
                          [h.make_tensor_value_info("t_out", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("MatMul", ["hmain", "W_else"], ["e_mm"]), h.make_node("Relu", ["e_mm"], ["e_out"])],
                          "else", [], [h.make_tensor_value_info("e_out", T.FLOAT, None)], [nh.from_array(w_else, "W_else")])
    body = h.make_graph([h.make_node("Identity", ["cond_in"], ["cond_out"]),
                         h.make_node("MatMul", ["acc_in", "W_loop"], ["mm"]), h.make_node("Tanh", ["mm"], ["acc_out"])],
                        "body", [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                                 h.make_tensor_value_info("acc_in", T.FLOAT, None)],
                        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("acc_out", T.FLOAT, None)])
    nodes = [h.make_node("MatMul", ["x", "W0"], ["hmm"]), h.make_node("Relu", ["hmm"], ["hmain"]),
             h.make_node("ReduceSum", ["x"], ["s"], keepdims=0), h.make_node("Greater", ["s", "zero"], ["c"]),
             h.make_node("If", ["c"], ["if_out"], then_branch=then_g, else_branch=else_g),
             h.make_node("Loop", ["trip", "true", "if_out"], ["loop_out"], body=body),
             h.make_node("Identity", ["x"], ["x_copy"])]
    graph = h.make_graph(
        nodes, "subgraphs", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8])],
        [h.make_tensor_value_info("loop_out", T.FLOAT, ["batch", 16]), h.make_tensor_value_info("if_out", T.FLOAT, ["batch", 16]),
         h.make_tensor_value_info("x_copy", T.FLOAT, ["batch", 8]), h.make_tensor_value_info("W0", T.FLOAT, [8, 16])],
        [nh.from_array(w0, "W0"), nh.from_array(w_loop, "W_loop"), nh.from_array(np.array(0, np.float32), "zero"),
         nh.from_array(np.array(3, np.int64), "trip"), nh.from_array(np.array(True), "true")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def subgraph_data():
    x = np.load(DIGITS / "val.npz")["input"][:96].reshape(96, 64)[:, ::8].copy() - 0.3  # real pixels, both signs
    return {"x": x.astype(np.float32)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_keeps_subgraph_outputs_valid(tmp_path, recipe):
    path = subgraph_model(tmp_path / "sub.onnx")
    data = subgraph_data()
    if onnxcomp.load_recipe(recipe).extras_needed():  # distill's torch engine: no If/Loop, one line before any work
        with pytest.raises(OnnxcompError, match=r"the ops If, Loop|\[train\] extra"):
            onnxcomp.compress(path, recipe, calib=data, val=data, latency_runs=0)
        return
    result = onnxcomp.compress(path, recipe, calib=data, val=data, latency_runs=0)
    out = result.save(tmp_path / f"{recipe}.onnx", force=True)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    rows = [{"x": data["x"][i:i + 1]} for i in range(0, 96, 7)]
    for ref, new in zip(run(path, rows), run(out, rows)):
        np.testing.assert_array_equal(ref[2], new[2])  # the graph input passed through
        np.testing.assert_array_equal(ref[3], new[3])  # the initializer output is the original weight
        # the prune recipes zero half of this random toy model's weights: lossy by design (0.89;
        # prune-distill*: 0.89 / 0.85, distill cannot refit the MatMuls inside If/Loop)
        floor = 0.8 if recipe.startswith("prune-") and recipe != "prune-channels" else 0.98
        assert cosine(ref[0], new[0]) > floor and cosine(ref[1], new[1]) > floor


@pytest.mark.parametrize("recipe, pass_name", [("int8", "quantize_static"), ("int8-dynamic", "quantize_dynamic"),
                                               ("int4-weights", "quantize_weights")])
def test_subgraph_weights_left_float_with_a_reason(tmp_path, recipe, pass_name):
    path = subgraph_model(tmp_path / "sub.onnx")
    data = subgraph_data()
    result = onnxcomp.compress(path, recipe, calib=data, val=data, latency_runs=0)
    quant = next(p for p in result.report["passes"] if p["name"] == pass_name)
    reasons = {s["what"]: s["why"] for s in quant["skipped"] if "subgraph" in s["why"]}
    inside = sorted(w.split(" (")[0] + " in " + w.split("(")[1].split(" of ")[0] for w in reasons)
    if recipe == "int8":  # the If's else branch is quantized as its own model; the Loop body is not
        assert len(quant["touched"]) == 1 and quant["touched"][0].startswith("else_branch of If"), quant["touched"]
        assert inside == ["MatMul -> mm in body"], reasons
        # W0 is also a graph output: an int8 copy would store it twice, so the main MatMul stays float
        assert any(s["what"].startswith("MatMul") and "a graph output" in s["why"] for s in quant["skipped"])
    else:
        assert len(quant["touched"]) == 1 and "MatMul" in quant["touched"][0], "the main graph's MatMul is quantized"
        assert inside == ["MatMul -> e_mm in else_branch", "MatMul -> mm in body"], reasons
    assert all("left float" in why for why in reasons.values())


# ---------------------------------------------------------------- shared weights are not copied
def test_cleanup_does_not_copy_a_shared_weight(tmp_path):
    """W feeds a MatMul and a Transpose -> MatMul: folding Transpose(W) would store W twice."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "W"], ["a"]), h.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             h.make_node("MatMul", ["x", "Wt"], ["b"]), h.make_node("Add", ["a", "b"], ["y"])]
    graph = h.make_graph(nodes, "shared", [h.make_tensor_value_info("x", T.FLOAT, ["n", 64])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 64])], [nh.from_array(w, "W")])
    path = tmp_path / "shared.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    before = weight_bytes(load_model(path))
    result = onnxcomp.compress(path, "cleanup", latency_runs=0)
    assert weight_bytes(result.model) <= before
    assert result.report["fidelity"]["max_abs_error"] == 0.0


# ---------------------------------------------------------------- torch.onnx If + Loop
def test_torch_export_with_if_and_loop(tmp_path):
    """torch.onnx (TorchScript) of a data-dependent if and a for loop: weights used only inside the
    If branch and the Loop body; every shipped recipe gives a valid model that matches the original."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

        def forward(self, x, n: int = 3):  # a script int argument keeps the loop a Loop
            h = torch.relu(self.a(x))
            if bool(h.sum() > 0):
                h = self.b(h)
            else:
                h = h * 2.0
            for _ in range(n):
                h = torch.tanh(self.c(h))
            return h

    path = tmp_path / "torch_if.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(Net()), (torch.randn(4, 8),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}}, opset_version=17)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"If", "Loop"} <= ops
    n = next(i.name for i in onnx.load(path).graph.input if i.name != "x")
    data = subgraph_data() | {n: np.array(3, np.int64)}  # the loop count: one scalar shared by all samples
    rows = [{"x": data["x"][i:i + 4], n: data[n]} for i in range(0, 96, 12)]
    for recipe in ("int8", "int8-dynamic"):
        result = onnxcomp.compress(path, recipe, calib=data, val=data, latency_runs=0)
        out = result.save(tmp_path / f"{recipe}.onnx", force=True)
        onnx.checker.check_model(onnx.load(out), full_check=True)
        for ref, new in zip(run(path, rows), run(out, rows)):
            assert cosine(ref[0], new[0]) > 0.99, recipe


# ---------------------------------------------------------------- dim_value -1 (paddle2onnx)
def test_negative_dim_is_dynamic(tmp_path):
    """paddle2onnx writes a dynamic batch as dim_value -1: it is a dynamic axis, not a fixed batch
    of -1 (which gave no feeds at all: StopIteration, then bias correction read a None mean)."""
    path = paddle_like_model(tmp_path / "neg.onnx")
    proto = onnx.load(path)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(proto, path)
    from onnxcomp.data import load_data
    data = load_data(DIGITS / "val.npz", load_model(path))
    assert data.fixed_batch is None and data.feed_shapes()["input"][0] > 1
    result = onnxcomp.compress(path, "int8", calib=DIGITS / "calib.npz", val=DIGITS / "val.npz", latency_runs=0)
    steps = {p["name"]: p for p in result.report["passes"]}
    assert steps["quantize_static"]["touched"]
    assert result.report["fidelity"]["cosine"] > 0.99
    from onnxcomp.report import estimate_macs
    assert estimate_macs(load_model(path)) == estimate_macs(load_model(paddle_like_model(tmp_path / "pos.onnx"))) > 0


# ---------------------------------------------------------------- bench/corpus.py report
def test_corpus_report_is_written_when_every_run_failed(tmp_path):
    """A model whose runs and evaluation all failed still gets its rows in the table (was KeyError 'fp32')."""
    import argparse
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import corpus
        import corpus_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    entry = {"id": "m", "package": "p==1", "member": "a/m.onnx", "exporter": "x", "covers": ["If"], "output": "y"}
    rows = {"int8": {"exit": 1, "wall_s": 1.0, "peak_mb": 50.0, "message": "Boom: bug", "written": False}}
    rows = corpus.merge_evals(rows, {})
    args = argparse.Namespace(models=None, recipes=None, no_latency=True, no_ort=True)
    out = tmp_path / "table.md"
    corpus_report.write_markdown(out, {"m": rows}, {"m": entry}, ["int8"], args, 60.0)
    text = out.read_text()
    assert "| int8 | 1 | n |" in text and "Boom: bug" in text


# ---------------------------------------------------------------- Conv-only under int8-dynamic
def conv_only_model(path):
    """Conv -> Relu -> Conv (a keras/tf2onnx feature extractor's shape): no MatMul/Gemm at all."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32) / 3
    w2 = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) / 8
    nodes = [h.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["r1"]),
             h.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = h.make_graph(nodes, "conv_only", [h.make_tensor_value_info("input", T.FLOAT, ["n", 1, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 8, 8, 8])],
                         [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    return path


def test_conv_only_int8_dynamic_says_why_and_what_to_run(tmp_path):
    path = conv_only_model(tmp_path / "conv.onnx")
    result = onnxcomp.compress(path, "int8-dynamic", val=DIGITS / "val.npz", latency_runs=0)
    quant = next(p for p in result.report["passes"] if p["name"] == "quantize_dynamic")
    assert len(quant["skipped"]) == 2 and all("stored int8" in s["why"] for s in quant["skipped"])
    assert len(quant["touched"]) == 2 and all("int8 weights only" in t for t in quant["touched"])
    first = quant["notes"][0]  # the passes table shows the first notes
    assert "2 Conv" in first and "slower" in first and "'int8'" in first, quant["notes"]
    # float compute, int8 weights: the weights take about a quarter of their float bytes
    assert result.report["compressed"]["weight_bytes"] < 0.35 * result.report["original"]["weight_bytes"]
    assert result.report["fidelity"]["cosine"] > 0.999


# ---------------------------------------------------------------- LayerNorm as primitives at an old opset
def layernorm_model(path, opset=13):
    """MatMul -> LayerNorm written as primitives (ReduceMean, Sub, Pow, Sqrt, Div, Mul, Add: torch.onnx
    before opset 17) -> MatMul, at ``opset``: fusing it into LayerNormalization needs opset 17."""
    rng = np.random.default_rng(2)

    def c(name, array):
        return nh.from_array(np.asarray(array, np.float32), name)

    nodes = [h.make_node("MatMul", ["x", "w1"], ["a"]),
             h.make_node("ReduceMean", ["a"], ["mu"], axes=[-1]), h.make_node("Sub", ["a", "mu"], ["d"]),
             h.make_node("Pow", ["d", "two"], ["d2"]), h.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             h.make_node("Add", ["var", "eps"], ["ve"]), h.make_node("Sqrt", ["ve"], ["sd"]),
             h.make_node("Div", ["d", "sd"], ["n"]), h.make_node("Mul", ["n", "gamma"], ["g"]),
             h.make_node("Add", ["g", "beta"], ["ln"]), h.make_node("MatMul", ["ln", "w2"], ["y"])]
    inits = [c("w1", rng.standard_normal((16, 32)) / 4), c("w2", rng.standard_normal((32, 8)) / 6), c("two", 2.0),
             c("eps", 1e-5), c("gamma", 1 + rng.standard_normal(32) / 10), c("beta", rng.standard_normal(32) / 10)]
    graph = h.make_graph(nodes, "ln", [h.make_tensor_value_info("x", T.FLOAT, ["n", 16])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 8])], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", opset)]), path)
    return path


def test_layernorm_fusion_on_an_old_opset_gives_a_valid_model(tmp_path):
    """transformer-int8 on an opset-13 model: the fused LayerNormalization needs opset 17 (was exit 1,
    'No Op registered for LayerNormalization'): the model is upgraded first (verified), or not fused."""
    path = layernorm_model(tmp_path / "ln.onnx")
    x = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    result = onnxcomp.compress(path, "transformer-int8", calib=x, val=x, latency_runs=0)
    out = result.save(tmp_path / "out.onnx", force=True)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert cosine(run(path, [x])[0][0], run(out, [x])[0][0]) > 0.99


def test_layernorm_left_unfused_when_the_upgrade_fails(tmp_path, monkeypatch):
    path = layernorm_model(tmp_path / "ln.onnx")

    def refuse(proto, target):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    x = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    result = onnxcomp.compress(path, "transformer-int8", calib=x, val=x, latency_runs=0)
    fuse = next(p for p in result.report["passes"] if p["name"] == "fuse_transformer")
    assert any(s["what"] == "LayerNormalization" and "opset 13" in s["why"] for s in fuse["skipped"])
    out = result.save(tmp_path / "out.onnx", force=True)
    onnx.checker.check_model(onnx.load(out), full_check=True)


# ---------------------------------------------------------------- LSTM weights
def lstm_model(path, direction="bidirectional"):
    """X [5, 1, 24] (one window, no batch axis to slice: fed one sample at a time) -> LSTM (hidden 48,
    with biases, initial state input) -> Y_h: the recurrent core of the VAD / wake-word models."""
    rng = np.random.default_rng(4)
    dirs, hidden, size = (2 if direction == "bidirectional" else 1), 48, 24
    w = (rng.standard_normal((dirs, 4 * hidden, size)) / 5).astype(np.float32)
    r = (rng.standard_normal((dirs, 4 * hidden, hidden)) / 7).astype(np.float32)
    b = (rng.standard_normal((dirs, 8 * hidden)) / 10).astype(np.float32)
    nodes = [h.make_node("LSTM", ["x", "W", "R", "B", "", "h0"], ["", "y_h"], hidden_size=hidden, direction=direction)]
    graph = h.make_graph(nodes, "lstm", [h.make_tensor_value_info("x", T.FLOAT, [5, 1, size]),
                                         h.make_tensor_value_info("h0", T.FLOAT, [dirs, 1, hidden])],
                         [h.make_tensor_value_info("y_h", T.FLOAT, [dirs, 1, hidden])],
                         [nh.from_array(w, "W"), nh.from_array(r, "R"), nh.from_array(b, "B")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 14)]), path)
    return path


@pytest.mark.parametrize("recipe", ["int8", "int8-dynamic"])
def test_lstm_weights_are_int8(tmp_path, recipe):
    """An LSTM has no QDQ form in onnxruntime: left to the planner it stays float and a mostly-LSTM
    model does not shrink (oww hey_mycroft: size 1.00). It becomes DynamicQuantizeLSTM (int8 W, R)."""
    path = lstm_model(tmp_path / "lstm.onnx")
    rng = np.random.default_rng(5)
    data = {"x": rng.standard_normal((48, 5, 1, 24)).astype(np.float32),  # one whole feed per sample
            "h0": np.zeros((2, 1, 48), np.float32)}  # one state shared by every sample
    result = onnxcomp.compress(path, recipe, calib=data, val=data, latency_runs=0)
    quant = next(p for p in result.report["passes"] if p["name"].startswith("quantize_"))
    assert any("LSTM" in t for t in quant["touched"]), quant
    out = result.save(tmp_path / "out.onnx", force=True)
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert out.stat().st_size <= 0.35 * path.stat().st_size  # int8 W, R; float biases and scales
    feeds = [{"x": data["x"][i], "h0": data["h0"]} for i in range(0, 48, 5)]
    for ref, new in zip(run(path, feeds), run(out, feeds)):
        assert cosine(ref[0], new[0]) > 0.995


# ---------------------------------------------------------------- paddle2onnx head: Reshape to a computed shape
def test_matmul_after_computed_reshape_runs_int8(tmp_path):
    """Conv -> Reshape(x, Concat(Shape(x)[0:1], [-1])) -> MatMul -> Add(bias) (paddle2onnx's classifier
    head): shape inference leaves the Reshape rankless, so MatMul + Add was not merged into a Gemm and
    onnxruntime ran it as a float Gemm (int8 gate: fused ratio 0.98 on ppocr_cls_v2)."""
    rng = np.random.default_rng(6)

    def c(name, array, dtype=np.float32):
        return nh.from_array(np.asarray(array, dtype), name)

    nodes = [h.make_node("Conv", ["input", "wc"], ["f"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["f"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["p"]), h.make_node("Shape", ["p"], ["s"]),
             h.make_node("Slice", ["s", "zero", "one"], ["n"]), h.make_node("Concat", ["n", "minus1"], ["shape"], axis=0),
             h.make_node("Reshape", ["p", "shape"], ["flat"]), h.make_node("MatMul", ["flat", "w"], ["mm"]),
             h.make_node("Add", ["mm", "b"], ["logits"]), h.make_node("Softmax", ["logits"], ["y"], axis=1)]
    inits = [c("wc", rng.standard_normal((16, 1, 3, 3)) / 3), c("w", rng.standard_normal((16, 10)) / 4),
             c("b", rng.standard_normal(10) / 10), c("zero", [0], np.int64), c("one", [1], np.int64),
             c("minus1", [-1], np.int64)]
    graph = h.make_graph(nodes, "head", [h.make_tensor_value_info("input", T.FLOAT, ["n", 1, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 10])], inits)
    path = tmp_path / "head.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), path)
    result = onnxcomp.compress(path, "int8", calib=DIGITS / "calib.npz", val=DIGITS / "val.npz", latency_runs=0)
    assert result.report["gate"]["passed"], result.report["gate"]
    quant = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    assert any("-> Gemm" in n for n in quant["notes"]), quant["notes"]


# ---------------------------------------------------------------- If at the top (spox silero-vad)
def if_at_top_model(path):
    """y = If(sr == 16000, then: Conv -> Relu -> Conv on x, else: a smaller Conv on x): every weight
    inside the branches (the main graph only compares a 0-d int64 input), as spox writes silero-vad."""
    rng = np.random.default_rng(7)

    def branch(name, channels):
        w1 = nh.from_array((rng.standard_normal((channels, 1, 3, 3)) / 3).astype(np.float32), f"{name}_w1")
        w2 = nh.from_array((rng.standard_normal((4, channels, 3, 3)) / channels).astype(np.float32), f"{name}_w2")
        nodes = [h.make_node("Conv", ["x", f"{name}_w1"], [f"{name}_c"], pads=[1, 1, 1, 1]),
                 h.make_node("Relu", [f"{name}_c"], [f"{name}_r"]),
                 h.make_node("Conv", [f"{name}_r", f"{name}_w2"], [f"{name}_y"], pads=[1, 1, 1, 1])]
        return h.make_graph(nodes, name, [], [h.make_tensor_value_info(f"{name}_y", T.FLOAT, None)], [w1, w2])

    nodes = [h.make_node("Equal", ["sr", "k16"], ["is16"]),
             h.make_node("If", ["is16"], ["y"], then_branch=branch("b16", 16), else_branch=branch("b8", 8))]
    graph = h.make_graph(nodes, "if_top", [h.make_tensor_value_info("x", T.FLOAT, ["n", 1, 8, 8]),
                                           h.make_tensor_value_info("sr", T.INT64, [])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 4, 8, 8])],
                         [nh.from_array(np.array(16000, np.int64), "k16")])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    return path


def test_if_branch_taken_by_the_data_is_quantized(tmp_path):
    """Every weight inside If branches: int8 quantized nothing (12 Convs of silero_vad_spox left float).
    The branch the calibration feeds take is quantized as its own model; the other says why not."""
    path = if_at_top_model(tmp_path / "if.onnx")
    x = np.load(DIGITS / "val.npz")["input"][:96]
    data = {"x": x, "sr": np.array(16000, np.int64)}
    result = onnxcomp.compress(path, "int8", calib=data, val=data, latency_runs=0)
    quant = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    assert any(t.startswith("then_branch of If") for t in quant["touched"]), quant["touched"]
    assert any(s["what"].startswith("else_branch of If") and "no calibration feed" in s["why"]
               for s in quant["skipped"]), quant["skipped"]
    out = result.save(tmp_path / "out.onnx", force=True)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    then = next(n for n in onnx.load(out).graph.node if n.op_type == "If").attribute
    body = next(a.g for a in then if a.name == "then_branch")
    assert sum(n.op_type == "DequantizeLinear" for n in body.node) >= 4  # both weights and activations
    feeds = [{"x": x[i:i + 8], "sr": data["sr"]} for i in range(0, 96, 8)]
    for ref, new in zip(run(path, feeds), run(out, feeds)):
        assert cosine(ref[0], new[0]) > 0.99
    other = [{"x": x[:8], "sr": np.array(8000, np.int64)}]  # the float branch still runs
    assert cosine(run(path, other)[0][0], run(out, other)[0][0]) > 0.9999


# ---------------------------------------------------------------- int8 never stores a weight twice or grows a layer
def test_shared_weight_is_quantized_once(tmp_path):
    """Two Convs read one kernel (tf2onnx shares a reshaped Conv1D kernel): one int8 copy, not two."""
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((16, 16, 3, 1)) / 8).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "W"], ["a"], pads=[1, 0, 1, 0]), h.make_node("Relu", ["a"], ["r"]),
             h.make_node("Conv", ["r", "W"], ["y"], pads=[1, 0, 1, 0])]
    graph = h.make_graph(nodes, "shared_conv", [h.make_tensor_value_info("x", T.FLOAT, ["n", 16, 32, 1])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 16, 32, 1])], [nh.from_array(w, "W")])
    path = tmp_path / "shared.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    x = {"x": rng.standard_normal((64, 16, 32, 1)).astype(np.float32)}
    result = onnxcomp.compress(path, "int8", calib=x, val=x, latency_runs=0)
    assert result.report["compressed"]["params"] <= w.size + 2 * 16 * 3, "int8 weight once, plus scales and biases"
    int8 = [v for v in result.model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT8]
    assert sum(v.const_value.size for v in int8) == w.size + 16  # the kernel once and its zero points
    assert result.report["gate"]["passed"] and result.report["fidelity"]["cosine"] > 0.999


def test_layer_whose_int8_costs_more_stays_float(tmp_path):
    """A 1x1 depthwise Conv holds one weight per channel: per-channel scales and zero points cost more than
    int8 saves (weights grew 256 -> 906 bytes). And a weight also read by a float op would be stored twice."""
    rng = np.random.default_rng(9)
    c = 64
    w_dw = rng.standard_normal((c, 1, 1, 1)).astype(np.float32)
    w_mm = (rng.standard_normal((c, c)) / 8).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "W_dw"], ["d"], group=c), h.make_node("Relu", ["d"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["p"]), h.make_node("Flatten", ["p"], ["f"]),
             h.make_node("MatMul", ["f", "W_mm"], ["m"]), h.make_node("ReduceSum", ["W_mm"], ["wsum"], keepdims=0),
             h.make_node("Add", ["m", "wsum"], ["y"])]
    graph = h.make_graph(nodes, "costly", [h.make_tensor_value_info("x", T.FLOAT, ["n", c, 8, 8])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", c])],
                         [nh.from_array(w_dw, "W_dw"), nh.from_array(w_mm, "W_mm")])
    path = tmp_path / "costly.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), path)
    x = {"x": rng.standard_normal((32, c, 8, 8)).astype(np.float32)}
    result = onnxcomp.compress(path, "int8", calib=x, val=x, latency_runs=0)
    quant = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    reasons = {s["what"]: s["why"] for s in quant["skipped"]}
    conv = next(w for w in reasons if w.startswith("Conv"))
    matmul = next(w for w in reasons if w.startswith("MatMul"))
    assert "would not shrink it" in reasons[conv] and "store it twice" in reasons[matmul], reasons
    assert weight_bytes(result.model) <= weight_bytes(load_model(path))


def test_if_branch_weights_from_the_main_graph_are_not_kept_twice(tmp_path):
    """torch.onnx stores the weights an If branch reads as main-graph initializers: once the branch is
    quantized, the float originals go (hey_jarvis grew 0.50 -> 0.59x with both kept)."""
    path = subgraph_model(tmp_path / "sub.onnx")
    proto = onnx.load(path)
    else_g = next(a.g for n in proto.graph.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch")
    w_else = else_g.initializer.pop()  # W_else moves to the main graph, read from the branch as outer scope
    proto.graph.initializer.append(w_else)
    onnx.save(proto, path)
    data = subgraph_data()
    result = onnxcomp.compress(path, "int8", calib=data, val=data, latency_runs=0)
    assert any(t.startswith("else_branch of If") for t in
               next(p for p in result.report["passes"] if p["name"] == "quantize_static")["touched"])
    assert "W_else" not in result.model.graph.initializers
    out = result.save(tmp_path / "out.onnx", force=True)
    onnx.checker.check_model(onnx.load(out), full_check=True)


# ---------------------------------------------------------------- fidelity of outputs without a batch axis
def test_cosine_of_a_per_sample_output_without_batch_axis(tmp_path):
    """faster-whisper's VAD: input [seq_len, 576], output speech_probs [seq_len] — each feed is one whole
    sample. Its cosine is over the sample's whole output, not over rows of one value each (which gave 1.0
    for any positive output: int8 at per-sample cosine 0.98 passed with 'cosine 1')."""
    from onnxcomp.data import load_data
    from onnxcomp.validate import compare
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((8, 1)) / 2).astype(np.float32)

    def model(weight, name):
        nodes = [h.make_node("MatMul", ["x", "W"], ["m"]), h.make_node("Sigmoid", ["m"], ["p"]),
                 h.make_node("Reshape", ["p", "flat"], ["probs"])]
        graph = h.make_graph(nodes, "vad", [h.make_tensor_value_info("x", T.FLOAT, ["seq", 8])],
                             [h.make_tensor_value_info("probs", T.FLOAT, ["seq"])],
                             [nh.from_array(weight, "W"), nh.from_array(np.array([-1], np.int64), "flat")])
        onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), tmp_path / name)
        return load_model(tmp_path / name)

    original, other = model(w, "a.onnx"), model(-w, "b.onnx")
    data = load_data({"x": rng.standard_normal((12, 16, 8)).astype(np.float32)}, original)  # one window per sample
    assert data.feedwise
    same = compare(original, original, data)
    worse = compare(original, other, data)
    assert same["cosine"] == pytest.approx(1.0) and same["samples"] == 12
    assert worse["cosine"] < 0.95, worse["cosine"]  # sigmoid(z) vs sigmoid(-z): same sign, far apart


def test_bias_correction_leaves_no_unused_initializer(tmp_path):
    """The uncorrected int32 biases stayed in the file (onnxruntime: 'Removing initializer ... not used')."""
    path = paddle_like_model(tmp_path / "m.onnx", opset=13)
    result = onnxcomp.compress(path, "int8", calib=DIGITS / "calib.npz", val=DIGITS / "val.npz", latency_runs=0)
    graph = result.model.graph
    unused = [name for name, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]
    assert not unused, unused
