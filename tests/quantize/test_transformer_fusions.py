"""Static int8 that keeps onnxruntime's transformer fusions (recipe transformer-int8-static) on the
tiny BERT fixture: SmoothQuant's 1/s folded into constants (MultiHeadAttention's V projection, a
LayerNormalization of a SkipLayerNormalization's sum), exact in float; the fusion survival check
(report quantization.float_fusions, gate keep_fusions) passes on it and catches a broken fusion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxcomp.data import load_data
from onnxcomp.model import load_model
from onnxcomp.passes.base import PassContext
from onnxcomp.passes.quantize.smooth_quant import SMOOTH_QUANT_TAG, smooth_quant_model
from onnxcomp.pipeline import compress
from onnxcomp.registry import get_pass
from onnxcomp.runtime import open_session

TINY = Path(__file__).resolve().parents[2] / "models" / "tiny_bert"
FUSE = {"multi_head_attention": True, "embed_layer_norm": False}


def _fused_float():
    model = load_model(TINY / "tiny_bert.onnx")
    for name, options in (("cleanup", {}), ("fuse_transformer", FUSE)):
        cls = get_pass(name)
        cls(cls.Config(**options), PassContext())(model)
    return model


def _run(model, feeds):
    with open_session(model) as session:
        return session.run(["last_hidden_state"], feeds)[0].astype(np.float64)


@pytest.fixture(scope="module")
def static_run():
    return compress(TINY / "tiny_bert.onnx", "transformer-int8-static", calib=TINY / "calib.npz",
                    val=TINY / "val.npz", latency_runs=0)


def test_recipe_keeps_every_float_fusion_and_runs_every_matmul_in_int8(static_run):
    report = static_run.report
    quant = report["quantization"]
    assert report["gate"]["passed"] and report["gate"]["thresholds"]["keep_fusions"] is True
    assert quant["fused_ratio"] == 1.0 and quant["unfused"] == []
    # Q, K, V, attention output, FFN in, FFN out in each of the 2 layers (QKᵀ, PV are inside MultiHeadAttention)
    assert quant["compute"] == {"quantized": 12, "fused": 12}
    assert quant["int8_kernels"] == {"GatherBlockQuantized": 3, "MatMulIntegerToFloat": 12}
    fusions = quant["float_fusions"]
    assert fusions["lost"] == []
    for family, count in fusions["original"].items():
        assert fusions["compressed"][family] >= count
    assert fusions["compressed"]["attention"] == 2 and fusions["compressed"]["gelu"] == 2
    assert fusions["compressed"].get("skip_layer_norm", 0) == 0  # Add + LayerNormalization kept: faster on CPU
    assert report["fidelity"]["cosine"] >= 0.999
    # nothing float was added between the fused ops: no Mul, and each norm copy is a LayerNormalization
    added = [n for n in static_run.model.graph if SMOOTH_QUANT_TAG in n.metadata_props]
    assert added and {n.op_type for n in added} == {"LayerNormalization"}
    stats = next(p for p in report["passes"] if p["name"] == "quantize_static")
    assert stats["metrics"]["smooth_quant"]["inserted_mul"] == 0
    assert static_run.model.metadata_props["onnxcomp.target"] == "any"  # 7-bit weights, safe on any x86


def test_smoothing_folded_into_attention_and_norm_sums_is_exact_in_float():
    model = _fused_float()
    data = load_data(TINY / "calib.npz", model)
    feeds = {k: v[:16] for k, v in np.load(TINY / "val.npz").items()}
    before = _run(model, feeds)
    stats = smooth_quant_model(model, data, alpha=0.5, insert_mul=False)
    after = _run(model, feeds)
    how = {info["nodes"][0].removeprefix("/bert/encoder/").removesuffix("/MatMul"): info["how"]
           for info in stats.metrics["smoothed"]}
    assert set(how) == {f"layer.{i}/{m}" for i in (0, 1) for m in
                        ("attention/self/query", "attention/output/dense", "intermediate/dense")}
    for i in (0, 1):
        # attention output dense reads MultiHeadAttention: 1/s went into its V projection and bias
        assert how[f"layer.{i}/attention/output/dense"].startswith("folded into MultiHeadAttention")
        # FFN in reads a SkipLayerNormalization that also feeds a residual: a LayerNormalization of its sum
        assert how[f"layer.{i}/intermediate/dense"].startswith("in a clone of SkipLayerNormalization")
    # Q/K/V of layer 0 read the embedding LayerNormalization, of layer 1 a SkipLayerNormalization
    assert how["layer.0/attention/self/query"].startswith("in a clone of LayerNormalization")
    assert how["layer.1/attention/self/query"].startswith("in a clone of SkipLayerNormalization")
    # FFN out is behind BiasGelu: nothing can absorb 1/s, and insert_mul is off
    assert stats.metrics["inserted_mul"] == 0
    s_ranges = [(info["s_min"], info["s_max"]) for info in stats.metrics["smoothed"]]
    assert max(hi for _, hi in s_ranges) > 2 * min(lo for lo, _ in s_ranges)  # the scales are not trivial
    for node in model.graph:
        if SMOOTH_QUANT_TAG in node.metadata_props and node.inputs[0].producer() is not None:
            producer = node.inputs[0].producer()
            if producer.op_type == "SkipLayerNormalization":
                assert node.op_type == "LayerNormalization" and node.inputs[0] is producer.outputs[3]
                assert node.inputs[1] is not producer.inputs[2]  # its own γ / s
    scale = np.abs(before).max()
    assert np.abs(after - before).max() <= 2e-5 * scale


def test_keep_fusions_gate_fails_when_quantization_breaks_a_fusion():
    # smoothing the raw export inserts a float Mul after the GELU chain: ORT no longer fuses it into Gelu
    recipe = {"passes": ["cleanup", {"quantize_static": {"method": "percentile", "smooth_quant": "auto"}}],
              "gate": {"keep_fusions": True}}
    result = compress(TINY / "tiny_bert.onnx", recipe, calib=TINY / "calib.npz", val=TINY / "val.npz",
                      latency_runs=0)
    fusions = result.report["quantization"]["float_fusions"]
    assert fusions["original"]["gelu"] == 2 and fusions["compressed"]["gelu"] == 0
    assert fusions["lost"] == ["gelu: 2 -> 0"]
    assert not result.gate_passed
    assert result.failures == ["keep_fusions: onnxruntime no longer fuses gelu: 2 -> 0"]


# ----------------------------------------------------------------------------- GPTQ int8 rounding


def test_gptq_round_is_nearest_without_input_correlation_and_beats_it_with():
    from onnxcomp.blockquant import gptq_round

    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 64))
    scale = np.abs(w).max(axis=1) / 63
    nearest = np.clip(np.round(w / scale[:, None]), -63, 63)
    # uncorrelated inputs (H ∝ I): no error to feed forward, so exactly round-to-nearest
    np.testing.assert_array_equal(gptq_round(w, np.eye(64), scale, 63), nearest)
    # correlated inputs: the layer's output error on them drops
    x = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 64)) + 0.1 * rng.standard_normal((512, 64))
    codes = gptq_round(w, x.T @ x / len(x), scale, 63)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 63

    def output_error(q):
        return np.linalg.norm(x @ (w - q * scale[:, None]).T)

    assert output_error(codes) < 0.7 * output_error(nearest)


def test_quantize_static_gptq_rounding_lowers_the_output_error_on_tiny_bert():
    def run(rounding):
        recipe = {"passes": ["cleanup", {"fuse_transformer": FUSE},
                             {"quantize_static": {"method": "percentile", "weight_rounding": rounding}}]}
        return compress(TINY / "tiny_bert.onnx", recipe, calib=TINY / "calib.npz", val=TINY / "val.npz",
                        latency_runs=0)

    nearest, gptq = run("nearest"), run("gptq")
    stats = next(p for p in gptq.report["passes"] if p["name"] == "quantize_static")
    assert stats["metrics"]["gptq_rounded"] == 12  # every MatMul (QKᵀ / PV are inside MultiHeadAttention)
    assert gptq.report["quantization"]["fused_ratio"] == 1.0
    assert gptq.report["fidelity"]["mean_abs_error"] < 0.95 * nearest.report["fidelity"]["mean_abs_error"]
