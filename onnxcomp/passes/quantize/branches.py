"""Static int8 inside the branches of a main-graph ``If`` (``quantize_static``).

onnxruntime cannot expose a tensor inside a subgraph as a graph output, so calibration never
sees inside an If. Each branch that holds Conv/MatMul/Gemm is quantized as a model of its own:

1. one calibration run of the main graph captures the If's condition and every main-graph
   tensor the branch reads (its outer-scope values), feed by feed;
2. the branch body becomes a standalone model whose inputs are those values (main-graph
   initializers it reads become its own constants), calibrated on the feeds that take this
   branch (each feed is one sample: the branch runs on what the main graph gave it);
3. that model is quantized by the same :func:`quantize_static_model` as the main graph, and
   its nodes go back into the branch, reading the outer values again (new names are made
   unique against the whole model).

A branch no calibration feed takes, one whose outer values change shape from feed to feed,
and everything inside Loop/Scan bodies or nested deeper stay float with a reason. Outputs of
the If are unchanged in name and type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcomp.calibrate import collect, tensor_values
from onnxcomp.data import SAMPLE, Dataset
from onnxcomp.graph import Names, all_nodes, is_standard, label
from onnxcomp.int8_ops import COMPUTE_OPS
from onnxcomp.passes.quantize.prepare import value_types

if TYPE_CHECKING:
    from onnxcomp.passes.quantize.static import QuantizeStaticConfig, StaticResult

__all__ = ["quantize_if_branches"]

MAX_FEEDS = 256  # feeds kept per branch (each holds the branch's outer values of one run)


def quantize_if_branches(model: ir.Model, data: Dataset, config: QuantizeStaticConfig,
                         quantize: Callable[[ir.Model, Dataset], StaticResult], *,
                         batch_size: int = 32) -> tuple[list[str], list[tuple[str, str]]]:
    """Quantize the branches of ``model``'s main-graph If nodes in place (see the module docstring).

    ``quantize(branch_model, branch_data)`` quantizes one standalone branch model in place.
    Returns (touched, skipped with why), one entry per branch.
    """
    todo = []
    for node in model.graph:
        if node.op_type != "If" or not is_standard(node):
            continue
        for attr in ("then_branch", "else_branch"):
            body = node.attributes[attr].value if attr in node.attributes else None
            if body is not None and any(n.op_type in COMPUTE_OPS and is_standard(n) for n in body):
                todo.append((node, attr, body))
    if not todo:
        return [], []
    outer = {id(body): _outer_values(model.graph, body) for _, _, body in todo}
    wanted = {node.inputs[0].name for node, _, _ in todo}
    for values in outer.values():
        wanted.update(v.name for v in values if v.const_value is None)
    untyped = [v for v in tensor_values(model).values() if v.name in wanted and v.type is None]
    if untyped:  # the calibration clone makes them graph outputs, which need a type
        types = value_types(model)
        for value in untyped:
            dtype = types.get(value.name, (None, None))[0]
            value.type = ir.TensorType(dtype or ir.DataType.FLOAT)
    keep = {name: [_Keep()] for name in wanted}
    collect(model, data.head(min(len(data), config.calib_samples)), keep, batch_size=batch_size)
    touched, skipped = [], []
    names = Names(model.graph)
    for node, attr, body in todo:
        where = f"{attr} of {label(node)}"
        taken = attr == "then_branch"
        conds = keep[node.inputs[0].name][0].arrays
        feeds = [i for i, c in enumerate(conds) if bool(np.asarray(c).reshape(-1)[0]) == taken][:MAX_FEEDS]
        if not feeds:
            skipped.append((where, "left float: no calibration feed takes this branch"))
            continue
        inputs = [v for v in outer[id(body)] if v.const_value is None]
        arrays = {v.name: [keep[v.name][0].arrays[i] for i in feeds] for v in inputs}
        shapes = {k: {a.shape for a in v} for k, v in arrays.items()}
        varying = [k for k, s in shapes.items() if len(s) > 1]
        if varying:
            skipped.append((where, f"left float: its outer value '{varying[0]}' changes shape between feeds"))
            continue
        branch_data = Dataset({k: np.stack(v) for k, v in arrays.items()}, source=f"{where} (captured)",
                              layouts={k: SAMPLE for k in arrays})
        standalone, inputs_by_name = _extract(model, node, attr, outer[id(body)])
        quantize(standalone, branch_data)
        _splice(model, node, attr, body, standalone, inputs_by_name, names)
        done = sum(1 for n in node.attributes[attr].value if n.op_type == "DequantizeLinear")
        touched.append(f"{where}: quantized as its own model on {len(feeds)} calibration feeds "
                       f"({done} DequantizeLinear)")
    return touched, skipped


class _Keep:
    """Keeps every array it is given (one per feed): the outer values a branch needs."""

    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def update(self, array: np.ndarray) -> None:
        if len(self.arrays) < 4 * MAX_FEEDS:
            self.arrays.append(np.array(array))


def _outer_values(main: ir.Graph, body: ir.Graph) -> list[ir.Value]:
    """Main-graph values read inside ``body`` (nested subgraphs included), in first-use order."""
    seen, found = set(), []
    for node in all_nodes(body):
        for value in node.inputs:
            if value is not None and value.graph is main and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
    return found


def _extract(model: ir.Model, owner: ir.Node, attr: str, outer: list[ir.Value]
             ) -> tuple[ir.Model, dict[str, ir.Value]]:
    """A standalone copy of ``owner``'s branch ``attr``: inputs = its non-constant outer values,
    the main-graph constants it reads copied in as initializers."""
    clone = model.clone()
    values = tensor_values(clone) | dict(clone.graph.initializers)
    position = next(i for i, n in enumerate(model.graph) if n is owner)
    branch = list(clone.graph)[position].attributes[attr].value
    inputs, initializers = [], []
    for value in outer:
        old = values[value.name]
        new = ir.Value(name=value.name, type=old.type, shape=old.shape, const_value=old.const_value)
        for user, slot in list(old.uses()):
            if user.graph is not clone.graph:
                user.replace_input_with(slot, new)
        (initializers if old.const_value is not None else inputs).append(new)
    nodes = list(branch)
    outputs = list(branch.outputs)
    own = list(branch.initializers.values())
    branch.outputs.clear()
    branch.initializers.clear()
    branch.remove(nodes)
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=[*own, *initializers],
                     opset_imports=dict(model.opset_imports), name=branch.name or "branch")
    standalone = ir.Model(graph, ir_version=model.ir_version)
    return standalone, {v.name: v for v in inputs + initializers}


def _splice(model: ir.Model, node: ir.Node, attr: str, body: ir.Graph, standalone: ir.Model,
            inputs_by_name: dict[str, ir.Value], names: Names) -> None:
    """The quantized standalone branch back as ``node``'s ``attr``, reading the main graph's values."""
    main_values = tensor_values(model) | dict(model.graph.initializers)
    graph = standalone.graph
    copied = {v.name for v in inputs_by_name.values()}
    for value in list(graph.inputs) + [v for k, v in graph.initializers.items() if k in copied]:
        target = main_values[value.name]
        for user, slot in list(value.uses()):
            user.replace_input_with(slot, target)
    nodes = list(graph)
    outputs = list(graph.outputs)
    own = [v for k, v in graph.initializers.items() if k not in copied and (v.uses() or v.is_graph_output())]
    graph.outputs.clear()
    graph.initializers.clear()
    graph.inputs.clear()
    graph.remove(nodes)
    original = {v.name for v in body.initializers.values()} | {o.name for n in all_nodes(body) for o in n.outputs}
    for value in own + [o for n in nodes for o in n.outputs]:  # new names must not shadow the main graph's
        if value.name and value.name not in original and value.name in names.used:
            value.name = names(value.name)
        elif value.name:
            names.used.add(value.name)
    for n in nodes:
        if n.name and n.name in names.used and not any(n.name == m.name for m in all_nodes(body)):
            n.name = names(n.name)
    new_body = ir.Graph([], outputs, nodes=nodes, initializers=own, name=body.name)
    read = _outer_values(model.graph, body)
    for old in all_nodes(body):  # the old body no longer reads the main graph's values
        for slot in range(len(old.inputs)):
            old.replace_input_with(slot, None)
    node.attributes[attr] = ir.AttrGraph(attr, new_body)
    for value in read:  # a main-graph weight only the old branch read (now int8 inside it): dropped
        if value.const_value is not None and not value.uses() and not value.is_graph_output() \
                and not value.is_graph_input() and model.graph.initializers.get(value.name) is value:
            model.graph.initializers.pop(value.name)
    for domain, version in standalone.opset_imports.items():
        model.opset_imports.setdefault(domain, version)
