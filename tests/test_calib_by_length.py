"""Calibration batched by length (Dataset.by_length, quantize_static padding_mask): the same samples,
feeds cut after their last marked position, and real positions computed exactly as in full width."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcomp.data import Dataset, load_data, padding_mask_input
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from onnxcomp.passes.base import PassContext
from onnxcomp.pipeline import compress
from onnxcomp.runtime import open_session

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_bert"


def _padded(lengths, width=8):
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = np.arange(len(lengths) * width, dtype=np.int64).reshape(len(lengths), width)
    return Dataset({"ids": ids, "mask": mask, "scale": np.float32(2.0)}, np.arange(len(lengths)),
                   layouts={"scale": "shared"})


def test_by_length_sorts_samples_and_cuts_each_feed_after_its_last_marked_position():
    data = _padded([5, 2, 8, 1, 3])
    ordered = data.by_length("mask")
    assert ordered.labels.tolist() == [3, 1, 4, 0, 2]  # stable sort by length, labels follow
    feeds = list(ordered.batches(2))
    assert [f["mask"].shape for f in feeds] == [(2, 2), (2, 5), (1, 8)]
    assert [f["ids"].shape for f in feeds] == [(2, 2), (2, 5), (1, 8)]
    assert all(f["scale"] == np.float32(2.0) for f in feeds)  # shared inputs are not cut
    np.testing.assert_array_equal(feeds[1]["ids"], data.inputs["ids"][[4, 0], :5])
    head = ordered.head(3)
    assert head.trim_mask == "mask" and [f["mask"].shape[1] for f in head.batches(2)] == [2, 3]
    assert data.by_length("missing") is data  # no such input: unchanged


def test_tiny_bert_mask_is_found_and_real_positions_match_full_width():
    model = load_model(TINY / "tiny_bert.onnx")
    assert padding_mask_input(model) == "attention_mask"
    data = load_data(TINY / "calib.npz", model).head(32)
    ordered = data.by_length("attention_mask")
    with open_session(model) as session:
        full = session.run(["last_hidden_state"], data.window(0, 32))[0]
        cut = [session.run(["last_hidden_state"], feed)[0] for feed in ordered.batches(8)]
    order = np.argsort(np.count_nonzero(data.inputs["attention_mask"], axis=1), kind="stable")
    for start, out in zip(range(0, 32, 8), cut):
        for row, sample in enumerate(order[start:start + 8]):
            n = int(data.inputs["attention_mask"][sample].sum())
            np.testing.assert_allclose(out[row, :n], full[sample, :n], rtol=1e-4, atol=1e-5)


def test_quantize_static_padding_mask_runs_fewer_positions_and_rejects_unknown_inputs():
    recipe = {"passes": ["cleanup", {"quantize_static": {"padding_mask": "auto"}}]}
    result = compress(TINY / "tiny_bert.onnx", recipe, calib=TINY / "calib.npz", val=TINY / "val.npz",
                      latency_runs=0)
    stats = next(p for p in result.report["passes"] if p["name"] == "quantize_static")
    positions = stats["metrics"]["calib_positions"]
    assert positions["mask"] == "attention_mask"
    assert positions["after_trim_at_batch_32"] < positions["full_width"]
    assert result.report["quantization"]["fused_ratio"] == 1.0 and result.report["fidelity"]["cosine"] >= 0.999
    bad = {"passes": ["cleanup", {"quantize_static": {"padding_mask": "token_mask"}}]}
    with pytest.raises(OnnxcompError, match="padding_mask: the model has no input 'token_mask'"):
        compress(TINY / "tiny_bert.onnx", bad, calib=TINY / "calib.npz", latency_runs=0)


def test_progress_bar_only_when_the_run_shows_progress():
    assert PassContext().progress_bar("x") is None
    bar = PassContext(progress=True).progress_bar("calibrating")
    for done in range(1, 4):
        bar(done, 3)  # opens, advances and closes a transient bar
    bar(1, 2)
    bar(2, 2)  # a second stream opens a new bar
