"""``quantize_weights``: weight-only block-wise int4/int8 for onnxruntime's ``com.microsoft::MatMulNBits``.

Rewrite rules (W is the constant weight, viewed as ``[N, K]``: one row per output feature):

- ``MatMul(A, B)``, B a constant ``[K, N]`` → ``MatMulNBits(A, B_q, scales[, zero_points])``;
  a following ``Add`` of a constant ``[N]`` bias is folded into MatMulNBits' ``bias`` input.
- ``Gemm(A, B, C)`` with ``transA=0`` and constant B → ``MatMulNBits`` of ``alpha·op(B)`` (``transB``
  respected) with ``beta·C`` as its bias input when C is a constant of N elements, else ``+ Add(C)``.
- with ``quantize_embeddings``: ``Gather(E, indices)`` on axis 0 of a constant 2-D table →
  ``com.microsoft::GatherBlockQuantized`` (rows quantized in blocks along the hidden axis; tables of at
  most ``embedding_int8_rows`` rows at 8 bits).

Weights are quantized by :mod:`onnxcomp.blockquant` (block layout, scales, packing): ``rtn`` rounds
to the nearest code; ``gptq`` feeds each column's rounding error forward through the layer's
Hessian ``H = XᵀX / n``, collected for every target input in one calibration run over the float
model (:func:`onnxcomp.calibrate.collect`, ``Gram`` reducer; with ``padding_mask`` on length-sorted
batches without their padding-only columns). With ``act_order`` the block scales
are fixed from the original weights first, because MatMulNBits blocks are contiguous in K.
``bias_correction`` (layers that add a bias only) writes ``b - (W_q - W)·E[x]`` into MatMulNBits'
bias input, so the mean output error over the calibration inputs is zero, and GPTQ then minimises
``tr(ΔW Cov ΔWᵀ)`` (the inputs' covariance), the error the bias cannot cancel.

onnxruntime 1.32's CPU kernel accepts bits 2, 4 and 8 (this pass offers 4 and 8: 2-bit loses too
much on our models); GatherBlockQuantized runs on the CPU with uint8 data packed like MatMulNBits'.
``accuracy_level=4`` quantizes A to int8 per block and uses integer dot products; 0 dequantizes B and
computes in float32. At 8 bits the float path has no fast kernel on x86, and at 4 bits level 4 pays only
for single rows, hence ``auto`` (0 for 4 bits, 4 for 8 bits; MiniLM timings of both levels in
bench/minilm/peer_results.md, rows int4 / int4_acc4). Weight-only int4 saves size and memory traffic;
on CPUs without VNNI it is not faster than fp32.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxcomp.blockquant import (
    BlockQuant,
    pack_bits,
    quantize_gptq,
    quantize_rtn,
    relative_error,
)
from onnxcomp.graph import (
    Layer,
    Names,
    NodeSelection,
    add_initializer,
    constant_array,
    is_standard,
    label,
)
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register, skip_subgraph_nodes
from onnxcomp.passes.quantize.padding import PADDING_MASK_HELP, without_padding

__all__ = ["QuantizeWeights", "QuantizeWeightsConfig"]

MS_DOMAIN = "com.microsoft"
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


class QuantizeWeightsConfig(PassConfig, NodeSelection):
    """Node selection: ``include`` / ``exclude`` entries also match the weight's (table's) name."""

    renamed_options: ClassVar[dict[str, str]] = {"min_size": "min_params"}

    bits: Literal[4, 8] = Field(4, description="bits per weight (ORT's CPU MatMulNBits runs 2, 4 and 8)")
    block_size: Literal[32, 64, 128] = Field(32, description="weights per quantization block along K")
    symmetric: bool = Field(False, description="zero point fixed at 2^(bits-1) (not stored); default: one per "
                                               "block (more accurate, as fast, ~1.5 % more bytes at int4/32)")
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="round-to-nearest, or GPTQ error feedback (needs --calib)")
    accuracy_level: Literal["auto", 0, 1, 4] = Field(
        "auto", description="MatMulNBits accuracy_level: 4 = A quantized to int8 per block, integer dot products; "
                            "0/1 = float32. auto: 0 for 4 bits, 4 for 8 bits (the faster on x86 CPUs, "
                            "see module doc)")
    damp: float = Field(0.01, gt=0, le=1, description="gptq: damping added to diag(H), as a fraction of its mean")
    act_order: bool = Field(True, description="gptq: quantize columns by decreasing Hessian diagonal")
    range_search: bool = Field(False, description="per block, shrink the range if that lowers the squared error")
    bias_correction: bool = Field(
        False, description="needs --calib: in layers that have a bias, the bias absorbs the mean output error "
                           "(W_q - W)·E[x], and gptq fits the rounding to the inputs' covariance instead of XᵀX/n: "
                           "the part of the error a bias cannot cancel. Layers without a bias are left as they "
                           "are (a constant shift breaks what follows a bias-free product, e.g. the log of a mel "
                           "spectrogram: cosine 1.0 -> 0.965)")
    padding_mask: str | None = Field(None, min_length=1, description="gptq / bias_correction: " + PADDING_MASK_HELP)
    fold_bias: bool = Field(True, description="fold a following Add of a constant [N] bias into MatMulNBits")
    quantize_embeddings: bool = Field(False, description="Gather on constant 2-D tables -> GatherBlockQuantized")
    embedding_int8_rows: int = Field(
        0, ge=0, description="tables of at most this many rows get 8 bits whatever bits says: position and "
                             "token-type tables, small, read by every input, and with outliers (MiniLM's position "
                             "table reaches 75x its std: int4 costs 0.0007 cosine, int8 nothing); 0: none")

    @property
    def kernel_accuracy_level(self) -> int:
        """The accuracy_level written into MatMulNBits nodes."""
        if self.accuracy_level == "auto":
            return 4 if self.bits == 8 else 0
        return self.accuracy_level


@register
class QuantizeWeights(CompressionPass):
    """Weight-only block-wise int4/int8: MatMul/Gemm with a constant weight → com.microsoft
    MatMulNBits (bias folded in), optionally Gather embeddings → GatherBlockQuantized.

    ``method: rtn`` needs no data; ``gptq`` and ``bias_correction`` need ``--calib`` (refused before
    any pass runs without it). Activations stay float: the gain is size and memory traffic.
    """

    name = "quantize_weights"
    summary = ("weight-only block-wise int4/int8 MatMul/Gemm (ORT MatMulNBits), RTN or GPTQ, bias correction; "
               "optional embeddings")
    Config = QuantizeWeightsConfig
    needs_calibration = False  # only gptq / bias_correction need it (calibration_needed): checked before any work

    @classmethod
    def calibration_needed(cls, config: PassConfig) -> bool:
        return getattr(config, "method", "rtn") == "gptq" or getattr(config, "bias_correction", False)

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: QuantizeWeightsConfig = self.config
        if self.calibration_needed(cfg):
            self.context.require_calib(_uses_data(cfg))
        graph = model.graph
        targets = [t for node in list(graph) if (t := self._target(node, stats)) is not None]
        moments = self._input_moments(model, targets, stats) if self.calibration_needed(cfg) and targets else {}
        _note_few_rows(stats, targets, moments, cfg)
        errors: dict[str, float] = {}
        bytes_before = bytes_after = uncorrected = 0
        names = Names(graph)
        for target in targets:
            m = moments.get(target.input_name)
            correct = cfg.bias_correction and m is not None and _has_bias(target)
            uncorrected += cfg.bias_correction and m is not None and not correct
            h = None if m is None or cfg.method != "gptq" else m.covariance if correct else m.second
            if h is None:
                quant = quantize_rtn(target.weight, cfg.bits, cfg.block_size, cfg.symmetric, target.dtype,
                                     search=cfg.range_search)
            else:
                quant = quantize_gptq(target.weight, h, cfg.bits, cfg.block_size, cfg.symmetric, target.dtype,
                                      damp=cfg.damp, act_order=cfg.act_order, search=cfg.range_search)
            errors[target.node.name] = relative_error(target.weight, quant.dequantize(), h)
            shift = None
            if correct:  # the mean of the output error, cancelled by the bias
                shift = -((quant.dequantize().astype(np.float64) - target.weight) @ m.mean)
            bytes_before += target.weight.size * np.dtype(target.dtype).itemsize
            bytes_after += _rewrite_matmul(graph, names, target, quant, cfg, shift)
            method = "gptq" if h is not None else "rtn"
            padded = f" (K padded to {quant.codes.shape[1]})" if quant.codes.shape[1] != target.k else ""
            stats.touch(f"{label(target.node)}: K={target.k} N={target.n} -> MatMulNBits "
                        f"{cfg.bits}-bit/{cfg.block_size}{padded} ({method}), "
                        f"rel. error {errors[target.node.name]:.2e}")
            target._weight = None
        if targets:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            stats.notes.append("rel. error: " + (
                "weight error |dW|^2/|W|^2" if cfg.method != "gptq" else
                "output error on calibration inputs, tr(dW H dWt)/tr(W H Wt)"
                + (", H = covariance where the bias takes the mean error" if cfg.bias_correction else "")))
            if cfg.bias_correction:
                stats.notes.append("bias_correction: (W_q - W)·E[x] subtracted through MatMulNBits' bias input"
                                   + (f"; {uncorrected} layer(s) without a bias left uncorrected" if uncorrected
                                      else ""))
        skip_subgraph_nodes(stats, graph, ("MatMul", "Gemm"), "left float (quantize_weights rewrites the main "
                            "graph only)")
        if cfg.quantize_embeddings:
            b, a = quantize_gathers(model, cfg, stats)
            bytes_before, bytes_after = bytes_before + b, bytes_after + a
        else:
            stats.notes.append("embeddings (Gather) left in float: "
                               "set quantize_embeddings to use GatherBlockQuantized")
        stats.metrics.update(
            quantized_matmuls=len(targets), layer_error=errors, accuracy_level=cfg.kernel_accuracy_level,
            weight_bytes_before=bytes_before, weight_bytes_after=bytes_after,
        )

    # -- eligibility -----------------------------------------------------------------------------

    def _target(self, node: ir.Node, stats: PassStats) -> _Target | None:
        """The MatMul/Gemm ``node`` as a quantization target, or None (with a skip reason when relevant)."""
        if node.op_type not in ("MatMul", "Gemm") or not is_standard(node):
            return None
        what = label(node)
        layer = Layer.of(node, runtime_bias=True)
        if isinstance(layer, str):
            stats.skip(what, layer)
            return None
        array = constant_array(layer.weight_value)
        if ir.DataType.from_numpy(array.dtype) not in _FLOAT_TYPES:
            stats.skip(what, f"weight type {array.dtype} is not float32/float16")
            return None
        why = _unselected(self.config, node, layer.weight_value, array.size)
        if why:
            stats.skip(what, why)
            return None
        if node.attributes.get_int("transA", 0):
            stats.skip(what, "transA=1: MatMulNBits takes A untransposed")
            return None
        target = _Target(layer, array.dtype)
        c = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if c is None or node.attributes.get_float("beta", 1.0) == 0.0:
            return target
        bias = layer.bias()
        if bias is not None:
            target.bias = bias
        elif node.attributes.get_float("beta", 1.0) != 1.0:
            stats.skip(what, "C is not a constant [N] bias and beta != 1")
            return None
        else:
            target.add_input = c
        return target

    # -- calibration -----------------------------------------------------------------------------

    def _input_moments(self, model: ir.Model, targets: list[_Target], stats: PassStats) -> dict[str, _Moments]:
        """``XᵀX / n`` and the mean of every target's input activation, in one calibration run
        (without the padding-only columns with ``padding_mask``)."""
        from onnxcomp.calibrate import ChannelMean, Gram, collect

        data = self.context.require_calib(_uses_data(self.config))
        data = without_padding(model, data, self.config.padding_mask, stats, f"{self.name}.padding_mask")
        reducers = {name: (Gram(), ChannelMean(-1)) for name in dict.fromkeys(t.input_name for t in targets)}
        collect(model, data, {name: list(r) for name, r in reducers.items()}, batch_size=self.context.batch_size)
        return {name: _Moments(g.xtx / max(g.count, 1), mean.mean, g.count) for name, (g, mean) in reducers.items()
                if g.xtx is not None}


def _note_few_rows(stats: PassStats, targets: list[_Target], moments: dict[str, _Moments],
                   cfg: QuantizeWeightsConfig) -> None:
    """Say so when GPTQ's ``XᵀX`` of some layer rests on fewer than 2·K input rows."""
    thin = [(moments[t.input_name].rows, t.k) for t in targets
            if t.input_name in moments and moments[t.input_name].rows < 2 * t.k]
    if cfg.method == "gptq" and thin:
        rows, k = min(thin, key=lambda rk: rk[0] / rk[1])
        stats.notes.append(f"calibration data is thin for GPTQ: {len(thin)} layer(s) have fewer than 2·K input "
                           f"rows (e.g. {rows:,} rows for K={k}): XᵀX is poorly estimated, more samples help")
        stats.metrics["thin_calibration_layers"] = len(thin)


