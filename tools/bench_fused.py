"""Benchmark: heads and FFN width removed from a transformer fused by onnxruntime's optimizer
(com.microsoft Attention / SkipLayerNormalization / BiasGelu / FastGelu) — params, MACs and
onnxruntime CPU latency, dense vs pruned, as ratios from one run.

The model is a random-weight BERT-like encoder made by ``tools/make_fused_fixture.py`` (torch in
its own venv); this script needs only the package's venv:

    /tmp/torchvenv/bin/python tools/make_fused_fixture.py --hidden 256 --heads 8 --ffn 1024 \\
        --layers 4 --seq 128 -o /tmp/bert_fused_big.onnx
    python tools/bench_fused.py /tmp/bert_fused_big.onnx [--write benchmarks/fused.md]

Timing: dense and pruned sessions interleaved (dense, pruned, dense, ...) and medians compared
(:func:`bench_latency.interleaved_latency`), so machine drift hits both alike. Random weights:
the output change says nothing about accuracy; the masked == resized equality is what the tests
check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import onnxprune  # noqa: E402
from bench_latency import interleaved_latency  # noqa: E402


def feeds_for(model: onnx.ModelProto, seed: int = 0):
    dims = {vi.name: [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.input}
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 50, dims["input_ids"]).astype(np.int64),
            "attention_mask": np.ones(dims["attention_mask"], np.int64)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--sparsity", default="0.25,0.5")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", type=Path)
    a = ap.parse_args()
    model = onnx.load(a.model)
    feeds = feeds_for(model)
    heads = [next(x.i for x in n.attribute if x.name == "num_heads")
             for n in model.graph.node if n.op_type == "Attention"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sp in (float(s) for s in a.sparsity.split(",")):
            out = Path(tmp) / f"pruned_{sp}.onnx"
            result = onnxprune.prune(model, pattern="channel", sparsity=sp, validate=False)
            onnx.save(result.model, out)
            rep = result.report
            kept = [next(x.i for x in n.attribute if x.name == "num_heads")
                    for n in result.model.graph.node if n.op_type == "Attention"]
            dense_t, pruned_t = interleaved_latency(a.model, out, feeds, a.runs, a.threads)
            rows.append((sp, f"{heads[0]} → {kept[0]}", rep.params_before / rep.params_after,
                         rep.macs_before / rep.macs_after, dense_t * 1e3, pruned_t * 1e3,
                         dense_t / pruned_t))
    lines = ["| channel sparsity | heads per layer | params ÷ | MACs ÷ | dense ms | pruned ms "
             "| speed-up |", "|---|---|---|---|---|---|---|"]
    for sp, h, p, m, d, q, s in rows:
        lines.append(f"| {sp:g} | {h} | {p:.2f} | {m:.2f} | {d:.2f} | {q:.2f} | {s:.2f}× |")
    text = "\n".join(lines)
    print(text)
    if a.write:
        a.write.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
