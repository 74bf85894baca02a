"""Int8 quantization side by side, one run: onnxruntime.quantization vs onnxcomp.

On the shipped digits models and all-MiniLM-L6-v2: size, paired latency, fidelity, int8 kernels, cost.

    python bench/quantize.py [--models digits_mlp,digits_cnn,minilm] [--only VARIANT,...] [--quick]
                             [--reuse] [--out bench/quantize_results.md] [--plot docs/quantize_tradeoffs.png]

Every variant is quantized in its own subprocess (wall time and peak RSS from os.wait4 are that
run's own; cwd = a temporary folder, because onnxruntime's quant_pre_process leaves temp files in
the cwd) and evaluated in another: file size; latency at batch 1 and 32 paired with the fp32 model
(runs alternate in one process; ratio of medians; the 1-min load average is recorded); fidelity on
val; onnxcomp.fusion.fusion_report of the saved model; the op histogram of onnxruntime's optimized
graph. Models go to ~/.cache/onnxcomp/bench_quantize/ (or $ONNXCOMP_CACHE/bench_quantize/), never
into the repo. Our rows go through the public API: onnxcomp.pipeline.compress(model, recipe,
calib=, val=, latency_runs=0) then result.save(path, force=True) (gate verdicts are reported, not
enforced). A recipe onnxcomp rejects (an option that does not exist yet) is printed as n/a.

--quick: few latency runs, 32 MiniLM calibration passages and 100 val passages, for development
only; it writes to the cache folder unless --out/--plot are given. --reuse: take rows already
measured in the same mode from the cache (n/a and failed rows are never cached), e.g. to fill in
rows whose options just landed; to re-measure some rows and keep the others in the table:
delete their JSON under <cache>/results/<mode>/<model>/ and run with --reuse, or --reuse --only them
after deleting. MiniLM needs bench/minilm/export.py and textdata.py first.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "minilm"))

import peer  # noqa: E402  (bench/minilm/peer.py: ORT's MiniLM variants, paired latency, CPU info)
from common import cache_dir as minilm_dir  # noqa: E402
from fidelity import embed, fidelity, load_npz, make_session  # noqa: E402

THREADS = peer.THREADS  # intra_op_num_threads of every measured session (inter_op 1)
# intra-op threads sleep when idle (session.intra_op.allow_spinning 0) unless --spin: on a CPU shared with
# other jobs, threads spinning after a run steal the cores the next run needs (measured on MiniLM at
# load ~12 on 2 cores: fp32 bs1 85.6 -> 8.3 ms with spinning off), and models with many small ops
# (the unfused fp32 graph) suffer most, so the ratios mean little with spinning on.
SPINNING = False


def bench_session(path):
    """A measured session: THREADS intra-op threads, spinning as SPINNING says."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = THREADS, 1, 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPINNING else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
DIGITS_DATA = ROOT / "models" / "digits"
MODELS = {  # name: kind, fp32 model
    "digits_mlp": ("digits", ROOT / "models" / "digits_mlp.onnx"),
    "digits_cnn": ("digits", ROOT / "models" / "digits_cnn.onnx"),
    "minilm": ("minilm", minilm_dir() / "minilm.onnx"),
}
BASE = "percentile"  # calibration method of the accuracy-tool rows (the shipped `int8` recipe's)
SENSITIVITY_GATE = {"digits": {"min_cosine": 0.99999},  # a tight target: max_accuracy_drop 0 already holds
                    "minilm": {"min_cosine": 0.995, "output": "sentence_embedding", "mask_input": "auto"}}


def static(method=BASE, pre=(), **options):
    """cleanup -> [pre passes] -> quantize_static{method, options}."""
    return {"passes": ["cleanup", *pre, {"quantize_static": {"method": method, **options}}]}


