"""``apply: remove_channels`` — delete pruned channels for real, across dependency groups.

Torch-Pruning's idea on the onnx-ir graph: first find the **groups** — sets of channels that
must go together — then decide which channels of each group go, then run **one removal
routine** over every tensor the group touches.

*Layouts.* Walking the graph in topological order, every tensor that carries the output channels
of a prunable layer gets a layout: its channel axis and, per position along that axis, the
(group, channel) it holds. A producer (a selected Conv with ``group=1``, Gemm or MatMul whose
weight only it reads) starts a group. Layouts flow unchanged through channel-wise ops
(activations, BatchNormalization, pooling, Dropout, elementwise ops with a constant that
broadcasts or has one value per channel), through a depthwise Conv, are concatenated by
``Concat`` and split by ``Split`` on the channel axis, and are expanded by ``Flatten`` /
``Reshape [N, -1]`` in front of a Gemm/MatMul head (each channel becomes H·W consecutive
columns). A binary op joining two layouts (a residual ``Add``) merges their groups: those
channels are pruned together. A layer reading a layout is a consumer: its input channels (its
weight's axis 1) follow the deletions.

*Safety.* A group is skipped, with the reason in the stats, when any of its tensors reaches a
graph output, an op not listed above (Transpose, Reshape into heads, LayerNormalization,
ReduceMean, Softmax, MatMul between activations, ...), a subgraph, a join with a tensor of
unknown channels, or a constant that does not broadcast per channel — the conservative rule:
only what is proven channel-wise is touched.

*Choice.* With ``dim: 0`` a channel's score is the L-n norm of its rows in every producer of the
group (for a one-layer group exactly torch's ``ln_structured(dim=0)``); with ``dim: 1`` of the
columns that read it in every consumer. ``amount`` counts the group's live channels; channels
an earlier run already zeroed in every producer go too. A group is never emptied.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import Layer, Names, add_initializer, constant_array, find_layers, is_standard, label
from onnxcomp.passes.base import PassStats
from onnxcomp.passes.prune import masks as M
from onnxcomp.passes.prune import state

__all__ = ["remove_channels", "find_groups", "ChannelGroups"]

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus",
         "Softsign", "Erf", "Gelu", "Identity", "Dropout", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal", "Mish",
         "Clip", "Cast", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu", "Swish"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
FROZEN = -1  # the group id of channels that cannot be removed (e.g. a Concat input we cannot prune)


@dataclasses.dataclass
class Layout:
    """Channel axis (counted from the end), the rank when known, and per position the group and
    channel it holds. ``expand`` marks a Flatten whose per-channel width a consumer resolves."""

    axis: int
    rank: int | None
    gid: np.ndarray
    idx: np.ndarray
    expand: bool = False

    def same(self, other: Layout) -> bool:
        return (self.axis, self.expand) == (other.axis, other.expand) and np.array_equal(self.gid, other.gid) \
            and np.array_equal(self.idx, other.idx)

    @property
    def groups(self) -> set[int]:
        return {int(g) for g in np.unique(self.gid) if g != FROZEN}


@dataclasses.dataclass
class ChannelGroups:
    """The result of the analysis: producers per group id, every site, and why groups are unsafe."""

    producers: dict[int, Layer]
    parent: dict[int, int]
    unsafe: dict[int, str]
    weight_sites: list[tuple[Layer, int, Layout]]            # (layer, logical axis, layout of that axis)
    const_sites: list[tuple[ir.Node, int, Layout]]          # (node, input index, layout)
    split_sites: list[tuple[ir.Node, list[Layout]]]
    reshape_sites: list[tuple[ir.Node, Layout]]
    depthwise: list[tuple[Layer, Layout]]
    values: list[tuple[ir.Value, Layout]]

    def root(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def members(self) -> dict[int, list[int]]:
        out = defaultdict(list)
        for g in self.producers:
            out[self.root(g)].append(g)
        return dict(out)

    def why_unsafe(self, root: int) -> str | None:
        for g in self.members()[root]:
            if g in self.unsafe:
                return self.unsafe[g]
        return None


def find_groups(graph: ir.Graph, producers: list[Layer]) -> ChannelGroups:
    """Layouts, sites and merged groups for ``producers`` (all in the main graph)."""
    consumers = {id(layer.node): layer for layer in find_layers(graph)[0] if layer.node.graph is graph}
    cg = ChannelGroups({}, {}, {}, [], [], [], [], [], [])
    starts: dict[int, int] = {}
    for g, layer in enumerate(producers):
        cg.producers[g], cg.parent[g] = layer, g
        starts[id(layer.node)] = g
    layouts: dict[int, Layout] = {}

    def unsafe(layout: Layout, why: str) -> None:
        for g in layout.groups:
            cg.unsafe.setdefault(g, why)

    def put(value: ir.Value, layout: Layout) -> None:
        layouts[id(value)] = layout
        cg.values.append((value, layout))
        if value.is_graph_output():
            unsafe(layout, f"channels reach the graph output {value.name}")
        for use in value.uses():
            if use.node.graph is not graph:
                unsafe(layout, f"channels are read inside a subgraph ({label(use.node)})")

    for node in graph:
        ins = [layouts.get(id(v)) if v is not None else None for v in node.inputs]
        carried = [(i, lay) for i, lay in enumerate(ins) if lay is not None]
        layer = consumers.get(id(node))
        if carried:
            _through(node, ins, carried, layer, cg, put, unsafe)
        if id(node) in starts:
            g = starts[id(node)]
            layer = cg.producers[g]
            rank = len(layer.shape) if node.op_type == "Conv" else (2 if node.op_type == "Gemm" else None)
            axis = -(rank - 1) if node.op_type == "Conv" else -1
            c = layer.out_features
            out = Layout(axis, rank, np.full(c, g), np.arange(c))
            cg.weight_sites.append((layer, 0, out))
            put(layer.output, out)
    return cg


def _through(node, ins, carried, layer, cg: ChannelGroups, put, unsafe) -> None:  # noqa: C901
    """How ``node`` treats the channel layouts on its inputs."""
    op = node.op_type
    first = carried[0][1]
    if not is_standard(node):
        return _stop(carried, unsafe, f"read by {label(node)}")
    if layer is not None and (node.inputs[0] is not None and ins[0] is not None):
        lay = ins[0]
        if any(i != 0 for i, _ in carried):
            return _stop(carried, unsafe, f"read as a weight by {label(node)}")
        if op == "Conv":
            if lay.expand or lay.rank != len(layer.shape) or lay.axis != -(lay.rank - 1):
                return _stop(carried, unsafe, f"{label(node)} reads them on another axis")
            if layer.group == 1:
                if len(lay.gid) != layer.in_features:
                    return _stop(carried, unsafe, f"{label(node)} reads {layer.in_features} channels, not {len(lay.gid)}")
                cg.weight_sites.append((layer, 1, lay))
                return None
            if layer.group == layer.in_features == layer.out_features and layer.shape[1] == 1:
                cg.depthwise.append((layer, lay))
                cg.weight_sites.append((layer, 0, lay))
                put(layer.output, lay)
                return None
            return _stop(carried, unsafe, f"grouped {label(node)}")
        if op == "Gemm" and node.attributes.get_int("transA", 0):
            return _stop(carried, unsafe, f"{label(node)} has transA")
        if lay.axis != -1:
            return _stop(carried, unsafe, f"{label(node)} reads them on another axis")
        if lay.expand:
            width, rest = divmod(layer.in_features, len(lay.gid))
            if rest or width == 0:
                return _stop(carried, unsafe, f"{label(node)} reads {layer.in_features} columns from "
                                              f"{len(lay.gid)} flattened channels")
            lay = Layout(-1, 2, np.repeat(lay.gid, width), np.repeat(lay.idx, width))
        if len(lay.gid) != layer.in_features:
            return _stop(carried, unsafe, f"{label(node)} reads {layer.in_features} channels, not {len(lay.gid)}")
        cg.weight_sites.append((layer, 1, lay))
        return None
    if len(node.outputs) < 1:
        return _stop(carried, unsafe, f"read by {label(node)}")
    out = node.outputs[0]
    if op in UNARY:
        if any(i != 0 for i, _ in carried) or (op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses()):
            return _stop(carried, unsafe, f"read by {label(node)}")
        if op == "Clip" and any(v is not None and constant_array(v) is None for v in node.inputs[1:]):
            return _stop(carried, unsafe, f"{label(node)} has run-time bounds")
        return put(out, first)
    if first.expand:
        return _stop(carried, unsafe, f"flattened channels read by {label(node)}")
    if op == "BatchNormalization" or op == "InstanceNormalization":
        if carried[0][0] != 0 or len(carried) > 1 or first.rank is None or first.axis != -(first.rank - 1):
            return _stop(carried, unsafe, f"{label(node)} normalises another axis")
        for i in range(1, len(node.inputs)):
            if constant_array(node.inputs[i]) is None:
                return _stop(carried, unsafe, f"{label(node)} parameters are not constant")
            cg.const_sites.append((node, i, Layout(-1, 1, first.gid, first.idx)))
        if op == "BatchNormalization" and len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return _stop(carried, unsafe, f"{label(node)} in training mode")
        return put(out, first)
    if op in POOLS:
        if carried[0][0] != 0 or first.rank is None or first.axis != -(first.rank - 1) \
                or any(o.uses() for o in node.outputs[1:]):
            return _stop(carried, unsafe, f"{label(node)} pools another axis")
        return put(out, first)
    if op in BINARY:
        return _binary(node, ins, carried, cg, put, unsafe)
    if op in ("Flatten", "Reshape"):
        return _flatten(node, first, carried, cg, put, unsafe)
    if op == "Concat":
        return _concat(node, ins, carried, put, unsafe)
    if op == "Split":
        return _split(node, first, carried, cg, put, unsafe)
    return _stop(carried, unsafe, f"read by {label(node)}")


def _stop(carried, unsafe, why: str) -> None:
    for _, lay in carried:
        unsafe(lay, why)


def _binary(node, ins, carried, cg: ChannelGroups, put, unsafe) -> None:
    first = carried[0][1]
    if len(carried) == len([v for v in node.inputs if v is not None]):  # every input carries channels
        for _, lay in carried[1:]:
            if lay.same(first):
                continue
            whole = [len(set(lay.groups)) == 1 and FROZEN not in lay.gid and np.array_equal(lay.idx, np.arange(len(lay.idx)))
                     for lay in (first, lay)]
            if all(whole) and len(lay.gid) == len(first.gid) and lay.axis == first.axis:
                a, b = cg.root(int(first.gid[0])), cg.root(int(lay.gid[0]))
                cg.parent[max(a, b)] = min(a, b)  # a residual join: prune these together
                continue
            return _stop(carried, unsafe, f"{label(node)} joins channels that do not line up")
        return put(node.outputs[0], first)
    for i, v in enumerate(node.inputs):
        if v is None or ins[i] is not None:
            continue
        const = constant_array(v)
        if const is None:
            return _stop(carried, unsafe, f"{label(node)} joins a tensor with unknown channels")
        axis_from_end = -first.axis
        if const.ndim >= axis_from_end and const.shape[const.ndim - axis_from_end] != 1:
            if const.shape[const.ndim - axis_from_end] != len(first.gid) or node.op_type == "PRelu" and i == 0:
                return _stop(carried, unsafe, f"{label(node)}: constant {list(const.shape)} does not broadcast per channel")
            cg.const_sites.append((node, i, Layout(first.axis, const.ndim, first.gid, first.idx)))
    return put(node.outputs[0], first)


def _flatten(node, first, carried, cg: ChannelGroups, put, unsafe) -> None:
    if carried[0][0] != 0 or first.rank is None or first.axis != -(first.rank - 1) or first.rank < 3:
        return _stop(carried, unsafe, f"{label(node)} reshapes the channels")
    if node.op_type == "Flatten":
        if node.attributes.get_int("axis", 1) != 1:
            return _stop(carried, unsafe, f"{label(node)} flattens at another axis")
    else:
        shape = constant_array(node.inputs[1])
        if shape is None or shape.shape != (2,) or not (shape[1] == -1 or shape[0] in (0, -1) or shape[0] > 0):
            return _stop(carried, unsafe, f"{label(node)} reshapes the channels")
        if shape[1] != -1:
            cg.reshape_sites.append((node, first))
    return put(node.outputs[0], Layout(-1, 2, first.gid, first.idx, expand=True))


def _concat(node, ins, carried, put, unsafe) -> None:
    first = carried[0][1]
    axis = node.attributes.get_int("axis", 0)
    if first.rank is None or axis % first.rank != first.rank + first.axis:
        return _stop(carried, unsafe, f"{label(node)} concatenates another axis")
    if any(lay is None for lay in ins) or any(lay.axis != first.axis or lay.expand for lay in ins):
        return _stop(carried, unsafe, f"{label(node)} joins a tensor with unknown channels")
    return put(node.outputs[0], Layout(first.axis, first.rank, np.concatenate([lay.gid for lay in ins]),
                                       np.concatenate([lay.idx for lay in ins])))


def _split(node, first, carried, cg: ChannelGroups, put, unsafe) -> None:
    axis = node.attributes.get_int("axis", 0)
    if carried[0][0] != 0 or first.rank is None or axis % first.rank != first.rank + first.axis:
        return _stop(carried, unsafe, f"{label(node)} splits another axis")
    sizes = _split_sizes(node, len(first.gid))
    if sizes is None:
        return _stop(carried, unsafe, f"{label(node)} has run-time split sizes")
    parts, start = [], 0
    for out, size in zip(node.outputs, sizes):
        part = Layout(first.axis, first.rank, first.gid[start:start + size], first.idx[start:start + size])
        parts.append(part)
        put(out, part)
        start += size
    cg.split_sites.append((node, parts))
    return None


def _split_sizes(node: ir.Node, total: int) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = constant_array(node.inputs[1])
        return None if sizes is None else [int(s) for s in sizes]
    attr = node.attributes.get_ints("split", None)
    if attr is not None:
        return [int(s) for s in attr]
    n = len(node.outputs)
    size = -(-total // n)
    return [min(size, total - i * size) for i in range(n)]


# --- deciding and removing -----------------------------------------------------------------------

def remove_channels(model: ir.Model, layers: list[Layer], weights, scores, old_masks, cfg, seed: int,
                    stats: PassStats) -> None:
    """Groups of the selected layers, channels chosen per group, then one removal over all sites."""
    graph = model.graph
    producers, index = [], {}
    for i, layer in enumerate(layers):
        why = _producer_problem(layer, graph)
        if why:
            stats.skip(layer.label, why)
            continue
        index[id(layer.node)] = i
        producers.append(layer)
    cg = find_groups(graph, producers)
    rng = M.TorchRandom(seed) if cfg.method == "random" else None
    drop: dict[int, np.ndarray] = {}  # group id -> channels removed
    removed_keys = set()
    for root, members in sorted(cg.members().items()):
        names = ", ".join(cg.producers[g].label for g in members)
        why = cg.why_unsafe(root)
        if why:
            stats.skip(f"group [{names}]", f"not provably safe: {why}")
            continue
        size = cg.producers[members[0]].out_features
        chosen = _choose(cg, root, members, size, index, scores, old_masks, cfg, rng)
        if chosen is None or len(chosen) == 0:
            stats.skip(f"group [{names}]", "nothing to remove at this amount")
            continue
        if len(chosen) >= size:
            stats.skip(f"group [{names}]", "would remove every channel")
            continue
        for g in members:
            drop[g] = chosen
            removed_keys.add(state.layer_key(cg.producers[g]))
        stats.touch(f"group [{names}]: {len(chosen)} of {size} channels removed")
    if not drop:
        stats.notes.append("no channel removed")
        return
    before = sum(int(np.prod(layer.shape)) for layer in find_layers(graph)[0])
    _remove(graph, cg, drop)
    after = sum(int(np.prod(layer.shape)) for layer in find_layers(graph)[0])
    state.save_masks(model, {}, drop=removed_keys | {state.layer_key(layer) for layer, _, _ in cg.weight_sites})
    stats.metrics.update(groups_pruned=len({cg.root(g) for g in drop}), layer_params_before=before,
                         layer_params_after=after, apply="remove_channels")


def _producer_problem(layer: Layer, graph: ir.Graph) -> str | None:
    if layer.node.graph is not graph:
        return "remove_channels: inside a subgraph"
    if layer.shared:
        return "remove_channels: its weight is shared"
    if layer.node.op_type == "Conv" and layer.group != 1:
        return "remove_channels: grouped Conv (its channels follow its input)"
    if layer.node.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0):
        return "remove_channels: Gemm with transA"
    return None


def _choose(cg: ChannelGroups, root: int, members: list[int], size: int, index, scores, old_masks, cfg, rng):
    """Channels of one group to remove: earlier dead ones plus ``amount`` of the live ones."""
    dead = np.ones(size, bool)
    for g in members:
        i = index[id(cg.producers[g].node)]
        dead &= ~old_masks[i].reshape(size, -1).any(axis=1)
    live = np.flatnonzero(~dead)
    k = M.count_to_prune(cfg.amount, live.size)
    if k == 0:
        return np.flatnonzero(dead)
    if rng is not None:
        draws = rng.rand24(live.size)
        gone = live[draws <= np.sort(draws)[k - 1]]
        return np.union1d(np.flatnonzero(dead), gone)
    n = cfg.norm_order
    total = np.zeros(size)
    member_set = set(members)
    for layer, axis, lay in cg.weight_sites:
        if axis != cfg.dim:
            continue
        if cfg.dim == 0 and id(layer.node) not in index or cfg.dim == 0 and lay.gid[0] not in member_set:
            continue
        i = index.get(id(layer.node))
        s = scores[i] if i is not None and scores[i] is not None else np.abs(layer.weight())
        if i is not None and old_masks[i] is not None:
            s = s * old_masks[i]
        per_pos = M.channel_norms(s, n, axis) if not np.isinf(n) else M.channel_norms(s, n, axis)
        for p in np.flatnonzero(np.isin(lay.gid, list(member_set))):
            c = lay.idx[p]
            total[c] = max(total[c], per_pos[p]) if np.isinf(n) else total[c] + per_pos[p] ** n
    norms = total if np.isinf(n) else total ** (1.0 / n)
    gone = live[np.argsort(norms[live], kind="stable")[:k]]
    return np.union1d(np.flatnonzero(dead), gone)


def _remove(graph: ir.Graph, cg: ChannelGroups, drop: dict[int, np.ndarray]) -> None:
    """The one removal routine: every site deletes the positions whose (group, channel) goes."""
    def gone(lay: Layout) -> np.ndarray:
        out = np.zeros(len(lay.gid), bool)
        for g, chans in drop.items():
            hit = lay.gid == g
            out[hit] = np.isin(lay.idx[hit], chans)
        return out

    names = Names(graph)
    per_layer: dict[int, tuple[Layer, dict[int, np.ndarray]]] = {}
    for layer, axis, lay in cg.weight_sites:
        cut = gone(lay)
        if cut.any():
            per_layer.setdefault(id(layer.node), (layer, {}))[1][axis] = np.flatnonzero(cut)
    for layer, axes in per_layer.values():
        w, bias = layer.weight(), layer.bias()
        for axis, pos in sorted(axes.items(), reverse=True):
            w = np.delete(w, pos, axis=axis)
        layer.set_weight(np.ascontiguousarray(w))
        if 0 in axes and bias is not None:
            layer.set_bias(np.delete(bias, axes[0]))
    for layer, lay in cg.depthwise:
        if gone(lay).any():
            layer.node.attributes["group"] = ir.AttrInt64("group", int((~gone(lay)).sum()))
    for node, i, lay in cg.const_sites:
        cut = gone(lay)
        if not cut.any():
            continue
        const = constant_array(node.inputs[i])
        axis = const.ndim + lay.axis if lay.rank != 1 else 0
        new = add_initializer(graph, names, node.inputs[i].name or "param", np.delete(const, np.flatnonzero(cut), axis))
        old = node.inputs[i]
        node.replace_input_with(i, new)
        if not old.uses() and old.name in graph.initializers and not old.is_graph_output():
            graph.initializers.pop(old.name)
    for node, parts in cg.split_sites:
        sizes = [int((~gone(p)).sum()) for p in parts]
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            node.replace_input_with(1, add_initializer(graph, names, "split", np.array(sizes, np.int64)))
        elif node.attributes.get_ints("split", None) is not None or _opset_below_13(node):
            node.attributes["split"] = ir.AttrInt64s("split", sizes)
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, add_initializer(graph, names, "split", np.array(sizes, np.int64)))
        node.attributes.pop("num_outputs", None)
    for node, lay in cg.reshape_sites:
        shape = constant_array(node.inputs[1]).copy()
        shape[1] = shape[1] // len(lay.gid) * int((~gone(lay)).sum())
        node.replace_input_with(1, add_initializer(graph, names, "shape", shape.astype(np.int64)))
    for value, lay in cg.values:  # stale static shapes would contradict the new channel counts
        if gone(lay).any() and not value.is_graph_output():
            value.shape = None


def _opset_below_13(node: ir.Node) -> bool:
    graph = node.graph
    model_opset = graph.opset_imports.get("", 13) if graph is not None else 13
    return model_opset < 13
