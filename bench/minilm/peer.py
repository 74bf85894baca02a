"""Peer baseline: onnxruntime.quantization on minilm.onnx, measured on this machine.

Each variant is quantized in one subprocess (wall time, peak RSS via os.wait4) and evaluated in
another (file size, latency at batch 1 / 32, fidelity on val.npz, kernels in ORT's optimized graph).
Models go to <cache>/peer/; the table goes to bench/minilm/peer_results.md.

    python bench/minilm/peer.py [--only fp32,dyn_pc,...] [--calib-samples 200]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common import cache_dir
from fidelity import batches, embed, fidelity, load_npz, make_session

HERE = Path(__file__).resolve().parent
THREADS, WARMUP, RUNS_BS1, RUNS_BS32 = 2, 5, 50, 20
# all int8 variants run quant_pre_process first (ORT warns without it) unless named *_nopre
VARIANTS = {
    "fp32": "fp32 export (reference)",
    "fp32_ortopt": "fp32 + onnxruntime.transformers optimizer (bert fusions)",
    "dyn_pt": "quantize_dynamic int8, per-tensor",
    "dyn_pc": "quantize_dynamic int8, per-channel",
    "dyn_pc_nopre": "quantize_dynamic int8, per-channel, no quant_pre_process",
    "ortopt_dyn_pc": "bert optimizer + quantize_dynamic int8 per-channel (ORT's BERT recipe)",
    "qdq_minmax": "quantize_static QDQ MinMax, per-channel, U8S8",
    "qdq_minmax_nopre": "quantize_static QDQ MinMax, per-channel, U8S8, no quant_pre_process",
    "qdq_minmax_rr": "quantize_static QDQ MinMax, per-channel, U8S8, reduce_range",
    "qdq_entropy": "quantize_static QDQ Entropy, per-channel, U8S8",
    "qdq_percentile": "quantize_static QDQ Percentile (99.999), per-channel, U8S8",
    "int4": "MatMulNBits 4-bit, block 32, symmetric (accuracy_level default)",
    "int4_acc4": "MatMulNBits 4-bit, block 32, symmetric, accuracy_level=4 (int8 compute)",
}
INT8_OPS = {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
            "QAttention", "MatMulNBits", "QEmbedLayerNormalization", "GatherBlockQuantized"}
FLOAT_MM_OPS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Attention", "MultiHeadAttention"}


def peer_dir():
    d = cache_dir() / "peer"
    d.mkdir(exist_ok=True)
    return d


class NpzReader:
    """CalibrationDataReader over calib.npz: batches of 8, each trimmed to its longest row."""

    def __init__(self, n):
        data = {k: v[:n] for k, v in load_npz(cache_dir() / "calib.npz").items()}
        self.it = iter(list(batches(data, 8)))

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # not needed by quantize_static; present for the interface
        pass


# ---------------------------------------------------------------- quantization (child process)
def quantize(name, out, calib_samples):
    """Produce <out> for variant <name> from <cache>/minilm.onnx."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_dynamic, quantize_static)
    src = str(cache_dir() / "minilm.onnx")
    tmp = peer_dir() / f"{name}.tmp.onnx"
    if name.startswith(("fp32_ortopt", "ortopt")):
        from onnxruntime.transformers.optimizer import optimize_model
        m = optimize_model(src, model_type="bert", num_heads=12, hidden_size=384)
        print("fused:", {k: v for k, v in m.get_fused_operator_statistics().items() if v}, file=sys.stderr)
        m.save_model_to_file(str(out if name == "fp32_ortopt" else tmp))
        src = str(tmp)
        if name == "fp32_ortopt":
            return
    elif not name.endswith("nopre") and not name.startswith("int4"):
        # auto_merge: without it symbolic shape inference gives up on transformers' traced mask
        # subgraph (Flatten/Gather/Reshape) with "Incomplete symbolic shape inference"
        quant_pre_process(src, str(tmp), auto_merge=True)
        src = str(tmp)
    if name.startswith(("dyn", "ortopt")):
        quantize_dynamic(src, str(out), per_channel="pc" in name, weight_type=QuantType.QInt8)
    elif name.startswith("qdq"):
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[name.split("_")[1]]
        quantize_static(src, str(out), NpzReader(calib_samples), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=name.endswith("_rr"),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method)
    elif name.startswith("int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        q = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=True,
                                 accuracy_level=4 if name.endswith("acc4") else None)
        q.process()
        q.model.save_model_to_file(str(out), False)
    tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- evaluation (child process)
