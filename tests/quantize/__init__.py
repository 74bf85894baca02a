"""Tests of the quantization family (onnxcomp/passes/quantize/), one file per module or tool."""
