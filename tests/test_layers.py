"""The layer contract (pyproject.toml [tool.importlinter]) holds, and a wrong-way import breaks it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.builders import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": ""})


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "onnxcomp", tmp_path / "onnxcomp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_package_keeps_its_layers(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:]
    assert "0 broken" in result.stdout


def test_a_core_module_importing_the_pipeline_fails(tmp_path):
    root = _copy(tmp_path)
    graph = root / "onnxcomp" / "graph.py"
    graph.write_text(graph.read_text() + "\nfrom onnxcomp.pipeline import compress  # noqa: E402, F401\n")
    result = _lint(root)
    assert result.returncode != 0
    assert "onnxcomp.graph is not allowed to import onnxcomp.pipeline" in result.stdout


def test_a_pass_importing_the_validator_fails(tmp_path):
    root = _copy(tmp_path)
    cleanup = root / "onnxcomp" / "passes" / "cleanup.py"
    cleanup.write_text(cleanup.read_text() + "\nfrom onnxcomp.validate import compare  # noqa: E402, F401\n")
    result = _lint(root)
    assert result.returncode != 0
    assert "onnxcomp.passes.cleanup -> onnxcomp.validate" in result.stdout


def test_every_module_sits_in_a_layer():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    layers = text.split("layers = [", 1)[1].split("]", 1)[0]
    listed = set(re.findall(r"onnxcomp\.(\w+)", layers))
    modules = {p.stem for p in (ROOT / "onnxcomp").glob("*.py") if p.stem != "__init__"} | {"passes"}
    assert modules - listed == set()  # a new module must say where it belongs
