"""Train a small CNN on scikit-learn's handwritten digits and export it with its data (tools only: uses torch).

    python tools/train_digits.py               # writes models/digits_cnn.onnx, digits_test.npz, digits_calib.npz
    python tools/train_digits.py --out /tmp/x

Data: ``sklearn.datasets.load_digits`` (1797 real 8x8 digits, values 0..16, scaled to [0, 1]), shuffled with a
fixed seed: 1000 for training, the remaining 797 for test; the calibration set is 256 images drawn from the
training split (never the test split). The test accuracy of the exported ONNX model (run in onnxruntime) is
printed; the script fails if it is below 95%.

Files:
    digits_cnn.onnx    input ``input`` float32 [batch, 1, 8, 8] (dynamic batch), output ``logits`` [batch, 10]
    digits_test.npz    ``input`` float32 [797, 1, 8, 8], ``labels`` int64 [797]
    digits_calib.npz   ``input`` float32 [256, 1, 8, 8]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[1]
SEED = 0
N_TRAIN, N_CALIB = 1000, 256
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MIN_ACCURACY = 0.95

warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def split_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    calib = train[:N_CALIB]
    return x[train], y[train], x[test], y[test], x[calib]


def train(x: np.ndarray, y: np.ndarray, epochs: int = 30) -> DigitsCNN:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # reproducible reductions; the model is tiny
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=gen).split(32):
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def export(model: nn.Module) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        buf,
        dynamo=False,
        opset_version=17,
        do_constant_folding=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "onnxprune-fixtures"
    proto.producer_version = f"torch {torch.__version__.split('+')[0]}"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "models", help="output folder (default: models/)")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    x_train, y_train, x_test, y_test, x_calib = split_data()
    model = train(x_train, y_train, args.epochs)
    proto = export(model)

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {INPUT_NAME: x_test})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test)).numpy()
    max_diff = float(np.abs(logits - ref).max())
    accuracy = float((logits.argmax(1) == y_test).mean())
    train_acc = float((sess.run(None, {INPUT_NAME: x_train})[0].argmax(1) == y_train).mean())

    model_path = args.out / "digits_cnn.onnx"
    tmp = model_path.with_suffix(".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(model_path)
    np.savez(args.out / "digits_test.npz", **{INPUT_NAME: x_test, "labels": y_test})
    np.savez(args.out / "digits_calib.npz", **{INPUT_NAME: x_calib})

    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()[:12]
    print(f"digits_cnn.onnx {model_path.stat().st_size / 1024:.1f} KiB  sha256 {digest}")
    print("    ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))))
    print(f"    onnxruntime vs torch max abs diff {max_diff:.2e}")
    print(f"train accuracy {train_acc:.4f}  test accuracy {accuracy:.4f} ({len(y_test)} images)  "
          f"calibration {len(x_calib)} images  {time.perf_counter() - start:.1f} s")  # fmt: skip
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"test accuracy {accuracy:.4f} is below {MIN_ACCURACY}")


if __name__ == "__main__":
    main()
