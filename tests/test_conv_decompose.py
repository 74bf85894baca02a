"""Conv factorizations against the original Conv in onnxruntime (stride, padding, dilation, bias)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.cli import main
from onnxcomp.passes.base import PassContext
from onnxcomp.passes.conv_decompose import CpDecompose, DepthwiseSeparable, SpatialSvd, Tucker2, evbmf_rank, partial_tucker2
from onnxcomp.passes.lowrank import LOWRANK_KEY

RNG = np.random.default_rng(0)
O, I, K = 12, 10, 3


def _conv_model(w: np.ndarray, *, group: int = 1, **attrs) -> ir.Model:
    bias = RNG.normal(size=w.shape[0])
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w.shape[1] * group, 11, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                              [numpy_helper.from_array(w.astype(np.float32), "w"),
                               numpy_helper.from_array(bias.astype(np.float32), "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _tucker_weight():  # exactly Tucker rank (3, 2) on the channel modes
    core = RNG.normal(size=(3, 2, K, K))
    return np.einsum("abyx,oa,ib->oiyx", core, RNG.normal(size=(O, 3)), RNG.normal(size=(I, 2)))


def _cp_weight():  # exactly CP rank 3
    a, b, c, d = (RNG.normal(size=(n, 3)) for n in (O, I, K, K))
    return np.einsum("or,ir,yr,xr->oiyx", a, b, c, d)


def _spatial_weight():  # rank 2 as [(I, kh), (O, kw)]
    m = RNG.normal(size=(I * K, 2)) @ RNG.normal(size=(2, O * K))
    return m.reshape(I, K, O, K).transpose(2, 0, 1, 3)


def _depthwise_weight():  # every input channel's [O, k²] slice of rank 2
    slices = np.einsum("ior,irk->iok", RNG.normal(size=(I, O, 2)), RNG.normal(size=(I, 2, K * K)))
    return slices.reshape(I, O, K, K).transpose(1, 0, 2, 3)


ATTRS = [dict(pads=[1, 1, 1, 1]), dict(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[2, 1]),
         dict(strides=[1, 2], dilations=[1, 2]), dict(auto_pad="VALID", strides=[2, 2])]
CASES = [(Tucker2, _tucker_weight, {"ranks": [3, 2]}, [3, 2]), (CpDecompose, _cp_weight, {"rank": 3}, 3),
         (SpatialSvd, _spatial_weight, {"rank": 2}, 2), (DepthwiseSeparable, _depthwise_weight, {"rank": 2}, 2)]


@pytest.mark.parametrize("attrs", ATTRS, ids=["pad", "stride-asym-pad-dilation", "stride-dilation-w", "valid"])
@pytest.mark.parametrize("cls,make,options,rank", CASES, ids=[c[0].name for c in CASES])
def test_decomposition_matches_the_conv_at_its_exact_rank(cls, make, options, rank, attrs):
    model = _conv_model(make(), **attrs)
    x = RNG.normal(size=(2, I, 11, 9)).astype(np.float32)
    before = _run(model, x)
    stats = cls(options, PassContext())(model).stats
    assert stats.metrics["ranks"] == {"Conv conv": rank}, stats.skipped
    assert all(n.op_type == "Conv" and n.metadata_props[LOWRANK_KEY].startswith("conv:") for n in model.graph)
    assert stats.params_after < stats.params_before
    after = _run(model, x)
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, atol=2e-4 * np.abs(before).max())


def test_truncated_tucker_error_matches_the_weight_error():
    w = RNG.normal(size=(O, I, K, K))
    model = _conv_model(w, pads=[1, 1, 1, 1])
    stats = Tucker2({"ranks": [6, 5]}, PassContext())(model).stats
    reported = float(stats.touched[0].rsplit("rel. error ", 1)[1].rstrip(")"))
    core, (u_out, u_in) = partial_tucker2(w, (6, 5))
    approx = np.einsum("abyx,oa,ib->oiyx", core, u_out, u_in)
    assert reported == pytest.approx(np.linalg.norm(w - approx) / np.linalg.norm(w), rel=1e-3)
    assert 0 < reported < 1


def test_partial_tucker2_full_rank_is_exact_and_shapes_are_stable():
    w = RNG.normal(size=(5, 4, 3, 3))
    core, (u_out, u_in) = partial_tucker2(w, (5, 4))
    assert core.shape == (5, 4, 3, 3) and u_out.shape == (5, 5) and u_in.shape == (4, 4)
    np.testing.assert_allclose(np.einsum("abyx,oa,ib->oiyx", core, u_out, u_in), w, atol=1e-5)


def test_vbmf_finds_the_rank_of_a_noisy_low_rank_matrix():
    y = RNG.normal(size=(40, 6)) @ RNG.normal(size=(6, 150)) + 0.3 * RNG.normal(size=(40, 150))
    assert evbmf_rank(y) == 6 and evbmf_rank(y.T) == 6


@pytest.mark.parametrize("model,why", [
    (lambda: _conv_model(RNG.normal(size=(O, I // 2, K, K)), group=2), "grouped Conv (group 2)"),
    (lambda: _conv_model(RNG.normal(size=(O, I, 1, 1))), "1x1 kernel: a matrix, nothing spatial to factorize"),
    (lambda: _conv_model(RNG.normal(size=(O, I, K, K)), auto_pad="SAME_UPPER"), "auto_pad SAME_UPPER (explicit pads needed)"),
])
def test_convs_it_cannot_handle_are_skipped_with_a_reason(model, why):
    m = model()
    for cls in (Tucker2, CpDecompose, SpatialSvd, DepthwiseSeparable):
        stats = cls({}, PassContext())(m).stats
        assert stats.skipped == [("Conv conv", why)] and not stats.touched


def test_no_saving_no_split():
    model = _conv_model(RNG.normal(size=(O, I, K, K)), pads=[1, 1, 1, 1])
    stats = DepthwiseSeparable({"rank": 9}, PassContext())(model).stats  # 10*9*(9+12) > 12*10*9
    assert "would not save parameters" in stats.skipped[0][1] and [n.op_type for n in model.graph] == ["Conv"]


@pytest.mark.parametrize("step,message", [
    ("tucker2: {ranks: [4, 4], vbmf: true}", "set one of ranks, energy, vbmf, param_ratio"),
    ("cp: {rank: 0}", "rank: must be >= 1"),
    ("spatial_svd: {energy: 1.5}", "energy: must be <= 1"),
    ("depthwise_separable: {rank: 2, param_ratio: 0.5}", "set one of rank, energy, param_ratio"),
])
def test_bad_options_exit_2_before_any_work(tmp_path, cnn_path, capsys, step, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"passes:\n  - {step}\n")
    out = tmp_path / "o.onnx"
    assert main(["run", str(recipe), "-m", str(cnn_path), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()
