"""Conv factorizations: ``tucker2``, ``cp``, ``spatial_svd``, ``depthwise_separable``.

Each pass replaces a 2-D ``Conv`` (weight ``W`` [O, I, kh, kw], ``group`` 1) by a chain of
smaller Convs computing an approximation of ``W`` in closed form (no data, no training); the
original stride, padding and dilation go to the spatial Conv(s) of the chain, the bias to the
last one. Rewrite rules (``x`` the input, ``*`` convolution):

- ``tucker2`` (Tucker-2 on the channel modes, tensorly ``partial_tucker``):
  ``W ≈ core ×₀ U_out ×₁ U_in`` → Conv1×1(I→r_in, ``U_inᵀ``) → Conv kh×kw (r_in→r_out, ``core``)
  → Conv1×1(r_out→O, ``U_out``). Ranks by number ``[r_out, r_in]``, ``energy`` of each mode's
  unfolding, ``vbmf`` (empirical variational Bayes matrix factorization of each unfolding, the
  rank estimate of Kim et al. 2016) or ``param_ratio``.
- ``cp`` (CP/PARAFAC of rank R, tensorly ``parafac``): ``W ≈ Σ_r a_r ∘ b_r ∘ c_r ∘ d_r`` →
  Conv1×1(I→R) → depthwise kh×1 → depthwise 1×kw → Conv1×1(R→O). Stride/padding/dilation split
  into their vertical and horizontal halves.
- ``spatial_svd``: the rank-r SVD of ``W`` unfolded to ``[(I·kh), (O·kw)]`` → Conv kh×1 (I→r) then
  Conv 1×kw (r→O).
- ``depthwise_separable`` (MobileNet's factorization, closed form): each input channel's slice
  ``W[:, i]`` viewed as ``[O, kh·kw]`` is split by its rank-r SVD ``P_i·D_i`` → depthwise kh×kw
  Conv with depth multiplier r (``D``, ``group = I``) → Conv1×1 (I·r→O, ``P``). Exact at
  ``r = min(O, kh·kw)``.

Skipped with a reason: grouped/depthwise Convs, non-2-D Convs, 1×1 kernels (a matrix: nothing
spatial to factorize), ``auto_pad`` SAME_*, weights read by other nodes, and any factorization
that would not have fewer parameters than the Conv (``min_saving`` margin, as in ``svd_split``).
These passes do not measure speed: on small feature maps the extra nodes can cost more than the
saved MACs (see the README's Low-rank section).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator
from threadpoolctl import threadpool_limits

from onnxcomp.graph import Layer, Names, NodeSelection, add_initializer, constant_array, find_layers, replace_node
from onnxcomp.passes.base import CompressionPass, PassConfig, PassStats, register
from onnxcomp.passes.lowrank import LOWRANK_KEY

__all__ = ["Tucker2", "CpDecompose", "SpatialSvd", "DepthwiseSeparable", "partial_tucker2", "evbmf_rank"]


class _ConvConfig(PassConfig, NodeSelection):
    param_ratio: float | None = Field(None, gt=0, lt=1, description="target share of each Conv's weight parameters "
                                      "(default 0.5 when no other rank rule is set)")
    min_saving: float = Field(0.0, ge=0, lt=1, description="decompose only where the chain has fewer than "
                                                          "(1 - min_saving) x the Conv's parameters")
    _rules: ClassVar[tuple[str, ...]] = ("param_ratio",)

    @model_validator(mode="after")
    def _one_rank_rule(self):
        given = [n for n in self._rules if getattr(self, n) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"set one of {', '.join(self._rules)} (got {' and '.join(given)})")
        return self

    @property
    def ratio(self) -> float | None:
        if all(getattr(self, n) in (None, False) for n in self._rules):
            return 0.5
        return self.param_ratio


class Tucker2Config(_ConvConfig):
    ranks: tuple[int, int] | None = Field(None, description="[r_out, r_in]: ranks of the output and input channel modes")
    energy: float | None = Field(None, gt=0, le=1, description="per mode, the smallest rank keeping this share of "
                                 "the unfolding's sum(sigma^2)")
    vbmf: bool = Field(False, description="ranks from a VBMF estimate of each mode's unfolding")
    n_iter_max: int = Field(100, ge=1, le=10000, description="HOOI iterations (partial_tucker)")
    _rules: ClassVar[tuple[str, ...]] = ("ranks", "energy", "vbmf", "param_ratio")

    @model_validator(mode="after")
    def _positive(self):
        if self.ranks is not None and min(self.ranks) < 1:
            raise ValueError("ranks must be >= 1")
        return self


class CpConfig(_ConvConfig):
    rank: int | None = Field(None, ge=1, description="CP rank R")
    n_iter_max: int = Field(300, ge=1, le=10000, description="ALS iterations (parafac)")
    _rules: ClassVar[tuple[str, ...]] = ("rank", "param_ratio")


class SpatialSvdConfig(_ConvConfig):
    rank: int | None = Field(None, ge=1, description="rank r of the kh x 1 -> 1 x kw split")
    energy: float | None = Field(None, gt=0, le=1, description="smallest rank keeping this share of sum(sigma^2)")
    _rules: ClassVar[tuple[str, ...]] = ("rank", "energy", "param_ratio")


class DepthwiseSeparableConfig(_ConvConfig):
    rank: int | None = Field(None, ge=1, description="depth multiplier r (rank per input channel)")
    energy: float | None = Field(None, gt=0, le=1, description="smallest r keeping this share of sum(sigma^2) "
                                 "over all channels' slices")
    _rules: ClassVar[tuple[str, ...]] = ("rank", "energy", "param_ratio")


@dataclasses.dataclass
class _Conv:
    """A 2-D Conv's weight and its spatial attributes (explicit pads)."""

    layer: Layer
    w: np.ndarray  # [O, I, kh, kw] float64
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # h_begin, w_begin, h_end, w_end
    dilations: tuple[int, int]

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return self.w.shape


