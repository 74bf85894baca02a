"""An ONNX graph executed op by op with torch functions, its float initializers as parameters
(imports torch: only for the ``[train]`` extra; the distill pass imports it when its torch engine runs).

The torch engine of ``distill`` trains through this module with torch's autograd (no gradient is
written by hand). Each ONNX node maps to the torch function with the same semantics; the graph,
its names and its initializers are not changed, so trained values go back into the very
initializers they came from (:meth:`TorchGraph.write_back`).

QDQ graphs (``qat``): a ``DequantizeLinear`` of a constant integer weight (or int32 bias) becomes
a float parameter ``w = (q − zp)·scale`` run through fake quantization with a straight-through
estimator (``round`` passes the gradient, the clamp to the integer range does not); activation
``QuantizeLinear`` → ``DequantizeLinear`` pairs fake-quantize the same way. Scales and zero points
stay fixed; write-back re-derives the integers ``clamp(round(w/scale) + zp)``.

Why not onnx2pytorch: 0.6.0 imports torchvision, whose PyPI wheels pull a CUDA torch 2.14 over
the pinned CPU torch 2.13.0 (the matching CPU torchvision is not on PyPI); it also rejects the
digits CNN's BatchNormalization (``training_mode``) and runs QuantizeLinear in integers, which
has no gradient.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import constant_array

__all__ = ["TorchGraph", "supported_ops"]

_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
           9: torch.bool, 10: torch.float16, 11: torch.float64}
_INT_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255), np.dtype(np.int32): (-2**31, 2**31 - 1)}


class TorchGraph(torch.nn.Module):
    """``model``'s main graph as a torch module; ``trainable``: initializer names to train."""

    def __init__(self, model: ir.Model, trainable: set[str], *, qat: bool = False):
        super().__init__()
        self.model, self.qat = model, qat
        self.graph = model.graph
        self.names: dict[str, str] = {}          # initializer name -> parameter key
        self.quantized: dict[str, tuple] = {}     # integer initializer name -> (scale, zp, axis, lo, hi)
        self.constants: dict[str, torch.Tensor] = {}
        self.params = torch.nn.ParameterDict()
        unknown = sorted({n.op_type for n in self.graph if n.op_type not in _OPS or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise OnnxcompError(f"distill engine torch: unsupported ops {', '.join(unknown)}")
        if qat:
            self._find_quantized_weights(trainable)
        for name, value in self.graph.initializers.items():
            array = value.const_value.numpy()
            if name in self.quantized:
                scale, zp, axis, _, _ = self.quantized[name]
                init = (array.astype(np.float32) - _expand(zp, axis, array.ndim)) * _expand(scale, axis, array.ndim)
                self._add_param(name, init)
            elif name in trainable and np.issubdtype(array.dtype, np.floating):
                self._add_param(name, array.astype(np.float32))
            else:
                self.constants[name] = torch.from_numpy(np.array(array))

    def _add_param(self, name: str, array: np.ndarray) -> None:
        key = f"p{len(self.names)}"
        self.names[name] = key
        self.params[key] = torch.nn.Parameter(torch.from_numpy(np.array(array, np.float32)))

    def _find_quantized_weights(self, trainable: set[str]) -> None:
        for node in self.graph:
            if node.op_type != "DequantizeLinear":
                continue
            x = node.inputs[0]
            if x.name not in self.graph.initializers or x.name not in trainable:
                continue
            q = x.const_value.numpy()
            scale = constant_array(node.inputs[1])
            zp = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if scale is None or q.dtype not in _INT_RANGE:
                continue
            zp = np.zeros_like(scale, dtype=np.float32) if zp is None else zp.astype(np.float32)
            axis = node.attributes.get_int("axis", 1) if scale.size > 1 else None
            lo, hi = _INT_RANGE[q.dtype]
            if q.dtype == np.int8 and q.min() >= -127:
                lo = -127  # symmetric weights: keep the range they were made with
            self.quantized[x.name] = (scale.astype(np.float32), zp, axis, lo, hi)

    # --- running ----------------------------------------------------------------------------

    def value(self, name: str) -> torch.Tensor:
        key = self.names.get(name)
        return self.params[key] if key is not None else self.constants[name]

    def forward(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(feeds)
        for node in self.graph:
            args = [None if v is None else env[v.name] if v.name in env else self._initial(v) for v in node.inputs]
            result = _OPS[node.op_type](self, node, *args)
            result = result if isinstance(result, (list, tuple)) else [result]
            for out, tensor in zip(node.outputs, result):
                env[out.name] = tensor
        return [env[name] for name in outputs]

    def _initial(self, value: ir.Value) -> torch.Tensor:
        if value.name in self.quantized:
            return self.params[self.names[value.name]]
        return self.value(value.name)

    # --- writing back -------------------------------------------------------------------------

    def write_back(self) -> list[str]:
        """Trained values into the same initializers (same dtype: integers re-quantized)."""
        written = []
        for name, key in self.names.items():
            value = self.graph.initializers[name]
            old = value.const_value.numpy()
            array = self.params[key].detach().numpy()
            if name in self.quantized:
                scale, zp, axis, lo, hi = self.quantized[name]
                array = np.clip(np.round(array / _expand(scale, axis, old.ndim)) + _expand(zp, axis, old.ndim), lo, hi)
            value.const_value = ir.Tensor(np.ascontiguousarray(array.astype(old.dtype)), name=name)
            written.append(name)
        return written


def supported_ops() -> list[str]:
    return sorted(_OPS)


# --- op implementations ----------------------------------------------------------------------

def _expand(param: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def _t(param, axis, ndim) -> torch.Tensor:
    return torch.from_numpy(np.asarray(_expand(np.asarray(param, np.float32), axis, ndim), np.float32))


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _fake_quant(x, scale, zp, lo, hi):
    q = x / scale + zp
    q = q + (torch.round(q) - q).detach()           # straight-through rounding
    return (torch.clamp(q, lo, hi) - zp) * scale    # no gradient where clipped


def _broadcast_qparams(node, x, scale, zp):
    """Scale and zero point of a Quantize/DequantizeLinear shaped to broadcast against ``x`` (per
    tensor, or along the node's ``axis``)."""
    ndim = x.dim()
    axis = node.attributes.get_int("axis", 1) if scale.numel() > 1 else None
    if axis is not None and axis < 0:
        axis += ndim
    s = scale.float().reshape(_shape(axis, ndim, scale))
    z = torch.zeros(()) if zp is None else zp.float().reshape(_shape(axis, ndim, zp))
    return s, z


def _quantize(g, node, x, scale, zp=None):
    s, z = _broadcast_qparams(node, x, scale, zp)
    lo, hi = (0, 255) if zp is None or zp.dtype == torch.uint8 else (-128, 127)
    q = x / s + z
    q = q + (torch.round(q) - q).detach()
    return torch.clamp(q, lo, hi)


def _dequantize(g, node, x, scale, zp=None):
    name = node.inputs[0].name
    if name in g.quantized:
        s_np, z_np, axis, lo, hi = g.quantized[name]
        return _fake_quant(x, _t(s_np, axis, x.dim()), _t(z_np, axis, x.dim()), lo, hi)
    s, z = _broadcast_qparams(node, x, scale, zp)
    return (x.float() - z) * s


def _shape(axis, ndim, t):
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def _gemm(g, node, a, b, c=None):
    a = a.t() if node.attributes.get_int("transA", 0) else a
    b = b.t() if node.attributes.get_int("transB", 0) else b
    y = node.attributes.get_float("alpha", 1.0) * (a @ b)
    return y if c is None else y + node.attributes.get_float("beta", 1.0) * c


def _conv(g, node, x, w, b=None):
    if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise OnnxcompError(f"distill engine torch: Conv {node.name} with auto_pad SAME")
    dims = w.dim() - 2
    pads = list(node.attributes.get_ints("pads", [0] * 2 * dims))
    if pads[:dims] != pads[dims:]:
        x = F.pad(x, [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])])
        pads = [0] * 2 * dims
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return fn(x, w, b, stride=list(node.attributes.get_ints("strides", [1] * dims)), padding=pads[:dims],
              dilation=list(node.attributes.get_ints("dilations", [1] * dims)), groups=node.attributes.get_int("group", 1))


def _pool(kind):
    def run(g, node, x):
        dims = x.dim() - 2
        kernel = list(node.attributes.get_ints("kernel_shape"))
        pads = list(node.attributes.get_ints("pads", [0] * 2 * dims))
        strides = list(node.attributes.get_ints("strides", [1] * dims))
        ceil = bool(node.attributes.get_int("ceil_mode", 0))
        if pads[:dims] != pads[dims:]:
            x = F.pad(x, [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])],
                      value=float("-inf") if kind == "max" else 0.0)
            pads = [0] * 2 * dims
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
            return fn(x, kernel, strides, pads[:dims], list(node.attributes.get_ints("dilations", [1] * dims)), ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        return fn(x, kernel, strides, pads[:dims], ceil, bool(node.attributes.get_int("count_include_pad", 0)))
    return run


def _reduce(fn):
    def run(g, node, x, axes=None):
        axes = _ints(axes) if axes is not None else list(node.attributes.get_ints("axes", []))
        keep = bool(node.attributes.get_int("keepdims", 1))
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, axes, keep)
    return run


