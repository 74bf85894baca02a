"""Options of the ``prune`` and ``prune_remove`` passes (torch.nn.utils.prune's vocabulary)."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, StrictFloat, StrictInt, model_validator

from onnxcomp.graph import NodeSelection
from onnxcomp.passes.base import PassConfig

__all__ = ["PruneConfig", "PruneRemoveConfig"]


class PruneConfig(PassConfig, NodeSelection):
    method: Literal["random", "l1", "ln", "wanda"] = Field(
        "l1", description="scores: random (torch's seeded generator), l1 |w|, ln (L-n norm of slices, needs dim), "
                          "wanda |w|*||x|| per input channel (needs --calib)")
    amount: StrictInt | StrictFloat | None = Field(
        None, description="as torch: a float in [0, 1) is the fraction of the still-unpruned units to prune, "
                          "an int their count; required unless nm is set")
    n: float | None = Field(None, gt=0, description="ln: the norm's order (1, 2, inf, any p > 0); default 2")
    dim: Literal[0, 1] | None = Field(
        None, description="absent: unstructured; 0: whole output channels (rows / filters), 1: input channels")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: amount per layer; global: one threshold over all selected layers (unstructured; "
                             "wanda: each layer loses what global l1 takes from it, wanda picks which weights)")
    nm: str | None = Field(None, description="N:M sparsity, e.g. '2:4': at most N of every M consecutive weights "
                                             "along the input axis survive (instead of amount)")
    apply: Literal["fold", "mask", "remove_channels"] = Field(
        "fold", description="fold: zeros into the weights; mask: explicit Mul(W, mask) in the graph (prune_remove "
                            "folds it); remove_channels: delete pruned channels and what reads them (needs dim)")
    storage: Literal["dense", "sparse"] = Field(
        "dense", description="sparse: store pruned weights as bitmask + nonzero values decoded in the graph "
                             "(onnxruntime folds it at load), per tensor only where that is smaller")
    seed: int | None = Field(None, ge=0, description="random: torch.manual_seed equivalent (default: the run's seed)")
    keep_first_last: bool = Field(False, description="leave the first and the last selected layer (graph order) "
                                                     "unpruned; default: every selected layer is pruned")

    @model_validator(mode="after")
    def _cross_checks(self) -> PruneConfig:
        if self.nm is not None:
            match = re.fullmatch(r"(\d+):(\d+)", self.nm)
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f"nm must be 'N:M' with 0 < N < M (got {self.nm!r})")
            if self.amount is not None:
                raise ValueError("nm and amount exclude each other: nm fixes the sparsity at 1 - N/M")
            if self.dim is not None or self.scope == "global" or self.apply == "remove_channels":
                raise ValueError("nm is unstructured and per layer: drop dim / scope: global / remove_channels")
            if self.method == "random":
                raise ValueError("nm needs scores: use method l1 or wanda")
        elif self.amount is None:
            raise ValueError("amount is required (a fraction in [0, 1) or an integer count), or set nm")
        if isinstance(self.amount, float) and not 0.0 <= self.amount < 1.0:
            raise ValueError(f"amount as a fraction must be in [0, 1) (got {self.amount}); an int is a count")
        if isinstance(self.amount, int) and self.amount < 0:
            raise ValueError(f"amount as a count must be >= 0 (got {self.amount})")
        if self.method == "ln" and self.dim is None:
            raise ValueError("method ln scores slices: set dim (0 or 1), or use l1 for unstructured pruning")
        if self.n is not None and (self.dim is None or self.method not in ("ln", "wanda")):
            raise ValueError("n is the order of the slice norm: it needs dim and method ln or wanda (l1 with dim is n=1)")
        if self.scope == "global" and self.dim is not None:
            raise ValueError("scope global is unstructured only (as torch.global_unstructured): drop dim")
        if self.apply == "remove_channels" and self.dim is None:
            raise ValueError("apply remove_channels is structured: set dim (0: output channels, 1: input channels)")
        if self.storage == "sparse" and self.apply != "fold":
            raise ValueError("storage sparse stores folded zeros: it needs apply fold")
        return self

    @property
    def norm_order(self) -> float:
        """The slice norm's order: n, else 1 for l1 and 2 otherwise."""
        if self.n is not None:
            return self.n
        return 1.0 if self.method == "l1" else 2.0

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        if self.nm is None:
            return None
        n, m = self.nm.split(":")
        return int(n), int(m)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda"

    def describe(self) -> str:
        """e.g. ``l1 unstructured 0.5`` / ``ln(n=inf) dim 0 3``."""
        if self.nm is not None:
            return f"{self.method} {self.nm}"
        order = self.norm_order
        how = "unstructured" if self.dim is None else f"dim {self.dim} (L{'inf' if math.isinf(order) else f'{order:g}'})"
        return f"{self.method} {how} {self.scope} amount {self.amount}"


class PruneRemoveConfig(PassConfig, NodeSelection):
    pass
