"""Low-rank factorization, measured in one run: svd_split (plain / whitened / asvd) and the Conv passes.

    python bench/lowrank.py [--models digits_mlp,digits_cnn,minilm] [--ratios 0.9,0.8,...]
                            [--minilm-ratios 0.9,0.8,0.5,0.3] [--quick] [--out bench/lowrank_results.md]

Part 1, svd_split on every MatMul/Gemm, for each parameter ratio and method: parameters, file
size and latency (batch 1 and 32) relative to fp32, and fidelity — digits: accuracy and logit
cosine on models/digits/val.npz; all-MiniLM-L6-v2: sentence-embedding cosine (mean, min) and
top-5 neighbour agreement on the 500 val passages (bench/minilm/fidelity.py). Every variant runs
with ``require_speedup: false`` (so each ratio is really applied); the "faster" column says how
many of the split layers the pass's own speed check (ORT micro-benchmark per shape) would keep.
Whitened/asvd calibrate on the calibration file (digits: models/digits/calib.npz; MiniLM: the
200 calibration passages).

Part 2, the digits CNN's 3x3 Conv (32x16; the 1-channel first Conv is left out by min_params):
tucker2 vs cp vs spatial_svd vs depthwise_separable at matched parameter ratios (stride 1, same
padding: MACs scale with parameters; the MACs column is measured by onnxcomp.report).

Latency: ours and fp32 alternate in one process (bench/minilm/peer.paired_latency: order flipped
each round, medians, intra-op threads 2); the load average is printed: on a shared machine the
ratios carry ±10-15 % noise. Models are written to ~/.cache/onnxcomp/bench_lowrank/, never the repo.
MiniLM needs bench/minilm/export.py and textdata.py first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# OpenBLAS's threads spin-wait: on a loaded 2-core machine a 384x1536 SVD took 37 s with 2 BLAS
# threads and 2 s with 1. onnxruntime keeps its own thread pool, so this only affects numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "minilm"))

import peer  # noqa: E402
from common import cache_dir as minilm_dir  # noqa: E402
from fidelity import embed, fidelity, load_npz, make_session  # noqa: E402

import onnxcomp  # noqa: E402
from onnxcomp.data import load_data  # noqa: E402
from onnxcomp.model import load_model, save_model  # noqa: E402
from onnxcomp.passes.base import PassContext  # noqa: E402
from onnxcomp.passes.lowrank import SvdSplit  # noqa: E402
from onnxcomp.passes.lowrank_speed import matmul_split_ratio  # noqa: E402
from onnxcomp.report import count_params  # noqa: E402

DIGITS = ROOT / "models" / "digits"
METHODS = ("plain", "whitened", "asvd")
CONV_PASSES = ("tucker2", "cp", "spatial_svd", "depthwise_separable")
OUT_DIR = Path(os.environ.get("ONNXCOMP_CACHE") or Path.home() / ".cache" / "onnxcomp") / "bench_lowrank"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_mlp,digits_cnn,minilm")
    ap.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.5,0.4,0.3")
    ap.add_argument("--minilm-ratios", default="0.9,0.8,0.5,0.3")
    ap.add_argument("--quick", action="store_true", help="few latency runs (development only)")
    ap.add_argument("--sequential-only", action="store_true",
                    help="MiniLM only: whitened one-shot vs sequential, layer and global budget, at --minilm-ratios")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    args = ap.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    runs = (5, 3) if args.quick else (peer.RUNS_BS1, peer.RUNS_BS32)
    lines = [f"CPU: {peer.cpu_info()}; onnxruntime threads {peer.THREADS}; load average at start "
             f"{os.getloadavg()[0]:.1f} (shared machine: latency ratios carry noise)", ""]
    print(lines[0], flush=True)
    models = args.models.split(",")
    if args.sequential_only:
        rows = [minilm_svd("whitened", r, runs, budget=b, sequential=s)
                for r in _floats(args.minilm_ratios) for b in ("layer", "global") for s in (False, True)]
        lines += _table("all-MiniLM-L6-v2: whitened one-shot vs sequential (sentence embedding vs fp32)", rows,
                        MINILM_COLS)
        models = []
    for name in ("digits_mlp", "digits_cnn"):
        if name in models:
            rows = [digits_svd(name, m, r, runs) for r in _floats(args.ratios) for m in METHODS]
            rows.append(digits_svd(name, "whitened", 0.5, runs, budget="global"))
            lines += _table(f"{name}: svd_split on MatMul/Gemm", rows, DIGITS_COLS)
    if "digits_cnn" in models:
        rows = [digits_conv(p, r, runs) for r in (0.7, 0.5, 0.3) for p in CONV_PASSES]
        rows.append(digits_conv("tucker2", None, runs, vbmf=True))
        lines += _table("digits_cnn: Conv 32x16x3x3 factorizations (after cleanup)", rows, CONV_COLS)
    if "minilm" in models:
        rows = [minilm_svd(m, r, runs) for r in _floats(args.minilm_ratios) for m in METHODS]
        rows.append(minilm_svd("whitened", 0.8, runs, budget="global"))
        lines += _table("all-MiniLM-L6-v2: svd_split on the 36 weight MatMuls (sentence embedding vs fp32)",
                        rows, MINILM_COLS)
        lines += speed_table()
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


# --- digits ---------------------------------------------------------------------------------------


def digits_svd(name: str, method: str, ratio: float, runs, budget: str = "layer") -> dict:
    options = {"method": method, "param_ratio": ratio, "require_speedup": False, "budget": budget,
               "speed_cache": None}
    recipe = {"passes": ["cleanup", {"svd_split": options}]}
    label = f"{method}{' global' if budget == 'global' else ''} {ratio}"
    return _digits_row(name, label, recipe, runs, split_layers=True)


def digits_conv(pass_name: str, ratio: float | None, runs, vbmf: bool = False) -> dict:
    options = {"min_params": 1000, **({"vbmf": True} if vbmf else {"param_ratio": ratio})}
    recipe = {"passes": ["cleanup", {pass_name: options}]}
    return _digits_row("digits_cnn", f"{pass_name} {'vbmf' if vbmf else ratio}", recipe, runs)


def _digits_row(name: str, label: str, recipe: dict, runs, split_layers: bool = False) -> dict:
    model_path = ROOT / "models" / f"{name}.onnx"
    start = time.perf_counter()
    result = onnxcomp.compress(model_path, recipe, calib=DIGITS / "calib.npz", val=DIGITS / "val.npz", latency_runs=0)
    seconds = time.perf_counter() - start
    path = result.save(OUT_DIR / f"{name}.{label.replace(' ', '_')}.onnx", force=True)
    step = result.report["passes"][-1]
    base = result.report["original"]
    fid = result.report["fidelity"]
    x = np.load(DIGITS / "val.npz")["input"]
    lat = _latency(path, model_path, {"input": x[:1]}, {"input": x[:32]}, runs, outputs=None)
    row = {"variant": label, "params": result.report["compressed"]["params"] / base["params"],
           "size": path.stat().st_size / model_path.stat().st_size,
           "macs": (result.report["compressed"]["macs"] or 0) / max(base["macs"] or 1, 1),
           "bs1": lat[0], "bs32": lat[1], "acc": fid["accuracy_compressed"], "acc_fp32": fid["accuracy_original"],
           "cos": fid["cosine"], "split": len(step["touched"]), "s": seconds}
    if split_layers:
        row["faster"] = _would_keep(result.model, step)
    return row


# --- MiniLM ---------------------------------------------------------------------------------------

_MINILM: dict = {}


def minilm_svd(method: str, ratio: float, runs, budget: str = "layer", sequential: bool = False) -> dict:
    """The pass alone (no onnxcomp validation: the fidelity here is the sentence-embedding one)."""
    d = minilm_dir()
    if "ref" not in _MINILM:
        _MINILM["ref"] = embed(d / "minilm.onnx", d / "val.npz")
        _MINILM["feeds"] = peer.latency_feeds()
        _MINILM["model"] = load_model(d / "minilm.onnx")
        _MINILM["calib"] = load_data(d / "calib.npz", _MINILM["model"])
    options = {"method": method, "param_ratio": ratio, "require_speedup": False, "budget": budget, "speed_cache": None,
               **({"sequential": True} if sequential else {})}
    model = _MINILM["model"].clone()
    start = time.perf_counter()
    stats = SvdSplit(options, PassContext(calib=_MINILM["calib"]))(model).stats
    seconds = time.perf_counter() - start
    label = f"{method}{' sequential' if sequential else ''}{' global' if budget == 'global' else ''} {ratio}"
    path = save_model(model, OUT_DIR / f"minilm.{label.replace(' ', '_')}.onnx")
    fid = fidelity(_MINILM["ref"], embed(path, d / "val.npz"))
    bs1, bs32 = _MINILM["feeds"]
    lat = _latency(path, d / "minilm.onnx", bs1, bs32, runs)
    step = stats.to_dict()
    return {"variant": label, "params": count_params(model) / count_params(_MINILM["model"]),
            "size": path.stat().st_size / (d / "minilm.onnx").stat().st_size, "bs1": lat[0], "bs32": lat[1],
            "cos": fid["mean_cosine"], "min_cos": fid["min_cosine"], "top5": fid["top5_agreement"],
            "split": len(step["touched"]), "faster": _would_keep(model, step), "s": seconds}


def speed_table() -> list[str]:
    """The speed check's measurements for MiniLM's shapes at the bench's ratios (split/dense time)."""
    lines = ["### svd_split speed check on MiniLM's weight shapes (split / dense onnxruntime time; < 1 = faster)", "",
             "| out x in | param ratio | rank | 1 row | 32 rows | 256 rows | 4096 rows |", "|---|---|---|---|---|---|---|"]
    for m, n in ((384, 384), (1536, 384), (384, 1536)):
        for ratio in (0.8, 0.5, 0.3):
            k = int(ratio * m * n / (m + n))
            cells = [f"{matmul_split_ratio(m, n, k, rows, cache=None)[0]:.2f}" for rows in (1, 32, 256, 4096)]
            lines.append(f"| {m}x{n} | {ratio} | {k} | " + " | ".join(cells) + " |")
    return lines + [""]


