"""MiniLM's heads and FFN width: uniform channel removal vs the measured per-group allocation
(``--target-macs``), with and without the refit, on ``tools/eval_text.py``'s paraphrase task.

    python tools/bench_heads_alloc.py            # prints one line per run (numbers in benchmarks/accuracy.md)

Calibration: 32 of ``eval_text.make_calibration("minilm", 64, ...)`` (seed 0); evaluation:
``eval_text.evaluate("minilm", ...)`` (seed 1, other sentences). Needs the text corpus
(``tools/fetch_corpus.py --only text``) and ``pip install -e ".[tools]"``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_text  # noqa: E402
from onnxprune import prune  # noqa: E402

RUNS = (("uniform channel 25% + refit", dict(sparsity=0.25, refit=True)),
        ("--target-macs 0.75", dict(target_macs=0.75)),
        ("--target-macs 0.75 + refit", dict(target_macs=0.75, refit=True)))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="onnxprune-heads-alloc-") as tmp:
        cal = eval_text.make_calibration("minilm", 64, Path(tmp) / "cal.npz")
        model = eval_text.text_file(eval_text.TASKS["minilm"].file)
        for i, (label, options) in enumerate(RUNS):
            start = time.perf_counter()
            out = Path(tmp) / f"pruned{i}.onnx"
            result = prune(str(model), pattern="channel", calibration=str(cal),
                           calibration_samples=32, input_shapes={"batch": 1, "sequence": 32},
                           output=str(out), **options)
            scores = eval_text.evaluate("minilm", str(out))
            macs = result.report.macs_after / result.report.macs_before
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in scores.items())
            print(f"{label}: MACs x{macs:.3f}; {shown} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
