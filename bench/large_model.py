"""A > 2 GB model through onnxcomp: wall time and peak RSS against the model's size.

Builds a stack of MatMuls (``--layers`` x [dim, dim] float32 weights, default 40 x 4096^2 =
2.68 GB) as an ONNX model with external data, written layer by layer so the builder never
holds the whole model, then runs each recipe in a fresh ``onnxcomp run`` process saving
with ``--external-data`` and reads that process's peak RSS from ``wait4``. Target: peak
RSS <= 1.5x the model's size. Everything lives in one temporary folder, deleted at the end.

    python bench/large_model.py                 # the default > 2 GB model
    python bench/large_model.py --layers 4      # a quick smoke run (268 MB)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

RECIPES = {
    # no gate: 40 random layers in int4 compound their error (cosine ~0.8); the bench measures memory/time
    "quantize_weights": "passes:\n  - quantize_weights: {bits: 4, block_size: 32}\n",
    "int8-dynamic": "int8-dynamic",
    "prune": "passes:\n  - prune: {method: l1, amount: 0.5, scope: global}\n",
    "svd_split": "passes:\n  - svd_split: {method: plain, param_ratio: 0.5, require_speedup: false}\n",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--keep", help="build in this folder and keep it (default: a temp folder, deleted)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="onnxcomp-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        model = build(work, args.layers, args.dim, args.samples)
        size = model.stat().st_size + (work / "big.onnx.data").stat().st_size
        print(f"built {model} in {time.perf_counter() - start:.1f} s: {size / 1e9:.2f} GB "
              f"({args.layers} MatMuls of [{args.dim}, {args.dim}] float32, external data)")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f} (shared)")
        rows = []
        for name in args.recipes:
            recipe = RECIPES[name]
            if "\n" in recipe:
                path = work / f"{name}.yaml"
                path.write_text(recipe)
                recipe = str(path)
            out = work / f"out.{name}.onnx"
            seconds, peak, code, err = run([sys.executable, "-m", "onnxcomp.cli", "run", recipe, "-m", str(model),
                                            "-o", str(out), "--external-data", "--val", str(work / "val.npz"),
                                            "--latency-runs", "3", "--report", str(work / f"{name}.json")])
            written = sum(p.stat().st_size for p in work.glob(f"out.{name}.onnx*"))
            report = work / f"{name}.json"
            cosine = json.loads(report.read_text())["fidelity"]["cosine"] if report.exists() else None
            rows.append((name, code, seconds, peak, written, cosine))
            print(f"{name}: exit {code}, {seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x the "
                  f"model, output {written / 1e9:.2f} GB, cosine {cosine}"
                  + (f"\n  {err.strip()[-500:]}" if code else ""), flush=True)
            for p in work.glob(f"out.{name}.onnx*"):
                p.unlink()
        print("\n| recipe | exit | wall s | peak RSS GB | peak / model size | output GB | cosine |")
        print("|---|---|---|---|---|---|---|")
        for name, code, seconds, peak, written, cosine in rows:
            print(f"| {name} | {code} | {seconds:.1f} | {peak / 1e9:.2f} | {peak / size:.2f} | {written / 1e9:.2f} "
                  f"| {cosine if cosine is None else round(cosine, 5)} |")
        print(f"\nmodel: {size / 1e9:.2f} GB; target peak / size <= 1.5")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def build(folder: Path, layers: int, dim: int, samples: int) -> Path:
    """x -> MatMul(W_0) -> ... -> MatMul(W_{n-1}) -> y, weights N(0, 1/dim) streamed to big.onnx.data."""
    rng = np.random.default_rng(0)
    data_name = "big.onnx.data"
    initializers, nodes = [], []
    offset = 0
    with open(folder / data_name, "wb") as handle:
        for i in range(layers):
            weight = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
            raw = weight.tobytes()
            handle.write(raw)
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                                          ["y" if i == layers - 1 else f"h{i + 1}"], name=f"matmul{i}"))
            del weight, raw
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dim])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "big.onnx"
    onnx.save(model, path)  # the tensors only point at big.onnx.data
    np.savez(folder / "val.npz", x=rng.standard_normal((samples, dim), dtype=np.float32))
    return path


def run(cmd: list[str]) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes of the process, exit code, stderr)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return seconds, usage.ru_maxrss * 1024, proc.returncode, text


if __name__ == "__main__":
    main()
