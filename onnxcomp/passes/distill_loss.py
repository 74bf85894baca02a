"""The distillation loss and its inputs: teacher logits files, labels, checks.

The loss, as users know it from Hinton et al. and PyTorch::

    L = α·CE(s, labels) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))

with ``s`` the student's logits, ``t`` the teacher's, rows = samples (any leading axes are
flattened into rows; the mean is over rows, as ``F.kl_div(..., reduction='batchmean')`` and
``F.cross_entropy`` take it for 2-D logits). :func:`distill_loss` computes it in float64 numpy
with its analytic gradient with respect to ``s``::

    ∂L/∂s = α·(softmax(s) − onehot(y))/N + (1 − α)·T·(softmax(s/T) − softmax(t/T))/N
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from onnxcomp.errors import OnnxcompError

__all__ = ["LossValue", "distill_loss", "load_teacher_logits", "check_logits", "check_labels"]


@dataclasses.dataclass
class LossValue:
    """The loss, its two weighted terms, the raw CE and KL, and ∂L/∂s (same shape as s)."""

    total: float
    ce_term: float       # α·CE (0 without labels)
    kl_term: float       # (1 − α)·T²·KL
    ce: float | None     # raw cross-entropy with the labels (None: no labels)
    kl: float            # raw KL(teacher ‖ student) at temperature T
    grad: np.ndarray | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"total": round(self.total, 6), "ce_term": round(self.ce_term, 6), "kl_term": round(self.kl_term, 6),
                "ce": None if self.ce is None else round(self.ce, 6), "kl": round(self.kl, 6)}


def distill_loss(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray | None, *, alpha: float,
                 temperature: float, grad: bool = True) -> LossValue:
    """L = α·CE(student, labels) + (1 − α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)).

    ``student`` / ``teacher``: logits ``[..., C]`` (leading axes are rows); ``labels``: class ids
    of the rows, or None (then the CE term is left out: α only weighs the KL term down).
    """
    shape = student.shape
    s = np.asarray(student, np.float64).reshape(-1, shape[-1])
    t = np.asarray(teacher, np.float64).reshape(-1, shape[-1])
    n, temp = s.shape[0], float(temperature)
    log_q = _log_softmax(s / temp)
    log_p = _log_softmax(t / temp)
    p = np.exp(log_p)
    kl = float((p * (log_p - log_q)).sum() / n)
    kl_term = (1.0 - alpha) * temp * temp * kl
    g = (1.0 - alpha) * temp * (np.exp(log_q) - p) / n if grad else None
    ce = None
    ce_term = 0.0
    if labels is not None:
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        log_s = _log_softmax(s)
        ce = float(-log_s[np.arange(n), y].mean())
        ce_term = alpha * ce
        if grad and alpha:
            soft = np.exp(log_s)
            soft[np.arange(n), y] -= 1.0
            g = g + alpha * soft / n
    return LossValue(ce_term + kl_term, ce_term, kl_term, ce, kl, None if g is None else g.reshape(shape))


def load_teacher_logits(path: str | Path) -> np.ndarray:
    """The array in a ``.npy`` file, or in a ``.npz`` (its only array, or the one named ``logits``).

    Never unpickles. Errors name the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxcompError(f"{path}: no such teacher logits file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.files)
                if len(keys) != 1 and "logits" not in keys:
                    raise OnnxcompError(f"{path}: holds {len(keys)} arrays ({', '.join(keys[:5])}); "
                                        "name the teacher logits 'logits'")
                array = npz["logits" if "logits" in keys else keys[0]]
        else:
            array = np.load(path, allow_pickle=False)
    except OnnxcompError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise OnnxcompError(f"{path}: not a readable .npy/.npz teacher logits file "
                            f"({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        raise OnnxcompError(f"{path}: teacher logits must be a float array (got {getattr(array, 'dtype', type(array))})")
    return array


def check_logits(array: np.ndarray, source: str, *, samples: int | None = None, classes: int | None = None,
                 data_source: str = "the calibration data") -> None:
    """Teacher logits fit the data (``samples`` rows) and the student's output (``classes``), and are finite."""
    if array.ndim < 2:
        raise OnnxcompError(f"{source}: teacher logits must be [samples, ..., classes] (got shape {list(array.shape)})")
    if samples is not None and array.shape[0] != samples:
        raise OnnxcompError(f"{source}: {array.shape[0]} rows of teacher logits for {samples} samples in "
                            f"{data_source} (they must be aligned sample for sample)")
    if classes is not None and array.shape[-1] != classes:
        raise OnnxcompError(f"{source}: teacher logits have {array.shape[-1]} classes, the student's output has "
                            f"{classes}")
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        kind = "NaN" if np.isnan(array).any() else "infinite"
        raise OnnxcompError(f"{source}: teacher logits hold {int(bad.sum())} {kind} values (first in row {row})")


def check_labels(labels: np.ndarray | None, classes: int | None, alpha: float, source: str) -> None:
    """α = 1 needs labels; labels must be integer class ids below ``classes``."""
    if labels is None:
        if alpha >= 1.0:
            raise OnnxcompError(f"{source}: distill alpha=1 uses only the labels' cross-entropy, but the data has no "
                                "'label' array (lower alpha to distill from the teacher alone)")
        return
    if not np.issubdtype(labels.dtype, np.integer):
        raise OnnxcompError(f"{source}: 'label' must hold integer class ids (got {labels.dtype})")
    if labels.size and (labels.min() < 0 or (classes is not None and labels.max() >= classes)):
        raise OnnxcompError(f"{source}: 'label' holds class ids in [{labels.min()}, {labels.max()}], "
                            f"the student has {classes} classes")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
