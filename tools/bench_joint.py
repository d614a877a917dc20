"""Models pruned together (``--with``) on a real pair: arabic-name-romanizer's BiGRU encoder and its
attention GRU decoder; writes the ``joint`` section of benchmarks/accuracy.md.

    python tools/fetch_corpus.py --only text
    python tools/bench_joint.py                 # ~3 min on 2 shared cores

Each run prunes ``encoder.onnx --with decoder.onnx`` (the decoder given ``--steps`` times: its first
steps, the state fed run to run, so calibration and validation see later steps too) and measures:

* *agreement*: greedy transliterations of 40 names (``eval_text.arabic_names``, seed 1) by the pruned
  pair equal to the dense pair's, whole strings (``eval_text.romanize``);
* *latency*: one name (16 source positions) through the encoder and 8 decoder steps, state fed back,
  onnxruntime CPU, 1 intra-op thread, dense and pruned interleaved, median of ``--runs``;
* params of both files, their file sizes, and the joined pair's freeze rate (``tools/corpus.py``'s).

Calibration (``eval_text.rom_joint_calibration``): 512 names (seed 0), each decoder run's prefix the
dense transliteration's characters (teacher forcing); 448 for the statistics, 64 held out. The wheel
ships no name list: the 40 names are both the calibration's and the test's (other orders).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import eval_text as et  # noqa: E402
from corpus import TEXT_INPUT_SHAPES, freeze_rate  # noqa: E402
from sections import write_marked  # noqa: E402

ACCURACY = REPO / "benchmarks" / "accuracy.md"
BEGIN, END = "<!-- joint: begin -->", "<!-- joint: end -->"
SHAPES = {"batch": 1, "src_len": 16, "tgt_len": 1}
C = "channel"
RUNS = [("channel 25%", dict(pattern=C, sparsity=0.25), False),
        ("channel 25% + refit", dict(pattern=C, sparsity=0.25, refit=True), True),
        ("GRU units 25% + refit (all three GRUs; attention combine kept)",
         dict(pattern=C, sparsity=0.25, refit=True, exclude="onnx::MatMul_166"), True),
        ("encoder GRU units 25% + refit (decoder state, combine kept)",
         dict(pattern=C, sparsity=0.25, refit=True, exclude="onnx::MatMul_166|m.bridge"), True),
        ("channel 10% + refit", dict(pattern=C, sparsity=0.10, refit=True), True),
        ("--target-macs 0.75 + refit", dict(pattern=C, target_macs=0.75, refit=True), True),
        ("2:4 sparsegpt (masks: no channel removed)", dict(pattern="2:4", criterion="sparsegpt"),
         True)]


def pair_latency(dense, pruned, runs: int, steps: int = 8) -> tuple:
    """Median seconds of one name through each pair (encoder, then ``steps`` decoder steps)."""
    feed = et.rom_encode(et.arabic_names(1, 7), length=16)
    sessions = [(et.session(e), et.session(d)) for e, d in (dense, pruned)]

    def once(enc, dec):
        memory, mask, hidden = enc.run(None, feed)
        prefix = np.ones((1, 1), np.int64)
        for _ in range(steps):
            logprobs, hidden = dec.run(None, {"prefix": prefix, "memory": memory, "src_mask": mask,
                                              "hidden": hidden})
            prefix = logprobs.argmax(-1)[:, None].astype(np.int64)

    times: List[List[float]] = [[], []]
    for _ in range(3):
        for s in sessions:
            once(*s)
    for _ in range(runs):
        for k, s in enumerate(sessions):
            start = time.perf_counter()
            once(*s)
            times[k].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def params(path: Path) -> int:
    import onnx

    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type == 1)


def main(argv=None) -> int:
    import onnx

    import onnxprune
    from onnxprune.model import compose

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="decoder runs joined after the encoder")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--write", type=Path, default=ACCURACY)
    parser.add_argument("--notes", type=Path, default=None,
                        help="a markdown file whose text goes at the end of the section (findings)")
    args = parser.parse_args(argv)
    command = "python tools/bench_joint.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    enc, dec = et.text_file(et.ROM_ENCODER), et.text_file(et.ROM_DECODER)
    names = et.arabic_names(40, 1)
    dense_text = et.romanize(enc, names)
    pair = [onnx.load(str(enc)), onnx.load(str(dec))]
    joint = compose.join(pair, ["encoder", "decoder"], compose.find_links(pair))
    shapes = {**TEXT_INPUT_SHAPES["text/romanizer/encoder"], **TEXT_INPUT_SHAPES["text/romanizer/decoder"]}
    freeze = freeze_rate(joint.model, shapes)
    alone = [freeze_rate(enc, TEXT_INPUT_SHAPES["text/romanizer/encoder"]),
             freeze_rate(dec, TEXT_INPUT_SHAPES["text/romanizer/decoder"])]
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-joint-") as tmp:
        tmp = Path(tmp)
        calib = et.make_calibration(f"romanizer_joint{args.steps}", 512, tmp / "calib.npz", seed=0)
        for label, spec, calibrated in RUNS:
            out = tmp / re.sub(r"[^a-z0-9]+", "_", label.lower())
            out.mkdir()
            kwargs = dict(calibration=str(calib), calibration_samples=448, validation_samples=64) \
                if calibrated else {}
            t0 = time.perf_counter()
            result = onnxprune.prune(str(enc), with_models=[dec] * args.steps,
                                     input_shapes=SHAPES, output=str(out) + "/", force=True, **spec, **kwargs)
            seconds = time.perf_counter() - t0
            penc, pdec = result.outputs
            got = et.romanize(penc, names, decoder=pdec)
            agreement = float(np.mean([g == d for g, d in zip(got, dense_text)]))
            lat = pair_latency((enc, dec), (penc, pdec), args.runs)
            comparison = result.report.comparison
            worst = None if comparison is None else comparison.worst_agreement
            rows.append(dict(run=label, agreement=agreement, seconds=seconds, latency=lat, worst=worst,
                             params=(params(enc) + params(dec), params(penc) + params(pdec)),
                             size=(enc.stat().st_size + dec.stat().st_size,
                                   penc.stat().st_size + pdec.stat().st_size)))
            print(f"  {label}: agreement {agreement:.3f}, {lat[0] * 1e3:.2f} -> {lat[1] * 1e3:.2f} ms, "
                  f"{seconds:.1f} s", flush=True)
    lines = [BEGIN, "", "## Models pruned together: the romanizer's encoder and decoder (`tools/bench_joint.py`)",
             "", "```", command.strip(), "```", "",
             f"{(time.perf_counter() - start) / 60:.1f} min on a shared 2-core machine. `onnxprune encoder.onnx "
             f"--with decoder.onnx` (the decoder given {args.steps} times: its first {args.steps} steps joined, the "
             "state fed run to run) `--pattern channel --input-shape batch=1,src_len=16,tgt_len=1`; calibrated runs "
             "with `eval_text.rom_joint_calibration` (512 names, 448 for the statistics, 64 held out). *agreement*: "
             "whole greedy transliterations of 40 names equal to the dense pair's (dense: 1.000); *validation*: "
             "onnxprune's worst per-step top-1 agreement on the held-out samples (teacher-forced steps); *latency*: "
             "one name, encoder + 8 decoder steps, 1 thread, interleaved medians. Freeze rate of the joined pair: "
             f"{100 * (freeze['rate'] or 0):.1f}% (each file alone: encoder {100 * alone[0]['rate']:.1f}%, decoder "
             f"{100 * alone[1]['rate']:.1f}%: their interface and the fed-back state frozen).", "",
             "| run | agreement | validation | params | files | latency ms | s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        (pb, pa), (sb, sa), (lb, la) = r["params"], r["size"], r["latency"]
        worst = "" if r["worst"] is None else f"{100 * r['worst']:.1f}%"
        lines.append(f"| {r['run']} | {r['agreement']:.3f} | {worst} | {pb / 1e6:.2f}M → {pa / 1e6:.2f}M | "
                     f"{sb / 2 ** 20:.2f} → {sa / 2 ** 20:.2f} MiB | {lb * 1e3:.2f} → {la * 1e3:.2f} (×{lb / la:.2f}) "
                     f"| {r['seconds']:.1f} |")
    if args.notes:
        lines += ["", args.notes.read_text(encoding="utf-8").rstrip("\n")]
    lines += ["", END, ""]
    text = "\n".join(lines)
    write_marked(args.write, text, BEGIN, END)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
