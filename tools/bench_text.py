"""Task metrics of today's pruning on the real text models of the corpus; writes the ``eval_text`` section of
benchmarks/accuracy.md.

    python tools/fetch_corpus.py --only text
    python tools/bench_text.py                      # all models, ~10 min on 2 shared cores
    python tools/bench_text.py --models romanizer,dksplit

For each model (``tools/eval_text.py`` names) three prunings, each validated by onnxprune and then measured with the
model's task metric on data generated with another seed than the calibration's:

* ``channel 25%``: ``--pattern channel --sparsity 0.25`` on generated inputs (the sequence lengths / image size
  of ``tools/corpus.py``'s ``TEXT_INPUT_SHAPES``);
* ``channel 25% + refit``: the same with ``--refit`` and ``--calibration`` (``eval_text.make_calibration``);
* ``2:4 sparsegpt``: ``--pattern 2:4 --criterion sparsegpt --calibration`` (layer by layer).

MiniLM gets one more row, ``channel 25% + refit, other text``: the refit calibrated on
``tools/bench_heads.py``'s sentences (other subjects, verbs, objects and clauses than eval_text's
paraphrase pairs), so the retrieval is measured on text unlike the calibration's. Its rows also
give onnxruntime CPU latency at batch 1 x 32 tokens, 1 and 2 threads, dense and pruned
interleaved, medians (``bench_latency.interleaved_latency``, ``--runs`` each).

A run onnxprune refuses (no prunable weight, every channel group frozen) is a row with its reason. The section
also gives each model's freeze rate (``tools/corpus.py``'s ``freeze_rate``) and the issue's recurrent target
(LSTM/GRU hidden 25 % removed + refit keeps >= 95 %) as far as today's onnxprune reaches it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import eval_text as et  # noqa: E402
from bench_latency import interleaved_latency  # noqa: E402
from corpus import TEXT_INPUT_SHAPES, freeze_rate  # noqa: E402
from sections import write_marked  # noqa: E402

ACCURACY = REPO / "benchmarks" / "accuracy.md"
BEGIN, END = "<!-- eval_text: begin -->", "<!-- eval_text: end -->"
MODELS = ["minilm", "flan_t5", "dksplit", "romanizer", "svtrv2", "khmersm", "text2tashkeel"]
RUNS = {
    "channel 25%": dict(pattern="channel", sparsity=0.25),
    "channel 25% + refit": dict(pattern="channel", sparsity=0.25, refit=True, calibrated=True),
    "2:4 sparsegpt": dict(pattern="2:4", criterion="sparsegpt", calibrated=True),
}
CALIBRATION_SAMPLES = 64
#: Extra runs per model: (label, spec, calibration maker (name, n, path) -> path).
EXTRA_RUNS = {"minilm": [("channel 25% + refit, other text",
                          dict(pattern="channel", sparsity=0.25, refit=True, calibrated=True),
                          "bench_heads")]}
LATENCY_RUNS = 40


def _bench_heads_calibration(n: int, out: Path) -> Path:
    """MiniLM calibration from tools/bench_heads.py's sentences (not eval_text's templates)."""
    import numpy as np

    import bench_heads

    np.savez(out, **bench_heads.tokenize(bench_heads.sentences(n, seed=1)))
    return out


def _latency_feed(name: str, data) -> Optional[dict]:
    """Batch-1 inputs to time a model on (MiniLM: one 32-token sentence); None: not timed."""
    if name == "minilm":
        return {k: v[:1] for k, v in data["feed"].items()}
    return None


def _label(name: str) -> str:
    return "text/" + et.TASKS[name].file.removesuffix(".onnx")


def measure(name: str, tmp: Path, runs=RUNS, latency_runs: int = LATENCY_RUNS) -> List[Dict]:
    import onnxprune
    from onnxprune import OnnxPruneError

    task = et.TASKS[name]
    dense = et.text_file(task.file)
    shapes = TEXT_INPUT_SHAPES.get(_label(name))
    data = task.data(seed=1, dense=dense)
    dense_metric = task.metric(dense, data)
    calibration = et.make_calibration(name, CALIBRATION_SAMPLES, tmp / f"{name}.calib.npz", seed=0)
    other = {"bench_heads": _bench_heads_calibration(CALIBRATION_SAMPLES, tmp / f"{name}.other.npz")
             } if name in EXTRA_RUNS else {}
    feed = _latency_feed(name, data)
    rows = []
    todo = [(run, spec, calibration) for run, spec in runs.items()]
    todo += [(run, spec, other[maker]) for run, spec, maker in EXTRA_RUNS.get(name, [])]
    for run, spec, calib in todo:
        spec = dict(spec)
        calibrated = spec.pop("calibrated", False)
        out = tmp / f"{name}.{re.sub(r'[^a-z0-9]+', '_', run)}.onnx"
        row = {"model": name, "run": run, "metric": task.metric_name, "dense": dense_metric}
        start = time.perf_counter()
        try:
            kwargs = dict(calibration=str(calib), calibration_samples=CALIBRATION_SAMPLES // 2,
                          validation_samples=8) if calibrated else dict(input_shapes=shapes)
            result = onnxprune.prune(str(dense), output=out, force=True, **spec, **kwargs)
        except OnnxPruneError as exc:
            row["refused"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            continue
        report = result.report
        row["seconds"] = time.perf_counter() - start
        row["params"] = (report.params_before, report.params_after)
        row["nonzeros"] = (report.nonzeros_before, report.nonzeros_after)
        row["frozen"] = len(report.frozen)
        row["pruned"] = task.metric(out, data)
        if feed is not None:
            row["latency"] = {t: interleaved_latency(dense, out, feed, latency_runs, t) for t in (1, 2)}
        chosen = [n for n in report.notes if n.startswith("refit strength")]
        if chosen:
            row["refit"] = chosen[0].split(": ", 1)[1].split("; per weight")[0]
        comparison = report.comparison
        row["cosine"] = None if comparison is None else comparison.worst_cosine
        rows.append(row)
        print(f"  {name} {run}: {row['pruned']:.4f} (dense {dense_metric:.4f}), "
              f"{row['seconds']:.1f} s", flush=True)
    return rows


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _lat(row: Dict, threads: int) -> str:
    if "latency" not in row:
        return ""
    d, p = row["latency"][threads]
    return f"{d * 1e3:.1f} → {p * 1e3:.1f} (×{d / p:.2f})"


def section(rows: List[Dict], freezes: Dict[str, dict], command: str, seconds: float) -> str:
    lines = [BEGIN, "", "## Real text and sequence models (`tools/bench_text.py`)", "", "```", command, "```", "",
             f"{seconds / 60:.1f} min on a shared 2-core machine. Task metrics from `tools/eval_text.py` on data "
             "generated with seed 1 (calibration: seed 0, "
             f"{CALIBRATION_SAMPLES} samples written by `eval_text.make_calibration`, "
             f"{CALIBRATION_SAMPLES // 2} of them for the statistics and 8 of the rest held out for validation); *kept* = pruned / dense metric. *params*: the pruned weights' elements before → after "
             "(channel removal) and their zeros; *frozen*: channel groups left whole. The freeze rate is "
             "`tools/corpus.py`'s (weight-like parameters channel pruning cannot reach). *1t*/*2t*: "
             "onnxruntime CPU latency, batch 1 (MiniLM: 32 tokens), 1 and 2 intra-op threads, dense and pruned "
             f"interleaved, median of {LATENCY_RUNS} runs each, as dense ms → pruned ms (×speed-up); MiniLM only. "
             "*other text*: calibrated on `tools/bench_heads.py`'s sentences (seed 1) instead of "
             "`eval_text.make_calibration`'s.", "",
             "| model | metric | freeze rate | run | dense | pruned | kept | params | nonzeros | frozen | 1t | 2t | s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    refused_all = {m for m in {r["model"] for r in rows}
                   if len({r.get("refused") for r in rows if r["model"] == m} - {None}) == 1
                   and all("refused" in r for r in rows if r["model"] == m)}
    done = set()
    for r in rows:
        f = freezes.get(r["model"], {})
        rate = "n/a" if f.get("rate") is None else f"{100 * f['rate']:.0f}%"
        if r["model"] in refused_all:
            if r["model"] not in done:
                done.add(r["model"])
                lines.append(f"| {r['model']} | {r['metric']} | {rate} | all three refused: "
                             f"{r['refused'].replace('|', '/')} | {r['dense']:.4f} | | | | | | | | |")
            continue
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['metric']} | {rate} | {r['run']} | {r['dense']:.4f} | | | | | | | | "
                         f"{r['seconds']:.1f} |")
            lines.append(f"| | | | ↳ refused: {r['refused'].replace('|', '/')} | | | | | | | | | |")
            continue
        kept = r["pruned"] / r["dense"] if r["dense"] else None
        (pb, pa), (nb, na) = r["params"], r["nonzeros"]
        params = ("nothing pruned" if not pb else _count(pb) if pb == pa
                  else f"{_count(pb)} → {_count(pa)}")
        lines.append(f"| {r['model']} | {r['metric']} | {rate} | {r['run']} | {r['dense']:.4f} | {r['pruned']:.4f} | "
                     f"{_pct(kept)} | {params} | {_count(nb) + ' → ' + _count(na) if pb else ''} | {r['frozen']} | "
                     f"{_lat(r, 1)} | {_lat(r, 2)} | {r['seconds']:.1f} |")
    choices = [r for r in rows if r.get("refit")]
    if choices:
        lines += ["", "Refit strength chosen per weight on held-out calibration batches (fit on the even-numbered "
                  "batches, judged on the odd-numbered, then refit on all; *kept as is*: every refit did worse "
                  "on the held-out batches):", ""]
        lines += [f"- {r['model']}, {r['run']}: {r['refit']}" for r in choices]
    lines += ["", "Freeze reasons (share of the weight-like parameters):", ""]
    for name, f in freezes.items():
        why = "; ".join(f"{reason} ({100 * share:.0f}%)" for reason, share in f.get("reasons", []))
        lines.append(f"- {name}: {why or 'nothing frozen'}")
    lines += ["", END, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--write", type=Path, default=ACCURACY)
    parser.add_argument("--notes", type=Path, default=None,
                        help="a markdown file whose text goes at the end of the section (hand-written findings)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    command = "python tools/bench_text.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    rows, freezes = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-text-") as tmp:
        for name in names:
            print(name, flush=True)
            freezes[name] = freeze_rate(et.text_file(et.TASKS[name].file), TEXT_INPUT_SHAPES.get(_label(name)))
            rows += measure(name, Path(tmp))
    text = section(rows, freezes, command.strip(), time.perf_counter() - start)
    if args.notes:
        text = text.replace(END, args.notes.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + END)
    write_marked(args.write, text, BEGIN, END)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
