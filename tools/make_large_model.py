"""Make an MLP with more than 2 GB of weights in external data, without holding them in memory.

A stack of ``--layers`` square layers of width ``--width`` alternating MatMul (``W[K, N]``) and
Gemm (``B[N, K]``, ``transB=1``, with a bias), ReLU between them; weights are seeded normal
values scaled by ``1/sqrt(width)`` so activations stay finite. The defaults (40 × 4096 × 4096
float32) give 2.68 GB of weights — past protobuf's 2 GiB limit, so no tool can hold this model
in one ``ModelProto``.

Each weight is generated, appended to ``model.onnx.data`` (4 KiB aligned, as onnx does) and
dropped before the next one, and its ``TensorProto`` only *points* at those bytes; memory stays
about one weight whatever ``--layers`` is. Biases are small and stay inside the proto.

    python tools/make_large_model.py [--dir /tmp/onnxprune-large] [--layers 40] [--width 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_DIR = Path("/tmp/onnxprune-large")
_ALIGN = 4096


def external_tensor(name: str, dims, location: str, offset: int, length: int
                    ) -> onnx.TensorProto:
    """A float32 TensorProto whose data lies at ``offset`` in the file ``location``."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT)
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)
    return t


def make_large_model(folder: Path, layers: int = 40, width: int = 4096, seed: int = 0,
                     name: str = "model.onnx") -> Path:
    """Write ``folder/name`` and ``folder/name.data``; returns the model path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    location = name + ".data"
    nodes, inits = [], []
    scale = np.float32(1.0 / np.sqrt(width))
    current = "x"
    with open(folder / location, "wb") as data:
        for i in range(layers):
            rng = np.random.default_rng([seed, i])
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= scale
            data.write(b"\0" * ((-data.tell()) % _ALIGN))
            offset = data.tell()
            data.write(w.data)  # square: [K, N] for MatMul and [N, K] for Gemm alike
            del w
            out = f"h{i}" if i + 1 < layers else "y"
            pre = f"z{i}" if i + 1 < layers else out
            if i % 2 == 0:
                nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [pre],
                                              name=f"matmul{i}"))
            else:
                bias = (rng.standard_normal(width, dtype=np.float32) * np.float32(0.01))
                inits.append(numpy_helper.from_array(bias, f"b{i}"))
                nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [pre],
                                              transB=1, name=f"gemm{i}"))
            inits.append(external_tensor(f"w{i}", (width, width), location, offset,
                                         width * width * 4))
            if i + 1 < layers:
                nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
            current = out
    graph = helper.make_graph(
        nodes, "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxprune/tools/make_large_model.py")
    model.ir_version = 8
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)  # by path: data stays on disk
    return path


def weight_bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    need = args.layers * args.width * args.width * 4
    free = os.statvfs(args.dir.parent if not args.dir.exists() else args.dir)
    if free.f_bavail * free.f_frsize < need * 1.1:
        sys.exit(f"not enough free disk in {args.dir} for {need / 1e9:.2f} GB of weights")
    path = make_large_model(args.dir, args.layers, args.width, args.seed)
    print(f"wrote {path} ({weight_bytes(path) / 1e9:.2f} GB of weights in "
          f"{path.name}.data)")


if __name__ == "__main__":
    main()
