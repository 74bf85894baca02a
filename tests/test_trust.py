"""Validation that cannot be fooled, no data lost, exit codes that hold (issue 15, findings 1-7).

Each test reproduces one way a user could be told "gate passed" about a broken result, lose
data, or get a traceback where exit 2 is promised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

import onnxcomp
from onnxcomp.cli import main
from onnxcomp.data import load_data
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load_model
from onnxcomp.recipe import Gate, shipped_recipes
from onnxcomp.validate import check_gate, compare
from tests.builders import DIGITS, MODELS, ROOT


def _with_bias(src: Path, dst: Path, name: str, value: float) -> Path:
    proto = onnx.load(src)
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            array = numpy_helper.to_array(init).copy()
            array[:] = value
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, name))
            break
    else:
        raise AssertionError(f"no initializer {name}")
    onnx.save(proto, dst)
    return dst


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnxcomp: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# --- finding 1: NaN / Inf outputs never score as a match ---------------------------------


def test_nan_outputs_fail_every_metric_and_validate_exits_3(tmp_path, mlp_path, val_path, capsys):
    nan_model = _with_bias(mlp_path, tmp_path / "nan.onnx", "fc3.bias", np.nan)
    report = tmp_path / "r.json"
    code = main(["validate", str(mlp_path), str(nan_model), "--val", str(val_path), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 3, out
    fid = json.loads(report.read_text())["fidelity"]
    assert fid["nonfinite_values"] == 497 * 10  # every logit of every sample
    assert fid["cosine"] == -1.0 and fid["top1_agreement"] == 0.0 and fid["accuracy_compressed"] == 0.0
    assert fid["max_abs_error"] == "inf" and fid["mean_abs_error"] == "inf" and fid["kl"] == "inf"
    assert "non-finite" in out


def test_one_inf_logit_fails_its_row_and_the_gate(mlp_path, val_path):
    original = load_model(mlp_path)
    broken = load_model(mlp_path)
    bias = broken.graph.initializers["fc3.bias"]
    array = bias.const_value.numpy().copy()
    array[3] = np.inf
    import onnx_ir as ir

    bias.const_value = ir.Tensor(array, name="fc3.bias")
    data = load_data(val_path, original).head(20)
    fid = compare(original, broken, data)
    assert fid["nonfinite_values"] == 20 and fid["max_abs_error"] == float("inf")
    assert fid["cosine"] == -1.0
    failures, _ = check_gate(Gate(), fid, {})  # no thresholds at all: still a failure
    assert failures and "non-finite" in failures[0]
    failures, _ = check_gate(Gate(min_cosine=-1.0, max_abs_error=1e9), fid, {})
    assert len(failures) >= 2


def test_all_zero_output_is_not_a_perfect_cosine(mlp_path, val_path):
    """A norm of 0 on one side only is cosine 0, not the 1.0 fallback."""
    original = load_model(mlp_path)
    zero = load_model(mlp_path)
    import onnx_ir as ir

    for name in ("fc3.weight", "fc3.bias"):
        value = zero.graph.initializers[name]
        value.const_value = ir.Tensor(np.zeros_like(value.const_value.numpy()), name=name)
    fid = compare(original, zero, load_data(val_path, original).head(10))
    assert fid["cosine"] == 0.0


def test_nan_compressed_model_fails_the_run_gate(tmp_path, mlp_path, val_path):
    """End to end: compress -> validate refuses to call a NaN model a match (no thresholds needed)."""
    nan_model = _with_bias(mlp_path, tmp_path / "nan.onnx", "fc3.bias", np.nan)
    result = onnxcomp.compress(nan_model, {"passes": ["cleanup"]}, val=val_path, latency_runs=0)
    # both models give NaN everywhere: identical, not a failure of the compression
    assert result.report["fidelity"]["nonfinite_values"] == 0
    result = onnxcomp.compress(mlp_path, {"passes": ["cleanup"]}, val=val_path, latency_runs=0)
    assert result.gate_passed


# --- finding 2: non-finite input data ------------------------------------------------------


def test_nonfinite_input_data_exit_2_names_input_and_index(tmp_path, mlp_path, val_path, capsys):
    arrays = dict(np.load(val_path))
    arrays["input"][7, 0, 3, 5] = np.inf
    bad = tmp_path / "inf.npz"
    np.savez(bad, **arrays)
    out = tmp_path / "o.onnx"
    code = main(["run", "cleanup", "-m", str(mlp_path), "-o", str(out), "--val", str(bad), "--latency-runs", "0"])
    _one_line_error(capsys, code, "inf.npz", "input 'input'", "[7, 0, 3, 5]", "--allow-nonfinite")
    logits = tmp_path / "t.npy"
    code = main(["logits", str(mlp_path), str(bad), "-o", str(logits)])
    _one_line_error(capsys, code, "[7, 0, 3, 5]")
    assert not out.exists() and not logits.exists()
    arrays["input"][7, 0, 3, 5] = np.nan
    with pytest.raises(OnnxcompError, match=r"NaN at index \[7, 0, 3, 5\]"):
        load_data(arrays, load_model(mlp_path))
    # explicit opt-in: accepted
    assert len(load_data(arrays, load_model(mlp_path), allow_nonfinite=True)) == 497
    code = main(["logits", str(mlp_path), str(bad), "-o", str(logits), "--allow-nonfinite"])
    assert code == 0 and logits.exists()


# --- finding 3: labels --------------------------------------------------------------------


def test_labels_out_of_range_exit_2(tmp_path, mlp_path, val_path, capsys):
    arrays = dict(np.load(val_path))
    arrays["label"] = arrays["label"] + 100
    bad = tmp_path / "lab.npz"
    np.savez(bad, **arrays)
    code = main(["run", "cleanup", "-m", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--val", str(bad),
                 "--latency-runs", "0"])
    _one_line_error(capsys, code, "lab.npz", "label", "10 classes")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("labels, message", [
    (np.full(497, 2.5), "integer class ids"),
    (np.full(497, -1), "negative"),
    (np.zeros(496, np.int64), "496 entries for 497 samples"),
    (np.zeros((497, 10, 2), np.int64), "label"),
    (np.full((497, 10), 0.5), "one-hot"),
    (np.array(3), "label"),
])
def test_bad_labels_rejected(mlp_path, val_path, labels, message):
    arrays = dict(np.load(val_path))
    arrays["label"] = labels
    with pytest.raises(OnnxcompError, match=message):
        model = load_model(mlp_path)
        compare(model, model, load_data(arrays, model))


def test_one_hot_labels_are_converted(mlp_path, val_path):
    model = load_model(mlp_path)
    arrays = dict(np.load(val_path))
    ids = arrays["label"]
    arrays["label"] = np.eye(10, dtype=np.float32)[ids]
    data = load_data(arrays, model)
    np.testing.assert_array_equal(data.labels, ids)
    fid = compare(model, model, data.head(100))
    assert fid["accuracy_original"] is not None


# --- finding 4: the input's external data is protected ------------------------------------


def test_input_external_data_never_overwritten(tmp_path, cnn_path, val_path, capsys):
    """The issue's reproduction: the input's data file is called out.onnx.data, the output out.onnx."""
    folder = tmp_path / "c"
    folder.mkdir()
    model_in = folder / "in.onnx"
    onnx.save(onnx.load(cnn_path), model_in, save_as_external_data=True, location="out.onnx.data",
              size_threshold=0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code = main(["run", "int8-dynamic", "-m", str(model_in), "-o", str(folder / "out.onnx"), "--external-data",
                 "--val", str(val_path), "--latency-runs", "0"])
    assert code == 0, capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert {k: after[k] for k in before} == before  # input model and its data byte-identical
    load_model(model_in)  # still loads
    load_model(folder / "out.onnx")  # and so does the output, with its own data file
    assert len(set(after) - set(before)) == 2
    # a second run over the output replaces it and never touches the input's files
    code = main(["run", "cleanup", "-m", str(model_in), "-o", str(folder / "out.onnx"), "--external-data",
                 "--val", str(val_path), "--latency-runs", "0"])
    assert code == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before
    assert len(list(folder.glob("out.onnx.*.data"))) == 1  # the replaced model's data file is gone
    # outputs that are the input's data file are refused, before any work
    for args in (["-o", str(folder / "out.onnx.data")],
                 ["-o", str(tmp_path / "x.onnx"), "--report", str(folder / "out.onnx.data")]):
        code = main(["run", "cleanup", "-m", str(model_in), *args, "--latency-runs", "0"])
        _one_line_error(capsys, code, "out.onnx.data", "input model or one of its external data files")
    result = onnxcomp.compress(model_in, "cleanup", val=val_path, latency_runs=0)
    with pytest.raises(OnnxcompError, match="input model"):
        result.save(folder / "out.onnx.data")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before


# --- finding 5: exit 2, nothing written ----------------------------------------------------


def _bert_all_zero_mask(tmp_path: Path) -> Path:
    arrays = dict(np.load(MODELS / "tiny_bert" / "val.npz"))
    arrays["attention_mask"][:] = 0
    path = tmp_path / "zero_mask.npz"
    np.savez(path, **arrays)
    return path


def _exit2_cases(tmp_path: Path, mlp: Path, val: Path):
    folder = tmp_path / "folder"
    folder.mkdir()
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((3, 1, 8, 8), np.float32))
    bert = MODELS / "tiny_bert" / "tiny_bert.onnx"
    long_name = "n" * 252 + ".onnx"
    deep = tmp_path / (("d" * 200 + "/") * 21) / "o.onnx"
    base = ["--latency-runs", "0"]
    return [
        (["run", "cleanup", "-m", mlp, "-o", tmp_path / "o.onnx", "--seed", "-1", *base], "--seed"),
        (["run", "cleanup", "-m", mlp, "-o", tmp_path / "o.onnx", "--latency-runs", "-5"], "--latency-runs"),
        (["run", "cleanup", "-m", mlp, "-o", tmp_path / "o.onnx", "--report", folder, *base], "not a regular file"),
        (["run", "cleanup", "-m", mlp, "-o", folder, *base], "not a regular file"),
        (["logits", mlp, val, "-o", folder], "not a regular file"),
        (["run", "cleanup", "-m", mlp, "-o", tmp_path / long_name, "--external-data", *base], "too long"),
        (["run", "cleanup", "-m", mlp, "-o", deep, *base], "too long"),
        (["run", "cleanup", "-m", deep, *base], "too long"),
        (["run", "cleanup", "-m", mlp, "-o", tmp_path / "o.onnx", "--val", npy, *base], ".npy"),
        (["logits", mlp, npy, "-o", tmp_path / "t.npy"], ".npy"),
        (["run", "cleanup", "-m", mlp, "-o", tmp_path / "o.onnx", "--report", tmp_path / "o.onnx", *base],
         "same file"),
        (["run", "transformer-int8", "-m", bert, "-o", tmp_path / "o.onnx", "--val", _bert_all_zero_mask(tmp_path),
          *base], "attention_mask"),
        (["validate", bert, bert, "--val", _bert_all_zero_mask(tmp_path), "--mask-input", "auto"],
         "attention_mask"),
        (["run", "cleanup", "-m", mlp, "-o", "/dev/null", *base], "not a regular file"),
        (["run", "cleanup", "-m", mlp, "-o", tmp_path / "o.onnx", "--report", "/dev/null", *base],
         "not a regular file"),
        (["logits", mlp, val, "-o", "/dev/null"], "not a regular file"),
    ]


def test_every_listed_case_exits_2_and_writes_nothing(tmp_path, mlp_path, val_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    cases = _exit2_cases(work, mlp_path, val_path)
    before = _files(work)
    dev_null = os.stat("/dev/null")
    for args, message in cases:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2, (args[:6], err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxcomp: error: "), (args[:6], err)
        assert message in lines[0], (message, lines[0])
        assert _files(work) == before, (args[:6], _files(work) - before)
    after = os.stat("/dev/null")
    assert (after.st_mode, after.st_rdev, after.st_ino) == (dev_null.st_mode, dev_null.st_rdev, dev_null.st_ino)


def test_python_api_rejects_bad_numbers(mlp_path):
    with pytest.raises(OnnxcompError, match="seed"):
        onnxcomp.compress(mlp_path, "cleanup", seed=-1, latency_runs=0)
    with pytest.raises(OnnxcompError, match="latency_runs"):
        onnxcomp.compress(mlp_path, "cleanup", latency_runs=-5)


def test_ctrl_c_at_start_up_is_one_line(tmp_path):
    """SIGINT while the command is still importing its modules: exit 130, no traceback.

    The signal is sent once the command has started its heavy imports (numpy, onnx...: the
    seconds a user may press Ctrl-C in), seen through ``-X importtime`` on stderr — never
    during Python's own start-up, which no program can guard (a fixed sleep races the
    interpreter on a loaded machine).
    """
    import signal
    import time

    for extra_delay in (0.0, 0.3):
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "onnxcomp.cli", "run", "int8", "-m",
                                 str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"),
                                 "--calib", str(DIGITS / "calib.npz")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.rsplit("|", 1)[-1].strip().startswith("numpy"):
                break
        time.sleep(extra_delay)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        err = "".join(line for line in [*seen, rest] if not line.startswith("import time:"))
        assert any(line.rsplit("|", 1)[-1].strip() == "onnxcomp.errors" for line in seen)
        assert "Traceback" not in err, err
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
        assert not (tmp_path / "o.onnx").exists()


# --- finding 6: what fidelity was measured on ---------------------------------------------


def test_without_val_fidelity_uses_calib_and_says_so(tmp_path, cnn_path, calib_path):
    result = onnxcomp.compress(cnn_path, "int8", calib=calib_path, latency_runs=0)
    fid = result.report["fidelity"]
    assert fid["data_kind"] == "calibration" and fid["data"] == str(calib_path)
    assert fid["cosine"] > 0.999  # 0.797 on noise
    code, out = _run_cli(["run", "int8", "-m", cnn_path, "-o", tmp_path / "o.onnx", "--calib", calib_path,
                          "--latency-runs", "0"])
    assert code == 0
    assert "measured on the calibration data" in " ".join(out.split())


def test_without_any_data_says_synthetic(tmp_path, mlp_path):
    code, out = _run_cli(["run", "int8-dynamic", "-m", mlp_path, "-o", tmp_path / "o.onnx", "--latency-runs", "0"])
    assert code == 0
    flat = " ".join(out.split())
    assert "synthetic" in flat and "gate was not checked on real data" in flat
    assert "gate passed" not in flat


def _run_cli(args):
    proc = subprocess.run([sys.executable, "-m", "onnxcomp.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "COLUMNS": "200"})
    return proc.returncode, proc.stdout + proc.stderr


# --- finding 7: every shipped recipe has a label-free floor --------------------------------


def test_every_shipped_recipe_has_a_label_free_floor():
    label_free = {"min_cosine", "min_top1_agreement", "max_kl", "max_mean_abs_error", "max_abs_error"}
    for name, path in shipped_recipes().items():
        gate = yaml.safe_load(path.read_text()).get("gate", {})
        assert label_free & set(gate), f"recipe {name} has no label-free fidelity floor"


def test_shipped_floor_catches_a_broken_result_without_labels(tmp_path, mlp_path, val_path):
    """Labels removed, the fc3 bias of the "compressed" model wrecked: the gate must fail."""
    arrays = dict(np.load(val_path))
    arrays.pop("label")
    original = load_model(mlp_path)
    broken = load_model(mlp_path)
    import onnx_ir as ir

    weight = broken.graph.initializers["fc3.weight"]
    weight.const_value = ir.Tensor(np.ascontiguousarray(weight.const_value.numpy()[::-1]), name="fc3.weight")
    fid = compare(original, broken, load_data(arrays, original))
    for name in ("int8", "int8-dynamic", "int4-weights", "cleanup", "transformer-int8"):
        gate = onnxcomp.load_recipe(name).gate
        failures, _ = check_gate(gate, fid, {})
        assert failures, name


# --- start-up: lazy imports, --version, recipes, Literal values ----------------------------

_HEAVY = ("onnx", "onnx_ir", "onnxruntime", "numpy", "onnxscript", "scipy")


def _imported_by(argv: list[str], env: dict | None = None) -> tuple[int, str, set[str]]:
    code = ("import sys, io, contextlib\nfrom onnxcomp.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    try:\n        rc = main(%r)\n"
            "    except SystemExit as e:\n        rc = e.code\n"
            "print(rc)\nprint(out.getvalue())\nprint('MODULES', ' '.join(sorted(sys.modules)))\n" % argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **(env or {})})
    head, _, modules = proc.stdout.rpartition("MODULES ")
    rc, _, out = head.partition("\n")
    return int(rc), out, set(modules.split())


def test_help_version_and_cached_passes_import_nothing_heavy(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    for argv in (["--help"], ["run", "--help"], ["--version"]):
        rc, out, modules = _imported_by(argv, env)
        assert rc == 0, out
        assert not {m.split(".")[0] for m in modules} & set(_HEAVY), (argv, set(_HEAVY) & modules)
    rc, out, _ = _imported_by(["--version"], env)
    assert out.strip() == f"onnxcomp {onnxcomp.__version__}"
    rc, first, _ = _imported_by(["passes"], env)  # builds the catalog cache
    rc, second, modules = _imported_by(["passes"], env)
    assert rc == 0 and second == first and "quantize_static:" in second
    assert not {m.split(".")[0] for m in modules} & set(_HEAVY), set(_HEAVY) & modules


def test_passes_show_allowed_values_and_match_the_registry(capsys):
    from onnxcomp.catalog import build_catalog, pass_catalog

    assert pass_catalog() == build_catalog()
    assert main(["passes", "quantize_static"]) == 0
    out = capsys.readouterr().out
    assert "method (minmax|percentile|mse) = 'minmax'" in out
    assert "reduce_range (bool | auto) = 'auto'" in out
    assert "(Literal)" not in out


def test_recipes_lists_every_shipped_recipe(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(shipped_recipes())
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # each with a description


# --- determinism across processes --------------------------------------------------------

_DETERMINISM = """
import sys
from pathlib import Path
import onnxcomp
from onnxcomp.data import load_data
from onnxcomp.model import load_model, save_model
from onnxcomp.passes.base import PassContext
from onnxcomp.pipeline import run_passes
from onnxcomp.recipe import shipped_recipes
from onnxcomp.validate import FidelityCheck
out = Path(sys.argv[1])
models = Path("models")
try:
    import torch  # noqa: F401
    extras = {"train"}
