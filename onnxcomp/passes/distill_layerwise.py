"""Closed-form distillation (``distill`` engine ``closed_form``): no training loop, no new dependency.

(a) **Layer-wise reconstruction.** Every selected MatMul/Gemm/Conv of the student is refitted so
its output matches the teacher's tensor of the same name on the calibration data, in network
order (a stage = the layers whose inputs no unsolved layer feeds; the student is re-run after
each stage, so later layers see the corrected earlier ones). Student and teacher run side by side
in one onnxruntime session (:func:`onnxcomp.graph.side_by_side`); per layer only the running
statistics ``[X 1]ᵀ[X 1]``, ``[X 1]ᵀY`` and ``Σy²`` are kept (:class:`onnxcomp.calibrate.Paired`),
X the student's input rows (Conv: image patches), Y the teacher's output rows. The solve is
ridge least squares *towards the current weights* (``(G + λI)w = c + λw₀``), row by row over the
row's kept inputs, so a pruned entry stays exactly zero. λ is picked from a small grid by the
error on a held-out fifth of the calibration samples; a row keeps its old weights unless the
new ones are better both held out and on all samples — reconstruction never increases a
layer's error on the calibration data.

A low-rank pair (two MatMuls marked ``onnxcomp.lowrank = "<node>:B"`` / ``":A"`` by svd_split)
is two layers solved in sequence: first the input-side factor B with A fixed against the
teacher's output of the pair (exactly, in the eigenbases of AᵀA and XᵀX), then A as an ordinary
layer on B's new outputs.

(b) **Logit distillation of the final classifier** (the layer whose output is the model's logits
output): the exact loss of :mod:`onnxcomp.passes.distill_loss` over that layer's weight and bias
(a convex problem in them) with scipy's L-BFGS and the analytic gradient, stopped at the
iterate with the lowest held-out loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from scipy import linalg, optimize
from threadpoolctl import threadpool_limits

from onnxcomp.calibrate import Paired, Stack, collect, tensor_values
from onnxcomp.data import Dataset
from onnxcomp.graph import Layer, NodeSelection, find_layers, side_by_side
from onnxcomp.passes.distill_loss import distill_loss

__all__ = ["Task", "plan_tasks", "reconstruct", "LinearStats", "solve_rows", "fit_classifier", "split_data",
           "weight_mask", "capture", "LOWRANK_KEY", "MASK_MIN_SPARSITY"]

LOWRANK_KEY = "onnxcomp.lowrank"
MASK_MIN_SPARSITY = 0.01   # a weight with at least this share of exact zeros is treated as pruned
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # λ / mean diag(XᵀX)
TEACHER_PREFIX = "__teacher__/"


@dataclasses.dataclass
class Task:
    """One layer to refit: its teacher target tensor, its mask, and (input-side factor of a
    low-rank pair) the output-side factor it feeds."""

    layer: Layer
    target: str
    mask: np.ndarray | None = None        # [out, in·k] bool, True = free entry
    factor_of: Layer | None = None
    depth: int = 0


def weight_mask(layer: Layer) -> np.ndarray | None:
    """The pruning mask of a layer ([out, in·k], True = kept), or None for a dense one.

    A weight with at least MASK_MIN_SPARSITY exact zeros is taken as pruned: its zeros are the mask.
    """
    w = layer.weight().reshape(layer.out_features, -1)
    zeros = w == 0
    return ~zeros if zeros.mean() >= MASK_MIN_SPARSITY else None


def plan_tasks(student: ir.Model, teacher: ir.Model, selection: NodeSelection
               ) -> tuple[list[Task], list[tuple[str, str]]]:
    """The layers of ``student``'s main graph to refit against ``teacher``, with their stage depth."""
    layers, skipped = find_layers(student.graph, selection)
    teacher_names = set(tensor_values(teacher))
    by_factor = {}
    for layer in layers:
        tag = layer.node.metadata_props.get(LOWRANK_KEY)
        if tag:
            by_factor[tag] = layer
    tasks = []
    for layer in layers:
        why = _unsupported(layer)
        if why is None and layer.node.graph is not student.graph:
            why = "inside a subgraph"
        tag = layer.node.metadata_props.get(LOWRANK_KEY, "")
        partner = by_factor.get(tag[:-2] + ":A") if tag.endswith(":B") else None
        target = (partner or layer).output.name
        if why is None and tag.endswith(":B") and partner is None:
            why = "low-rank input factor without its output factor"
        if why is None and target not in teacher_names:
            why = f"the teacher has no tensor '{target}' to match"
        mask = weight_mask(layer) if why is None else None
        if why is None and partner is not None and (mask is not None or layer.bias() is not None):
            why = "pruned or biased low-rank input factor"
        if why is not None:
            skipped.append((layer.label, why))
            continue
        tasks.append(Task(layer, target, mask, partner))
    _assign_depths(student.graph, tasks)
    return tasks, skipped


