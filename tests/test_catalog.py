"""catalog.py: what `onnxcomp passes` shows comes from the registered classes themselves."""

from __future__ import annotations

import inspect

import pytest

from onnxcomp.catalog import build_catalog
from onnxcomp.cli import main
from onnxcomp.registry import all_passes


@pytest.mark.parametrize("name", sorted(all_passes()))
def test_every_pass_has_its_own_docstring_and_the_cli_shows_it(name, capsys):
    cls = all_passes()[name]
    own = cls.__dict__.get("__doc__")
    assert own and own.strip(), f"{cls.__qualname__} has no class docstring"
    assert main(["passes", name]) == 0
    out = capsys.readouterr().out
    first = inspect.cleandoc(own).splitlines()[0]
    assert f"  {first}" in out.splitlines()  # shown dedented under the summary line
    assert next(p for p in build_catalog() if p["name"] == name)["doc"] == inspect.cleandoc(own)
