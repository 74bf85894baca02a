"""Where pruning masks live between passes and runs.

- **Model metadata** (``metadata_props["onnxcomp.prune.masks"]``): JSON, one entry per pruned
  layer keyed by its node name, holding the logical weight shape and the mask — either
  ``"form": "nonzero"`` (the mask is exactly "weight != 0", as after folding: nothing more is
  stored) or ``"form": "bits"`` (zlib-compressed ``np.packbits`` in base64). A later ``prune``
  continues from these masks, as torch's ``PruningContainer`` does.
- **Explicit mask nodes** (``apply: mask``): ``Mul(W, mask)`` right in front of the layer's weight
  input, marked ``metadata_props["onnxcomp.prune"] = "mask"``. :func:`take_mask_nodes` removes
  them (the layer reads its dense weight again) and returns their masks in the logical layout.
"""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import Layer, Names, add_initializer, all_nodes, constant_array

__all__ = ["METADATA_KEY", "layer_key", "load_masks", "save_masks", "take_mask_nodes", "insert_mask_node",
           "reads_transposed"]

METADATA_KEY = "onnxcomp.prune.masks"
NODE_MARK = "onnxcomp.prune"


def layer_key(layer: Layer) -> str:
    """The key a layer's mask is stored under: its node name (``op_type#index`` if unnamed)."""
    if layer.node.name:
        return layer.node.name
    index = next(i for i, n in enumerate(all_nodes(layer.root)) if n is layer.node)
    return f"{layer.node.op_type}#{index}"


def load_masks(model: ir.Model) -> dict[str, np.ndarray]:
    """The masks stored in ``model``'s metadata, by layer key (logical layout). A ``nonzero``
    entry is resolved later against the weight (see :func:`resolve`), so it is kept as its shape."""
    text = model.metadata_props.get(METADATA_KEY)
    if not text:
        return {}
    out = {}
    for key, entry in json.loads(text).items():
        shape = tuple(entry["shape"])
        if entry["form"] == "bits":
            bits = np.frombuffer(zlib.decompress(base64.b64decode(entry["bits"])), np.uint8)
            out[key] = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
        else:
            out[key] = shape  # type: ignore[assignment]
    return out


def resolve(saved: np.ndarray | tuple | None, weight: np.ndarray) -> np.ndarray | None:
    """A stored mask for ``weight`` (None when there is none or its shape no longer fits)."""
    if saved is None:
        return None
    if isinstance(saved, tuple):
        return (weight != 0) if saved == weight.shape else None
    return saved if saved.shape == weight.shape else None


def save_masks(model: ir.Model, masks: dict[str, tuple[np.ndarray, np.ndarray | bool | None]],
               drop: set[str] = frozenset()) -> None:
    """Merge ``key -> (mask, folded weight or None)`` into the metadata; keys in ``drop`` are removed.
    Instead of the folded weight, ``True`` says the mask is exactly its nonzero pattern."""
    text = model.metadata_props.get(METADATA_KEY)
    entries = json.loads(text) if text else {}
    for key in drop:
        entries.pop(key, None)
    for key, (mask, folded) in masks.items():
        nonzero = folded if isinstance(folded, bool) else folded is not None and np.array_equal(mask, folded != 0)
        if nonzero:
            entries[key] = {"shape": list(mask.shape), "form": "nonzero"}
        else:
            packed = zlib.compress(np.packbits(mask.reshape(-1)).tobytes(), 9)
            entries[key] = {"shape": list(mask.shape), "form": "bits", "bits": base64.b64encode(packed).decode()}
    if entries:
        model.metadata_props[METADATA_KEY] = json.dumps(dict(sorted(entries.items())), separators=(",", ":"))
    else:
        model.metadata_props.pop(METADATA_KEY, None)


def reads_transposed(node: ir.Node) -> bool:
    """The node's weight input is ``[in, out]`` (MatMul, Gemm with transB=0), not ``[out, in]``."""
    return node.op_type == "MatMul" or (node.op_type == "Gemm" and not node.attributes.get_int("transB", 0))


def insert_mask_node(layer: Layer, mask: np.ndarray, names: Names) -> ir.Node:
    """``Mul(weight input, mask)`` in front of the layer (mask in the layout the node reads)."""
    node, graph = layer.node, layer.node.graph
    weight_in = node.inputs[1]
    dtype = layer.weight().dtype
    stored = (mask.T if reads_transposed(node) else mask).astype(dtype)
    base = node.name or node.op_type
    mask_value = add_initializer(layer.root, names, f"{base}.prune_mask", np.ascontiguousarray(stored))
    out = ir.Value(name=names(f"{base}.masked_weight"), type=weight_in.type, shape=weight_in.shape)
    mul = ir.Node("", "Mul", [weight_in, mask_value], outputs=[out], name=names(f"{base}/prune_mask"))
    mul.metadata_props[NODE_MARK] = "mask"
    graph.insert_before(node, mul)
    node.replace_input_with(1, out)
    return mul


def take_mask_nodes(graph: ir.Graph) -> dict[int, tuple[ir.Node, np.ndarray]]:
    """Remove every explicit mask ``Mul`` and return ``id(layer node) -> (node, logical mask)``."""
    found = {}
    for mul in list(all_nodes(graph)):
        if mul.op_type != "Mul" or mul.metadata_props.get(NODE_MARK) != "mask":
            continue
        uses = mul.outputs[0].uses()
        mask = constant_array(mul.inputs[1])
        if len(uses) != 1 or uses[0].idx != 1 or mask is None:
            continue  # not ours any more (a later pass rewired it): leave it
        reader = uses[0].node
        reader.replace_input_with(1, mul.inputs[0])
        mask_value = mul.inputs[1]
        mul.graph.remove(mul, safe=True)
        if not mask_value.uses() and mask_value.name in graph.initializers:
            graph.initializers.pop(mask_value.name)
        logical = mask.T if reads_transposed(reader) else mask
        found[id(reader)] = (reader, logical != 0)
    return found
