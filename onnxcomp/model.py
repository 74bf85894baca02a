"""Load and save ONNX models on onnx-ir: the one way in and the one way out.

Loading checks the file before anything else looks at it (models are untrusted):
it must parse as ONNX, its external data must stay inside the model's folder, and
onnxruntime must be able to run its IR version and opsets. Weights held in
``Constant`` nodes are lifted to initializers so every pass sees one form.

Saving is atomic (temporary files in the target folder, then renames), never over
the input or its data, and switches to external data (``<name>.<digest>.data``) when
the model would pass protobuf's 2 GB limit.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import release_mapped

__all__ = [
    "load_model",
    "save_model",
    "check_outputs",
    "check_path",
    "atomic_outputs",
    "input_files",
    "weights_digest",
    "model_nbytes",
    "structure_proto",
    "model_proto",
    "drop_restated_value_info",
    "has_external_tensors",
    "tensor_protos",
    "release_external",
    "PROTOBUF_LIMIT",
]

# Protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**26
_PATH_MAX = 4096  # Linux PATH_MAX (bytes, with the terminating NUL)
_NAME_MAX = 255  # bytes in one path component
_TMP_EXTRA = 32  # room for the hidden temporary directory of an atomic write
_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.FLOAT16: 2,
             onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
             onnx.TensorProto.INT16: 2, onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT8: 1,
             onnx.TensorProto.UINT8: 1, onnx.TensorProto.BOOL: 1, onnx.TensorProto.UINT32: 4,
             onnx.TensorProto.UINT64: 8}  # raw bytes per element (sub-byte types not checked)
_DIGEST_CHARS = 12  # hex digits of the weights digest in external data file names


def load_model(path: str | os.PathLike, *, lift_constants: bool = True) -> ir.Model:
    """Load ``path`` as an onnx-ir model after checking it is safe and runnable.

    Raises OnnxcompError (one line naming the file and the problem) for a missing
    file, a file that is not ONNX, external data outside the model's folder or
    missing, and IR versions / opsets the installed onnxruntime cannot run.
    With ``lift_constants`` tensor-valued ``Constant`` nodes become initializers.
    """
    path = check_path(path, "model")
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
    try:
        model = ir.serde.deserialize_model(proto)
        ir.serde.serialize_model(model)  # e.g. names that are not UTF-8 only fail here (external data: not read)
    except Exception as exc:  # noqa: BLE001 - onnx-ir raises several types on malformed protos
        cause = exc.__cause__ or exc
        raise OnnxcompError(f"{path}: not a valid ONNX model ({type(cause).__name__}: {_short(cause)})") from None
    ir.external_data.set_base_dir(model.graph, str(path.parent.resolve()))
    if lift_constants:
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    return model


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    protect: Sequence[str | os.PathLike] = (),
    external_data: bool | None = None,
    extra: Sequence[tuple[str | os.PathLike, Callable[[int], str]]] = (),
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``protect`` lists files that must never be overwritten (the input model and its
    external data: see :func:`input_files`). External data is used when asked, or
    (``None``) when the weights pass the protobuf limit; it is written beside the model
    as ``<name>.<digest>.data``, named by a digest of the weights, so a new model never
    writes over the data file an existing ``<name>`` still reads: the rename of the
    model file is the one moment the output switches from old to new. ``extra`` are
    other files of the same run (a report): each callable gets the written model's size
    in bytes (with its external data) and returns the file's text.

    Every path is checked before the first byte is written; the files are written to
    temporary names and renamed into place only once all of them are complete (external
    data first, then the model, then the extras). Digest-named data files of ``<name>``
    that the new model does not read (the replaced model's) are removed afterwards.
    """
    path = Path(path)
    if external_data is None:
        external_data = model_nbytes(model) > PROTOBUF_LIMIT
    data_path = path.with_name(f"{path.name}.{'0' * _DIGEST_CHARS}.data")  # checked with the real name's length
    extra_paths = [Path(p) for p, _ in extra]
    targets = ([data_path] if external_data else []) + [path] + extra_paths
    protected = (*protect, *_external_files(model))
    check_outputs(targets, protect=protected)
    if external_data:
        data_path = path.with_name(f"{path.name}.{weights_digest(model)}.data")
        targets[0] = data_path
        check_outputs(targets, protect=protected)
    previous = input_files(path) if path.is_file() else set()
    if previous & _external_files(model):  # the file at ``path`` is the model being saved
        raise OnnxcompError(f"output {_shown(path)}: output path is the input model or one of its external "
                            f"data files; refusing to overwrite it")
    with atomic_outputs(targets) as temps:
        tmp_model = temps[1] if external_data else temps[0]
        try:
            if external_data:
                ir.save(model, tmp_model, external_data=data_path.name)
            else:
                _materialise(model)
                Path(tmp_model).write_bytes(model_proto(model).SerializeToString())
        except OSError as exc:
            raise OnnxcompError(f"{_shown(path)}: cannot write ({_short(exc)})") from None
        size = sum(t.stat().st_size for t in temps[: 2 if external_data else 1])
        for tmp, (_, render) in zip(temps[len(targets) - len(extra):], extra):
            tmp.write_text(render(size), encoding="utf-8")
    _remove_stale_data(path, keep=data_path if external_data else None,
                       previous=previous, protected={_real(p) for p in protected})
    return path