class _ConvPass(CompressionPass):
    """Shared driver: find the Convs, check them, factorize, write the chain."""

    def run(self, model: ir.Model, stats: PassStats) -> None:
        with threadpool_limits(1):  # one BLAS thread: same bits everywhere; spinning threads on a busy CPU cost 20x
            self._run(model, stats)

    def _run(self, model: ir.Model, stats: PassStats) -> None:
        layers, skipped = find_layers(model.graph, self.config, ops=("Conv",))
        for what, why in skipped:
            stats.skip(what, why)
        stats.notes.extend(f"selection entry '{p}' matches no node" for p in self.config.unmatched(model.graph))
        names, ranks = Names(model.graph), {}
        for layer in layers:
            conv = _conv_or_reason(layer)
            if isinstance(conv, str):
                stats.skip(layer.label, conv)
                continue
            try:
                rank, chain, params = self.factorize(conv)
            except ValueError as exc:
                stats.skip(layer.label, str(exc))
                continue
            dense = conv.w.size
            if params >= (1 - self.config.min_saving) * dense:
                stats.skip(layer.label, f"{self.name} at rank {rank} would not save parameters "
                                        f"({params} >= {'' if not self.config.min_saving else f'(1 - {self.config.min_saving}) * '}{dense})")
                continue
            error = _relative_error(conv.w, chain)
            _write_chain(conv, chain, names, self.name)
            ranks[layer.label] = rank
            stats.touch(f"{layer.label}: {'x'.join(map(str, conv.dims))} -> {self.name} rank {rank} "
                        f"({params}/{dense} params, weight rel. error {error:.3g})")
        stats.metrics["ranks"] = ranks

    def factorize(self, conv: _Conv) -> tuple[object, list[_Step], int]:  # pragma: no cover
        raise NotImplementedError


@dataclasses.dataclass
class _Step:
    """One Conv of a chain: weight [out, in/group, kh, kw], group, and whether it takes the spatial attributes."""

    weight: np.ndarray
    group: int = 1
    axes: str = ""  # "hw": the original stride/pads/dilation; "h" / "w": their vertical / horizontal half


