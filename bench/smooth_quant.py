"""Does smooth_quant / equalize pay off before int8? Side by side, one run.

    python bench/smooth_quant.py [--digits] [--minilm] [--quantizers ort,ours]

For each model: the float model, then smooth_quant (α 0.5, α auto) and/or equalize, each
followed by int8 static QDQ (MinMax, per-channel weights, uint8 activations) from
onnxruntime.quantization.quantize_static (MatMul only on MiniLM, as bench/minilm/peer.py's
qdq_minmax; ORT's default op list on digits) and from our quantize_static (also MatMul only on
MiniLM: every other op type excluded). Nodes that
smooth_quant inserted (tagged) are left in float by both quantizers.
Metrics: digits — val accuracy (497 samples); MiniLM — sentence-embedding mean/min cosine
vs fp32 and top-5 neighbour agreement on val.npz (bench/minilm/fidelity.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "minilm"))

from onnxcomp.data import load_data  # noqa: E402
from onnxcomp.model import load_model, save_model  # noqa: E402
from onnxcomp.passes.base import PassContext  # noqa: E402
from onnxcomp.passes.quantize.equalize import equalize_model  # noqa: E402
from onnxcomp.passes.quantize.smooth_quant import SMOOTH_QUANT_TAG, smooth_quant_model  # noqa: E402
from onnxcomp.registry import get_pass  # noqa: E402

DIGITS = {"prep": ["cleanup"], "variants": {
    "float": [], "equalize": ["equalize"], "smooth α0.5": ["smooth"], "smooth auto": ["smooth_auto"],
    "equalize + smooth auto": ["equalize", "smooth_auto"]}}
MINILM = {"prep": [], "variants": {"float": [], "smooth α0.5": ["smooth"], "smooth auto": ["smooth_auto"]}}


def prepare(model_path: Path, calib, steps: list[str], prep: list[str]):
    model = load_model(model_path)
    for name in prep:
        get_pass(name)(None, PassContext())(model)
    data = load_data(calib, model)
    for step in steps:
        if step == "equalize":
            equalize_model(model)
        else:
            smooth_quant_model(model, data, alpha="auto" if step == "smooth_auto" else 0.5)
    return model


def ort_int8(src: Path, dst: Path, reader, matmul_only: bool) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = onnx.load(str(src), load_external_data=False).graph
    keep_float = [n.name for n in graph.node if any(p.key == SMOOTH_QUANT_TAG for p in n.metadata_props)]
    quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
                    op_types_to_quantize=["MatMul"] if matmul_only else None)


def ours_int8(model, calib, dst: Path, matmul_only: bool) -> None:
    from onnxcomp.passes.quantize.static import (
        QuantizeStaticConfig,
        quantize_static_model,
    )

    keep_float = tuple(n.name for n in model.graph if SMOOTH_QUANT_TAG in n.metadata_props)
    other_ops = tuple({n.op_type for n in model.graph} - {"MatMul"}) if matmul_only else ()
    quantize_static_model(model, calib, QuantizeStaticConfig(exclude=(*keep_float, *other_ops)))
    save_model(model, dst)


def run(name: str, spec: dict, model_path: Path, calib_path: Path, reader, score, quantizers, matmul_only):
    print(f"\n## {name}\n\n| variant | float | " + " | ".join(f"int8 {q}" for q in quantizers) + " | prep s |")
    print("|---|---|" + "---|" * len(quantizers) + "---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label, steps in spec["variants"].items():
            start = time.perf_counter()
            model = prepare(model_path, calib_path, steps, spec["prep"])
            seconds = time.perf_counter() - start
            src = Path(tmp) / "float.onnx"
            save_model(model, src)
            cells = [score(src)]
            for q in quantizers:
                dst = Path(tmp) / f"{q}.onnx"
                if q == "ort":
                    ort_int8(src, dst, reader(), matmul_only)
                else:
                    ours_int8(load_model(src), load_data(calib_path, model), dst, matmul_only)
                cells.append(score(dst))
            print(f"| {label} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)


def digits(quantizers):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader

    calib, val = ROOT / "models/digits/calib.npz", np.load(ROOT / "models/digits/val.npz")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(np.array_split(np.load(calib)["input"], 10))

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {"input": batch}

    def logits(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": val["input"]})[0].astype(np.float64)

    print("\ndigits cells: val accuracy / relative logit error ‖l − l_fp32‖ / ‖l_fp32‖")
    for model in ("digits_cnn", "digits_mlp"):
        reference = logits(ROOT / f"models/{model}.onnx")

        def score(path):
            out = logits(path)
            error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
            return f"{100 * np.mean(out.argmax(1) == val['label']):.2f} % / {error:.4f}"

        run(model, DIGITS, ROOT / f"models/{model}.onnx", calib, Reader, score, quantizers, False)


def minilm(quantizers):
    from common import cache_dir
    from fidelity import batches, embed, fidelity, load_npz
    from onnxruntime.quantization import CalibrationDataReader

    folder = cache_dir()
    reference = embed(folder / "minilm.onnx", folder / "val.npz")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = batches(load_npz(folder / "calib.npz"), 8)

        def get_next(self):
            return next(self.it, None)

    def score(path):
        f = fidelity(reference, embed(path, folder / "val.npz"))
        return f"{f['mean_cosine']:.4f} / {f['min_cosine']:.3f} / {f['top5_agreement']:.3f}"

    print("\nMiniLM cells: mean cosine / min cosine / top-5 agreement vs fp32")
    run("all-MiniLM-L6-v2", MINILM, folder / "minilm.onnx", folder / "calib.npz", Reader, score, quantizers, True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", action="store_true")
    parser.add_argument("--minilm", action="store_true")
    parser.add_argument("--quantizers", default="ort,ours")
    args = parser.parse_args()
    chosen = args.quantizers.split(",")
    if args.digits or not args.minilm:
        digits(chosen)
    if args.minilm or not args.digits:
        minilm(chosen)
