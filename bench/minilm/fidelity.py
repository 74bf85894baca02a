"""Embedding fidelity of a (compressed) MiniLM ONNX model vs the fp32 export.

    python bench/minilm/fidelity.py [model.onnx ...]   # compare each to <cache>/minilm.onnx on val.npz
"""
import sys

import numpy as np

from common import INPUT_NAMES, cache_dir


def load_npz(npz_path):
    with np.load(npz_path, allow_pickle=False) as z:
        return {k: z[k] for k in INPUT_NAMES}


def batches(data, batch_size):
    """Yield feeds of batch_size rows, each trimmed to its own longest row (dynamic padding, as
    sentence-transformers does). Padding columns would change nothing in fp32 but would widen
    dynamically quantized activation ranges."""
    n = len(data["input_ids"])
    for i in range(0, n, batch_size):
        width = int(data["attention_mask"][i:i + batch_size].sum(1).max())
        yield {k: np.ascontiguousarray(v[i:i + batch_size, :width]) for k, v in data.items()}


def make_session(onnx_path, threads=2, **opts):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in opts.items():
        setattr(so, k, v)
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def embed(onnx_path, npz_path, batch_size=32, session=None):
    """Run onnxruntime over all samples of npz_path; return sentence_embedding [n, 384] float32
    in file order. Like SentenceTransformer.encode(), rows are batched in order of token length
    (stable sort), so batches carry little padding."""
    sess = session or make_session(onnx_path)
    data = load_npz(npz_path)
    order = np.argsort(data["attention_mask"].sum(1), kind="stable")
    data = {k: v[order] for k, v in data.items()}
    out = [sess.run(["sentence_embedding"], feed)[0] for feed in batches(data, batch_size)]
    emb = np.empty((len(order), out[0].shape[1]), np.float32)
    emb[order] = np.concatenate(out)
    return emb


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top_k(emb, k):
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def fidelity(ref_emb, new_emb, k=5):
    """mean/min per-sample cosine, and top-k neighbour agreement (mean |kNN_ref ∩ kNN_new| / k,
    neighbours by cosine among the same samples, self excluded)."""
    r, n = _unit(ref_emb), _unit(new_emb)
    cos = (r * n).sum(1)
    a, b = _top_k(r, k), _top_k(n, k)
    agree = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            f"top{k}_agreement": float(agree)}


def main(paths):
    d = cache_dir()
    ref = embed(d / "minilm.onnx", d / "val.npz")
    for p in paths or [d / "minilm.onnx"]:
        print(p, fidelity(ref, embed(p, d / "val.npz")))


if __name__ == "__main__":
    main(sys.argv[1:])
