"""The shipped int4-weights recipe on the tiny BERT (models/tiny_bert): GPTQ needs --calib (exit 2,
nothing written), the gate holds on real tokens, tables of few rows get 8 bits, and GPTQ's Hessians
leave the padding-only columns out."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from onnxcomp.cli import main
from onnxcomp.data import load_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from onnxcomp.passes.base import PassContext
from onnxcomp.passes.quantize.weights import QuantizeWeights
from onnxcomp.pipeline import compress
from onnxcomp.recipe import load_recipe
from onnxcomp.runtime import open_session
from tests.builders import TINY_BERT

MODEL, CALIB, VAL = TINY_BERT / "tiny_bert.onnx", TINY_BERT / "calib.npz", TINY_BERT / "val.npz"


@pytest.fixture(scope="module")
def shipped():
    return compress(MODEL, "int4-weights", calib=CALIB, val=VAL, latency_runs=0)


def test_recipe_passes_its_gate_on_real_tokens_and_runs_in_onnxruntime(shipped, tmp_path):
    gate = load_recipe("int4-weights").gate
    fid = shipped.report["fidelity"]
    assert gate.min_cosine == 0.99 and gate.mask_input == "auto"
    assert shipped.gate_passed and fid["mask"] == "attention_mask" and fid["output"] == "last_hidden_state"
    assert fid["cosine"] >= gate.min_cosine
    ops = collections.Counter(n.op_type for n in shipped.model.graph)
    assert ops["MatMulNBits"] == 12 and ops["GatherBlockQuantized"] == 3  # 2 layers x 6 MatMuls; 3 tables
    assert ops["MatMul"] == 4  # Q·Kᵀ and P·V have no constant weight
    assert not [n for n in shipped.model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None
                and n.inputs[0].const_value.dtype == ir.DataType.FLOAT]  # no float table left
    assert shipped.report["compressed"]["size_bytes"] < 0.3 * shipped.report["original"]["size_bytes"]
    out = shipped.save(tmp_path / "int4.onnx")
    feed = {k: v[:4] for k, v in np.load(VAL).items()}
    with open_session(load_model(out)) as session:
        hidden = session.run(["last_hidden_state"], feed)[0]
    assert hidden.shape[:2] == feed["input_ids"].shape and np.isfinite(hidden).all()


def test_recipe_uses_padding_free_gptq_statistics_and_bias_correction(shipped):
    quant = next(p for p in shipped.report["passes"] if p["name"] == "quantize_weights")
    positions = quant["metrics"]["calib_positions"]
    real = int(np.load(CALIB)["attention_mask"].sum())
    assert positions["mask"] == "attention_mask"
    assert real <= positions["after_trim_at_batch_32"] < positions["full_width"]
    assert all("(gptq)" in t for t in quant["touched"] if "MatMulNBits" in t)
    assert any(note.startswith("bias_correction") for note in quant["notes"])


def test_recipe_without_calib_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "int4.onnx"
    code = main(["run", "int4-weights", "-m", str(MODEL), "-o", str(out), "--latency-runs", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "calibration data" in err[0] and "--calib" in err[0], err
    assert not out.exists()


def test_tables_up_to_embedding_int8_rows_get_8_bits():
    model = load_model(MODEL)
    QuantizeWeights({"bits": 4, "quantize_embeddings": True, "embedding_int8_rows": 64}, PassContext())(model)
    bits = {n.inputs[0].name.split("_q")[0]: n.attributes.get_int("bits")
            for n in model.graph if n.op_type == "GatherBlockQuantized"}
    assert bits == {"bert.embeddings.word_embeddings.weight": 4,  # 512 rows
                    "bert.embeddings.position_embeddings.weight": 8,  # 64 rows
                    "bert.embeddings.token_type_embeddings.weight": 8}  # 2 rows


def test_padding_mask_names_an_input_the_model_has():
    model = load_model(MODEL)
    data = load_data(CALIB, model)
    with pytest.raises(OnnxcompError, match="quantize_weights.padding_mask: the model has no input 'token_mask'"):
        QuantizeWeights({"method": "gptq", "padding_mask": "token_mask"}, PassContext(calib=data))(model)


def test_gptq_says_when_the_calibration_data_is_thin():
    model = load_model(MODEL)
    data = load_data(CALIB, model)
    notes = {}
    for n in (2, len(data)):
        work = model.clone()
        stats = QuantizeWeights({"method": "gptq", "padding_mask": "auto"}, PassContext(calib=data.head(n)))(work).stats
        notes[n] = [note for note in stats.notes if "thin" in note]
    assert notes[2] and "K=128" in notes[2][0]  # 2 passages: fewer rows than 2 x the FFN's 128 inputs
    assert not notes[len(data)]
