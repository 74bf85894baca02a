"""Property-based fuzzing (hypothesis) of the model loader, recipe parser, data loader and CLI.

Every case ends with a result or one clear OnnxcompError line (exit 2/3) — never another
exception, a traceback, a write outside the scratch folder, or a leftover temporary file.
A few seconds here; ``python bench/fuzz.py`` runs the same targets for minutes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fuzz_targets as ft

FAST = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


def _scratch(tmp_path: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    return folder


@FAST
@given(case=ft.model_cases)
def test_model_loader_never_crashes(tmp_path, case):
    folder = _scratch(tmp_path)
    assert ft.load_model_target(case, folder)
    shutil.rmtree(folder)


@FAST
@given(case=ft.recipe_cases)
def test_recipe_parser_never_crashes(tmp_path, case):
    assert ft.recipe_target(case, _scratch(tmp_path))


@FAST
@given(case=ft.data_cases)
def test_data_loader_never_crashes(tmp_path, case):
    assert ft.data_target(case, _scratch(tmp_path))


@settings(max_examples=5, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_cli_arguments_never_crash(tmp_path, data):
    folder = _scratch(tmp_path)
    argv = data.draw(ft.cli_cases(folder))
    assert ft.cli_target(argv, folder)
