"""Pass name -> pass class (which carries its config model): discovery and lookup.

Passes register themselves with :func:`onnxcomp.passes.base.register` (a pass must not import
this manager-layer module); :func:`all_passes` imports every module of ``onnxcomp.passes`` and of
its subpackages first."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import TYPE_CHECKING

from onnxcomp.errors import OnnxcompError

if TYPE_CHECKING:
    from onnxcomp.passes.base import CompressionPass

__all__ = ["get_pass", "all_passes"]


def register(cls: type[CompressionPass]) -> type[CompressionPass]:
    """Kept for passes written before :func:`onnxcomp.passes.base.register`; a pass importing this
    module breaks the layer contract (``lint-imports``): import ``register`` from passes.base."""
    from onnxcomp.passes.base import register as register_pass

    return register_pass(cls)


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

    from onnxcomp.passes.base import _PASSES

    for info in pkgutil.walk_packages(onnxcomp.passes.__path__, prefix="onnxcomp.passes."):
        if not info.name.endswith(".base"):
            importlib.import_module(info.name)
    return dict(sorted(_PASSES.items()))
