"""``svd_split``: a MatMul/Gemm with a constant weight becomes two thin MatMuls through rank k.

Rewrite rule. The layer computes ``y = x·Wᵀ (+ b)`` with ``W`` its logical ``[out, in]`` weight
(:class:`onnxcomp.graph.Layer`: any storage, Gemm ``transB``/``alpha``/``beta`` folded). With the
truncated SVD of ``M = W·S`` (``S`` = identity for ``plain``) written ``U_k Σ_k V_kᵀ``::

    A = U_k·√Σ_k              [out, k]
    B = √Σ_k·V_kᵀ·S⁻¹          [k, in]        W ≈ A·B
    MatMul(x, W_stored)  ->  MatMul(MatMul(x, Bᵀ), Aᵀ)       (any input rank: MatMul broadcasts)
    Gemm(x, W, C)        ->  Gemm(MatMul(x, Bᵀ), Aᵀ, b)       (transA: the first factor is a Gemm)

A MatMul's bias Add stays where it is, after the second factor. The two nodes carry
``metadata_props["onnxcomp.lowrank"] = "<original node>:B"`` (first, input side) and ``":A"``
(second, output side), so later passes (distillation) can find the pairs.

Methods (``S``):
- ``plain``: ``S = I`` — the best rank-k approximation of the weight itself.
- ``whitened`` (SVD-LLM's truncation-aware whitening): ``S`` = the Cholesky factor of ``XᵀX + λI``
  over the calibration activations ``X`` of the layer's input (``λ = damping·mean(diag XᵀX)``).
  Then ``‖X·(W − Ŵ)ᵀ‖_F = ‖(M − M_k)‖_F``: truncating ``M``'s smallest singular values is exactly
  the smallest output error on the calibration data, and ``σ_i²`` is the output energy dropped.
- ``asvd`` (ASVD): ``S = diag(s)``, ``s_j = rms(x_j)^alpha`` per input channel (from the same
  Gram diagonal): channels carrying large activations keep more of their weights.

Rank: ``rank`` (one k for every layer), ``energy`` (the smallest k keeping that share of
``Σσ²`` of ``M``), or ``param_ratio`` (``k = ⌊ratio·mn/(m+n)⌋``; the default, 0.5). With
``budget: global`` one parameter budget (``param_ratio`` of all selected layers' parameters)
goes to the singular values with the largest share of their layer's energy per parameter they
cost (``m+n``); layers left nearly full rank are kept dense and the rest re-allocated.

A layer is split only where ``k(m+n) < (1 − min_saving)·mn`` and, with ``require_speedup``, only
where the two MatMuls are faster than the dense one in onnxruntime for every row count of
``speed_rows`` (:mod:`onnxcomp.passes.lowrank_speed`, measured once per shape and cached).
That measurement depends on the machine and its load: it is recorded in the stats, and a cache
file makes the decision repeatable on one machine; ``require_speedup: false`` makes the output a
pure function of the model, the recipe and the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator
from scipy import linalg
from threadpoolctl import threadpool_limits

from onnxcomp.graph import Layer, Names, NodeSelection, add_initializer, constant_array, find_layers, release_mapped, replace_node
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register
from onnxcomp.passes.lowrank_speed import DEFAULT_CACHE, matmul_split_ratio

__all__ = ["SvdSplit", "SvdSplitConfig", "LOWRANK_KEY", "truncated_factors"]

LOWRANK_KEY = "onnxcomp.lowrank"


class SvdSplitConfig(PassConfig, NodeSelection):
    method: Literal["plain", "whitened", "asvd"] = Field(
        "plain", description="plain SVD of W; whitened (SVD-LLM, needs --calib); asvd (activation scaling, needs --calib)")
    rank: int | None = Field(None, ge=1, description="keep this many singular values in every layer")
    energy: float | None = Field(None, gt=0, le=1, description="keep the smallest k whose share of sum(sigma^2) >= energy")
    param_ratio: float | None = Field(None, gt=0, lt=1, description="target share of each layer's parameters "
                                      "(default 0.5 when no rank/energy is set)")
    budget: Literal["layer", "global"] = Field(
        "layer", description="layer: every layer at param_ratio; global: one budget of param_ratio of all "
                             "selected parameters, spent where it keeps the most energy per parameter")
    min_saving: float = Field(0.0, ge=0, lt=1, description="split only where k(m+n) < (1 - min_saving)*m*n")
    alpha: float = Field(0.5, ge=0, le=2, description="asvd: exponent of the per-channel activation scale")
    damping: float = Field(1e-4, gt=0, le=1, description="whitened: lambda = damping * mean(diag(X^T X))")
    sequential: bool = Field(False, description="whitened: fit layers in dependency order to the inputs of the "
                             "already-split model, least-squares target = the float layer's output (ranks from "
                             "the one-shot whitened spectra); one calibration run of both models per stage")
    require_speedup: bool = Field(True, description="split only where onnxruntime runs the two MatMuls faster "
                                                    "than the dense one (measured per shape, cached)")
    speed_rows: tuple[int, ...] = Field((1, 256), min_length=1, description="activation rows (batch x tokens) the "
                                        "speed check measures; the split must win at every one")
    speed_cache: str | None = Field(DEFAULT_CACHE, description="JSON file caching speed measurements "
                                    "(null: memory only)")

    @model_validator(mode="after")
    def _one_rank_rule(self) -> SvdSplitConfig:
        given = [n for n in ("rank", "energy", "param_ratio") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"set one of rank, energy, param_ratio (got {' and '.join(given)})")
        if self.budget == "global" and given and given[0] != "param_ratio":
            raise ValueError("budget 'global' spends a param_ratio across layers: set param_ratio, not " + given[0])
        if self.sequential and self.method != "whitened":
            raise ValueError("sequential needs method 'whitened'")
        if any(r < 1 for r in self.speed_rows):
            raise ValueError("speed_rows must be positive")
        return self

    @property
    def ratio(self) -> float | None:
        """The parameter ratio in force (None when rank or energy decides)."""
        if self.rank is None and self.energy is None:
            return self.param_ratio if self.param_ratio is not None else 0.5
        return None


@dataclasses.dataclass
class _Plan:
    """One layer, its SVD in the method's space, and the rank chosen for it."""

    layer: Layer
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    unscale: Callable[[np.ndarray], np.ndarray]  # B_scaled [k, in] -> B = B_scaled·S⁻¹
    k: int = 0

    @property
    def m(self) -> int:
        return self.layer.out_features

    @property
    def n(self) -> int:
        return self.layer.shape[1]

    def kept_energy(self, k: int) -> float:
        total = float(np.sum(self.s**2))
        return float(np.sum(self.s[:k] ** 2) / total) if total > 0 else 1.0