# ---------------------------------------------------------------- the variants (one table)
# who: ORT / ours; ort: what ORT call (see ort_quantize); recipe: ours (a dict, or per model kind);
# models: restrict to these model names. MiniLM's ORT rows are bench/minilm/peer.py's variants.
VARIANTS = {
    "fp32": dict(who="-", what="the float model (its latency ratio is fp32 vs itself: the noise level)"),
    "ort_dynamic": dict(who="ORT", ort="dynamic",
                        what="quantize_dynamic, per-channel int8 weights (QInt8), ORT's default op types, "
                             "after quant_pre_process [MiniLM: peer.py dyn_pc]"),
    "ort_minmax": dict(who="ORT", ort="minmax",
                       what="quantize_static QDQ, U8S8, per-channel, MinMax, after quant_pre_process; digits: "
                            "ORT's default op types; MiniLM: MatMul only with MatMul outputs left float, the "
                            "best ORT static setting peer.py found [peer.py qdq_minmax_noout]"),
    "ort_entropy": dict(who="ORT", ort="entropy", what="as ort_minmax, Entropy calibration (ORT defaults)"),
    "ort_percentile": dict(who="ORT", ort="percentile",
                           what="as ort_minmax, Percentile calibration (ORT default 99.999)"),
    "ours_dynamic": dict(who="ours", what="quantize_dynamic per-channel (recipe int8-dynamic)",
                         recipe={"passes": ["cleanup", {"quantize_dynamic": {"per_channel": True}}]}),
    "ours_minmax": dict(who="ours", what="quantize_static minmax", recipe=static("minmax")),
    "ours_percentile": dict(who="ours", what="quantize_static percentile 99.999 (recipe int8)",
                            recipe=static("percentile")),
    "ours_mse": dict(who="ours", what="quantize_static mse", recipe=static("mse")),
    "ours_transformer_int8": dict(who="ours", models=("minilm",), recipe="transformer-int8",
                                  what="shipped recipe transformer-int8: cleanup, fuse_transformer "
                                       "(MultiHeadAttention), quantize_dynamic"),
    "ours_transformer_static": dict(who="ours", models=("minilm",), recipe="transformer-int8-static",
                                    what="shipped recipe transformer-int8-static: cleanup, fuse_transformer "
                                         "(MultiHeadAttention), quantize_static percentile + smooth_quant auto "
                                         "folded into constants (no Mul), padding-free calibration; target any "
                                         "(7-bit weights)"),
    "ours_transformer_static_vnni": dict(who="ours", models=("minilm",), recipe=None,
                                         what="transformer-int8-static with target: vnni (full 8-bit weights, "
                                              "for AVX512-VNNI / AVX-VNNI CPUs)"),
    "ours_transformer_static_sens": dict(
        who="ours", models=("minilm",), recipe=None,
        what="transformer-int8-static + sensitivity (grouped_loo, sensitivity_weight_only: the layers it keeps "
             "compute in float from int8 weights) aiming at sentence cosine 0.9985 on calib; target any"),
    "ours_transformer_static_sens_vnni": dict(
        who="ours", models=("minilm",), recipe=None,
        what="as ours_transformer_static_sens with target: vnni (full 8-bit weights)"),
    "ort_int4": dict(who="ORT", ort="int4", models=("minilm",),
                     what="MatMulNBitsQuantizer int4, block 32, symmetric, RTN (MatMuls only; embeddings float) "
                          "[peer.py int4]"),
    "ort_int4_hqq": dict(who="ORT", ort="int4_hqq", models=("minilm",),
                         what="MatMulNBitsQuantizer int4, block 32, HQQ (data-free, float zero points; MatMuls "
                              "only) [peer.py int4_hqq]"),
    "ours_int4_weights": dict(who="ours", recipe="int4-weights",
                              what="shipped recipe int4-weights: weight-only int4/32 MatMulNBits, GPTQ on the "
                                   "inputs' covariance + bias correction, padding-free statistics; int4 word "
                                   "table, int8 small tables (GatherBlockQuantized)"),
    "ours_smooth_pass": dict(who="ours", models=("minilm",), what=f"smooth_quant pass (alpha auto), then "
                             f"quantize_static {BASE}", recipe=static(pre=[{"smooth_quant": {"alpha": "auto"}}])),
    "ours_bias_corr": dict(who="ours", what=f"quantize_static {BASE} + bias_correction",
                           recipe=static(bias_correction=True)),
    "ours_smooth": dict(who="ours", what=f"quantize_static {BASE} + smooth_quant: auto (option)",
                        recipe=static(smooth_quant="auto")),
    "ours_equalize": dict(who="ours", models=("digits_mlp", "digits_cnn"),
                          what=f"quantize_static {BASE} + equalize (cross-layer equalization)",
                          recipe=static(equalize=True)),
    "ours_all_tools": dict(who="ours", what=f"quantize_static {BASE} + bias_correction + smooth_quant auto "
                                            "(+ equalize on digits)",
                           recipe={"digits": static(bias_correction=True, smooth_quant="auto", equalize=True),
                                   "minilm": static(bias_correction=True, smooth_quant="auto")}),
    "ours_sensitivity": dict(who="ours", what=f"quantize_static {BASE} + sensitivity (layers back to float "
                                              "until the gate holds on calib)",
                             recipe={kind: {**static(sensitivity=True), "gate": gate}
                                     for kind, gate in SENSITIVITY_GATE.items()}),
}


def _shipped_with(name: str, **options) -> dict:
    """A shipped recipe (passes/NAME.yaml) with quantize_static options changed."""
    import yaml
    recipe = yaml.safe_load((ROOT / "passes" / f"{name}.yaml").read_text())
    recipe.pop("description", None)
    for step in recipe["passes"]:
        if isinstance(step, dict) and "quantize_static" in step:
            step["quantize_static"] = {**step["quantize_static"], **options}
    return recipe


VARIANTS["ours_transformer_static_vnni"]["recipe"] = _shipped_with("transformer-int8-static", target="vnni")
VARIANTS["ours_ts_mul"] = dict(
    who="ours", models=("minilm",), what="transformer-int8-static with smooth_quant insert_mul: true (the FFN "
    "output MatMul behind the GELU smoothed too, a Mul after it)",
    recipe=_shipped_with("transformer-int8-static", smooth_quant={"alpha": "auto", "insert_mul": True}))
VARIANTS["ours_ts_mul_nearest"] = dict(
    who="ours", models=("minilm",), what="transformer-int8-static with smooth_quant insert_mul: true and "
    "weight_rounding: nearest (no GPTQ)",
    recipe=_shipped_with("transformer-int8-static", weight_rounding="nearest",
                         smooth_quant={"alpha": "auto", "insert_mul": True}))
for _damp in (0.003, 0.01, 0.1):
    VARIANTS[f"ours_ts_mul_tail{_damp}"] = dict(
        who="ours", models=("minilm",), what=f"transformer-int8-static with smooth_quant insert_mul: true and "
        f"gptq_tail_damp: {_damp} (GPTQ's XᵀX/n diagonal + {_damp}·max|X_j|²)",
        recipe=_shipped_with("transformer-int8-static", gptq_tail_damp=_damp,
                             smooth_quant={"alpha": "auto", "insert_mul": True}))
VARIANTS["ours_ts_tail0.01"] = dict(
    who="ours", models=("minilm",), what="transformer-int8-static (insert_mul: false) with gptq_tail_damp: 0.01",
    recipe=_shipped_with("transformer-int8-static", gptq_tail_damp=0.01))
SENSITIVE = dict(sensitivity=True, sensitivity_ranking="grouped_loo", sensitivity_weight_only=True)
SENSITIVE_GATE = {"min_cosine": 0.9985, "output": "sentence_embedding"}  # the search aims at it on calib
for _name, _target in (("ours_transformer_static_sens", "any"), ("ours_transformer_static_sens_vnni", "vnni")):
    _recipe = _shipped_with("transformer-int8-static", target=_target, **SENSITIVE)
    VARIANTS[_name]["recipe"] = {**_recipe, "gate": {**_recipe["gate"], **SENSITIVE_GATE}}
