"""The pass catalog: every registered pass with its summary and options, as plain data.

``onnxcomp passes`` prints it. Building it imports every pass module (and so onnx, onnx-ir,
onnxruntime: seconds), so it is cached as JSON under ``$XDG_CACHE_HOME/onnxcomp`` (default
``~/.cache/onnxcomp``), keyed by the onnxcomp version and the size and modification time of
every source file under ``onnxcomp/`` that can define a pass: an edited or added pass
rebuilds it, and a cache folder that cannot be written only costs the speed.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

__all__ = ["pass_catalog", "build_catalog", "describe_type"]

_PACKAGE = Path(__file__).resolve().parent


def pass_catalog() -> list[dict[str, Any]]:
    """Every pass as ``{name, summary, doc, options: [{name, type, default, description}]}``."""
    cache = _cache_path()
    if cache is not None:
        try:
            return json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    catalog = build_catalog()
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".passes-", dir=cache.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(catalog, out)
            os.replace(tmp, cache)
        except OSError:
            pass
    return catalog


def build_catalog() -> list[dict[str, Any]]:
    """The catalog from the registry itself (imports every pass module)."""
    from onnxcomp.registry import all_passes

    catalog = []
    for name, cls in all_passes().items():
        options = []
        for field, info in cls.Config.model_fields.items():
            bounds = "".join(f" {m}" for m in info.metadata)
            options.append({"name": field, "type": describe_type(info.annotation) + bounds,
                            "default": repr(info.default), "description": info.description or ""})
        catalog.append({"name": name, "summary": cls.summary, "doc": inspect.cleandoc(cls.__dict__.get("__doc__") or ""),
                        "options": options})
    return catalog


def describe_type(annotation: Any) -> str:
    """A type as a user reads it: ``bool``, ``minmax|percentile``, ``float | auto | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Annotated:
        inner = describe_type(args[0])
        bounds = "".join(f" {m}" for m in getattr(args[1], "metadata", []) if m is not None)
        return inner + bounds if bounds else inner
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join("None" if a is type(None) else describe_type(a) for a in args)
    if origin in (tuple, list, set, frozenset):
        inner = ", ".join("..." if a is Ellipsis else describe_type(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _cache_path() -> Path | None:
    from onnxcomp import __version__

    digest = hashlib.sha256(__version__.encode())
    try:
        for root, dirs, files in os.walk(_PACKAGE):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            for name in sorted(files):
                if name.endswith(".py"):
                    info = os.stat(os.path.join(root, name))
                    rel = os.path.relpath(os.path.join(root, name), _PACKAGE)
                    digest.update(f"{rel}:{info.st_size}:{info.st_mtime_ns};".encode())
    except OSError:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "onnxcomp" / f"passes-{digest.hexdigest()[:16]}.json"