# --- shared ---------------------------------------------------------------------------------------


def _latency(path, ref_path, feed1, feed32, runs, outputs=("sentence_embedding",)) -> tuple[float, float]:
    sess, ref = make_session(path, threads=peer.THREADS), make_session(ref_path, threads=peer.THREADS)
    out = []
    for feed, n in ((feed1, runs[0]), (feed32, runs[1])):
        wall, _, ref_wall, _ = peer.paired_latency(sess, ref, feed, n, outputs=outputs)
        out.append(wall / ref_wall)
    return out[0], out[1]


def _would_keep(model, step: dict) -> str:
    """How many split layers the pass's speed check (rows 1 and 256, cached in memory) would keep."""
    kept = total = 0
    for label, k in step["metrics"].get("ranks", {}).items():
        m, n = _shape(step, label)
        total += 1
        kept += all(matmul_split_ratio(m, n, k, rows, cache=None)[0] < 1.0 for rows in (1, 256))
    return f"{kept}/{total}"


def _shape(step: dict, label: str) -> tuple[int, int]:
    text = next(t for t in step["touched"] if t.startswith(label + ":"))
    m, n = text.split(": ", 1)[1].split(" ", 1)[0].split("x")
    return int(m), int(n)


DIGITS_COLS = [("variant", "{}"), ("params", "{:.3f}"), ("size", "{:.3f}"), ("macs", "{:.3f}"), ("bs1", "{:.2f}"),
               ("bs32", "{:.2f}"), ("acc", "{:.4f}"), ("cos", "{:.4f}"), ("split", "{}"), ("faster", "{}")]
