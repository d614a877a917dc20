"""Speed-up vs detection F1 on real detectors: channel removal + refit at --target-speedup.

Per model (tools/eval_detect.py: PP-OCRv4 det, layout_cdla PicoDet, ddddocr's YOLOX-like character
detector, the yolo_block fixture) and
per target speed-up: ``prune(pattern="channel", target_speedup=S, round_to=8, refit=True,
calibration=<rendered pages, seed 1>, threads=1)``, then the pruned model's F1 against the dense
model's boxes on separate evaluation pages (seed 2), its MACs, and its onnxruntime CPU speed-up
with 1 and 2 threads (dense and pruned sessions interleaved, warm-up, median of 3 measurements
with the sessions opened in rotated order). Rows are appended to ``--rows`` (JSON lines) as they
finish, so a long run that is cut short keeps what it measured; ``--write`` renders them into
the ``<!-- bench_detect: begin/end -->`` section of benchmarks/latency.md.

    python tools/bench_detect.py --models ppocr_det,layout,yolo --speedups 1.2,1.3,1.5 \\
        --rows /tmp/bench_detect.jsonl --write benchmarks/latency.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_detect import CAL_SEED, EVAL_SEED, MODELS  # noqa: E402
from sections import write_marked  # noqa: E402

from onnxprune.api import prune  # noqa: E402
from onnxprune.model.io import load, save  # noqa: E402
from onnxprune.passes.fold import fold_scalars  # noqa: E402
from onnxprune.report.macs import count_macs  # noqa: E402
from onnxprune.runtime.latency import _quiet_session, model_feed, time_sessions  # noqa: E402
from onnxprune.runtime.session import session_threads  # noqa: E402
from onnxprune.inputs.signature import resolve_input_shapes  # noqa: E402

BEGIN, END = "<!-- bench_detect: begin -->", "<!-- bench_detect: end -->"
TITLE = "## Real detectors: speed-up vs detection F1 (issue 14)"
#: calibration / evaluation pages per model (800×608 layout pages are costly to calibrate on)
#: variant = "refit" or "norefit", then "+name" for each of these option sets
VARIANTS = {"bn": {"bn_reestimate": "match"}, "bndata": {"bn_reestimate": "data"},
            "recon": {"channel_criterion": "reconstruction"}, "dmgrefit": {"damage": "refit"},
            "metric": {"damage": "metric", "eval_script": "METRIC"},
            "metricrefit": {"damage": "metric-refit", "eval_script": "METRIC"},
            "depth": {"depth": True}, "stages3": {"damage_stages": 3},
            "fold": {"fold_scalars": True}, "stages5": {"damage_stages": 5},
            "maskmetric": {"damage": "metric", "eval_script": "MASKMETRIC"}}
SAMPLES = {"ppocr_det": (32, 16), "layout": (16, 8), "yolo": (64, 32), "ddddocr": (16, 16)}


def speedups(dense, pruned, shapes, threads, runs, reps=3):
    """dense / pruned median seconds with ``threads``: ``reps`` measurements of ``runs``
    interleaved rounds each (after warm-up), sessions opened in rotated order."""
    per = [[], []]
    paths = [dense, pruned]
    with session_threads(threads):
        for r in range(reps):
            order = [(i + r) % 2 for i in range(2)]
            sessions = [(_quiet_session(load(paths[i])), model_feed(load(paths[i]), shapes))
                        for i in order]
            for i, t in zip(order, time_sessions(sessions, runs, 5)):
                per[i].append(t)
    return statistics.median(per[0]) / statistics.median(per[1])


def run_model(name, args, tmp: Path, rows_path: Path):
    dense, metric, images, input_name, shapes = MODELS[name]
    if not Path(dense).exists():
        print(f"{name}: {dense} absent, skipped", flush=True)
        return
    n_cal, n_eval = SAMPLES[name]
    cal = tmp / f"{name}_cal.npz"
    np.savez(cal, **{input_name: images(n_cal, CAL_SEED)})
    evals = images(n_eval, EVAL_SEED)
    resolved = {k: list(v) for k, v in resolve_input_shapes(str(dense), shapes).items()}
    dense_macs = count_macs(str(dense), shapes).total
    for variant in args.variants.split(","):
        if variant == "fold":  # the dense model with --fold-scalars' exact folds, no pruning
            _fold_row(name, dense, metric, evals, shapes, resolved, dense_macs, args, tmp,
                      rows_path)
            continue
        parts = variant.split("+")
        extra = {"refit": parts[0] == "refit"}
        for part in parts[1:]:
            extra.update(VARIANTS[part])
        if extra.get("eval_script") == "METRIC":  # the model's F1 on calibration pages
            extra["eval_script"] = f"{Path(__file__).resolve().parent}/eval_detect.py:" \
                f"{name}_metric"
        if extra.get("eval_script") == "MASKMETRIC":  # its text-mask IoU (PP-OCR det only)
            extra["eval_script"] = f"{Path(__file__).resolve().parent}/eval_detect.py:" \
                f"{name}_mask_metric"
        targets = [("target_speedup", float(x)) for x in args.speedups.split(",") if x] + \
            [("target_macs", float(x)) for x in (args.macs or "").split(",") if x]
        for kind, s in targets:
            out = tmp / f"{name}_{variant}_{kind}_{s}.onnx"
            t0 = time.perf_counter()
            try:
                res = prune(str(dense), pattern="channel", round_to=8, threads=1,
                            calibration=cal, input_shapes=shapes, validate=False, output=out,
                            force=True, **{kind: s}, **extra)
            except Exception as e:  # a failure is a row too
                row = dict(model=name, variant=variant, target=s, kind=kind,
                           error=f"{type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}")
                print(row, flush=True)
                with rows_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                continue
            took = time.perf_counter() - t0
            alloc = [r for r in res.state.records if getattr(r, "allocation", None)][0].allocation
            damage_notes = [n for r in res.state.records for n in getattr(r, "notes", [])
                            if n.startswith(("allocation: damage", "speed-up check", "depth:"))]
            row = dict(model=name, variant=variant, target=s, kind=kind, seconds=round(took, 1),
                       predicted=alloc["predicted_speedup"],
                       macs=count_macs(str(out), shapes).total / dense_macs,
                       f1=metric(str(out), evals),
                       speedup={str(t): speedups(str(dense), str(out), resolved, t, args.runs, args.reps)
                                for t in args.threads}, notes=damage_notes,
                       widths=[(g["describe"][:60], g["channels"], g["kept"])
                               for g in alloc["groups"] if g["kept"] < g["channels"]],
                       blocks=alloc.get("blocks_removed", []))
            print(row, flush=True)
            with rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _fold_row(name, dense, metric, evals, shapes, resolved, dense_macs, args, tmp, rows_path):
    out = tmp / f"{name}_fold.onnx"
    t0 = time.perf_counter()
    handle = load(str(dense))
    folded = fold_scalars(handle)
    save(handle, out, force=True)
    row = dict(model=name, variant="fold only (exact, no pruning)", target=None, kind="none",
               seconds=round(time.perf_counter() - t0, 1), predicted=None,
               macs=count_macs(str(out), shapes).total / dense_macs, f1=metric(str(out), evals),
               speedup={str(t): speedups(str(dense), str(out), resolved, t, args.runs, args.reps)
                        for t in args.threads},
               notes=[f"fold-scalars: {folded}"], widths=[], blocks=[])
    print(row, flush=True)
    with rows_path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _x(speedup, threads: str) -> str:
    return f"×{speedup[threads]:.2f}" if threads in speedup else "-"


def _target(row) -> str:
    if row.get("kind") == "none":
        return "dense"
    if row.get("kind") == "target_macs":
        return f"MACs {row['target']:g}"
    return f"×{row['target']:g}"


def render(rows, command: str, notes: str = "", marks=(BEGIN, END), title=TITLE) -> str:
    lines = [marks[0], title, "",
             f"Command: `{command}`", "",
             f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, batch 1, "
             f"{os.cpu_count()} CPUs shared with other jobs (one run of the script: read ratios, "
             "not absolute times). Each row: `--pattern channel --target-speedup S` (target ×S) "
             "or "
             "`--target-macs M` (target MACs M: no timing in the allocation, the same widths "
             "on every run) with `--round-to 8 --threads 1 --calibration <rendered pages>` "
             "(+ `--refit` and the variant's options), damage measured per "
             "group on the calibration pages; `-`: not measured. F1: the pruned model's boxes "
             "against the dense "
             "model's at IoU 0.5 on separate evaluation pages (tools/eval_detect.py; dense = "
             "1.0). Speed-up: dense / pruned, median of 3 measurements of interleaved runs "
             "after warm-up. MACs: pruned / dense as the report counts them.", "",
             "| model | variant | target | predicted | speed-up 1 thr | speed-up 2 thr | "
             "MACs | F1 vs dense | prune s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {_target(r)} | "
                         f"failed: {r['error']} | | | | | |")
            continue
        sp = r["speedup"]
        predicted = "-" if r["predicted"] is None else f"×{r['predicted']:.2f}"
        lines.append(f"| {r['model']} | {r['variant']} | {_target(r)} | "
                     f"{predicted} | {_x(sp, '1')} | {_x(sp, '2')} | {r['macs']:.3f} | "
                     f"{r['f1']:.3f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "Best measured speed-up (1 thread / 2 threads) per model at F1 ≥ 0.95 and "
              "≥ 0.90 of the dense model's (among rows timed with both thread counts where "
              "there are any; rows with `--fold-scalars`, a graph optimization, on lines of "
              "their own):", "",
              "| model | at F1 ≥ 0.95 | MACs | at F1 ≥ 0.90 | MACs |", "|---|---|---|---|---|"]
    def line(r):  # rows with the exact scalar folds get lines of their own
        return r["model"] + (" with --fold-scalars" if "fold" in r["variant"] else "")

    for model in dict.fromkeys(line(r) for r in rows):
        cells = []
        for bar in (0.95, 0.90):
            ok = [r for r in rows if line(r) == model and "f1" in r and r["f1"] >= bar]
            if not ok:
                cells += ["none", "-"]
                continue
            # rows timed with both thread counts first, then the best one-thread speed-up
            best = max(ok, key=lambda r: ("2" in r["speedup"], r["speedup"].get("1", 0)))
            cells += [f"{_x(best['speedup'], '1')} / {_x(best['speedup'], '2')} "
                      f"({best['variant']}, {_target(best)}, F1 {best['f1']:.3f})",
                      f"{best['macs']:.3f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", notes.rstrip("\n")]
    lines.append(marks[1])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ppocr_det,layout,yolo")
    ap.add_argument("--speedups", default="1.2,1.3,1.5")
    ap.add_argument("--macs", default="", help="also rows at these --target-macs (no timing "
                                                 "loop in the allocation: deterministic)")
    ap.add_argument("--variants", default="refit",
                    help="comma list of refit / norefit, each optionally +bn, +bndata, +recon, "
                         "+dmgrefit (--damage refit), +metric / +metricrefit (--damage metric / "
                         "metric-refit with eval_detect's F1 on calibration pages), +depth, "
                         "+stages3 / +stages5 (--damage-stages 3 / 5), +maskmetric (--damage metric with "
                         "eval_detect's text-mask IoU, PP-OCR det), +fold (--fold-scalars); or fold: the "
                         "dense model with the exact scalar folds only")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3, help="measurements per speed-up (median)")
    ap.add_argument("--rows", default=None, help="JSON lines file the rows are appended to")
    ap.add_argument("--render-only", action="store_true", help="only render --rows")
    ap.add_argument("--command", default=None, help="the command line to print in the table")
    ap.add_argument("--notes", default=None, help="a markdown file added to the section "
                                                    "(what the runs show)")
    ap.add_argument("--write", default=None)
    ap.add_argument("--section", default="bench_detect", help="marker name of the section "
                    "--write replaces (<!-- NAME: begin/end -->); --title: its heading")
    ap.add_argument("--title", default=TITLE)
    args = ap.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    rows_path = Path(args.rows or tempfile.mktemp(suffix=".jsonl"))
    if not args.render_only:
        tmp = Path(tempfile.mkdtemp(prefix="bench_detect_"))
        for name in args.models.split(","):
            run_model(name, args, tmp, rows_path)
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
    notes = Path(args.notes).read_text() if args.notes else ""
    marks = (f"<!-- {args.section}: begin -->", f"<!-- {args.section}: end -->")
    text = render(rows, args.command or "python tools/bench_detect.py " + " ".join(sys.argv[1:]),
                  notes, marks, args.title)
    print(text)
    if args.write:
        write_marked(Path(args.write), text, *marks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
