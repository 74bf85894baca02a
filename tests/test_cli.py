"""cli.py + pipeline.py end to end: the run, the report, the gate, and every error contract."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp.cli import main
from tests.builders import MODELS, ROOT


def run_cli(*args, cwd=None):
    """Run the real console entry point in a subprocess: exit code, stdout, stderr."""
    proc = subprocess.run([sys.executable, "-m", "onnxcomp.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_run_cleanup_on_cnn(tmp_path, cnn_path, val_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, stderr = run_cli("run", "cleanup", "-m", cnn_path, "-o", out, "--val", val_path,
                                   "--report", report, "--latency-runs", "5")
    assert code == 0, stderr
    assert "original vs compressed" in stdout and "gate passed" in stdout
    data = json.loads(report.read_text())
    fid = data["fidelity"]
    assert fid["accuracy_original"] == pytest.approx(0.992, abs=1e-3)
    assert fid["accuracy_drop"] == 0 and fid["top1_agreement"] == 1.0
    assert fid["max_abs_error"] < 1e-4
    assert data["original"]["ops"]["BatchNormalization"] == 2
    assert "BatchNormalization" not in data["compressed"]["ops"]
    assert data["compressed"]["size_bytes"] == out.stat().st_size
    assert data["passes"][0]["name"] == "cleanup" and data["passes"][0]["touched"]


def test_python_api_and_determinism(tmp_path, cnn_path, val_path):
    a = onnxcomp.compress(cnn_path, "cleanup", val=val_path, latency_runs=0).save(tmp_path / "a.onnx")
    b = onnxcomp.compress(cnn_path, "cleanup", val=val_path, latency_runs=0).save(tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()


def test_constant_and_external_models_run(tmp_path, val_path):
    for name in ("digits_mlp_constants.onnx", "digits_cnn_external.onnx"):
        result = onnxcomp.compress(MODELS / name, "cleanup", val=val_path, latency_runs=0, verify_each=True)
        assert result.report["fidelity"]["accuracy_drop"] == 0
        out = result.save(tmp_path / name)
        assert out.exists() and not (tmp_path / (name + ".data")).exists()


def test_gate_failure_writes_nothing(tmp_path, cnn_path, val_path):
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("passes: [cleanup]\ngate: {max_size_ratio: 0.5}\n")
    out = tmp_path / "out.onnx"
    code, stdout, _ = run_cli("run", recipe, "-m", cnn_path, "-o", out, "--val", val_path, "--latency-runs", "0")
    assert code == 3 and not out.exists()
    assert "max_size_ratio" in stdout
    code, _, _ = run_cli("run", recipe, "-m", cnn_path, "-o", out, "--val", val_path, "--latency-runs", "0", "--force")
    assert code == 0 and out.exists()


def test_without_val_uses_synthetic_inputs(tmp_path, mlp_path):
    result = onnxcomp.compress(mlp_path, "cleanup", latency_runs=0)
    assert result.report["fidelity"]["synthetic_inputs"] is True
    assert result.report["fidelity"]["accuracy_original"] is None
    assert result.report["fidelity"]["cosine"] > 0.9999


def test_default_output_name(tmp_path, mlp_path):
    code, _, stderr = run_cli("run", "cleanup", "-m", mlp_path, "--latency-runs", "0", cwd=tmp_path)
    assert code == 0, stderr
    assert (tmp_path / "digits_mlp.cleanup.onnx").exists()


def _errors_cases(tmp_path, cnn_path, val_path):
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("hello")
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(cnn_path.read_bytes()[:5000])
    escaping = tmp_path / "m" / "esc.onnx"
    escaping.parent.mkdir()
    proto = onnx.load(MODELS / "digits_cnn_external.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../../../etc/hostname"
    onnx.save(proto, escaping)
    bad_option = tmp_path / "bad.yaml"
    bad_option.write_text("passes:\n  - cleanup: {fold_limit: nope}\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("passes: [prnue]\n")
    missing_input = tmp_path / "missing.npz"
    np.savez(missing_input, x=np.zeros((2, 1, 8, 8), np.float32))
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, input=np.zeros((2, 1, 7, 8), np.float32))
    bad_gate_output = tmp_path / "gate_output.yaml"
    bad_gate_output.write_text("passes: [cleanup]\ngate: {output: probs, min_cosine: 0.9}\n")
    bad_gate_mask = tmp_path / "gate_mask.yaml"
    bad_gate_mask.write_text("passes: [cleanup]\ngate: {mask_input: attention_mask}\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    return [
        (["run", "cleanup", "-m", tmp_path / "nope.onnx"], "no such file"),
        (["run", "cleanup", "-m", not_onnx], "not.onnx"),
        (["run", "cleanup", "-m", truncated], "trunc.onnx"),
        (["run", "cleanup", "-m", escaping], "outside the model's folder"),
        (["run", unknown, "-m", cnn_path], "unknown pass 'prnue'"),
        (["run", bad_option, "-m", cnn_path], "passes[0].cleanup.fold_limit"),
        (["run", "cleanup", "-m", cnn_path, "--val", missing_input], "missing input 'input'"),
        (["run", "cleanup", "-m", cnn_path, "--val", wrong_shape], "input 'input' has shape"),
        (["run", "cleanup", "-m", cnn_path, "-o", cnn_path], "output path is the input"),
        (["run", "cleanup", "-m", cnn_path, "-o", locked / "o.onnx"], "not writable"),
        (["run", "cleanup", "-m", cnn_path, "-o", tmp_path / "no" / "o.onnx"], "does not exist"),
        (["run", "cleanup", "-m", cnn_path, "--val", tmp_path / "none.npz"], "no such data file"),
        (["run", tmp_path / "none.yaml", "-m", cnn_path], "no such recipe file"),
        (["validate", cnn_path, not_onnx, "--val", val_path], "not.onnx"),
        (["run", bad_gate_output, "-m", cnn_path, "--val", val_path],
         "gate_output.yaml: gate.output: the model has no output 'probs' (outputs: logits)"),
        (["run", bad_gate_mask, "-m", cnn_path],
         "gate_mask.yaml: gate.mask_input: the model has no input 'attention_mask' (inputs: input; or 'auto')"),
        (["validate", cnn_path, cnn_path, "--val", val_path, "--output", "probs"],
         "--output: the model has no output 'probs' (outputs: logits)"),
        (["validate", cnn_path, cnn_path, "--val", val_path, "--mask-input", "attention_mask"],
         "--mask-input: the model has no input 'attention_mask'"),
        (["passes", "nosuchpass"], "unknown pass"),
    ]


def test_user_errors_exit_2_with_one_line(tmp_path, cnn_path, val_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in MODELS.rglob("*") if p.is_file()}
    for args, message in _errors_cases(tmp_path, cnn_path, val_path):
        if "not writable" in message and os.geteuid() == 0:
            continue  # root writes anywhere
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxcomp: error: "), (args, err)
        assert message in lines[0], (args, lines[0])
        assert "Traceback" not in err
    after = {p: p.stat().st_mtime_ns for p in MODELS.rglob("*") if p.is_file()}
    assert before == after  # inputs untouched
    leftovers = [p.name for p in tmp_path.rglob("*") if p.suffix == ".onnx" and p.parent == tmp_path]
    assert sorted(leftovers) == ["not.onnx", "trunc.onnx"]  # no partial output


def _without_root_powers() -> None:
    """preexec_fn: a new user namespace, so root's capabilities (writing anywhere) no longer apply to
    the host's files; the process keeps its uid and reads what root owns."""
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")


