"""The neutral graph toolkit every pass family shares (onnx-ir graphs, no protobuf).

- constants: :func:`constant_array`, :func:`add_initializer`, :class:`Names` (fresh names);
- placement: :func:`insert_at_producer` (a new node right after the producer of a value),
  :func:`replace_node` (a node by a chain of new nodes that takes over its output);
- naming: :func:`label` ("OpType name", the one form stats use);
- :func:`side_by_side`: two models on the same inputs in one graph (a student and its teacher
  run together, so a calibration pass sees both tensors of the same batch);
- the **layer view**: :class:`Layer` — the weight of a MatMul / Gemm / Conv in its logical
  layout (output channels first: ``[out, in]`` or ``[out, in/group, *kernel]``) wherever and
  however it is stored (initializer or lifted Constant, Gemm ``transB``/``alpha``, a MatMul
  weight behind a Transpose), its bias (Gemm's C, Conv's B, or an Add of a constant right after
  a MatMul/Gemm), and write-back of a new weight/bias in the storage layout;
- node selection: :class:`NodeSelection`, the one ``include`` / ``exclude`` / ``min_params``
  option every pass config inherits.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "STANDARD_DOMAINS",
    "is_standard",
    "constant_array",
    "release_mapped",
    "Names",
    "add_initializer",
    "insert_at_producer",
    "replace_node",
    "label",
    "side_by_side",
    "opset_version",
    "all_nodes",
    "subgraph_nodes",
    "Layer",
    "find_layers",
    "NodeSelection",
]

STANDARD_DOMAINS = ("", "ai.onnx")
LAYER_OPS = ("MatMul", "Gemm", "Conv")


def is_standard(node: ir.Node) -> bool:
    """The node is in the default ONNX domain."""
    return node.domain in STANDARD_DOMAINS


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer (not one that is also a graph input) or of a ``Constant``
    node's tensor; None for anything computed at run time."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and is_standard(producer):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
    return None


def release_mapped(value: ir.Value | ir.TensorProtocol | None) -> None:
    """Unmap ``value``'s weight (or this tensor) if it is memory-mapped external data (it maps
    again on next read).

    A pass calls it after its last read of a large weight, so a model bigger than memory's comfort
    is not held resident while the rest of the pass runs. A no-op for in-memory tensors, and while
    an array of the mapping is still referenced elsewhere.
    """
    tensor = value.const_value if isinstance(value, ir.Value) else value
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:
            pass


class Names:
    """Fresh value and node names for one graph (never a name already in use in it or its subgraphs)."""

    def __init__(self, graph: ir.Graph):
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.used.add(node.name or "")
            self.used.update(o.name for o in node.outputs if o.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def add_initializer(graph: ir.Graph, names: Names, base: str, array: np.ndarray) -> ir.Value:
    """A new initializer of ``graph`` holding ``array`` under a fresh name derived from ``base``."""
    name = names(base)
    array = np.asarray(array)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.Tensor(array, name=name))
    graph.register_initializer(value)
    return value


def insert_at_producer(graph: ir.Graph, value: ir.Value, node: ir.Node) -> None:
    """Insert ``node`` right after the producer of ``value`` (first in ``graph`` when ``value`` is a
    graph input or an initializer), so it stays topologically sorted."""
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    elif len(graph):
        graph.insert_before(next(iter(graph)), node)
    else:
        graph.append(node)


def replace_node(node: ir.Node, new_nodes: list[ir.Node], output: ir.Value) -> None:
    """Replace the single-output ``node`` by ``new_nodes`` (inserted in order where it was).

    ``output`` (produced by one of ``new_nodes``) takes over the old output: its readers, its
    graph-output role, its name, and its type/shape when ``output`` has none. Whatever only fed
    ``node`` is removed too: initializers nothing reads any more, and nodes (a weight's Transpose,
    a Constant) none of whose outputs is read any more.
    """
    if len(node.outputs) != 1:
        raise ValueError(f"replace_node: {label(node)} has {len(node.outputs)} outputs")
    graph, old = node.graph, node.outputs[0]
    for new in new_nodes:
        graph.insert_before(node, new)
    old.replace_all_uses_with(output, replace_graph_outputs=True)
    inputs = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    name = old.name
    old.name = None
    output.name = name
    if output.type is None:
        output.type = old.type
    if output.shape is None and old.shape is not None:
        output.shape = old.shape
    for value in inputs:
        _drop_dead(value)


def _drop_dead(value: ir.Value) -> None:
    """Remove the initializer or the producer node of ``value`` once nothing reads it (recursively)."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    producer = value.producer()
    if producer is None:
        _drop_if_unused(value)
        return
    if producer.graph is None or any(o.uses() or o.is_graph_output() for o in producer.outputs):
        return
    inputs = [v for v in producer.inputs if v is not None]
    producer.graph.remove(producer, safe=True)
    for v in inputs:
        _drop_dead(v)


