"""Peer baseline: onnxruntime.quantization on minilm.onnx, measured on this machine.

Each variant is quantized in one subprocess (wall time, peak RSS via os.wait4) and evaluated in
another (file size; latency at batch 1 / 32 paired with fp32, i.e. alternating runs of both sessions
so that CPU contention hits both alike; fidelity on val.npz; kernels in ORT's optimized graph).
Models go to <cache>/peer/; the table goes to bench/minilm/peer_results.md.

    python bench/minilm/peer.py [--only dyn_pc,qdq_minmax,...] [--calib-samples 128] [--reuse]

--reuse takes rows already measured (<cache>/peer/results/*.json) instead of re-running them.
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
# int8 variants run quant_pre_process first (ORT recommends it and warns without) unless *_nopre;
# static variants quantize MatMul only unless *_allops (ORT's default op list).
VARIANTS = {
    "fp32": "fp32 export (reference)",
    "fp32_ortopt": "fp32 after onnxruntime.transformers optimizer (bert fusions), no quantization",
    "dyn_pt": "quantize_dynamic, int8 weights, per-tensor",
    "dyn_pc": "quantize_dynamic, int8 weights, per-channel",
    "dyn_pc_nopre": "quantize_dynamic, per-channel, without quant_pre_process",
    "ortopt_dyn_pc": "bert optimizer (Attention/EmbedLayerNorm fusion) + quantize_dynamic per-channel",
    "qdq_minmax_allops": "quantize_static QDQ MinMax, per-channel, U8S8, ORT's default op types",
    "qdq_minmax": "quantize_static QDQ MinMax, per-channel, U8S8, MatMul only",
    "qdq_minmax_nopre": "quantize_static QDQ MinMax, per-channel, U8S8, MatMul only, no pre-process",
    "qdq_minmax_constb": "quantize_static QDQ MinMax, per-channel, U8S8, MatMul with constant B only "
                         "(attention QK^T / PV stay float)",
    "qdq_minmax_noout": "quantize_static QDQ MinMax, per-channel, U8S8, MatMul only, MatMul outputs "
                        "left float (OpTypesToExcludeOutputQuantization)",
    "qdq_minmax_rr": "quantize_static QDQ MinMax, per-channel, U8S8, MatMul only, reduce_range",
    "qdq_entropy": "quantize_static QDQ Entropy, per-channel, U8S8, MatMul only (ORT defaults: 128 bins "
                   "= 128 quantized bins, so the KL search has one candidate and equals MinMax)",
    "qdq_percentile": "quantize_static QDQ Percentile (99.999), per-channel, U8S8, MatMul only",
    "int4": "MatMulNBitsQuantizer 4-bit, block 32, symmetric (accuracy_level unset)",
    "int4_acc4": "MatMulNBitsQuantizer 4-bit, block 32, symmetric, accuracy_level=4 (int8 compute)",
    "int4_hqq": "MatMulNBitsQuantizer 4-bit, block 32, HQQ (data-free; float zero points)",
}
INT8_OPS = {"QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
            "QAttention", "MatMulNBits", "QEmbedLayerNormalization", "GatherBlockQuantized"}
FLOAT_MM_OPS = {"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Attention", "MultiHeadAttention"}


def peer_dir():
    d = cache_dir() / "peer"
    d.mkdir(exist_ok=True)
    return d


def model_path(name):
    return cache_dir() / "minilm.onnx" if name == "fp32" else peer_dir() / f"{name}.onnx"


class NpzReader:
    """CalibrationDataReader over the first n rows of calib.npz, batches of 8, all padded to the
    longest of those n rows: ORT's histogram calibrators (Entropy, Percentile) stack every batch's
    activations with np.asarray and fail ("inhomogeneous shape") on per-batch trimmed widths."""

    def __init__(self, n):
        data = {k: v[:n] for k, v in load_npz(cache_dir() / "calib.npz").items()}
        width = int(data["attention_mask"].sum(1).max())
        data = {k: np.ascontiguousarray(v[:, :width]) for k, v in data.items()}
        self.feeds = [{k: v[i:i + 8] for k, v in data.items()} for i in range(0, n, 8)]
        self.i = 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


# ---------------------------------------------------------------- quantization (child process)
def quantize(name, out, calib_samples):
    """Write variant <name> of <cache>/minilm.onnx to <out>."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_dynamic, quantize_static)
    src, tmp = str(model_path("fp32")), peer_dir() / f"{name}.tmp.onnx"
    if "ortopt" in name:
        from onnxruntime.transformers.optimizer import optimize_model
        m = optimize_model(src, model_type="bert", num_heads=12, hidden_size=384)
        print("bert optimizer fused:", {k: v for k, v in m.get_fused_operator_statistics().items() if v},
              file=sys.stderr)
        if name == "fp32_ortopt":
            return m.save_model_to_file(str(out))
        m.save_model_to_file(str(tmp))
        src = str(tmp)
    elif not name.endswith("nopre") and not name.startswith("int4"):
        # auto_merge: without it symbolic shape inference stops on transformers' traced mask
        # subgraph (Flatten/Gather/Reshape) with "Incomplete symbolic shape inference"
        quant_pre_process(src, str(tmp), auto_merge=True)
        src = str(tmp)
    if name.startswith(("dyn", "ortopt")):
        # DefaultTensorType: ONNX shape inference leaves outputs of the fused contrib ops untyped,
        # and quantize_dynamic then aborts ("Unable to find data type for weight_name=...")
        quantize_dynamic(src, str(out), per_channel="_pc" in name, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    elif name.startswith("qdq"):
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[name.split("_")[1]]
        quantize_static(src, str(out), NpzReader(calib_samples), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=None if name.endswith("allops") else ["MatMul"],
                        per_channel=True, reduce_range=name.endswith("_rr"),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, nodes_to_exclude=act_matmuls(src) if "constb" in name else None,
                        extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]} if "noout" in name else None)
    elif name.startswith("int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        if name.endswith("hqq"):
            from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig
            q = MatMulNBitsQuantizer(onnx.load(src), algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
        else:
            q = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4 if name.endswith("acc4") else None)
        q.process()
        q.model.save_model_to_file(str(out), False)
    tmp.unlink(missing_ok=True)


def act_matmuls(path):
    """Names of MatMuls whose B is not a weight (attention QK^T and PV). Excluded explicitly: the
    QDQ quantizer ignores extra_options MatMulConstBOnly (tried: identical model)."""
    import onnx
    g = onnx.load(path, load_external_data=False).graph
    weights = {i.name for i in g.initializer}
    return [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] not in weights]


