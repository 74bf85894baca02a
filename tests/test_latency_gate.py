"""Never slower without saying so: the max_latency_ratio gate key and the slower-than-original note."""

from __future__ import annotations

from onnxcomp.validate import slower_note

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