def label(node: ir.Node) -> str:
    """How stats name a node: ``"OpType name"`` (just the op type for an unnamed node)."""
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def side_by_side(model: ir.Model, other: ir.Model, prefix: str) -> tuple[ir.Model, dict[str, str]]:
    """One model computing both ``model`` and ``other`` on the same graph inputs (matched by name).

    The result is a clone of ``model`` with a clone of ``other``'s nodes and initializers added
    under fresh ``prefix``-ed names; its graph outputs are ``model``'s. Returns it and, for every
    tensor of ``other`` (inputs, initializers, node outputs), the name it has in the result.
    Both models must import the same default-domain opset.
    """
    if opset_version(model) != opset_version(other):
        raise ValueError(f"side_by_side: opset {opset_version(model)} vs {opset_version(other)}")
    merged, guest = model.clone(), other.clone()
    inputs = {v.name: v for v in merged.graph.inputs}
    missing = [v.name for v in guest.graph.inputs if v.name not in inputs and v.name not in guest.graph.initializers]
    if missing:
        raise ValueError(f"side_by_side: input '{missing[0]}' is not an input of the first model")
    names, renamed = Names(merged.graph), {}
    for value in guest.graph.inputs:
        if value.name in inputs:
            renamed[value.name] = value.name
            value.replace_all_uses_with(inputs[value.name])
    guest.graph.outputs.clear()  # first: an initializer that is also an output stays owned by its graph otherwise
    for name in list(guest.graph.initializers):
        value = guest.graph.initializers.pop(name)
        value.name = renamed[name] = names(prefix + name)
        if value.const_value is not None:
            value.const_value.name = value.name
        merged.graph.register_initializer(value)
    for node in all_nodes(guest.graph):
        node.name = names(prefix + (node.name or node.op_type))
        for out in node.outputs:
            if out.name:
                old = out.name
                out.name = names(prefix + old)
                if node.graph is guest.graph:
                    renamed[old] = out.name
    for node in list(guest.graph):
        guest.graph.remove(node)
        merged.graph.append(node)
    for domain, version in guest.opset_imports.items():
        merged.opset_imports.setdefault(domain, version)
    for key, function in guest.functions.items():
        merged.functions.setdefault(key, function)
    return merged, renamed


def opset_version(model: ir.Model) -> int:
    """The default-domain opset the model imports."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def all_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies), in order."""
    return iter(ir.traversal.RecursiveGraphIterator(graph))


def subgraph_nodes(graph: ir.Graph, ops: tuple[str, ...]) -> list[tuple[ir.Node, str]]:
    """Standard-domain nodes of ``ops`` inside the subgraphs (If/Loop/Scan bodies, nested too) of
    ``graph``'s nodes, each with where it sits: ``"else_branch of If if_0"`` (its outermost owner)."""
    found = []
    for owner in graph:
        for attr in owner.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                bodies = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                bodies = list(attr.value)
            else:
                continue
            for body in bodies:
                found += [(node, f"{attr.name} of {label(owner)}") for node in all_nodes(body)
                          if node.op_type in ops and is_standard(node)]
    return found


