"""Placeholder: filled below."""
from onnxcomp.errors import OnnxcompError


def require_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise OnnxcompError("distill engine: torch needs the [train] extra (pip install 'onnxcomp[train]')") from None