@register
class Tucker2(_ConvPass):
    """Conv kh×kw → Conv 1×1 (I→r_in) → Conv kh×kw core (r_in→r_out) → Conv 1×1 (r_out→O), from
    the Tucker-2 decomposition of the weight on its channel modes (closed form, no data).

    Only where the chain has fewer parameters than the Conv; grouped, 1×1, non-2-D, SAME-padded
    and shared-weight Convs are skipped with the reason.
    """

    name = "tucker2"
    summary = "Conv -> 1x1, kxk core, 1x1 (Tucker-2 on the channel modes); ranks by number, energy, VBMF or ratio"
    Config = Tucker2Config

    def factorize(self, conv: _Conv):
        cfg: Tucker2Config = self.config
        o, i, kh, kw = conv.dims
        if cfg.ranks is not None:
            r_out, r_in = min(cfg.ranks[0], o), min(cfg.ranks[1], i)
        elif cfg.energy is not None:
            r_out = _energy_rank(np.linalg.svd(_unfold(conv.w, 0), compute_uv=False), cfg.energy)
            r_in = _energy_rank(np.linalg.svd(_unfold(conv.w, 1), compute_uv=False), cfg.energy)
        elif cfg.vbmf:
            r_out, r_in = evbmf_rank(_unfold(conv.w, 0)), evbmf_rank(_unfold(conv.w, 1))
        else:
            # f·r: i·(f·i) + (f·o)(f·i)·k² + o·(f·o) = ratio·o·i·k²
            k2 = kh * kw
            a, b, c = o * i * k2, i * i + o * o, -cfg.ratio * o * i * k2
            f = (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)
            r_out, r_in = max(1, min(o, int(f * o))), max(1, min(i, int(f * i)))
        core, (u_out, u_in) = partial_tucker2(conv.w, (r_out, r_in), n_iter_max=cfg.n_iter_max, seed=self.context.seed)
        chain = [_Step(u_in.T[:, :, None, None]), _Step(core, axes="hw"), _Step(u_out[:, :, None, None])]
        return [r_out, r_in], chain, i * r_in + r_out * r_in * kh * kw + o * r_out


@register
class CpDecompose(_ConvPass):
    """Conv kh×kw → Conv 1×1 (I→R) → depthwise kh×1 → depthwise 1×kw → Conv 1×1 (R→O), from the
    rank-R CP (PARAFAC) decomposition of the weight (closed form, no data).

    Only where the chain has fewer parameters than the Conv; skips as ``tucker2`` does.
    """

    name = "cp"
    summary = "Conv -> 1x1, depthwise kx1, depthwise 1xk, 1x1 (CP/PARAFAC of rank R)"
    Config = CpConfig

    def factorize(self, conv: _Conv):
        from tensorly.decomposition import parafac

        cfg: CpConfig = self.config
        o, i, kh, kw = conv.dims
        per_rank = i + kh + kw + o
        rank = cfg.rank if cfg.rank is not None else max(1, int(cfg.ratio * conv.w.size / per_rank))
        weights, (a, b, c, d) = parafac(conv.w, rank, n_iter_max=cfg.n_iter_max, init="svd", tol=1e-10,
                                        random_state=self.context.seed)
        a = a * weights[None, :]
        chain = [_Step(b.T[:, :, None, None]), _Step(c.T[:, None, :, None], group=rank, axes="h"),
                 _Step(d.T[:, None, None, :], group=rank, axes="w"), _Step(a[:, :, None, None])]
        return rank, chain, rank * per_rank


@register
class SpatialSvd(_ConvPass):
    """Conv kh×kw → Conv kh×1 (I→r) → Conv 1×kw (r→O), from the rank-r SVD of the weight unfolded
    as [(I·kh), (O·kw)] (closed form, no data). A kernel with kh or kw = 1 is already separable
    and a pair that would not have fewer parameters is not written: both skipped with the reason.
    """

    name = "spatial_svd"
    summary = "Conv kxk -> kx1 then 1xk through rank r (SVD of the weight unfolded as [(in, kh), (out, kw)])"
    Config = SpatialSvdConfig

    def factorize(self, conv: _Conv):
        cfg: SpatialSvdConfig = self.config
        o, i, kh, kw = conv.dims
        if kh == 1 or kw == 1:
            raise ValueError(f"kernel {kh}x{kw} is already separable")
        u, s, vt = np.linalg.svd(conv.w.transpose(1, 2, 0, 3).reshape(i * kh, o * kw), full_matrices=False)
        per_rank = i * kh + o * kw
        r = _svd_rank(cfg, s, per_rank, conv.w.size)
        root = np.sqrt(s[:r])
        vertical = (u[:, :r] * root).reshape(i, kh, r).transpose(2, 0, 1)[:, :, :, None]  # [r, I, kh, 1]
        horizontal = (root[:, None] * vt[:r]).reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]  # [O, r, 1, kw]
        return r, [_Step(vertical, axes="h"), _Step(horizontal, axes="w")], r * per_rank


