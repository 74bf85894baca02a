"""gate.py + validate.check_gate: every threshold holds at its bound, fails past it, and is listed as
unchecked (not failed) when its metric does not exist for the run."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from onnxcomp.gate import FIDELITY_KEYS, Gate
from onnxcomp.validate import check_gate

# gate key -> (where the metric comes from, metric name, True when higher is better)
KEYS = {
    "max_accuracy_drop": ("fidelity", "accuracy_drop", False),
    "min_top1_agreement": ("fidelity", "top1_agreement", True),
    "min_cosine": ("fidelity", "cosine", True),
    "max_mean_abs_error": ("fidelity", "mean_abs_error", False),
    "max_abs_error": ("fidelity", "max_abs_error", False),
    "max_kl": ("fidelity", "kl", False),
    "min_fused_ratio": ("extra", "fused_ratio", True),
    "max_size_ratio": ("extra", "size_ratio", False),
    "max_latency_ratio": ("extra", "latency_ratio", False),
}


def _check(key: str, value: float | None, bound: float = 0.5):
    where, metric, _ = KEYS[key]
    measured = {} if value is None else {metric: value}
    fidelity, extra = (measured, {}) if where == "fidelity" else ({}, measured)
    return check_gate(Gate(**{key: bound}), fidelity, extra)


def test_every_threshold_of_the_gate_is_checked():
    assert set(KEYS) == set(Gate.model_fields) - {"output", "mask_input", "keep_fusions"}  # keep_fusions: below
    assert set(FIDELITY_KEYS) == {k for k, (where, _, _) in KEYS.items() if where == "fidelity"}


@pytest.mark.parametrize("key", KEYS)
def test_threshold_holds_at_its_bound_and_fails_past_it(key):
    higher = KEYS[key][2]
    assert _check(key, 0.5) == ([], [])  # bounds are inclusive
    assert _check(key, 0.6 if higher else 0.4) == ([], [])
    failures, unchecked = _check(key, 0.4 if higher else 0.6)
    assert failures == [f"{key}: {0.4 if higher else 0.6} does not meet 0.5"] and unchecked == []


@pytest.mark.parametrize("key", KEYS)
def test_missing_metric_is_unchecked_not_failed(key):
    failures, unchecked = _check(key, None)
    assert failures == [] and len(unchecked) == 1 and unchecked[0].startswith(f"{key}: not checked")


def test_keep_fusions_fails_on_a_lost_fusion_and_is_unchecked_without_the_check():
    gate = Gate(keep_fusions=True)
    assert check_gate(gate, {}, {"lost_fusions": []}) == ([], [])
    failures, unchecked = check_gate(gate, {}, {"lost_fusions": ["gelu: 2 -> 0", "skip_layer_norm: 12 -> 0"]})
    assert failures == ["keep_fusions: onnxruntime no longer fuses gelu: 2 -> 0, skip_layer_norm: 12 -> 0"]
    failures, unchecked = check_gate(gate, {}, {})
    assert failures == [] and len(unchecked) == 1 and unchecked[0].startswith("keep_fusions: not checked")
    assert check_gate(Gate(keep_fusions=False), {}, {"lost_fusions": ["gelu: 2 -> 0"]}) == ([], [])


def test_unset_thresholds_check_nothing():
    fidelity = {"accuracy_drop": 1.0, "cosine": -1.0, "max_abs_error": 1e9}
    assert check_gate(Gate(), fidelity, {"fused_ratio": 0.0, "size_ratio": 10.0}) == ([], [])
    assert check_gate(Gate(), None, {}) == ([], [])


def test_non_finite_outputs_fail_without_any_threshold():
    failures, _ = check_gate(Gate(), {"nonfinite_values": 3}, {})
    assert len(failures) == 1 and "3 non-finite (NaN/Inf) output values" in failures[0]


def test_all_failures_are_reported_in_gate_order():
    gate = Gate(max_accuracy_drop=0.01, min_cosine=0.99, max_size_ratio=0.5)
    failures, _ = check_gate(gate, {"accuracy_drop": 0.02, "cosine": 0.9}, {"size_ratio": 0.7})
    assert [f.split(":")[0] for f in failures] == ["max_accuracy_drop", "min_cosine", "max_size_ratio"]


def test_gate_rejects_unknown_keys_and_out_of_range_bounds():
    with pytest.raises(ValidationError):
        Gate(min_cosine_similarity=0.9)
    with pytest.raises(ValidationError):
        Gate(max_accuracy_drop=1.5)
    with pytest.raises(ValidationError):
        Gate(max_size_ratio=0)
    assert Gate(min_cosine=0.9, output="logits").thresholds() == {"min_cosine": 0.9}
