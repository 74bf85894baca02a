"""distill: the loss vs torch, closed-form reconstruction (never worse, masks kept, low-rank pairs),
a pruned digits model regaining accuracy, and bad inputs exiting 2 before any work."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.calibrate import Paired, Stack, collect
from onnxcomp.cli import main
from onnxcomp.data import Dataset, load_data
from onnxcomp.graph import find_layers, side_by_side
from onnxcomp.model import load_model, save_model
from onnxcomp.passes.base import PassContext
from onnxcomp.passes.distill import Distill
from onnxcomp.passes.distill_layerwise import LinearStats, refit_layer, row_errors
from onnxcomp.passes.distill_loss import distill_loss
from onnxcomp.pipeline import compress

from .conftest import DIGITS, MODELS


def _prune(model: ir.Model, sparsity: float) -> ir.Model:
    """Magnitude pruning per layer, written with numpy (independent of the prune pass)."""
    pruned = model.clone()
    for layer in find_layers(pruned.graph)[0]:
        w = layer.weight()
        threshold = np.sort(np.abs(w).ravel())[int(w.size * sparsity)]
        layer.set_weight(np.where(np.abs(w) < threshold, 0, w).astype(w.dtype))
    return pruned


def _logits(model: ir.Model, data: Dataset) -> np.ndarray:
    stack = Stack()
    collect(model, data, {model.graph.outputs[0].name: [stack]})
    return stack.value


def _accuracy(model: ir.Model, data: Dataset) -> float:
    return float((_logits(model, data).argmax(1) == data.labels).mean())


# --- the loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, temperature", [(0.0, 1.0), (0.3, 2.5), (0.7, 4.0), (1.0, 1.0)])
def test_loss_and_gradient_match_torch(alpha, temperature):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(17, 10)) * 3, rng.normal(size=(17, 10)) * 3
    y = rng.integers(0, 10, 17)
    ours = distill_loss(s, t, y, alpha=alpha, temperature=temperature)
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64)
    ce = F.cross_entropy(st, torch.tensor(y))
    kl = F.kl_div(F.log_softmax(st / temperature, -1), F.softmax(tt / temperature, -1),
                  reduction="batchmean") * temperature ** 2
    ref = alpha * ce + (1 - alpha) * kl
    ref.backward()
    assert abs(ours.total - ref.item()) < 1e-6
    assert abs(ours.ce - ce.item()) < 1e-6 and abs(ours.kl * temperature ** 2 - kl.item()) < 1e-6
    np.testing.assert_allclose(ours.grad, st.grad.numpy(), atol=1e-6)


def test_loss_gradient_matches_finite_differences_without_labels():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    value = distill_loss(s, t, None, alpha=0.4, temperature=3.0)
    assert value.ce is None and value.ce_term == 0 and value.total == pytest.approx(value.kl_term)
    eps, numeric = 1e-6, np.zeros_like(s)
    for i in np.ndindex(s.shape):
        d = np.zeros_like(s)
        d[i] = eps
        numeric[i] = (distill_loss(s + d, t, None, alpha=0.4, temperature=3.0).total
                      - distill_loss(s - d, t, None, alpha=0.4, temperature=3.0).total) / (2 * eps)
    np.testing.assert_allclose(value.grad, numeric, atol=1e-7)


# --- building blocks ---------------------------------------------------------------------------

def test_paired_reducer_joins_two_tensors_of_each_batch(mlp_path, calib_path):
    teacher = load_model(mlp_path)
    student = _prune(teacher, 0.5)
    merged, names = side_by_side(student, teacher, "t/")
    data = load_data(calib_path, teacher)
    products = []
    paired = Paired(lambda a, b: products.append(a.T @ b))
    collect(merged, data, {"logits": [paired.first], names["logits"]: [paired.second]}, batch_size=64)
    got = sum(products)
    np.testing.assert_allclose(got, _logits(student, data).T @ _logits(teacher, data), rtol=1e-4)


def test_refit_never_increases_layer_error():
    """Rows 0-2: w0 is off in both splits, so they are refit. Rows 3-5: w0 is right and the fit
    split holds a spurious correlation the held-out split lacks: the solve is worse there, and
    those rows keep w0. Errors are checked against the raw data, not the statistics."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 30)).astype(np.float32)
    xa = np.hstack([x, np.ones((60, 1))])
    mask = rng.random((6, 30)) > 0.5
    w0 = rng.normal(size=(6, 31))
    w0[:, :30] *= mask
    y = xa @ w0.T
    y[:, :3] += xa @ (rng.normal(size=(31, 3)) * np.vstack([mask[:3].T, np.ones((1, 3))])) * 0.3
    y[:45, 3:] += 2.0 * x[:45, [0, 1, 2]] * mask[3:, [0, 1, 2]].any(axis=0)  # spurious, fit split only
    y[:45, 3:] += 0.5 * x[:45, [3, 4, 5]]
    layer = _FakeLayer(6)
    fit, hold = LinearStats(layer), LinearStats(layer)
    fit.fold(x[:45], y[:45].astype(np.float32))
    hold.fold(x[45:], y[45:].astype(np.float32))
    w, info = refit_layer(fit, hold, w0, mask)
    direct = lambda w_: ((xa @ w_.T - y) ** 2).sum(axis=0)  # noqa: E731
    np.testing.assert_allclose(row_errors(fit + hold, w0), direct(w0), rtol=1e-4)
    assert np.all(direct(w) <= direct(w0) * (1 + 1e-9))
    assert np.all(w[:, :30][~mask] == 0)
    assert np.all(direct(w)[:3] < 0.1 * direct(w0)[:3])             # refit where w0 was off
    assert np.array_equal(w[3:], w0[3:]) and info["rows_refit"] == 3  # kept where the solve is worse