def latency(sess, feed, runs):
    for _ in range(WARMUP):
        sess.run(["sentence_embedding"], feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(["sentence_embedding"], feed)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def latency_feeds():
    """batch 1: the first val row of median token length; batch 32: val rows 0-31 (trimmed)."""
    val = load_npz(cache_dir() / "val.npz")
    lens = val["attention_mask"].sum(1)
    i = int(np.argmax(lens == int(np.median(lens))))
    bs1 = next(batches({k: v[i:i + 1] for k, v in val.items()}, 1))
    bs32 = next(batches(val, 32))
    return bs1, bs32


def evaluate(name, path):
    import onnx
    import onnxruntime as ort
    opt_path = peer_dir() / f"{name}.ortopt.onnx"
    make_session(path, THREADS, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 optimized_model_filepath=str(opt_path))
    ops = Counter(n.op_type for n in onnx.load(str(opt_path), load_external_data=False).graph.node)
    for f in opt_path.parent.glob(opt_path.name + "*"):
        f.unlink()
    sess = make_session(path, THREADS)
    bs1, bs32 = latency_feeds()
    emb = embed(path, cache_dir() / "val.npz", 32, session=sess)
    ref_path = peer_dir() / "ref_val_emb.npy"
    if name == "fp32":
        np.save(ref_path, emb)
    fid = fidelity(np.load(ref_path), emb)
    return {"name": name, "size": path.stat().st_size, "lat1": latency(sess, bs1, RUNS_BS1),
            "lat32": latency(sess, bs32, RUNS_BS32), **fid,
            "int8_kernels": sum(v for k, v in ops.items() if k in INT8_OPS or k.startswith("QLinear")),
            "float_mm": sum(v for k, v in ops.items() if k in FLOAT_MM_OPS),
            "ops": dict(sorted(ops.items())), "shapes": [list(bs1["input_ids"].shape),
                                                         list(bs32["input_ids"].shape)]}


# ---------------------------------------------------------------- driver
def run_child(args):
    """Run this script with args in a subprocess; return (stdout, wall s, peak RSS MB)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {args} failed")
    return out, wall, ru.ru_maxrss / 1024


def fmt_table(rows, calib_samples):
    fp = rows["fp32"]
    head = ("| variant | size MB (ratio) | lat bs1 ms (ratio) | lat bs32 ms (ratio) | mean cos | min cos "
            "| top-5 agree | quant time s | quant peak RSS MB | int8 kernels / float MatMul-Gemm-Attention |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for n, r in rows.items():
        q = f"{r['qtime']:.1f} | {r['qrss']:.0f}" if "qtime" in r else "- | -"
        lines.append(
            f"| {n} | {r['size'] / 1e6:.1f} ({r['size'] / fp['size']:.3f}) "
            f"| {r['lat1'] * 1e3:.2f} ({r['lat1'] / fp['lat1']:.2f}) "
            f"| {r['lat32'] * 1e3:.1f} ({r['lat32'] / fp['lat32']:.2f}) "
            f"| {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {r['top5_agreement']:.3f} "
            f"| {q} | {r['int8_kernels']} / {r['float_mm']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(VARIANTS))
    ap.add_argument("--calib-samples", type=int, default=200)
    ap.add_argument("--_quantize", help=argparse.SUPPRESS)
    ap.add_argument("--_evaluate", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._quantize:
        return quantize(a._quantize, peer_dir() / f"{a._quantize}.onnx", a.calib_samples)
    if a._evaluate:
        path = cache_dir() / "minilm.onnx" if a._evaluate == "fp32" else peer_dir() / f"{a._evaluate}.onnx"
        return print(json.dumps(evaluate(a._evaluate, path)))

    names = a.only.split(",") if a.only else list(VARIANTS)
    if "fp32" not in names:
        names.insert(0, "fp32")
    import onnxruntime as ort
    t0, rows = time.perf_counter(), {}
    for n in names:
        r = {}
        if n != "fp32":
            _, r["qtime"], r["qrss"] = run_child(["--_quantize", n, "--calib-samples", str(a.calib_samples)])
        out, r["etime"], r["erss"] = run_child(["--_evaluate", n])
        r.update(json.loads(out.strip().splitlines()[-1]))
        rows[n] = r
        print(f"[{time.perf_counter() - t0:6.0f}s] {n}: " + json.dumps(
            {k: v for k, v in r.items() if k not in ("ops", "name")}), flush=True)

    table = fmt_table(rows, a.calib_samples)
    print(table)
    cmd = "python bench/minilm/peer.py" + "".join(f" {x}" for x in sys.argv[1:])
    r0 = rows["fp32"]
    md = [f"# Peer baseline: onnxruntime.quantization on all-MiniLM-L6-v2\n",
          f"Produced by `{cmd}` (from the repo root, after export.py and textdata.py), "
          f"total {time.perf_counter() - t0:.0f} s.\n",
          f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op_num_threads={THREADS}, "
          f"ORT_ENABLE_ALL; {os.cpu_count()} cores ({cpu_name()}).\n",
          f"- latency: median of {RUNS_BS1} (bs1) / {RUNS_BS32} (bs32) runs after {WARMUP} warm-up; "
          f"bs1 input {r0['shapes'][0]}, bs32 input {r0['shapes'][1]} (val rows, trimmed to longest).",
          "- fidelity: sentence_embedding vs fp32 on val.npz (500 stdlib-docstring passages), batches of 32.",
          f"- static calibration: {a.calib_samples} calib.npz passages, batches of 8.",
          "- quant time / RSS: the quantization subprocess (incl. quant_pre_process / bert optimizer).",
          "- kernels: node counts in ORT's optimized graph (optimized_model_filepath); int8 = "
          + ", ".join(sorted(INT8_OPS)) + ", QLinear*; float = " + ", ".join(sorted(FLOAT_MM_OPS)) + ".\n",
          "| variant | what |", "|---|---|", *[f"| {n} | {VARIANTS[n]} |" for n in rows], "",
          table, "", "## Op histogram of ORT's optimized graph per variant\n"]
    md += [f"- **{n}**: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()) for n, r in rows.items()]
    (HERE / "peer_results.md").write_text("\n".join(md) + "\n")
    print(f"wrote {HERE / 'peer_results.md'}")


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                flags = open("/proc/cpuinfo").read()
                isa = [f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f" {f}" in flags]
                return line.split(":", 1)[1].strip() + ", " + "/".join(isa)
    except OSError:
        pass
    return "unknown cpu"


if __name__ == "__main__":
    main()