def _reshape(g, node, x, shape):
    dims = _ints(shape)
    if not node.attributes.get_int("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _unsqueeze(g, node, x, axes=None):
    axes = _ints(axes) if axes is not None else list(node.attributes.get_ints("axes"))
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(g, node, x, axes=None):
    axes = _ints(axes) if axes is not None else list(node.attributes.get_ints("axes", []))
    if not axes:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _gather(g, node, x, idx):
    axis = node.attributes.get_int("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx).long()
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _slice(g, node, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise OnnxcompError("distill engine torch: Slice with a negative step")
        size = x.shape[a]
        index[a] = slice(max(min(s, size), -size), max(min(e, size), -size - 1) if e < 0 else min(e, size), st)
    return x[tuple(index)]


def _div(g, node, a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _constant(g, node):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        attr = node.attributes.get(key)
        if attr is not None:
            if key == "value":
                return torch.from_numpy(np.array(attr.as_tensor().numpy()))
            return torch.tensor(attr.value, dtype=torch.float32 if "float" in key else torch.int64)
    raise OnnxcompError(f"distill engine torch: Constant {node.name} without a value")


def _constant_of_shape(g, node, shape):
    attr = node.attributes.get("value")
    fill = torch.from_numpy(np.array(attr.as_tensor().numpy())).reshape(()) if attr is not None else torch.tensor(0.0)
    return torch.full(_ints(shape), fill.item(), dtype=fill.dtype)


def _clip(g, node, x, lo=None, hi=None):
    if lo is None and hi is None and "min" in node.attributes:
        return torch.clamp(x, node.attributes.get_float("min"), node.attributes.get_float("max"))
    return torch.clamp(x, None if lo is None else lo.item(), None if hi is None else hi.item())


def _layer_norm(g, node, x, scale, bias=None):
    axis = node.attributes.get_int("axis", -1) % x.dim()
    return F.layer_norm(x, x.shape[axis:], scale, bias, node.attributes.get_float("epsilon", 1e-5))


def _batch_norm(g, node, x, scale, bias, mean, var):
    return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, False, 0.0,
                        node.attributes.get_float("epsilon", 1e-5))


def _flatten(g, node, x):
    axis = node.attributes.get_int("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _softmax(g, node, x):
    return torch.softmax(x, node.attributes.get_int("axis", -1))


def _expand_op(g, node, x, shape):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


_OPS = {
    "Gemm": _gemm, "MatMul": lambda g, n, a, b: a @ b, "Conv": _conv,
    "Add": lambda g, n, a, b: a + b, "Sub": lambda g, n, a, b: a - b, "Mul": lambda g, n, a, b: a * b,
    "Div": _div, "Pow": lambda g, n, a, b: torch.pow(a, b),
    "Relu": lambda g, n, x: torch.relu(x), "Sigmoid": lambda g, n, x: torch.sigmoid(x),
    "Tanh": lambda g, n, x: torch.tanh(x), "Erf": lambda g, n, x: torch.erf(x), "Sqrt": lambda g, n, x: torch.sqrt(x),
    "Exp": lambda g, n, x: torch.exp(x), "Log": lambda g, n, x: torch.log(x), "Neg": lambda g, n, x: -x,
    "Abs": lambda g, n, x: torch.abs(x), "Identity": lambda g, n, x: x, "Dropout": lambda g, n, x, *rest: x,
    "Gelu": lambda g, n, x: F.gelu(x, approximate=n.attributes.get_string("approximate", "none")),
    "Softmax": _softmax, "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda g, n, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Flatten": _flatten, "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Transpose": lambda g, n, x: x.permute(*(n.attributes.get_ints("perm", None) or range(x.dim() - 1, -1, -1))),
    "Concat": lambda g, n, *xs: torch.cat(xs, n.attributes.get_int("axis")),
    "Gather": _gather, "Slice": _slice, "Expand": _expand_op,
    "Shape": lambda g, n, x: torch.tensor(x.shape, dtype=torch.int64)[
        n.attributes.get_int("start", 0):n.attributes.get_int("end", x.dim())],
    "Cast": lambda g, n, x: x.to(_DTYPES[n.attributes.get_int("to")]),
    "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "Range": lambda g, n, s, e, d: torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype),
    "Equal": lambda g, n, a, b: a == b, "Greater": lambda g, n, a, b: a > b, "Less": lambda g, n, a, b: a < b,
    "GreaterOrEqual": lambda g, n, a, b: a >= b, "LessOrEqual": lambda g, n, a, b: a <= b,
    "And": lambda g, n, a, b: a & b, "Or": lambda g, n, a, b: a | b, "Not": lambda g, n, x: ~x,
    "Where": lambda g, n, c, a, b: torch.where(c, a, b),
    "Clip": _clip,
    "ReduceSum": _reduce(lambda x, a, k: x.sum(dim=a, keepdim=k)),
    "ReduceMean": _reduce(lambda x, a, k: x.mean(dim=a, keepdim=k)),
    "ReduceMax": _reduce(lambda x, a, k: x.amax(dim=a, keepdim=k)),
    "ReduceL2": _reduce(lambda x, a, k: torch.sqrt((x * x).sum(dim=a, keepdim=k))),
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}
