"""The int8 operator tables of onnxruntime's CPU provider, in one neutral place: what the static
QDQ planner quantizes (:mod:`onnxcomp.passes.quantize.plan`) and what the fusion report
(:mod:`onnxcomp.fusion`) counts as an int8 kernel read from the same lists.
"""

from __future__ import annotations

__all__ = ["COMPUTE_OPS", "QLINEAR_OPS", "SHARED_SCALE_OPS", "INT8_KERNELS", "INT8_ACTIVATION_OPS"]

# ops with a weight that ORT runs as int8 compute kernels from DQ -> op -> Q (QLinearConv, QGemm, ...)
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# op -> indices of the inputs that carry data (None: all)
QLINEAR_OPS = {"Add": None, "Mul": None, "Concat": None, "Where": (1, 2), "AveragePool": (0,),
               "GlobalAveragePool": (0,), "LeakyRelu": (0,), "Sigmoid": (0,), "Softmax": (0,)}
# op -> newest opset ORT's drop-QDQ rule matches it at (None: any)
SHARED_SCALE_OPS = {"Reshape": None, "Flatten": None, "Transpose": None, "Squeeze": None, "Unsqueeze": None,
                    "Gather": None, "GatherElements": None, "Slice": None, "Expand": None, "Tile": None,
                    "Resize": None, "Split": None, "MaxPool": 21}
# what ORT's optimized graph runs as int8 kernels (or already-integer ops)
INT8_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger",
    "ConvInteger", "MatMulNBits", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QLinearWhere",
    "QLinearReduceMean", "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "NhwcMaxPool",
    "GatherBlockQuantized",
})
# ops of a saved model whose activations run as int8 (where u8s8 saturation on CPUs without VNNI matters)
INT8_ACTIVATION_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
                                 "QLinearConv", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})
