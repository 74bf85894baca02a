"""data.py: input checks, file formats, batching and synthetic inputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.data import load_data, synthetic_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model


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