def _has_bias(target: _Target) -> bool:
    """Whether the layer adds a bias to its product (Gemm C, or a following Add of a constant [N])."""
    return target.bias is not None or target.add_input is not None or target.layer.bias_add is not None


def _uses_data(cfg: QuantizeWeightsConfig) -> str:
    """What needs the calibration data, for the error without it."""
    return "quantize_weights (" + " and ".join(
        ["method gptq"] * (cfg.method == "gptq") + ["bias_correction"] * cfg.bias_correction) + ")"


@dataclasses.dataclass(frozen=True)
class _Moments:
    """First and second moments of a layer's input over the calibration data."""

    second: np.ndarray  # XᵀX / n, [K, K]
    mean: np.ndarray  # E[x], [K]
    rows: int  # n: input rows (positions) seen

    @property
    def covariance(self) -> np.ndarray:
        """``XᵀX/n - E[x]E[x]ᵀ``: the output error a bias cannot cancel is ``ΔW Cov ΔWᵀ``."""
        return self.second - np.outer(self.mean, self.mean)


def quantize_gathers(model: ir.Model, cfg: QuantizeWeightsConfig, stats: PassStats) -> tuple[int, int]:
    """Gather on axis 0 of constant 2-D float tables -> GatherBlockQuantized at ``cfg.bits`` (8 for
    tables of at most ``cfg.embedding_int8_rows`` rows) / ``cfg.block_size`` (round to nearest);
    returns the table bytes before and after. Shared by
    quantize_weights and the int8 passes (their ``quantize_embeddings`` option)."""
    before = after = 0
    names = Names(model.graph)
    for node in list(model.graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
            continue
        table = node.inputs[0]
        if table is None or table.const_value is None or table.is_graph_input() \
                or table.const_value.dtype not in _FLOAT_TYPES:
            continue  # shape arithmetic and the like: not an embedding
        what = label(node)
        array = table.const_value.numpy()
        bits = 8 if array.ndim == 2 and array.shape[0] <= cfg.embedding_int8_rows else cfg.bits
        reason = _gather_skip_reason(node, array, bits) or _unselected(cfg, node, table, array.size)
        if reason:
            stats.skip(what, reason)
            continue
        quant = quantize_rtn(array.astype(np.float64), bits, cfg.block_size, cfg.symmetric, array.dtype,
                             search=cfg.range_search)
        before += array.nbytes
        after += _rewrite_gather(model.graph, names, node, quant, cfg)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        stats.touch(f"{what}: {array.shape[0]}x{array.shape[1]} table -> GatherBlockQuantized "
                    f"{bits}-bit/{cfg.block_size} (rtn), rel. error "
                    f"{relative_error(array.astype(np.float64), quant.dequantize()):.2e}")
    return before, after


def _unselected(cfg: QuantizeWeightsConfig, node: ir.Node, weight: ir.Value, size: int) -> str | None:
    """Why the node selection leaves ``node`` alone; its entries match the weight's name too."""
    by_weight = ir.Node("", node.op_type, [], name=weight.name or "")
    if cfg.include and not (cfg.selects(node) or cfg.selects(by_weight)):
        return "not matched by include"
    return NodeSelection(exclude=cfg.exclude).why_not(node) or NodeSelection(exclude=cfg.exclude).why_not(by_weight) \
        or NodeSelection(min_params=cfg.min_params).why_not(node, size)


@dataclasses.dataclass
class _Target:
    """A MatMul/Gemm to rewrite: its weight as ``[N, K]`` float64, and (Gemm) its bias or C input."""

    layer: Layer
    dtype: np.dtype
    bias: np.ndarray | None = None
    add_input: ir.Value | None = None  # a C that must stay a separate Add
    _weight: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def weight(self) -> np.ndarray:
        """``[N, K]`` float64, made when first needed and dropped once the layer is rewritten: one
        layer's float64 copy at a time, never the whole model's (models of several GB)."""
        if self._weight is None:
            self._weight = self.layer.weight().astype(np.float64)
        return self._weight

    @property
    def node(self) -> ir.Node:
        return self.layer.node

    @property
    def input_name(self) -> str:
        return self.node.inputs[0].name

    @property
    def n(self) -> int:
        return self.layer.shape[0]

    @property
    def k(self) -> int:
        return self.layer.shape[1]


def _gather_skip_reason(node: ir.Node, table: np.ndarray, bits: int) -> str | None:
    if table.ndim != 2:
        return f"table has rank {table.ndim}; only 2-D embedding tables are quantized"
    if node.attributes.get_int("axis", 0) not in (0, -2):
        return "gathers along the hidden axis"
    if (table.shape[1] * bits) % 8:
        return f"hidden size {table.shape[1]} does not fill whole bytes at {bits} bits"
    return None


# -- graph rewriting -----------------------------------------------------------------------------


def _rewrite_matmul(graph: ir.Graph, names: Names, target: _Target, quant: BlockQuant,
                    cfg: QuantizeWeightsConfig, shift: np.ndarray | None = None) -> int:
    """Replace ``target.node`` by MatMulNBits (+ Add), ``shift`` [N] added to its bias; returns the bytes
    of the new initializers."""
    node, n, k = target.node, target.n, target.k
    base = node.inputs[1].name or node.name or "weight"
    blocks = quant.scales.shape[1]
    packed = pack_bits(quant.codes.reshape(n, blocks, quant.block_size), quant.bits)
    inputs = [node.inputs[0], add_initializer(graph, names, f"{base}_q{quant.bits}", packed),
              add_initializer(graph, names, f"{base}_scales", quant.scales)]
    zero_points = None if cfg.symmetric else pack_bits(quant.zero_points, quant.bits)
    inputs.append(None if zero_points is None else add_initializer(graph, names, f"{base}_zp", zero_points))
    output = node.outputs[0]
    bias, add = target.bias, target.add_input
    if bias is None and add is None and cfg.fold_bias:
        bias, output = _foldable_bias(target.layer, target.dtype)
    if shift is not None:
        bias = (shift if bias is None else np.asarray(bias, np.float64) + shift).astype(target.dtype)
    if bias is not None:  # inputs: A, B, scales, zero_points, g_idx, bias
        inputs += [None, add_initializer(graph, names, f"{base}_bias", bias)]
    attrs = {"K": k, "N": n, "bits": quant.bits, "block_size": quant.block_size}
    if cfg.kernel_accuracy_level:
        attrs["accuracy_level"] = cfg.kernel_accuracy_level
    while inputs[-1] is None:
        inputs.pop()
    new = ir.node("MatMulNBits", inputs, attrs, domain=MS_DOMAIN, name=names(f"{node.name}_MatMulNBits"))
    replaced = [new]
    if add is not None:
        replaced.append(ir.node("Add", [new.outputs[0], add], name=names(f"{node.name}_bias")))
    _replace(graph, node, output, replaced)
    transpose = target.layer.transpose
    if transpose is not None and not transpose.outputs[0].uses():  # the weight was read through it
        _replace_dead(graph, transpose)
    return _nbytes(inputs[1:])


def _foldable_bias(layer: Layer, dtype) -> tuple[np.ndarray | None, ir.Value]:
    """A MatMul's bias Add of a constant [N] / [1, N] of the weight's dtype: that bias and the Add's
    output; else (None, the MatMul's output)."""
    add, n = layer.bias_add, layer.out_features
    if add is None:
        return None, layer.node.outputs[0]
    array = constant_array(layer._bias_value())
    if array.dtype != dtype or array.shape not in ((n,), (1, n)):
        return None, layer.node.outputs[0]
    return array.reshape(n), add.outputs[0]


def _rewrite_gather(graph: ir.Graph, names: Names, node: ir.Node, quant: BlockQuant,
                    cfg: QuantizeWeightsConfig) -> int:
    """Replace Gather by GatherBlockQuantized (uint8 data packed along the hidden axis)."""
    base = node.inputs[0].name or node.name or "table"
    rows = quant.codes.shape[0]
    data = pack_bits(quant.codes[:, : quant.k], quant.bits).reshape(rows, -1)
    inputs = [add_initializer(graph, names, f"{base}_q{quant.bits}", data), node.inputs[1],
              add_initializer(graph, names, f"{base}_scales", quant.scales)]
    if not cfg.symmetric:
        inputs.append(add_initializer(graph, names, f"{base}_zp", pack_bits(quant.zero_points, quant.bits)))
    attrs = {"bits": quant.bits, "block_size": quant.block_size, "gather_axis": 0, "quantize_axis": 1}
    new = ir.node("GatherBlockQuantized", inputs, attrs, domain=MS_DOMAIN,
                  name=names(f"{node.name}_GatherBlockQuantized"))
    _replace(graph, node, node.outputs[0], [new])
    return _nbytes(inputs[:1] + inputs[2:])


def _replace(graph: ir.Graph, node: ir.Node, output: ir.Value, new_nodes: list[ir.Node]) -> None:
    """Insert ``new_nodes`` before ``node``; the last one's output takes over ``output`` (name included);
    ``node`` and anything between it and ``output`` (a folded Add) are removed, with the initializers
    only they used."""
    graph.insert_before(node, new_nodes)
    result = new_nodes[-1].outputs[0]
    result.shape, result.type = output.shape, output.type
    dead = [output.producer()] if output.producer() is not node else []
    name = output.name
    output.replace_all_uses_with(result, replace_graph_outputs=True)
    for old in [*dead, node]:
        _replace_dead(graph, old)
    result.name = name


def _replace_dead(graph: ir.Graph, node: ir.Node) -> None:
    """Remove ``node`` (nothing reads its outputs) and the initializers only it read."""
    inputs = list(node.inputs)
    graph.remove(node, safe=True)
    for value in inputs:  # weights nobody uses any more
        if value is not None and value.name in graph.initializers and not value.uses() \
                and not value.is_graph_output():
            del graph.initializers[value.name]


def _nbytes(values: list[ir.Value | None]) -> int:
    return sum(v.const_value.nbytes for v in values if v is not None and v.const_value is not None)
