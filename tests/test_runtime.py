"""onnxcomp.runtime and the memory-lean paths for large models (lowered limits stand in for GBs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import onnxcomp.pipeline as pipeline
import onnxcomp.runtime as runtime
from onnxcomp.graph import constant_array, release_mapped
from onnxcomp.model import load_model, save_model
from onnxcomp.pipeline import compress, verify_model


def test_large_model_route_gives_the_same_model(cnn_path, val_path, monkeypatch):
    """Through a temporary file (as past IN_MEMORY_LIMIT) the run's model and figures are the same."""
    small = compress(str(cnn_path), "int8-dynamic", val=str(val_path), latency_runs=0)
    monkeypatch.setattr(runtime, "IN_MEMORY_LIMIT", 0)
    monkeypatch.setattr(pipeline, "IN_MEMORY_LIMIT", 0)
    large = compress(str(cnn_path), "int8-dynamic", val=str(val_path), latency_runs=0)
    assert ir.serde.serialize_model(large.model).SerializeToString() == \
        ir.serde.serialize_model(small.model).SerializeToString()
    assert large.report["fidelity"]["cosine"] == small.report["fidelity"]["cosine"]


@pytest.mark.parametrize("limit", [0, None])
def test_verify_model_rejects_a_broken_model_on_both_routes(limit, monkeypatch):
    """A model onnxruntime refuses (MatMul of [2, 3] by a [4, 5] weight) is a pass bug on either route."""
    if limit is not None:
        monkeypatch.setattr(pipeline, "IN_MEMORY_LIMIT", limit)
        monkeypatch.setattr(runtime, "IN_MEMORY_LIMIT", limit)
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 5], np.ones(20, np.float32))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], [w])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(RuntimeError, match="the compressed model"):
        verify_model(model, "the compressed model")


def test_release_mapped_unmaps_and_the_weight_reads_again(tmp_path, cnn_path):
    """A released external weight reads back the same values; in-memory weights are untouched."""
    proto = onnx.load(str(cnn_path))
    onnx.save(proto, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    model = load_model(tmp_path / "ext.onnx")
    value = max(model.graph.initializers.values(), key=lambda v: v.const_value.size)
    assert isinstance(value.const_value, ir.ExternalTensor)
    before = constant_array(value).copy()
    release_mapped(value)
    np.testing.assert_array_equal(constant_array(value), before)
    out = save_model(model, tmp_path / "copy.onnx")  # and the model still saves whole
    assert load_model(out).graph.initializers[value.name].const_value.numpy().tobytes() == before.tobytes()
    release_mapped(None)
    in_memory = ir.Value(name="t", const_value=ir.Tensor(np.ones(3, np.float32)))
    release_mapped(in_memory)
    np.testing.assert_array_equal(in_memory.const_value.numpy(), np.ones(3, np.float32))


def test_structure_proto_and_large_summary_match_the_full_model(cnn_path, monkeypatch):
    """Without the weights' bytes: the same MACs, a size within a few bytes per tensor of the real
    serialized size, and the model unchanged afterwards."""
    import onnxcomp.report as report
    from onnxcomp.model import structure_proto

    model = load_model(cnn_path)
    full = ir.serde.serialize_model(model)
    light = structure_proto(model)
    assert light.ByteSize() < full.ByteSize() / 10
    assert ir.serde.serialize_model(model).SerializeToString() == full.SerializeToString()
    small = report.model_summary(model, None, {"input": (1, 1, 8, 8)})
    monkeypatch.setattr(runtime, "IN_MEMORY_LIMIT", 0)
    large = report.model_summary(model, None, {"input": (1, 1, 8, 8)})
    assert large["macs"] == small["macs"] > 0
    assert abs(large["size_bytes"] - small["size_bytes"]) <= 8 * len(model.graph.initializers)
