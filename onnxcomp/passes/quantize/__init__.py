"""The quantization family: int8 and int4 passes and their accuracy tools.

Passes: ``quantize_static`` (:mod:`.static`, QDQ with calibrated activations), ``quantize_dynamic``
(:mod:`.dynamic`, activation scales at run time), ``quantize_weights`` (:mod:`.weights`,
weight-only block int4/int8 for MatMulNBits), ``smooth_quant`` (:mod:`.smooth_quant`) and
``equalize`` (:mod:`.equalize`), which quantize_static can also run itself.

The static QDQ steps: :mod:`.prepare` (float rewrites) → :mod:`.plan` (nodes, tensors,
calibration, ranges) → :mod:`.rewrite` (Q/DQ nodes, :mod:`.qdq` builds them), then
:mod:`.bias_correction` and :mod:`.sensitivity`. :mod:`.channel_scaling` rescales channels for
smooth_quant and equalize; :mod:`.int8_common` is what the two int8 passes share.

The numerics live in core, shared with other families: :mod:`onnxcomp.qparams` (scales, zero
points, the clip-range search), :mod:`onnxcomp.ranges` (activation ranges from calibration
statistics), :mod:`onnxcomp.blockquant` (block quantization, GPTQ); the int8 op tables in
:mod:`onnxcomp.int8_ops`.
"""
