"""What every onnxcomp pass is: a typed config, an in-place onnx-ir pass, and stats.

A pass subclasses :class:`CompressionPass`, sets ``name`` (stable snake_case),
``summary`` (one line) and ``Config`` (a :class:`PassConfig`), and implements
``run(model, stats)``. It records what it touched and what it skipped, with a
reason, in ``stats``; a pass that touched nothing says why in ``stats.notes``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict, model_validator

from onnxcomp.graph import NodeSelection, label, subgraph_nodes
from onnxcomp.params import count_params

if TYPE_CHECKING:
    from onnxcomp.data import Dataset

__all__ = ["register", "skip_subgraph_nodes", "PassConfig", "PassContext", "FidelityEvaluator", "PassStats", "CompressionPass", "CompressionResult"]


class PassConfig(BaseModel):
    """Base of every pass config: unknown keys are errors, values are validated.

    ``renamed_options`` (old name -> new name) keeps options renamed in this release working,
    with a DeprecationWarning; an old list option (``exclude_nodes``) is appended to the new one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    renamed_options: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _accept_renamed(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(old in data for old in cls.renamed_options):
            return data
        data = dict(data)
        for old, new in cls.renamed_options.items():
            if old not in data:
                continue
            warnings.warn(f"{cls.__name__}: option '{old}' is deprecated and will be removed in the next "
                          f"release; use '{new}'", DeprecationWarning, stacklevel=2)
            value = data.pop(old)
            if isinstance(value, (list, tuple)):
                value = (*data.get(new, ()), *value)
            data[new] = value
        return data


class FidelityEvaluator(Protocol):
    """How a pass measures a candidate model the way the run will judge it (implemented by
    :class:`onnxcomp.validate.FidelityCheck`; passes never import the validator)."""

    thresholds: Mapping[str, float]  # the fidelity thresholds to meet (empty: none set)
    target: Mapping[str, Any]  # the thresholds and what they measure, for reports
    output: str | None  # the model output the headline metrics use (None: the first)

    def reference(self, model: ir.Model, data: Dataset, batch_size: int = 32) -> Any:
        """The outputs of ``model`` on ``data`` (computed once, passed to :meth:`measure`)."""

    def measure(self, original: ir.Model, candidate: ir.Model, data: Dataset, reference: Any = None,
                batch_size: int = 32) -> dict[str, Any]:
        """Fidelity metrics of ``candidate`` against ``original`` on ``data``."""

    def failures(self, fidelity: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(thresholds failed, thresholds that cannot be checked) for these metrics."""

    def loss(self, fidelity: dict[str, Any]) -> float:
        """One number to rank candidates by, lower is better."""


@dataclasses.dataclass
class PassContext:
    """What a run shares with its passes: data, the seed, a fidelity evaluator, and where it works.

    ``fidelity`` lets a pass aim at the fidelity the run will be judged by (quantize_static's
    sensitivity fallback): the pipeline builds it from the recipe's gate; None when the pass
    runs outside a recipe. ``original`` is the model as the run loaded it, before any pass
    (read only: a teacher for distillation); None outside a run.
    """

    calib: Dataset | None = None
    seed: int = 0
    batch_size: int = 32
    progress: bool = False
    fidelity: FidelityEvaluator | None = None
    original: ir.Model | None = None

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator that depends only on the seed and ``salt`` (deterministic)."""
        return np.random.default_rng([self.seed, *salt.encode()])

    def progress_bar(self, label: str) -> Callable[[int, int], None] | None:
        """A ``progress(done, total)`` callback drawing a transient rich progress bar named ``label``
        when the run shows progress (``onnxcomp run``), else None. One bar per stream of calls:
        it closes when done reaches total, and the next call opens a new one."""
        if not self.progress:
            return None
        from rich.progress import Progress

        state: dict = {}

        def update(done: int, total: int) -> None:
            if "bar" not in state:
                state["bar"] = Progress(transient=True)
                state["bar"].start()
                state["task"] = state["bar"].add_task(label, total=total)
            state["bar"].update(state["task"], completed=done, total=total)
            if done >= total:
                state["bar"].stop()
                state.clear()

        return update

    def require_calib(self, pass_name: str) -> Dataset:
        from onnxcomp.errors import OnnxcompError

        if self.calib is None:
            raise OnnxcompError(f"pass '{pass_name}' needs calibration data: pass --calib DATA.npz")
        return self.calib


@dataclasses.dataclass
class PassStats:
    """What one pass did, in numbers and names."""

    name: str
    touched: list[str] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    def touch(self, what: str) -> None:
        self.touched.append(what)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append((what, why))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "touched": list(self.touched),
            "skipped": [{"what": w, "why": y} for w, y in self.skipped],
            "notes": list(self.notes),
            "metrics": dict(self.metrics),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "seconds": round(self.seconds, 4),
        }


@dataclasses.dataclass
class CompressionResult(ir.passes.PassResult):
    stats: PassStats | None = None


class CompressionPass(ir.passes.InPlacePass):
    """An in-place onnx-ir pass with a validated config and stats."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    needs_calibration: ClassVar[bool] = False
    # the default-domain opset the pass needs; the pipeline upgrades older models first (verified)
    min_opset: ClassVar[int] = 0
    # reads PassContext.original (a teacher): run_passes keeps a copy of the incoming model when none is given
    uses_original: ClassVar[bool] = False

    @classmethod
    def calibration_needed(cls, config: PassConfig) -> bool:
        """Whether this pass, with ``config``, needs calibration data (checked before any work)."""
        return cls.needs_calibration

    @classmethod
    def extras_needed(cls, config: PassConfig) -> tuple[str, ...]:
        """The optional extras of onnxcomp (e.g. ``train`` = torch) this pass needs with ``config``."""
        return ()

    @classmethod
    def check(cls, config: PassConfig, model: ir.Model, context: PassContext) -> None:
        """Check the inputs this pass will read (files named in ``config``, the data in
        ``context``) against ``model`` before any pass runs; raise OnnxcompError naming the
        problem. The default checks nothing."""

    def __init__(self, config: PassConfig | dict | None = None, context: PassContext | None = None):
        super().__init__()
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config(**config)
        self.config = config
        self.context = context or PassContext()

    def call(self, model: ir.Model) -> CompressionResult:
        stats = PassStats(self.name)
        stats.params_before = count_params(model)
        unmatched = self.config.unmatched(model.graph) if isinstance(self.config, NodeSelection) else []
        self.run(model, stats)
        for entry in unmatched:  # likely a typo: said once, before the pass changed names
            note = f"selection entry '{entry}' matches no node"
            if note not in stats.notes:
                stats.notes.append(note)
        stats.params_after = count_params(model)
        if not stats.touched and not stats.notes:
            stats.notes.append("nothing eligible: no node was changed")
        return CompressionResult(model, bool(stats.touched), stats)

    def run(self, model: ir.Model, stats: PassStats) -> None:  # pragma: no cover
        raise NotImplementedError


def skip_subgraph_nodes(stats: PassStats, graph: ir.Graph, ops: tuple[str, ...], why: str,
                        done: Callable[[ir.Node], bool] | None = None) -> int:
    """List every node of ``ops`` inside ``graph``'s subgraph bodies (but those ``done`` says the
    pass handled) as skipped: ``"inside a subgraph: " + why``, named by op, name (or output) and
    where it sits. Returns how many."""
    found = [(n, where) for n, where in subgraph_nodes(graph, ops) if done is None or not done(n)]
    for node, where in found:
        name = label(node) if node.name else f"{node.op_type} -> {node.outputs[0].name}"
        stats.skip(f"{name} ({where})", f"inside a subgraph: {why}")
    return len(found)


_PASSES: dict[str, type[CompressionPass]] = {}


def register(cls: type[CompressionPass]) -> type[CompressionPass]:
    """Class decorator: make ``cls`` available to recipes under ``cls.name`` (looked up by
    :mod:`onnxcomp.registry`)."""
    name = cls.name
    if not name.isidentifier() or name.lower() != name:
        raise ValueError(f"pass name must be snake_case: {name!r}")
    if name in _PASSES and _PASSES[name] is not cls:
        raise ValueError(f"pass {name!r} registered twice")
    _PASSES[name] = cls
    return cls