INT8_OPS = set(peer.INT8_OPS) | {"QLinearConv", "ConvInteger"}
FLOAT_COMPUTE = set(peer.FLOAT_MM_OPS) | {"Conv", "FusedConv"}


class Setup:
    """Run-wide settings: quick or full, cache folders, data files, latency runs."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.mode = "quick" if quick else "full"
        root = Path(os.environ.get("ONNXCOMP_CACHE") or Path.home() / ".cache" / "onnxcomp") / "bench_quantize"
        self.root = root
        self.models = root / "models" / self.mode
        self.results = root / "results" / self.mode
        self.minilm_calib_n = 32 if quick else 128  # as peer.py (ORT's Entropy/Percentile hold every activation)
        self.minilm_val_n = 100 if quick else 500
        self.runs = {"digits": (50, 20) if quick else (1000, 400), "minilm": (5, 3) if quick else (50, 20)}
        if quick:
            peer.WARMUP = 2

    def model_out(self, model: str, variant: str) -> Path:
        return MODELS[model][1] if variant == "fp32" else self.models / model / f"{variant}.onnx"

    def data(self, model: str) -> tuple[Path, Path]:
        """(calib, val) .npz files. MiniLM: the first n calib passages padded to their longest (what
        peer.NpzReader gives ORT), and the first n val passages; written once into the cache."""
        if MODELS[model][0] == "digits":
            return DIGITS_DATA / "calib.npz", DIGITS_DATA / "val.npz"
        d = self.root / "data"
        d.mkdir(parents=True, exist_ok=True)
        calib, val = d / f"minilm_calib{self.minilm_calib_n}.npz", d / f"minilm_val{self.minilm_val_n}.npz"
        if not calib.exists():
            rows = {k: v[:self.minilm_calib_n] for k, v in load_npz(minilm_dir() / "calib.npz").items()}
            width = int(rows["attention_mask"].sum(1).max())
            np.savez(calib, **{k: np.ascontiguousarray(v[:, :width]) for k, v in rows.items()})
        if not val.exists():
            np.savez(val, **{k: v[:self.minilm_val_n] for k, v in load_npz(minilm_dir() / "val.npz").items()})
        return calib, val


def variants_for(model: str) -> list[str]:
    return [v for v, spec in VARIANTS.items() if model in spec.get("models", MODELS)]


def recipe_for(model: str, variant: str):
    recipe = VARIANTS[variant]["recipe"]
    if isinstance(recipe, dict) and "passes" not in recipe:
        recipe = recipe[MODELS[model][0]]
    if isinstance(recipe, dict) and "gate" in recipe:  # fields another engineer may not have added yet
        from onnxcomp.recipe import Gate
        recipe = {**recipe, "gate": {k: v for k, v in recipe["gate"].items() if k in Gate.model_fields}}
    return recipe


def recipe_problem(model: str, variant: str) -> str | None:
    """Why onnxcomp rejects this row's recipe (None: accepted)."""
    from onnxcomp.errors import OnnxcompError
    from onnxcomp.recipe import load_recipe
    try:
        load_recipe(recipe_for(model, variant))
    except OnnxcompError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------- quantization (child process)
def ort_quantize(setup: Setup, model: str, how: str, out: Path) -> None:
    """onnxruntime.quantization on the fp32 model -> out. MiniLM: peer.py's function and settings."""
    if MODELS[model][0] == "minilm":
        name = {"dynamic": "dyn_pc", "minmax": "qdq_minmax_noout", "entropy": "qdq_entropy_noout",
                "percentile": "qdq_percentile_noout", "int4": "int4",
                "int4_hqq": "int4_hqq"}[how]
        return peer.quantize(name, out, setup.minilm_calib_n)
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_dynamic, quantize_static)
    pre = Path.cwd() / "pre.onnx"  # the child's temporary cwd
    quant_pre_process(str(MODELS[model][1]), str(pre))
    if how == "dynamic":
        quantize_dynamic(str(pre), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return

    class Reader(CalibrationDataReader):
        """calib.npz in 10 equal batches (ORT's histogram calibrators stack batches: equal shapes)."""

        def __init__(self):
            with np.load(setup.data(model)[0], allow_pickle=False) as z:
                self.batches = iter(np.array_split(z["input"], 10))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[how]
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)