# ---------------------------------------------------------------- evaluation (child process)
def paired_latency(sess, ref, feed, runs, outputs=("sentence_embedding",)):
    """Median wall and CPU (process_time, all threads) seconds per run of sess and of ref on feed,
    runs alternating with the order flipped each round. Returns (wall, cpu, ref_wall, ref_cpu).
    outputs: the outputs fetched (None: all)."""
    outputs = None if outputs is None else list(outputs)
    for _ in range(WARMUP):
        sess.run(outputs, feed), ref.run(outputs, feed)
    ts = [[], [], [], []]
    for i in range(runs):
        for j in ((0, 1) if i % 2 else (1, 0)):
            t, c = time.perf_counter(), time.process_time()
            (sess, ref)[j].run(outputs, feed)
            ts[2 * j].append(time.perf_counter() - t)
            ts[2 * j + 1].append(time.process_time() - c)
    return [float(np.median(x)) for x in ts]


def latency_feeds():
    """batch 1: the first val row of median token length; batch 32: the 32 val rows around the
    median length (as in length-sorted batching), trimmed to their longest."""
    val = load_npz(cache_dir() / "val.npz")
    lens = val["attention_mask"].sum(1)
    i = int(np.argmax(lens == int(np.median(lens))))
    order = np.argsort(lens, kind="stable")
    mid = order[len(order) // 2 - 16:len(order) // 2 + 16]
    return (next(batches({k: v[i:i + 1] for k, v in val.items()}, 1)),
            next(batches({k: v[mid] for k, v in val.items()}, 32)))


def evaluate(name):
    import onnx
    import onnxruntime as ort
    path, opt_path = model_path(name), peer_dir() / f"{name}.ortopt.onnx"
    make_session(path, THREADS, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 optimized_model_filepath=str(opt_path))
    ops = Counter(n.op_type for n in onnx.load(str(opt_path), load_external_data=False).graph.node)
    for f in opt_path.parent.glob(opt_path.name + "*"):
        f.unlink()
    sess, ref = make_session(path, THREADS), make_session(model_path("fp32"), THREADS)
    emb = embed(path, cache_dir() / "val.npz", 32, session=sess)
    ref_emb = peer_dir() / "ref_val_emb.npy"
    if name == "fp32":
        np.save(ref_emb, emb)
    bs1, bs32 = latency_feeds()
    l1, c1, rl1, rc1 = paired_latency(sess, ref, bs1, RUNS_BS1)
    l32, c32, rl32, rc32 = paired_latency(sess, ref, bs32, RUNS_BS32)
    return {"size": path.stat().st_size, "lat1": l1, "lat1_ratio": l1 / rl1, "cpu1_ratio": c1 / rc1,
            "lat32": l32, "lat32_ratio": l32 / rl32, "cpu32_ratio": c32 / rc32,
            **fidelity(np.load(ref_emb), emb),
            "int8_kernels": sum(v for k, v in ops.items() if k in INT8_OPS or k.startswith("QLinear")),
            "float_mm": sum(v for k, v in ops.items() if k in FLOAT_MM_OPS), "ops": dict(sorted(ops.items())),
            "shapes": [list(bs1["input_ids"].shape), list(bs32["input_ids"].shape)]}


# ---------------------------------------------------------------- driver
def run_child(args):
    """Run this script with args in a subprocess; return (stdout, wall s, peak RSS MB)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {args} failed")
    return out, time.perf_counter() - t, ru.ru_maxrss / 1024


def table(rows):
    fp = rows["fp32"]["size"]
    out = ["| variant | size MB (ratio) | bs1 ms (ratio) [CPU ratio] | bs32 ms (ratio) [CPU ratio] | mean cos "
           "| min cos | top-5 agree | quant s | quant peak RSS MB | int8 kernels / float MatMul+Gemm+Attention |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in rows.items():
        q = f"{r['qtime']:.1f} | {r['qrss']:.0f}" if "qtime" in r else "- | -"
        out.append(f"| {n} | {r['size'] / 1e6:.1f} ({r['size'] / fp:.3f}) | {r['lat1'] * 1e3:.1f} "
                   f"({r['lat1_ratio']:.2f}) [{r['cpu1_ratio']:.2f}] | {r['lat32'] * 1e3:.0f} "
                   f"({r['lat32_ratio']:.2f}) [{r['cpu32_ratio']:.2f}] "
                   f"| {r['mean_cosine']:.5f} | {r['min_cosine']:.4f} | {r['top5_agreement']:.3f} "
                   f"| {q} | {r['int8_kernels']} / {r['float_mm']} |")
    return "\n".join(out)


def fmt_load(r):
    return "-" if r.get("load") is None else f"{r['load']:.1f}"


def cpu_info():
    txt = open("/proc/cpuinfo").read()
    name = next((l.split(":", 1)[1].strip() for l in txt.splitlines() if l.startswith("model name")), "?")
    isa = [f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f" {f}" in txt]
    fam = {k: next((l.split(":", 1)[1].strip() for l in txt.splitlines()
                    if l.split(":")[0].strip() == k), "?") for k in ("cpu family", "model")}
    vnni = "VNNI" if any("vnni" in f for f in isa) else "no VNNI"
    return f"{os.cpu_count()} cores, {name} (family {fam['cpu family']} model {fam['model']}), {'/'.join(isa)}, {vnni}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(VARIANTS))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--reuse", action="store_true", help="reuse saved per-variant results")
    ap.add_argument("--_quantize", help=argparse.SUPPRESS)
    ap.add_argument("--_evaluate", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._quantize:
        return quantize(a._quantize, model_path(a._quantize), a.calib_samples)
    if a._evaluate:
        return print(json.dumps(evaluate(a._evaluate)))

    names = a.only.split(",") if a.only else list(VARIANTS)
    names = ["fp32"] + [n for n in names if n != "fp32"]
    import onnxruntime as ort
    t0, load0, rows = time.perf_counter(), os.getloadavg()[0], {}
    cmd = " ".join(["python bench/minilm/peer.py", *sys.argv[1:]])
    res_dir = peer_dir() / "results"
    res_dir.mkdir(exist_ok=True)
    for n in names:
        if a.reuse and (res_dir / f"{n}.json").exists():
            rows[n] = json.loads((res_dir / f"{n}.json").read_text())
            print(f"reused {n}")
            continue
        r = {"calib_samples": a.calib_samples, "when": time.strftime("%Y-%m-%d %H:%M"),
             "cmd": cmd, "load": os.getloadavg()[0]}
        try:
            if n != "fp32":
                _, r["qtime"], r["qrss"] = run_child(["--_quantize", n, "--calib-samples",
                                                      str(a.calib_samples)])
            out, r["etime"], r["erss"] = run_child(["--_evaluate", n])
        except RuntimeError as e:
            print(f"{n}: FAILED ({e}); see stderr", flush=True)
            continue
        r.update(json.loads(out.strip().splitlines()[-1]))
        rows[n] = r
        (res_dir / f"{n}.json").write_text(json.dumps(r))
        print(f"[{time.perf_counter() - t0:5.0f}s] {n}: " + json.dumps(
            {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items() if k != "ops"}), flush=True)

    tab = table(rows)
    print(tab)
    r0 = rows["fp32"]
    cmds = sorted({r["cmd"] for r in rows.values()}, key=len)
    md = ["# Peer baseline: onnxruntime.quantization on all-MiniLM-L6-v2\n",
          f"Written by `{cmd}` from the repo root (after export.py and textdata.py); rows measured by "
          + ", ".join(f"`{c}`" for c in cmds) + " (columns 'measured' and 'load': time and 1-min load "
          "average when the row started; other sessions' jobs shared the 2 cores, hence the paired "
          "latency; the fp32 row compares fp32 with itself, so its distance from 1.00 is the noise).\n",
          f"onnxruntime {ort.__version__}, CPUExecutionProvider, ORT_ENABLE_ALL, intra_op_num_threads={THREADS}; "
          f"{cpu_info()}.\n",
          f"- latency: median of {RUNS_BS1} (bs1) / {RUNS_BS32} (bs32) runs after {WARMUP} warm-up, each "
          f"run alternating with a run of the fp32 model in the same process; ratio = variant / that fp32; "
          f"CPU ratio = same with process CPU time (all threads), less sensitive to other load. "
          f"Inputs (val rows, trimmed): bs1 {r0['shapes'][0]}, bs32 {r0['shapes'][1]}.",
          "- fidelity: sentence_embedding vs fp32 on val.npz (500 stdlib-docstring passages), "
          "length-sorted batches of 32.",
          f"- static calibration: first {a.calib_samples} calib.npz passages, batches of 8, padded to "
          "their longest (109 tokens for 128 passages; ORT's histogram calibrators need equal shapes).",
          "- quant s / RSS: the quantization subprocess, incl. quant_pre_process or the bert optimizer.",
          "- kernels: node counts in ORT's optimized graph (optimized_model_filepath); int8 = "
          + ", ".join(sorted(INT8_OPS)) + ", QLinear*; float = " + ", ".join(sorted(FLOAT_MM_OPS)) + ".\n",
          "| variant | what | measured | load |", "|---|---|---|---|",
          *[f"| {n} | {VARIANTS[n]} | {r['when']} | {fmt_load(r)} |" for n, r in rows.items()], "", tab, "",
          "## Op histogram of ORT's optimized graph per variant\n"]
    md += [f"- **{n}**: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()) for n, r in rows.items()]
    (HERE / "peer_results.md").write_text("\n".join(md) + "\n")
    print(f"wrote {HERE / 'peer_results.md'}")


if __name__ == "__main__":
    main()
