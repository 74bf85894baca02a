"""Data layouts: batch-first arrays, one whole feed per sample, one array shared by every sample.

The model is a small stateful one, like a streaming VAD: x [batch, 4], state [2, batch, 3] (no leading
batch axis) and a 0-d int64 sample rate. Every expected number is computed with numpy.
"""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp.data import load_data
from onnxcomp.errors import OnnxcompError

W = np.arange(8, dtype=np.float32).reshape(4, 2) / 10


def stateful_model(path):
    """y = x @ W * sr/16000 + sum(state over axes 0, 2)[:, None]; state_out = state * 0.5."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "k16000"], ["scale"]),
        helper.make_node("Mul", ["xw", "scale"], ["xs"]),
        helper.make_node("ReduceSum", ["state", "axes02"], ["s"], keepdims=0),
        helper.make_node("Unsqueeze", ["s", "axes1"], ["s1"]),
        helper.make_node("Add", ["xs", "s1"], ["y"]),
        helper.make_node("Mul", ["state", "half"], ["state_out"]),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array(16000, np.float32), "k16000"),
             numpy_helper.from_array(np.array([0, 2], np.int64), "axes02"),
             numpy_helper.from_array(np.array([1], np.int64), "axes1"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 3]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [2, "batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def expected(x, state, sr):
    return x @ W * (sr / 16000) + state.sum(axis=(0, 2))[:, None]


@pytest.fixture()
def model_path(tmp_path):
    return stateful_model(tmp_path / "stateful.onnx")


def feeds_of(data):
    return list(data.batches(32))


def test_per_sample_state_and_shared_scalar(model_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1, 4)).astype(np.float32)  # one whole feed per sample
    state = rng.standard_normal((5, 2, 1, 3)).astype(np.float32)
    data = load_data({"x": x, "state": state, "sr": np.array(8000, np.int64)}, ir.load(model_path))
    assert data.layouts == {"x": "sample", "state": "sample", "sr": "shared"}
    assert len(data) == 5
    feeds = feeds_of(data)
    assert len(feeds) == 5
    assert feeds[3]["x"].shape == (1, 4) and feeds[3]["state"].shape == (2, 1, 3) and feeds[3]["sr"].shape == ()
    np.testing.assert_array_equal(feeds[3]["state"], state[3])
    assert [data.samples_in(f) for f in feeds] == [1] * 5


def test_shared_state_with_batch_first_input(model_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = np.ones((2, 1, 3), np.float32)  # exactly one feed: the same for every sample
    data = load_data({"x": x, "state": state, "sr": np.array(16000, np.int64)}, ir.load(model_path))
    assert data.layouts == {"x": "batch", "state": "shared", "sr": "shared"}
    feeds = feeds_of(data)  # a shared feed of batch 1 makes every feed one sample
    assert [f["x"].shape for f in feeds] == [(1, 4)] * 3
    assert all(f["state"] is state for f in feeds)
    assert data.head(2).layouts == data.layouts and len(data.head(2)) == 2


def test_batch_first_with_shared_scalar_keeps_batches(model_path):
    x = np.zeros((70, 4), np.float32)
    state = np.zeros((70, 2, 1, 3), np.float32)
    data = load_data({"x": x[:, None], "state": state, "sr": np.array(16000, np.int64)}, ir.load(model_path))
    assert data.feedwise
    data = load_data({"x": x, "sr": np.array(16000, np.int64), "state": np.zeros((2, 70, 3), np.float32)},
                     ir.load(model_path))
    # state [2, 70, 3] cannot be batch-first (axis 0 is fixed to 2) and is not one feed of batch 70 that
    # fits the rule "one feed shared" ambiguously: it IS one feed ([2, ?, 3] matches) -> shared
    assert data.layouts["state"] == "shared"


def test_impossible_layouts_name_the_input(model_path):
    model = ir.load(model_path)
    with pytest.raises(OnnxcompError, match="input 'x' has shape \\[2, 3, 1, 4\\].*rank 2"):
        load_data({"x": np.zeros((2, 3, 1, 4), np.float32), "state": np.zeros((2, 2, 1, 3), np.float32),
                   "sr": np.array(1, np.int64)}, model)
    with pytest.raises(OnnxcompError, match="input 'state' has 4 samples"):
        load_data({"x": np.zeros((6, 4), np.float32), "state": np.zeros((4, 1, 3), np.float32),
                   "sr": np.array(1, np.int64)}, model)
    with pytest.raises(OnnxcompError, match="per-sample inputs hold different numbers of samples"):
        load_data({"x": np.zeros((6, 1, 4), np.float32), "state": np.zeros((5, 2, 1, 3), np.float32),
                   "sr": np.array(1, np.int64)}, model)
    with pytest.raises(OnnxcompError, match="input 'state'.*axis 2 of each sample"):
        load_data({"x": np.zeros((6, 1, 4), np.float32), "state": np.zeros((6, 2, 1, 5), np.float32),
                   "sr": np.array(1, np.int64)}, model)


def test_compress_and_validate_iterate_the_layout(model_path, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 1, 4)).astype(np.float32)
    state = rng.standard_normal((6, 2, 1, 3)).astype(np.float32)
    val = {"x": x, "state": state, "sr": np.array(8000, np.int64)}
    result = onnxcomp.compress(model_path, "cleanup", calib=val, val=val, latency_runs=2)
    assert result.report["fidelity"]["samples"] == 6
    assert result.report["data_layout"]["val"]["state"].startswith("one whole feed per sample")
    assert result.report["data_layout"]["val"]["sr"].startswith("one array shared")
    assert result.report["fidelity"]["max_abs_error"] == pytest.approx(0.0, abs=1e-6)
    out = result.save(tmp_path / "out.onnx")
    import onnxruntime as ort
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(["y"], {"x": x[2], "state": state[2], "sr": np.array(8000, np.int64)})[0]
    np.testing.assert_allclose(y, expected(x[2], state[2], 8000), rtol=1e-5)


def test_cli_reports_layout(model_path, tmp_path, capsys):
    from onnxcomp.cli import main
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((3, 1, 4), np.float32), state=np.ones((2, 1, 3), np.float32), sr=np.array(16000))
    code = main(["run", "cleanup", "-m", str(model_path), "-o", str(tmp_path / "o.onnx"), "--val", str(data),
                 "--latency-runs", "0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "val data layout" in out and "x: one whole feed per sample" in out and "state: one array shared" in out
