"""``distill`` engine ``torch``: end-to-end training of the student's float initializers.

The student graph runs op by op in torch (:class:`~onnxcomp.torch_graph.TorchGraph`)
and Adam minimises the distillation loss (the same formula as
:func:`onnxcomp.passes.distill_loss.distill_loss`, here in torch:
``α·F.cross_entropy + (1 − α)·T²·F.kl_div(log_softmax(s/T), softmax(t/T), 'batchmean')``) plus
the optional penalties ``l1 · mean|W|`` and ``nuclear · Σ‖W‖_* / √numel(W)`` over the selected
layers' weights. Trained are the float initializers that selected nodes read (not
BatchNormalization running statistics; with ``qat`` also the integer weights behind
DequantizeLinear, through fake quantization). Pruned entries (a weight with ≥ 1 % exact zeros)
get no gradient and stay exactly zero (an int8 weight under ``qat`` counts as pruned from 25 % zeros). A fifth of the calibration samples is held out; the
epoch with the lowest held-out objective (loss + penalties) wins (epoch 0 = the student as it came,
so training never makes it worse). Values go back into the same initializers; the stats compare
the written model in onnxruntime with the torch forward.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcomp.data import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import NodeSelection, find_layers
from onnxcomp.passes.base import PassStats
from onnxcomp.passes.distill_layerwise import MASK_MIN_SPARSITY, capture

if TYPE_CHECKING:
    from onnxcomp.passes.distill import DistillConfig

__all__ = ["require_torch", "train", "trainable_initializers"]

QUANTIZED_MASK_MIN_SPARSITY = 0.25


def require_torch() -> None:
    """torch is importable, else the one-line error that names the extra."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise OnnxcompError("distill engine: torch needs the [train] extra (pip install 'onnxcomp[train]')") from None


def trainable_initializers(model: ir.Model, selection: NodeSelection, qat: bool) -> set[str]:
    """Initializers the selected nodes read: float ones, and with ``qat`` the integer weights and
    int32 biases behind a DequantizeLinear; never BatchNormalization statistics or Q/DQ scales."""
    names = set()
    for node in model.graph:
        if not selection.selects(node):
            continue
        for index, value in enumerate(node.inputs):
            if value is None or value.name not in model.graph.initializers:
                continue
            if node.op_type == "BatchNormalization" and index >= 3:
                continue
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and index > 0:
                continue
            array = value.const_value
            is_float = array is not None and np.issubdtype(array.dtype.numpy(), np.floating)
            if is_float and len(array.shape) >= 1 and array.size > 1:
                names.add(value.name)
            elif qat and node.op_type == "DequantizeLinear" and index == 0:
                names.add(value.name)
    return names


