"""Train and export the small real-data test models (sklearn digits, 8x8).

Run from the repo root:  python models/train.py
Re-creates, deterministically (byte-identical on re-run):
  models/digits/{calib,val}.npz, models/digits/*.teacher_logits.npy,
  models/digits_mlp.onnx, models/digits_mlp_constants.onnx,
  models/digits_cnn.onnx, models/digits_cnn_external.onnx(.data)
"""

import copy
import os
import random
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT = Path(__file__).resolve().parent
DATA = OUT / "digits"
OPSET = 17
SEED = 0


def seed_everything(seed=SEED):
    """Fix every RNG and force single-threaded deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def load_splits():
    """Digits scaled to [0,1] as float32 [N,1,8,8]; stratified train/calib/val."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_rest, x_val, y_rest, y_val = train_test_split(
        x, y, test_size=497, stratify=y, random_state=SEED)
    x_tr, x_cal, y_tr, y_cal = train_test_split(
        x_rest, y_rest, test_size=300, stratify=y_rest, random_state=SEED)
    return (x_tr, y_tr), (x_cal, y_cal), (x_val, y_val)


class MatMulLinear(nn.Module):
    """Linear layer as `x @ weight + bias` (weight is [in, out]): exports as MatMul+Add."""

    def __init__(self, n_in, n_out):
        super().__init__()
        ref = nn.Linear(n_in, n_out)  # borrow nn.Linear's default init
        self.weight = nn.Parameter(ref.weight.detach().t().contiguous())
        self.bias = nn.Parameter(ref.bias.detach().clone())

    def forward(self, x):
        return x @ self.weight + self.bias


class MLP(nn.Module):
    """Flatten -> Gemm -> ReLU -> MatMul+Add -> ReLU -> Gemm."""

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = MatMulLinear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(self.flatten(x)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """2x (Conv+BN+ReLU) -> MaxPool -> Flatten -> Gemm+ReLU -> Gemm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def train(model, x, y, epochs, lr):
    """Adam + cross-entropy, minibatch 64, fixed-seed shuffling."""
    seed_everything()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model, path):
    """Classic TorchScript exporter, opset 17, dynamic batch, BN kept explicit."""
    warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False,
        opset_version=OPSET, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    return m


def to_constants(m):
    """Copy of m with every initializer turned into a Constant node."""
    m = copy.deepcopy(m)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}",
                               value=t) for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


def save_external(m, path):
    """Save m with ALL initializers in one side file next to it."""
    loc = path.name + ".data"
    (path.parent / loc).unlink(missing_ok=True)  # onnx appends to this file
    onnx.save_model(copy.deepcopy(m), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=loc,
                    size_threshold=0, convert_attribute=False)
    os.chmod(path.parent / loc, 0o644)  # onnx creates it 0600
    onnx.checker.check_model(str(path), full_check=True)


def run_ort(path, x):
    """Logits from onnxruntime (CPU, 1 thread)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def main():
    seed_everything()
    DATA.mkdir(parents=True, exist_ok=True)
    (x_tr, y_tr), (x_cal, y_cal), (x_val, y_val) = load_splits()
    print(f"split sizes: train={len(x_tr)} calib={len(x_cal)} val={len(x_val)}")
    np.savez_compressed(DATA / "calib.npz", input=x_cal, label=y_cal)
    np.savez_compressed(DATA / "val.npz", input=x_val, label=y_val)

    rows = []
    for name, net, epochs, lr in [("digits_mlp", MLP, 60, 2e-3),
                                  ("digits_cnn", CNN, 30, 2e-3)]:
        seed_everything()
        model = train(net(), x_tr, y_tr, epochs, lr)
        path = OUT / f"{name}.onnx"
        m = export(model, path)
        with torch.no_grad():
            ref = model(torch.from_numpy(x_val)).numpy()
        logits = run_ort(path, x_val).astype(np.float32)
        assert np.abs(logits - ref).max() < 1e-4, "torch vs onnxruntime mismatch"
        np.save(DATA / f"{name}.teacher_logits.npy", logits)

        if name == "digits_mlp":
            variant = OUT / f"{name}_constants.onnx"
            onnx.save_model(to_constants(m), str(variant))
        else:
            variant = OUT / f"{name}_external.onnx"
            save_external(m, variant)
        diff = np.abs(run_ort(variant, x_val) - logits).max()
        assert diff < 1e-5, f"{variant.name}: max abs diff {diff}"

        ops = sorted({n.op_type for n in m.graph.node})
        assert "BatchNormalization" in ops or name != "digits_cnn"
        assert {"Gemm", "MatMul"} <= set(ops) or name != "digits_mlp"
        n_params = sum(p.numel() for p in model.parameters())
        for p in (path, variant):
            acc = (run_ort(p, x_val).argmax(1) == y_val).mean()
            rows.append((p.name, acc, n_params))
        print(f"{name}: opset {OPSET}, IR {m.ir_version}, ops {ops}")

    print("\n| model | fp32 val acc | params |\n|---|---|---|")
    for fname, acc, n in rows:
        print(f"| `{fname}` | {acc:.2%} | {n:,} |")


if __name__ == "__main__":
    main()
