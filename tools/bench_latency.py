"""Benchmark: what channel pruning buys on the CPU — MACs, params and onnxruntime latency.

For each model and channel sparsity (with and without ``--round-to``), the pruned model is timed
against the dense one in interleaved runs (dense, pruned, dense, pruned, ...) and the medians are
compared, so machine drift hits both alike. Reported as ratios from one run: MAC reduction
(dense/pruned), params reduction, latency speedup (dense/pruned) and speedup / MAC reduction.

    python tools/fetch_corpus.py --only light
    python tools/bench_latency.py [--models resnet50,squeezenet,...] [--write benchmarks/latency.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnxprune  # noqa: E402
from onnxprune.inputs.generate import make_inputs  # noqa: E402

from fetch_corpus import default_corpus_dir  # noqa: E402

CORPUS = default_corpus_dir()
MODELS = {
    "resnet50": CORPUS / "light" / "light_resnet50.onnx",
    "squeezenet": CORPUS / "light" / "light_squeezenet.onnx",
    "inception_v2": CORPUS / "light" / "light_inception_v2.onnx",
    "densenet121": CORPUS / "light" / "light_densenet121.onnx",
    "mobilenetv3_block": Path(__file__).resolve().parent.parent / "models" / "mobilenetv3_block.onnx",
}


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def interleaved_latency(dense: Path, pruned: Path, feeds, runs: int, threads: int):
    a, b = session(dense, threads), session(pruned, threads)
    for s in (a, b):  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    ta, tb = [], []
    for _ in range(runs):
        for s, acc in ((a, ta), (b, tb)):
            start = time.perf_counter()
            s.run(None, feeds)
            acc.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,squeezenet,inception_v2")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = MODELS[name]
            if not path.is_file():
                print(f"skip {name}: {path} missing (python tools/fetch_corpus.py)")
                continue
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                for round_to in (1, args.round_to):
                    out = Path(tmp) / f"{name}-{sparsity}-{round_to}.onnx"
                    res = onnxprune.prune(path, pattern="channel", sparsity=sparsity,
                                          round_to=round_to, output=out, force=True,
                                          validate=False)
                    rep = res.report
                    feeds = make_inputs(res.model, seed=0)
                    dense_t, pruned_t = interleaved_latency(path, out, feeds, args.runs,
                                                            args.threads)
                    mac_red = rep.macs_before / rep.macs_after
                    par_red = rep.params_before / max(1, rep.params_after)
                    speed = dense_t / pruned_t
                    rows.append((name, sparsity, round_to, mac_red, par_red, dense_t * 1e3,
                                 pruned_t * 1e3, speed, speed / mac_red))
                    print(f"{name:18s} s={sparsity:.1f} round_to={round_to:2d} MACs ×{mac_red:.2f}"
                          f" params ×{par_red:.2f} latency {dense_t * 1e3:7.2f} -> "
                          f"{pruned_t * 1e3:7.2f} ms speedup ×{speed:.2f} "
                          f"(speedup/MAC {speed / mac_red:.2f})")
    if args.write:
        lines = [
            "# Channel pruning: MACs, params and onnxruntime CPU latency",
            "",
            f"Command: `python tools/bench_latency.py --models {args.models} --sparsities "
            f"{args.sparsities} --round-to {args.round_to} --runs {args.runs} --threads "
            f"{args.threads} --write {args.write}`",
            "",
            f"onnxruntime {ort.__version__}, CPUExecutionProvider, {args.threads} intra-op "
            f"thread(s), batch 1, median of {args.runs} interleaved runs; one run on a shared "
            "2-core machine: read ratios, not absolute times. Reduction = dense / pruned.",
            "",
            "| model | channels removed | round-to | MAC reduction | params reduction | dense ms "
            "| pruned ms | latency speedup | speedup / MAC reduction |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {n} | {s:.0%} | {r} | ×{m:.2f} | ×{p:.2f} | {d:.2f} | {q:.2f} | ×{sp:.2f} "
                  f"| {e:.2f} |" for n, s, r, m, p, d, q, sp, e in rows]
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
