"""Uniform channel pruning vs --target-macs allocation at equal MACs (and --target-speedup).

For each model and uniform channel sparsity S: prune uniformly (``--sparsity S``), count the
MACs ratio X it reached, then prune with ``--target-macs X`` (per-group widths). Both are
compared with the dense model on the same validation inputs (``report.comparison``: worst
cosine, worst top-1 agreement where an output is class scores) and timed against it with 1 and 2
onnxruntime threads (interleaved, median). Then one ``--target-speedup`` run per model gives
the predicted and the measured speed-up.

    python tools/bench_latency_alloc.py --models models/yolo_block.onnx,... \\
        --sparsities 0.2,0.35 --round-to 8 --write benchmarks/latency.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime

from onnxprune.api import prune
from onnxprune.model.io import load
from onnxprune.report.macs import count_macs
from onnxprune.runtime.latency import model_feed, time_sessions, _quiet_session
from onnxprune.runtime.session import session_threads
from onnxprune.inputs.signature import resolve_input_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import write_marked  # noqa: E402

SHAPES = {"ch_PP-OCRv4_det_infer": {"x": [1, 3, 320, 320]}}


def markers(models: str):
    """The comment lines around one run's block in the results file (one block per model
    list, so runs on other models keep theirs)."""
    names = ",".join(Path(m).stem for m in models.split(","))
    return (f"<!-- bench_latency_alloc {names}: begin -->",
            f"<!-- bench_latency_alloc {names}: end -->")


def text_pages(n: int, size: int = 320, seed: int = 0):
    """``n`` PP-OCR det inputs [3, size, size]: light pages with 3-7 random text lines in
    DejaVu fonts at random sizes and places, (x / 255 - 0.5) / 0.5 (rapidocr's det settings)."""
    import glob

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf")) or [None]
    rng = np.random.default_rng(seed)
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-"
    out = []
    for _ in range(n):
        bg = tuple(int(v) for v in rng.integers(190, 256, 3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 8))):
            path = fonts[int(rng.integers(len(fonts)))]
            px = int(rng.integers(12, 36))
            font = ImageFont.truetype(path, px) if path else ImageFont.load_default()
            text = "".join(rng.choice(list(chars), int(rng.integers(4, 20))))
            fg = tuple(int(v) for v in rng.integers(0, 90, 3))
            draw.text((int(rng.integers(0, size // 2)), int(rng.integers(0, size - px))), text,
                      fill=fg, font=font)
        arr = np.asarray(img, dtype=np.float32)[..., ::-1] / 255.0
        out.append(((arr - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def quality(report) -> str:
    c = report.to_dict()["comparison"]
    out = f"{c['worst_cosine']:.4f}" if c.get("worst_cosine") is not None else "-"
    if c.get("worst_agreement") is not None:
        out += f" / {c['worst_agreement']:.3f}"
    return out


def latency(models, shapes, threads, runs, reps=3):
    """Median seconds per model: ``reps`` measurements, each with fresh sessions opened in a
    rotated order (the session opened first in a process is sometimes slower), ``runs``
    interleaved rounds each; the median over the measurements."""
    import statistics

    per = [[] for _ in models]
    with session_threads(threads):
        for r in range(reps):
            order = [(i + r) % len(models) for i in range(len(models))]
            sessions = [(_quiet_session(load(models[i])), model_feed(load(models[i]), shapes))
                        for i in order]
            for i, t in zip(order, time_sessions(sessions, runs, 5)):
                per[i].append(t)
    return [statistics.median(t) for t in per]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--sparsities", default="0.2,0.35")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--speedup", type=float, default=1.3)
    ap.add_argument("--det-pages", type=int, default=48,
                    help="PP-OCR det: rendered text pages given as --calibration (the last 16 "
                         "held out to validate on)")
    ap.add_argument("--write", default=None)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    rows, speed_rows = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_alloc_"))
    for path in args.models.split(","):
        name = Path(path).stem
        shapes = SHAPES.get(name)
        resolved = {k: list(v) for k, v in resolve_input_shapes(path, shapes).items()}
        dense_macs = count_macs(path, shapes).total
        calibration = None
        if "det" in name and args.det_pages:
            import numpy as np

            calibration = tmp / f"{name}_pages.npz"
            np.savez(calibration, x=text_pages(args.det_pages))
        common = dict(pattern="channel", round_to=args.round_to, input_shapes=shapes,
                      calibration=calibration, validation_samples=16)
        for s in [float(x) for x in args.sparsities.split(",")]:
            t0 = time.perf_counter()
            uni = prune(path, sparsity=s, output=tmp / f"{name}_u{s}.onnx", force=True, **common)
            t_uni = time.perf_counter() - t0
            x = count_macs(uni.model, shapes).total / dense_macs
            t0 = time.perf_counter()
            alc = prune(path, target_macs=x, output=tmp / f"{name}_a{s}.onnx", force=True,
                        **common)
            t_alc = time.perf_counter() - t0
            y = count_macs(alc.model, shapes).total / dense_macs
            lat = {t: latency([path, uni.output, alc.output], resolved, t, args.runs)
                   for t in threads}
            rows.append([name, f"{s:g}", f"{x:.3f}", quality(uni.report), f"{y:.3f}",
                         quality(alc.report)]
                        + [f"×{lat[t][0] / lat[t][1]:.2f} / ×{lat[t][0] / lat[t][2]:.2f}"
                           for t in threads]
                        + [f"{t_uni:.1f} / {t_alc:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
        for t in threads[:1]:
            t0 = time.perf_counter()
            res = prune(path, target_speedup=args.speedup, threads=t,
                        output=tmp / f"{name}_s.onnx", force=True, **common)
            took = time.perf_counter() - t0
            alloc = [r for r in res.state.records if getattr(r, "allocation", None)][0].allocation
            again = time.perf_counter()
            prune(path, target_speedup=args.speedup, threads=t, output=tmp / f"{name}_s2.onnx",
                  force=True, **{**common, "validate": False})
            cached = time.perf_counter() - again
            speed_rows.append([name, str(t), f"×{args.speedup:g}",
                               f"×{alloc['predicted_speedup']:.2f}",
                               f"×{alloc['measured_speedup']:.2f}",
                               f"{alloc['macs_ratio']:.3f}", quality(res.report),
                               f"{took:.1f} / {cached:.1f}"])
            print(" | ".join(speed_rows[-1]), flush=True)
    text = render(args, rows, speed_rows, threads)
    print(text)
    if args.write:
        write_marked(Path(args.write), text, *markers(args.models))
    return 0


def render(args, rows, speed_rows, threads) -> str:
    cmd = "python tools/bench_latency_alloc.py " + " ".join(sys.argv[1:])
    head = ["model", "uniform sparsity", "uniform MACs", "uniform cosine", "allocated MACs",
            "allocated cosine"] + [f"speed-up {t} thr (uniform / allocated)" for t in threads] \
        + ["prune s (uniform / allocated)"]
    begin, end = markers(args.models)
    names = ", ".join(Path(m).stem for m in args.models.split(","))
    lines = [begin, f"## Allocation by measured cost: uniform vs --target-macs at equal MACs "
             f"({names})", "",
             f"Command: `{cmd}`", "",
             f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, batch 1, "
             f"{os.cpu_count()} CPUs shared with other jobs; speed-ups are dense / pruned, "
             f"median of 3 measurements (sessions opened in rotated order) of {args.runs} "
             "interleaved runs after warm-up each, one run of the script: read ratios, "
             "not absolute times. MACs as the report counts them (pruned / dense). Cosine: "
             "worst output cosine vs the dense model on the validation inputs "
             "(generated random inputs — they show how far outputs move, not task accuracy — "
             "except for PP-OCR det: rendered text pages, "
             f"{args.det_pages} given as calibration, the last 16 held out to validate on; with "
             "calibration data the allocation measures each group's damage). Allocated = `--target-macs` set to the uniform run's MAC "
             f"ratio, `--round-to {args.round_to}` for both.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"`--target-speedup {args.speedup:g}`: the speed-up the latency table "
              "predicted and the one measured after pruning (same threads), the MACs it kept, "
              "and the time of the run with the table measured / read from the cache.", "",
              "| model | threads | target | predicted | measured | MACs | cosine | "
              "run s (measured table / cached) |", "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in speed_rows]
    lines.append(end)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