CONV_COLS = [("variant", "{}"), ("params", "{:.3f}"), ("macs", "{:.3f}"), ("bs1", "{:.2f}"), ("bs32", "{:.2f}"),
             ("acc", "{:.4f}"), ("cos", "{:.4f}")]
MINILM_COLS = [("variant", "{}"), ("params", "{:.3f}"), ("size", "{:.3f}"), ("bs1", "{:.2f}"), ("bs32", "{:.2f}"),
               ("cos", "{:.4f}"), ("min_cos", "{:.4f}"), ("top5", "{:.3f}"), ("split", "{}"), ("faster", "{}"),
               ("s", "{:.0f}")]
HEADERS = {"params": "params ×fp32", "size": "file ×fp32", "macs": "MACs ×fp32", "bs1": "latency bs1 ×fp32",
           "bs32": "latency bs32 ×fp32", "acc": "accuracy", "cos": "cosine", "min_cos": "min cosine",
           "top5": "top-5 agree", "split": "layers split", "faster": "speed check keeps", "s": "pass s"}


def _table(title: str, rows: list[dict], cols) -> list[str]:
    lines = [f"### {title}", ""]
    if rows and "acc_fp32" in rows[0]:
        lines += [f"fp32 accuracy {rows[0]['acc_fp32']:.4f}", ""]
    lines.append("| " + " | ".join(HEADERS.get(c, c) for c, _ in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[c]) if c in row else "" for c, fmt in cols) + " |")
        print(lines[-1], flush=True)
    return lines + [""]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


if __name__ == "__main__":
    main()