@register
class DepthwiseSeparable(_ConvPass):
    """Conv kh×kw → depthwise kh×kw (depth multiplier r) → Conv 1×1 (I·r→O), from the rank-r SVD
    of each input channel's slice of the weight (closed form; exact at r = min(O, kh·kw)); skipped
    with the reason where the pair would not have fewer parameters than the Conv.
    """

    name = "depthwise_separable"
    summary = "Conv kxk -> depthwise kxk (multiplier r) + 1x1, closed form from each input channel's rank-r SVD"
    Config = DepthwiseSeparableConfig

    def factorize(self, conv: _Conv):
        cfg: DepthwiseSeparableConfig = self.config
        o, i, kh, kw = conv.dims
        k2 = kh * kw
        slices = conv.w.transpose(1, 0, 2, 3).reshape(i, o, k2)  # per input channel: [O, k²]
        u, s, vt = np.linalg.svd(slices, full_matrices=False)  # batched: [I, O, q], [I, q], [I, q, k²]
        r = _svd_rank(cfg, np.sqrt(np.sum(s**2, axis=0)), i * (k2 + o), conv.w.size)
        root = np.sqrt(s[:, :r])  # [I, r]
        depthwise = (root[:, :, None] * vt[:, :r]).reshape(i * r, 1, kh, kw)  # out channel i·r + j reads channel i
        pointwise = (u[:, :, :r] * root[:, None, :]).transpose(1, 0, 2).reshape(o, i * r)[:, :, None, None]
        return r, [_Step(depthwise, group=i, axes="hw"), _Step(pointwise)], i * r * (k2 + o)


def _svd_rank(cfg: SpatialSvdConfig | DepthwiseSeparableConfig, spectrum: np.ndarray, per_rank: int,
              size: int) -> int:
    """The rank ``cfg`` asks for (``rank``, ``energy`` of ``spectrum``, else ``param_ratio`` of ``size``
    parameters at ``per_rank`` each), at most ``len(spectrum)``."""
    if cfg.rank is not None:
        return min(cfg.rank, len(spectrum))
    if cfg.energy is not None:
        return _energy_rank(spectrum, cfg.energy)
    return max(1, min(len(spectrum), int(cfg.ratio * size / per_rank)))


# --- decompositions -----------------------------------------------------------------------------


def partial_tucker2(w: np.ndarray, ranks: tuple[int, int], *, n_iter_max: int = 100, seed: int = 0
                    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Tucker-2 of ``w`` [O, I, ...] on modes 0 and 1: ``core`` [r_out, r_in, ...] and the factors
    ``U_out`` [O, r_out], ``U_in`` [I, r_in] (tensorly's ``partial_tucker``; its return value changed
    from ``(core, factors)`` to ``((core, factors), errors)`` in tensorly 0.8 — both are accepted)."""
    from tensorly.decomposition import partial_tucker

    result = partial_tucker(np.asarray(w, np.float64), rank=list(ranks), modes=[0, 1], n_iter_max=n_iter_max,
                            init="svd", tol=1e-10, random_state=seed)
    first = result[0]
    core, factors = (first, result[1]) if isinstance(first, np.ndarray) else (first[0], first[1])
    return np.asarray(core), (np.asarray(factors[0]), np.asarray(factors[1]))


def evbmf_rank(y: np.ndarray) -> int:
    """The rank the empirical variational Bayes matrix factorization (Nakajima et al., 2013, analytic
    global solution) keeps for ``y``, with the noise variance estimated by minimizing its free energy."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    big_l, big_m = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    alpha = big_l / big_m
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h_ub = int(min(np.ceil(big_l / (1 + alpha)) - 1, big_l)) - 1
    total = float(np.sum(y**2))
    upper = total / (big_l * big_m)
    tail = s[h_ub + 1:] if h_ub + 1 < len(s) else s[-1:]
    lower = max(float(tail[0] ** 2) / (big_m * x_bar), float(np.mean(tail**2)) / big_m)
    if not upper > lower:
        return max(1, int(np.sum(s > 0)))

    def free_energy(sigma2: float) -> float:
        x = s**2 / (big_m * sigma2)
        z1, z2 = x[x > x_bar], x[x <= x_bar]
        tau = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
        return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau) + np.sum(np.log((tau + 1) / z1))
                     + alpha * np.sum(np.log(tau / alpha + 1)) + (total - np.sum(s**2)) / (big_m * sigma2))

    sigma2 = minimize_scalar(free_energy, bounds=(lower, upper), method="bounded").x
    threshold = np.sqrt(big_m * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))