class _FakeLayer:
    """Just enough of a Layer for LinearStats: a MatMul with ``out`` outputs."""

    def __init__(self, out):
        self.out_features = out
        self.node = type("N", (), {"op_type": "MatMul"})()


# --- the pass ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_teacher(mlp_path):
    return load_model(mlp_path)


@pytest.fixture(scope="module")
def pruned_mlp(mlp_teacher):
    return _prune(mlp_teacher, 0.7)


def test_pruned_digits_mlp_regains_accuracy_and_masks_survive(mlp_teacher, pruned_mlp, calib_path, val_path):
    val = load_data(val_path, mlp_teacher)
    teacher_acc, pruned_acc = _accuracy(mlp_teacher, val), _accuracy(pruned_mlp, val)
    student = pruned_mlp.clone()
    context = PassContext(calib=load_data(calib_path, mlp_teacher), original=mlp_teacher)
    result = Distill({}, context)(student)
    acc = _accuracy(student, val)
    assert pruned_acc < teacher_acc - 0.05                       # pruning really lost accuracy
    assert acc - pruned_acc >= 0.5 * (teacher_acc - pruned_acc)  # at least half of it comes back
    metrics = result.stats.metrics
    assert metrics["loss_after"]["total"] < metrics["loss_before"]["total"]
    assert metrics["loss_before"]["ce_term"] + metrics["loss_before"]["kl_term"] == pytest.approx(
        metrics["loss_before"]["total"], abs=1e-5)
    for before, after in zip(find_layers(pruned_mlp.graph)[0], find_layers(student.graph)[0]):
        assert np.all(after.weight()[before.weight() == 0] == 0)
        assert np.mean(after.weight() == 0) == pytest.approx(np.mean(before.weight() == 0))
    for layer in metrics["layers"]:
        assert layer["rel_error_after"] <= layer["rel_error_before"]


