"""Build the tiny BERT test fixture: all-MiniLM-L6-v2's architecture, shrunk, with RANDOM weights.

Run from the repo root (needs torch==2.13.0 and transformers):  python models/tiny_bert/make_tiny_bert.py
Re-creates, deterministically (byte-identical on re-run with the same Python/torch/transformers):
  models/tiny_bert/tiny_bert.onnx, models/tiny_bert/calib.npz, models/tiny_bert/val.npz

The model is a structural fixture, not a useful encoder: a transformers ``BertModel`` (eager
attention, GELU, post-LayerNorm, absolute positions — MiniLM's layout) with seeded random
weights, plus sentence-transformers' mean pooling and L2 normalisation in the graph. It is
exported by the very module, opset and exporter settings of the real MiniLM export
(bench/minilm/export.py: classic exporter, dynamo=False), so the graph patterns that
onnxruntime.transformers fuses are the same. Accuracy on real text is measured on the real
MiniLM in the benchmark, never on this model.

Data: real English passages (Python stdlib docstrings, bench/minilm/textdata.py's corpus),
split into lower-case words and hashed (crc32) into the tiny vocabulary — the ids follow
real word statistics, but the "tokenizer" is a hash, not WordPiece.
"""

import sys
import zlib
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent
ROOT = OUT.parent.parent
sys.path.insert(0, str(ROOT / "bench" / "minilm"))

from common import INPUT_NAMES  # noqa: E402  (bench/minilm is a script folder, not a package)
from export import OPSET, MiniLMWithPooling  # noqa: E402
from textdata import build_corpus  # noqa: E402

SEED = 0
ARCH = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
            hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
PAD, CLS, SEP, FIRST_WORD = 0, 1, 2, 3
MAX_LEN, N_CALIB, N_VAL = 32, 64, 128
WORD = r"[a-z]+|[0-9]+|[^\sa-z0-9]"


def build_model():
    """Seeded BertModel (MiniLM layout, tiny) + pooling. Biases and LayerNorm parameters get
    seeded noise too, so no parameter is a trivial 0/1 that a pass could special-case."""
    from transformers import BertConfig, BertModel, logging
    logging.set_verbosity_error()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    config = BertConfig(**ARCH, initializer_range=0.05)
    bert = BertModel(config, add_pooling_layer=False)
    bert.config._attn_implementation = "eager"  # same attention graph as the real export
    with torch.no_grad():
        for name, p in bert.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02)
            elif "LayerNorm.weight" in name:
                p.normal_(1.0, 0.1)
    return MiniLMWithPooling(bert.eval()).eval()


def tokenize(texts):
    """Hash words into the tiny vocabulary: [CLS] w1 .. wn [SEP], padded to the set's longest."""
    import re
    rows = []
    for text in texts:
        words = re.findall(WORD, text.lower())[: MAX_LEN - 2]
        ids = [FIRST_WORD + zlib.crc32(w.encode()) % (ARCH["vocab_size"] - FIRST_WORD) for w in words]
        rows.append([CLS, *ids, SEP])
    width = max(map(len, rows))
    arrays = {k: np.zeros((len(rows), width), np.int64) for k in INPUT_NAMES}
    for i, row in enumerate(rows):
        arrays["input_ids"][i, : len(row)] = row
        arrays["attention_mask"][i, : len(row)] = 1
    return arrays


def export(model, path, example):
    args = tuple(torch.from_numpy(example[k]) for k in INPUT_NAMES)
    dyn = {n: {0: "batch", 1: "seq"} for n in INPUT_NAMES}
    dyn["last_hidden_state"] = {0: "batch", 1: "seq"}
    dyn["sentence_embedding"] = {0: "batch"}
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), input_names=INPUT_NAMES,
                          output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def check(model, path, data):
    """onnxruntime output == torch output on the validation set."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hid, emb = sess.run(None, data)
    with torch.no_grad():
        ref_hid, ref_emb = model(*(torch.from_numpy(data[k]) for k in INPUT_NAMES))
    err = max(np.abs(hid - ref_hid.numpy()).max(), np.abs(emb - ref_emb.numpy()).max())
    print(f"onnxruntime vs torch on val: max|diff| {err:.2e}")
    if err > 1e-4:
        sys.exit("FAIL: the ONNX export does not match torch")


def main():
    corpus = build_corpus()
    sets = {"calib": tokenize(corpus[:N_CALIB]), "val": tokenize(corpus[N_CALIB:N_CALIB + N_VAL])}
    for name, arrays in sets.items():
        np.savez_compressed(OUT / f"{name}.npz", **arrays)
        lens = arrays["attention_mask"].sum(1)
        print(f"{name}.npz: {len(lens)} passages, tokens {lens.min()}-{lens.max()}")
    model = build_model()
    path = OUT / "tiny_bert.onnx"
    export(model, path, {k: v[:2] for k, v in sets["val"].items()})
    check(model, path, sets["val"])
    import onnx
    from collections import Counter
    g = onnx.load(str(path)).graph
    print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB, ops {dict(sorted(Counter(n.op_type for n in g.node).items()))}")


if __name__ == "__main__":
    main()
