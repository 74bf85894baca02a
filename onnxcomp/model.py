"""Load and save ONNX models on onnx-ir: the one way in and the one way out.

Loading checks the file before anything else looks at it (models are untrusted):
it must parse as ONNX, its external data must stay inside the model's folder, and
onnxruntime must be able to run its IR version and opsets. Weights held in
``Constant`` nodes are lifted to initializers so every pass sees one form.

Saving is atomic (temporary file in the target folder, then rename), never over
the input, and switches to external data when the model would pass protobuf's
2 GB limit.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxcomp.errors import OnnxcompError

__all__ = [
    "load_model",
    "save_model",
    "clone_model",
    "model_nbytes",
    "has_external_tensors",
    "PROTOBUF_LIMIT",
]

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**26


def load_model(path: str | os.PathLike, *, lift_constants: bool = True) -> ir.Model:
    """Load ``path`` as an onnx-ir model after checking it is safe and runnable.

    Raises OnnxcompError (one line naming the file and the problem) for a missing
    file, a file that is not ONNX, external data outside the model's folder or
    missing, and IR versions / opsets the installed onnxruntime cannot run.
    With ``lift_constants`` tensor-valued ``Constant`` nodes become initializers.
    """
    path = Path(path)
    if not path.exists():
        raise OnnxcompError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxcompError(f"{path}: not a file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise OnnxcompError(f"{path}: not a readable ONNX model ({_short(exc)})") from None
    _check_external_data(proto, path)
    _check_proto(proto, path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    if lift_constants:
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    return model


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    protect: tuple[str | os.PathLike, ...] = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``protect`` lists files that must never be overwritten (the input model and its
    external data). External data is used when asked, or (``None``) when the
    weights pass the protobuf limit; it is written as ``<name>.data`` beside the
    model. Either every file lands or none does.
    """
    path = Path(path)
    target_dir = path.parent if str(path.parent) else Path(".")
    if not target_dir.is_dir():
        raise OnnxcompError(f"{path}: output folder {target_dir} does not exist")
    if not os.access(target_dir, os.W_OK):
        raise OnnxcompError(f"{path}: output folder {target_dir} is not writable")
    data_name = path.name + ".data"
    protected = {_real(p) for p in protect} | _external_files(model)
    for candidate in (path, target_dir / data_name):
        if _real(candidate) in protected:
            raise OnnxcompError(f"{path}: refusing to overwrite the input model or its data")
    if external_data is None:
        external_data = model_nbytes(model) > PROTOBUF_LIMIT

    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=target_dir))
    try:
        tmp_model = tmp_dir / path.name
        if external_data:
            ir.save(model, tmp_model, external_data=data_name)
            os.replace(tmp_dir / data_name, target_dir / data_name)
        else:
            _materialise(model)
            ir.save(model, tmp_model)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise OnnxcompError(f"{path}: cannot write ({_short(exc)})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def clone_model(model: ir.Model) -> ir.Model:
    """A structural copy that shares tensors: passes replace tensors, never edit them."""
    return model.clone()


def has_external_tensors(model: ir.Model) -> bool:
    """True when some initializer still lives in an external data file."""
    return bool(_external_files(model))


def model_nbytes(model: ir.Model) -> int:
    """Bytes held by all initializers, main graph and subgraphs."""
    total = 0
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


# --- checks ---------------------------------------------------------------------


def _check_proto(proto: onnx.ModelProto, path: Path) -> None:
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise OnnxcompError(f"{path}: not an ONNX model (no graph)")
    max_ir, max_opset = runtime_limits()
    if proto.ir_version < 3:
        raise OnnxcompError(f"{path}: IR version {proto.ir_version} is too old for onnxruntime")
    if proto.ir_version > max_ir:
        raise OnnxcompError(
            f"{path}: IR version {proto.ir_version} is newer than onnxruntime "
            f"supports (max {max_ir})"
        )
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            raise OnnxcompError(
                f"{path}: opset {opset.version} is newer than onnxruntime supports "
                f"(max {max_opset})"
            )
    external = any(external_data_helper.uses_external_data(t)
                   for t in external_data_helper._get_all_tensors(proto))
    try:
        # with external data the checker must resolve files next to the model, not the cwd
        onnx.checker.check_model(str(path) if external else proto, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise OnnxcompError(f"{path}: invalid ONNX model ({_short(exc)})") from None


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Every external tensor must live in an existing file inside the model's folder."""
    base = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        if not location or os.path.isabs(location) or Path(location).drive:
            raise OnnxcompError(
                f"{path}: tensor '{tensor.name}' has external data at an absolute path "
                f"'{location}'"
            )
        target = (base / location).resolve()
        if base not in target.parents:
            raise OnnxcompError(
                f"{path}: tensor '{tensor.name}' has external data outside the model's "
                f"folder ('{location}')"
            )
        if not target.is_file():
            raise OnnxcompError(
                f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing"
            )
        size = sizes.setdefault(target, target.stat().st_size)
        end = (info.offset or 0) + (info.length or 0)
        if end > size:
            raise OnnxcompError(
                f"{path}: external data of tensor '{tensor.name}' runs past the end of "
                f"'{location}' ({end} > {size} bytes)"
            )


@functools.cache
def runtime_limits() -> tuple[int, int]:
    """(max IR version, max default-domain opset) the installed onnxruntime accepts."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def accepts(ir_version: int, opset: int) -> bool:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = ir_version
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception:  # onnxruntime raises several unrelated types here
            return False
        return True

    def highest(lo: int, hi: int, ok) -> int:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo

    max_ir = highest(7, 64, lambda v: accepts(v, 13))
    max_opset = highest(13, 128, lambda v: accepts(min(max_ir, 10), v))
    return max_ir, max_opset


# --- helpers --------------------------------------------------------------------


def _all_graphs(graph: ir.Graph):
    yield graph
    yield from graph.subgraphs()


def _external_files(model: ir.Model) -> set[str]:
    files = set()
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(_real(tensor.path))
    return files


def _materialise(model: ir.Model) -> None:
    """Load external tensors into memory so the model saves as one self-contained file."""
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(tensor.numpy(), name=tensor.name)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
