"""How many parameters a model holds: the count every pass reports before and after itself and
the report prints. Block-quantized weights count as the logical weights they encode."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import release_mapped

__all__ = ["count_params", "nonzero_params"]


def _initializers(model: ir.Model):
    for graph in (model.graph, *model.graph.subgraphs()):
        yield from graph.initializers.values()


def count_params(model: ir.Model) -> int:
    """Elements stored in initializers with more than one element (weights, not scalars).

    Block-quantized weights count as the logical weights they encode, like the float
    op they replace: ``MatMulNBits`` K·N (its packed data, scales and zero points are not
    counted again), ``GatherBlockQuantized`` vocab×dim.
    """
    logical, encoded = _block_quantized(model)
    total = logical
    for value in _initializers(model):
        tensor = value.const_value
        if tensor is None or tensor.size <= 1 or value.name in encoded:
            continue
        total += tensor.size
    return total


_ENCODING_INPUTS = {"MatMulNBits": (1, 2, 3, 4), "GatherBlockQuantized": (0, 2, 3)}  # data, scales, zp (g_idx)


def _block_quantized(model: ir.Model) -> tuple[int, set[str]]:
    """(logical weights of block-quantized nodes, names of the initializers that encode them)."""
    logical, encoded = 0, set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        indices = _ENCODING_INPUTS.get(node.op_type) if node.domain == "com.microsoft" else None
        if indices is None:
            continue
        values = [node.inputs[i] for i in indices if i < len(node.inputs) and node.inputs[i] is not None]
        if not values or values[0].const_value is None:
            continue  # weights computed at run time: nothing stored
        if node.op_type == "MatMulNBits":
            logical += node.attributes.get_int("K", 0) * node.attributes.get_int("N", 0)
        else:
            data = values[0].const_value
            bits = node.attributes.get_int("bits", 4)
            packed = data.dtype == ir.DataType.UINT8 and bits < 8  # else int4/uint4/uint8 elements
            logical += data.size * 8 // bits if packed else data.size
        encoded.update(v.name for v in values if v.const_value is not None)
    return logical, encoded


def nonzero_params(model: ir.Model) -> int:
    """Nonzero elements of the initializers :func:`count_params` counts (block-quantized ones as stored)."""
    total = 0
    for value in _initializers(model):
        tensor = value.const_value
        if tensor is None or tensor.size <= 1:
            continue
        total += int(np.count_nonzero(tensor.numpy()))
        release_mapped(tensor)  # a mapped weight read once stays resident until unmapped
    return total
