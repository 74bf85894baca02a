"""data.py and calibrate.py: input checks, batching, and statistics that stream."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.calibrate import ChannelMean, Gram, Histogram, MinMax, collect
from onnxcomp.data import load_data, synthetic_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from onnxcomp.runtime import open_session


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


def test_collect_matches_full_pass(cnn, calib_path):
    """Streaming reduction over batches equals statistics of all activations at once."""
    data = load_data(calib_path, cnn)
    conv_out = next(n for n in cnn.graph if n.op_type == "Relu").outputs[0].name
    mm, hist, gram, mean = MinMax(), Histogram(256), Gram(), ChannelMean(axis=1)
    per_channel = MinMax(axis=1)
    collect(cnn, data, {conv_out: [mm, hist, mean, per_channel], "input": [gram]}, batch_size=37)

    probe = cnn.clone()
    value = next(v for n in probe.graph for v in n.outputs if v.name == conv_out)
    probe.graph.outputs.append(value)
    with open_session(probe) as session:
        full = session.run([conv_out], {"input": data.inputs["input"]})[0]
    assert mm.min == pytest.approx(full.min()) and mm.max == pytest.approx(full.max())
    assert hist.counts.sum() == full.size
    np.testing.assert_allclose(mean.mean, full.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(per_channel.max, full.max(axis=(0, 2, 3)), rtol=1e-6)
    x = data.inputs["input"].reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(gram.xtx, x.T @ x, rtol=1e-9)
    assert gram.count == x.shape[0]


def test_histogram_doubling_keeps_counts_and_order():
    rng = np.random.default_rng(0)
    hist = Histogram(64)
    chunks = [rng.normal(0, s, 1000) for s in (0.1, 1.0, 10.0)]  # range grows twice
    for chunk in chunks:
        hist.update(chunk)
    assert hist.counts.sum() == 3000
    every = np.concatenate(chunks)
    assert hist.range >= np.abs(every).max()
    # mass beyond |x| > 5 is only in the outer bins
    edges = hist.edges
    centers = (edges[:-1] + edges[1:]) / 2
    tail = hist.counts[np.abs(centers) > 5].sum()
    assert abs(tail - (np.abs(every) > 5).sum()) <= 0.02 * 3000


def test_collect_unknown_tensor(cnn, calib_path):
    with pytest.raises(OnnxcompError, match="not in the main graph"):
        collect(cnn, load_data(calib_path, cnn), {"nope": [MinMax()]})
