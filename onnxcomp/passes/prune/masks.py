"""Pruning masks exactly as ``torch.nn.utils.prune`` computes them, in numpy.

Every function takes the *importance scores* of one weight in its logical layout (``|w|`` for
L1, ``|w|·‖x‖`` for Wanda — torch's ``importance_scores``) and the mask left by earlier pruning
(all ones the first time) and returns the new mask, composed like torch's ``PruningContainer``:

- unstructured: ``amount`` of the entries that are still unpruned (``mask == 1``) are pruned;
- structured (``dim``): ``amount`` of the channels along ``dim`` that are not yet entirely
  pruned are pruned, by the L\\ ``n`` norm of their scores over every other axis;
- global: one threshold over the still-unpruned entries of all weights, concatenated in order.

``amount`` is torch's: an ``int`` counts units, a ``float`` is a fraction of the candidates,
rounded with Python's ``round`` (half to even).

Ties: torch's ``topk`` picks among equal scores in an order that depends on libstdc++'s
``nth_element``/``partial_sort`` internals (no documented rule). Here equal scores are pruned
lowest flat index first (a stable sort). Masks are identical to torch's whenever the scores at
the cut are distinct; with a tie straddling the cut, the same number of units is pruned and only
the choice inside the tied set can differ.

Random pruning reproduces torch's CPU generator: ``TorchRandom(seed)`` is the MT19937 stream of
``torch.manual_seed(seed)`` and ``torch.rand`` draws ``(u32 & 0xFFFFFF) · 2⁻²⁴``, so seed ``s``
here gives the masks of ``torch.manual_seed(s)`` followed by the same ``random_unstructured`` /
``random_structured`` calls in the same order (the pass prunes layers in graph order).
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "count_to_prune",
    "TorchRandom",
    "unstructured_mask",
    "structured_mask",
    "random_unstructured_mask",
    "random_structured_mask",
    "global_unstructured_masks",
    "nm_mask",
    "channel_norms",
]


def count_to_prune(amount: float | int, size: int) -> int:
    """torch's ``_compute_nparams_toprune`` with its validation: an int is a count (at most
    ``size``), a float in [0, 1] a fraction, ``round(amount * size)``."""
    if isinstance(amount, numbers.Integral) and not isinstance(amount, bool):
        if amount < 0:
            raise ValueError(f"amount={amount} must be a non-negative integer")
        if amount > size:
            raise ValueError(f"amount={amount} is more than the {size} units left to prune")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"amount={amount} must be a fraction in [0, 1]")
    return round(float(amount) * size)


class TorchRandom:
    """The CPU random stream of ``torch.manual_seed(seed)``: MT19937 seeded by ``init_genrand``
    (numpy's legacy seeding), one 32-bit draw per ``torch.rand`` element, keeping 24 bits."""

    def __init__(self, seed: int):
        self._bits = np.random.MT19937(0)
        self._bits._legacy_seeding(int(seed))

    def rand24(self, n: int) -> np.ndarray:
        """``torch.rand(n)`` as the integers ``value · 2²⁴`` (same order, exact)."""
        if n == 0:
            return np.zeros(0, np.int64)
        return (self._bits.random_raw(n) & 0xFFFFFF).astype(np.int64)


def _smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest of a 1-D array (ties: lowest index first)."""
    if k == 0:
        return np.zeros(0, np.int64)
    if k >= scores.size:
        return np.arange(scores.size)
    cut = np.partition(scores, k - 1)[k - 1]  # O(n): the k-th smallest value
    below = np.flatnonzero(scores < cut)
    tied = np.flatnonzero(scores == cut)
    return np.concatenate([below, tied[: k - below.size]])


def unstructured_mask(scores: np.ndarray, mask: np.ndarray, amount: float | int) -> np.ndarray:
    """``l1_unstructured`` (scores = |w|, or any importance) on top of ``mask``."""
    mask = np.asarray(mask, bool)
    new = mask.copy()
    remaining = np.flatnonzero(mask.reshape(-1))
    k = count_to_prune(amount, remaining.size)
    flat = np.abs(np.asarray(scores, np.float64)).reshape(-1)[remaining]
    new.reshape(-1)[remaining[_smallest(flat, k)]] = False
    return new


def random_unstructured_mask(rng: TorchRandom, mask: np.ndarray, amount: float | int) -> np.ndarray:
    """``random_unstructured`` on top of ``mask``: the ``k`` entries with the largest draws go."""
    mask = np.asarray(mask, bool)
    new = mask.copy()
    remaining = np.flatnonzero(mask.reshape(-1))
    k = count_to_prune(amount, remaining.size)
    if k:  # torch draws nothing when k == 0
        draws = rng.rand24(remaining.size)
        new.reshape(-1)[remaining[_smallest(-draws, k)]] = False
    return new


def channel_norms(scores: np.ndarray, n: float, dim: int) -> np.ndarray:
    """torch's ``_compute_norm``: the L\\ ``n`` norm of each slice along ``dim`` (n may be inf)."""
    moved = np.moveaxis(np.asarray(scores, np.float64), dim, 0).reshape(scores.shape[dim], -1)
    if np.isinf(n):
        return np.abs(moved).max(axis=1) if n > 0 else np.abs(moved).min(axis=1)
    return np.linalg.norm(moved, ord=n, axis=1) if n >= 1 else (np.abs(moved) ** n).sum(axis=1) ** (1.0 / n)


def _live_channels(mask: np.ndarray, dim: int) -> np.ndarray:
    """Channels along ``dim`` not yet entirely pruned (PruningContainer's structured slice)."""
    return np.flatnonzero(np.moveaxis(mask, dim, 0).reshape(mask.shape[dim], -1).any(axis=1))


def _structured_start(mask: np.ndarray, amount: float | int, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mask as bool, the live channels along ``dim``, how many of them ``amount`` prunes)."""
    mask = np.asarray(mask, bool)
    if mask.ndim < 2:
        raise ValueError("structured pruning needs a weight of rank >= 2")
    live = _live_channels(mask, dim)
    return mask, live, count_to_prune(amount, live.size)


def structured_mask(scores: np.ndarray, mask: np.ndarray, amount: float | int, n: float, dim: int) -> np.ndarray:
    """``ln_structured(amount, n, dim)`` on top of ``mask``: the live channels with the smallest
    L\\ ``n`` norms of their scores are pruned whole."""
    mask, live, k = _structured_start(mask, amount, dim)
    if k == 0:
        return mask.copy()
    sub = np.take(scores, live, axis=dim)
    norms = channel_norms(sub, n, dim)
    # torch keeps topk(norm, C - k, largest=True); pruning the k smallest is the same set
    drop = live[_smallest(norms, k)]
    return _drop_channels(mask, drop, dim)


def random_structured_mask(rng: TorchRandom, mask: np.ndarray, amount: float | int, dim: int) -> np.ndarray:
    """``random_structured(amount, dim)`` on top of ``mask``: a draw per live channel; channels
    whose draw is <= the k-th smallest are pruned (torch's ``kthvalue`` rule, ties included)."""
    mask, live, k = _structured_start(mask, amount, dim)
    if k == 0:
        return mask.copy()
    draws = rng.rand24(live.size)
    threshold = np.sort(draws)[k - 1]
    return _drop_channels(mask, live[draws <= threshold], dim)


def _drop_channels(mask: np.ndarray, channels: np.ndarray, dim: int) -> np.ndarray:
    new = mask.copy()
    index = [slice(None)] * mask.ndim
    index[dim] = channels
    new[tuple(index)] = False
    return new


def global_unstructured_masks(scores: list[np.ndarray], masks: list[np.ndarray], amount: float | int
                              ) -> list[np.ndarray]:
    """``global_unstructured`` with an L1 method: one cut over the still-unpruned entries of all
    weights, concatenated in the given order (ties: lowest index of the concatenation first).

    Computed one weight at a time, never concatenated: the cut is found by bisection on the
    scores' bit patterns (monotonic for non-negative floats), so a model of several GB holds only
    one layer's temporaries beside its scores and masks.
    """
    masks = [np.asarray(m, bool) for m in masks]
    dtype = np.float32 if all(np.asarray(x).dtype == np.float32 for x in scores) else np.float64
    scores = [_nonnegative(x, dtype) for x in scores]
    k = count_to_prune(amount, sum(int(np.count_nonzero(m)) for m in masks))
    if k == 0:
        return [m.copy() for m in masks]
    key = np.uint32 if dtype == np.float32 else np.uint64

    def at_most(bits: int) -> int:  # unpruned entries whose score is <= the float with these bits
        t = np.array(bits, key).view(dtype)
        return sum(int(np.count_nonzero((x <= t) & m)) for x, m in zip(scores, masks))

    lo, hi = 0, max(int(np.max(x[m]).view(key)) if m.any() else 0 for x, m in zip(scores, masks))
    while lo < hi:  # the smallest bit pattern with at least k unpruned scores at or below it
        mid = (lo + hi) // 2
        if at_most(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    cut = np.array(lo, key).view(dtype)
    quota = k - sum(int(np.count_nonzero((x < cut) & m)) for x, m in zip(scores, masks))
    out = []
    for x, m in zip(scores, masks):
        new = np.ascontiguousarray(m & ~(x < cut))  # C order: the flat indices below are C-order
        if quota > 0:
            tied = np.flatnonzero((x == cut) & m)[:quota]
            new.reshape(-1)[tied] = False
            quota -= tied.size
        out.append(new)
    return out


def _nonnegative(x: np.ndarray, dtype) -> np.ndarray:
    x = np.asarray(x, dtype)
    return x if not x.size or x.min() >= 0 else np.abs(x)


def global_random_masks(rng: TorchRandom, masks: list[np.ndarray], amount: float | int) -> list[np.ndarray]:
    """``global_unstructured`` with ``RandomUnstructured``: one draw per unpruned entry of all weights."""
    return _split_like(random_unstructured_mask(rng, _concat_masks(masks), amount), masks)


def _concat_masks(masks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(m, bool).reshape(-1) for m in masks])


def _split_like(flat: np.ndarray, masks: list[np.ndarray]) -> list[np.ndarray]:
    """``flat`` cut back into arrays of the shapes of ``masks`` (concatenated in that order)."""
    out, start = [], 0
    for m in masks:
        out.append(flat[start:start + m.size].reshape(m.shape))
        start += m.size
    return out


def nm_mask(scores: np.ndarray, mask: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M sparsity: in every run of ``m`` consecutive weights along the input axis (axis 1; the
    other axes fixed) at most ``n`` survive, the largest scores among those still unpruned.
    An axis-1 length that is not a multiple of ``m`` leaves its last short run at most ``n``."""
    mask = np.asarray(mask, bool)
    s = np.where(mask, np.abs(np.asarray(scores, np.float64)), -np.inf)
    moved = np.moveaxis(s, 1, -1)
    length = moved.shape[-1]
    pad = (-length) % m
    padded = np.concatenate([moved, np.full(moved.shape[:-1] + (pad,), -np.inf)], axis=-1) if pad else moved
    runs = padded.reshape(-1, m)
    # keep the n largest per run (ties: lowest index kept first)
    order = np.argsort(-runs, axis=1, kind="stable")
    keep = np.zeros(runs.shape, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    keep &= np.isfinite(runs)
    keep = keep.reshape(padded.shape)[..., :length]
    return mask & np.moveaxis(keep, -1, 1)
