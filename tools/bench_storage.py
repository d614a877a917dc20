"""Benchmark: file size with ``--storage sparse`` / ``sparse-compact`` vs dense storage.

For each model and unstructured sparsity (magnitude, local, ``--no-resize`` so that only the
storage differs), the pruned model is saved three ways from one pruning: dense, ``sparse``
(sparse_initializers with int64 indices) and ``sparse-compact`` (int8/16/32 indices). Each
sparse file is loaded by onnxruntime and its outputs compared byte for byte with the dense
file's on generated inputs. Reported: the file sizes and the ratios to the dense file (the
issue's targets: <= 0.6x at 50%, <= 0.3x at 80%, <= 0.2x at 90%).

    python tools/bench_storage.py [--models digits,squeezenet,resnet50] [--write benchmarks/deploy.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onnxprune.api import prune  # noqa: E402
from onnxprune.inputs.generate import make_inputs  # noqa: E402
from onnxprune.model import io as mio  # noqa: E402

CORPUS = Path(os.environ.get("ONNXPRUNE_CORPUS", Path.home() / ".cache/onnxprune/corpus"))
ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "digits": ROOT / "onnxprune" / "data" / "digits_cnn.onnx",
    "squeezenet": CORPUS / "light" / "light_squeezenet.onnx",
    "resnet50": CORPUS / "light" / "light_resnet50.onnx",
}
SPARSITIES = (0.5, 0.8, 0.9)
TARGETS = {0.5: 0.6, 0.8: 0.3, 0.9: 0.2}
STORAGES = ("dense", "sparse", "sparse-compact")
SECTION = "## File size"


def outputs(path: Path, feeds) -> list:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.tobytes() for o in sess.run(None, feeds)]


def measure(name: str, path: Path, folder: Path) -> list:
    rows = []
    for sparsity in SPARSITIES:
        handle = prune(path, sparsity=sparsity, resize=False, validate=False).state.handle
        sizes, same, went = {}, True, ""
        feeds = None
        for storage in STORAGES:
            out = folder / f"{name}.{sparsity}.{storage}.onnx"
            decisions = []
            mio.save(handle, out, storage=storage, decisions=decisions)
            sizes[storage] = out.stat().st_size
            if feeds is None:
                feeds = make_inputs(handle.model, seed=0)
                reference = outputs(out, feeds)
            else:
                same = same and outputs(out, feeds) == reference
            if storage == "sparse":
                went = f"{sum(d.stored == 'sparse' for d in decisions)}/{len(decisions)}"
        rows.append(dict(model=name, sparsity=sparsity, dense=sizes["dense"],
                         sparse=sizes["sparse"], compact=sizes["sparse-compact"],
                         went=went, same=same))
        print(rows[-1], flush=True)
    return rows


def table(rows: list) -> str:
    lines = ["| model | sparsity | dense file | sparse (int64) | ratio | sparse-compact | ratio "
             "| target | tensors sparse | outputs identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sparsity']:.0%} | {r['dense'] / 2**20:.2f} MiB | "
            f"{r['sparse'] / 2**20:.2f} MiB | {r['sparse'] / r['dense']:.3f}x | "
            f"{r['compact'] / 2**20:.2f} MiB | {r['compact'] / r['dense']:.3f}x | "
            f"<= {TARGETS[r['sparsity']]}x | {r['went']} | {'yes' if r['same'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,squeezenet")
    ap.add_argument("--write", type=Path, help="append/replace the file-size section here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += measure(name, MODELS[name], Path(tmp))
    text = table(rows)
    print(text)
    if args.write:
        write_section(args.write, text)


def write_section(path: Path, text: str) -> None:
    """Replace the file-size section's table in ``path`` (between its header and the next
    ``## ``), keeping the rest; the prose stays as written."""
    old = path.read_text() if path.exists() else ""
    marker = "<!-- bench_storage table -->"
    if marker in old:
        head, rest = old.split(marker, 1)
        tail = rest.split(marker, 1)[1] if marker in rest else ""
        path.write_text(f"{head}{marker}\n{text}\n{marker}{tail}")
    else:
        path.write_text(f"{old}\n{SECTION}\n\n{marker}\n{text}\n{marker}\n")


if __name__ == "__main__":
    np.random.seed(0)
    main()