@register
class SvdSplit(CompressionPass):
    """A MatMul/Gemm with a constant weight → two MatMuls through rank k (plain, whitened or
    activation-scaled SVD), only where k·(in + out) < in·out.

    ``whitened``/``asvd`` need ``--calib``. The factor pair is tagged for later passes; layers
    where no rank saves parameters are skipped with the reason.
    """

    name = "svd_split"
    summary = "MatMul/Gemm -> two MatMuls through rank k (plain / whitened / asvd SVD), only where it pays"
    Config = SvdSplitConfig

    @classmethod
    def calibration_needed(cls, config: SvdSplitConfig) -> bool:
        return config.method != "plain"

    def run(self, model: ir.Model, stats: PassStats) -> None:
        with threadpool_limits(1):  # one BLAS thread: same bits everywhere; spinning threads on a busy CPU cost 20x
            self._run(model, stats)

    def _run(self, model: ir.Model, stats: PassStats) -> None:
        cfg: SvdSplitConfig = self.config
        layers, skipped = find_layers(model.graph, cfg, ops=("MatMul", "Gemm"))
        for what, why in skipped:
            stats.skip(what, why)
        stats.notes.extend(f"selection entry '{p}' matches no node" for p in cfg.unmatched(model.graph))
        if not layers and not skipped:
            stats.notes.append("no MatMul/Gemm in the model (Convs: tucker2, cp, spatial_svd, depthwise_separable)")
        eligible = []
        for layer in layers:
            why = _why_not(layer)
            if why:
                stats.skip(layer.label, why)
            else:
                eligible.append(layer)
        scales = self._scales(model, eligible, stats) if cfg.method != "plain" and eligible else {}
        ranks, energy, speed = {}, {}, {}
        names = Names(model.graph)

        def plans():  # one layer's SVD at a time unless the global budget needs them all at once
            for layer in eligible:
                scale = scales.get(id(layer.node)) if cfg.method != "plain" else None
                if cfg.method != "plain" and scale is None:
                    stats.skip(layer.label, "no calibration activations for its input (inside a subgraph)")
                    continue
                yield _plan(layer, cfg.method, scale, cfg)

        if cfg.budget == "global":
            chosen = list(plans())
            _global_ranks(chosen, cfg, stats)
        elif cfg.sequential:
            chosen = list(plans())
            for plan in chosen:
                plan.k = _layer_rank(plan, cfg)
        else:
            chosen = plans()
        if cfg.sequential:
            self._sequential(model, chosen, names, ranks, energy, speed, stats)
            chosen = []
        for plan in chosen:
            if cfg.budget != "global":
                plan.k = _layer_rank(plan, cfg)
            self._split(plan, names, ranks, energy, speed, stats)
            release_mapped(plan.layer.weight_value)  # read for the last time
            if cfg.budget != "global":
                del plan  # its float64 U, Vt: a layer's worth, not the model's
        stats.metrics.update(method=cfg.method + (" sequential" if cfg.sequential else ""), ranks=ranks,
                             energy_kept=energy)
        if cfg.require_speedup:
            stats.metrics["speed_ratio"] = speed
            stats.notes.append("speed check: split/dense onnxruntime time per layer shape and row count "
                               f"(< 1 = split faster), rows {list(cfg.speed_rows)}; cached in {cfg.speed_cache}")

    def _split(self, plan: _Plan, names: Names, ranks: dict, energy: dict, speed: dict, stats: PassStats) -> None:
        """Split ``plan``'s layer at its rank, or record why not."""
        cfg: SvdSplitConfig = self.config
        label, m, n, k = plan.layer.label, plan.m, plan.n, plan.k
        if k <= 0:
            return  # kept dense by the global allocation (already recorded)
        if k * (m + n) >= (1 - cfg.min_saving) * m * n:
            stats.skip(label, f"rank {k} would not save parameters: k(m+n) = {k * (m + n)} >= "
                              f"{'' if cfg.min_saving == 0 else f'(1 - {cfg.min_saving}) * '}mn = {m * n}")
            return
        if cfg.require_speedup:
            dtype = str(constant_array(plan.layer.weight_value).dtype)
            measured = {r: matmul_split_ratio(m, n, k, r, dtype=dtype, cache=cfg.speed_cache) for r in cfg.speed_rows}
            speed[label] = {str(r): ratio for r, (ratio, _) in measured.items()}
            slow = [f"{ratio:.2f}x at {r} rows" for r, (ratio, _) in measured.items() if ratio >= 1.0]
            if slow:
                stats.skip(label, f"rank {k} is not faster in onnxruntime (split/dense time {', '.join(slow)})")
                return
        _apply(plan, names)
        ranks[label], energy[label] = k, round(plan.kept_energy(k), 6)
        stats.touch(f"{label}: {m}x{n} -> rank {k} ({k * (m + n)}/{m * n} params, "
                    f"{'output ' if cfg.method == 'whitened' else ''}energy kept {energy[label]:.4f})")

    def _sequential(self, model: ir.Model, plans: list[_Plan], names: Names, ranks: dict, energy: dict,
                    speed: dict, stats: PassStats) -> None:
        """Refit every planned layer, stage by stage, to the inputs of the model split so far.

        A stage is the set of layers with the same number of planned layers upstream of their
        input, so no layer of a stage feeds another. Per stage, the split-so-far model and the
        float model run in lockstep on the calibration data: ``G = X_cᵀX_c`` (split model's
        inputs) and ``C = X_fᵀX_c`` (float inputs against them). The layer is then the rank-k
        minimiser of ``‖X_f·Wᵀ − X_c·Ŵᵀ‖² + λ‖Ŵ − W‖²`` (λ = damping·mean diag G): with
        ``G + λI = LLᵀ`` and ``W* = W(C + λI)(G + λI)⁻¹`` that is the truncated SVD of ``W*·L``,
        unwhitened by ``L⁻¹`` as in ``whitened``. Where ``X_c = X_f`` (the first stage, or full
        rank everywhere upstream) ``W* = W`` and the fit is the one-shot whitened one.
        """
        from onnxcomp.calibrate import collect_paired

        cfg: SvdSplitConfig = self.config
        data = self.context.require_calib("svd_split (sequential)")
        reference = model.clone()  # the float model: targets for every stage
        stage = _stages(model, [p.layer for p in plans])
        todo = [p for p in plans if p.k > 0]
        for p in plans:
            p.u = p.s = p.vt = None  # the one-shot spectra only chose the ranks
        runs = 0
        for level in sorted({stage[id(p.layer.node)] for p in todo}):
            group = [p for p in todo if stage[id(p.layer.node)] == level]
            sums: dict[tuple[str, bool], list] = {}
            for p in group:
                sums.setdefault((p.layer.input.name, _trans_a(p.layer)), [None, None, 0])
            folds: dict[tuple[str, str], list] = {}
            for (name, trans), acc in sums.items():
                folds.setdefault((name, name), []).append(_cross_fold(acc, trans))
            collect_paired(model, reference, data, folds, batch_size=self.context.batch_size)
            runs += 1
            for p in group:
                g, c, count = sums[(p.layer.input.name, _trans_a(p.layer))]
                if g is None:
                    stats.skip(p.layer.label, "no calibration activations for its input")
                    continue
                _refit(p, g / max(count, 1), c / max(count, 1), cfg.damping, stats)
                self._split(p, names, ranks, energy, speed, stats)
                release_mapped(p.layer.weight_value)
                p.u = p.s = p.vt = None
        stats.metrics["sequential_stages"] = runs
        stats.notes.append(f"sequential: {runs} stages, each one calibration run of the split-so-far and the float model")

    # -- calibration -----------------------------------------------------------------------------

    def _scales(self, model: ir.Model, layers: list[Layer], stats: PassStats) -> dict[int, tuple]:
        """Per layer node (id; labels of unnamed nodes collide): ("whitened", L) or ("asvd", s), from one calibration run (Gram of each input)."""
        from onnxcomp.calibrate import Gram, collect, tensor_values

        cfg: SvdSplitConfig = self.config
        data = self.context.require_calib(f"svd_split (method {cfg.method})")
        known = tensor_values(model)
        grams: dict[tuple[str, bool], Gram] = {}
        for layer in layers:
            if known.get(layer.input.name) is layer.input:
                grams.setdefault((layer.input.name, _trans_a(layer)), Gram())
        reducers: dict[str, list] = {}
        for (name, trans), gram in grams.items():
            reducers.setdefault(name, []).append(_Transposed(gram) if trans else gram)
        collect(model, data, reducers, batch_size=self.context.batch_size)
        out = {}
        for layer in layers:
            if known.get(layer.input.name) is not layer.input:
                continue  # a subgraph value that happens to share a main-graph name
            gram = grams.get((layer.input.name, _trans_a(layer)))
            if gram is None or gram.xtx is None:
                continue
            g = gram.xtx / max(gram.count, 1)
            if cfg.method == "whitened":
                chol, used = _cholesky(g, cfg.damping)
                if used != cfg.damping:
                    stats.notes.append(f"{layer.label}: X^T X needed damping {used:g} to factorize")
                out[id(layer.node)] = ("whitened", chol)
            else:
                rms = np.sqrt(np.maximum(np.diag(g), 0.0))
                s = np.maximum(rms, 1e-3 * rms.max() if rms.max() > 0 else 1.0) ** cfg.alpha
                out[id(layer.node)] = ("asvd", s)
        return out


