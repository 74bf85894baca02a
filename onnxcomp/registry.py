"""Pass name -> pass class (which carries its config model)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import TYPE_CHECKING

from onnxcomp.errors import OnnxcompError

if TYPE_CHECKING:
    from onnxcomp.passes.base import CompressionPass

__all__ = ["register", "get_pass", "all_passes"]

_PASSES: dict[str, type[CompressionPass]] = {}


def register(cls: type[CompressionPass]) -> type[CompressionPass]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name``."""
    name = cls.name
    if not name.isidentifier() or name.lower() != name:
        raise ValueError(f"pass name must be snake_case: {name!r}")
    if name in _PASSES and _PASSES[name] is not cls:
        raise ValueError(f"pass {name!r} registered twice")
    _PASSES[name] = cls
    return cls


def get_pass(name: str, where: str = "") -> type[CompressionPass]:
    """The pass registered as ``name``; an unknown name lists the close ones."""
    passes = all_passes()
    if name in passes:
        return passes[name]
    close = difflib.get_close_matches(name, list(passes), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(passes)}"
    prefix = f"{where}: " if where else ""
    raise OnnxcompError(f"{prefix}unknown pass '{name}'{hint}")


def all_passes() -> dict[str, type[CompressionPass]]:
    """Every registered pass: the modules of ``onnxcomp.passes`` and of its subpackages (a pass
    family such as ``onnxcomp.passes.quantize``) are imported first."""
    import onnxcomp.passes

    for info in pkgutil.walk_packages(onnxcomp.passes.__path__, prefix="onnxcomp.passes."):
        if not info.name.endswith(".base"):
            importlib.import_module(info.name)
    return dict(sorted(_PASSES.items()))