def _unsupported(layer: Layer) -> str | None:
    node = layer.node
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return "Gemm with transA"
    if node.op_type == "Conv":
        if layer.group != 1:
            return "grouped Conv"
        if len(layer.shape) not in (3, 4):
            return f"{len(layer.shape) - 2}-D Conv (only 1-D and 2-D)"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "Conv with auto_pad SAME"
    return None


def _assign_depths(graph: ir.Graph, tasks: list[Task]) -> None:
    """Depth of each task = 1 + the deepest task upstream of its input (graph order is topological)."""
    by_node = {t.layer.node: t for t in tasks}
    level: dict[ir.Node, int] = {}
    for node in graph:
        up = max((level.get(v.producer(), 0) for v in node.inputs if v is not None and v.producer() is not None),
                 default=0)
        if node in by_node:
            up += 1
            by_node[node].depth = up
        level[node] = up


# --- statistics --------------------------------------------------------------------------------


class LinearStats:
    """Running [X 1]ᵀ[X 1], [X 1]ᵀY, Σy² (per output) and the row count of one layer."""

    def __init__(self, layer: Layer, width: int | None = None):
        self.layer = layer
        self.width = layer.out_features if width is None else width   # output channels of the target
        self.g: np.ndarray | None = None
        self.c: np.ndarray | None = None
        self.yy: np.ndarray | None = None
        self.rows = 0
        self.problem: str | None = None

    def fold(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.problem:
            return
        xr, yr = input_rows(self.layer, x), output_rows(self.layer, y)
        if xr.shape[0] != yr.shape[0] or yr.shape[1] != self.width:
            self.problem = f"teacher tensor of shape {list(y.shape)} does not match the layer's output"
            return
        xa = np.hstack([xr, np.ones((xr.shape[0], 1), np.float32)])
        if self.g is None:
            d = xa.shape[1]
            self.g, self.c = np.zeros((d, d)), np.zeros((d, yr.shape[1]))
            self.yy = np.zeros(yr.shape[1])
        for start in range(0, xa.shape[0], 4096):  # float32 products, float64 totals
            xs, ys = xa[start:start + 4096], yr[start:start + 4096]
            self.g += xs.T @ xs
            self.c += xs.T @ ys
            self.yy += (ys.astype(np.float64) ** 2).sum(axis=0)
        self.rows += xr.shape[0]

    def __add__(self, other: LinearStats) -> LinearStats:
        out = LinearStats(self.layer, self.width)
        out.g, out.c, out.yy, out.rows = self.g + other.g, self.c + other.c, self.yy + other.yy, self.rows + other.rows
        out.problem = self.problem or other.problem
        return out


def input_rows(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input as rows of what each output position reads (Conv: image patches)."""
    x = np.asarray(x, np.float32)
    if layer.node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])
    node = layer.node
    if len(layer.shape) == 3:  # 1-D: a 2-D Conv of height 1
        x = x[:, :, None, :]
        kh, kw = 1, layer.shape[2]
        p0, p1 = node.attributes.get_ints("pads", [0, 0])
        pads = [0, p0, 0, p1]
        sh, sw = 1, node.attributes.get_ints("strides", [1])[0]
        dh, dw = 1, node.attributes.get_ints("dilations", [1])[0]
    else:
        _, _, kh, kw = layer.shape
        pads = list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
        sh, sw = node.attributes.get_ints("strides", [1, 1])
        dh, dw = node.attributes.get_ints("dilations", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, kh, kw]
    return np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(-1, x.shape[1] * kh * kw)


def output_rows(layer: Layer, y: np.ndarray) -> np.ndarray:
    """The layer's output as rows of its output channels."""
    y = np.asarray(y, np.float32)
    if layer.node.op_type == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


# --- solves --------------------------------------------------------------------------------------


def row_errors(stats: LinearStats, w: np.ndarray) -> np.ndarray:
    """Σ over rows of (x̃·w_o − y_o)² for each output o; ``w`` is [out, d] or [out, d+1] (bias last)."""
    d = w.shape[1]
    g, c = stats.g[:d, :d], stats.c[:d]
    return np.einsum("od,de,oe->o", w, g, w) - 2 * np.einsum("od,do->o", w, c) + stats.yy


def solve_rows(stats: LinearStats, w0: np.ndarray, mask: np.ndarray | None, ridges: tuple[float, ...],
               outputs: np.ndarray | None = None) -> list[np.ndarray]:
    """For each ridge r: argmin_w Σ(x̃·w − y)² + λ‖w − w₀‖² per output row over its free entries
    (λ = r · mean diag XᵀX; ``w0`` is [out, d] or [out, d+1] with the bias last); masked entries
    stay 0. A mask pattern shared by many rows: one eigendecomposition serves every ridge; a pattern
    of few rows (unstructured pruning: each row its own) costs less as one Cholesky solve per ridge.
    ``outputs``: which of the layer's outputs the rows of ``w0`` are (default: all, in order)."""
    out, d = w0.shape
    inputs = d - 1 if d == stats.g.shape[0] else d
    g, c = stats.g[:d, :d], stats.c[:d] if outputs is None else stats.c[:d][:, outputs]
    scale = max(float(np.mean(np.diag(g)[:inputs])), 1e-12)
    solutions = [np.zeros((out, d)) for _ in ridges]
    free = np.ones((out, d), bool)
    if mask is not None:
        free[:, :inputs] = mask
    patterns, which = np.unique(free, axis=0, return_inverse=True)
    which = which.reshape(-1)
    for index, pattern in enumerate(patterns):
        rows = np.flatnonzero(which == index)
        keep = np.flatnonzero(pattern)
        if keep.size == 0:
            continue
        gk, ck, wk = g[np.ix_(keep, keep)], c[np.ix_(keep, rows)], w0[np.ix_(rows, keep)].T
        if len(rows) * 4 < len(ridges) * keep.size:  # eigh ~ 9k^3 + 4k^2·rows·ridges vs k^3/3 per ridge
            try:
                for solution, ridge in zip(solutions, ridges):
                    lam = ridge * scale
                    factor = linalg.cho_factor(gk + lam * np.eye(keep.size), check_finite=False)
                    solution[np.ix_(rows, keep)] = linalg.cho_solve(factor, ck + lam * wk, check_finite=False).T
                continue
            except linalg.LinAlgError:  # not positive definite (rounding in XᵀX): the eigh path clamps it
                pass
        values, vectors = np.linalg.eigh(gk)
        values = np.maximum(values, 0.0)
        c_rot, w_rot = vectors.T @ ck, vectors.T @ wk
        for solution, ridge in zip(solutions, ridges):
            lam = ridge * scale
            solution[np.ix_(rows, keep)] = (vectors @ ((c_rot + lam * w_rot) / (values + lam)[:, None])).T
    return solutions


def refit_layer(fit: LinearStats, hold: LinearStats, w0: np.ndarray, mask: np.ndarray | None
                ) -> tuple[np.ndarray, dict]:
    """New weights for one layer (rows that would get worse keep ``w0``) and what happened."""
    total = fit + hold
    held = np.stack([row_errors(hold, w) for w in solve_rows(fit, w0, mask, RIDGE_GRID)])  # [ridges, out]
    pick = held.argmin(axis=0)                                  # λ per row, by held-out error
    rows = np.arange(w0.shape[0])
    held_new = held[pick, rows]
    w_all = np.zeros_like(w0)
    for index in np.unique(pick):  # each row's own λ only
        chosen = pick == index
        part = solve_rows(total, w0[chosen], None if mask is None else mask[chosen], (RIDGE_GRID[index],),
                          outputs=np.flatnonzero(chosen))[0]
        w_all[chosen] = part
    before, after = row_errors(total, w0), row_errors(total, w_all)
    accept = (held_new < row_errors(hold, w0)) & (after <= before)
    w = np.where(accept[:, None], w_all, w0)
    energy = max(float(total.yy.sum()), 1e-30)
    return w, {"ridge": float(np.median(np.asarray(RIDGE_GRID)[pick])), "rows_refit": int(accept.sum()),
               "rows": int(len(accept)), "rel_error_before": float(before.sum() / energy),
               "rel_error_after": float(np.where(accept, after, before).sum() / energy)}


def refit_factor(fit: LinearStats, hold: LinearStats, b0: np.ndarray, a: np.ndarray, a_bias: np.ndarray | None
                 ) -> tuple[np.ndarray, dict]:
    """New input-side factor B [k, in] of ``y ≈ A·B·x + b_A`` with A fixed (kept unless better)."""
    total = fit + hold

    def parts(stats):
        d = stats.g.shape[0] - 1
        g, c = stats.g[:d, :d], stats.c[:d].copy()
        bias = np.zeros(a.shape[0]) if a_bias is None else a_bias.astype(np.float64)
        c -= np.outer(stats.g[:d, d], bias)          # Xᵀ(Y − 1·bᵀ)
        const = stats.yy.sum() - 2 * bias @ stats.c[d] + stats.g[d, d] * bias @ bias
        return g, c @ a, const                        # R = Ĉ·A  [in, k]

    p = a.T.astype(np.float64) @ a

    def err(stats, b):
        g, r, const = parts(stats)
        return float(np.einsum("ij,jk,ik->", p @ b, g, b) - 2 * np.trace(b @ r) + const)

    def solve(stats, ridge):
        g, r, _ = parts(stats)
        dp, up = np.linalg.eigh(p)
        dg, ug = np.linalg.eigh(g)
        lam = ridge * max(float(dp.mean() * dg.mean()), 1e-12)
        rhs = up.T @ (r.T + lam * b0) @ ug
        return up @ (rhs / (np.outer(dp, dg) + lam)) @ ug.T

    best = min(RIDGE_GRID, key=lambda r: err(hold, solve(fit, r)))
    held_ok = err(hold, solve(fit, best)) < err(hold, b0)
    b_all = solve(total, best)
    before, after = err(total, b0), err(total, b_all)
    accept = held_ok and after <= before
    energy = max(float(total.yy.sum()), 1e-30)
    return (b_all if accept else b0), {"ridge": best, "rows_refit": b0.shape[0] if accept else 0, "rows": b0.shape[0],
                                       "rel_error_before": before / energy,
                                       "rel_error_after": (after if accept else before) / energy}


# --- the engine ----------------------------------------------------------------------------------


def split_data(data: Dataset, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded 4:1 split of the samples (fit, held out); order kept inside each part."""
    n = len(data)
    hold = np.zeros(n, bool)
    hold[np.random.default_rng(seed).permutation(n)[: max(1, n // 5)]] = True

    def part(select):
        labels = None if data.labels is None else data.labels[select]
        inputs = {k: v if data.layout(k) == "shared" else v[select] for k, v in data.inputs.items()}
        return Dataset(inputs, labels, data.source, data.fixed_batch, dict(data.layouts))

    return part(~hold), part(hold)


def reconstruct(student: ir.Model, teacher: ir.Model, data: Dataset, selection: NodeSelection, *, seed: int,
                batch_size: int, log: Callable[[str], None] | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """(a): refit every eligible layer of ``student`` in place, stage by stage; per-layer results and skips."""
    tasks, skipped = plan_tasks(student, teacher, selection)
    fit_data, hold_data = split_data(data, seed)
    results = []
    for depth in sorted({t.depth for t in tasks}):
        stage = [t for t in tasks if t.depth == depth]
        merged, names = side_by_side(student, teacher, TEACHER_PREFIX)
        gathered = []
        for part in (fit_data, hold_data):
            reducers: dict[str, list] = {}
            per_task = []
            for task in stage:
                stats = LinearStats(task.layer, (task.factor_of or task.layer).out_features)
                paired = Paired(stats.fold)
                reducers.setdefault(task.layer.input.name, []).append(paired.first)
                reducers.setdefault(names[task.target], []).append(paired.second)
                per_task.append(stats)
            collect(merged, part, reducers, batch_size=batch_size)
            gathered.append(per_task)
        for task, fit, hold in zip(stage, *gathered):
            problem = fit.problem or hold.problem or (None if fit.g is not None and hold.g is not None else "no data")
            if problem:
                skipped.append((task.layer.label, problem))
                continue
            with threadpool_limits(1):  # many small LAPACK calls: threads only contend (20x slower when busy)
                results.append(_apply(task, fit, hold))
            if log:
                log(f"{task.layer.label}: rel. error {results[-1]['rel_error_before']:.4g} -> "
                    f"{results[-1]['rel_error_after']:.4g}")
    return results, skipped


def _apply(task: Task, fit: LinearStats, hold: LinearStats) -> dict:
    layer = task.layer
    weight = layer.weight()
    if task.factor_of is not None:
        b, info = refit_factor(fit, hold, weight.astype(np.float64), task.factor_of.weight().astype(np.float64),
                               task.factor_of.bias())
        if info["rows_refit"]:
            layer.set_weight(b.astype(weight.dtype))
        return {"layer": layer.label, "kind": "low-rank input factor", **info}
    bias = layer.bias()
    w0 = weight.reshape(layer.out_features, -1).astype(np.float64)
    if bias is not None:
        w0 = np.hstack([w0, bias.astype(np.float64)[:, None]])
    w, info = refit_layer(fit, hold, w0, task.mask)
    if info["rows_refit"]:
        inputs = weight[0].size
        new_weight = w[:, :inputs].reshape(weight.shape).astype(weight.dtype)
        if task.mask is not None:
            new_weight = np.where(task.mask.reshape(weight.shape), new_weight, 0).astype(weight.dtype)
        layer.set_weight(new_weight)
        if bias is not None:
            layer.set_bias(w[:, inputs].astype(bias.dtype))
    kind = "low-rank output factor" if task.layer.node.metadata_props.get(LOWRANK_KEY, "").endswith(":A") else "layer"
    return {"layer": layer.label, "kind": kind + (" (masked)" if task.mask is not None else ""), **info}


def capture(model: ir.Model, data: Dataset, names: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Every batch of the named tensors, concatenated in sample order (small tensors only: logits)."""
    stacks = {n: Stack() for n in names}
    collect(model, data, {n: [s] for n, s in stacks.items()}, batch_size=batch_size)
    return {n: s.value for n, s in stacks.items()}


def fit_classifier(student: ir.Model, layer: Layer, data: Dataset, teacher_logits: np.ndarray,
                   labels: np.ndarray | None, *, alpha: float, temperature: float, seed: int, batch_size: int,
                   max_iter: int = 300) -> dict:
    """(b): the final classifier's weight and bias by L-BFGS on the exact loss (held-out early stop)."""
    x = capture(student, data, [layer.input.name], batch_size)[layer.input.name]
    if x.ndim != 2 or layer.node.op_type == "Conv":
        return {"skipped": f"{layer.label}: input of shape {list(x.shape)} (needs [samples, features])"}
    n = min(len(x), len(teacher_logits))
    x, t = x[:n].astype(np.float64), teacher_logits[:n].astype(np.float64)
    y = None if labels is None else labels[:n]
    weight, bias = layer.weight(), layer.bias()
    mask = weight_mask(layer)
    out, d = weight.shape
    hold = np.zeros(n, bool)
    hold[np.random.default_rng(seed).permutation(n)[: max(1, n // 5)]] = True
    parts = {"fit": ~hold, "hold": hold}

    def unpack(theta):
        w = theta[: out * d].reshape(out, d)
        b = theta[out * d:] if bias is not None else 0.0
        return w, b

    def loss(theta, part, grad=True):
        w, b = unpack(theta)
        sel = parts[part]
        value = distill_loss(x[sel] @ w.T + b, t[sel], None if y is None else y[sel], alpha=alpha,
                             temperature=temperature, grad=grad)
        if not grad:
            return value.total
        gw = value.grad.T @ x[sel]
        if mask is not None:
            gw = gw * mask
        gb = value.grad.sum(axis=0) if bias is not None else np.zeros(0)
        return value.total, np.concatenate([gw.ravel(), gb])

    theta0 = np.concatenate([weight.astype(np.float64).ravel(),
                             np.zeros(0) if bias is None else bias.astype(np.float64)])
    trace = [(loss(theta0, "hold", grad=False), theta0)]
    with threadpool_limits(1):
        optimize.minimize(loss, theta0, args=("fit",), jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter},
                          callback=lambda th: trace.append((loss(th, "hold", grad=False), th.copy())))
    best_loss, best = min(trace, key=lambda item: item[0])
    accepted = best_loss < trace[0][0]
    if accepted:
        w, b = unpack(best)
        layer.set_weight(w.astype(weight.dtype))
        if bias is not None:
            layer.set_bias(np.asarray(b, bias.dtype))
    return {"layer": layer.label, "iterations": len(trace) - 1, "best_iteration": int(np.argmin([v for v, _ in trace])),
            "held_out_loss_before": round(trace[0][0], 6), "held_out_loss_after": round(best_loss, 6),
            "accepted": bool(accepted)}
