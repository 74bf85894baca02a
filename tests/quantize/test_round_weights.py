"""round_weights (docs/writing-a-pass.md's example): weights rounded as an independent numpy
computation says, in their storage layout; the selection respected; stats in the 'OpType name' form."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.model import load_model
from onnxcomp.passes.quantize.round_weights import RoundWeights
from onnxcomp.pipeline import compress
from tests.builders import ROOT


def _rounded(w: np.ndarray, bits: int) -> np.ndarray:
    """Each row (output channel) of a [out, in] weight rounded to 2^(bits-1) - 1 steps of max |row|."""
    qmax = 2 ** (bits - 1) - 1
    out = np.empty(w.shape)
    for i, row in enumerate(w.astype(np.float64)):
        step = np.abs(row).max() / qmax
        out[i] = np.round(row / step) * step
    return out


def test_weights_rounded_per_output_channel_in_their_storage_layout(mlp_path):
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(mlp_path)).graph.initializer}
    model = load_model(mlp_path)
    stats = RoundWeights({"bits": 4, "exclude": ["/fc3/*"]})(model).stats
    assert [t.split(":")[0] for t in stats.touched] == ["Gemm /fc1/Gemm", "MatMul /fc2/MatMul"]
    assert [what for what, _ in stats.skipped] == ["Gemm /fc3/Gemm"]
    weights = {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type in ("Gemm", "MatMul")}
    # Gemm transB=1 stores [out, in]; the MatMul stores [in, out]
    np.testing.assert_allclose(weights["/fc1/Gemm"], _rounded(stored["fc1.weight"], 4), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(weights["/fc2/MatMul"].T, _rounded(stored["fc2.weight"].T, 4), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(weights["/fc3/Gemm"], stored["fc3.weight"])


def test_more_bits_lose_less(mlp_path, val_path):
    cosine = {bits: compress(mlp_path, {"passes": [{"round_weights": {"bits": bits}}]}, val=val_path,
                             latency_runs=0).report["fidelity"]["cosine"] for bits in (2, 4, 8)}
    assert cosine[2] < cosine[4] < cosine[8] < 1.0


def test_writing_a_pass_page_shows_the_pass_as_it_is():
    page = (ROOT / "docs" / "writing-a-pass.md").read_text(encoding="utf-8")
    shown = page.split("```python\n")[1].split("```")[0]
    source = (ROOT / "onnxcomp" / "passes" / "quantize" / "round_weights.py").read_text(encoding="utf-8")
    assert shown.strip() == source[source.index("from __future__"):].strip()
