"""Helper of test_kill.py: SIGKILL a process at random points while it saves a model.

``python tests/kill_save.py WORK TRIALS SEED`` builds an input model with external data in
WORK/input, a "compressed" model that still reads half of its weights from the input's data
file, and for each trial a folder holding a complete old output (model, data, report); then
it forks a child that saves the new output over it and SIGKILLs the child after a random
delay within the save's duration. It prints one JSON line: the reference hashes of the old
and new outputs, and the trial folders with the delay used. The test judges the folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import load_model, save_model

MODES = ("single", "external", "external+report")


def main(work: Path, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    model_in = _input_model(work / "input")
    old, new = _variant(model_in, 1), _variant(model_in, 2)
    refs, durations = {}, {}
    for mode in MODES:
        for label, model in (("old", old), ("new", new)):
            folder = work / "ref" / mode / label
            folder.mkdir(parents=True)
            start = time.perf_counter()
            _save(model, folder, mode, label)
            durations[mode] = time.perf_counter() - start
            refs[f"{mode}/{label}"] = _hashes(folder)
    runs = []
    for index in range(trials):
        mode = MODES[index % len(MODES)]
        folder = work / "trials" / f"{index:03d}-{mode}"
        shutil.copytree(work / "ref" / mode / "old", folder)  # the complete old output
        delay = rng.uniform(0, durations[mode] * 1.5)
        pid = os.fork()
        if pid == 0:  # the child: save the new output over the old one
            try:
                _save(new, folder, mode, "new")
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        runs.append({"folder": str(folder), "mode": mode, "delay": delay,
                     "killed": os.WIFSIGNALED(status)})
    print(json.dumps({"refs": refs, "runs": runs, "durations": durations,
                      "input": _hashes(work / "input")}))


def _save(model: ir.Model, folder: Path, mode: str, label: str) -> None:
    extra = [(folder / "report.json", lambda size: json.dumps({"label": label, "size": size}))] \
        if mode == "external+report" else []
    save_model(model, folder / "out.onnx", external_data=mode != "single", extra=extra,
               protect=[str(Path(p)) for p in _input_paths()])


_INPUTS: list[Path] = []


def _input_paths() -> list[Path]:
    return _INPUTS


def _input_model(folder: Path) -> ir.Model:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    dim, layers = 512, 8  # 8.4 MB of weights: a save takes about a tenth of a second
    inits, nodes = [], []
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32),
                                             f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                                      ["y" if i == layers - 1 else f"h{i + 1}"]))
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", dim])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = folder / "in.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    _INPUTS.extend([path, folder / "in.onnx.data"])
    return load_model(path)  # external tensors: memory-mapped from in.onnx.data


def _variant(model: ir.Model, seed: int) -> ir.Model:
    """A copy whose even layers get new weights; odd layers still read the input's data file."""
    out = model.clone()
    rng = np.random.default_rng(seed)
    for i, (name, value) in enumerate(out.graph.initializers.items()):
        if i % 2 == 0:
            array = value.const_value.numpy()
            value.const_value = ir.Tensor(array + rng.standard_normal(array.shape).astype(np.float32) * 0.01,
                                          name=name)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
