"""onnxcomp: compress trained ONNX models (prune, quantize, factorize, distill), validated in onnxruntime.

Python API::

    import onnxcomp
    result = onnxcomp.compress("model.onnx", "int8", calib="calib.npz", val="val.npz")
    result.save("model.int8.onnx")
"""

from onnxcomp.errors import GateFailed, OnnxcompError
from onnxcomp.model import load_model, save_model
from onnxcomp.pipeline import Result, compress
from onnxcomp.recipe import load_recipe

__all__ = ["compress", "Result", "load_model", "save_model", "load_recipe", "OnnxcompError", "GateFailed"]
__version__ = "0.1.0"
