"""``onnxcomp inspect``: what a model holds, before deciding how to compress it."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxcomp.data import model_inputs
from onnxcomp.model import load_model
from onnxcomp.report import mac_shapes_text, model_summary

__all__ = ["describe", "print_description"]


def describe(path: str | os.PathLike, data: str | os.PathLike | None = None) -> dict[str, Any]:
    """Ops, parameters, sizes, opsets, inputs/outputs, weight forms, subgraphs, custom domains.

    MACs are per sample at the dynamic dims of ``data``'s first feed (as ``onnxcomp run`` counts
    them with that data), else at the rule of :func:`onnxcomp.report.mac_input_shapes`."""
    raw = load_model(path, lift_constants=False)
    forms = Counter()
    for graph in (raw.graph, *raw.graph.subgraphs()):
        for value in graph.initializers.values():
            external = isinstance(value.const_value, ir.ExternalTensor)
            forms["external initializers" if external else "initializers"] += 1
    for node in ir.traversal.RecursiveGraphIterator(raw.graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
            forms["Constant nodes"] += 1
    model = load_model(path)
    shapes = None
    if data is not None:
        from onnxcomp.data import load_data

        shapes = load_data(data, model, allow_nonfinite=True).feed_shapes()
    summary = model_summary(model, path, shapes)
    subgraphs = Counter(
        node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if any(isinstance(a, ir.Attr) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values())
    )
    return {
        "path": str(path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": {d or "ai.onnx": v for d, v in sorted(model.opset_imports.items())},
        "custom_domains": sorted(d for d in model.opset_imports if d not in ("", "ai.onnx")),
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": _dims(s.dims)} for s in model_inputs(model)],
        "outputs": [{"name": v.name, "dtype": str(v.dtype.numpy()) if v.dtype else "?",
                     "shape": _dims(tuple(d if isinstance(d, int) else (d.value or None) for d in v.shape)
                                    if v.shape is not None else None)}
                    for v in model.graph.outputs],
        "weight_forms": dict(forms),
        "subgraph_ops": dict(subgraphs),
        "external_data": sorted({Path(str(v.const_value.path)).name for g in (raw.graph, *raw.graph.subgraphs())
                                 for v in g.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)}),
        **summary,
    }


def _dims(dims) -> list | None:
    return None if dims is None else [d if d is not None else "?" for d in dims]


def print_description(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title=info["path"], title_justify="left", show_header=False)
    head.add_column("key")
    head.add_column("value")
    head.add_row("producer", info["producer"] or "-")
    head.add_row("IR / opsets", f"{info['ir_version']} / " + ", ".join(f"{k} {v}" for k, v in info["opsets"].items()))
    head.add_row("custom domains", ", ".join(info["custom_domains"]) or "none")
    for spec in info["inputs"]:
        head.add_row(f"input {spec['name']}", f"{spec['dtype']} {spec['shape']}")
    for spec in info["outputs"]:
        head.add_row(f"output {spec['name']}", f"{spec['dtype']} {spec['shape']}")
    head.add_row("size", f"{info['size_bytes']:,} bytes (weights {info['weight_bytes']:,})")
    head.add_row("parameters", f"{info['params']:,} ({info['nonzero_params']:,} nonzero)")
    head.add_row("MACs / sample", (f"{info['macs']:,}" if info["macs"] is not None else "unknown")
                 + f" at {mac_shapes_text(info.get('macs_input_shapes', {}))}")
    head.add_row("weight forms", ", ".join(f"{v} {k}" for k, v in info["weight_forms"].items()) or "none")
    if info["external_data"]:
        head.add_row("external data", ", ".join(info["external_data"]))
    for key, value in info.get("metadata", {}).items():
        head.add_row(key, value)
    head.add_row("subgraphs", ", ".join(f"{v} {k}" for k, v in info["subgraph_ops"].items()) or "none")
    console.print(head)
    ops = Table(title=f"{info['nodes']} nodes", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in sorted(info["ops"].items(), key=lambda kv: -kv[1]):
        ops.add_row(op, str(count))
    console.print(ops)
