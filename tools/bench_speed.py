"""Benchmark: time to prune a ResNet-50-sized model vs the floor of the same work done bare.

The floor is the least any tool must do, in one script: ``onnx.load`` + ``|w|`` + ``np.partition``
(global threshold) or per-group top-N (2:4) + mask + ``onnx.save``. onnxprune runs without
validation (``validate=False``), as the issue asks. Runs are interleaved and the median of
``--repeat`` is taken; the ratio is what matters (machines are shared and noisy).

    python tools/fetch_corpus.py --only light
    python tools/bench_speed.py [--model PATH] [--repeat 5] [--write benchmarks/speed.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnxprune  # noqa: E402

from fetch_corpus import default_corpus_dir  # noqa: E402

CORPUS = default_corpus_dir()


def weight_names(model: onnx.ModelProto) -> set:
    names = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1:
            names.add(node.input[1])
    return names


def floor_global(src: Path, dst: Path, sparsity: float) -> None:
    model = onnx.load(str(src))
    names = weight_names(model)
    inits = [t for t in model.graph.initializer if t.name in names]
    arrays = [numpy_helper.to_array(t) for t in inits]
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    k = int(sparsity * flat.size)
    threshold = np.partition(flat, k)[k]
    for t, a in zip(inits, arrays):
        t.CopyFrom(numpy_helper.from_array(np.where(np.abs(a) < threshold, 0, a), t.name))
    onnx.save(model, str(dst))


def floor_24(src: Path, dst: Path) -> None:
    model = onnx.load(str(src))
    names = weight_names(model)
    for t in model.graph.initializer:
        if t.name not in names:
            continue
        a = numpy_helper.to_array(t)
        w2d = a.transpose(0, *range(2, a.ndim), 1).reshape(a.shape[0], -1) if a.ndim == 4 else a
        if w2d.shape[1] % 4:
            continue
        groups = np.abs(w2d).reshape(-1, 4)
        drop = np.argpartition(groups, 2, axis=1)[:, :2]
        keep = np.ones_like(groups, dtype=bool)
        np.put_along_axis(keep, drop, False, axis=1)
        pruned = (w2d.reshape(-1, 4) * keep).reshape(w2d.shape)
        if a.ndim == 4:
            pruned = pruned.reshape(a.shape[0], *a.shape[2:], a.shape[1]).transpose(0, 3, 1, 2)
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(pruned), t.name))
    onnx.save(model, str(dst))


def run_onnxprune(src: Path, dst: Path, **kwargs) -> None:
    onnxprune.prune(src, output=dst, force=True, validate=False, **kwargs)


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=CORPUS / "light" / "light_resnet50.onnx")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model} not found; run: python tools/fetch_corpus.py --only light")
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(args.model)).graph.initializer)
    cases = [
        (
            "0.8 unstructured, global",
            lambda s, d: floor_global(s, d, 0.8),
            lambda s, d: run_onnxprune(s, d, pattern="unstructured", sparsity=0.8, scope="global"),
        ),
        ("2:4", floor_24, lambda s, d: run_onnxprune(s, d, pattern="2:4")),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, floor_fn, tool_fn in cases:
            floor_t, tool_t = [], []
            for i in range(args.repeat):  # interleaved, so drift hits both alike
                floor_t.append(timed(floor_fn, args.model, Path(tmp) / "floor.onnx"))
                tool_t.append(timed(tool_fn, args.model, Path(tmp) / "tool.onnx"))
            f, t = statistics.median(floor_t), statistics.median(tool_t)
            rows.append((label, f, t, t / f))
            print(f"{label:28s} floor {f:6.3f}s  onnxprune {t:6.3f}s  ratio {t / f:4.2f}x")
    if args.write:
        lines = [
            "# Pruning speed vs the bare floor",
            "",
            f"Model: `{args.model.name}` ({params / 1e6:.1f} M params in initializers), "
            f"median of {args.repeat} interleaved runs, 2-core machine, onnxprune without "
            "validation. Target: ratio ≤ 1.3.",
            "",
            f"Command: `python tools/bench_speed.py --repeat {args.repeat} --write {args.write}`",
            "",
            "| case | floor (s) | onnxprune (s) | ratio |",
            "|---|---|---|---|",
        ]
        lines += [f"| {label} | {f:.3f} | {t:.3f} | {r:.2f} |" for label, f, t, r in rows]
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
