"""Is onnxruntime's CPU int8 kernel faster than the float one, per Conv shape? (quantize_static's
``depthwise_conv: float`` rule comes from this table.)

    OMP_NUM_THREADS=1 python bench/depthwise.py [--rounds 7]

For each shape (MobileNet's depthwise 3x3/5x5 and pointwise 1x1 at the sizes of PP-OCR's
classifier), a chain of 8 identical Conv -> Relu layers at batch 1, once in float and once as a
QDQ graph (uint8 activations, per-channel int8 weights, int32 bias; onnxruntime fuses it into
QLinearConv, checked), one intra-op thread, the two sessions timed round by round
(interleaved); prints µs per layer (median over rounds) and the int8 / float ratio. The input is
quantized once and the output dequantized once, so the Q/DQ at the ends barely count.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

LAYERS = 8
# (channels, kernel, group, height, width)
SHAPES = [(8, 3, 8, 24, 96), (32, 3, 32, 12, 96), (200, 3, 200, 3, 24), (32, 5, 32, 6, 48), (88, 5, 88, 3, 48),
          (200, 5, 200, 3, 24), (128, 3, 128, 16, 16), (8, 1, 1, 24, 96), (32, 1, 1, 12, 96), (200, 1, 1, 3, 24),
          (128, 1, 1, 16, 16)]


def chain(channels: int, kernel: int, group: int, height: int, width: int, quantized: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    scale = np.float32(6 / 255)
    inits = [nh.from_array(np.array(scale, np.float32), "xs"), nh.from_array(np.array(0, np.uint8), "xz")]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q0"]) if quantized else
             h.make_node("Identity", ["x"], ["y0"])]
    attrs = {"kernel_shape": [kernel, kernel], "pads": [kernel // 2] * 4, "group": group}
    for i in range(LAYERS):
        w = (rng.standard_normal((channels, channels // group, kernel, kernel)) * 0.1).astype(np.float32)
        b = rng.standard_normal(channels).astype(np.float32)
        if not quantized:
            inits += [nh.from_array(w, f"w{i}"), nh.from_array(b, f"b{i}")]
            nodes += [h.make_node("Conv", [f"y{i}", f"w{i}", f"b{i}"], [f"c{i}"], **attrs),
                      h.make_node("Relu", [f"c{i}"], [f"y{i + 1}"])]
            continue
        ws = np.abs(w).reshape(channels, -1).max(1) / 127
        inits += [nh.from_array(np.round(w / ws[:, None, None, None]).astype(np.int8), f"wq{i}"),
                  nh.from_array(ws.astype(np.float32), f"ws{i}"), nh.from_array(np.zeros(channels, np.int8), f"wz{i}"),
                  nh.from_array(np.round(b / (ws * scale)).astype(np.int32), f"bq{i}"),
                  nh.from_array((ws * scale).astype(np.float32), f"bs{i}")]
        nodes += [h.make_node("DequantizeLinear", [f"q{i}", "xs", "xz"], [f"xd{i}"]),
                  h.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=0),
                  h.make_node("DequantizeLinear", [f"bq{i}", f"bs{i}"], [f"bd{i}"], axis=0),
                  h.make_node("Conv", [f"xd{i}", f"wd{i}", f"bd{i}"], [f"c{i}"], **attrs),
                  h.make_node("Relu", [f"c{i}"], [f"r{i}"]),
                  h.make_node("QuantizeLinear", [f"r{i}", "xs", "xz"], [f"q{i + 1}"])]
    if quantized:
        nodes.append(h.make_node("DequantizeLinear", [f"q{LAYERS}", "xs", "xz"], [f"y{LAYERS}"]))
    graph = h.make_graph(nodes, "chain", [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, height, width])],
                         [h.make_tensor_value_info(f"y{LAYERS}", TensorProto.FLOAT, None)], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


def session(model: onnx.ModelProto, path: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    if path:
        options.optimized_model_filepath = path
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, batch 1, 1 thread, {LAYERS} layers per chain, µs per layer")
    print("| channels | kernel | group | H x W | float µs | int8 µs | int8 / float |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        channels, kernel, group, height, width = shape
        x = {"x": np.random.default_rng(1).uniform(0, 6, (1, channels, height, width)).astype(np.float32)}
        fp32, int8 = session(chain(*shape, False)), session(chain(*shape, True))
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(args.rounds):
            for name, sess in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                for _ in range(100):
                    sess.run(None, x)
                times[name].append((time.perf_counter() - start) / 100 / LAYERS * 1e6)
        f, q = float(np.median(times["fp32"])), float(np.median(times["int8"]))
        print(f"| {channels} | {kernel}x{kernel} | {group} | {height}x{width} | {f:.1f} | {q:.1f} | {q / f:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