def test_unwritable_output_folder(cnn_path):
    """A real permission failure, also as root (CI): the folder is r-x for its owner, and a root
    process runs the CLI without its capabilities."""
    as_root = {"preexec_fn": _without_root_powers} if os.geteuid() == 0 else {}
    if as_root:
        try:
            subprocess.run([sys.executable, "-c", "pass"], check=True, **as_root)
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"running as root and user namespaces are not allowed here ({exc})")
    locked = Path(tempfile.mkdtemp(prefix="onnxcomp-locked-"))
    try:
        os.chmod(locked, 0o500)
        proc = subprocess.run([sys.executable, "-m", "onnxcomp.cli", "run", "cleanup", "-m", str(cnn_path),
                               "-o", str(locked / "o.onnx")], capture_output=True, text=True, **as_root)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"onnxcomp: error: {locked / 'o.onnx'}: output folder {locked} is not writable"
        assert not any(locked.iterdir())
    finally:
        os.chmod(locked, 0o700)
        shutil.rmtree(locked)


def test_inspect_reports_forms(capsys):
    assert main(["inspect", str(MODELS / "digits_mlp_constants.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weight_forms"] == {"Constant nodes": 6}
    assert info["inputs"][0] == {"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}
    proto = onnx.load(str(MODELS / "digits_mlp_constants.onnx"))  # counted independently: every Constant's size
    assert info["params"] == sum(int(np.prod(a.t.dims)) for n in proto.graph.node if n.op_type == "Constant"
                                 for a in n.attribute if a.name == "value")
    assert main(["inspect", str(MODELS / "digits_cnn_external.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weight_forms"] == {"external initializers": 16}
    assert info["external_data"] == ["digits_cnn_external.onnx.data"]
    assert main(["inspect", str(MODELS / "digits_cnn.onnx")]) == 0
    assert "BatchNormalization" in capsys.readouterr().out


def test_validate_and_logits(tmp_path, cnn_path, val_path, capsys):
    assert main(["validate", str(cnn_path), str(MODELS / "digits_cnn_external.onnx"), "--val", str(val_path)]) == 0
    assert "top1_agreement" in capsys.readouterr().out
    out = tmp_path / "t.npy"
    assert main(["logits", str(cnn_path), str(val_path), "-o", str(out)]) == 0
    logits = np.load(out)
    reference = np.load(MODELS / "digits" / "digits_cnn.teacher_logits.npy")
    np.testing.assert_allclose(logits, reference, atol=1e-5)


def test_validate_output_and_mask_input(tmp_path, capsys):
    bert, val = MODELS / "tiny_bert" / "tiny_bert.onnx", MODELS / "tiny_bert" / "val.npz"
    report = tmp_path / "r.json"
    assert main(["validate", str(bert), str(bert), "--val", str(val), "--mask-input", "auto",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "headline metrics of output 'last_hidden_state'; padding (attention_mask == 0" in out
    assert "left out of: last_hidden_state" in out
    fid = json.loads(report.read_text())["fidelity"]
    assert fid["mask"] == "attention_mask" and fid["masked_outputs"] == ["last_hidden_state"]
    assert 0 < fid["mask_kept"] < 1 and fid["cosine"] == pytest.approx(1.0)
    assert main(["validate", str(bert), str(bert), "--val", str(val), "--output", "sentence_embedding",
                 "--report", str(report)]) == 0
    fid = json.loads(report.read_text())["fidelity"]
    assert fid["output"] == "sentence_embedding" and fid["mask"] is None


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup:" in out and "fold_batchnorm (bool) = True" in out


def test_console_script_installed():
    exe = shutil.which("onnxcomp")
    assert exe, "console script 'onnxcomp' not on PATH"
    proc = subprocess.run([exe, "passes", "cleanup"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "cleanup" in proc.stdout