def quantize_child(setup: Setup, model: str, variant: str) -> dict:
    """Quantize one row; return its stats (work seconds: the quantizing calls only)."""
    out = setup.model_out(model, variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = VARIANTS[variant]
    if spec["who"] == "ORT":
        start = time.perf_counter()
        ort_quantize(setup, model, spec["ort"], out)
        return {"work_s": time.perf_counter() - start}
    from onnxcomp.errors import OnnxcompError
    from onnxcomp.pipeline import compress
    calib, val = setup.data(model)
    try:
        result = compress(MODELS[model][1], recipe_for(model, variant), calib=calib, val=val, latency_runs=0)
    except OnnxcompError as exc:
        return {"error": str(exc)}
    result.save(out, force=True)
    report = result.report
    passes = [{k: p[k] for k in ("name", "seconds", "notes", "metrics")} | {"skipped": len(p["skipped"]),
                                                                            "touched": len(p["touched"])}
              for p in report["passes"]]
    return {"work_s": sum(p["seconds"] for p in passes), "passes": passes,
            "gate": {k: report["gate"][k] for k in ("thresholds", "passed", "failures")}}


# ---------------------------------------------------------------- evaluation (child process)
def optimized_ops(path: Path) -> Counter:
    """Op histogram of the graph onnxruntime runs (CPU, ORT_ENABLE_ALL)."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "opt.onnx"
        make_session(path, THREADS, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                     optimized_model_filepath=str(opt))
        return Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)


def digits_fidelity(sess, ref, val: Path) -> dict:
    with np.load(val, allow_pickle=False) as z:
        x, y = z["input"], z["label"]

    def logits(s):
        return np.concatenate([s.run(None, {"input": x[i:i + 32]})[0] for i in range(0, len(x), 32)])

    out, out_ref = logits(sess).astype(np.float64), logits(ref).astype(np.float64)
    new, old = out.argmax(1), out_ref.argmax(1)
    acc, acc_ref = float(np.mean(new == y)), float(np.mean(old == y))
    return {"accuracy": acc, "accuracy_fp32": acc_ref, "accuracy_drop": acc_ref - acc,
            "top1_agreement": float(np.mean(new == old)), "samples": len(y),
            "logit_rel_error": float(np.linalg.norm(out - out_ref) / np.linalg.norm(out_ref))}


def evaluate_child(setup: Setup, model: str, variant: str) -> dict:
    from onnxcomp.fusion import fusion_report
    from onnxcomp.model import load_model
    kind, fp32 = MODELS[model]
    path = setup.model_out(model, variant)
    size = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
    ops = optimized_ops(path)
    fusion = fusion_report(load_model(path))
    sess, ref = bench_session(path), bench_session(fp32)
    _, val = setup.data(model)
    if kind == "digits":
        fid = digits_fidelity(sess, ref, val)
        x = np.load(val)["input"]
        feeds, outputs = (x[:1], x[:32]), None
        feeds = [{"input": f} for f in feeds]
    else:
        ref_file = setup.results / model / f"fp32_sentence_embedding_val{setup.minilm_val_n}.npy"
        emb = embed(path, val, 32, session=sess)
        if variant == "fp32" or not ref_file.exists():
            ref_file.parent.mkdir(parents=True, exist_ok=True)
            np.save(ref_file, emb if variant == "fp32" else embed(fp32, val, 32, session=ref))
        fid = fidelity(np.load(ref_file), emb) | {"samples": len(emb)}
        feeds, outputs = peer.latency_feeds(), ("sentence_embedding",)
    runs = setup.runs[kind]
    load = os.getloadavg()[0]
    lat = {}
    for bs, feed, n in zip((1, 32), feeds, runs):
        wall, cpu, ref_wall, ref_cpu = peer.paired_latency(sess, ref, feed, n, outputs)
        lat[f"bs{bs}"] = {"ms": wall * 1e3, "fp32_ms": ref_wall * 1e3, "ratio": wall / ref_wall,
                          "cpu_ratio": cpu / ref_cpu if ref_cpu else None, "runs": n,
                          "shape": list(next(iter(feed.values())).shape)}
    return {"size": size, "latency": lat, "load": load, "load_after": os.getloadavg()[0], "fidelity": fid,
            "fused_ratio": fusion["fused_ratio"], "quantized_compute": fusion["compute"]["quantized"],
            "unfused": fusion["unfused"], "int8_kernels": sum(fusion["int8_kernels"].values()),
            "int8_ops": sum(v for k, v in ops.items() if k in INT8_OPS or k.startswith("QLinear")),
            "float_compute": sum(v for k, v in ops.items() if k in FLOAT_COMPUTE), "ops": dict(sorted(ops.items()))}


def interleaved_child(setup: Setup, model: str, variants: list[str]) -> dict:
    """Latency of several saved rows in ONE process, runs round-robin (order reversed every round),
    after warm-ups: median wall ms and median CPU ms (process_time: all of the session's threads)
    per row and their ratios to fp32. Under load the wall ratios of rows measured in separate
    processes drift apart; here every row sees the same load at the same moments."""
    kind, fp32 = MODELS[model]
    names = ["fp32", *[v for v in variants if v != "fp32"]]
    sessions = {v: bench_session(setup.model_out(model, v)) for v in names}
    if kind == "digits":
        x = np.load(setup.data(model)[1])["input"]
        feeds, outputs = [{"input": x[:1]}, {"input": x[:32]}], None
    else:
        feeds, outputs = list(peer.latency_feeds()), ["sentence_embedding"]
    runs = setup.runs[kind]
    out = {"load": os.getloadavg()[0], "threads": THREADS, "spinning": SPINNING, "rows": {v: {} for v in names}}
    clock = time.thread_time if THREADS == 1 else time.process_time  # 1 thread: ORT runs in this thread
    for bs, feed, n in zip((1, 32), feeds, runs):
        for v in names:
            for _ in range(peer.WARMUP):
                sessions[v].run(outputs, feed)
        wall, cpu = {v: [] for v in names}, {v: [] for v in names}
        for i in range(n):
            for v in (names if i % 2 else names[::-1]):
                t, c = time.perf_counter(), clock()
                sessions[v].run(outputs, feed)
                wall[v].append(time.perf_counter() - t)
                cpu[v].append(clock() - c)
        for v in names:
            w, c = float(np.median(wall[v])), float(np.median(cpu[v]))
            out["rows"][v][f"bs{bs}"] = {"ms": w * 1e3, "cpu_ms": c * 1e3, "runs": n,
                                         "ratio": w / float(np.median(wall["fp32"])),
                                         "cpu_ratio": c / float(np.median(cpu["fp32"]))}
    out["load_after"] = os.getloadavg()[0]
    return out


def interleaved_table(model: str, result: dict) -> list[str]:
    spin = "spinning" if result.get("spinning", True) else "no spinning"
    unit, scale = ("ms", 1.0) if model == "minilm" else ("µs", 1000.0)
    out = [f"Interleaved in one process ({result['threads']} intra-op threads, {spin}, load {result['load']:.1f} -> "
           f"{result['load_after']:.1f}): median wall {unit} (×fp32) [median CPU time ×fp32]\n",
           "| variant | bs1 | bs32 |", "|---|---|---|"]
    for v, r in result["rows"].items():
        cells = [f"{r[b]['ms'] * scale:.1f} ({r[b]['ratio']:.2f}) [{r[b]['cpu_ratio']:.2f}]" for b in ("bs1", "bs32")]
        out.append(f"| {v} | {cells[0]} | {cells[1]} |")
    return out


# ---------------------------------------------------------------- driver
def run_child(args: list[str]) -> tuple[dict | None, str, float, float]:
    """This script with args in a subprocess whose cwd is a fresh temporary folder.
    Returns (its last stdout line as JSON or None if it failed, stderr tail, wall s, peak RSS MB)."""
    with tempfile.TemporaryDirectory(prefix="bench_quantize-") as tmp:
        err_path = Path(tmp) / "stderr.txt"
        start = time.perf_counter()
        with open(err_path, "w") as err:
            p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], cwd=tmp,
                                 stdout=subprocess.PIPE, stderr=err, text=True)
            out = p.stdout.read()
            _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - start
        tail = "\n".join(err_path.read_text(errors="replace").strip().splitlines()[-8:])
    lines = out.strip().splitlines()
    ok = os.waitstatus_to_exitcode(status) == 0 and lines
    return (json.loads(lines[-1]) if ok else None), tail, wall, usage.ru_maxrss / 1024


def measure(setup: Setup, model: str, variant: str, cmd: str) -> dict:
    row = {"model": model, "variant": variant, "mode": setup.mode, "cmd": cmd,
           "when": time.strftime("%Y-%m-%d %H:%M"), "load_start": os.getloadavg()[0]}
    if VARIANTS[variant]["who"] == "ours":
        problem = recipe_problem(model, variant)
        if problem:
            return row | {"na": "option not available", "why": problem}
    flag = (["--quick"] if setup.quick else []) + (["--spin"] if SPINNING else []) + ["--threads", str(THREADS)]
    if variant != "fp32":
        q, tail, row["quant_wall_s"], row["quant_rss_mb"] = run_child(["--_quantize", model, variant, *flag])
        if q is None:
            return row | {"failed": "quantization failed: " + (tail.splitlines()[-1] if tail else "?"), "stderr": tail}
        if "error" in q:
            return row | {"failed": q["error"]}
        row["quant"] = q
    e, tail, row["eval_wall_s"], _ = run_child(["--_evaluate", model, variant, *flag])
    if e is None:
        return row | {"failed": "evaluation failed: " + (tail.splitlines()[-1] if tail else "?"), "stderr": tail}
    return row | e


# ---------------------------------------------------------------- output
def _ratio(x: float) -> str:
    return f"{x:.2f}"


def table(model: str, rows: dict[str, dict]) -> list[str]:
    kind = MODELS[model][0]
    fp = rows.get("fp32")
    unit, scale = ("kB", 1e3) if kind == "digits" else ("MB", 1e6)
    tunit, tscale = ("µs", 1e3) if kind == "digits" else ("ms", 1)
    fid_head = ("val acc % (change pts) | top-1 agree | logit err" if kind == "digits"
                else "mean cos | min cos | top-5 agree")
    head = (f"| variant | by | size {unit} (×fp32) | bs1 {tunit} (×fp32) | bs32 {tunit} (×fp32) | {fid_head} "
            "| fused | int8 kernels / float MM·Conv | quant s (run s) | quant peak RSS MB | load |")
    ncol = head.count("|") - 1
    out = [head, "|" + "---|" * ncol]
    for v, r in rows.items():
        if "na" in r or "failed" in r:
            msg = f"n/a: {r['na']}" if "na" in r else f"FAILED: {r['failed'][:160]}"
            out.append(f"| {v} | {VARIANTS[v]['who']} | {msg} |" + " |" * (ncol - 3))
            continue
        lat = r["latency"]
        size = f"{r['size'] / scale:.1f} ({r['size'] / fp['size']:.3f})" if fp else f"{r['size'] / scale:.1f}"
        lats = [f"{lat[b]['ms'] * tscale:.0f} ({_ratio(lat[b]['ratio'])})" if kind == "digits"
                else f"{lat[b]['ms']:.1f} ({_ratio(lat[b]['ratio'])})" for b in ("bs1", "bs32")]
        f = r["fidelity"]
        if kind == "digits":
            change = round(-100 * f["accuracy_drop"], 2) + 0.0  # + 0.0: no "-0.00"
            fid = (f"{100 * f['accuracy']:.2f} ({change:+.2f}) | {f['top1_agreement']:.3f} "
                   f"| {f['logit_rel_error']:.4f}")
        else:
            fid = f"{f['mean_cosine']:.4f} | {f['min_cosine']:.4f} | {f['top5_agreement']:.3f}"
        fused = "-" if r["fused_ratio"] is None else f"{r['fused_ratio']:.2f}"
        cost = (f"{r['quant']['work_s']:.1f} ({r['quant_wall_s']:.0f}) | {r['quant_rss_mb']:.0f}"
                if "quant" in r else "- | -")
        out.append(f"| {v} | {VARIANTS[v]['who']} | {size} | {lats[0]} | {lats[1]} | {fid} | {fused} "
                   f"| {r['int8_ops']} / {r['float_compute']} | {cost} | {r['load']:.1f} |")
    return out


def details(model: str, rows: dict[str, dict]) -> list[str]:
    """Per-row notes: gate verdicts and pass notes of our rows, unfused nodes, errors."""
    out = []
    for v, r in rows.items():
        bits = []
        if "na" in r:
            bits.append(f"recipe rejected: `{r['why']}`")
        if "failed" in r:
            bits.append(f"failed: `{r['failed']}`" + (f" (stderr: `{r['stderr'].splitlines()[-1]}`)"
                                                        if r.get("stderr") else ""))
        q = r.get("quant", {})
        if q.get("gate", {}).get("thresholds"):
            g = q["gate"]
            bits.append(f"gate {json.dumps(g['thresholds'])} on val: " +
                        ("passed" if g["passed"] else "FAILED (" + "; ".join(g["failures"]) + ")"))
        for p in q.get("passes", []):
            if p["name"] == "cleanup":
                continue
            notes = "; ".join(n if len(n) < 240 else n[:237] + "..." for n in p["notes"])
            keep = {k: p["metrics"][k] for k in p["metrics"] if k not in ("folded_activations",)}
            metr = json.dumps(keep, sort_keys=True)
            bits.append(f"{p['name']} ({p['seconds']:.1f} s, {p['touched']} touched, {p['skipped']} skipped)"
                        + (f": {notes}" if notes else "") + (f" — metrics {metr[:400]}" if keep else ""))
        if r.get("unfused"):
            bits.append("not int8 in ORT: " + ", ".join(f"{u['op']} {u['name']} → {u['runs_as']}"
                                                         for u in r["unfused"][:8])
                        + (f" (+{len(r['unfused']) - 8})" if len(r["unfused"]) > 8 else ""))
        if bits:
            out.append(f"- **{v}**: " + " · ".join(bits))
    return out


def recipe_text(recipe) -> str:
    if recipe is None:
        return ""
    if isinstance(recipe, str):
        return f"shipped `{recipe}`"
    if "passes" in recipe:
        return f"`{json.dumps(recipe)}`"
    return "<br>".join(f"{kind}: `{json.dumps(r)}`" for kind, r in recipe.items())


def write_markdown(path: Path, cmd: str, setup: Setup, all_rows: dict, wall: float,
                   interleaved: dict | None = None) -> None:
    import onnxruntime as ort
    cmds = sorted({r["cmd"] for rows in all_rows.values() for r in rows.values()}, key=len)
    runs = "; ".join(f"{k} {a} (bs1) / {b} (bs32)" for k, (a, b) in setup.runs.items())
    md = [
        "# Int8 quantization side by side: onnxruntime.quantization vs onnxcomp\n",
        f"Written by `{cmd}` (from the repo root, {time.strftime('%Y-%m-%d %H:%M')}, {wall / 60:.0f} min); "
        "rows measured by " + ", ".join(f"`{c}`" for c in cmds) + ".\n",
        f"Machine: {peer.cpu_info()}. onnxruntime {ort.__version__}, CPUExecutionProvider, ORT_ENABLE_ALL, "
        f"intra_op_num_threads={THREADS}, inter_op 1, intra-op spinning {'on' if SPINNING else 'off'} (see "
        f"bench_session). Python {sys.version.split()[0]}. The 2 cores were shared "
        "with other jobs: see the load column (1-min load average when the row's latency was measured).\n",
        "- **size**: the saved file (×fp32). **latency**: median ms (µs on digits) of "
        f"{runs} runs after {peer.WARMUP} warm-ups, each run alternating with a run of the fp32 model in the "
        "same process; (×fp32) = ratio of the two medians, so the fp32 row (fp32 vs itself) shows the noise. "
        "Inputs: digits val[:1] and val[:32]; MiniLM the median-length val passage and the 32 around the "
        "median length (peer.latency_feeds).",
        "- **fidelity**: digits: accuracy on val.npz (497) and its change vs fp32 in points, top-1 agreement "
        "with fp32, logit err = ‖logits − logits_fp32‖ / ‖logits_fp32‖ over val (accuracy barely moves on "
        "these models; the error does); MiniLM: sentence_embedding vs fp32 on the first "
        f"{setup.minilm_val_n} val passages (stdlib docstrings), mean/min cosine and top-5 neighbour "
        "agreement (bench/minilm/fidelity.py).",
        "- **fused**: onnxcomp.fusion.fusion_report on the saved model: quantized Conv/MatMul/Gemm that ORT "
        "runs as int8 kernels / all quantized ones ('-': nothing quantized). **int8 kernels / float MM·Conv**: "
        "node counts in ORT's optimized graph (int8 = QLinear*, QGemm, MatMulInteger(ToFloat), "
        "DynamicQuantizeMatMul, ConvInteger, QAttention, …; float = MatMul, Gemm, Conv and their fused forms, "
        "Attention).",
        "- **quant s (run s) / peak RSS**: the quantization subprocess. quant s = time in the quantizing calls "
        "(ORT: quant_pre_process + quantize_*; ours: the recipe's passes as compress() times them); run s = "
        "the whole subprocess (imports, load, save; ours also compress()'s own validation on val and fusion "
        "report); peak RSS = that subprocess's ru_maxrss.",
        f"- **calibration**: digits: calib.npz (300), ORT in 10 batches of 30. MiniLM: the first "
        f"{setup.minilm_calib_n} calib passages padded to their longest, the same rows for ORT (batches of 8, "
        "peer.NpzReader) and ours.",
        "- ORT's static rows on MiniLM quantize MatMul only and leave MatMul outputs float "
        "(OpTypesToExcludeOutputQuantization): the best ORT static setting bench/minilm/peer.py found "
        "(ORT's default op list gives cosine 0.36, MatMul-only with quantized outputs 0.934). ORT's Entropy "
        "at its defaults (128 bins = 128 quantized bins) equals MinMax.",
        "- Our rows: onnxcomp.pipeline.compress(model, recipe, calib=, val=, latency_runs=0), saved with "
        "force=True; recipes below. Our weights are 7-bit (target any, reduce_range auto) unless a row says "
        "target vnni; ORT's default is 8-bit.\n",
        "| variant | by | what | recipe (ours) |", "|---|---|---|---|",
    ]
    for v, spec in VARIANTS.items():
        rec_txt = recipe_text(spec.get("recipe"))
        scope = f" ({', '.join(spec['models'])} only)" if "models" in spec else ""
        md.append(f"| {v} | {spec['who']} | {spec['what']}{scope} | {rec_txt} |")
    for model, rows in all_rows.items():
        md += ["", f"## {model}\n", *table(model, rows), ""]
        if interleaved and model in interleaved:
            md += [*interleaved_table(model, interleaved[model]), ""]
        md += details(model, rows)
    md += ["", "## Op histogram of ORT's optimized graph\n"]
    for model, rows in all_rows.items():
        for v, r in rows.items():
            if "ops" in r:
                md.append(f"- {model} **{v}**: " + ", ".join(f"{k} {n}" for k, n in r["ops"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(md) + "\n")


def plot(path: Path, all_rows: dict) -> None:
    """Per model a panel: fidelity (y) vs latency ratio at batch 32 (x); marker area ∝ size ratio.
    Digits: relative logit error vs fp32 (log, better up; accuracy hardly moves); MiniLM: mean cosine."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    models = [m for m, rows in all_rows.items() if any("latency" in r for r in rows.values())]
    if not models:
        return
    ncols = min(len(models), 2)
    nrows = (len(models) + ncols) // ncols if len(models) > 2 else 1  # > 2 panels: a free cell for the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.6 * ncols, 5.4 * nrows + (0.7 if nrows == 1 else 0)),
                             squeeze=False, dpi=110)
    cells = list(axes.flat)
    labels = []
    style = {"ORT": ("s", "tab:orange"), "ours": ("o", "tab:blue"), "-": ("*", "0.3")}
    for ax, model in zip(cells, models):
        rows = {v: r for v, r in all_rows[model].items() if "latency" in r}
        fp = rows.get("fp32")
        digits = MODELS[model][0] == "digits"
        pts = []
        for v, r in rows.items():
            if digits and v == "fp32":
                continue  # error 0: the fp32 reference is the x = 1 line
            y = r["fidelity"]["logit_rel_error"] if digits else r["fidelity"]["mean_cosine"]
            x = r["latency"]["bs32"]["ratio"]
            size = r["size"] / fp["size"] if fp else 1.0
            marker, color = style[VARIANTS[v]["who"]]
            area = 500 * size * (1.6 if marker == "*" else 1)
            ax.scatter(x, y, s=area, marker=marker, c=color, alpha=0.55, edgecolors="k", linewidths=0.6, zorder=3)
            radius = np.sqrt(area) / 2 * fig.dpi / 72  # marker radius in pixels
            pts.append((x, y, v.replace("ours_", "").replace("ort_", "ORT "), radius))
        xs = [p[0] for p in pts]
        if max(xs) / min(xs) > 2.5:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if digits:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.invert_yaxis()
            ax.set_ylabel("logit error vs fp32, ‖Δ‖/‖fp32‖ (log; better ↑)")
            ax.set_title(f"{model}: logit error vs fp32 latency (fp32 = the x = 1 line)", fontsize=10.5)
        else:
            ax.set_ylabel("sentence-embedding mean cosine vs fp32 (better ↑)")
            ax.set_title(f"{model}: embedding cosine vs fp32 latency", fontsize=10.5)
        ax.set_xlabel("latency ×fp32 at batch 32 (paired medians; < 1 = faster)")
        ax.margins(x=0.22, y=0.14)
        ax.axvline(1.0, color="0.6", lw=0.9, ls="--", zorder=1)
        ax.grid(alpha=0.3, zorder=0, which="major")
        labels.append((ax, pts))
    handles = [Line2D([], [], marker=m, color="w", markerfacecolor=c, markeredgecolor="k", markersize=11,
                      alpha=0.7, label=lab) for lab, (m, c) in
               (("onnxruntime.quantization", style["ORT"]), ("onnxcomp", style["ours"]), ("fp32", style["-"]))]
    title = "marker area ∝ file size ×fp32 (fp32 = 1.0)"
    for ax in cells[len(models):]:
        ax.axis("off")
    if len(cells) > len(models):
        cells[len(models)].legend(handles=handles, loc="center", frameon=False, title=title, fontsize=11,
                                  title_fontsize=11)
        cells[len(models)].text(0.5, 0.12, "digits: accuracy hardly moves (see the table), so the y axis is\n"
                                "the logit error; MiniLM: sentence-embedding cosine on val.\n"
                                "Made by bench/quantize.py (bench/quantize_results.md).",
                                ha="center", va="center", fontsize=9.5, color="0.3",
                                transform=cells[len(models)].transAxes)
        fig.tight_layout()
    else:
        fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, title=title)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
    for ax, pts in labels:
        _label(ax, pts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(ax, pts: list[tuple[float, float, str, float]]) -> None:
    """Label (x, y, name, marker radius px) points without overlaps: points at (nearly) the same place
    share one label; each label takes the first free spot around its point (greedy, nearest first),
    with a leader line when it had to move away."""
    fig = ax.figure
    fig.canvas.draw()
    ax.set_xlim(ax.get_xlim())  # freeze the limits: pixel positions stay valid
    ax.set_ylim(ax.get_ylim())
    renderer, to_px, to_data = fig.canvas.get_renderer(), ax.transData.transform, ax.transData.inverted().transform
    groups: list[list] = []  # [pixel xy, radius, names]
    for x, y, name, rad in sorted(pts, key=lambda p: (p[0], p[1])):
        px = to_px((x, y))
        for g in groups:
            if np.hypot(*(g[0] - px)) < 4:
                g[1], g[2] = max(g[1], rad), g[2] + [name]
                break
        else:
            groups.append([px, rad, [name]])
    frame = ax.get_window_extent(renderer)
    boxes = [(px[0] - r, px[1] - r, px[0] + r, px[1] + r) for px, r, _ in groups]  # markers
    angles = (0, 180, 35, -35, 145, -145, 90, -90, 65, -65, 115, -115)

    def free(b):
        inside = frame.x0 + 2 < b[0] and b[2] < frame.x1 - 2 and frame.y0 + 2 < b[1] and b[3] < frame.y1 - 2
        return inside and not any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in boxes)

    for px, rad, names in sorted(groups, key=lambda g: -len(g[2])):
        text = ax.text(0, 0, ", ".join(names), fontsize=7.5, zorder=5)
        ext = text.get_window_extent(renderer)
        w, h = ext.width, ext.height
        spot = None
        for dist in (3, 10, 20, 32, 48, 70, 95):
            for a in angles:
                cx = px[0] + np.cos(np.radians(a)) * (rad + dist)
                cy = px[1] + np.sin(np.radians(a)) * (rad + dist)
                x0 = cx if np.cos(np.radians(a)) > 0.1 else cx - w if np.cos(np.radians(a)) < -0.1 else cx - w / 2
                y0 = cy - h / 2 if abs(np.sin(np.radians(a))) < 0.7 else cy if a > 0 else cy - h
                b = (x0, y0, x0 + w, y0 + h)
                if free(b):
                    spot = (b, dist)
                    break
            if spot:
                break
        b, dist = spot or (((px[0] + rad + 3), px[1] - h / 2, px[0] + rad + 3 + w, px[1] + h / 2), 3)
        boxes.append(b)
        text.set_position(to_data((b[0], b[1] + h / 2)))
        text.set_va("center")
        if dist > 10:
            near = (min(max(px[0], b[0]), b[2]), min(max(px[1], b[1]), b[3]))
            ax.annotate("", xy=to_data(px), xytext=to_data(near),
                        arrowprops=dict(arrowstyle="-", color="0.55", lw=0.5, shrinkA=0, shrinkB=rad), zorder=2)