def train(model: ir.Model, data: Dataset, teacher_logits: np.ndarray, labels: np.ndarray | None,
          cfg: DistillConfig, *, output: str, seed: int, stats: PassStats, selection: NodeSelection) -> None:
    """Train ``model``'s trainable initializers in place on ``data`` (see the module docstring)."""
    require_torch()
    import torch

    if any(data.layout(k) != "batch" for k in data.inputs):
        raise OnnxcompError("distill engine torch: needs batch-layout data (axis 0 = samples for every input)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: a second thread only contends (18x slower on a busy 2-core machine)
    try:
        _train(model, data, teacher_logits, labels, cfg, output=output, seed=seed, stats=stats, selection=selection)
    finally:
        torch.set_num_threads(threads)


def _train(model, data, teacher_logits, labels, cfg, *, output, seed, stats, selection) -> None:
    import torch
    import torch.nn.functional as F

    from onnxcomp.torch_graph import TorchGraph

    torch.manual_seed(seed)
    names = trainable_initializers(model, selection, cfg.qat)
    if not names:
        stats.notes.append("torch: no trainable initializer among the selected nodes")
        return
    graph = TorchGraph(model, names, qat=cfg.qat)
    masks = _masks(graph)
    layer_keys = [graph.names[lay.weight_value.name] for lay in find_layers(model.graph, selection)[0]
                  if lay.weight_value.name in graph.names]
    if cfg.qat:
        layer_keys += [graph.names[n] for n in graph.quantized if n in graph.names and graph.names[n] not in layer_keys
                       and len(model.graph.initializers[n].const_value.shape) >= 2]
    params = list(graph.params.values())
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    index = np.arange(len(data))
    is_hold = np.isin(index, _held_out_index(data, seed))
    fit_index, hold_index = index[~is_hold], index[is_hold]
    teacher_t = torch.from_numpy(np.asarray(teacher_logits, np.float32))
    labels_t = None if labels is None else torch.from_numpy(np.asarray(labels, np.int64))
    rng = np.random.default_rng(seed)
    temp, alpha = cfg.temperature, cfg.alpha

    def loss_on(rows: np.ndarray) -> torch.Tensor:
        feeds = {k: torch.from_numpy(np.ascontiguousarray(v[rows])) if data.layout(k) == "batch"
                 else torch.from_numpy(v) for k, v in data.inputs.items()}
        s = graph(feeds, [output])[0]
        t = teacher_t[rows]
        s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        kl = F.kl_div(F.log_softmax(s2 / temp, -1), F.softmax(t2 / temp, -1), reduction="batchmean") * temp ** 2
        loss = (1 - alpha) * kl
        if labels_t is not None and alpha > 0:
            loss = loss + alpha * F.cross_entropy(s2, labels_t[rows])
        return loss

    def penalty() -> torch.Tensor:
        total = torch.zeros(())
        for key in layer_keys:
            w = graph.params[key]
            if cfg.l1:
                total = total + cfg.l1 * w.abs().mean()
            if cfg.nuclear:
                total = total + cfg.nuclear * torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), "nuc") / w.numel() ** 0.5
        return total

    def held_loss() -> float:
        """Held-out objective: the loss plus the penalties (with l1/nuclear, a student equal to its
        teacher has loss 0 - without them in the criterion no epoch could ever be kept)."""
        with torch.no_grad():
            return float(sum(loss_on(hold_index[i:i + 64]) * len(hold_index[i:i + 64])
                             for i in range(0, len(hold_index), 64)) / max(len(hold_index), 1) + penalty())

    start = time.perf_counter()
    history = [held_loss()]
    best = [p.detach().clone() for p in params]
    for _ in range(cfg.epochs):
        order = rng.permutation(fit_index)
        for i in range(0, len(order), cfg.batch_size):
            rows = np.sort(order[i:i + cfg.batch_size])
            optimizer.zero_grad()
            loss = loss_on(rows) + penalty()
            loss.backward()
            with torch.no_grad():
                for key, mask in masks.items():
                    graph.params[key].grad *= mask
            optimizer.step()
            with torch.no_grad():
                for key, mask in masks.items():
                    graph.params[key] *= mask
        history.append(held_loss())
        if history[-1] <= min(history[:-1]):
            best = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    best_epoch = int(np.argmin(history))
    written = graph.write_back() if best_epoch else []
    seconds = time.perf_counter() - start
    torch_out = _torch_outputs(graph, data, output)
    onnx_out = capture(model, data, [output], 64)[output]
    stats.metrics["torch"] = {
        "trained_initializers": len(graph.names), "trained_parameters": int(sum(p.numel() for p in params)),
        "masked_initializers": len(masks), "held_out_loss_by_epoch": [round(v, 6) for v in history],
        "best_epoch": best_epoch, "train_seconds": round(seconds, 2),
        "onnxruntime_vs_torch_max_abs": float(np.abs(onnx_out - torch_out).max()),
        "qat_weights": len(graph.quantized),
    }
    if written:
        stats.touch(f"torch: {len(written)} initializers trained ({sum(p.numel() for p in params)} values), "
                    f"held-out loss {history[0]:.4g} -> {history[best_epoch]:.4g} (epoch {best_epoch})")
    else:
        stats.notes.append(f"torch: no epoch lowered the held-out loss ({history[0]:.4g}); weights kept")


def _held_out_index(data: Dataset, seed: int) -> np.ndarray:
    n = len(data)
    return np.random.default_rng(seed).permutation(n)[: max(1, n // 5)]


def _masks(graph) -> dict:
    import torch

    masks = {}
    for name, key in graph.names.items():
        w = graph.params[key].detach()
        zeros = w == 0
        # int8 weights round many small values to 0: only a clearly pruned one is masked
        least = QUANTIZED_MASK_MIN_SPARSITY if name in graph.quantized else MASK_MIN_SPARSITY
        if w.dim() >= 2 and float(zeros.float().mean()) >= least:
            masks[key] = (~zeros).to(torch.float32)
    return masks


def _torch_outputs(graph, data: Dataset, output: str) -> np.ndarray:
    import torch

    parts = []
    with torch.no_grad():
        for feed in data.batches(64):
            parts.append(graph({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}, [output])[0]
                         .numpy())
    return np.concatenate(parts)
