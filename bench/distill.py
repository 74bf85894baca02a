"""Distillation measured, one run: what the ``distill`` pass gives back after compression.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/distill.py [--models digits_mlp,digits_cnn,minilm]
        [--quick] [--out bench/distill_results.md]

For each model, students made by onnxcomp passes from the `cleanup`-ed original (the teacher):
pruned (global L1, 50 % and 70 %, folded; 70 % also in two rounds with a distill after each),
low-rank (svd_split, whitened, one global budget of 50 % / 25 % of the weight-matrix parameters),
and for the digits CNN `remove_channels` 50 % (the pruning issue's target). Each student is then
distilled towards the original on the calibration data with each engine (``closed_form``: layer-wise
ridge reconstruction + L-BFGS on the classifier; ``torch``: end-to-end Adam), through
``onnxcomp.pipeline.run_passes`` as a recipe would run them. Measured on held-out data:

- digits: accuracy on models/digits/val.npz (497 samples; calibration = calib.npz, 300 samples,
  with labels, alpha 0.5, T 2) and mean per-sample logit cosine vs the teacher;
- all-MiniLM-L6-v2: mean sentence-embedding cosine and top-5 neighbour agreement vs fp32 on the
  500 val passages (bench/minilm/fidelity.py); calibration = the first --minilm-calib passages of
  calib.npz (200; fewer to fit a busy machine: the closed-form solves cost the same, the runs less). There are
  no classes and no labels: the "logits" are the teacher's sentence embeddings (the
  ``sentence_embedding`` output, what users of this model consume and what its fidelity is judged
  by; its MLM head was dropped when it was trained as a sentence encoder), so alpha has no CE term
  and the loss is T²·KL between softmax(embedding / T) — minimised exactly when the student's
  embedding equals the teacher's up to a constant shift; T = 0.05 because the embeddings are unit
  vectors (entries ~0.05), at T = 2 that softmax is flat. The closed-form engine's layer-wise
  reconstruction (every MatMul against the teacher's activation of the same name) is the part that
  does the work there.

"recovered" = (after − student) / (teacher − student) of accuracy (digits) or cosine (MiniLM).
Wall time = the distill pass alone. QAT: int8 per-tensor weights on the digits CNN (quantize_static
per_channel false) as is, and the case built to lose (4 channels of the first Conv ×30, the next
Conv ÷30: the same float function), then distill engine torch with qat.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from onnxcomp.graph import find_layers  # noqa: E402
from onnxcomp.passes.base import PassContext  # noqa: E402
from onnxcomp.pipeline import run_passes  # noqa: E402
from onnxcomp.recipe import load_recipe  # noqa: E402
from onnxcomp.validate import FidelityCheck  # noqa: E402

THREADS = 1
DIGITS = ROOT / "models" / "digits"
MODELS = {"digits_mlp": ROOT / "models" / "digits_mlp.onnx", "digits_cnn": ROOT / "models" / "digits_cnn.onnx",
          "minilm": minilm_dir() / "minilm.onnx"}


def session(model: ir.Model | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
    src = str(model) if isinstance(model, Path) else ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def prune(amount: float) -> dict:
    return {"prune": {"method": "l1", "amount": amount, "scope": "global", "apply": "fold"}}


def svd(ratio: float) -> dict:
    return {"svd_split": {"method": "whitened", "param_ratio": ratio, "budget": "global", "require_speedup": False}}


CHANNELS50 = {"prune": {"method": "ln", "n": 2, "dim": 0, "amount": 0.5, "apply": "remove_channels"}}


class Subject:
    """One teacher with its data, its distill settings and its fidelity measure."""

    def __init__(self, name: str, quick: bool, minilm_calib: int = 200, minilm_epochs: int = 8):
        self.name, self.path = name, MODELS[name]
        self.minilm = name == "minilm"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_distill_"))
        loaded = ir.load(self.path)
        gate = {"output": "sentence_embedding", "mask_input": "auto"} if self.minilm else {}
        self.gate = load_recipe({"passes": ["cleanup"], "gate": gate}).gate
        self.teacher = loaded.clone()
        run_passes(self.teacher, load_recipe({"passes": ["cleanup"]}), PassContext())
        if self.minilm:
            self.distill = {"alpha": 0.0, "temperature": 0.05}
            self.torch = {"epochs": 3 if quick else minilm_epochs, "lr": 2e-5, "batch_size": 16}
            n = 64 if quick else 500
            with np.load(self.path.parent / "val.npz") as z:
                self.val = {k: z[k][:n] for k in ("input_ids", "attention_mask", "token_type_ids")}
            np.savez(self.tmp / "val.npz", **self.val)
            calib = self.path.parent / "calib.npz"
            self.calib = load_data(calib, loaded)
            self.calib = self.calib.head(48 if quick else minilm_calib)
            self.ref = self._embed(self.teacher)
        else:
            self.distill = {"alpha": 0.5, "temperature": 2.0}
            self.torch = {"epochs": 20, "lr": 3e-3}
            with np.load(DIGITS / "val.npz") as z:
                self.x, self.labels = z["input"], z["label"]
            self.calib = load_data(DIGITS / "calib.npz", loaded)
            self.ref = session(self.teacher).run(None, {"input": self.x})[0]
        self.base = self.score(self.teacher)

    def run(self, model: ir.Model, *steps) -> tuple[ir.Model, list]:
        """``steps`` applied to a copy of ``model`` (teacher = self.teacher), with their stats."""
        model = model.clone()
        context = PassContext(calib=self.calib, seed=0, fidelity=FidelityCheck(self.gate), original=self.teacher)
        return model, run_passes(model, load_recipe({"passes": list(steps), "gate": self.gate.model_dump(
            exclude_none=True)}), context)

    def distill_step(self, engine: str, **extra) -> dict:
        options = {"engine": engine, **self.distill, **(self.torch if engine == "torch" else {}), **extra}
        return {"distill": options}

    def _embed(self, model: ir.Model) -> np.ndarray:
        path = self.tmp / "m.onnx"
        ir.save(model, path)
        return embed(path, self.tmp / "val.npz", session=session(path))

    def score(self, model: ir.Model) -> dict:
        if self.minilm:
            f = fidelity(self.ref, self._embed(model))
            return {"main": f["mean_cosine"], "cosine": f["mean_cosine"], "top5": f["top5_agreement"]}
        out = session(model).run(None, {"input": self.x})[0]
        cos = (out * self.ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(self.ref, axis=1)
        acc = float((out.argmax(1) == self.labels).mean())
        return {"main": acc, "accuracy": acc, "cosine": float(cos.mean())}

    def show(self, s: dict) -> str:
        if self.minilm:
            return f"{s['cosine']:.4f} / {s['top5']:.3f}"
        return f"{s['accuracy'] * 100:.1f} % ({s['cosine']:.4f})"


def recovered(base: dict, student: dict, after: dict) -> str:
    """Share of the loss given back: accuracy (when some was lost) and cosine."""
    parts = []
    for key, label in (("accuracy", "acc"), ("cosine", "cos")):
        if key not in student:
            continue
        lost = base[key] - student[key]
        if lost > (1e-9 if key == "accuracy" else 1e-3):  # a cosine loss below 0.001: nothing to recover
            parts.append(f"{label} {(after[key] - student[key]) / lost * 100:.0f} %")
    return " / ".join(parts) or "nothing lost"


def students(subject: Subject) -> list[tuple[str, list]]:
    rows = [("prune 50 % (global L1)", [prune(0.5)]), ("prune 70 % (global L1)", [prune(0.7)]),
            ("low-rank 50 % (svd_split whitened)", [svd(0.5)]), ("low-rank 25 % (svd_split whitened)", [svd(0.25)])]
    if subject.minilm:
        rows = [rows[0], rows[2]]
    if subject.name == "digits_cnn":
        rows.append(("remove_channels 50 % (ln n=2)", [CHANNELS50, "cleanup"]))
    return rows


def table(subject: Subject, engines: list[str], lines: list[str]) -> None:
    for label, steps in students(subject):
        student, _ = subject.run(subject.teacher, *steps)
        s = subject.score(student)
        cells = [subject.name, label, subject.show(subject.base), subject.show(s)]
        for engine in engines:
            start = time.perf_counter()
            model, stats = subject.run(student, subject.distill_step(engine))
            seconds = time.perf_counter() - start
            a = subject.score(model)
            note = " (kept)" if not stats[-1].touched else ""
            cells += [f"{subject.show(a)}{note}", recovered(subject.base, s, a), f"{seconds:.1f}"]
            print(subject.name, label, engine, s, a, f"{seconds:.1f}s", stats[-1].notes, flush=True)
        lines.append("| " + " | ".join(cells) + " |")
    if subject.minilm:
        return
    # iterative: 70 % in two rounds (50 % then 40 % of the rest), distill (closed_form) after each
    start = time.perf_counter()
    model, stats = subject.run(subject.teacher, prune(0.5), subject.distill_step("closed_form"), prune(0.4),
                               subject.distill_step("closed_form"))
    seconds = time.perf_counter() - start
    a = subject.score(model)
    one, _ = subject.run(subject.teacher, prune(0.7))
    s = subject.score(one)
    lines.append(f"| {subject.name} | prune 70 % in two rounds (50 % / 40 % of the rest), closed_form after each "
                 f"| {subject.show(subject.base)} | {subject.show(s)} (one shot) | {subject.show(a)} | "
                 f"{recovered(subject.base, s, a)} | {seconds:.1f} (all four passes) |" +
                 " – | – | – |" * (len(engines) - 1))
    print(subject.name, "iterative", a, f"{seconds:.1f}s", flush=True)


def qat(subject: Subject, lines: list[str]) -> None:
    """Per-tensor int8 CNN, as is and with the channels built to lose, before/after qat."""
    for label, scaled in (("per-tensor int8", False), ("per-tensor int8, 4 channels x30 (built to lose)", True)):
        floats = subject.teacher.clone()
        if scaled:
            first, second = find_layers(floats.graph)[0][:2]
            scale = np.ones(first.out_features, np.float32)
            scale[:4] = 30.0
            w1, b1, w2 = first.weight(), first.bias(), second.weight()
            first.set_weight(w1 * scale[:, None, None, None])
            first.set_bias(b1 * scale)
            second.set_weight(w2 / scale[None, :, None, None])
        int8, _ = subject.run(floats, {"quantize_static": {"per_channel": False}})
        s = subject.score(int8)
        start = time.perf_counter()
        model, stats = subject.run(int8, subject.distill_step("torch", qat=True))
        seconds = time.perf_counter() - start
        a = subject.score(model)
        from onnxcomp.fusion import fusion_report

        fused = fusion_report(model)["fused_ratio"]
        lines.append(f"| {subject.name} | {label} | {subject.show(subject.base)} | {subject.show(s)} | "
                     f"{subject.show(a)} | {recovered(subject.base, s, a)} | {seconds:.1f} | "
                     f"{fused:.2f} |")
        print(subject.name, label, s, a, f"{seconds:.1f}s", stats[-1].notes, flush=True)


def regularizers(subject: Subject, lines: list[str]) -> None:
    """distill engine torch on the teacher itself (alpha 0: only the KL to the teacher) with an l1 or
    nuclear penalty, then the next compression step: what the penalty buys at that step."""
    plain_svd = {"svd_split": {"method": "plain", "param_ratio": 0.25, "require_speedup": False}}
    for label, penalty in (("none", {}), ("l1 0.1", {"l1": 0.1}), ("l1 1", {"l1": 1.0}),
                           ("nuclear 0.1", {"nuclear": 0.1}), ("nuclear 1", {"nuclear": 1.0})):
        start = time.perf_counter()
        model = subject.run(subject.teacher, subject.distill_step("torch", alpha=0.0, **penalty))[0] \
            if penalty else subject.teacher
        seconds = time.perf_counter() - start
        cells = [subject.name, label, subject.show(subject.score(model))]
        for step in (prune(0.7), prune(0.9), plain_svd):
            cells.append(subject.show(subject.score(subject.run(model, step)[0])))
        lines.append("| " + " | ".join(cells) + f" | {seconds:.1f} |")
        print(subject.name, "regularizer", label, cells, flush=True)


def cpu_line() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}; {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_mlp,digits_cnn,minilm")
    parser.add_argument("--engines", default="closed_form,torch")
    parser.add_argument("--quick", action="store_true", help="fewer samples and epochs (development)")
    parser.add_argument("--out", default=None, help="markdown results (default: print only)")
    parser.add_argument("--sections", default="students,qat,regularizers")
    parser.add_argument("--minilm-calib", type=int, default=200, help="MiniLM calibration passages (of 200)")
    parser.add_argument("--minilm-epochs", type=int, default=8, help="MiniLM torch engine epochs")
    args = parser.parse_args()
    start = time.time()
    engines = args.engines.split(",")
    if "torch" in engines:
        import torch  # noqa: F401  (imported once here: the first torch row's wall time leaves it out)
    names = [n for n in args.models.split(",") if n != "minilm" or MODELS["minilm"].exists()]
    lines = ["# Distillation results (bench/distill.py)", "",
             f"Command: `OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/distill.py --models {args.models}"
             f"{' --quick' if args.quick else ''} --minilm-calib {args.minilm_calib} --minilm-epochs "
             f"{args.minilm_epochs}`; onnxruntime {ort.__version__} (1 thread); {cpu_line()}; "
             f"1-min load average at start {os.getloadavg()[0]:.1f} (machine shared with other jobs: wall times "
             "are indicative).", "",
             "Teacher = the original after `cleanup`. digits: val accuracy (logit cosine vs the teacher); "
             "MiniLM: sentence-embedding cosine / top-5 neighbour agreement vs the teacher on 500 val passages. "
             "recovered = share of what compression lost that distillation gave back (accuracy when the student "
             "lost some, and cosine); above 100 %: better than the teacher. Wall time: the distill "
             "pass alone, seconds. \"(kept)\": the engine found no improvement on its held-out part and left the "
             "student unchanged.", "",
             ]
    sections = args.sections.split(",")
    if "students" in sections:
        lines += ["| model | student | teacher | student | " + " | ".join(
                  f"+ {e} | recovered | {e} s" for e in engines) + " |",
                  "|---|---|---|---|" + "---|---|---|" * len(engines)]
    subjects = {}
    for name in names:
        subjects[name] = subject = Subject(name, args.quick, args.minilm_calib, args.minilm_epochs)
        if "students" in sections:
            table(subject, engines, lines)
    if "digits_cnn" in subjects and "torch" in engines and "qat" in sections:
        lines += ["", "## Quantization-aware training (distill engine torch, qat: true)", "",
                  "| model | student | teacher | int8 | + qat | recovered | qat s | fused ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        qat(subjects["digits_cnn"], lines)
    if "regularizers" in sections and "torch" in engines:
        lines += ["", "## Regularizers for the next step (distill engine torch on the teacher, alpha 0, "
                  "20 epochs, lr 3e-3)", "",
                  "Then global L1 prune 70 % / 90 % (folded), or plain svd_split of every MatMul/Gemm to 25 % "
                  "of its parameters. The held-out criterion is the loss plus the penalty.", "",
                  "| model | penalty | regularized | then prune 70 % | then prune 90 % | then svd_split 25 % | "
                  "torch s |", "|---|---|---|---|---|---|---|"]
        for subject in subjects.values():
            if not subject.minilm:
                regularizers(subject, lines)
    lines += ["", f"Total bench time {time.time() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    for subject in subjects.values():
        shutil.rmtree(subject.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