def main() -> None:
    global SPINNING, THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--only", help="comma-separated variants (fp32 is always measured): " + ",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="few latency runs, less MiniLM data (development only)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse rows measured earlier in the same mode (with --only: the other variants' cached "
                         "rows stay in the table)")
    ap.add_argument("--out", type=Path, help="markdown table (default bench/quantize_results.md; --quick: cache)")
    ap.add_argument("--plot", type=Path, help="PNG (default docs/quantize_tradeoffs.png; --quick: cache)")
    ap.add_argument("--_quantize", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--interleaved", action="store_true",
                    help="also time every measured row of a model round-robin in one process (table per model)")
    ap.add_argument("--_evaluate", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_interleaved", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--spin", action="store_true", help="let idle intra-op threads spin (onnxruntime's default)")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"intra-op threads of the measured sessions (default {THREADS}; 1 on a loaded machine: "
                         "then the CPU ratios are the work each model does)")
    a = ap.parse_args()
    SPINNING, THREADS = a.spin, a.threads
    setup = Setup(a.quick)
    if a._quantize:
        return print(json.dumps(quantize_child(setup, *a._quantize)))
    if a._evaluate:
        return print(json.dumps(evaluate_child(setup, *a._evaluate)))
    if a._interleaved:
        return print(json.dumps(interleaved_child(setup, a._interleaved[0], a._interleaved[1].split(","))))
    print(f"machine: {peer.cpu_info()}; load {os.getloadavg()[0]:.1f}", flush=True)

    models = a.models.split(",")
    only = a.only.split(",") if a.only else list(VARIANTS)
    for name, known in (("model", MODELS), ("variant", VARIANTS)):
        bad = [x for x in (models if name == "model" else only) if x not in known]
        if bad:
            ap.error(f"unknown {name} {bad[0]!r} (known: {', '.join(known)})")
    out = a.out or (setup.root / "quick_results.md" if a.quick else ROOT / "bench" / "quantize_results.md")
    png = a.plot or (setup.root / "quick_tradeoffs.png" if a.quick else ROOT / "docs" / "quantize_tradeoffs.png")
    cmd = shlex.join(["python", "bench/quantize.py", *sys.argv[1:]])
    if "minilm" in models and not MODELS["minilm"][1].exists():
        sys.exit(f"{MODELS['minilm'][1]} missing: run bench/minilm/export.py and bench/minilm/textdata.py first")
    start, all_rows = time.perf_counter(), {}
    for model in models:
        rows = all_rows.setdefault(model, {})
        for variant in variants_for(model):
            cached = setup.results / model / f"{variant}.json"
            if variant not in only and variant != "fp32":
                if a.reuse and cached.exists():  # not re-measured, but kept in the table
                    rows[variant] = json.loads(cached.read_text())
                continue
            if a.reuse and cached.exists():
                rows[variant] = json.loads(cached.read_text())
                print(f"{model} {variant}: reused ({rows[variant]['when']})", flush=True)
                continue
            row = measure(setup, model, variant, cmd)
            rows[variant] = row
            if "na" not in row and "failed" not in row:
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(row, indent=1, sort_keys=True))
            print(f"[{time.perf_counter() - start:5.0f}s] {model} {variant}: " + summary(row), flush=True)
    inter = {}
    if a.interleaved:
        for model, rows in all_rows.items():
            measured = [v for v, r in rows.items() if "latency" in r]
            res, tail, _, _ = run_child(["--_interleaved", model, ",".join(measured), *(["--quick"] if a.quick else []),
                                         *(["--spin"] if a.spin else []), "--threads", str(THREADS)])
            if res is None:
                print(f"{model}: interleaved timing failed: {tail}")
                continue
            inter[model] = res
            print(f"\n## {model} interleaved\n" + "\n".join(interleaved_table(model, res)), flush=True)
    wall = time.perf_counter() - start
    write_markdown(out, cmd, setup, all_rows, wall, inter)
    plot(png, all_rows)
    for model, rows in all_rows.items():
        print(f"\n## {model}\n" + "\n".join(table(model, rows)))
    print(f"\nwrote {out} and {png} in {wall / 60:.1f} min")


def summary(row: dict) -> str:
    if "na" in row:
        return f"n/a: {row['na']} ({row['why']})"
    if "failed" in row:
        return "FAILED: " + row["failed"]
    f = row["fidelity"]
    fid = (f"acc {100 * f['accuracy']:.2f}" if "accuracy" in f else
           f"cos {f['mean_cosine']:.4f} min {f['min_cosine']:.4f} top5 {f['top5_agreement']:.3f}")
    q = f", quant {row['quant']['work_s']:.1f}s/{row['quant_wall_s']:.0f}s {row['quant_rss_mb']:.0f}MB" \
        if "quant" in row else ""
    return (f"{fid}, lat x{row['latency']['bs1']['ratio']:.2f}/x{row['latency']['bs32']['ratio']:.2f}, "
            f"fused {row['fused_ratio']}, int8 {row['int8_ops']}/float {row['float_compute']}, "
            f"load {row['load']:.1f}{q}")


if __name__ == "__main__":
    main()