def test_low_rank_pair_solved_in_sequence():
    """Two MatMuls marked as a low-rank pair, fitted to a dense teacher layer of the same name."""
    rng = np.random.default_rng(4)
    w = (rng.normal(size=(12, 4)) @ rng.normal(size=(4, 16)) + 0.05 * rng.normal(size=(12, 16))).astype(np.float32)
    b = rng.normal(size=16).astype(np.float32)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    first, second = (u[:, :4] * s[:4]).astype(np.float32), vt[:4].astype(np.float32)
    first += 0.3 * rng.normal(size=first.shape).astype(np.float32)  # a poor factorization to repair

    def model(nodes, inits):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                                  [numpy_helper.from_array(a, k) for k, a in inits.items()])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        return ir.serde.deserialize_model(proto)

    teacher = model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                     helper.make_node("Add", ["h", "b"], ["y"])], {"w": w, "b": b})
    mm_b = helper.make_node("MatMul", ["x", "fb"], ["z"], name="fc_lowrank_B")
    mm_a = helper.make_node("MatMul", ["z", "fa"], ["h"], name="fc_lowrank_A")
    for node, tag in ((mm_b, "fc:B"), (mm_a, "fc:A")):
        node.metadata_props.add(key="onnxcomp.lowrank", value=tag)
    student = model([mm_b, mm_a, helper.make_node("Add", ["h", "b"], ["y"])], {"fb": first, "fa": second, "b": b})
    x = rng.normal(size=(200, 12)).astype(np.float32)
    data = Dataset({"x": x})
    error = lambda m: float(((_logits(m, data) - _logits(teacher, data)) ** 2).mean())  # noqa: E731
    before = error(student)
    result = Distill({"alpha": 0.0}, PassContext(calib=data, original=teacher))(student)
    kinds = [layer["kind"] for layer in result.stats.metrics["layers"]]
    assert kinds == ["low-rank input factor", "low-rank output factor"]
    assert [lay.shape for lay in find_layers(student.graph)[0]] == [(4, 12), (16, 4)]
    best = float(((x @ (u[:, :4] * s[:4]) @ vt[:4] - x @ w) ** 2).mean())  # the optimal rank-4 error
    assert error(student) < 0.1 * before and error(student) <= best * 1.05  # as good as the optimal rank-4 split


# --- bad inputs: exit 2, named, before any work ----------------------------------------------

@pytest.fixture(scope="module")
def pruned_path(tmp_path_factory, pruned_mlp):
    path = tmp_path_factory.mktemp("distill") / "pruned.onnx"
    save_model(pruned_mlp, path)
    return path


def _run(tmp_path, pruned_path, options, calib, capsys):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"passes": [{"distill": options}]}))
    code = main(["run", str(recipe), "-m", str(pruned_path), "--calib", str(calib), "-o", str(tmp_path / "o.onnx"),
                 "--latency-runs", "0"])
    return code, capsys.readouterr().err