def _unfold(w: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def _energy_rank(s: np.ndarray, energy: float) -> int:
    total = float(np.sum(s**2))
    if total == 0:
        return 1
    return int(min(np.searchsorted(np.cumsum(s**2) / total, energy - 1e-12) + 1, len(s)))


# --- the graph side -----------------------------------------------------------------------------


def _conv_or_reason(layer: Layer) -> _Conv | str:
    node = layer.node
    if layer.group != 1:
        return f"grouped Conv (group {layer.group})"
    if len(layer.shape) != 4:
        return f"{len(layer.shape) - 2}-D Conv (only 2-D)"
    if layer.shape[2] == 1 and layer.shape[3] == 1:
        return "1x1 kernel: a matrix, nothing spatial to factorize"
    if layer.shared:
        return "weight shared with other nodes"
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad {auto_pad} (explicit pads needed)"
    pads = tuple(node.attributes.get_ints("pads", (0, 0, 0, 0))) if auto_pad == "NOTSET" else (0, 0, 0, 0)
    strides = tuple(node.attributes.get_ints("strides", (1, 1)))
    dilations = tuple(node.attributes.get_ints("dilations", (1, 1)))
    return _Conv(layer, layer.weight().astype(np.float64), strides, pads, dilations)


def _attrs(conv: _Conv, step: _Step) -> list[ir.Attr]:
    kh, kw = step.weight.shape[2:]
    sh, sw = conv.strides
    hb, wb, he, we = conv.pads
    dh, dw = conv.dilations
    strides, pads, dil = {"hw": ([sh, sw], [hb, wb, he, we], [dh, dw]), "h": ([sh, 1], [hb, 0, he, 0], [dh, 1]),
                          "w": ([1, sw], [0, wb, 0, we], [1, dw]), "": ([1, 1], [0, 0, 0, 0], [1, 1])}[step.axes]
    return [ir.AttrInt64s("kernel_shape", [kh, kw]), ir.AttrInt64s("strides", strides), ir.AttrInt64s("pads", pads),
            ir.AttrInt64s("dilations", dil), ir.AttrInt64("group", step.group)]


def _write_chain(conv: _Conv, chain: list[_Step], names: Names, how: str) -> None:
    layer = conv.layer
    node, dtype = layer.node, constant_array(layer.weight_value).dtype
    base = layer.weight_value.name or layer.name
    bias = layer.bias()
    current, nodes = layer.input, []
    for index, step in enumerate(chain):
        weight = add_initializer(layer.root, names, f"{base}_{how}_{index}",
                                 np.ascontiguousarray(step.weight.astype(dtype)))
        inputs = [current, weight]
        if index == len(chain) - 1 and bias is not None:
            inputs.append(add_initializer(layer.root, names, f"{base}_{how}_bias", bias.astype(dtype)))
        new = ir.Node("", "Conv", inputs, attributes=_attrs(conv, step), name=names(f"{layer.name}_{how}_{index}"))
        new.outputs[0].name, new.outputs[0].type = names(f"{layer.name}_{how}_{index}_out"), node.outputs[0].type
        new.metadata_props[LOWRANK_KEY] = f"{layer.name}:{how}:{index}"
        nodes.append(new)
        current = new.outputs[0]
    replace_node(node, nodes, current)


def _relative_error(w: np.ndarray, chain: list[_Step]) -> float:
    """‖W − W_chain‖ / ‖W‖ of the chain's effective kernel (compose the chain on the weight itself)."""
    approx = _compose(chain, w.shape)
    return float(np.linalg.norm(w - approx) / max(np.linalg.norm(w), 1e-30))


def _compose(chain: list[_Step], shape: tuple[int, ...]) -> np.ndarray:
    """The [O, I, kh, kw] kernel the chain applies (at stride 1): composing cross-correlations adds
    their tap offsets, ``K₂[o, i, a + b] = Σ_c F[o, c, b]·K₁[c, i, a]``."""
    i = shape[1]
    kernel = np.eye(i)[:, :, None, None]  # [channels so far, I, h, w]
    for step in chain:
        out, per_group, sh, sw = step.weight.shape
        dense = np.zeros((out, per_group * step.group, sh, sw))  # a grouped weight as a full one
        size = out // step.group
        for g in range(step.group):
            dense[g * size:(g + 1) * size, g * per_group:(g + 1) * per_group] = step.weight[g * size:(g + 1) * size]
        h, w = kernel.shape[2:]
        new = np.zeros((out, i, h + sh - 1, w + sw - 1))
        for b in range(sh):
            for c in range(sw):
                new[:, :, b:b + h, c:c + w] += np.einsum("oc,cihw->oihw", dense[:, :, b, c], kernel)
        kernel = new
    return kernel
