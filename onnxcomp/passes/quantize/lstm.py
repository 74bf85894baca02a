"""LSTM -> onnxruntime's ``com.microsoft.DynamicQuantizeLSTM``: int8 W and R, activations quantized at run time.

onnxruntime has no QDQ form of LSTM (a DequantizeLinear in front of its weights is folded back to
float), so an LSTM left to the QDQ planner keeps its float weights: a model that is mostly LSTM
does not shrink. DynamicQuantizeLSTM takes the weights as int8, transposed (W ``[dirs, input, 4H]``,
R ``[dirs, H, 4H]``), with symmetric scales per gate row (``[dirs, 4H]``) or per direction
(``[dirs]``), and runs the gate MatMuls as u8s8 integer kernels; the recurrence, biases, peepholes
and states stay float. Both ``quantize_dynamic`` and ``quantize_static`` call
:func:`quantize_lstms` (an LSTM reads a float input either way).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import Names, add_initializer, constant_array, is_standard, label
from onnxcomp.qparams import weight_params

__all__ = ["quantize_lstms"]

MS_DOMAIN = "com.microsoft"
_INPUTS = 8  # X, W, R, B, sequence_lens, initial_h, initial_c, P


def quantize_lstms(model: ir.Model, config) -> list[tuple[str, str | None]]:
    """Rewrite every eligible LSTM of ``model``'s main graph in place; (node, why skipped or None).

    ``config``: a quantize_dynamic / quantize_static config (per_channel, weight_method,
    reduce_range, target, and the node selection). The outputs keep their names and values.
    """
    graph = model.graph
    names = Names(graph)
    report = []
    for node in list(graph):
        if node.op_type != "LSTM" or not is_standard(node):
            continue
        why = _ineligible(node)
        if why is None:
            params = sum(constant_array(node.inputs[i]).size for i in (1, 2))
            why = config.why_not(node, params)
        if why is None:
            _rewrite(graph, names, node, config)
        report.append((label(node), why))
    if any(why is None for _, why in report):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return report


def _ineligible(node: ir.Node) -> str | None:
    if node.attributes.get_int("layout", 0) != 0:
        return "layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute"
    for index, what in ((1, "W"), (2, "R")):
        value = node.inputs[index] if len(node.inputs) > index else None
        array = constant_array(value) if value is not None else None
        if array is None or array.ndim != 3 or array.dtype != np.float32:
            return f"its weight {what} is not a constant float32 [dirs, 4H, *] tensor"
    x = node.inputs[0]
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        return f"input X is {x.dtype.name}, not float32"
    return None


def _rewrite(graph: ir.Graph, names: Names, node: ir.Node, config) -> None:
    base = node.name or node.outputs[0].name or "lstm"
    quantized = []
    for index, what in ((1, "W"), (2, "R")):
        w = constant_array(node.inputs[index])  # [dirs, 4H, n]
        dirs, rows, cols = w.shape
        if config.per_channel:
            params, q = weight_params(w.reshape(dirs * rows, cols), 0, method=config.weight_method,
                                      reduce_range=config.reduce_range, target=config.target)
            scale = params.scale.reshape(dirs, rows)
        else:
            pairs = [weight_params(w[d], None, method=config.weight_method, reduce_range=config.reduce_range,
                                   target=config.target) for d in range(dirs)]
            scale = np.array([np.asarray(p.scale).reshape(()) for p, _ in pairs], np.float32)
            q = np.stack([qd for _, qd in pairs])
        q = np.ascontiguousarray(q.reshape(dirs, rows, cols).transpose(0, 2, 1))  # [dirs, n, 4H]
        quantized.append((add_initializer(graph, names, f"{base}_{what}_quantized", q),
                          add_initializer(graph, names, f"{base}_{what}_scale", scale.astype(np.float32)),
                          add_initializer(graph, names, f"{base}_{what}_zero_point", np.zeros(scale.shape, np.int8))))
    rest = [node.inputs[i] if len(node.inputs) > i else None for i in range(3, _INPUTS)]
    (wq, ws, wz), (rq, rs, rz) = quantized
    attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values() if a.name != "layout"]
    new = ir.Node(MS_DOMAIN, "DynamicQuantizeLSTM", [node.inputs[0], wq, rq, *rest, ws, wz, rs, rz],
                  attributes, num_outputs=len(node.outputs), name=names(f"{base}_quant"))
    graph.insert_before(node, new)
    for old, out in zip(node.outputs, new.outputs):
        out.type, out.shape = old.type, old.shape
        if old.name:
            old.replace_all_uses_with(out, replace_graph_outputs=True)
    kept = [old.name for old in node.outputs]
    weights = [node.inputs[1], node.inputs[2]]
    graph.remove(node, safe=True)
    for value in weights:  # the float W and R, unless something else reads them
        if value.uses() or value.is_graph_output():
            continue
        if graph.initializers.get(value.name) is value:
            graph.initializers.pop(value.name)
        elif value.producer() is not None and value.producer().op_type == "Constant":
            graph.remove(value.producer(), safe=True)
    for out, name in zip(new.outputs, kept):
        out.name = name  # "" (an output the LSTM did not produce) stays omitted
