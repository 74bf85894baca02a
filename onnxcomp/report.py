"""Model measurements (size, parameters, sparsity, MACs, latency) and the run's summary.

The console table and the JSON report are built from the same dict, so they
always carry the same numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.params import count_params, nonzero_params
from onnxcomp.runtime import open_session, session_options

__all__ = [
    "count_params",
    "model_summary",
    "estimate_macs",
    "mac_input_shapes",
    "mac_shapes_text",
    "measure_latency",
    "measure_latencies",
    "print_summary",
    "write_json",
]

_MAC_OPS = {"Conv", "ConvInteger", "QLinearConv", "MatMul", "Gemm", "MatMulInteger",
            "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm",
            "MatMulNBits", "ConvTranspose", "FusedConv", "FusedMatMul"}
_ATTENTION_OPS = {"Attention", "QAttention", "MultiHeadAttention"}  # com.microsoft fused attention


def model_summary(model: ir.Model, file_path: str | os.PathLike | None = None,
                  input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Size (file or serialized), weight bytes, params, nonzero params, MACs, op counts."""
    from onnxcomp.model import model_nbytes, model_proto
    from onnxcomp.runtime import IN_MEMORY_LIMIT

    weight_bytes = model_nbytes(model)
    if file_path is not None and Path(file_path).exists():
        from onnxcomp.model import input_files

        size = sum(os.path.getsize(f) for f in input_files(file_path) if os.path.isfile(f))
    elif weight_bytes < IN_MEMORY_LIMIT:
        size = model_proto(model).ByteSize()
    else:
        size = _serialized_size(model)
    params = count_params(model)
    nonzero = nonzero_params(model)
    from onnxcomp.model import release_external

    release_external(model)  # counting read every mapped weight: unmap them
    ops = Counter(
        (node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )
    return {
        "size_bytes": size,
        "weight_bytes": weight_bytes,
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": round(1 - nonzero / params, 6) if params else 0.0,
        "macs": estimate_macs(model, input_shapes),
        "macs_input_shapes": mac_input_shapes(model, input_shapes),
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "metadata": {k: v for k, v in sorted(model.metadata_props.items()) if k.startswith("onnxcomp.")},
    }


def _serialized_size(model: ir.Model) -> int:
    """The model's serialized size, to a few bytes per tensor, without serializing its weights."""
    from onnxcomp.model import STRUCTURE_ONLY, drop_restated_value_info, structure_proto, tensor_protos

    proto = structure_proto(model)
    drop_restated_value_info(proto)
    payload = 0
    for tensor in tensor_protos(proto):
        entries = {e.key: e.value for e in tensor.external_data}
        if entries.get("location") == STRUCTURE_ONLY:
            length = int(entries["length"])
            payload += 1 + len(_varint(length)) + length  # raw_data: tag, length, bytes
            del tensor.external_data[:]
            tensor.ClearField("data_location")
    return proto.ByteSize() + payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def mac_input_shapes(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, list]:
    """The input shapes MACs are counted at: one sample (a dynamic axis 0 is 1); other dynamic
    dims from ``input_shapes`` (the data's first feed) when given, else
    :data:`onnxcomp.data.SYNTHETIC_DIM` — the same rule ``onnxcomp run`` uses without data, so
    ``inspect`` and ``run`` agree on the same inputs."""
    from onnxcomp.data import SYNTHETIC_DIM, model_inputs

    shapes = {}
    for spec in model_inputs(model):
        if spec.dims is None:
            continue
        given = (input_shapes or {}).get(spec.name)
        dims = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(1)
            elif given is not None and len(given) == len(spec.dims):
                dims.append(int(given[axis]))
            else:
                dims.append(SYNTHETIC_DIM)
        shapes[spec.name] = dims
    return shapes


def mac_shapes_text(shapes: dict[str, list]) -> str:
    """'input_ids [1, 128], attention_mask [1, 128]' (what a MAC count assumed)."""
    return ", ".join(f"{name} {dims}" for name, dims in shapes.items()) or "no inputs"


def estimate_macs(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> int | None:
    """Multiply-accumulates of one sample through Conv/MatMul/Gemm-like ops and fused attention
    (None if shapes unknown), at the input shapes of :func:`mac_input_shapes`.

    Shapes come from ONNX shape inference; where it leaves MAC ops
    without shapes (Slice on computed bounds in exported BERTs, com.microsoft fused ops),
    from onnxruntime's symbolic shape inference when it is available (it needs sympy).
    Block-quantized MatMulNBits counts like the float MatMul it replaces; Attention /
    MultiHeadAttention count their projections and the two attention products, as the
    unfused MatMuls do.
    """
    from onnxcomp.model import structure_proto

    concrete = mac_input_shapes(model, input_shapes)
    proto = structure_proto(model)
    _as_float_ops(proto)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if (not dim.HasField("dim_value") or dim.dim_value < 0) and inp.name in concrete:  # -1: dynamic
                dim.dim_value = concrete[inp.name][axis]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # shape inference fails on some custom ops: no estimate then
        return None
    total, unknown = _count_macs(inferred)
    if unknown:
        try:
            symbolic = _symbolic_shape_inference().infer_shapes(proto, auto_merge=True)
        except Exception:  # no sympy, or an op it does not know: keep the ONNX estimate
            symbolic = None
        if symbolic is not None:
            total_s, unknown_s = _count_macs(symbolic)
            if unknown_s < unknown:
                total = total_s
    return total


def _symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference, loaded from its file: importing the package
    ``onnxruntime.tools`` imports torch when it is installed (seconds), the module needs only sympy."""
    import importlib.util
    import sys

    name = "onnxruntime.tools.symbolic_shape_infer"
    module = sys.modules.get(name) or sys.modules.get("_onnxcomp_symbolic_shape_infer")
    if module is None:
        origin = importlib.util.find_spec("onnxruntime").origin
        path = Path(origin).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location("_onnxcomp_symbolic_shape_infer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_onnxcomp_symbolic_shape_infer"] = module
    return module.SymbolicShapeInference


def _count_macs(inferred: onnx.ModelProto) -> tuple[int, int]:
    """(MACs of the MAC ops whose shapes are known, number of MAC ops without shapes)."""
    shapes = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    total = unknown = 0
    for node in inferred.graph.node:
        if node.domain == "com.microsoft" and node.op_type in _ATTENTION_OPS:
            macs = _attention_macs(node, shapes)
            if macs is None:
                unknown += 1
            else:
                total += macs
            continue
        if node.op_type not in _MAC_OPS:
            continue
        out = shapes.get(node.output[0])
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "ConvTranspose"):
            w_index = 3 if node.op_type == "QLinearConv" else 1
            w = shapes.get(node.input[w_index])
            if out is None or w is None:
                unknown += 1
                continue
            per_output = int(np.prod(w[1:]))
            total += int(np.prod(out)) * per_output
        else:
            a = shapes.get(node.input[0])
            if out is None or not a:
                unknown += 1
                continue
            k = a[-1]
            if node.op_type in ("Gemm", "QGemm"):
                trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
                k = a[0] if trans_a else a[-1]
            total += int(np.prod(out)) * int(k)
    return total, unknown


def _attention_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """MACs of a com.microsoft Attention / QAttention (input projection + Q·Kᵀ + P·V) or
    MultiHeadAttention (Q·Kᵀ + P·V; its projections are separate MatMuls); past/present state
    is not counted. None when the shapes it needs are unknown."""
    def shape(index: int) -> tuple[int, ...] | None:
        return shapes.get(node.input[index]) if len(node.input) > index and node.input[index] else None

    if node.op_type in ("Attention", "QAttention"):
        x, w = shape(0), shape(1)
        if x is None or w is None or len(x) != 3 or len(w) != 2:
            return None
        batch, seq, _ = x
        sizes = next((list(a.ints) for a in node.attribute if a.name == "qkv_hidden_sizes"), None)
        q_size, _, v_size = sizes if sizes and len(sizes) == 3 else (w[1] // 3,) * 3
        return batch * seq * w[0] * w[1] + batch * seq * seq * (q_size + v_size)
    q, k, v = shape(0), shape(1), shape(2)
    if q is None:
        return None
    if len(q) == 5:  # packed QKV [batch, seq, heads, 3, head_size]
        batch, seq, heads, _, head = q
        return 2 * batch * seq * seq * heads * head
    if len(q) != 3:
        return None
    batch, seq, q_size = q
    if k is None:
        return None
    kv_len = k[1] if len(k) == 3 else k[2] if len(k) == 4 else None  # [B, L, H] or [B, N, L, head]
    if kv_len is None:
        return None
    v_size = (v[2] if len(v) == 3 else v[1] * v[3]) if v is not None and len(v) in (3, 4) else q_size
    return batch * seq * kv_len * (q_size + v_size)


def _as_float_ops(proto: onnx.ModelProto) -> None:
    """MatMulNBits -> MatMul, GatherBlockQuantized -> Gather on weight-shaped stub inputs, in place.

    ONNX shape inference does not know these com.microsoft ops: without this their outputs,
    and everything after them, have no shape, and their MACs would be lost.
    """
    types = {t.name: t.data_type for t in proto.graph.initializer}
    stubs = []
    for node in proto.graph.node:
        if node.domain != "com.microsoft" or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: a.i for a in node.attribute}
        elem = types.get(node.input[2], onnx.TensorProto.FLOAT) if len(node.input) > 2 else onnx.TensorProto.FLOAT
        stub = f"__onnxcomp_stub_{len(stubs)}"
        if node.op_type == "MatMulNBits":
            shape, inputs, new_attrs = [attrs.get("K", 0), attrs.get("N", 0)], [node.input[0], stub], []
        else:
            data = next((t for t in proto.graph.initializer if t.name == node.input[0]), None)
            if data is None or len(data.dims) != 2:
                continue
            shape = list(data.dims)
            bits = attrs.get("bits", 4)
            if data.data_type == onnx.TensorProto.UINT8 and bits < 8:
                shape[attrs.get("quantize_axis", 1) % 2] = shape[attrs.get("quantize_axis", 1) % 2] * 8 // bits
            inputs = [stub, node.input[1]]
            new_attrs = [onnx.helper.make_attribute("axis", attrs.get("gather_axis", 0))]
        stubs.append(onnx.helper.make_tensor_value_info(stub, elem, shape))
        node.op_type, node.domain = ("MatMul" if node.op_type == "MatMulNBits" else "Gather"), ""
        del node.input[:], node.attribute[:]
        node.input.extend(inputs)
        node.attribute.extend(new_attrs)
    proto.graph.input.extend(stubs)


def measure_latency(model: ir.Model, data: Dataset, *, batch: int = 1, runs: int = 30,
                    warmup: int = 5, threads: int = 0, path: str | os.PathLike | None = None) -> dict[str, float]:
    """Median and p90 milliseconds of one ``batch``-sample run (same options for every model).
    ``path``: the unchanged file of ``model`` (see :func:`onnxcomp.runtime.open_session`)."""
    return measure_latencies([(model, path)], data, batch=batch, runs=runs, warmup=warmup, threads=threads)[0]


def measure_latencies(models: list[tuple[ir.Model, str | os.PathLike | None]], data: Dataset, *, batch: int = 1,
                      runs: int = 30, warmup: int = 5, threads: int = 0, together: bool | None = None) -> list[dict]:
    """:func:`measure_latency` of each ``(model, path)`` on the same feed.

    ``together``: every session open at once and the models run round by round, the order
    alternating, so a change in the machine's load hits all of them alike (a ratio of two models
    timed one after the other on a shared CPU is mostly noise); else one after another, one
    session at a time (the default for a model with external data or past the in-memory limit:
    large models are never held side by side). Idle onnxruntime threads do not
    spin: a spinning pool steals the cores the next run needs on a busy machine.
    """
    from onnxcomp.model import has_external_tensors, model_nbytes
    from onnxcomp.runtime import IN_MEMORY_LIMIT

    if together is None:
        together = not any(has_external_tensors(m) or model_nbytes(m) >= IN_MEMORY_LIMIT for m, _ in models)
    feed = next(data.batches(batch)) if not data.fixed_batch else next(data.batches())
    options = session_options(threads=threads, spinning=False)
    times: list[list[float]] = [[] for _ in models]

    def timed(session, into: list[float]) -> None:
        start = time.perf_counter()
        session.run(None, feed)
        into.append((time.perf_counter() - start) * 1e3)

    if together:
        with contextlib.ExitStack() as stack:
            sessions = [stack.enter_context(open_session(m, options, path=p)) for m, p in models]
            for _ in range(warmup):
                for session in sessions:
                    session.run(None, feed)
            for i in range(runs):
                order = range(len(sessions)) if i % 2 == 0 else reversed(range(len(sessions)))
                for j in order:
                    timed(sessions[j], times[j])
    else:
        for (model, path), into in zip(models, times):
            with open_session(model, options, path=path) as session:
                for _ in range(warmup):
                    session.run(None, feed)
                for _ in range(runs):
                    timed(session, into)
    out = []
    for t in times:
        t.sort()
        out.append({"batch": data.samples_in(feed), "median_ms": round(statistics.median(t), 4),
                    "p90_ms": round(t[int(0.9 * (len(t) - 1))], 4), "runs": runs,
                    "interleaved": together and len(models) > 1})
    return out


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the report atomically (non-finite numbers as the strings "inf", "-inf", "nan")."""
    from onnxcomp.model import atomic_outputs

    with atomic_outputs([path]) as (tmp,):
        tmp.write_text(report_json(report), encoding="utf-8")


def report_json(report: dict[str, Any]) -> str:
    """The report as strict JSON text: non-finite floats become "inf", "-inf" or "nan"."""
    return json.dumps(_finite(report), indent=2, default=_json_default, allow_nan=False) + "\n"


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return "nan" if np.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(type(obj).__name__)


def print_summary(report: dict[str, Any], console=None) -> None:
    """The run's summary as rich tables: passes, then original vs compressed."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=False)
    passes = Table(title="passes", title_justify="left")
    for col in ("pass", "touched", "skipped", "params before → after", "seconds", "notes"):
        passes.add_column(col)
    for stats in report.get("passes", []):
        notes = "; ".join(stats["notes"][:2])
        if stats["skipped"]:
            first = stats["skipped"][0]
            notes = (notes + "; " if notes else "") + f"skipped {first['what']}: {first['why']}"
        passes.add_row(stats["name"], str(len(stats["touched"])), str(len(stats["skipped"])),
                       f"{stats['params_before']:,} → {stats['params_after']:,}",
                       f"{stats['seconds']:.2f}", notes)
    console.print(passes)
    for what, layouts in report.get("data_layout", {}).items():
        console.print(f"{what} data layout: " + "; ".join(f"{k}: {v}" for k, v in layouts.items()),
                      markup=False, soft_wrap=True)

    orig, new = report["original"], report["compressed"]
    table = Table(title="original vs compressed", title_justify="left")
    for col in ("metric", "original", "compressed", "ratio"):
        table.add_column(col, justify="right" if col != "metric" else "left")

    def row(name, a, b, fmt="{:,}", ratio=True):
        r = f"{b / a:.3f}" if ratio and a not in (None, 0) and b is not None else ""
        table.add_row(name, "-" if a is None else fmt.format(a), "-" if b is None else fmt.format(b), r)

    row("file size (bytes)", orig["size_bytes"], new["size_bytes"])
    row("parameters", orig["params"], new["params"])
    row("nonzero parameters", orig["nonzero_params"], new["nonzero_params"])
    row("MACs / sample", orig["macs"], new["macs"])
    if orig.get("macs_input_shapes"):
        table.add_row(f"  MACs counted at {mac_shapes_text(orig['macs_input_shapes'])}", "", "", "")
    row("nodes", orig["nodes"], new["nodes"])
    lat_o, lat_n = orig.get("latency"), new.get("latency")
    if lat_o and lat_n:
        row(f"latency median ms (batch {lat_o['batch']})", lat_o["median_ms"], lat_n["median_ms"], "{:.3f}")
    console.print(table)
    if report.get("latency_note"):
        console.print(f"[yellow]{report['latency_note']}[/yellow]", soft_wrap=True, highlight=False)

    fid = report.get("fidelity")
    if fid:
        table = Table(title=f"fidelity on {fid['samples']} samples of {fid['data']}", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        if fid.get("nonfinite_values"):
            table.add_row("non-finite outputs (NaN/Inf)", f"{fid['nonfinite_values']:,}")
        for key in ("accuracy_original", "accuracy_compressed", "accuracy_drop", "top1_agreement",
                    "cosine", "max_abs_error", "mean_abs_error", "kl"):
            if fid.get(key) is not None:
                table.add_row(key, f"{fid[key]:.6g}")
        console.print(table)
        if fid.get("output"):
            line = f"headline metrics of output '{fid['output']}'"
            if fid.get("mask") and fid.get("masked_outputs"):
                kept = f", {fid['mask_kept']:.1%} of positions kept" if fid.get("mask_kept") is not None else ""
                line += (f"; padding ({fid['mask']} == 0{kept}) left out of: "
                         + ", ".join(fid["masked_outputs"]))
            if fid.get("mask_note"):
                line += f"; {fid['mask_note']}"
            console.print(line, soft_wrap=True, markup=False, highlight=False)
        kind = fid.get("data_kind") or ("synthetic" if fid.get("synthetic_inputs") else None)
        if kind == "calibration":
            console.print("fidelity measured on the calibration data (no --val given)", soft_wrap=True,
                          markup=False, highlight=False)
        elif kind == "synthetic":
            console.print("[yellow]fidelity figures come from synthetic random inputs (no --val or --calib): "
                          "the gate was not checked on real data[/yellow]", soft_wrap=True, highlight=False)
        if fid.get("labels_note"):
            console.print(fid["labels_note"], soft_wrap=True, markup=False, highlight=False)
    gate = report.get("gate")
    if gate and (gate.get("checked") or gate.get("failures")):
        synthetic = gate.get("data_kind") == "synthetic"
        if gate["passed"]:
            verdict = "[yellow]held on synthetic inputs only[/yellow]" if synthetic else "[green]passed[/green]"
        else:
            verdict = "[red]FAILED[/red]"
        console.print(f"gate {verdict}" + "".join(f"\n  - {f}" for f in gate["failures"]),
                      soft_wrap=True, highlight=False)
        for line in gate.get("unchecked", []):
            console.print(f"  [yellow]{line}[/yellow]")