def weights_digest(model: ir.Model) -> str:
    """A digest of every initializer (name, type, shape, bytes): names external data files."""
    digest = hashlib.blake2b(digest_size=_DIGEST_CHARS // 2)
    for graph in _all_graphs(model.graph):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
            if tensor is not None:
                digest.update(tensor.tobytes())
    return digest.hexdigest()


def _remove_stale_data(path: Path, keep: Path | None, previous: set[str], protected: set[str]) -> None:
    """Digest-named data files of ``path`` (ours) that its new model no longer reads.

    Such a file is left behind by the model this save replaced, or by a save that was
    killed before its end. Never a protected file, never a file of another name.
    """
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{%d}\.data" % _DIGEST_CHARS)
    folder = path.parent if str(path.parent) else Path(".")
    candidates = {_real(p) for p in folder.glob(glob.escape(path.name) + ".*.data")} | previous
    for candidate in candidates:
        file = Path(candidate)
        if (file.parent == Path(_real(folder)) and pattern.fullmatch(file.name)
                and candidate not in protected and (keep is None or candidate != _real(keep))):
            with contextlib.suppress(OSError):
                file.unlink()


def check_path(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path, or OnnxcompError when the system could never open it (too long)."""
    text = os.fspath(path)
    if "\0" in text:
        raise OnnxcompError(f"{what} path {_shown(text)!r} holds a NUL byte")
    if len(os.fsencode(text)) >= _PATH_MAX:
        raise OnnxcompError(f"{what} path {_shown(text)} is too long ({len(text)} characters; the limit "
                            f"is {_PATH_MAX - 1})")
    for part in Path(text).parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise OnnxcompError(f"{what} path {_shown(text)}: the name {_shown(part)} is too long "
                                f"({len(part)} characters; the limit is {_NAME_MAX})")
    return Path(text)


def check_outputs(paths: Sequence[str | os.PathLike], *, protect: Sequence[str | os.PathLike] = (),
                  kinds: Sequence[str] | None = None) -> None:
    """Refuse, before any work, outputs that cannot or must not be written.

    Each path must fit the system's limits (with room for the temporary name), sit in an
    existing writable folder, be a regular file if it exists (never a folder or a device
    such as /dev/null, which an atomic rename would replace), differ from every other
    output, and not be one of ``protect`` (the input model and its external data).
    ``kinds`` names each path in messages (e.g. "--report").
    """
    seen: dict[str, str] = {}
    protected = {_real(p) for p in protect}
    for index, raw in enumerate(paths):
        what = kinds[index] if kinds else "output"
        path = check_path(raw, what)
        if len(os.fsencode(os.path.abspath(path))) + _TMP_EXTRA >= _PATH_MAX:
            raise OnnxcompError(f"{what} path {_shown(path)} is too long (no room for a temporary name)")
        if len(os.fsencode(path.name)) > _NAME_MAX:
            raise OnnxcompError(f"{what} {_shown(path)}: the name is too long ({len(path.name)} characters; "
                                f"the limit is {_NAME_MAX})")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise OnnxcompError(f"{_shown(path)}: output folder {_shown(folder)} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OnnxcompError(f"{_shown(path)}: output folder {_shown(folder)} is not writable")
        real = _real(path)
        if real in protected:
            raise OnnxcompError(f"{what} {_shown(path)}: output path is the input model or one of its external "
                                f"data files; refusing to overwrite it")
        if os.path.lexists(path):
            try:
                mode = os.stat(path).st_mode
            except OSError:
                mode = 0  # a dangling symlink: the rename would replace the link itself
            if mode and not stat.S_ISREG(mode):
                kind = "a folder" if stat.S_ISDIR(mode) else "a device or special file"
                raise OnnxcompError(f"{what} {_shown(path)} exists and is not a regular file ({kind})")
        if real in seen:
            raise OnnxcompError(f"{what} {_shown(path)} is the same file as {seen[real]}")
        seen[real] = f"{what} {_shown(path)}"


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary paths for ``paths`` (same folder, hidden directory); all land or none does.

    On a normal exit every temporary file that was written is renamed over its target, in
    the order given; on an exception nothing is renamed. The temporary directories are
    removed either way (a SIGKILL can leave one behind: ``.onnxcomp-*``, never a target).
    """
    finals = [Path(p) for p in paths]
    dirs: dict[Path, Path] = {}
    temps = []
    try:
        for final in finals:
            folder = final.parent if str(final.parent) else Path(".")
            if folder not in dirs:
                dirs[folder] = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=folder))
            temps.append(dirs[folder] / final.name)
        yield temps
        for tmp, final in zip(temps, finals):
            if tmp.exists():
                os.replace(tmp, final)
    except OSError as exc:
        raise OnnxcompError(f"cannot write {_shown(finals[0])} ({_short(exc)})") from None
    finally:
        for folder in dirs.values():
            shutil.rmtree(folder, ignore_errors=True)


