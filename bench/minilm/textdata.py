"""Build an offline English corpus from Python stdlib docstrings and tokenize it for MiniLM.

Passages (10-60 words) are cut from docstrings of a fixed list of stdlib modules, deduplicated and
shuffled with a fixed seed. Writes into the cache folder:
  calib.npz (200 passages), val.npz (500 other passages), val_texts.json, calib_texts.json
Each .npz holds int64 input_ids / attention_mask / token_type_ids [n, L], where L is the longest
sequence of that set (<= 128): padding to the set's longest keeps files small and loses nothing,
since fidelity.embed() trims every batch to its own longest row anyway.

    python bench/minilm/textdata.py
"""
import importlib
import inspect
import json
import random
import re
import sys
import warnings

import numpy as np

from common import INPUT_NAMES, cache_dir, model_dir

MODULES = """builtins os os.path sys re json collections itertools functools inspect pathlib string
textwrap datetime time random statistics math decimal fractions heapq bisect argparse logging
subprocess threading queue asyncio socket email.message http.client urllib.parse urllib.request csv
zipfile tarfile shutil tempfile io codecs unittest doctest pickle copy pprint enum dataclasses typing
contextlib abc operator hashlib hmac base64 struct array difflib fnmatch glob gzip sqlite3
xml.etree.ElementTree html.parser configparser calendar locale gettext platform traceback warnings
weakref ssl uuid secrets ipaddress selectors signal multiprocessing concurrent.futures importlib pydoc
shlex sched smtplib ftplib mailbox mimetypes wave zlib bz2 lzma tokenize ast dis pdb profile timeit
trace cmd code codeop numbers cmath graphlib zoneinfo""".split()
N_CALIB, N_VAL, SEED, MAX_LEN = 200, 500, 0, 128
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def docstrings():
    """Yield docstrings of the listed modules and their public functions, classes and methods."""
    warnings.simplefilter("ignore", DeprecationWarning)  # e.g. typing.re on attribute access
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # e.g. a distro that splits out sqlite3/ssl: skipped, corpus shrinks a bit
            continue
        yield mod.__doc__
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) not in (modname, mod.__name__):
                continue
            yield getattr(obj, "__doc__", None)
            if inspect.isclass(obj):
                for mname, meth in sorted(vars(obj).items()):
                    if not mname.startswith("_") and callable(meth):
                        yield getattr(meth, "__doc__", None)


def is_prose(text):
    """Reject code-like text: needs mostly alphabetic words and no doctest/markup leftovers."""
    words = text.split()
    alpha = sum(w.strip(".,;:()'\"!?").isalpha() for w in words)
    return alpha >= 0.75 * len(words) and not re.search(r">>>|::|\{|\}|=|\|\||__|\t", text)


def passages(doc):
    """Split one docstring into prose passages of 10-60 words (paragraphs, long ones cut at sentences)."""
    out = []
    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = para.splitlines()
        if not lines or any(l.startswith((" ", "\t", ">>>", "...")) for l in lines):
            continue  # indented blocks are code samples / argument tables
        chunk = []
        for sent in _SENT.split(" ".join(l.strip() for l in lines)):
            if chunk and len(" ".join(chunk + [sent]).split()) > 60:
                out.append(" ".join(chunk))
                chunk = []
            chunk.append(sent)
        if chunk:
            out.append(" ".join(chunk))
    return [p for p in out if 10 <= len(p.split()) <= 60 and is_prose(p)]


def build_corpus():
    """All unique passages, deterministic order (fixed module list, sorted members, seeded shuffle)."""
    seen, corpus = set(), []
    for doc in docstrings():
        if not isinstance(doc, str):
            continue
        for p in passages(doc):
            key = " ".join(p.lower().split())
            if key not in seen:
                seen.add(key)
                corpus.append(p)
    random.Random(SEED).shuffle(corpus)
    return corpus


def tokenize(texts, tok):
    """Tokenize to int64 arrays padded to the longest row of this set (<= MAX_LEN)."""
    enc = tok.encode_batch(texts)
    n = max(len(e.ids) for e in enc)
    arr = {k: np.zeros((len(texts), n), np.int64) for k in INPUT_NAMES}
    for i, e in enumerate(enc):
        arr["input_ids"][i, :len(e.ids)] = e.ids
        arr["attention_mask"][i, :len(e.ids)] = e.attention_mask
        arr["token_type_ids"][i, :len(e.ids)] = e.type_ids
    return arr


def load_tokenizer():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_LEN)
    tok.no_padding()
    return tok


def main():
    corpus = build_corpus()
    need = N_CALIB + N_VAL
    print(f"python {sys.version.split()[0]}: {len(corpus)} unique passages from {len(MODULES)} modules")
    if len(corpus) < need:
        sys.exit(f"need {need} passages, got {len(corpus)}")
    sets = {"calib": corpus[:N_CALIB], "val": corpus[N_CALIB:need]}
    tok, out = load_tokenizer(), cache_dir()
    for name, texts in sets.items():
        arr = tokenize(texts, tok)
        np.savez_compressed(out / f"{name}.npz", **arr)
        with open(out / f"{name}_texts.json", "w") as f:
            json.dump(texts, f, indent=0, ensure_ascii=False)
        lens = arr["attention_mask"].sum(1)
        words = [len(t.split()) for t in texts]
        print(f"{name}: {len(texts)} passages, words {min(words)}-{max(words)} (mean {np.mean(words):.0f}), "
              f"tokens {lens.min()}-{lens.max()} (mean {lens.mean():.0f}), {sum(lens == MAX_LEN)} truncated "
              f"-> {out / (name + '.npz')} ({(out / (name + '.npz')).stat().st_size / 1e3:.0f} kB)")
    print("examples:", *sets["val"][:3], sep="\n  ")


if __name__ == "__main__":
    main()
