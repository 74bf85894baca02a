"""onnxcomp: compress trained ONNX models (prune, quantize, factorize, distill), validated in onnxruntime.

Python API::

    import onnxcomp
    result = onnxcomp.compress("model.onnx", "int8", calib="calib.npz", val="val.npz")
    result.save("model.int8.onnx")

The names below are imported on first use (module ``__getattr__``), so ``import onnxcomp``
and the command line start without loading onnx, onnx-ir or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["compress", "Result", "load_model", "save_model", "load_recipe", "OnnxcompError", "GateFailed"]
__version__ = "0.1.0"

_LAZY = {
    "compress": "onnxcomp.pipeline",
    "Result": "onnxcomp.pipeline",
    "load_model": "onnxcomp.model",
    "save_model": "onnxcomp.model",
    "load_recipe": "onnxcomp.recipe",
    "OnnxcompError": "onnxcomp.errors",
    "GateFailed": "onnxcomp.errors",
}

if TYPE_CHECKING:
    from onnxcomp.errors import GateFailed, OnnxcompError
    from onnxcomp.model import load_model, save_model
    from onnxcomp.pipeline import Result, compress
    from onnxcomp.recipe import load_recipe


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxcomp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
