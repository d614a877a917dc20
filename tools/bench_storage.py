"""Benchmark: file size with ``--storage sparse`` / ``sparse-compact`` / ``bitmask`` vs dense storage.

For each model and unstructured sparsity (magnitude, local, ``--no-resize`` so that only the
storage differs), the pruned model is saved three ways from one pruning: dense, ``sparse``
(sparse_initializers with int64 indices), ``sparse-compact`` (int8/16/32 indices) and
``bitmask`` (nonzero values + 1 bit per element, expanded by ops onnxruntime folds at session
start; opset 11+: the opset-9 "light" models are converted to opset 13 with
``onnx.version_converter`` first, as a user's modern export would be). Each
sparse file is loaded by onnxruntime and its outputs compared byte for byte with the dense
file's on generated inputs. Reported: the file sizes and the ratios to the dense file (the
issue's targets: <= 0.6x at 50%, <= 0.3x at 80%, <= 0.2x at 90%).

    python tools/bench_storage.py [--models digits,squeezenet,resnet50] [--write benchmarks/deploy.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onnxprune.api import prune  # noqa: E402
from onnxprune.inputs.generate import make_inputs  # noqa: E402
from onnxprune.model import io as mio  # noqa: E402

from fetch_corpus import default_corpus_dir  # noqa: E402

CORPUS = default_corpus_dir()
ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "digits": ROOT / "onnxprune" / "data" / "digits_cnn.onnx",
    "squeezenet": CORPUS / "light" / "light_squeezenet.onnx",
    "resnet50": CORPUS / "light" / "light_resnet50.onnx",
    "ppocr_rec": CORPUS / "ppocr" / "ch_PP-OCRv4_rec_infer.onnx",
}
SHAPES = {"ppocr_rec": {"x": (1, 3, 48, 320)}}
SPARSITIES = (0.5, 0.8, 0.9)
TARGETS = {0.5: 0.6, 0.8: 0.3, 0.9: 0.2}
STORAGES = ("dense", "sparse", "sparse-compact", "bitmask")
SECTION = "## File size"


START: dict = {}  # path -> seconds to create the session (bitmask chains fold then)


def outputs(path: Path, feeds) -> list:
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    START[path] = time.perf_counter() - t0
    return [o.tobytes() for o in sess.run(None, feeds)]


def measure(name: str, path: Path, folder: Path) -> list:
    rows = []
    for sparsity in SPARSITIES:
        handle = prune(_opset11(path, folder), sparsity=sparsity, resize=False,
                       validate=False).state.handle
        sizes, same, went = {}, True, ""
        feeds = None
        for storage in STORAGES:
            out = folder / f"{name}.{sparsity}.{storage}.onnx"
            decisions = []
            mio.save(handle, out, storage=storage, decisions=decisions)
            sizes[storage] = out.stat().st_size
            if feeds is None:
                feeds = make_inputs(handle.model, SHAPES.get(name), seed=0)
                reference = outputs(out, feeds)
            else:
                same = same and outputs(out, feeds) == reference
            if storage in ("sparse", "bitmask"):
                went += (" · " if went else "") + \
                    f"{sum(d.stored == storage for d in decisions)}/{len(decisions)}"
        rows.append(dict(model=name, sparsity=sparsity, dense=sizes["dense"],
                         sparse=sizes["sparse"], compact=sizes["sparse-compact"],
                         bitmask=sizes["bitmask"],
                         start=(START[folder / f"{name}.{sparsity}.dense.onnx"],
                                START[folder / f"{name}.{sparsity}.bitmask.onnx"]),
                         went=went, same=same))
        print(rows[-1], flush=True)
    return rows


def _opset11(path: Path, folder: Path) -> Path:
    """``path``, or a copy converted to opset 13 when its opset is below 11 (bitmask storage
    needs CumSum)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 11:
        return path
    out = folder / f"{path.stem}.opset13.onnx"
    if not out.exists():
        onnx.save(version_converter.convert_version(model, 13), str(out))
    return out


def table(rows: list) -> str:
    lines = ["| model | sparsity | dense file | sparse (int64) | ratio | sparse-compact | ratio "
             "| bitmask | ratio | target | tensors sparse · bitmask | outputs identical "
             "| session start s (dense / bitmask) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sparsity']:.0%} | {r['dense'] / 2**20:.2f} MiB | "
            f"{r['sparse'] / 2**20:.2f} MiB | {r['sparse'] / r['dense']:.3f}x | "
            f"{r['compact'] / 2**20:.2f} MiB | {r['compact'] / r['dense']:.3f}x | "
            f"{r['bitmask'] / 2**20:.2f} MiB | {r['bitmask'] / r['dense']:.3f}x | "
            f"<= {TARGETS[r['sparsity']]}x | {r['went']} | {'yes' if r['same'] else 'NO'} | "
            f"{r['start'][0]:.2f} / {r['start'][1]:.2f} |")
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
