"""``storage: sparse`` — pruned weights stored as a bitmask plus their nonzero values.

onnxruntime's CPU kernels do not take ONNX ``sparse_initializer``s for most ops, so the dense
weight is rebuilt *in the graph* from two initializers, by nodes whose inputs are all constant
(onnxruntime's constant folding evaluates them once when the session is created)::

    bits  uint8 [ceil(N/8)]   np.packbits(W.ravel() != 0)        (N/8 bytes)
    vals  dtype [nnz]         W.ravel()[W.ravel() != 0]           (nnz · itemsize bytes)

    m   = Slice(Reshape(Mod(Div(Cast<int32>(Reshape(bits, [-1, 1])), [128 ... 1]), 2), [-1]), 0, N)
    pos = Sub(CumSum(m, 0), 1)                   # index of each kept weight in vals (-1 before the first)
    W   = Reshape(Where(Cast<bool>(m), Gather(vals, pos), 0), shape)

Bytes: N/8 + nnz·4 for float32 against 4·N dense, so the form pays below ~96 % density (0.13×
the dense bytes at 90 % sparsity), plus ~1 KB of nodes and shape constants per tensor: a tensor
is converted only when that total is below ``PAYS`` of its dense bytes, and the stats say why
not otherwise. Needs opset >= 11 (CumSum). Put it last in a recipe: a later constant folding
(``cleanup``) would make the weight dense again.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import Layer, Names, add_initializer, constant_array, opset_version
from onnxcomp.passes.base import PassStats

__all__ = ["store_sparse", "sparse_bytes", "PAYS"]

PAYS = 0.9          # convert when the sparse form is below this share of the dense bytes
NODE_OVERHEAD = 1024  # bytes of decode nodes and small constants per tensor (measured: ~0.9 KB)


def sparse_bytes(array: np.ndarray) -> int:
    """Bytes of the bitmask + values form of ``array`` (decode overhead included)."""
    return -(-array.size // 8) + int(np.count_nonzero(array)) * array.dtype.itemsize + NODE_OVERHEAD


def store_sparse(model: ir.Model, layers: list[Layer], stats: PassStats) -> None:
    """Replace the stored weight of each of ``layers`` by the in-graph decode where it is smaller."""
    graph = model.graph
    if opset_version(model) < 11:
        stats.notes.append(f"storage sparse needs opset >= 11 (CumSum); the model has {opset_version(model)}: "
                           "weights kept dense")
        return
    names = Names(graph)
    before = after = 0
    done: set[int] = set()
    for layer in layers:
        value = layer.weight_value
        if id(value) in done:
            continue
        done.add(id(value))
        array = constant_array(value)
        what = f"{layer.label} weight {value.name}"
        dense, sparse = array.nbytes, sparse_bytes(array)
        if value.const_value is None or value.graph is not graph:
            stats.notes.append(f"{what}: kept dense (not an initializer of the main graph)")
            continue
        if not np.count_nonzero(array) or sparse >= PAYS * dense:
            stats.notes.append(f"{what}: kept dense ({1 - np.count_nonzero(array) / array.size:.1%} zeros: "
                               f"sparse form {sparse} B vs dense {dense} B does not pay)")
            before += dense
            after += dense
            continue
        _decode_in_graph(graph, names, value, array)
        before += dense
        after += sparse
        stats.touch(f"{what}: stored sparse, {dense} B -> {sparse} B ({sparse / dense:.2f}x)")
    stats.metrics.update(weight_bytes_dense=before, weight_bytes_stored=after)


def _decode_in_graph(graph: ir.Graph, names: Names, value: ir.Value, array: np.ndarray) -> None:
    flat = array.reshape(-1)
    keep = flat != 0
    base = value.name
    i64 = lambda tag, a: add_initializer(graph, names, f"{base}.{tag}", np.asarray(a, np.int64))  # noqa: E731
    bits = add_initializer(graph, names, f"{base}.sparse_bits", np.packbits(keep))
    vals = add_initializer(graph, names, f"{base}.sparse_values", np.ascontiguousarray(flat[keep]))
    powers = add_initializer(graph, names, f"{base}.bit_weights", (1 << np.arange(7, -1, -1)).astype(np.int32))
    two = add_initializer(graph, names, f"{base}.two", np.array(2, np.int32))
    one = add_initializer(graph, names, f"{base}.one", np.array(1, np.int32))
    zero = add_initializer(graph, names, f"{base}.zero", np.array(0, array.dtype))
    nodes: list[ir.Node] = []

    def node(op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        out = ir.Value(name=names(f"{base}.{op.lower()}"))
        nodes.append(ir.Node("", op, inputs, attributes=[_attr(k, v) for k, v in attrs.items()],
                             outputs=[out], name=names(f"{base}/sparse_{op.lower()}")))
        return out

    bytes_i32 = node("Cast", [node("Reshape", [bits, i64("col", [-1, 1])])], to=ir.DataType.INT32)
    m_all = node("Reshape", [node("Mod", [node("Div", [bytes_i32, powers]), two]), i64("flat", [-1])])
    m = node("Slice", [m_all, i64("start", [0]), i64("stop", [flat.size])])
    pos = node("Sub", [node("CumSum", [m, i64("axis", 0)]), one])
    picked = node("Gather", [vals, pos], axis=0)
    dense = node("Where", [node("Cast", [m], to=ir.DataType.BOOL), picked, zero])
    out = node("Reshape", [dense, i64("shape", list(array.shape))])
    out.type, out.shape = value.type, value.shape
    value.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.initializers.pop(value.name)
    first = next(iter(graph), None)
    for n in nodes:
        if first is None:
            graph.append(n)
        else:
            graph.insert_before(first, n)
    name = value.name
    value.name = names(f"{name}.dense_stored")
    out.name = name


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, ir.DataType):
        return ir.AttrInt64(name, int(value))
    return ir.AttrInt64(name, int(value))