def input_files(path: str | os.PathLike) -> set[str]:
    """Real paths of the model file ``path`` and of every external data file it names.

    These must never be overwritten by a run that reads them. A file that cannot be read
    as ONNX protects only itself (loading it fails later with a clear message).
    """
    path = Path(path)
    files = {_real(path)}
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any unreadable file: load_model reports it
        return files
    for tensor in tensor_protos(proto):
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            if location:
                files.add(_real(path.parent / location))
    return files


def tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``proto``: graph initializers and tensor attributes (``Constant``'s
    value, …), those of subgraphs (If/Loop/Scan bodies) included — what onnx's external-data
    helpers walk, from public proto fields only."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def has_external_tensors(model: ir.Model) -> bool:
    """True when some initializer still lives in an external data file."""
    return bool(_external_files(model))


def release_external(model: ir.Model) -> None:
    """Unmap the external data files of ``model``'s tensors (they map again on next use).

    A memory-mapped weight that was read stays resident and counts in the process's memory
    until it is unmapped; after a step that read every weight (a pass, a save) this keeps a
    model larger than memory's comfort from being held twice. A tensor whose array is still
    referenced elsewhere stays mapped.
    """
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            release_mapped(value)


def model_nbytes(model: ir.Model) -> int:
    """Bytes held by all initializers, main graph and subgraphs."""
    total = 0
    for graph in _all_graphs(model.graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


STRUCTURE_ONLY = "onnxcomp-structure-only"  # the external location structure_proto's tensors point at


def model_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as the ModelProto a file holds: onnx-ir's serialization without the value_info
    entries that only restate what the file already says (:func:`drop_restated_value_info`)."""
    proto = ir.serde.serialize_model(model)
    drop_restated_value_info(proto)
    return proto


def drop_restated_value_info(proto: onnx.ModelProto) -> None:
    """Remove (in place) the value_info of an initializer (its tensor carries type and dims) and of
    a QuantizeLinear/DequantizeLinear output (the shape of its input, the type of its zero point or
    scale); entries with a doc string or metadata stay. onnxruntime and the checker infer both; in
    the int8 model of a small CNN they were ~13 % of the file."""
    for graph in _graph_protos(proto.graph):
        inits = {t.name for t in graph.initializer}
        restated = inits | {o for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                            and n.domain in ("", "ai.onnx") for o in n.output}
        kept = [v for v in graph.value_info if v.name not in restated or v.doc_string or v.metadata_props]
        if len(kept) < len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)


def _graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graph_protos(attr.g)
            for sub in attr.graphs:
                yield from _graph_protos(sub)


def structure_proto(model: ir.Model, keep_bytes: int = 4096) -> onnx.ModelProto:
    """``model`` as a ModelProto whose initializers above ``keep_bytes`` are dangling external
    references (type and dims only, no data): for shape inference and structure counts without a
    second copy of the weights. Small constants (shapes, axes) keep their values. ``model`` is
    unchanged when this returns."""
    swapped = []
    try:
        for graph in _all_graphs(model.graph):
            for value in graph.initializers.values():
                tensor = value.const_value
                if tensor is not None and tensor.nbytes > keep_bytes:
                    swapped.append((value, tensor))
                    value.const_value = ir.ExternalTensor(
                        STRUCTURE_ONLY, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                        name=tensor.name or value.name)
        return ir.serde.serialize_model(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


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
    for tensor in tensor_protos(proto):  # declared shape vs the bytes held
        if tensor.HasField("raw_data") and tensor.data_type in _ITEMSIZE:
            want = _ITEMSIZE[tensor.data_type]
            for dim in tensor.dims:
                want *= dim
            if any(d < 0 for d in tensor.dims) or want != len(tensor.raw_data):
                raise OnnxcompError(f"{path}: tensor '{tensor.name}' declares shape {list(tensor.dims)} "
                                    f"but holds {len(tensor.raw_data)} bytes")
    external = any(external_data_helper.uses_external_data(t)
                   for t in tensor_protos(proto))
    try:
        # with external data the checker must resolve files next to the model, not the cwd
        onnx.checker.check_model(str(path) if external else proto, full_check=False)
    except (onnx.checker.ValidationError, UnicodeDecodeError, ValueError) as exc:
        raise OnnxcompError(f"{path}: invalid ONNX model ({_short(exc)})") from None


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Every external tensor must live in an existing file inside the model's folder."""
    base = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in tensor_protos(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            info = external_data_helper.ExternalDataInfo(tensor)
        except ValueError as exc:  # negative offset / length, a non-number
            raise OnnxcompError(f"{path}: tensor '{tensor.name}' has invalid external data ({_short(exc)})") from None
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


def _shown(path: str | os.PathLike, limit: int = 120) -> str:
    """A path short enough for a one-line message."""
    text = os.fspath(path)
    return text if len(text) <= limit else f"{text[:40]}…{text[-(limit - 41):]}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
