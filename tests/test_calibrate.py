"""calibrate.py: reducers and collect() stream statistics equal to those of all activations at once."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.calibrate import ChannelMean, Gram, Histogram, MinMax, collect
from onnxcomp.data import load_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from onnxcomp.runtime import open_session


@pytest.fixture(scope="module")
def cnn(cnn_path):
    return load_model(cnn_path)


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


def test_histogram_doubling_keeps_counts_and_extremes():
    hist = Histogram(64)
    hist.update(np.array([0.3, -0.2], np.float32))
    hist.update(np.array([2.0, -5.0, 1.0], np.float32))  # range 0.3 -> 9.6 (five doublings)
    assert hist.range == pytest.approx(9.6) and hist.counts.sum() == 5
    assert (hist.min, hist.max) == (-5.0, 2.0)
    edges = hist.edges  # every value still sits in the bin that contains it
    for v in (0.3, -0.2, 2.0, -5.0, 1.0):
        i = np.searchsorted(edges, v, side="right") - 1
        assert hist.counts[i] >= 1


def test_gram_multiplies_in_float32_and_sums_in_float64():
    rng = np.random.default_rng(8)
    batches = [(rng.standard_normal((5, 70, 48)) * rng.uniform(0.1, 10, 48)).astype(np.float32) for _ in range(4)]
    gram = Gram(rows=128)  # 350 rows per batch: three float32 partial sums each
    for batch in batches:
        gram.update(batch)
    x = np.concatenate([b.reshape(-1, 48) for b in batches]).astype(np.float64)
    exact = x.T @ x
    assert gram.xtx.dtype == np.float64 and gram.count == len(x)
    np.testing.assert_allclose(gram.xtx, exact, rtol=0, atol=1e-6 * np.abs(exact).max())
    np.testing.assert_allclose(np.diag(gram.xtx), np.diag(exact), rtol=1e-6)
    np.testing.assert_allclose(gram.xtx, gram.xtx.T, rtol=0, atol=0)  # symmetric as XᵀX is
