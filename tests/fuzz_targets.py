"""Fuzz targets and hypothesis strategies shared by tests/test_fuzz.py (seconds) and bench/fuzz.py (minutes).

Each target takes a generated case and a scratch folder and returns its outcome class: ``ok``,
``exit 2: <what>`` / ``exit 3``, i.e. one clear line. Anything else (another exception, a
traceback, a file written outside the scratch folder, a temporary file left behind) raises:
that is a bug the fuzzer reports.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from onnxcomp.errors import OnnxcompError

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MLP = MODELS / "digits_mlp.onnx"
CNN = MODELS / "digits_cnn.onnx"
VAL = MODELS / "digits" / "val.npz"
CALIB = MODELS / "digits" / "calib.npz"
VALID = MLP.read_bytes()


def outcome(exc: OnnxcompError) -> str:
    """An error's class: its message without file names and numbers."""
    text = str(exc).split(": ", 1)[-1]
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\([^)]*\)|[\w./-]*/[\w./-]*|\d[\d.e+-]*", "…", text)
    return f"exit {exc.exit_code}: " + " ".join(text.split()[:6])


# --- the model loader ------------------------------------------------------------------------


def _flip(bits: list[tuple[int, int]]) -> bytes:
    data = bytearray(VALID)
    for index, bit in bits:
        data[index % len(data)] ^= 1 << bit
    return bytes(data)


def _mutated(kind: str, value: int, location: str) -> bytes | tuple[bytes, str]:
    proto = onnx.load_from_string(VALID)
    init = proto.graph.initializer[0]
    if kind == "huge_dims":
        init.dims[:] = [value, value]
    elif kind == "negative_dims":
        init.dims[0] = -abs(value) - 1
    elif kind == "opset":
        proto.opset_import[0].version = value
    elif kind == "ir_version":
        proto.ir_version = value
    elif kind in ("external", "external_symlink"):
        array = numpy_helper.to_array(init)
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = TensorProto.EXTERNAL
        for key, text in (("location", location), ("offset", str(value)), ("length", str(array.nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, text
        return proto.SerializeToString(), kind
    elif kind == "input_shape":
        dim = proto.graph.input[0].type.tensor_type.shape.dim[1]
        dim.dim_value = value
    return proto.SerializeToString()


LOCATIONS = ["../outside.data", "/etc/hostname", "a/../../x.data", "link.data", "missing.data", "", "m.onnx",
             "ok.data", "sub/../ok.data", "\u00e9.data"]

model_cases = st.one_of(
    st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)), min_size=1, max_size=6).map(_flip),
    st.binary(max_size=512),
    st.builds(_mutated, st.sampled_from(["huge_dims", "negative_dims", "opset", "ir_version", "external",
                                         "external_symlink", "input_shape"]),
              st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**40, 2**62, -(2**40)])),
              st.sampled_from(LOCATIONS)),
)


def load_model_target(case, folder: Path) -> str:
    """Write the case as ``folder/m.onnx`` (+ data files it may point at) and load it."""
    from onnxcomp.describe import describe

    data, kind = (case, None) if isinstance(case, bytes) else case
    path = folder / "m.onnx"
    path.write_bytes(data)
    (folder / "ok.data").write_bytes(np.zeros(4096, np.float32).tobytes())
    outside = folder.parent / "outside.data"
    outside.write_bytes(np.zeros(4096, np.float32).tobytes())
    link = folder / "link.data"
    if kind == "external_symlink" and not link.exists():
        link.symlink_to(outside)
    try:
        describe(path)  # load_model + summary (params, MACs, forms)
    except OnnxcompError as exc:
        return outcome(exc)
    return "ok"


# --- the recipe parser -------------------------------------------------------------------------

PASS_NAMES = ["cleanup", "quantize_static", "quantize_dynamic", "quantize_weights", "fuse_transformer",
              "to_fp16", "prnue", "", "gate"]
OPTION_NAMES = ["method", "per_channel", "bits", "block_size", "percentile", "fold_batchnorm", "include",
                "exclude", "sensitivity", "smooth_quant", "methd", "seed"]
GATE_KEYS = ["max_accuracy_drop", "min_cosine", "min_fused_ratio", "output", "mask_input", "max_kl", "nope"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=6), st.sampled_from(["auto", "minmax", "percentile", "1e9", "-1"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(OPTION_NAMES + GATE_KEYS), st.text(max_size=4)), inner, max_size=3)),
    max_leaves=8)
steps = st.one_of(st.sampled_from(PASS_NAMES), values,
                  st.dictionaries(st.sampled_from(PASS_NAMES), st.one_of(
                      st.none(), values, st.dictionaries(st.sampled_from(OPTION_NAMES), scalars, max_size=3)),
                      min_size=1, max_size=2))
recipe_cases = st.one_of(
    values,
    st.fixed_dictionaries({}, optional={"passes": st.one_of(st.lists(steps, max_size=4), values),
                                        "gate": st.one_of(st.dictionaries(st.sampled_from(GATE_KEYS), scalars),
                                                          values),
                                        "seed": scalars, "description": scalars, "extra": scalars}),
    st.integers(1, 30_000).map(lambda depth: "[" * depth),  # deep nesting as YAML text
    st.integers(1, 30_000).map(lambda depth: "a:\n" + "".join(" " * i + "- \n" for i in range(min(depth, 400)))),
    st.text(max_size=200),
)


