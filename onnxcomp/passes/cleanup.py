"""``cleanup``: graph tidying that changes no result, run before and after compression.

Steps (each can be switched off):
- ``fold_constants``: evaluate subgraphs whose inputs are all constant (onnxscript's
  folder on onnx-ir), e.g. the Transpose/Reshape of weights that TF/JAX exporters
  emit, so later passes see plain weight initializers. Quantize/Dequantize nodes,
  and the Cast of an int8/uint8 constant (a weight stored int8 and rescaled in
  float, quantize_static's ``weight_only``), are never folded (that would undo
  quantization).
- ``fold_batchnorm``: Conv → BatchNormalization (inference mode, constant
  statistics, the Conv output used only there) becomes one Conv with rescaled
  weights and bias: W' = W·γ/√(σ²+ε) per output channel, b' = (b−μ)·γ/√(σ²+ε)+β.
- ``identity``: Identity nodes removed (onnx-ir's IdentityEliminationPass).
- ``unused``: nodes, initializers and opsets nobody uses removed.
- ``deduplicate``: identical initializers shared.
- ``topological_sort``: nodes ordered producers first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common
from pydantic import Field

from onnxcomp.graph import Names, add_initializer, constant_array, is_standard, label
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register

__all__ = ["Cleanup", "fold_batchnorm"]

_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits"}


class CleanupConfig(PassConfig):
    fold_constants: bool = Field(True, description="evaluate nodes whose inputs are all constant")
    fold_limit: int = Field(1 << 24, ge=0, description="largest input (elements) the folder evaluates")
    fold_batchnorm: bool = Field(True, description="merge BatchNormalization into the preceding Conv")
    identity: bool = Field(True, description="remove Identity nodes")
    unused: bool = Field(True, description="remove unused nodes, initializers and opsets")
    deduplicate: bool = Field(True, description="share identical initializers")
    topological_sort: bool = Field(True, description="order nodes producers-first")


@register
class Cleanup(CompressionPass):
    """Tidy the graph without changing any result: fold constant subgraphs and Conv+BatchNorm,
    remove Identity and unused nodes/initializers/opsets, share duplicate initializers, sort.

    Guarantees the same outputs up to float rounding (BatchNorm folding rescales weights); never
    folds Quantize/DequantizeLinear, never copies a weight that other nodes still read, keeps the
    Identity nodes a subgraph needs for its outputs. Each step can be switched off.
    """

    name = "cleanup"
    summary = "constant folding, Conv+BatchNorm folding, identity/unused removal, topological sort"
    Config = CleanupConfig

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: CleanupConfig = self.config
        before = _node_count(model)
        if cfg.fold_constants:
            self._fold_constants(model, stats)
        if cfg.fold_batchnorm:
            for conv, bn in fold_batchnorm(model.graph):
                stats.touch(f"{bn}: folded into {conv}")
        if cfg.identity:
            n = _node_count(model)
            SubgraphSafeIdentityElimination()(model)
            _note(stats, "identity nodes removed", n - _node_count(model))
        if cfg.unused:
            n = _node_count(model)
            inits = len(model.graph.initializers)
            ir_common.RemoveUnusedNodesPass()(model)
            ir_common.RemoveUnusedOpsetsPass()(model)
            _note(stats, "unused nodes removed", n - _node_count(model))
            _note(stats, "unused initializers removed", inits - len(model.graph.initializers))
        if cfg.deduplicate:
            inits = len(model.graph.initializers)
            ir_common.DeduplicateInitializersPass()(model)
            _note(stats, "duplicate initializers shared", inits - len(model.graph.initializers))
        if cfg.topological_sort:
            ir_common.TopologicalSortPass()(model)
        removed = before - _node_count(model)
        if removed:
            stats.touch(f"{removed} nodes removed in all")
        stats.metrics["nodes_before"] = before
        stats.metrics["nodes_after"] = _node_count(model)

    def _fold_constants(self, model: ir.Model, stats: PassStats) -> None:
        from onnxscript.optimizer import fold_constants

        n = _node_count(model)
        limit = self.config.fold_limit
        fold_constants(
            model,
            input_size_limit=limit,
            output_size_limit=limit,
            should_fold=_should_fold,
        )
        # the folder leaves Constant nodes behind: keep weights as initializers
        ir_common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
        ir_common.RemoveUnusedNodesPass()(model)
        _note(stats, "nodes folded into constants", n - _node_count(model))


_SHARED_CONSTANT = 1024  # elements: a constant this large that other nodes still read is not copied


def _should_fold(node: ir.Node) -> bool | None:
    """False for nodes whose folding would copy a weight: a large constant input that other nodes
    also read stays alive, so folding would store it twice (the model grows). None: the folder decides."""
    if node.op_type in _NEVER_FOLD or _int8_weight_cast(node):
        return False
    for value in node.inputs:
        const = value.const_value if value is not None else None
        if const is not None and const.size >= _SHARED_CONSTANT and len(value.uses()) > 1:
            return False
    return None


def _int8_weight_cast(node: ir.Node) -> bool:
    """A Cast reading an int8/uint8 constant: a weight stored int8, rescaled in float at run time."""
    x = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
    const = x.const_value if x is not None else None
    return const is not None and const.dtype in (ir.DataType.INT8, ir.DataType.UINT8)


def fold_batchnorm(graph: ir.Graph) -> list[tuple[str, str]]:
    """Fold every eligible Conv → BatchNormalization pair of ``graph``; return (conv, bn) labels."""
    folded = []
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or not is_standard(bn):
            continue
        if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
            continue
        if bn.attributes.get_int("training_mode", 0):
            continue
        x = bn.inputs[0]
        conv = x.producer() if x is not None else None
        if conv is None or conv.op_type != "Conv" or not is_standard(conv):
            continue
        if len(x.uses()) != 1 or x.is_graph_output():
            continue
        consts = [constant_array(v) for v in bn.inputs[1:5]]
        weight = constant_array(conv.inputs[1])
        if weight is None or any(c is None for c in consts):
            continue
        bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        gamma, beta, mean, var = (c.astype(np.float64) for c in consts)
        eps = bn.attributes.get_float("epsilon", 1e-5)
        scale = gamma / np.sqrt(var + eps)
        w = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
        b = ((bias.astype(np.float64) if bias is not None else 0.0) - mean) * scale + beta
        dtype, names = weight.dtype, Names(graph)
        w_value = add_initializer(graph, names, f"{conv.name or 'conv'}_bnfold_W", w.astype(dtype))
        b_value = add_initializer(graph, names, f"{conv.name or 'conv'}_bnfold_B", b.astype(dtype))
        conv.replace_input_with(1, w_value)
        if len(conv.inputs) > 2:
            conv.replace_input_with(2, b_value)
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, b_value)
        y = bn.outputs[0]
        x.shape = y.shape or x.shape
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        x.name = y.name  # keep the tensor (maybe a graph output) under the name users know
        folded.append((label(conv), label(bn)))
    return folded


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _note(stats: PassStats, what: str, count: int) -> None:
    if count:
        stats.notes.append(f"{count} {what}")


class SubgraphSafeIdentityElimination(ir_common.IdentityEliminationPass):
    """onnx-ir's identity elimination, keeping the Identity nodes that give a graph its outputs
    from values of another scope.

    ``y = Identity(x)`` where ``y`` is an output of a graph (a subgraph body's output, say) stays
    when ``x`` is not produced by a node of that same graph (a graph input, an initializer, a
    value of the outer scope) or is already a graph output: removing it would leave the graph
    output not produced by any of its nodes (invalid ONNX) or rename a value of the outer graph.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and len(node.outputs) == 1:
            x, y = node.inputs[0], node.outputs[0]
            if x is not None and y.is_graph_output():
                producer = x.producer()
                if producer is None or producer.graph is not node.graph or x.is_graph_output():
                    return False
        return super()._try_eliminate_identity_node(node)

