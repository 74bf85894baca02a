"""quantize_static's accuracy tools: bias correction, smooth_quant / equalize options and the
sensitivity fallback (mixed precision), on the digits models and on graphs built to need them."""

from __future__ import annotations

import numpy as np
import onnx.helper as h
import onnx_ir as ir
import pytest

from onnxcomp.errors import OnnxcompError
from onnxcomp.pipeline import compress
from tests.builders import block_data, build, layernorm_block, run, tensor


def static(model, calib, val=None, gate=None, **options):
    recipe = {"passes": ["cleanup", {"quantize_static": options}], "gate": gate or {}}
    return compress(model, recipe, calib=calib, val=val, latency_runs=0)


def biased_gemm() -> tuple:
    """x ≥ 0 (mean 0.5) @ W where column 0 holds one large weight and many small positive ones
    below half a per-tensor int8 step: they all round to 0, so output 0 loses ~Σw·E[x] on average."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (64, 8))
    w[0, :] = 4.0  # sets the per-tensor scale: step 4/127 ≈ 0.031
    w[1:, 0] = 0.012  # < half a step: rounds to 0
    nodes = [h.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")]
    model = build(nodes, [tensor("x", "N", 64)], [tensor("y", "N", 8)], {"w": w, "b": np.zeros(8)})
    data = lambda seed: {"x": np.random.default_rng(seed).uniform(0, 1, (256, 64)).astype(np.float32)}  # noqa: E731
    return model, data(1), data(2)


def biased_matmul_add() -> tuple:
    """The same weights as :func:`biased_gemm` in a MatMul on a 3-D input + Add bias (a
    transformer's dense layer): the correction goes into the float Add's constant."""
    model, _, _ = biased_gemm()
    w = next(n for n in model.graph if n.name == "fc").inputs[1].const_value.numpy()
    nodes = [h.make_node("MatMul", ["x", "w"], ["mm"], name="dense"),
             h.make_node("Add", ["mm", "b"], ["y"], name="bias_add")]
    model = build(nodes, [tensor("x", "N", 4, 64)], [tensor("y", "N", 4, 8)], {"w": w, "b": np.full(8, 0.1)})
    data = lambda seed: {"x": np.random.default_rng(seed).uniform(0, 1, (64, 4, 64)).astype(np.float32)}  # noqa: E731
    return model, data(1), data(2)


def mean_output_error(result, model, feeds) -> np.ndarray:

    return (run(result.model, feeds)[0] - run(model, feeds)[0]).mean(axis=0)


def test_bias_correction_removes_the_mean_error_of_a_layer_built_to_need_it():
    model, calib, val = biased_gemm()
    plain = static(model, calib, val, per_channel=False, reduce_range=False)
    corrected = static(model, calib, val, per_channel=False, reduce_range=False, bias_correction=True)
    before, after = mean_output_error(plain, model, val), mean_output_error(corrected, model, val)
    assert abs(before[0]) > 0.3  # 63 × 0.012 × 0.5 ≈ 0.38 lost on average
    assert abs(after[0]) < abs(before[0]) / 10
    assert np.abs(after).max() < 0.05
    assert corrected.report["quantization"]["fused_ratio"] == 1.0
    assert corrected.report["fidelity"]["mean_abs_error"] < plain.report["fidelity"]["mean_abs_error"] / 2
    assert "fc" in corrected.report["passes"][1]["metrics"]["bias_correction"]


def test_bias_correction_goes_into_the_bias_add_after_a_matmul():
    model, calib, val = biased_matmul_add()
    plain = static(model, calib, val, per_channel=False, reduce_range=False)
    corrected = static(model, calib, val, per_channel=False, reduce_range=False, bias_correction=True)
    before = mean_output_error(plain, model, val).reshape(-1, 8).mean(axis=0)
    after = mean_output_error(corrected, model, val).reshape(-1, 8).mean(axis=0)
    assert abs(before[0]) > 0.3 and abs(after[0]) < abs(before[0]) / 10
    ops = {n.op_type for n in corrected.model.graph}
    assert "Add" in ops and corrected.report["quantization"]["fused_ratio"] == 1.0
    assert "dense" in corrected.report["passes"][1]["metrics"]["bias_correction"]


def test_bias_correction_of_a_conv_on_a_map_shorter_than_its_kernel():
    """faster-whisper's VAD: Conv1D kernel 3, pads 1 over 1-4 frames. Only the centre tap reads data,
    but the correction summed every tap's rounding error times the channel mean: here the edge taps'
    error has the opposite sign, so the "correction" doubled the error (cosine 0.994 -> 0.981 on the model)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.002, (8, 64, 3))
    w[:, :, 1] += 0.012  # centre tap: below half an int8 step, rounds to 0 -> output loses 63 x 0.012 x 0.5
    w[:, :, 0] -= 0.012  # edge taps read only padding: their rounding changes nothing
    w[:, :, 2] -= 0.012
    w[0, 0, 1] = 4.0  # sets the per-tensor scale
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1], kernel_shape=[3])]
    model = build(nodes, [tensor("x", "N", 64, 1)], [tensor("y", "N", 8, 1)], {"w": w, "b": np.zeros(8)})
    data = lambda seed: {"x": np.random.default_rng(seed).uniform(0, 1, (256, 64, 1)).astype(np.float32)}  # noqa: E731
    plain = static(model, data(1), data(2), per_channel=False, reduce_range=False)
    corrected = static(model, data(1), data(2), per_channel=False, reduce_range=False, bias_correction=True)
    before, after = mean_output_error(plain, model, data(2)), mean_output_error(corrected, model, data(2))
    assert abs(before[0]) > 0.3
    assert np.abs(after).max() < np.abs(before).max() / 10, (before.ravel(), after.ravel())


