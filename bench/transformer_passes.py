"""fuse_transformer and to_fp16 measured: size, CPU latency at batch 1 and 32, fidelity.

Models: the real all-MiniLM-L6-v2 export (bench/minilm/export.py + textdata.py, in the cache;
skipped when absent), the tiny BERT fixture and the digits models. Latency: onnxruntime CPU,
2 threads, median of 20 runs after 5 warm-ups, same feed for every variant. Fidelity: MiniLM —
mean cosine of sentence_embedding vs fp32 and top-5 neighbour agreement on val.npz (500 passages);
other models — onnxcomp's validation (cosine of the first output, accuracy drop with labels).

    python bench/transformer_passes.py [--models minilm,tiny_bert,digits_cnn,digits_mlp]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "minilm"))

from onnxcomp.model import save_model  # noqa: E402
from onnxcomp.pipeline import compress  # noqa: E402

THREADS, WARMUP, RUNS = 2, 5, 20
MINMAX = {"quantize_static": {"method": "minmax"}}
MHA = {"fuse_transformer": {"multi_head_attention": True}}
VARIANTS = {  # name: (passes, transformer models only)
    "fp16": (["to_fp16"], False),
    "fused": (["fuse_transformer"], True),
    "fused_maskindex": ([{"fuse_transformer": {"attention_mask": "mask_index_end"}}], True),
    "fused_mha": ([MHA], True),
    "fused_fp16": (["fuse_transformer", "to_fp16"], True),
    "dyn": (["cleanup", "quantize_dynamic"], True),
    "fused_dyn": (["cleanup", "fuse_transformer", "quantize_dynamic"], True),
    "fused_mha_dyn": (["cleanup", MHA, "quantize_dynamic"], True),
    "static": (["cleanup", MINMAX], True),
    "fused_static": (["cleanup", "fuse_transformer", MINMAX], True),
    "fused_mha_static": (["cleanup", MHA, MINMAX], True),
}


def models():
    from common import cache_dir
    minilm = cache_dir() / "minilm.onnx"
    tiny, digits = ROOT / "models/tiny_bert", ROOT / "models/digits"
    out = {}  # name: (model, val, calib)
    if minilm.exists():
        out["minilm"] = (minilm, minilm.parent / "val.npz", minilm.parent / "calib.npz")
    out["tiny_bert"] = (tiny / "tiny_bert.onnx", tiny / "val.npz", tiny / "calib.npz")
    out["digits_cnn"] = (ROOT / "models/digits_cnn.onnx", digits / "val.npz", digits / "calib.npz")
    out["digits_mlp"] = (ROOT / "models/digits_mlp.onnx", digits / "val.npz", digits / "calib.npz")
    return out


def feeds_all(val_path):
    with np.load(val_path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def feeds(val_path):
    """Feeds of 1 and 32 samples (token inputs trimmed to the batch's longest row)."""
    from fidelity import batches
    data = {k: v for k, v in feeds_all(val_path).items() if k != "label"}
    if "attention_mask" in data:
        return {bs: next(batches(data, bs)) for bs in (1, 32)}
    return {bs: {k: v[:bs] for k, v in data.items()} for bs in (1, 32)}


def latency_ratio(base_path, path, feed):
    """Median ms of ``path`` / median ms of ``base_path``, runs interleaved so that load from
    other processes hits both alike."""
    from fidelity import make_session
    sessions = [make_session(base_path, THREADS), make_session(path, THREADS)]
    times = [[], []]
    for i in range(WARMUP + RUNS):
        for sess, acc in zip(sessions, times):
            t = time.perf_counter()
            sess.run(None, feed)
            if i >= WARMUP:
                acc.append(time.perf_counter() - t)
    base, new = (statistics.median(t) * 1e3 for t in times)
    return new / base, base


def fidelity_of(name, path, val_path, report, ref_emb):
    if name == "minilm":
        from fidelity import embed, fidelity
        f = fidelity(ref_emb, embed(path, val_path))
        return f"cos {f['mean_cosine']:.6f} top5 {f['top5_agreement']:.3f}"
    f = report["fidelity"]
    drop = "" if f["accuracy_drop"] is None else f" acc drop {100 * f['accuracy_drop']:+.2f} pt"
    return f"cos {f['cosine']:.6f} max|err| {f['max_abs_error']:.1e}{drop}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(models()))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    names, variants = args.models.split(","), args.variants.split(",")
    rows = ["| model | variant | size ratio | latency ratio b1 (fp32 ms) | latency ratio b32 (fp32 ms) | fidelity "
            "| fusions |",
            "|---|---|---|---|---|---|---|"]
    for name in names:
        path, val_path, calib_path = models()[name]
        is_bert = "bert" in name or name == "minilm"
        fd = feeds(val_path)
        ref_emb = None
        if name == "minilm":
            from fidelity import embed
            ref_emb = embed(path, val_path)
        for variant in variants:
            passes, bert_only = VARIANTS[variant]
            if bert_only and not is_bert:
                continue
            # MiniLM: the pipeline validates on 32 samples (fast); fidelity below uses all 500
            check = {k: v[:32] for k, v in feeds_all(val_path).items()} if name == "minilm" else val_path
            result = compress(path, {"passes": passes}, calib=calib_path, val=check, latency_runs=0)
            fusions = next((p["metrics"].get("fusions") for p in result.report["passes"]
                            if p["name"] == "fuse_transformer"), None)
            with tempfile.TemporaryDirectory() as tmp:
                out = save_model(result.model, Path(tmp) / f"{variant}.onnx")
                size = out.stat().st_size / path.stat().st_size
                lat = {bs: latency_ratio(path, out, feed) for bs, feed in fd.items()}
                fid = fidelity_of(name, out, val_path, result.report, ref_emb)
            fused = ", ".join(f"{k} {v}" for k, v in (fusions or {}).items()) or "-"
            rows.append(f"| {name} | {variant} | {size:.3f} | {lat[1][0]:.2f} ({lat[1][1]:.1f} ms) "
                        f"| {lat[32][0]:.2f} ({lat[32][1]:.1f} ms) | {fid} | {fused} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
