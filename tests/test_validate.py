"""validate.py: the headline output, the padding mask, and their names checked before any work."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.pipeline import compress
from onnxcomp.recipe import Gate
from onnxcomp.validate import compare, select_target, slower_note

B, S, D = 6, 5, 3  # D != S: the pooled [batch, D] output never looks like the [batch, S] mask
PAD_ERROR = 10.0  # what the "compressed" model adds at padding positions


def _pair(mask_name: str = "attention_mask", mask_type=TensorProto.INT64, extra_inputs=()):
    """An encoder-like original (hidden = x, pooled = mean over seq) and a "compressed" copy.

    The copy adds a small fixed error ``noise`` [S, D] everywhere and ``PAD_ERROR`` where the
    mask is 0, and a small error to the pooled output.
    """
    rng = np.random.default_rng(0)
    noise = (0.3 * rng.standard_normal((S, D))).astype(np.float32)
    pooled_noise = (0.2 * rng.standard_normal(D)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D]),
              helper.make_tensor_value_info(mask_name, mask_type, ["b", "s"]),
              *extra_inputs]
    outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["b", "s", D]),
               helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["b", D])]
    opsets = [helper.make_opsetid("", 18)]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    original = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["hidden"]),
         helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0)],
        "original", inputs, outputs, [axes])  # the mask is an input the original does not read
    consts = [axes, numpy_helper.from_array(noise, "noise"), numpy_helper.from_array(pooled_noise, "pooled_noise"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array(PAD_ERROR, np.float32), "pad_error"),
              numpy_helper.from_array(np.array([-1], np.int64), "last")]
    compressed = helper.make_graph(
        [helper.make_node("Cast", [mask_name], ["mask_f"], to=TensorProto.FLOAT),
         helper.make_node("Sub", ["one", "mask_f"], ["pad"]),
         helper.make_node("Unsqueeze", ["pad", "last"], ["pad3"]),
         helper.make_node("Mul", ["pad3", "pad_error"], ["pad_term"]),
         helper.make_node("Add", ["x", "noise"], ["x_noisy"]),
         helper.make_node("Add", ["x_noisy", "pad_term"], ["hidden"]),
         helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
         helper.make_node("Add", ["mean", "pooled_noise"], ["pooled"])],
        "compressed", inputs, outputs, consts)
    models = [ir.serde.deserialize_model(helper.make_model(g, opset_imports=opsets)) for g in (original, compressed)]
    return models[0], models[1], noise, pooled_noise


def _data(mask_name: str = "attention_mask", dtype=np.int64) -> Dataset:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, S, D)).astype(np.float32)
    lengths = np.array([5, 3, 1, 4, 0, 2])  # right padding; sample 4 is all padding
    mask = (np.arange(S)[None, :] < lengths[:, None]).astype(dtype)
    return Dataset({"x": x, mask_name: mask})


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_mask_leaves_padding_out_of_the_headline_and_error_metrics_exactly():
    original, compressed, noise, pooled_noise = _pair()
    data = _data()
    x, keep = data.inputs["x"].astype(np.float64), data.inputs["attention_mask"] != 0
    hidden_new = x + noise + PAD_ERROR * (~keep)[..., None]

    plain = compare(original, compressed, data, batch_size=4)
    assert plain["output"] == "hidden" and plain["mask"] is None and plain["masked_outputs"] == []
    assert plain["cosine"] == pytest.approx(_cosines(x, hidden_new).mean(), abs=1e-6)
    assert plain["max_abs_error"] == pytest.approx(np.abs(hidden_new - x).max(), abs=1e-5)
    assert plain["max_abs_error"] > PAD_ERROR - np.abs(noise).max()

    masked = compare(original, compressed, data, batch_size=4, mask_input="attention_mask")
    real = [i for i in range(B) if keep[i].any()]  # the all-padding sample has no cosine
    by_hand = np.mean([_cosines(x[i][keep[i]][None], (x[i] + noise)[keep[i]][None])[0] for i in real])
    assert masked["mask"] == "attention_mask" and masked["masked_outputs"] == ["hidden"]
    assert masked["cosine"] == pytest.approx(by_hand, abs=1e-6)
    assert masked["cosine"] > plain["cosine"] + 0.1  # the padding error is what dragged it down
    assert masked["mask_kept"] == pytest.approx(keep.mean())
    hidden_err = np.abs(np.broadcast_to(noise, x.shape)[keep])
    pooled_err = np.abs(np.broadcast_to(pooled_noise, (B, D)))  # [batch, D]: compared everywhere
    assert masked["max_abs_error"] == pytest.approx(max(hidden_err.max(), pooled_err.max()), abs=1e-6)
    assert masked["mean_abs_error"] == pytest.approx(
        (hidden_err.sum() + pooled_err.sum()) / (hidden_err.size + pooled_err.size), abs=1e-6)
    assert masked["samples"] == B and "mask_note" not in masked


def test_all_ones_mask_gives_the_unmasked_numbers():
    original, compressed, _, _ = _pair()
    data = _data()
    data.inputs["attention_mask"][:] = 1
    plain = compare(original, compressed, data)
    masked = compare(original, compressed, data, mask_input="auto")
    for key in ("cosine", "max_abs_error", "mean_abs_error"):
        assert masked[key] == pytest.approx(plain[key], rel=1e-12)


def test_output_selects_the_headline_output():
    original, compressed, _, pooled_noise = _pair()
    data = _data()
    x = data.inputs["x"].astype(np.float64)
    result = compare(original, compressed, data, output="pooled", mask_input="auto")
    pooled = x.mean(axis=1)
    assert result["output"] == "pooled" and result["mask"] == "attention_mask"
    assert result["cosine"] == pytest.approx(_cosines(pooled, pooled + pooled_noise).mean(), abs=1e-6)
    expected_top1 = (pooled.argmax(1) == (pooled + pooled_noise).argmax(1)).mean()
    assert result["top1_agreement"] == pytest.approx(expected_top1)  # [batch, classes]: top-1 and KL exist
    assert result["kl"] is not None and result["kl"] >= 0
    assert compare(original, compressed, data)["top1_agreement"] is None  # hidden [b, s, d]: no classes


def test_auto_mask_detection():
    original, _, _, _ = _pair()
    assert select_target(original, mask_input="auto").mask == "attention_mask"
    assert select_target(original).mask is None  # no mask unless asked for

    float_mask, _, _, _ = _pair("attention_mask", TensorProto.FLOAT)  # not an integer input
    target = select_target(float_mask, mask_input="auto")
    assert target.mask is None and "no integer rank-2 input" in target.note
    assert select_target(float_mask, mask_input="attention_mask").mask == "attention_mask"  # named: any type

    other = helper.make_tensor_value_info("token_mask", TensorProto.INT64, ["b", "s"])
    two, _, _, _ = _pair(extra_inputs=[other])
    target = select_target(two, mask_input="auto")
    assert target.mask is None and "attention_mask, token_mask" in target.note

    unnamed, c3, _, _ = _pair("m")
    data = _data("m")
    result = compare(unnamed, c3, data, mask_input="auto")
    assert result["mask"] is None and result["masked_outputs"] == []
    assert "auto" in result["mask_note"] and "every position compared" in result["mask_note"]
    assert result["cosine"] == compare(unnamed, c3, data)["cosine"]


def test_bad_names_are_user_errors_listing_the_valid_ones():
    original, compressed, _, _ = _pair()
    data = _data()
    with pytest.raises(OnnxcompError, match=r"output: the model has no output 'logits' \(outputs: hidden, pooled\)"):
        compare(original, compressed, data, output="logits")
    with pytest.raises(OnnxcompError, match=r"mask_input: the model has no input 'mask' "
                                            r"\(inputs: x, attention_mask; or 'auto'\)"):
        compare(original, compressed, data, mask_input="mask")
    with pytest.raises(OnnxcompError, match=r"input 'x' has rank 3; a mask must be \[batch, seq\]"):
        compare(original, compressed, data, mask_input="x")


def test_pipeline_checks_the_gate_names_before_any_pass(monkeypatch):
    original, _, _, _ = _pair()

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran before the gate's names were checked")

    monkeypatch.setattr("onnxcomp.pipeline.run_passes", no_pass)
    for gate, message in (({"output": "logits"}, "<recipe>: gate.output: the model has no output 'logits'"),
                          ({"mask_input": "mask"}, "<recipe>: gate.mask_input: the model has no input 'mask'")):
        with pytest.raises(OnnxcompError) as err:
            compress(original, {"passes": ["cleanup"], "gate": gate}, val=_data(), latency_runs=0)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_pipeline_passes_the_gate_fields_to_compare():
    original, _, _, _ = _pair()
    recipe = {"passes": ["cleanup"], "gate": {"output": "pooled", "mask_input": "auto", "min_cosine": 0.999}}
    result = compress(original, recipe, val=_data(), latency_runs=0)
    fid = result.report["fidelity"]
    assert fid["output"] == "pooled" and fid["mask"] == "attention_mask" and fid["cosine"] == pytest.approx(1.0)
    assert result.gate_passed and result.report["gate"]["thresholds"] == {"min_cosine": 0.999}
    only_fields = compress(original, {"passes": ["cleanup"], "gate": {"mask_input": "auto"}},
                           val=_data(), latency_runs=0)
    assert only_fields.report["gate"]["checked"] is False  # what to measure is not a threshold


def test_gate_fields_are_not_thresholds():
    gate = Gate(min_cosine=0.98, output="last_hidden_state", mask_input="auto")
    assert gate.thresholds() == {"min_cosine": 0.98}
    with pytest.raises(ValueError):
        Gate(output="")


def test_cached_reference_gives_the_same_numbers():
    from onnxcomp.validate import reference_outputs

    original, compressed, _, _ = _pair()
    data = _data()
    direct = compare(original, compressed, data, batch_size=2, mask_input="auto")
    cached = compare(original, compressed, data, batch_size=2, mask_input="auto",
                     reference=reference_outputs(original, data, batch_size=2))
    assert cached == direct


# --- never slower without saying so: the slower-than-original note and the run's latency ratio

INT8 = {"ops": {"QuantizeLinear": 4, "DequantizeLinear": 8, "MatMul": 3}, "macs": 17_000}


def test_slower_note_names_cause_and_alternative():
    assert slower_note(0.9, INT8, saturating=True) is None
    assert slower_note(None, INT8, saturating=True) is None
    note = slower_note(1.4, INT8, saturating=True)
    assert "1.40x" in note and "without VNNI" in note and "tiny" in note and "target: vnni" in note
    assert "int8-dynamic" in note and "max_latency_ratio" in note
    big = {"ops": {"com.microsoft.MatMulNBits": 12}, "macs": 10**9}
    note = slower_note(1.2, big, saturating=False)
    assert "MatMulNBits" in note and "VNNI" not in note and "tiny" not in note


def test_run_reports_the_ratio_and_note(mlp_path, val_path):
    import onnxcomp

    result = onnxcomp.compress(mlp_path, {"passes": ["cleanup"], "gate": {"max_latency_ratio": 100.0}},
                               val=val_path, latency_runs=3)
    ratio = result.report["latency_ratio"]
    assert ratio > 0 and result.gate_passed
    assert ("latency_note" in result.report) == (ratio > 1.0)


def test_cosine_of_a_one_value_output_is_over_the_whole_set():
    """A wake-word / VAD probability [batch, 1]: one sample's cosine is 1 whenever the signs agree, so
    min_cosine passed any positive output. One value per sample: the cosine of all samples' values as
    one vector (what bench/corpus.py reports)."""
    def model(scale: float):
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("Sigmoid", ["m"], ["p"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1])],
            [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["b", 1])],
            [numpy_helper.from_array(np.array(scale, np.float32), "k")])
        return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    x = np.random.default_rng(0).normal(0, 4, (64, 1)).astype(np.float32)
    original, other = model(1.0), model(-1.0)
    p, q = 1 / (1 + np.exp(-x.ravel())), 1 / (1 + np.exp(x.ravel()))
    got = compare(original, other, Dataset({"x": x}), batch_size=16)["cosine"]
    assert got == pytest.approx(p @ q / (np.linalg.norm(p) * np.linalg.norm(q)), abs=1e-6) and got < 0.8
    assert compare(original, original, Dataset({"x": x}), batch_size=16)["cosine"] == pytest.approx(1.0)
