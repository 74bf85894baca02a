"""``onnxcomp inspect`` and ``onnxcomp run`` count the same MACs for the same model and inputs,
fused attention included, and say which input shapes (sequence length) they assumed."""

from __future__ import annotations

import json

import pytest

import onnxcomp
from onnxcomp.cli import main
from tests.builders import MODELS

BERT = MODELS / "tiny_bert"
HIDDEN, LAYERS, FFN = 64, 2, 128  # models/tiny_bert/make_tiny_bert.py


def _expected(seq: int) -> int:
    """Per sample, by hand: Q/K/V/output projections, Q·Kᵀ and P·V, the two FFN MatMuls, the pooler-free
    model (sentence embedding = masked mean)."""
    per_layer = seq * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) + 2 * seq * seq * HIDDEN
    return LAYERS * per_layer


def _inspect(capsys, *extra) -> dict:
    assert main(["inspect", str(BERT / "tiny_bert.onnx"), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("with_data", [True, False])
def test_inspect_and_run_agree_on_tiny_bert(with_data, capsys):
    val = BERT / "val.npz"
    info = _inspect(capsys, *(["--data", str(val)] if with_data else []))
    seq = 32 if with_data else onnxcomp.data.SYNTHETIC_DIM
    assert info["macs_input_shapes"]["input_ids"] == [1, seq]
    assert info["macs"] == _expected(seq)
    recipe = {"passes": ["cleanup", {"fuse_transformer": {}}, {"quantize_weights": {}}]}  # Attention + MatMulNBits
    report = onnxcomp.compress(BERT / "tiny_bert.onnx", recipe, val=val if with_data else None,
                               latency_runs=0).report
    ops = report["compressed"]["ops"]
    assert ops.get("com.microsoft.Attention") == LAYERS and ops.get("com.microsoft.MatMulNBits")
    assert report["original"]["macs"] == report["compressed"]["macs"] == info["macs"]
    assert report["compressed"]["macs_input_shapes"] == info["macs_input_shapes"]


def test_multi_head_attention_counts_like_the_matmuls():
    recipe = {"passes": ["cleanup", {"fuse_transformer": {"multi_head_attention": True}}]}
    report = onnxcomp.compress(BERT / "tiny_bert.onnx", recipe, val=BERT / "val.npz", latency_runs=0).report
    assert report["compressed"]["ops"].get("com.microsoft.MultiHeadAttention") == LAYERS
    assert report["compressed"]["macs"] == report["original"]["macs"] == _expected(32)