def test_bias_correction_never_moves_a_mean_away_from_the_float_model():
    """faster-whisper's VAD: the Convs after an STFT magnitude (Pow, Sqrt: float ops that rectify the
    quantization noise of the Conv before them) see inputs whose mean is shifted; their own weight
    rounding error happened to offset it, and correcting that alone made the output worse (cosine
    0.994 -> 0.980). Here Abs zeroes fc1's small outputs (rounded to 0) and fc2's half-step weights
    shift its mean the other way: fc2's correction is left out, and the mean error falls."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.004, (16, 64))
    w1[:, 63], w1[0, 63] = 0.0, 8.0  # fc1 output 63 sets the range; outputs 0-31 ~ 0.01 round to 0
    b1 = np.zeros(64)
    b1[32:63] = 0.5
    w2 = np.zeros((64, 8))
    w2[:32], w2[32:63], w2[63] = 1.0, -0.012, 4.0  # -0.012: below half an int8 step, rounds to 0
    nodes = [h.make_node("Gemm", ["x", "w1", "b1"], ["y1"], name="fc1"), h.make_node("Abs", ["y1"], ["a"]),
             h.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2")]
    model = build(nodes, [tensor("x", "N", 16)], [tensor("y", "N", 8)],
                  {"w1": w1, "b1": b1, "w2": w2, "b2": np.zeros(8)})
    data = lambda seed: {"x": np.random.default_rng(seed).uniform(0, 1, (256, 16)).astype(np.float32)}  # noqa: E731
    plain = static(model, data(1), data(2), per_channel=False, reduce_range=False)
    corrected = static(model, data(1), data(2), per_channel=False, reduce_range=False, bias_correction=True)
    before, after = mean_output_error(plain, model, data(2)), mean_output_error(corrected, model, data(2))
    assert np.abs(after).max() < np.abs(before).max()  # measured -0.070 -> -0.038 (fc2 corrected too: -0.224)
    assert corrected.report["passes"][1]["metrics"]["bias_correction"]["fc2"] == 0.0


@pytest.mark.parametrize("attrs", [dict(pads=[1, 0, 2, 1], strides=[2, 1]), dict(auto_pad="SAME_LOWER", strides=[2, 3]),
                                   dict(auto_pad="SAME_UPPER", group=2), dict(pads=[2, 1, 0, 1], dilations=[2, 1], group=2), dict(auto_pad="VALID")])
def test_conv_tap_means_give_the_conv_mean_output(attrs):
    """Σ w · ConvTapMean = the mean over samples and positions of the Conv's output, as onnxruntime
    computes it (padding, strides, dilations, groups, auto_pad)."""
    from onnxcomp.passes.quantize.bias_correction import ConvTapMean, _expected
    from onnxcomp.graph import Layer
    rng = np.random.default_rng(1)
    group = attrs.get("group", 1)
    w = rng.normal(0, 1, (4, 6 // group, 3, 2))
    x = rng.uniform(0, 1, (5, 6, 7, 5)).astype(np.float32)
    nodes = [h.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 2], **attrs)]
    model = build(nodes, [tensor("x", "N", 6, 7, 5)], [tensor("y", "N", 4, None, None)], {"w": w})
    node = next(iter(model.graph))
    means = ConvTapMean(node, (3, 2))
    means.update(x[:2])
    means.update(x[2:])
    expected = _expected(Layer.of(node), w, means.mean)
    actual = run(model, {"x": x})[0].mean(axis=(0, 2, 3))
    np.testing.assert_allclose(expected, actual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,per_channel", [("cnn", False), ("cnn", True), ("mlp", True)])
def test_bias_correction_lowers_error_on_digits(name, per_channel, cnn_path, mlp_path, calib_path, val_path):
    path = cnn_path if name == "cnn" else mlp_path
    plain = static(path, calib_path, val_path, per_channel=per_channel, method="percentile")
    corrected = static(path, calib_path, val_path, per_channel=per_channel, method="percentile",
                       bias_correction=True)
    mae = [r.report["fidelity"]["mean_abs_error"] for r in (plain, corrected)]
    assert mae[1] < 0.85 * mae[0], mae  # measured: cnn 0.060 -> 0.037 per tensor, mlp 0.035 -> 0.027
    assert corrected.report["fidelity"]["accuracy_drop"] <= plain.report["fidelity"]["accuracy_drop"]
    assert corrected.report["quantization"]["fused_ratio"] == 1.0


def test_bias_correction_skips_matmul_without_bias_with_reason():
    model = layernorm_block()
    result = static(model, block_data(seed=3), block_data(), bias_correction=True)
    skipped = result.report["passes"][1]["skipped"]
    assert {s["what"] for s in skipped if s["why"].startswith("bias correction: MatMul without a bias Add")} == \
        {"MatMul q", "MatMul k", "MatMul v"}


def test_smooth_quant_option_inside_quantize_static():
    model, calib, val = layernorm_block(), block_data(seed=3), block_data()
    plain = static(model, calib, val, reduce_range=False)
    smoothed = static(model, calib, val, reduce_range=False, smooth_quant=0.5)
    error = [r.report["fidelity"]["mean_abs_error"] for r in (plain, smoothed)]
    assert error[1] * 2 <= error[0], error
    stats = smoothed.report["passes"][1]
    assert stats["metrics"]["smooth_quant"]["smoothed"]
    assert any(n.startswith("smooth_quant: ") for n in stats["notes"])
    assert smoothed.report["quantization"]["fused_ratio"] == 1.0


def test_equalize_option_inside_quantize_static(cnn_path, calib_path, val_path):
    result = static(cnn_path, calib_path, val_path, per_channel=False, equalize=True)
    # the option takes the equalize pass's own config: same result as the pass run first
    via_pass = compress(cnn_path, {"passes": ["cleanup", {"equalize": {"iterations": 5}},
                                              {"quantize_static": {"per_channel": False}}]},
                        calib=calib_path, latency_runs=0)
    via_option = static(cnn_path, calib_path, per_channel=False, equalize={"iterations": 5})
    assert ir.serde.serialize_model(via_pass.model).graph.initializer == \
        ir.serde.serialize_model(via_option.model).graph.initializer
    stats = result.report["passes"][1]
    assert [p["first"] for p in stats["metrics"]["equalize"]["pairs"]] == ["Conv /features/features.0/Conv",
                                                                           "Gemm /head/head.0/Gemm"]
    assert result.report["fidelity"]["accuracy_drop"] <= 0.01
    assert result.report["quantization"]["fused_ratio"] == 1.0


def test_sensitivity_keeps_the_most_harmful_layers_float_until_the_gate_holds(cnn_path, calib_path, val_path):
    plain = static(cnn_path, calib_path, val_path, per_channel=False)
    target = 0.99995  # between all-quantized (0.99991) and float
    assert plain.report["fidelity"]["cosine"] < target
    result = static(cnn_path, calib_path, val_path, gate={"min_cosine": target}, per_channel=False,
                    sensitivity=True)
    report = result.report["passes"][1]["metrics"]["sensitivity"]
    assert report["met"] and report["fidelity_chosen"]["cosine"] >= target
    assert report["fidelity_all_quantized"]["cosine"] < target
    assert 1 <= len(report["kept_float"]) < 4
    harm = [item["loss_removed"] for item in report["harm"]]
    assert harm == sorted(harm, reverse=True) and len(harm) == 4
    assert report["kept_float"] == [item["node"] for item in report["harm"][:len(report["kept_float"])]]
    kept = set(report["kept_float"])
    float_ops = {n.name for n in result.model.graph if n.op_type in ("Conv", "Gemm")
                 and n.inputs[1].producer() is None}
    assert float_ops == kept
    assert result.report["gate"]["passed"] and result.report["quantization"]["fused_ratio"] == 1.0


def test_sqnr_ranking_keeps_the_same_layers_float_as_leave_one_out_in_fewer_trials(cnn_path, calib_path):
    gate = {"min_cosine": 0.99999}  # bench/quantize.py's digits target: 3 of the 4 layers go back to float
    slow, fast = (static(cnn_path, calib_path, gate=gate, method="percentile", sensitivity=True,
                         sensitivity_ranking=ranking).report["passes"][1]["metrics"]["sensitivity"]
                  for ranking in ("leave_one_out", "sqnr"))
    assert slow["ranking"] == "leave_one_out" and fast["ranking"] == "sqnr"
    assert slow["met"] and fast["met"] and fast["fidelity_chosen"]["cosine"] >= 0.99999
    # same size of float set; on this host the very same layers (features.0, features.3, head.2), but two
    # leave-one-out scores differ by 2e-6 and int8 kernels differ between CPUs, so the names are not pinned
    assert len(set(fast["kept_float"])) == len(set(slow["kept_float"])) == 3
    assert "/head/head.0/Gemm" not in fast["kept_float"]
    assert fast["trials"] < slow["trials"]  # the ranking costs no trial: only the bisection does
    scores = [item["added_noise"] for item in fast["harm"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4
    assert fast["harm"][-1]["node"] == "/head/head.0/Gemm"


def test_sensitivity_stops_at_once_when_everything_quantized_meets_the_gate(mlp_path, calib_path):
    result = static(mlp_path, calib_path, gate={"min_cosine": 0.999}, sensitivity=True)
    report = result.report["passes"][1]["metrics"]["sensitivity"]
    assert report["met"] and report["kept_float"] == [] and report["trials"] == 1


def test_sensitivity_needs_a_fidelity_target(mlp_path, calib_path):
    with pytest.raises(OnnxcompError, match="needs a fidelity threshold"):
        static(mlp_path, calib_path, gate={"min_fused_ratio": 1.0}, sensitivity=True)


def test_sensitivity_accuracy_target_needs_labels(mlp_path, calib_path):
    calib = dict(np.load(calib_path))
    calib.pop("label")
    with pytest.raises(OnnxcompError, match="label"):
        static(mlp_path, calib, gate={"max_accuracy_drop": 0.0}, sensitivity=True)


def test_sensitivity_aims_at_the_thresholds_it_can_measure(mlp_path, calib_path):
    """The int8 recipe's gate has max_accuracy_drop and min_cosine: calibration data without labels
    (every third-party model) stopped the run instead of aiming at min_cosine."""
    calib = dict(np.load(calib_path))
    calib.pop("label")
    result = static(mlp_path, calib, gate={"max_accuracy_drop": 0.0, "min_cosine": 0.999}, sensitivity=True)
    report = result.report["passes"][1]["metrics"]["sensitivity"]
    assert report["met"] and report["fidelity_chosen"]["cosine"] >= 0.999


def test_sqnr_loo_keeps_the_same_layers_float_as_leave_one_out(mlp_path, cnn_path, calib_path):
    # the fast ranking (sqnr, then leave-one-out on sqnr's top 2k) against leave-one-out on every node;
    # on the MLP sqnr alone keeps fc1 float too (the most noise added, little harm to the logits)
    for model in (mlp_path, cnn_path):
        loo, fast = (static(model, calib_path, gate={"min_cosine": 0.99999}, method="percentile", sensitivity=True,
                            sensitivity_ranking=ranking).report["passes"][1]["metrics"]["sensitivity"]
                     for ranking in ("leave_one_out", "sqnr_loo"))
        assert loo["met"] and fast["met"] and fast["ranking"] == "sqnr_loo"
        assert set(fast["kept_float"]) == set(loo["kept_float"]) and 1 <= len(loo["kept_float"]) < len(loo["harm"])
        measured = [item for item in fast["harm"] if "loss_removed" in item]  # leave-one-out re-ranked sqnr's top
        assert measured == fast["harm"][:len(measured)] and len(measured) >= len(fast["kept_float"])
        assert [m["loss_removed"] for m in measured] == sorted((m["loss_removed"] for m in measured), reverse=True)


def test_float_restorer_edits_the_quantized_model_like_a_requantization(cnn_path, calib_path):
    """Trial models are the all-quantized model with nodes rewired to float: with every node restored
    it computes the float model (the folded Relus come back, no Q/DQ left in between); with one
    Conv restored it matches quantizing with that Conv excluded, and onnxruntime keeps it float."""
    from onnxcomp.data import load_data
    from onnxcomp.passes.quantize.sensitivity import FloatRestorer
    from onnxcomp.passes.quantize.static import QuantizeStaticConfig, quantize_static_model
    from onnxcomp.runtime import optimized_graph

    model = compress(cnn_path, {"passes": ["cleanup"]}, latency_runs=0).model
    data = load_data(calib_path, model)
    config = QuantizeStaticConfig(method="percentile", per_channel=False)
    quantized, twin = model.clone(), model.clone()
    first = quantize_static_model(quantized, data, config)
    units = [n.name for n, role in first.plan.roles.items() if role == "compute"]
    quantize_static_model(twin, data, config, stats=first.stats, keep_float={u: "twin" for u in units})
    restorer = FloatRestorer(quantized, twin)
    nodes = [(n.op_type, [v.name if v is not None else None for v in n.inputs]) for n in quantized.graph]
    feeds = {"input": data.inputs["input"][:64]}

    everything = restorer.model(units)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in everything.graph)
    np.testing.assert_allclose(run(everything, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)

    conv = "/features/features.3/Conv"
    edited = restorer.model([conv])
    excluded = model.clone()
    quantize_static_model(excluded, data, config, stats=first.stats, keep_float={conv: "test"})
    np.testing.assert_allclose(run(edited, feeds)[0], run(excluded, feeds)[0], rtol=1e-4, atol=1e-4)
    kernels = [n.op_type for n in optimized_graph(edited).graph]
    assert kernels.count("QLinearConv") == 1 and kernels.count("Conv") + kernels.count("FusedConv") == 1
    assert nodes == [(n.op_type, [v.name if v is not None else None for v in n.inputs])
                     for n in quantized.graph]  # edits are made on copies


def test_grouped_loo_keeps_the_same_layers_float_as_leave_one_out_in_fewer_runs():
    """tiny_bert (16 int8 MatMuls): leave-one-out of groups of 4, then of each MatMul in the two most
    harmful groups, finds the set leave-one-out on every MatMul finds; sqnr alone keeps more float."""
    from tests.quantize.test_transformer import TINY

    def search(ranking):
        recipe = {"passes": ["cleanup", {"quantize_static": {"method": "percentile", "sensitivity": True,
                                                             "sensitivity_ranking": ranking}}],
                  "gate": {"min_cosine": 0.999995, "mask_input": "auto"}}
        result = compress(TINY / "tiny_bert.onnx", recipe, calib=TINY / "calib.npz", latency_runs=0)
        return result.report["passes"][1]["metrics"]["sensitivity"]

    loo, grouped, sqnr = search("leave_one_out"), search("grouped_loo"), search("sqnr")
    assert loo["met"] and grouped["met"] and len(loo["harm"]) == 16
    assert set(grouped["kept_float"]) == set(loo["kept_float"]) and 1 <= len(loo["kept_float"]) <= 4
    assert grouped["trials"] < loo["trials"]
    measured = [item for item in grouped["harm"] if "loss_removed" in item]
    assert len(measured) == 8 and measured == grouped["harm"][:8]  # 2 groups of 4 measured one by one
    assert len(sqnr["kept_float"]) > len(loo["kept_float"])


def test_sensitivity_weight_only_keeps_the_file_int8_sized(calib_path):
    """sensitivity_weight_only: a layer the search keeps float computes in float from an int8 weight
    (Cast + Mul), so the file is as small as all-int8; the search measured it in that form."""
    from tests.quantize.test_transformer import TINY

    def run_it(**options):
        recipe = {"passes": ["cleanup", {"quantize_static": {"method": "percentile", "sensitivity": True,
                                                             "sensitivity_ranking": "grouped_loo", **options}}],
                  "gate": {"min_cosine": 0.999995, "mask_input": "auto"}}
        return compress(TINY / "tiny_bert.onnx", recipe, calib=TINY / "calib.npz", latency_runs=0)

    plain, int8 = run_it(), run_it(sensitivity_weight_only=True)
    everything = compress(TINY / "tiny_bert.onnx", {"passes": ["cleanup", {"quantize_static": {"method": "percentile"}}]},
                          calib=TINY / "calib.npz", latency_runs=0)
    metrics = int8.report["passes"][1]["metrics"]
    kept = set(metrics["sensitivity"]["kept_float"])
    assert metrics["sensitivity"]["met"] and kept and set(metrics["weight_only"]) == kept
    assert "weights stored int8" in " ".join(int8.report["passes"][1]["notes"])
    assert not any(n.name in kept and n.inputs[1].const_value is not None for n in int8.model.graph)
    assert plain.report["passes"][1]["metrics"]["sensitivity"]["kept_float"]
    size = {name: r.report["compressed"]["size_bytes"] for name, r in
            (("plain", plain), ("int8", int8), ("everything", everything))}
    assert size["int8"] < size["everything"] * 1.02 < size["plain"]


def test_search_reuses_gptq_weights_and_the_result_equals_a_plain_quantization():
    """The search quantizes the model several times (all int8, the final check, the result): GPTQ
    rounds each weight once; the result is byte-for-byte what quantizing with its float set gives."""
    from onnxcomp.data import load_data
    from onnxcomp.passes.quantize.static import QuantizeStaticConfig, quantize_static_model
    from onnxcomp.validate import FidelityCheck
    from onnxcomp.recipe import Gate
    from tests.quantize.test_transformer import TINY
    import onnxcomp.blockquant as blockquant

    model = compress(TINY / "tiny_bert.onnx", {"passes": ["cleanup"]}, latency_runs=0).model
    data = load_data(TINY / "calib.npz", model)
    config = QuantizeStaticConfig(method="percentile", weight_rounding="gptq", sensitivity=True,
                                  sensitivity_ranking="grouped_loo")
    calls = []
    original = blockquant.gptq_round
    blockquant.gptq_round = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        import onnxcomp.passes.quantize.rewrite as rewrite
        rewrite.gptq_round = blockquant.gptq_round
        searched = model.clone()
        result = quantize_static_model(searched, data, config, target=FidelityCheck(
            Gate(min_cosine=0.999995, mask_input="auto")))
    finally:
        blockquant.gptq_round = rewrite.gptq_round = original
    kept = result.sensitivity.kept_float
    assert kept and result.sensitivity.requantized >= 2 and result.gptq_rounded
    weights = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert len(calls) == len(weights) == 12  # once per MatMul weight, not once per quantization
    plain = model.clone()
    quantize_static_model(plain, data, config.model_copy(update={"sensitivity": False}), stats=result.stats,
                          keep_float={n: "test" for n in kept})
    assert ir.serde.serialize_model(plain).SerializeToString() == ir.serde.serialize_model(searched).SerializeToString()


def test_sensitivity_weight_only_leaves_an_activation_matmul_float():
    """PP-OCR's SVTR recogniser: the search kept an attention-score MatMul (two activations, no
    weight) float, and sensitivity_weight_only tried to store its "weight" int8: exit 1
    ('NoneType' object has no attribute 'numpy'). Such a node just stays float."""
    rng = np.random.default_rng(0)
    nodes = [h.make_node("MatMul", ["x", "wq"], ["q"], name="q"), h.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             h.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             h.make_node("MatMul", ["q", "kt"], ["s"], name="scores"), h.make_node("Softmax", ["s"], ["p"], axis=-1),
             h.make_node("MatMul", ["p", "x"], ["y"], name="mix")]
    model = build(nodes, [tensor("x", "N", 6, 16)], [tensor("y", "N", 6, 16)],
                  {"wq": rng.normal(0, 0.5, (16, 16)), "wk": rng.normal(0, 0.5, (16, 16))})
    data = {"x": rng.normal(0, 1, (32, 6, 16)).astype(np.float32)}
    result = static(model, data, data, gate={"min_cosine": 0.999999}, sensitivity=True,
                    sensitivity_ranking="sqnr", sensitivity_weight_only=True)
    kept = result.report["passes"][1]["metrics"]["sensitivity"]["kept_float"]
    assert "scores" in kept or "mix" in kept
    assert np.allclose(run(result.model, data)[0], run(model, data)[0], atol=0.5)
