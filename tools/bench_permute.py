"""Benchmark: what channel permutation (``--permute``) buys an N:M (2:4) mask.

Three measurements, ratios from one run:

1. random matrices (|N(0,1)| saliencies, the setting of ASP's published number): the fraction
   of magnitude a 2:4 mask keeps with the identity order, with the searched permutation, and
   with unstructured 50% (the top half of the matrix); the *gap recovered* is
   (permuted - identity) / (unstructured - identity) — ASP reports about a third;
2. real weights (the digits CNN and corpus CNNs): the same over every 2:4 weight of the model,
   as ``onnxprune.prune(pattern="2:4", permute=True)`` reports it (unstructured 50% per weight);
3. accuracy on the digits CNN: calibrated 2:4 with and without ``--permute`` — worst top-1
   agreement with the dense model on ``models/digits_test.npz`` (the report's comparison) and
   the task accuracy against the labels.

    python tools/bench_permute.py [--corpus /work/corpus] [--write benchmarks/deploy.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import onnxprune  # noqa: E402
from onnxprune.masking.permute import SEARCH_SECONDS, search_permutation  # noqa: E402
from onnxprune.passes.permute import PermuteRecord  # noqa: E402

MODELS = ROOT / "models"
RANDOM = [(64, 64, 4), (256, 256, 2), (512, 512, 1), (2304, 256, 1)]  # rows, channels, seeds


def unstructured_half(x: np.ndarray) -> float:
    flat = np.sort(np.abs(x).ravel())
    return float(flat[flat.size - flat.size // 2:].sum())


def random_rows():
    rows = []
    for r, c, seeds in RANDOM:
        acc = []
        for seed in range(seeds):
            x = np.abs(np.random.default_rng(seed).standard_normal((r, c)))
            start = time.perf_counter()
            res = search_permutation(x, 2, 4, seed=seed)
            secs = time.perf_counter() - start
            uns = unstructured_half(x)
            acc.append((res.kept_before / res.total, res.kept_after / res.total, uns / res.total,
                        secs, res.stopped))
        ident, perm, uns = (float(np.mean([a[i] for a in acc])) for i in range(3))
        rows.append({"case": f"random {r}x{c}" + (f" ({seeds} seeds)" if seeds > 1 else ""),
                     "identity": ident, "permuted": perm, "unstructured": uns,
                     "recovered": (perm - ident) / (uns - ident),
                     "seconds": max(a[3] for a in acc),
                     "stopped": ", ".join(sorted({a[4] for a in acc}))})
    return rows


def model_row(name: str, path: Path, **kw):
    start = time.perf_counter()
    res = onnxprune.prune(str(path), pattern="2:4", permute=True, validate=False, **kw)
    secs = time.perf_counter() - start
    rec = next(r for r in res.state.records if isinstance(r, PermuteRecord))
    total = kept_uns = 0.0
    dense = onnxprune.model.io.load(str(path))
    for w in res.state.weights:
        if w.key not in rec.kept:
            continue
        arr = np.abs(dense.read(dense.index.stored[w.name]).astype(np.float64))
        total += arr.sum()
        kept_uns += unstructured_half(arr)
    uns = kept_uns / total
    return {"case": name, "weights": len(rec.kept),
            "groups": f"{rec.groups_permuted}/{rec.groups_searched}",
            "identity": rec.kept_before, "permuted": rec.kept_after, "unstructured": uns,
            "recovered": (rec.kept_after - rec.kept_before) / (uns - rec.kept_before),
            "seconds": rec.seconds, "run_seconds": secs}


def task_accuracy(model, data) -> float:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": data["input"]})[0]
    return float((logits.argmax(axis=1) == data["labels"]).mean())


def accuracy_rows(criteria):
    data = dict(np.load(MODELS / "digits_test.npz"))
    rows = []
    for criterion in criteria:
        for permute in (False, True):
            res = onnxprune.prune(str(MODELS / "digits_cnn.onnx"), pattern="2:4",
                                  criterion=criterion, permute=permute,
                                  calibration=str(MODELS / "digits_calib.npz"),
                                  inputs=str(MODELS / "digits_test.npz"))
            rec = next((r for r in res.state.records if isinstance(r, PermuteRecord)), None)
            rows.append({"criterion": criterion, "permute": permute,
                         "agreement": res.state.comparison.worst_agreement,
                         "accuracy": task_accuracy(res.model, data),
                         "kept": None if rec is None else (rec.kept_before, rec.kept_after)})
    return rows


def pct(x):
    return f"{100 * x:.2f}%"


def render(rand, real, acc, dense_acc, command) -> str:
    out = ["## permutation", "",
           "Channel permutation for N:M (`--permute`): kept magnitude of a 2:4 mask with and "
           "without the searched permutation, against unstructured 50% (gap recovered = "
           "(permuted − identity) / (unstructured − identity); ASP's published figure on random "
           "matrices is about a third). One run of", "", f"    {command}", "",
           f"on 2 shared CPU cores (search cap {SEARCH_SECONDS:g} s per channel group; a search "
           "that hit it says \"time cap\").", "",
           "| case | 2:4 identity | 2:4 permuted | unstructured 50% | gap recovered | search s |",
           "|---|---|---|---|---|---|"]
    for r in rand:
        out.append(f"| {r['case']} | {pct(r['identity'])} | {pct(r['permuted'])} | "
                   f"{pct(r['unstructured'])} | {pct(r['recovered'])} | {r['seconds']:.1f} "
                   f"({r['stopped']}) |")
    for r in real:
        out.append(f"| {r['case']} ({r['weights']} 2:4 weights, {r['groups']} groups permuted) | "
                   f"{pct(r['identity'])} | {pct(r['permuted'])} | {pct(r['unstructured'])} | "
                   f"{pct(r['recovered'])} | {r['seconds']:.1f} (whole pass) |")
    out += ["", "Rows of random matrices are the stacked consumer rows (2304 = 256 outputs × a 3×3 "
            "kernel). Real weights: the fraction of |w| the 2:4 mask keeps over all 2:4 weights "
            "of the model, as the report's permutation table gives it.", "",
            f"Accuracy on the digits CNN (dense task accuracy {pct(dense_acc)}), calibrated 2:4 "
            "(`--calibration models/digits_calib.npz --inputs models/digits_test.npz`), 797 "
            "test images:", "",
            "| criterion | --permute | worst top-1 agreement | task accuracy | kept saliency "
            "identity → permuted |", "|---|---|---|---|---|"]
    for r in acc:
        kept = "" if r["kept"] is None else f"{pct(r['kept'][0])} → {pct(r['kept'][1])}"
        out.append(f"| {r['criterion']} | {'yes' if r['permute'] else 'no'} | "
                   f"{pct(r['agreement'])} | {pct(r['accuracy'])} | {kept} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=os.environ.get("ONNXPRUNE_CORPUS", "/work/corpus"))
    ap.add_argument("--criteria", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--write", help="append the section to this markdown file")
    args = ap.parse_args()
    corpus = Path(args.corpus)
    rand = random_rows()
    real = [model_row("digits CNN (trained)", MODELS / "digits_cnn.onnx")]
    for name, rel in (("PP-OCRv4 det (trained)", "ppocr/ch_PP-OCRv4_det_infer.onnx"),
                      ("squeezenet (corpus, materialized weights)",
                       "light/light_squeezenet.onnx")):
        if (corpus / rel).is_file():
            real.append(model_row(name, corpus / rel))
    data = dict(np.load(MODELS / "digits_test.npz"))
    import onnx

    dense_acc = task_accuracy(onnx.load(str(MODELS / "digits_cnn.onnx")), data)
    acc = accuracy_rows(args.criteria.split(","))
    command = "python tools/bench_permute.py " + " ".join(sys.argv[1:])
    text = render(rand, real, acc, dense_acc, command.strip())
    print(text)
    if args.write:
        path = Path(args.write)
        previous = path.read_text() if path.is_file() else "# Deployment benchmarks\n"
        path.write_text(previous.rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
