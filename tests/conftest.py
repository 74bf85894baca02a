"""Shared fixtures: the real models and data shipped in models/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builders import DIGITS, MODELS, ROOT, TINY_BERT  # noqa: F401  (re-exported for older imports)


@pytest.fixture(scope="session")
def cnn_path() -> Path:
    return MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def mlp_path() -> Path:
    return MODELS / "digits_mlp.onnx"


@pytest.fixture(scope="session")
def calib_path() -> Path:
    return DIGITS / "calib.npz"


@pytest.fixture(scope="session")
def val_path() -> Path:
    return DIGITS / "val.npz"


@pytest.fixture(scope="session")
def bert_path() -> Path:
    return TINY_BERT / "tiny_bert.onnx"


@pytest.fixture(scope="session")
def bert_val() -> Path:
    return TINY_BERT / "val.npz"