class NodeSelection(BaseModel):
    """The node-selection options every pass has (mix into a pass Config).

    An ``include`` / ``exclude`` entry matches a node when it equals the node's op type
    (``Conv``) or is a glob matching its name (``/encoder/layer.0/*``). A node is selected when
    ``include`` is empty or one entry matches, no ``exclude`` entry matches, and (for layers)
    its weight has at least ``min_params`` parameters.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    include: tuple[str, ...] = Field((), description="op types or node-name globs to work on (empty: all)")
    exclude: tuple[str, ...] = Field((), description="op types or node-name globs left alone")
    min_params: int = Field(0, ge=0, description="skip layers whose weight has fewer parameters")

    def selects(self, node: ir.Node, params: int | None = None) -> bool:
        """True when ``node`` passes include, exclude and (if ``params`` is given) min_params."""
        if self.include and not any(_matches(node, p) for p in self.include):
            return False
        if any(_matches(node, p) for p in self.exclude):
            return False
        return params is None or params >= self.min_params

    def why_not(self, node: ir.Node, params: int | None = None) -> str | None:
        """The reason ``node`` is not selected, or None when it is."""
        if self.include and not any(_matches(node, p) for p in self.include):
            return "not matched by include"
        hit = next((p for p in self.exclude if _matches(node, p)), None)
        if hit is not None:
            return f"excluded by '{hit}'"
        if params is not None and params < self.min_params:
            return f"{params} parameters < min_params {self.min_params}"
        return None

    def unmatched(self, graph: ir.Graph) -> list[str]:
        """Entries of include/exclude that match no node (likely typos: passes report them)."""
        nodes = list(all_nodes(graph))
        return [p for p in (*self.include, *self.exclude) if not any(_matches(n, p) for n in nodes)]


def _matches(node: ir.Node, pattern: str) -> bool:
    return node.op_type == pattern or fnmatch.fnmatchcase(node.name or "", pattern)


@dataclasses.dataclass
class Layer:
    """A MatMul / Gemm / Conv with a constant weight, seen in its logical layout.

    ``weight()`` is ``[out, in]`` for MatMul/Gemm and ``[out, in/group, *kernel]`` for Conv:
    axis 0 is always the output channel, axis 1 the input channel. Gemm's ``alpha`` is part of
    the logical weight and ``beta`` of the logical bias; writing either back folds them (the
    attribute becomes 1). ``bias()`` is the ``[out]`` vector added to the output (Gemm C, Conv B,
    or the constant of an Add that alone reads a MatMul/Gemm output), or None.
    """

    node: ir.Node
    weight_value: ir.Value          # the stored constant (behind the Transpose, if any)
    weight_transposed: bool          # storage is [in, out] (MatMul, Gemm transB=0, or behind a Transpose of [out, in])
    transpose: ir.Node | None = None  # Transpose between the stored weight and a MatMul/Gemm
    bias_add: ir.Node | None = None
    root: ir.Graph | None = None        # the main graph (fresh names are unique across subgraphs)

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = self.node.graph

    # --- finding layers -----------------------------------------------------------------------

    @staticmethod
    def of(node: ir.Node, root: ir.Graph | None = None, *, runtime_bias: bool = False) -> Layer | str:
        """``node`` as a layer, or the reason it is not one (``root``: the main graph, when
        ``node`` sits in a subgraph). ``runtime_bias``: also accept a Gemm/Conv whose bias input
        is computed at run time (``bias()`` is then None: the caller keeps that input)."""
        if node.op_type not in LAYER_OPS or not is_standard(node):
            return f"{node.op_type} is not a MatMul/Gemm/Conv"
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return "no weight input"
        if constant_array(node.inputs[0]) is not None:
            return "the activation input is a constant too"
        value, transpose = node.inputs[1], None
        producer = value.producer()
        if producer is not None and producer.op_type == "Transpose" and node.op_type != "Conv" \
                and is_standard(producer) and constant_array(value) is None \
                and constant_array(producer.inputs[0]) is not None:
            perm = producer.attributes.get_ints("perm", None)
            if perm is not None and list(perm) != [1, 0]:
                return f"weight behind a Transpose with perm {list(perm)}"
            transpose, value = producer, producer.inputs[0]
        weight = constant_array(value)
        if weight is None:
            return "weight is not a constant"
        if not np.issubdtype(weight.dtype, np.floating):
            return f"weight of type {weight.dtype} (not float)"
        if node.op_type == "Conv":
            group = node.attributes.get_int("group", 1)
            if weight.ndim < 3 or weight.shape[0] % group:
                return "Conv weight shape does not match its group"
            transposed = False
        else:
            if weight.ndim != 2:
                return f"weight of rank {weight.ndim}"
            stored_out_first = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
            transposed = (not stored_out_first) != (transpose is not None)
        if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None \
                and not runtime_bias:
            return "bias is not a constant"
        layer = Layer(node, value, transposed, transpose, root=root)
        layer.bias_add = layer._find_bias_add()
        return layer

    def _find_bias_add(self) -> ir.Node | None:
        if self.node.op_type == "Conv" or (len(self.node.inputs) > 2 and self.node.inputs[2] is not None):
            return None
        out = self.node.outputs[0]
        uses = out.uses()
        if len(uses) != 1 or out.is_graph_output():
            return None
        add = uses[0].node
        if add.op_type != "Add" or not is_standard(add) or len(add.inputs) != 2:
            return None
        other = add.inputs[1 - uses[0].idx]
        bias = constant_array(other)
        if bias is None or bias.size != self.out_features or bias.shape[-1] != self.out_features:
            return None
        return add

    # --- what it is -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.node.name or self.node.op_type

    @property
    def label(self) -> str:
        return label(self.node)

    @property
    def input(self) -> ir.Value:
        """The activation this layer reads."""
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The layer's result, bias included (the bias Add's output when there is one)."""
        return (self.bias_add or self.node).outputs[0]

    @property
    def group(self) -> int:
        return self.node.attributes.get_int("group", 1) if self.node.op_type == "Conv" else 1

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical weight shape (``[out, in]`` / ``[out, in/group, *kernel]``)."""
        shape = tuple(int(d) for d in self.weight_value.const_value.shape) if self.weight_value.const_value \
            is not None else constant_array(self.weight_value).shape
        return shape[::-1] if self.weight_transposed else shape

    @property
    def storage_out_axis(self) -> int:
        """The axis of the stored weight (``weight_value``) that holds the output channels."""
        return 1 if self.weight_transposed else 0

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Input channels the layer reads (all groups)."""
        return self.shape[1] * self.group

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def shared(self) -> bool:
        """The stored weight is read by another node too (or is a graph output)."""
        users = {u.node for u in self.weight_value.uses()}
        return len(users) > 1 or self.weight_value.is_graph_output()

    # --- reading --------------------------------------------------------------------------------

    def weight(self) -> np.ndarray:
        """The logical weight (a new array; Gemm alpha applied)."""
        w = constant_array(self.weight_value)
        w = w.T if self.weight_transposed else w
        alpha = self._gemm_attr("alpha")
        return (w * alpha).astype(w.dtype) if alpha != 1.0 else np.array(w)

    def bias(self) -> np.ndarray | None:
        """The ``[out]`` bias (Gemm beta applied), or None."""
        if self.bias_add is not None:
            return constant_array(self._bias_value()).reshape(-1).copy()
        if len(self.node.inputs) > 2 and self.node.inputs[2] is not None:
            c = constant_array(self.node.inputs[2])
            if c is None:  # computed at run time (Layer.of(runtime_bias=True))
                return None
            if self.node.op_type == "Gemm":
                if c.size == 1:
                    c = np.full(self.out_features, c.reshape(()), c.dtype)
                elif c.ndim == 2 and c.shape[0] != 1:
                    return None  # a per-row C is not a bias of the output channels
                beta = self._gemm_attr("beta")
                c = (c.reshape(-1) * beta).astype(c.dtype)
            return c.reshape(-1).copy()
        return None

    # --- writing --------------------------------------------------------------------------------

    def set_weight(self, array: np.ndarray, *, for_all_users: bool = False) -> str:
        """Write a new logical weight (same or new shape) back in the storage layout.

        A shared stored weight is changed for every reader when ``for_all_users`` (the caller
        vouches the change is right for all of them); otherwise this node gets its own copy.
        Returns what happened: ``"replaced"``, ``"replaced for all users"`` or
        ``"split from a shared weight"``.
        """
        old, shared = self.weight_value, self.shared
        dtype = constant_array(old).dtype
        if self.node.op_type == "Gemm" and self._gemm_attr("alpha") != 1.0:
            self.node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)  # alpha is in the logical weight
        stored = np.ascontiguousarray((array.T if self.weight_transposed else array).astype(dtype))
        new = add_initializer(self.root, Names(self.root), old.name, stored)
        if shared and for_all_users:
            old.replace_all_uses_with(new)
            self.weight_value = new
            _drop_if_unused(old)
            return "replaced for all users"
        if self.transpose is not None and len(self.transpose.outputs[0].uses()) > 1:
            # the Transpose feeds others too: this node reads its new weight in [in, out] form
            new.const_value = ir.Tensor(np.ascontiguousarray(array.T.astype(dtype)), name=new.name)
            new.shape = ir.Shape(new.const_value.shape)
            self.node.replace_input_with(1, new)
            if self.node.op_type == "Gemm":
                self.node.attributes["transB"] = ir.AttrInt64("transB", 0)
            self.transpose, self.weight_transposed = None, True
        elif self.transpose is not None:
            self.transpose.replace_input_with(0, new)
        else:
            self.node.replace_input_with(1, new)
        self.weight_value = new
        _drop_if_unused(old)
        return "split from a shared weight" if shared else "replaced"

    def set_bias(self, array: np.ndarray | None) -> None:
        """Write a new ``[out]`` bias where the layer keeps its bias (None: zeros / removed); a
        layer without one gets Gemm C / Conv B, or, for a MatMul, a new Add right after it."""
        names = Names(self.root)
        dtype = constant_array(self.weight_value).dtype
        array = None if array is None else np.asarray(array, dtype).reshape(-1)
        if self.bias_add is not None:
            old = self._bias_value()
            array = np.zeros(self.out_features, dtype) if array is None else array
            index = 1 if self.bias_add.inputs[0] is self.node.outputs[0] else 0
            shape = list(constant_array(old).shape)
            if int(np.prod(shape)) != array.size:  # a new number of output channels (channel removal)
                shape[-1] = array.size
            new = add_initializer(self.root, names, old.name, array.reshape(shape))
            self.bias_add.replace_input_with(index, new)
            _drop_if_unused(old)
            return
        if self.node.op_type in ("Gemm", "Conv"):
            if self.node.op_type == "Gemm":
                self.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # beta is in the logical bias
            old = self.node.inputs[2] if len(self.node.inputs) > 2 else None
            new = None if array is None else add_initializer(
                self.root, names, old.name if old is not None else f"{self.name}_bias", array)
            if len(self.node.inputs) < 3:
                self.node.resize_inputs(3)
            self.node.replace_input_with(2, new)
            if old is not None:
                _drop_if_unused(old)
            return
        if array is None:
            return
        graph, out = self.node.graph, self.node.outputs[0]
        bias = add_initializer(self.root, names, f"{self.name}_bias", array)
        y = ir.Value(name=names(f"{out.name}_biased"), type=out.type, shape=out.shape)
        out.replace_all_uses_with(y, replace_graph_outputs=True)  # readers and the output role move to y
        add = ir.Node("", "Add", [out, bias], outputs=[y], name=names(f"{self.name}_bias_add"))
        graph.insert_after(self.node, add)
        name = out.name
        out.name = names(f"{name}_unbiased")
        y.name = name  # the biased value keeps the name users know
        self.bias_add = add

    def bias_value(self) -> ir.Value | None:
        """The stored constant holding the bias (the bias Add's constant, Gemm C, Conv B), or None."""
        if self.bias_add is not None:
            return self._bias_value()
        return self.node.inputs[2] if len(self.node.inputs) > 2 else None

    def input_channel_index(self) -> np.ndarray:
        """``[out, in/group]``: the input channel each slice ``weight()[o, j]`` reads (grouped and
        depthwise Convs exact; for MatMul/Gemm simply ``j``)."""
        out, per_group = self.shape[0], self.shape[1]
        group_of = np.arange(out) // (out // self.group)
        return group_of[:, None] * per_group + np.arange(per_group)[None, :]

    # --- helpers --------------------------------------------------------------------------------

    def _bias_value(self) -> ir.Value:
        add = self.bias_add
        return add.inputs[1] if add.inputs[0] is self.node.outputs[0] else add.inputs[0]

    def _gemm_attr(self, name: str) -> float:
        return self.node.attributes.get_float(name, 1.0) if self.node.op_type == "Gemm" else 1.0


def find_layers(graph: ir.Graph, selection: NodeSelection | None = None, ops: tuple[str, ...] = LAYER_OPS
                ) -> tuple[list[Layer], list[tuple[str, str]]]:
    """Every MatMul/Gemm/Conv (of ``ops``) in ``graph`` and its subgraphs that is a layer and is
    selected, and ``(label, reason)`` for each such node that is not."""
    layers, skipped = [], []
    for node in all_nodes(graph):
        if node.op_type not in ops or not is_standard(node):
            continue
        layer = Layer.of(node, graph)
        if isinstance(layer, str):
            skipped.append((label(node), layer))
            continue
        why = selection.why_not(node, layer.params) if selection is not None else None
        if why is not None:
            skipped.append((label(node), why))
            continue
        layers.append(layer)
    return layers, skipped


def _drop_if_unused(value: ir.Value) -> None:
    """Remove an initializer nothing reads any more (and that is no graph input/output)."""
    if value.uses() or value.is_graph_output() or value.is_graph_input() or value.graph is None:
        return
    if value.graph.initializers.get(value.name) is value:
        value.graph.initializers.pop(value.name)
