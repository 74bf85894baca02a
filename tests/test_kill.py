"""Kill tests: a save SIGKILLed at random points leaves the old output or the complete new one.

tests/kill_save.py forks a saving process per trial and kills it after a random delay within
the save's duration (single file, external data, external data + report). Every visible file
must then hash to the old output or to the complete new one, a model always with its own data
file, and the input model and its data byte-identical. Only a hidden ``.onnxcomp-*`` temporary
folder may be left behind by a kill.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tests.builders import ROOT

TRIALS = 18


def test_sigkill_during_save_leaves_old_or_complete_new(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_save.py"), str(tmp_path), str(TRIALS), "15"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    refs = result["refs"]
    outcomes = {"old": 0, "new": 0}
    for run in result["runs"]:
        folder = Path(run["folder"])
        visible = {p.name: p for p in folder.iterdir() if not p.name.startswith(".onnxcomp-")}
        assert all(p.is_file() for p in visible.values()), visible
        hidden = [p for p in folder.iterdir() if p.name.startswith(".onnxcomp-")]
        assert all(p.is_dir() for p in hidden)
        hashes = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in visible.items()}
        old, new = refs[f"{run['mode']}/old"], refs[f"{run['mode']}/new"]
        model = "old" if hashes["out.onnx"] == old["out.onnx"] else "new"
        assert hashes["out.onnx"] == (old if model == "old" else new)["out.onnx"], run
        expected = old if model == "old" else new
        for name, digest in expected.items():  # the model's own data file is there, complete
            if name.endswith(".data"):
                assert hashes.get(name) == digest, (run, name)
        for name, digest in hashes.items():  # nothing truncated: every file is one of the two outputs
            assert digest in (old.get(name), new.get(name)), (run, name)
        if "report.json" in hashes:
            assert hashes["report.json"] in (old["report.json"], new["report.json"])
        outcomes[model] += 1
    assert result["input"] == {"in.onnx": result["input"]["in.onnx"], "in.onnx.data": result["input"]["in.onnx.data"]}
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "input").iterdir()}
    assert after == result["input"]
    assert sum(outcomes.values()) == TRIALS
    print(f"kill trials: {outcomes}, save durations {result['durations']}")