def test_bad_teacher_inputs_exit_2(tmp_path, pruned_path, mlp_path, calib_path, capsys):
    calib = np.load(calib_path)
    good = np.zeros((300, 10), np.float32)
    nan = good.copy()
    nan[7, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    np.save(tmp_path / "classes.npy", np.zeros((300, 9), np.float32))
    np.savez(tmp_path / "nolabels.npz", input=calib["input"])
    teacher = str(mlp_path)
    cases = [
        ({"teacher_logits": str(DIGITS / "digits_mlp.teacher_logits.npy")}, calib_path,
         "497 rows of teacher logits for 300 samples"),
        ({"teacher_logits": str(tmp_path / "classes.npy")}, calib_path, "9 classes, the student's output has 10"),
        ({"teacher_logits": str(tmp_path / "nan.npy")}, calib_path, r"nan.npy: teacher logits hold 1 NaN values \(first in row 7\)"),
        ({"teacher_logits": str(tmp_path / "missing.npy")}, calib_path, "no such teacher logits file"),
        ({"teacher": str(tmp_path / "missing.onnx")}, calib_path, "no such teacher model"),
        ({"teacher": teacher, "alpha": 1.0}, tmp_path / "nolabels.npz", "alpha=1 .* no 'label' array"),
        ({"qat": True}, calib_path, "qat needs engine: torch"),
    ]
    for options, data, message in cases:
        code, err = _run(tmp_path, pruned_path, options, data, capsys)
        assert code == 2, (options, err)
        assert err.count("\n") == 1 and __import__("re").search(message, err), err
        assert not (tmp_path / "o.onnx").exists()


def test_recipe_with_teacher_option_runs_end_to_end(tmp_path, pruned_path, mlp_path, calib_path, val_path):
    recipe = {"passes": [{"distill": {"teacher": str(mlp_path)}}]}
    result = compress(pruned_path, recipe, calib=calib_path, val=val_path, latency_runs=0)
    assert result.report["passes"][0]["metrics"]["teacher"] == str(mlp_path)
    # fidelity is measured against the run's input (the pruned model) - the teacher is better still
    teacher_acc = _accuracy(load_model(mlp_path), load_data(val_path, load_model(mlp_path)))
    assert result.report["fidelity"]["accuracy_compressed"] >= teacher_acc - 0.03


# --- torch engine (the [train] extra) ---------------------------------------------------------

def test_torch_graph_matches_onnxruntime(cnn_path, val_path):
    torch = pytest.importorskip("torch")
    from onnxcomp.torch_graph import TorchGraph

    for path in (cnn_path, MODELS / "digits_mlp_constants.onnx"):
        model = load_model(path)
        data = load_data(val_path, model).head(64)
        graph = TorchGraph(model, set(model.graph.initializers))
        with torch.no_grad():
            got = graph({"input": torch.from_numpy(data.inputs["input"])}, ["logits"])[0].numpy()
        np.testing.assert_allclose(got, _logits(model, data), atol=1e-4)


def test_torch_engine_trains_pruned_cnn_keeping_masks(cnn_path, calib_path, val_path):
    pytest.importorskip("torch")
    teacher = load_model(cnn_path)
    pruned = _prune(teacher, 0.7)
    val = load_data(val_path, teacher)
    student = pruned.clone()
    result = Distill({"engine": "torch", "epochs": 6}, PassContext(calib=load_data(calib_path, teacher),
                                                                   original=teacher))(student)
    teacher_acc, pruned_acc, acc = _accuracy(teacher, val), _accuracy(pruned, val), _accuracy(student, val)
    assert acc - pruned_acc >= 0.5 * (teacher_acc - pruned_acc)
    info = result.stats.metrics["torch"]
    assert info["onnxruntime_vs_torch_max_abs"] < 1e-4 and info["masked_initializers"] == 4
    assert min(info["held_out_loss_by_epoch"]) < info["held_out_loss_by_epoch"][0]
    for before, after in zip(find_layers(pruned.graph)[0], find_layers(student.graph)[0]):
        assert np.all(after.weight()[before.weight() == 0] == 0)
    assert [n.op_type for n in student.graph] == [n.op_type for n in pruned.graph]  # graph unchanged


def test_l1_penalty_on_the_teacher_itself_is_kept_and_helps_a_later_prune(cnn_path, calib_path, val_path):
    """Student = teacher (distill loss 0): only the penalty can improve the held-out objective, so
    training is kept; the L1-regularized weights lose less to a later 90 % global prune."""
    pytest.importorskip("torch")
    teacher = load_model(cnn_path)
    calib, val = load_data(calib_path, teacher), load_data(val_path, teacher)
    student = teacher.clone()
    result = Distill({"engine": "torch", "alpha": 0.0, "l1": 1.0, "epochs": 10},
                     PassContext(calib=calib, original=teacher))(student)
    assert result.stats.touched, result.stats.notes
    l1 = [np.abs(lay.weight()).mean() for lay in find_layers(student.graph)[0]]
    assert sum(l1) < sum(np.abs(lay.weight()).mean() for lay in find_layers(teacher.graph)[0])
    recipe = {"passes": [{"prune": {"method": "l1", "amount": 0.9, "scope": "global"}}]}
    plain, regularized = (compress(m, recipe, latency_runs=0).model for m in (teacher, student))
    assert _accuracy(regularized, val) > _accuracy(plain, val) + 0.05


def test_qat_recovers_per_tensor_int8_accuracy(cnn_path, calib_path, val_path):
    """A case built to lose: 4 channels of the first Conv scaled by 30 (the next Conv divided, so
    the float model is the same function) dominate the per-tensor weight scale."""
    pytest.importorskip("torch")
    from onnxcomp.fusion import fusion_report

    teacher = load_model(cnn_path)
    calib, val = load_data(calib_path, teacher), load_data(val_path, teacher)
    floats = compress(teacher, {"passes": ["cleanup"]}, latency_runs=0).model
    first, second = find_layers(floats.graph)[0][:2]
    scale = np.ones(first.out_features, np.float32)
    scale[:4] = 30.0
    w1, b1, w2 = first.weight(), first.bias(), second.weight()
    first.set_weight(w1 * scale[:, None, None, None])
    first.set_bias(b1 * scale)
    second.set_weight(w2 / scale[None, :, None, None])
    int8 = compress(floats, {"passes": [{"quantize_static": {"per_channel": False}}]}, calib=calib,
                    latency_runs=0).model
    student = int8.clone()
    Distill({"engine": "torch", "qat": True, "epochs": 8}, PassContext(calib=calib, original=teacher))(student)
    teacher_acc, int8_acc, qat_acc = _accuracy(teacher, val), _accuracy(int8, val), _accuracy(student, val)
    assert int8_acc < teacher_acc - 0.01
    assert qat_acc - int8_acc >= 0.5 * (teacher_acc - int8_acc)
    assert [n.op_type for n in student.graph] == [n.op_type for n in int8.graph]
    assert fusion_report(student)["fused_ratio"] == 1.0


# --- shipped recipes ---------------------------------------------------------------------------

def test_prune_then_distill_recipe_regains_accuracy(mlp_path, calib_path, val_path):
    """70 % global L1 loses accuracy on the digits MLP; the closed-form distill step in the same
    recipe brings back at least half of it, masks intact."""
    prune = {"prune": {"method": "l1", "amount": 0.7, "scope": "global", "apply": "fold"}}
    teacher = load_model(mlp_path)
    val = load_data(val_path, teacher)
    pruned = compress(mlp_path, {"passes": ["cleanup", prune]}, latency_runs=0).model
    distilled = compress(mlp_path, {"passes": ["cleanup", prune, "distill"]}, calib=calib_path,
                         latency_runs=0).model
    teacher_acc, pruned_acc, acc = (_accuracy(m, val) for m in (teacher, pruned, distilled))
    assert pruned_acc < teacher_acc - 0.02
    assert acc - pruned_acc >= 0.5 * (teacher_acc - pruned_acc)
    for before, after in zip(find_layers(pruned.graph)[0], find_layers(distilled.graph)[0]):
        assert np.all(after.weight()[before.weight() == 0] == 0)


def test_iterative_recipe_continues_from_the_kept_masks(cnn_path, calib_path, val_path):
    """prune 30 % / distill / prune 30 % of the rest / distill: 51 % in all, the first zeros kept."""
    result = compress(cnn_path, "prune-distill-iterative", calib=calib_path, val=val_path, latency_runs=0)
    assert result.gate_passed, result.failures
    steps = result.report["passes"]
    assert [s["name"] for s in steps] == ["cleanup", "prune", "distill", "prune", "distill"]
    assert steps[1]["metrics"]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert steps[3]["metrics"]["sparsity"] == pytest.approx(1 - 0.7 * 0.7, abs=1e-3)
    assert steps[2]["touched"] and steps[4]["touched"]
    for step in (steps[2], steps[4]):
        assert step["metrics"]["loss_after"]["total"] <= step["metrics"]["loss_before"]["total"]
    sparsity = [np.mean(lay.weight() == 0) for lay in find_layers(result.model.graph)[0]]
    assert np.average(sparsity, weights=[lay.weight().size for lay in find_layers(result.model.graph)[0]]) \
        == pytest.approx(0.51, abs=2e-3)


def test_run_passes_without_original_distills_towards_the_incoming_model(mlp_path, calib_path):
    """Python use outside compress(): the teacher is the model as run_passes received it."""
    from onnxcomp.pipeline import run_passes
    from onnxcomp.recipe import load_recipe

    model = load_model(mlp_path)
    stats = run_passes(model, load_recipe("prune-distill"), PassContext(calib=load_data(calib_path, model)))
    distill = stats[-1]
    assert distill.name == "distill" and distill.metrics["teacher"] == "the run's input model"
    assert distill.touched and distill.metrics["loss_after"]["total"] < distill.metrics["loss_before"]["total"]


def test_torch_recipe_without_torch_exits_2_before_any_work(tmp_path):
    """int8-qat needs the [train] extra: with torch unimportable, one line and exit 2, nothing written."""
    import subprocess
    import sys

    from onnxcomp.recipe import load_recipe

    from .conftest import ROOT

    assert load_recipe("int8-qat").extras_needed() == ("train",)
    assert load_recipe("prune-distill").extras_needed() == ()
    out = tmp_path / "o.onnx"
    code = ("import sys; sys.modules['torch'] = None; from onnxcomp.cli import main; "
            f"sys.exit(main(['run', 'int8-qat', '-m', {str(MODELS / 'digits_cnn.onnx')!r}, '--calib', "
            f"{str(DIGITS / 'calib.npz')!r}, '-o', {str(out)!r}, '--latency-runs', '0']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "[train] extra" in proc.stderr, proc.stderr
    assert not out.exists()


def test_int8_qat_recipe_stays_fused(cnn_path, calib_path, val_path):
    pytest.importorskip("torch")
    result = compress(cnn_path, "int8-qat", calib=calib_path, val=val_path, latency_runs=0)
    assert result.gate_passed, result.failures
    assert result.report["passes"][-1]["metrics"]["engine"] == "torch + qat"
    assert result.report["quantization"]["fused_ratio"] == 1.0


def test_one_d_convs_are_refitted_and_a_score_output_is_judged_by_squared_error():
    """1-D Conv layers (speech models) get image-patch rows of height 1; a one-column output (a
    score: its softmax is constant, the KL always 0) keeps the refit only if its squared error fell."""
    import onnxruntime as ort

    from onnxcomp.passes.distill_layerwise import input_rows

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(8, 4, 3)).astype(np.float32) / 3, rng.normal(size=(6, 8, 3)).astype(np.float32) / 5
    w3 = rng.normal(size=(1, 6 * 7)).astype(np.float32) / 4  # 16 -> 7 positions (dilation 2, stride 2)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2], pads=[1, 1], dilations=[2]),
             helper.make_node("Flatten", ["c2"], ["f"]), helper.make_node("Gemm", ["f", "w3"], ["score"], transB=1)]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (np.full(8, 0.1, np.float32), "b1"), (w2, "w2"),
                                                         (w3, "w3"))]
    graph = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 16])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n", 1])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    teacher = ir.serde.deserialize_model(proto)
    x = rng.normal(size=(200, 4, 16)).astype(np.float32)
    data = Dataset({"x": x}, None, "test")
    # the patch rows reproduce onnxruntime's 1-D Conv (strides, pads, dilations)
    conv2 = find_layers(teacher.graph)[0][1]
    probe = proto.graph.output.add()
    probe.CopyFrom(helper.make_tensor_value_info("r1", TensorProto.FLOAT, None))
    probe2 = proto.graph.output.add()
    probe2.CopyFrom(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    _, relu, c2 = sess.run(None, {"x": x[:5]})
    rows = input_rows(conv2, relu) @ w2.reshape(6, -1).T
    np.testing.assert_allclose(rows, np.moveaxis(c2, 1, -1).reshape(-1, 6), rtol=1e-4, atol=1e-5)

    student = teacher.clone()
    for layer in find_layers(student.graph)[0][:2]:
        w = layer.weight()
        layer.set_weight(np.where(rng.random(w.shape) < 0.6, 0, w).astype(w.dtype))
    pruned = student.clone()
    result = Distill({}, PassContext(calib=data, original=teacher))(student)
    assert [t.split(":")[0] for t in result.stats.touched][:2] == ["Conv", "Conv"], result.stats
    for before, after in zip(find_layers(pruned.graph)[0], find_layers(student.graph)[0]):
        assert np.all(after.weight()[before.weight() == 0] == 0)
    ref, old, new = (_logits(m, data) for m in (teacher, pruned, student))
    assert np.mean((new - ref) ** 2) < 0.5 * np.mean((old - ref) ** 2)
