"""Peak memory of calibration as the number of batches grows: onnxcomp's streaming engine vs
onnxruntime.quantization's calibrator, on the same model and data.

Each measurement runs in a fresh subprocess and reports its peak RSS (ru_maxrss) and
the growth over the RSS just before calibration starts. Run from the repo root:

    python bench/calibration_memory.py [--model models/digits_cnn.onnx] [--batches 4 16 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    r"""
    import json, resource, sys, tempfile, numpy as np
    sys.path.insert(0, {root!r})
    model_path, engine, batches, batch = {model!r}, {engine!r}, {batches}, {batch}
    from onnxcomp.model import load_model
    from onnxcomp.data import Dataset
    model = load_model(model_path)
    spec = model.graph.inputs[0]
    dims = [d if isinstance(d, int) else 1 for d in spec.shape][1:]
    rng = np.random.default_rng(0)
    base = rng.random((batch, *dims), dtype=np.float32)   # one batch reused: data itself costs nothing
    def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = rss()
    if engine == "onnxcomp":
        from onnxcomp.calibrate import Histogram, collect
        class Repeat(Dataset):
            def __len__(self): return batches * batch
            def batches(self, bs=32):
                for _ in range(batches): yield {{spec.name: base}}
        names = [o.name for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul", "Relu") for o in n.outputs]
        collect(model, Repeat({{spec.name: base}}), {{n: [Histogram(2048)] for n in names}})
    else:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
        import onnx_ir as ir
        class Reader(CalibrationDataReader):
            def __init__(self): self.left = batches
            def get_next(self):
                if not self.left: return None
                self.left -= 1
                return {{spec.name: base}}
        with tempfile.TemporaryDirectory() as tmp:
            path = tmp + "/m.onnx"
            ir.save(model, path)
            cal = create_calibrator(path, calibrate_method=CalibrationMethod.Entropy,
                                    augmented_model_path=tmp + "/aug.onnx")
            cal.collect_data(Reader())
            cal.compute_data()
    print(json.dumps({{"before_mb": before, "peak_mb": rss()}}))
    """
)


def measure(model: str, engine: str, batches: int, batch: int) -> dict:
    code = WORKER.format(root=str(ROOT), model=model, engine=engine, batches=batches, batch=batch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "digits_cnn.onnx"))
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(f"model {args.model}, batch {args.batch}; peak RSS growth during calibration (MB)")
    print("| batches | onnxcomp (streaming histograms) | onnxruntime.quantization (Entropy) |")
    print("| ---: | ---: | ---: |")
    for n in args.batches:
        ours = measure(args.model, "onnxcomp", n, args.batch)
        peer = measure(args.model, "ort", n, args.batch)
        print(f"| {n} | {ours['peak_mb'] - ours['before_mb']:.1f} | {peer['peak_mb'] - peer['before_mb']:.1f} |")


if __name__ == "__main__":
    main()