except ImportError:
    extras = set()
for name in sorted(shipped_recipes()):
    model = models / ("tiny_bert/tiny_bert.onnx" if name == "transformer-int8" else "digits_cnn.onnx")
    calib = models / ("tiny_bert/calib.npz" if name == "transformer-int8" else "digits/calib.npz")
    recipe = onnxcomp.load_recipe(name)
    if not set(recipe.extras_needed()) <= extras:
        continue
    working = load_model(model)
    data = load_data(calib, working)
    run_passes(working, recipe, PassContext(calib=data, seed=recipe.seed, fidelity=FidelityCheck(recipe.gate)))
    save_model(working, out / f"{name}.onnx")
"""


def test_every_shipped_recipe_is_byte_identical_across_processes(tmp_path):
    """Two processes with different PYTHONHASHSEED (set iteration order, hash-keyed dicts) agree."""
    procs = []
    for seed in ("1", "2"):
        folder = tmp_path / seed
        folder.mkdir()
        procs.append((folder, subprocess.Popen([sys.executable, "-c", _DETERMINISM, str(folder)], cwd=ROOT,
                                               env={**os.environ, "PYTHONHASHSEED": seed},
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for folder, proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    a, b = (sorted(p.name for p in folder.iterdir()) for folder, _ in procs)
    runnable = [n for n in shipped_recipes() if not set(onnxcomp.load_recipe(n).extras_needed()) - _extras()]
    assert a == b and len(a) == len(runnable)
    for name in a:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def _extras() -> set[str]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return set()
    return {"train"}


def test_rtn_in_row_chunks_is_the_same_quantization(monkeypatch):
    """quantize_rtn bounds its temporaries by chunking rows (large models); blocks are independent."""
    import onnxcomp.blockquant as blockquant

    w = np.random.default_rng(0).standard_normal((300, 100)).astype(np.float32)
    whole = blockquant.quantize_rtn(w, 4, 32, False, search=True)
    monkeypatch.setattr(blockquant, "_RTN_CHUNK", 1000)  # 10 rows at a time
    chunked = blockquant.quantize_rtn(w, 4, 32, False, search=True)
    for key in ("codes", "scales", "zero_points"):
        np.testing.assert_array_equal(getattr(whole, key), getattr(chunked, key))