def recipe_target(case, folder: Path) -> str:
    """Parse the case as recipe data, or (text) as a YAML recipe file."""
    from onnxcomp.recipe import load_recipe, parse_recipe

    try:
        if isinstance(case, str):
            path = folder / "r.yaml"
            path.write_text(case, encoding="utf-8", errors="surrogatepass") if _encodable(case) \
                else path.write_bytes(case.encode("utf-8", "replace"))
            load_recipe(path)
        else:
            parse_recipe(case, "fuzz.yaml")
    except OnnxcompError as exc:
        return outcome(exc)
    return "ok"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- the data loader ---------------------------------------------------------------------------

DTYPES = ["float32", "float64", "float16", "int64", "int32", "bool", "complex64", "object", "<U3"]
SPECIALS = [0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e38, 3.0]


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from([(), (0,), (3,), (5, 1, 8, 8), (5, 1, 8, 7), (5, 10), (4, 1, 8, 8), (5, 64),
                                  (5, 10, 2)]))
    n = int(np.prod(shape)) if shape else 1
    fill = draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=4))
    base = np.resize(np.array(fill, np.float64), n).reshape(shape)
    if dtype == "object":
        return np.array([None] * n, dtype=object).reshape(shape)
    if dtype == "<U3":
        return np.full(shape, "a")
    with np.errstate(invalid="ignore", over="ignore"):
        return base.astype(dtype) if not np.issubdtype(np.dtype(dtype), np.integer) \
            else np.nan_to_num(base, posinf=7, neginf=-7).astype(dtype)


data_cases = st.one_of(
    st.dictionaries(st.sampled_from(["input", "label", "x", "input "]), arrays(), max_size=3),
    st.integers(0, 4000).map(lambda n: VAL.read_bytes()[:n]),
    st.just("npy"),
)


def data_target(case, folder: Path) -> str:
    """Write the case as an .npz (or bytes, or an .npy) and load it for the MLP; check the labels."""
    from onnxcomp.data import load_data
    from onnxcomp.validate import check_data, select_target

    path = folder / "d.npz"
    if isinstance(case, bytes):
        path.write_bytes(case)
    elif case == "npy":
        np.save(folder / "d.npy", np.zeros((3, 1, 8, 8), np.float32))
        path = folder / "d.npy"
    else:
        with open(path, "wb") as handle:
            np.savez(handle, **case)
    model = _mlp()
    try:
        data = load_data(path, model)
        check_data(model, data, select_target(model))
    except OnnxcompError as exc:
        return outcome(exc)
    return "ok"


_MODEL = []


def _mlp():
    from onnxcomp.model import load_model

    if not _MODEL:
        _MODEL.append(load_model(MLP))
    return _MODEL[0]


# --- the command line --------------------------------------------------------------------------

FLAGS = ["-m", "-o", "--calib", "--val", "--report", "--seed", "--latency-runs", "--force", "--external-data",
         "--allow-nonfinite", "--name", "--output", "--mask-input", "--json", "--verify-each", "-h"]


def cli_values(folder: Path, heavy: bool) -> list[str]:
    recipes = ["cleanup", "int8-dynamic", "int4-weights"] + (["int8", "transformer-int8"] if heavy else [])
    return [str(MLP), str(CNN) if heavy else str(MLP), str(VAL), str(CALIB), "nope.onnx", str(folder / "o.onnx"),
            str(folder / "r.json"), str(folder), "/dev/null", "-1", "0", "2", "x" * 300, "auto", "logits", "",
            *recipes]


def cli_cases(folder: Path, heavy: bool = False):
    words = st.one_of(st.sampled_from(FLAGS), st.sampled_from(cli_values(folder, heavy)))
    command = st.sampled_from(["run", "run", "run", "inspect", "validate", "passes", "logits", "recipes",
                               "--version", "bogus"])
    return st.tuples(command, st.lists(words, max_size=7)).map(
        lambda c: [c[0], *c[1]] + (["--latency-runs", "0"] if c[0] == "run" and not heavy else []))


def cli_target(argv: list[str], folder: Path) -> str:
    """Run ``onnxcomp ARGV`` in-process with ``folder`` as the working directory.

    The exit code must be 0, 2 or 3 (or argparse's --help/--version exit 0); an exit-2 run
    writes nothing; no temporary file is left; nothing outside ``folder`` changes.
    """
    from onnxcomp.cli import main

    before = _snapshot(folder)
    watched = _snapshot_outside()
    cwd = os.getcwd()
    err = io.StringIO()
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # --help / --version
                code = exc.code or 0
    finally:
        os.chdir(cwd)
    message = err.getvalue().strip()
    assert code in (0, 2, 3), (argv, code, message)
    assert "Traceback" not in message, (argv, message)
    after = _snapshot(folder)
    leftovers = [p for p in after if ".onnxcomp-" in p or p.endswith(".tmp")]
    assert not leftovers, (argv, leftovers)
    if code == 2:
        assert after == before, (argv, set(after) ^ set(before))
        lines = message.splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxcomp: error: "), (argv, message)
    assert _snapshot_outside() == watched, argv
    if code == 2:
        return "exit 2: " + outcome(OnnxcompError(lines[0].removeprefix("onnxcomp: error: "))).split(": ", 1)[1]
    return f"exit {code}"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _snapshot_outside() -> dict[str, int]:
    watched = {str(p): p.stat().st_mtime_ns for p in MODELS.rglob("*") if p.is_file()}
    watched.update({str(p): p.stat().st_mtime_ns for p in ROOT.iterdir() if p.is_file()})
    return watched
