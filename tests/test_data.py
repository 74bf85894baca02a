"""data.py: input checks, file formats, batching and synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper as h

from onnxcomp.data import load_data, synthetic_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from tests.builders import build, tensor


@pytest.fixture(scope="module")
def cnn(cnn_path):
    return load_model(cnn_path)


def test_load_npz(cnn, val_path):
    data = load_data(val_path, cnn)
    assert len(data) == 497 and data.labels.shape == (497,)
    sizes = [len(b["input"]) for b in data.batches(100)]
    assert sizes == [100, 100, 100, 100, 97]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 1, 8, 8), np.float32)}, "missing input 'input'"),
        ({"input": np.zeros((4, 1, 8, 9), np.float32)}, r"shape \[4, 1, 8, 9\].*axis 3"),
        ({"input": np.zeros((4, 64), np.float32)}, "expects rank 4"),
        ({"input": np.zeros((4, 1, 8, 8), np.float64)}, "dtype float64"),
        ({"input": np.zeros((4, 1, 8, 8), np.float32), "extra": np.zeros(4)}, "'extra' is not a model input"),
        ({"input": np.zeros((4, 1, 8, 8), np.float32), "label": np.zeros(3)}, "'label' has 3 entries"),
    ],
)
def test_data_errors(tmp_path, cnn, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(OnnxcompError, match=message):
        load_data(path, cnn)


def test_data_file_not_npz(tmp_path, cnn):
    path = tmp_path / "d.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(OnnxcompError, match="not a readable .npz"):
        load_data(path, cnn)
    with pytest.raises(OnnxcompError, match="no such data file"):
        load_data(tmp_path / "missing.npz", cnn)


def test_pickled_npz_refused(tmp_path, cnn):
    path = tmp_path / "p.npz"
    np.savez(path, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(OnnxcompError, match="not a readable .npz"):
        load_data(path, cnn)


def test_synthetic_data_is_seeded(cnn):
    a, b = synthetic_data(cnn, 8, seed=3), synthetic_data(cnn, 8, seed=3)
    assert a.inputs["input"].shape == (8, 1, 8, 8)
    np.testing.assert_array_equal(a.inputs["input"], b.inputs["input"])


def test_synthetic_data_runs_a_model_with_a_fixed_state_input():
    """A streaming model: a frame of dynamic length beside a state [1, 1, 3] whose axis 0 is static
    (fw_silero_vad_v6's shape): synthetic feeds respect the static dims and the model runs them."""
    from onnxcomp.pipeline import compress

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    model = build([h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Add", ["s", "s"], ["s2"])],
                  [tensor("x", "frames", 4), tensor("s", 1, 1, 3)], [tensor("y", "frames", 3), tensor("s2", 1, 1, 3)],
                  {"w": w})
    data = synthetic_data(model, 5, seed=0)
    assert data.inputs["s"].shape == (5, 1, 1, 3) and data.inputs["x"].shape == (5, 8, 4)
    feeds = list(data.batches())
    assert len(feeds) == 5 and feeds[0]["s"].shape == (1, 1, 3) and feeds[0]["x"].shape == (8, 4)
    result = compress(model, {"passes": ["cleanup"]}, latency_runs=0)
    assert result.report["fidelity"]["synthetic_inputs"] is True
    assert result.report["fidelity"]["cosine"] > 0.9999
