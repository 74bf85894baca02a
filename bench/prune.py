"""Pruning measured, one run: fidelity vs sparsity, sparse storage, channel removal speed.

    python bench/prune.py [--models digits_cnn,digits_mlp,minilm] [--quick] [--out bench/prune_results.md]

1. Curves: l1 vs random vs wanda, per layer and global, at 10-90 % unstructured sparsity (after
   `cleanup`, which folds BatchNorm). digits: val accuracy (models/digits/val.npz) and mean
   per-sample logit cosine vs the original; MiniLM: mean sentence-embedding cosine and top-5
   neighbour agreement vs fp32 (bench/minilm/fidelity.py) on the first VAL_MINILM val passages.
   wanda calibrates on the calib file (digits 300 samples, MiniLM calib.npz). random: seed 0.
2. `storage: sparse` at 90 % (l1 per layer): file bytes vs the same model stored dense, both
   loaded in stock onnxruntime, outputs compared.
3. `apply: remove_channels` (ln n=2, dim 0) at 25 / 50 %: parameters, MACs (onnxcomp.report),
   accuracy/fidelity, and latency vs the original at batch 64 — the two sessions run alternately in
   one process (order flipped each round), ratio of medians.
Everything goes through onnxcomp.pipeline.run_passes with recipes as a user writes them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "minilm"))

from common import cache_dir as minilm_dir  # noqa: E402
from fidelity import embed, fidelity  # noqa: E402

from onnxcomp.data import load_data  # noqa: E402
from onnxcomp.passes.base import PassContext  # noqa: E402
from onnxcomp.pipeline import run_passes  # noqa: E402
from onnxcomp.recipe import load_recipe  # noqa: E402
from onnxcomp.report import count_params, estimate_macs  # noqa: E402

THREADS = 2
DIGITS = ROOT / "models" / "digits"
MODELS = {"digits_cnn": ROOT / "models" / "digits_cnn.onnx", "digits_mlp": ROOT / "models" / "digits_mlp.onnx",
          "minilm": minilm_dir() / "minilm.onnx"}
VAL_MINILM = 160


def session(model: ir.Model | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
    src = str(model) if isinstance(model, Path) else ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class Subject:
    """One model with its data and its fidelity measure."""

    def __init__(self, name: str, quick: bool):
        self.name, self.path = name, MODELS[name]
        self.original = ir.load(self.path)
        self.minilm = name == "minilm"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_prune_"))
        if self.minilm:
            n = 48 if quick else VAL_MINILM
            with np.load(self.path.parent / "val.npz") as z:
                self.val = {k: z[k][:n] for k in ("input_ids", "attention_mask", "token_type_ids")}
            np.savez(self.tmp / "val.npz", **self.val)
            self.calib = load_data(self.path.parent / "calib.npz", self.original)
            self.ref = self._embed(self.original)
        else:
            with np.load(DIGITS / "val.npz") as z:
                self.x, self.labels = z["input"], z["label"]
            self.calib = load_data(DIGITS / "calib.npz", self.original)
            self.ref = session(self.original).run(None, {"input": self.x})[0]

    def _embed(self, model: ir.Model) -> np.ndarray:
        path = self.tmp / "m.onnx"
        ir.save(model, path)
        return embed(path, self.tmp / "val.npz", session=session(path))

    def prune(self, *steps) -> tuple[ir.Model, list]:
        model = self.original.clone()
        stats = run_passes(model, load_recipe({"passes": ["cleanup", *steps]}), PassContext(calib=self.calib))
        return model, stats

    def score(self, model: ir.Model) -> dict:
        if self.minilm:
            f = fidelity(self.ref, self._embed(model))
            return {"cosine": f["mean_cosine"], "top5": f["top5_agreement"]}
        out = session(model).run(None, {"input": self.x})[0]
        cos = (out * self.ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(self.ref, axis=1)
        return {"accuracy": float((out.argmax(1) == self.labels).mean()), "cosine": float(cos.mean())}

    def feed(self, batch: int) -> dict:
        if not self.minilm:
            return {"input": self.x[:batch]}
        lens = self.val["attention_mask"].sum(1)
        rows = np.argsort(lens, kind="stable")[:batch] if len(lens) >= batch else np.arange(len(lens))
        width = int(lens[rows].max())
        feed = {k: v[rows, :width] for k, v in self.val.items()}
        reps = -(-batch // len(rows))
        return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:batch]) for k, v in feed.items()}


def paired_latency(a: ort.InferenceSession, b: ort.InferenceSession, feed: dict, runs: int) -> tuple[float, float]:
    """Median seconds of a and of b, run alternately (order flipped every round)."""
    for _ in range(3):
        a.run(None, feed), b.run(None, feed)
    ta, tb = [], []
    for i in range(runs):
        for j in ((0, 1) if i % 2 else (1, 0)):
            start = time.perf_counter()
            (a, b)[j].run(None, feed)
            (ta, tb)[j].append(time.perf_counter() - start)
    return float(np.median(ta)), float(np.median(tb))


def curves(subject: Subject, levels, lines: list[str]) -> dict:
    metric = "cosine"  # fidelity: label-free, continuous (digits accuracy moves in steps of 0.2 %)
    header = "| method | scope | " + " | ".join(f"{int(p * 100)} %" for p in levels) + " |"
    lines += [f"### {subject.name}: {'mean sentence-embedding cosine vs fp32' if subject.minilm else 'val accuracy (logit cosine)'}"
              " vs unstructured sparsity", "", header, "|" + "---|" * (len(levels) + 2)]
    results = {}
    base = subject.score(subject.prune()[0])
    for scope in ("layer", "global"):
        for method in ("random", "l1", "wanda"):
            row = []
            for p in levels:
                model, _ = subject.prune({"prune": {"method": method, "amount": p, "scope": scope, "seed": 0}})
                s = subject.score(model)
                results[(method, scope, p)] = s
                row.append(f"{s['accuracy'] * 100:.1f} ({s['cosine']:.3f})" if not subject.minilm else
                           f"{s['cosine']:.4f} / {s['top5']:.2f}")
                print(subject.name, method, scope, p, s, flush=True)
            lines.append(f"| {method} | {scope} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"Unpruned (after cleanup): {base}. "
                 + ("Cells: mean cosine / top-5 neighbour agreement." if subject.minilm else
                    "Cells: accuracy % (mean logit cosine)."))
    order_ok = {scope: all(results[("wanda", scope, p)][metric] >= results[("l1", scope, p)][metric]
                           >= results[("random", scope, p)][metric] for p in levels) for scope in ("layer", "global")}
    fails = [(scope, int(p * 100)) for scope in ("layer", "global") for p in levels
             if not results[("wanda", scope, p)][metric] >= results[("l1", scope, p)][metric]
             >= results[("random", scope, p)][metric]]
    lines.append(f"Target wanda >= l1 >= random ({metric}) at every sparsity: per layer {order_ok['layer']}, "
                 f"global {order_ok['global']}" + (f"; fails at (scope, %): {fails}" if fails else "") + ".")
    lines.append("")
    return results


def sparse_storage(subject: Subject, lines: list[str]) -> None:
    dense, _ = subject.prune({"prune": {"method": "l1", "amount": 0.9}})
    sparse, stats = subject.prune({"prune": {"method": "l1", "amount": 0.9, "storage": "sparse"}})
    paths = {}
    for tag, model in (("dense", dense), ("sparse", sparse)):
        paths[tag] = subject.tmp / f"{tag}.onnx"
        ir.save(model, paths[tag])
    start = time.perf_counter()
    s_sparse = session(paths["sparse"])
    load_sparse = time.perf_counter() - start
    start = time.perf_counter()
    s_dense = session(paths["dense"])
    load_dense = time.perf_counter() - start
    feed = subject.feed(8)
    same = np.allclose(s_sparse.run(None, feed)[0], s_dense.run(None, feed)[0], rtol=1e-5, atol=1e-6)
    t_sparse, t_dense = paired_latency(s_sparse, s_dense, feed, 30 if subject.minilm else 200)
    orig = MODELS[subject.name].stat().st_size
    size_d, size_s = paths["dense"].stat().st_size, paths["sparse"].stat().st_size
    kept = [n for n in stats[1].notes if "kept dense" in n]
    lines.append(f"| {subject.name} | {orig:,} | {size_d:,} | {size_s:,} | **{size_s / size_d:.3f}** | "
                 f"{load_dense:.2f} / {load_sparse:.2f} | {t_sparse / t_dense:.2f} | {same} | {len(kept)} |")
    print(subject.name, "sparse", size_s / size_d, flush=True)


def channels(subject: Subject, lines: list[str]) -> None:
    batch, runs = 64, (20 if subject.minilm else 300)
    cleaned = subject.prune()[0]
    shapes = {k: v.shape for k, v in subject.feed(1).items()}
    base_macs, base_params = estimate_macs(cleaned, shapes), count_params(cleaned)
    ref_sess = session(cleaned)
    base = subject.score(cleaned)
    for amount in (0.25, 0.5):
        model, stats = subject.prune({"prune": {"method": "ln", "n": 2, "dim": 0, "amount": amount,
                                                "apply": "remove_channels"}}, "cleanup")
        s = subject.score(model)
        t_new, t_ref = paired_latency(session(model), ref_sess, subject.feed(batch), runs)
        macs = estimate_macs(model, shapes)
        groups = len(stats[1].touched)
        skipped = sum(1 for w, _ in stats[1].skipped if w.startswith("group"))
        fid = f"{s['cosine']:.4f}" if subject.minilm else f"{s['accuracy'] * 100:.1f} % ({s['cosine']:.3f})"
        base_fid = f"{base['cosine']:.4f}" if subject.minilm else f"{base['accuracy'] * 100:.1f} %"
        lines.append(f"| {subject.name} | {int(amount * 100)} % | {groups} / {skipped} | "
                     f"{count_params(model) / base_params:.3f} | "
                     f"{(macs / base_macs) if macs and base_macs else float('nan'):.3f} | "
                     f"{t_ref * 1e3:.2f} -> {t_new * 1e3:.2f} | **{t_ref / t_new:.2f}x** | {base_fid} -> {fid} |")
        print(subject.name, "channels", amount, t_ref / t_new, s, flush=True)


def distilled(subject: Subject, lines: list[str]) -> None:
    """remove_channels 50 % then the ``distill`` pass (closed_form engine, teacher = the original)."""
    if subject.minilm:
        return
    for amount in (0.25, 0.5):
        pruned, _ = subject.prune({"prune": {"method": "ln", "n": 2, "dim": 0, "amount": amount,
                                             "apply": "remove_channels"}})
        model, _ = subject.prune({"prune": {"method": "ln", "n": 2, "dim": 0, "amount": amount,
                                            "apply": "remove_channels"}}, {"distill": {"teacher": str(subject.path)}})
        a, b = subject.score(pruned), subject.score(model)
        lines.append(f"| {subject.name} | {int(amount * 100)} % | {a['accuracy'] * 100:.1f} % ({a['cosine']:.3f}) | "
                     f"{b['accuracy'] * 100:.1f} % ({b['cosine']:.3f}) |")
        print(subject.name, "distill", amount, a, b, flush=True)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    return f"{model}; {os.cpu_count()} cores; flags {' '.join(wanted)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,digits_mlp,minilm")
    parser.add_argument("--quick", action="store_true", help="fewer levels and samples (development)")
    parser.add_argument("--out", default=None, help="markdown results (default: print only)")
    parser.add_argument("--sections", default="curves,sparse,channels,distill")
    args = parser.parse_args()
    start = time.time()
    names = [n for n in args.models.split(",") if n != "minilm" or MODELS["minilm"].exists()]
    subjects = [Subject(n, args.quick) for n in names]
    levels = (0.3, 0.6, 0.9) if args.quick else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    lines = ["# Pruning results (bench/prune.py)", "",
             f"Command: `python bench/prune.py --models {args.models}{' --quick' if args.quick else ''}`; "
             f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op_num_threads={THREADS}; "
             f"{cpu_flags()}; 1-min load average at start {os.getloadavg()[0]:.1f} (the machine was shared "
             "with other jobs: latency ratios are paired medians, noise about ±10 %).", "",
             ]
    sections = args.sections.split(",")
    if "curves" in sections:
        lines += ["## Fidelity vs sparsity (unstructured)", ""]
        for subject in subjects:
            curves(subject, [p for p in levels if not subject.minilm or p in (0.1, 0.3, 0.5, 0.7, 0.9) or args.quick],
                   lines)
    if "sparse" in sections:
        lines += ["## Sparse storage at 90 % (l1 per layer)", "",
                  "| model | original B | pruned, dense B | pruned, sparse B | sparse / dense | session load s "
                  "(dense / sparse) | latency sparse/dense | same outputs | tensors kept dense |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for subject in subjects:
            sparse_storage(subject, lines)
    if "channels" in sections:
        lines += ["", "## remove_channels (ln n=2, dim 0), batch 64", "",
                  "| model | amount | groups pruned / skipped | params ×orig | MACs ×orig | latency ms (orig -> pruned) "
                  "| speed-up | accuracy / fidelity (orig -> pruned) |", "|---|---|---|---|---|---|---|---|"]
        for subject in subjects:
            channels(subject, lines)
    if "distill" in sections:
        lines += ["", "## remove_channels then `distill` (closed_form, teacher = the original, calib 300 samples)", "",
                  "| model | amount | val accuracy (logit cosine) pruned | after distill |", "|---|---|---|---|"]
        for subject in subjects:
            distilled(subject, lines)
    lines += ["", f"Wall time {time.time() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
