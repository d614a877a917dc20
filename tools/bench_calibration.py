"""Time calibrated pruning (SparseGPT layer by layer, sensitivity allocation) per phase, and
check what it keeps.

    python tools/bench_calibration.py                        # every model, both patterns
    python tools/bench_calibration.py --only yolo416 --patterns 2:4 --samples 64

For each model x pattern it calls ``onnxprune.prune(model, criterion="sparsegpt",
calibration=<arrays>, calibration_samples=N, pattern=..., validate=True)`` once, in this
process, and prints one JSON line per run plus a markdown table:

* ``total`` — wall seconds of the ``prune`` call (``time.perf_counter``), and ``CPU`` — the
  CPU seconds this process spent in it (``time.process_time``, all threads: steadier than
  wall time on a loaded machine, but counts onnxruntime's worker threads too);
* one column per pass (``report.timings``: ``calibrate``, ``sensitivity``, ``sequential``,
  ``validate``...) and the finer phases the calibrated passes record (``statistics`` — running
  the model and reducing activations into Hessians, ``solve`` — SparseGPT's masks and updates,
  ``trials`` — the sensitivity trials); absent on code that does not record them;
* ``cosine`` / ``agreement`` — ``report.comparison.worst_cosine`` / ``worst_agreement`` on the
  ``--hold-out`` samples that follow the calibration ones (never used for statistics).

The models:

``ppocr-det``
    PP-OCRv4 det (``$ONNXPRUNE_CORPUS/ppocr/ch_PP-OCRv4_det_infer.onnx``, from
    ``tools/fetch_corpus.py``) at ``--det-size`` (default 416x416), on generated page-like
    images (light background, dark text-like strokes and blocks, ImageNet normalization), seeded.
``yolo64`` / ``yolo416``
    ``models/yolo_block.onnx`` (YOLOv8-style C2f detector) at its own 64x64 input, and the same
    weights rewritten for 416x416 (input dims, the DFL ``Reshape`` constants and the anchor /
    stride grids recomputed for the larger map: 13520 anchors), on generated smooth images.

Times are wall clock on a shared machine (other processes load the CPUs): the load average
is printed with each row. Never a test: no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
# Measure this checkout's onnxprune, or the copy under $BENCH_ONNXPRUNE_ROOT (a "before" tree).
sys.path.insert(0, os.environ.get("BENCH_ONNXPRUNE_ROOT", str(ROOT)))

import onnxprune  # noqa: E402

from fetch_corpus import default_corpus_dir  # noqa: E402

CORPUS = default_corpus_dir()
PPOCR_DET = CORPUS / "ppocr" / "ch_PP-OCRv4_det_infer.onnx"
YOLO = ROOT / "models" / "yolo_block.onnx"


# -- inputs -----------------------------------------------------------------------------------
def _smooth(rng: np.random.Generator, shape, passes: int = 3) -> np.ndarray:
    x = rng.random(shape, dtype=np.float32)
    for _ in range(passes):  # box blur along both axes
        x = (x + np.roll(x, 1, -1) + np.roll(x, -1, -1)) / 3
        x = (x + np.roll(x, 1, -2) + np.roll(x, -1, -2)) / 3
    return x


def page_images(n: int, size: int, seed: int) -> np.ndarray:
    """Page-like RGB images in [0, 1]: a light background, dark strokes in text lines, a few
    filled blocks; then PP-OCR's ImageNet normalization. ``[n, 3, size, size]`` float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = 0.85 + 0.1 * _smooth(rng, (1, size, size))
        img = np.repeat(img, 3, axis=0) * rng.uniform(0.85, 1.0, (3, 1, 1)).astype(np.float32)
        y = int(rng.integers(4, 24))
        while y < size - 12:
            h = int(rng.integers(6, 18))
            x = int(rng.integers(2, size // 4))
            end = int(rng.integers(size // 2, size - 2))
            while x < end:  # one "word": a run of glyph-like vertical strokes
                w = int(rng.integers(8, 48))
                for gx in range(x, min(x + w, end), int(rng.integers(3, 6))):
                    img[:, y:y + h, gx:gx + 2] = rng.uniform(0.0, 0.3)
                img[:, y + h // 2, x:min(x + w, end)] *= 0.5
                x += w + int(rng.integers(4, 12))
            y += h + int(rng.integers(6, 24))
        for _ in range(int(rng.integers(0, 3))):  # a picture or table block
            y0, x0 = rng.integers(0, size - 40, 2)
            img[:, y0:y0 + 32, x0:x0 + 32] = rng.random((3, 1, 1)) * _smooth(rng, (1, 32, 32))
        mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
        std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
        out[i] = (img - mean) / std
    return out


def scene_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random RGB images in [0, 1] with a few bright blobs, ``[n, 3, size, size]``."""
    rng = np.random.default_rng(seed)
    x = _smooth(rng, (n, 3, size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        for _ in range(int(rng.integers(1, 5))):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 16, size / 4)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)
            x[i] = np.clip(x[i] + blob * rng.uniform(0.3, 0.8, (3, 1, 1)), 0, 1)
    return x


# -- models -----------------------------------------------------------------------------------
def yolo_at(size: int) -> onnx.ModelProto:
    """``yolo_block.onnx`` rewritten for ``size`` x ``size`` inputs (a multiple of 8)."""
    model = onnx.load(str(YOLO))
    if size == 64:
        return model
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    anchors_total = (size // 4) ** 2 + (size // 8) ** 2
    for out in model.graph.output:  # [1, 14, anchors]
        out.type.tensor_type.shape.dim[-1].dim_value = anchors_total
    del model.graph.value_info[:]
    levels = [(4, size // 4), (8, size // 8)]  # (stride, cells per side): 16x16 + 8x8 at 64
    anchors, strides = [], []
    for stride, cells in levels:
        ys, xs = np.mgrid[0:cells, 0:cells]
        anchors.append(np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5]))
        strides.append(np.full(cells * cells, stride))
    tensors = {"detect.anchors": np.concatenate(anchors, 1)[None].astype(np.float32),
               "detect.strides": np.concatenate(strides)[None].astype(np.float32)}
    for init in model.graph.initializer:
        if init.name in tensors:
            init.CopyFrom(numpy_helper.from_array(tensors[init.name], init.name))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.name.startswith("/detect/dfl/Constant"):
            value = numpy_helper.to_array(node.attribute[0].t).copy()
            value[-1] = -1  # the anchor count follows the map size
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(value))
    return model


def load_model(name: str, det_size: int):
    if name == "ppocr-det":
        model = onnx.load(str(PPOCR_DET))
        return model, "x", lambda n, seed: page_images(n, det_size, seed)
    size = {"yolo64": 64, "yolo416": 416}[name]
    return yolo_at(size), "images", lambda n, seed: scene_images(n, size, seed)


# -- one run ----------------------------------------------------------------------------------
PHASES = ("statistics", "solve", "trials")


def phases(result) -> Dict[str, float]:
    """Finer phase seconds the calibrated passes record (``phase_seconds`` on their records),
    summed over passes."""
    out: Dict[str, float] = {}
    for record in result.state.records:
        for k, v in (getattr(record, "phase_seconds", None) or {}).items():
            out[k] = out.get(k, 0.0) + v
    return out


class CpuClock:
    """Process CPU seconds (all threads) per pass and per calibrated phase, measured by
    wrapping functions for the duration of one run (the records' own phase times are wall
    clock, which on a loaded machine says more about the load than the code): per pass name
    (summed over ``--allocate auto``'s two prunings and per run: ``run:uniform`` ...), and
    ``sensitivity statistics`` / ``sensitivity trials`` / ``sequential statistics``."""

    def __init__(self):
        self.cpu: Dict[str, float] = {}
        self.undo = []

    def wrap(self, owner, attr: str, label) -> None:
        real = getattr(owner, attr)
        clock = self

        def timed(*args, **kwargs):
            name = label(args) if callable(label) else label
            c0 = time.process_time()
            try:
                return real(*args, **kwargs)
            finally:
                clock.cpu[name] = clock.cpu.get(name, 0.0) + time.process_time() - c0
        setattr(owner, attr, timed)
        self.undo.append((owner, attr, real))

    def __enter__(self):
        import onnxprune.api as api
        import onnxprune.passes.base as base
        import onnxprune.passes.calibrated as calibrated
        import onnxprune.passes.sequential as sequential
        self.wrap(base.Pass, "__call__", lambda a: f"pass:{a[0].name}")
        self.wrap(api, "_execute", lambda a: f"run:{a[1].allocate}")
        self.wrap(calibrated, "collect_layer_stats", "sensitivity statistics")
        self.wrap(calibrated, "layer_sensitivity", "sensitivity trials")
        self.wrap(sequential, "collect_layer_stats", "sequential statistics")
        return self

    def __exit__(self, *exc):
        for owner, attr, real in reversed(self.undo):
            setattr(owner, attr, real)


def run_one(model_name: str, pattern: str, samples: int, hold_out: int, det_size: int,
            seed: int) -> dict:
    model, input_name, make = load_model(model_name, det_size)
    data = {input_name: make(samples + hold_out, seed)}
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    with CpuClock() as clock:
        result = onnxprune.prune(model, pattern=pattern, criterion="sparsegpt",
                                 calibration=data, calibration_samples=samples, validate=True,
                                 validation_samples=hold_out, seed=seed)
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    report = result.report
    cmp = report.comparison
    row = {"model": model_name, "pattern": pattern, "samples": samples, "hold_out": hold_out,
           "total": round(total, 2), "cpu": round(cpu, 2),
           "passes": {k: round(v, 2) for k, v in report.timings.items()},
           "phases": {k: round(v, 2) for k, v in phases(result).items()},
           "cosine": None if cmp is None else float(cmp.worst_cosine),
           "agreement": None if cmp is None or cmp.worst_agreement is None
           else float(cmp.worst_agreement),
           "sparsity": round(1 - report.nonzeros_after / max(report.nonzeros_before, 1), 4),
           "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "cpu_phases": {k: round(v, 2) for k, v in clock.cpu.items()},
           "auto": auto_rows(report),
           **sensitivity_of(result),
           "notes": [n for n in report.notes if "rows" in n or "phase" in n][:4]}
    return row


def sensitivity_of(result) -> dict:
    """The kept run's sensitivity allocation (per weight sparsity), its trial samples and the
    measured errors, when it ran one (to compare allocations before and after)."""
    for record in result.state.records:
        if getattr(record, "allocation", None) and getattr(record, "table", None) is not None:
            t = record.table
            return {"allocation": {k: round(v, 4) for k, v in record.allocation.items()},
                    "trial_samples": t.samples, "levels": list(t.sparsities),
                    "errors": {k: [float(f"{e:.4g}") for e in v] for k, v in t.errors.items()}}
    return {}


def auto_rows(report) -> Optional[List[dict]]:
    """``--allocate auto``'s comparison (per allocation: its quality on the held-out samples,
    seconds, whether chosen), or None when the run did not compare."""
    for title, rows in report.sections.items():
        if title.startswith("--allocate auto"):
            return [{k: (round(v, 8) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows]
    return None


def table(rows: List[dict]) -> str:
    passes = list(dict.fromkeys(k for r in rows for k in r["passes"]
                                if k in ("calibrate", "sensitivity", "sequential", "validate")))
    head = ["model", "pattern", "total s", "CPU s"] + [f"{p} s" for p in passes] + \
        [f"{p} s" for p in PHASES] + ["worst cosine", "worst agreement", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["pattern"], f"{r['total']:.1f}", f"{r.get('cpu', 0):.1f}"]
        cells += [f"{r['passes'].get(p, 0):.1f}" for p in passes]
        cells += [f"{r['phases'][p]:.1f}" if p in r["phases"] else "–" for p in PHASES]
        cells += ["–" if r["cosine"] is None else f"{r['cosine']:.4f}",
                  "–" if r["agreement"] is None else f"{r['agreement']:.4f}",
                  f"{r['load'][0]:.1f}→{r['load'][1]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="ppocr-det,yolo64,yolo416",
                    help="comma-separated: ppocr-det, yolo64, yolo416")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--hold-out", type=int, default=16)
    ap.add_argument("--det-size", type=int, default=416)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="append the rows to this JSON-lines file")
    args = ap.parse_args(argv)
    print(f"onnxprune from {Path(onnxprune.__file__).parent}", flush=True)
    rows = []
    for name in args.only.split(","):
        if name == "ppocr-det" and not PPOCR_DET.exists():
            print(f"skip ppocr-det: {PPOCR_DET} missing (python tools/fetch_corpus.py)")
            continue
        for pattern in args.patterns.split(","):
            row = run_one(name, pattern, args.samples, args.hold_out, args.det_size, args.seed)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
