"""The ``prune`` and ``prune_remove`` passes.

``prune`` finds every selected MatMul / Gemm / Conv with a constant weight through the layer view
(:func:`onnxcomp.graph.find_layers`: the mask follows the logical ``[out, in, ...]`` layout
whatever the storage — Gemm ``transB``, a Transpose in front of a MatMul, Constant nodes, If/Loop
bodies), continues from the masks earlier runs left (:mod:`.state`), computes the new masks as
torch.nn.utils.prune would (:mod:`.masks`), and lands them as the ``apply`` option says:

- ``fold``: weight ← weight · mask (zeros in the initializer);
- ``mask``: ``Mul(W, mask)`` in front of the layer; ``prune_remove`` folds it (torch's
  ``prune.remove``);
- ``remove_channels``: structured masks are turned into smaller tensors across whole channel
  dependency groups (:mod:`.channels`).

A weight read by several selected layers is pruned once, for all of them (one parameter, one
mask, as tied weights in torch), in the first reader's logical layout; with ``apply: mask`` each
reader gets its own mask node instead.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp.graph import Layer, Names, find_layers, release_mapped
from onnxcomp.passes.base import CompressionPass, PassStats, register
from onnxcomp.passes.prune import masks as M
from onnxcomp.passes.prune import state
from onnxcomp.passes.prune.config import PruneConfig, PruneRemoveConfig

__all__ = ["Prune", "PruneRemove", "layer_input_norms"]


@register
class Prune(CompressionPass):
    """Masks from random / L1 / Ln / Wanda scores, unstructured, structured (dim 0/1) or N:M, per
    layer or global, composed with earlier masks like torch's PruningContainer; folded, kept as
    explicit Mul nodes, or used to delete channels; optional sparse storage. Masks equal
    torch.nn.utils.prune's on the same weights (ties: lowest index pruned first; random: the
    stream of torch.manual_seed(seed), layers in graph order). Masks persist in the model's
    metadata (onnxcomp.prune.masks), so a later prune continues on the remaining weights. Every
    selected layer is pruned, the first and last too, unless keep_first_last is set. A weight
    shared by several layers is pruned once for all readers (fold, remove_channels skips it); with
    apply: mask each reader gets its own mask node."""

    name = "prune"
    summary = "prune weights as torch.nn.utils.prune (random/l1/ln/wanda; unstructured, dim 0/1, N:M; layer/global)"
    Config = PruneConfig

    @classmethod
    def calibration_needed(cls, config: PruneConfig) -> bool:
        return config.needs_calibration

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: PruneConfig = self.config
        graph = model.graph
        for entry in cfg.unmatched(graph):
            stats.notes.append(f"include/exclude entry '{entry}' matches no node")
        probe = model.clone() if cfg.method == "wanda" else None  # activations as currently pruned
        in_graph = state.take_mask_nodes(graph)
        layers, skipped = find_layers(graph, cfg)
        for what, why in skipped:
            stats.skip(what, why)
        if cfg.apply != "mask":  # mask nodes sit per reader: each reader of a shared weight gets its own
            layers = self._representatives(layers, stats)
        if cfg.keep_first_last and layers:
            for layer in {id(x): x for x in (layers[0], layers[-1])}.values():
                stats.skip(layer.label, "first/last layer kept (keep_first_last)")
            layers = layers[1:-1]
        saved = state.load_masks(model)
        weights, old_masks = [], []
        for layer in layers:
            w = layer.weight()
            mask = in_graph.pop(id(layer.node), (None, None))[1]
            if mask is None:
                mask = state.resolve(saved.get(state.layer_key(layer)), w)
            weights.append(w)
            old_masks.append(np.ones(w.shape, bool) if mask is None else mask)
        for node, mask in in_graph.values():  # mask nodes of layers not selected now: put back
            layer = Layer.of(node, graph)
            if isinstance(layer, Layer):
                state.insert_mask_node(layer, mask, Names(graph))
        if not layers:
            stats.notes.append("no layer to prune")
            return
        scores = self._scores(probe, layers, weights, old_masks, stats)
        if cfg.apply == "remove_channels":
            from onnxcomp.passes.prune.channels import remove_channels

            remove_channels(model, layers, weights, scores, old_masks, cfg, self._seed(), stats)
            return
        new_masks = self._masks(layers, weights, scores, old_masks, stats)
        del scores  # a model-sized list: gone before the folded weights are made
        self._land(model, layers, weights, old_masks, new_masks, stats)

    # -- which layers ----------------------------------------------------------------------------

    def _representatives(self, layers: list[Layer], stats: PassStats) -> list[Layer]:
        """One layer per stored weight: later readers of a weight already taken are skipped."""
        seen: dict[int, Layer] = {}
        out = []
        for layer in layers:
            if layer.weight_value.is_graph_output():  # the model outputs this weight: readers get copies
                out.append(layer)
                continue
            first = seen.get(id(layer.weight_value))
            if first is not None:
                stats.skip(layer.label, f"shares its weight with {first.label}: pruned once for both")
                continue
            seen[id(layer.weight_value)] = layer
            out.append(layer)
        return out

    def _seed(self) -> int:
        return self.config.seed if self.config.seed is not None else self.context.seed

    # -- scores and masks ------------------------------------------------------------------------

    def _scores(self, probe: ir.Model | None, layers: list[Layer], weights: list[np.ndarray],
                old_masks: list[np.ndarray], stats: PassStats) -> list[np.ndarray | None]:
        """Importance of every weight as currently pruned (None for random)."""
        cfg: PruneConfig = self.config
        if cfg.method == "random":
            return [None] * len(layers)
        current = [np.abs(w * m) for w, m in zip(weights, old_masks)]
        if cfg.method != "wanda":
            return current
        data = self.context.require_calib("prune (method wanda)")
        norms = layer_input_norms(probe, layers, data, self.context.batch_size)
        out = []
        for layer, score in zip(layers, current):
            norm = norms.get(layer.input.name) if layer.node.graph is layer.root else None
            if norm is None or norm.size != layer.in_features:
                stats.notes.append(f"{layer.label}: no calibration input (subgraph or shape): plain |w| scores")
                out.append(score)
                continue
            per_in = norm[layer.input_channel_index()]  # [out, in/group]
            out.append(score * per_in.reshape(per_in.shape + (1,) * (score.ndim - 2)))
        return out

    def _masks(self, layers, weights, scores, old_masks, stats) -> list[np.ndarray]:
        cfg: PruneConfig = self.config
        rng = M.TorchRandom(self._seed()) if cfg.method == "random" else None
        try:
            if cfg.scope == "global":
                if rng is not None:
                    return M.global_random_masks(rng, old_masks, cfg.amount)
                if cfg.method == "wanda":
                    return self._wanda_global(weights, scores, old_masks)
                return M.global_unstructured_masks(scores, old_masks, cfg.amount)
            out = []
            for layer, score, old in zip(layers, scores, old_masks):
                if cfg.nm_pair is not None:
                    out.append(M.nm_mask(score, old, *cfg.nm_pair))
                elif cfg.dim is None:
                    out.append(M.unstructured_mask(score, old, cfg.amount) if rng is None
                               else M.random_unstructured_mask(rng, old, cfg.amount))
                else:
                    out.append(M.structured_mask(score, old, cfg.amount, cfg.norm_order, cfg.dim) if rng is None
                               else M.random_structured_mask(rng, old, cfg.amount, cfg.dim))
            return out
        except ValueError as exc:
            from onnxcomp.errors import OnnxcompError

            raise OnnxcompError(f"prune: {exc}") from None

    def _wanda_global(self, weights, scores, old_masks) -> list[np.ndarray]:
        """Global wanda: each layer loses what global L1 would take from it (|w| sets the budget),
        and the activation-aware score picks which of its weights go. Raw |w|·‖x‖ is not comparable
        across layers (Wanda itself only compares weights of one output), and a single global cut on
        it lost to global L1 on MiniLM (0.68 vs 0.72 cosine at 50 %)."""
        budget = M.global_unstructured_masks([np.abs(w * m) for w, m in zip(weights, old_masks)], old_masks,
                                             self.config.amount)
        return [M.unstructured_mask(score, old, int(old.sum() - cut.sum()))
                for score, old, cut in zip(scores, old_masks, budget)]

    # -- landing ---------------------------------------------------------------------------------

    def _land(self, model, layers, weights, old_masks, new_masks, stats: PassStats) -> None:
        cfg: PruneConfig = self.config
        names = Names(model.graph)
        persisted = {}
        total = zeros = 0
        folded_values = []
        for i, (layer, old, new) in enumerate(zip(layers, old_masks, new_masks)):
            key = state.layer_key(layer)
            newly = int(old.sum() - new.sum())
            if cfg.apply == "fold":
                w, weights[i] = weights[i], None  # the last reference: a mapped weight can be unmapped below
                stored = layer.weight_value.const_value
                folded = (w * new).astype(w.dtype)
                if newly or not np.array_equal(folded, w):
                    layer.set_weight(folded, for_all_users=not layer.weight_value.is_graph_output())
                persisted[key] = (new, bool(np.array_equal(new, folded != 0)))
                del w, folded
                release_mapped(stored)
                folded_values.append(layer)
            else:
                state.insert_mask_node(layer, new, names)
                persisted[key] = (new, None)
            total += new.size
            zeros += int(new.size - new.sum())
            stats.touch(f"{layer.label}: {cfg.describe()}: {newly} more pruned, "
                        f"{new.size - int(new.sum())}/{new.size} masked ({1 - new.mean():.1%})")
            stats.metrics.setdefault("layer_sparsity", {})[key] = round(float(1 - new.mean()), 6)
        state.save_masks(model, persisted)
        stats.metrics.update(pruned_layers=len(layers), masked=zeros, weights=total,
                             sparsity=round(zeros / max(total, 1), 6), apply=cfg.apply)
        if cfg.storage == "sparse":
            from onnxcomp.passes.prune.sparse import store_sparse

            store_sparse(model, folded_values, stats)


def layer_input_norms(model: ir.Model, layers: list[Layer], data, batch_size: int) -> dict[str, np.ndarray]:
    """‖x_j‖ per input channel of every layer's activation (main graph only) as an RMS over all
    samples and positions, in one calibration run (Conv: channel axis 1, MatMul/Gemm: the last axis)."""
    from onnxcomp.calibrate import ChannelSquareSum, collect

    reducers: dict[str, list] = {}
    for layer in layers:
        if layer.node.graph is not layer.root or layer.input.name in reducers:
            continue
        axis = 1 if layer.node.op_type == "Conv" else -1
        reducers[layer.input.name] = [ChannelSquareSum(axis)]
    collect(model, data, reducers, batch_size=batch_size)
    # RMS rather than the plain L2 sum: the same ranking inside a layer (one scale per layer), and
    # comparable across layers that see different numbers of positions (global scope)
    return {name: r[0].norm() / np.sqrt(max(r[0].count, 1)) for name, r in reducers.items() if r[0].norm() is not None}


@register
class PruneRemove(CompressionPass):
    """torch's prune.remove: every explicit mask node (prune with apply: mask) is folded into its
    weight, and the layer's stored mask is forgotten, so a later prune starts afresh as in torch."""

    name = "prune_remove"
    summary = "fold the explicit Mul(W, mask) nodes of prune(apply: mask) into the weights (torch's prune.remove)"
    Config = PruneRemoveConfig

    def run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: PruneRemoveConfig = self.config
        graph = model.graph
        found = state.take_mask_nodes(graph)
        names = Names(graph)
        dropped = set()
        for node, mask in found.values():
            layer = Layer.of(node, graph)
            if isinstance(layer, str):
                stats.skip(node.name or node.op_type, layer)
                continue
            if not cfg.selects(node, layer.params):
                state.insert_mask_node(layer, mask, names)
                stats.skip(layer.label, cfg.why_not(node, layer.params) or "not selected")
                continue
            layer.set_weight((layer.weight() * mask).astype(layer.weight().dtype))
            dropped.add(state.layer_key(layer))
            stats.touch(f"{layer.label}: mask folded ({1 - mask.mean():.1%} zeros)")
        state.save_masks(model, {}, drop=dropped)
        if not found:
            stats.notes.append("no explicit mask node (prune with apply: mask) in the model")