def truncated_factors(w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain rank-k split of a logical ``[out, in]`` weight: ``A = U_k√Σ_k`` [out, k], ``B = √Σ_k V_kᵀ`` [k, in]."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    root = np.sqrt(s[:k])
    return u[:, :k] * root, root[:, None] * vt[:k]


# --- helpers ------------------------------------------------------------------------------------


class _Transposed:
    """Feeds a Gemm transA=1 input ([in, rows]) to a Gram reducer as [rows, in]."""

    def __init__(self, gram):
        self.gram = gram

    def update(self, array: np.ndarray) -> None:
        self.gram.update(np.asarray(array).T)


def _trans_a(layer: Layer) -> bool:
    return layer.node.op_type == "Gemm" and bool(layer.node.attributes.get_int("transA", 0))


def _why_not(layer: Layer) -> str | None:
    if layer.shared:
        return "weight shared with other nodes (factors would not replace it)"
    node = layer.node
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and layer.bias() is None:
        return "Gemm C is not a per-output bias (a [M, N] matrix)"
    if min(layer.shape) < 2:
        return f"weight {layer.shape[0]}x{layer.shape[1]}: nothing to factorize"
    return None


def _cholesky(g: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """Lower Cholesky factor of ``g + λI`` (λ = damping·mean diag), raising λ tenfold until it factorizes."""
    mean = float(np.mean(np.diag(g)))
    scale = mean if mean > 0 else 1.0
    for _ in range(8):
        try:
            return np.linalg.cholesky(g + damping * scale * np.eye(len(g))), damping
        except np.linalg.LinAlgError:
            damping *= 10
    return np.linalg.cholesky(g + damping * scale * np.eye(len(g))), damping


def _plan(layer: Layer, method: str, scale: tuple | None, cfg: SvdSplitConfig) -> _Plan:
    w = layer.weight().astype(np.float64)
    if method == "plain":
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return _Plan(layer, u, s, vt, lambda b: b)
    kind, factor = scale
    if kind == "whitened":
        u, s, vt = np.linalg.svd(w @ factor, full_matrices=False)
        # B = B_scaled·L⁻¹  <=>  Lᵀ·Bᵀ = B_scaledᵀ
        return _Plan(layer, u, s, vt, lambda b: linalg.solve_triangular(factor.T, b.T, lower=False).T)
    u, s, vt = np.linalg.svd(w * factor[None, :], full_matrices=False)
    return _Plan(layer, u, s, vt, lambda b: b / factor[None, :])


def _stages(model: ir.Model, layers: list[Layer]) -> dict[int, int]:
    """Layer node id -> how many of ``layers`` lie on the longest path from the graph inputs to its input."""
    wanted = {id(layer.node) for layer in layers}
    depth: dict[int, int] = {}  # value id -> planned layers upstream
    out: dict[int, int] = {}
    for node in model.graph:  # topologically sorted
        d = max((depth.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        if id(node) in wanted:
            out[id(node)] = d
            d += 1
        for v in node.outputs:
            depth[id(v)] = d
    return out


def _cross_fold(acc: list, trans: bool) -> Callable[[np.ndarray, np.ndarray], None]:
    """Fold one batch (split model's input, float model's input) into acc = [XcᵀXc, XfᵀXc, rows]."""

    def fold(xc: np.ndarray, xf: np.ndarray) -> None:
        if trans:
            xc, xf = np.asarray(xc).T, np.asarray(xf).T
        n = xc.shape[-1]
        a = np.asarray(xc, np.float32).reshape(-1, n)
        b = np.asarray(xf, np.float32).reshape(-1, n)
        if acc[0] is None:
            acc[0], acc[1] = np.zeros((n, n)), np.zeros((n, n))
        for start in range(0, a.shape[0], 4096):
            ca, cb = a[start:start + 4096], b[start:start + 4096]
            acc[0] += ca.T @ ca
            acc[1] += cb.T @ ca
        acc[2] += a.shape[0]

    return fold


def _refit(plan: _Plan, g: np.ndarray, c: np.ndarray, damping: float, stats: PassStats) -> None:
    """Set ``plan``'s SVD to that of ``W*·L`` (see :meth:`SvdSplit._sequential`)."""
    chol, used = _cholesky(g, damping)
    if used != damping:
        stats.notes.append(f"{plan.layer.label}: X^T X needed damping {used:g} to factorize")
    lam = used * (float(np.mean(np.diag(g))) or 1.0)
    w = plan.layer.weight().astype(np.float64)
    # W*·L = W(C + λI)(LLᵀ)⁻¹L = W(C + λI)L⁻ᵀ
    target = linalg.solve_triangular(chol, (w @ (c + lam * np.eye(len(c)))).T, lower=True).T
    plan.u, plan.s, plan.vt = np.linalg.svd(target, full_matrices=False)
    plan.unscale = lambda b: linalg.solve_triangular(chol.T, b.T, lower=False).T


def _layer_rank(plan: _Plan, cfg: SvdSplitConfig) -> int:
    full = len(plan.s)
    if cfg.rank is not None:
        return min(cfg.rank, full)
    if cfg.energy is not None:
        total = float(np.sum(plan.s**2))
        if total == 0:
            return 1
        share = np.cumsum(plan.s**2) / total
        return int(min(np.searchsorted(share, cfg.energy - 1e-12) + 1, full))
    return max(1, min(full, int(cfg.ratio * plan.m * plan.n / (plan.m + plan.n))))


def _global_ranks(plans: list[_Plan], cfg: SvdSplitConfig, stats: PassStats) -> None:
    """Spend ``param_ratio`` of all the plans' parameters on the singular values with the largest
    share of their layer's energy per parameter (``m+n`` each); layers whose rank would not save
    parameters stay dense (their ``m·n`` is paid out of the budget) and the rest is re-allocated."""
    budget = cfg.ratio * sum(p.m * p.n for p in plans)
    active = list(plans)
    while active:
        gains = []
        for i, p in enumerate(active):
            total = float(np.sum(p.s**2)) or 1.0
            gains.extend((float(v**2) / total / (p.m + p.n), i, p.m + p.n) for v in p.s)
        gains.sort(key=lambda g: -g[0])
        ranks = [1] * len(active)  # every split layer keeps at least one
        spent = sum(p.m + p.n for p in active)
        taken = [0] * len(active)
        for _, i, cost in gains:
            if taken[i] == 0:
                taken[i] = 1  # the first singular value is already paid for
                continue
            if spent + cost > budget:
                break
            spent += cost
            taken[i] += 1
        ranks = [max(1, t) for t in taken]
        dense = [p for p, k in zip(active, ranks) if k * (p.m + p.n) >= (1 - cfg.min_saving) * p.m * p.n]
        if not dense:
            for p, k in zip(active, ranks):
                p.k = k
            break
        for p in dense:
            p.k = 0
            budget -= p.m * p.n
            stats.skip(p.layer.label, "global budget leaves it near full rank: kept dense")
            active.remove(p)
    stats.metrics["global_budget_params"] = int(cfg.ratio * sum(p.m * p.n for p in plans))


def _apply(plan: _Plan, names: Names) -> None:
    layer, k = plan.layer, plan.k
    root = np.sqrt(plan.s[:k])
    a = plan.u[:, :k] * root  # [out, k]
    b = plan.unscale(root[:, None] * plan.vt[:k])  # [k, in]
    node = layer.node
    dtype = constant_array(layer.weight_value).dtype
    base = layer.weight_value.name or layer.name
    b_init = add_initializer(layer.root, names, f"{base}_lowrank_B", np.ascontiguousarray(b.T.astype(dtype)))
    a_init = add_initializer(layer.root, names, f"{base}_lowrank_A", np.ascontiguousarray(a.T.astype(dtype)))
    out_type = node.outputs[0].type
    if _trans_a(layer):
        first = ir.Node("", "Gemm", [layer.input, b_init], attributes=[ir.AttrInt64("transA", 1)],
                        name=names(f"{layer.name}_lowrank_B"))
    else:
        first = ir.Node("", "MatMul", [layer.input, b_init], name=names(f"{layer.name}_lowrank_B"))
    hidden = first.outputs[0]
    hidden.name, hidden.type = names(f"{node.outputs[0].name or layer.name}_lowrank"), out_type
    has_c = node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None
    if has_c:
        c_init = add_initializer(layer.root, names, f"{node.inputs[2].name or base}_lowrank_C", layer.bias().astype(dtype))
        second = ir.Node("", "Gemm", [hidden, a_init, c_init], name=names(f"{layer.name}_lowrank_A"))
    else:
        second = ir.Node("", "MatMul", [hidden, a_init], name=names(f"{layer.name}_lowrank_A"))
    first.metadata_props[LOWRANK_KEY] = f"{layer.name}:B"
    second.metadata_props[LOWRANK_KEY] = f"{layer.name}:A"
    replace_node(node, [first, second], second.outputs[0])
