"""Channel pruning on CNN+BiLSTM text recognizers (CRNN-shaped, seeded random weights, built
with onnx.helper): how much of the model channel pruning can remove, now that LSTM hidden units
are channels.

    python tools/bench_recurrent.py                      # writes nothing; prints a markdown table
    PYTHONPATH=/path/to/other/checkout python tools/bench_recurrent.py   # the same on another build

The models: a CRNN (3 conv blocks 3->64->128->256 pooling the height to 1, the width to 25
time steps, then two BiLSTM layers of 128 hidden units with Transpose+Reshape between them as
PyTorch exports them, then a per-step MatMul+Add classifier over 97 symbols) and the same with
GRU. Per model: every float parameter of the model before and after ``prune(pattern="channel",
sparsity=0.25)``, the channel groups pruned and left whole, the MACs, and the cosine of the
pruned output to the dense one (random weights: it says the model runs, not that it is
accurate; exactness against the masked model is what the tests assert).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxprune

SEQ, CLASSES = 25, 97


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, p):
        self.k += 1
        return f"{p}_{self.k}"

    def w(self, shape, scale=None):
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        arr = self.rng.standard_normal(shape) * (scale or 1.0 / np.sqrt(max(fan, 1)))
        n = self.name("w")
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), n))
        return n

    def c(self, arr):
        n = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def op(self, op, ins, n_out=1, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, name=self.name(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv_bn_relu(self, x, cin, cout):
        y = self.op("Conv", [x, self.w([cout, cin, 3, 3]), self.w([cout], 0.1)],
                    kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        return self.op("Relu", [y])


def crnn(cell: str = "LSTM", hidden: int = 128, seed: int = 0) -> onnx.ModelProto:
    gates = {"LSTM": 4, "GRU": 3}[cell]
    b = _Builder(seed)
    x = b.conv_bn_relu("image", 3, 64)
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])          # 16x50
    x = b.conv_bn_relu(x, 64, 128)
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])          # 8x25
    x = b.conv_bn_relu(x, 128, 256)
    x = b.op("MaxPool", [x], kernel_shape=[8, 1], strides=[8, 1])          # 1x25
    x = b.op("Squeeze", [x, b.c(np.array([2], np.int64))])                 # [1, 256, 25]
    x = b.op("Transpose", [x], perm=[2, 0, 1])                             # [25, 1, 256]
    width = 256
    for _ in range(2):
        y = b.op(cell, [x, b.w([2, gates * hidden, width]), b.w([2, gates * hidden, hidden]),
                        b.w([2, 2 * gates * hidden], 0.1)], n_out=1, hidden_size=hidden,
                 direction="bidirectional")
        t = b.op("Transpose", [y], perm=[0, 2, 1, 3])
        x = b.op("Reshape", [t, b.c(np.array([0, 0, -1], np.int64))])
        width = 2 * hidden
    logits = b.op("Add", [b.op("MatMul", [x, b.w([width, CLASSES])]), b.w([CLASSES], 0.1)])
    g = helper.make_graph(b.nodes, f"crnn_{cell.lower()}",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                         [1, 3, 32, 100])],
                          [helper.make_tensor_value_info(logits, TensorProto.FLOAT,
                                                         [SEQ, 1, CLASSES])], b.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def float_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type == TensorProto.FLOAT)


def run(model, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.25)
    args = ap.parse_args(argv)
    print(f"onnxprune from {onnxprune.__file__}; channel pruning at {args.sparsity}\n")
    print("| model | float params before -> after | cut | groups pruned / frozen | "
          "MACs before -> after | cosine to dense | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    feeds = {"image": np.random.default_rng(1).standard_normal((1, 3, 32, 100)
                                                               ).astype(np.float32)}
    for cell in ("LSTM", "GRU"):
        model = crnn(cell)
        t0 = time.perf_counter()
        res = onnxprune.prune(model, pattern="channel", sparsity=args.sparsity)
        dt = time.perf_counter() - t0
        onnx.checker.check_model(res.model, full_check=True)
        p0, p1 = float_params(model), float_params(res.model)
        rep = res.report
        rec = next(r for r in res.state.records if hasattr(r, "groups_pruned"))
        a, b = run(model, feeds).ravel(), run(res.model, feeds).ravel()
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        print(f"| CRNN-Bi{cell} | {p0:,} -> {p1:,} | {1 - p1 / p0:.1%} | "
              f"{rec.groups_pruned} / {len(rec.frozen)} | {rep.macs_before / 1e6:.1f}M -> "
              f"{rep.macs_after / 1e6:.1f}M | {cos:.4f} | {dt:.2f} |")
        for desc, why in rec.frozen:
            print(f"|  frozen: {desc} | {why} | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
