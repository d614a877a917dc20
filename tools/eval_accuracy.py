"""Task accuracy after pruning, on real models and real (or rendered) data.

Two models:

* ``digits`` — the trained digits CNN (``models/digits_cnn.onnx``): top-1 accuracy on the held-out
  scikit-learn digits split (``models/digits_test.npz``); calibration from the training split
  (``models/digits_calib.npz``).
* ``ppocr`` — PP-OCRv4 rec from the corpus cache (``tools/fetch_corpus.py``): text lines rendered
  with Pillow + DejaVu (and a CJK font for Chinese) by ``tools/render_text_lines.py``; character
  accuracy (1 - edit distance / length, clamped at 0, averaged over lines) and exact-line
  accuracy with greedy CTC decoding. Calibration lines are rendered separately (other seed).

Each row is one ``onnxprune.prune(...)`` call (validation on, as users run it) run in a fresh
child process (so a row that hangs or runs past ``--row-timeout`` is stopped and recorded as not
measured); the pruned model is evaluated with onnxruntime. ``time`` is the wall time of the
prune call (calibration included, the report's own validation excluded), measured with
``time.perf_counter`` inside the child; ``report says`` is the worst top-1 agreement that run's
report gave, and on which samples.

    python tools/eval_accuracy.py --write benchmarks/accuracy.md          # both models
    python tools/eval_accuracy.py --only digits --quick                    # a fast smoke run

``--write`` replaces only the generated blocks of that file (between ``<!-- BEGIN x -->`` and
``<!-- END x -->`` markers), keeping the prose around them. Needs Pillow (tools only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
# Measure the onnxprune of this checkout (spawned children inherit sys.path), not whichever one
# an editable install elsewhere points to.
sys.path.insert(0, str(ROOT))
MODELS = ROOT / "models"
from fetch_corpus import default_corpus_dir  # noqa: E402

CORPUS = default_corpus_dir()
PPOCR_REC = CORPUS / "ppocr" / "ch_PP-OCRv4_rec_infer.onnx"
PPOCR_KEYS = CORPUS / "ppocr" / "ch_PP-OCRv4_rec_keys.txt"
CALIBRATED = ("wanda", "sparsegpt")


@dataclass
class Row:
    """One pruning setting: the keyword arguments of ``onnxprune.prune`` and how to show it."""

    method: str
    setting: str
    kwargs: dict
    allocate: str = "uniform"
    # filled in when run
    accuracy: Optional[float] = None
    exact: Optional[float] = None
    seconds: Optional[float] = None
    zeros: Optional[float] = None  # fraction of selected weight elements zero or removed
    params_ratio: Optional[float] = None  # params after / before (channel removal)
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    # what the run's own report said (validation on held-out calibration samples, else on
    # generated inputs): worst top-1 agreement with the dense model, on what, how many
    said: Optional[float] = None
    said_on: Optional[str] = None
    said_samples: int = 0

    @property
    def label(self) -> str:
        return self.method + (" + sensitivity" if self.allocate == "sensitivity" else "")


# =============================================================================================
# running one prune call in a child process
# =============================================================================================
def _child(model_path: str, kwargs: dict, out_path: str, conn) -> None:
    try:
        import onnx
        import onnxprune

        started = time.perf_counter()
        result = onnxprune.prune(model_path, **kwargs)
        rep = result.report
        # the time of pruning alone: the report's own validation is timed apart
        seconds = time.perf_counter() - started - rep.timings.get("validate", 0.0)
        onnx.save(result.model, out_path)
        cmp = rep.comparison
        conn.send({"seconds": seconds, "nonzeros_after": rep.nonzeros_after,
                   "params_before": rep.params_before, "params_after": rep.params_after,
                   "notes": [str(n) for n in rep.notes],
                   "said": None if cmp is None else cmp.worst_agreement,
                   "said_on": None if cmp is None else cmp.data,
                   "said_samples": 0 if cmp is None else cmp.samples})
    except BaseException as exc:  # noqa: BLE001 - reported as the row's result
        conn.send({"error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()})
    finally:
        conn.close()


def prune_in_child(model_path: Path, kwargs: dict, timeout: float, workdir: Path) -> dict:
    """Run ``onnxprune.prune(model_path, **kwargs)`` in a fresh process; returns its summary
    with ``path`` (the pruned model) or ``error``."""
    ctx = mp.get_context("spawn")
    out_path = workdir / "pruned.onnx"
    if out_path.exists():
        out_path.unlink()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(str(model_path), kwargs, str(out_path), child))
    started = time.perf_counter()
    proc.start()
    child.close()
    got = None
    if parent.poll(timeout):
        try:
            got = parent.recv()
        except EOFError:
            got = None
    proc.join(5)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if got is None:
        waited = time.perf_counter() - started
        if waited >= timeout:
            return {"error": f"stopped after {waited:.0f} s (--row-timeout {timeout:g} s)"}
        return {"error": f"child process died (exit code {proc.exitcode})"}
    if "error" not in got:
        got["path"] = out_path
    return got


def run_rows(model_path: Path, rows: Sequence[Row], evaluate: Callable[[str], tuple],
             timeout: float, workdir: Path, log=print) -> None:
    for row in rows:
        log(f"  {row.label:28s} {row.setting:22s} ...", end="", flush=True)
        got = prune_in_child(model_path, dict(row.kwargs), timeout, workdir)
        if "error" in got:
            row.error = got["error"]
            log(f" NOT MEASURED: {row.error}")
            if "traceback" in got:
                log(got["traceback"])
            continue
        row.seconds = got["seconds"]
        row.zeros = 1.0 - got["nonzeros_after"] / max(1, got["params_before"])
        row.params_ratio = got["params_after"] / max(1, got["params_before"])
        row.notes = got["notes"]
        row.said, row.said_on, row.said_samples = got["said"], got["said_on"], got["said_samples"]
        row.accuracy, row.exact = evaluate(str(got["path"]))
        extra = f", exact {row.exact:.4f}" if row.exact is not None else ""
        log(f" acc {row.accuracy:.4f}{extra}, zeros {row.zeros:.3f}, {row.seconds:.1f} s")


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


# =============================================================================================
# settings
# =============================================================================================
MAG_CAL = "magnitude + calibration"  # magnitude masks, layer by layer with bias correction


def calibrated_rows(kw: dict, label: str, cal: dict, allocations: Sequence[str]) -> List[Row]:
    """Magnitude without data, then each criterion with the calibration data, per allocation
    (``uniform``: one sparsity for every layer; ``sensitivity``: what ``allocate="auto"``, the
    default with calibration data, picks for a free sparsity)."""
    rows = [Row("magnitude", label, dict(kw, criterion="magnitude"))]
    for alloc in allocations:
        for method, crit in ((MAG_CAL, "magnitude"),) + tuple((c, c) for c in CALIBRATED):
            rows.append(Row(method, label, dict(kw, criterion=crit, allocate=alloc, **cal),
                            allocate=alloc))
    return rows


def digits_rows(calib: str, samples: int, quick: bool) -> List[Row]:
    rows: List[Row] = []
    cal = dict(calibration=calib, calibration_samples=samples)
    unstructured = (0.5, 0.9) if quick else (0.5, 0.7, 0.9)
    settings = [("unstructured", s, f"unstructured {s:.0%}") for s in unstructured]
    settings += [("2:4", None, "2:4 (50%)"), ("4x1", 0.8, "4x1 80%")]
    for pattern, sparsity, label in settings:
        # N:M fixes every layer's sparsity: nothing to allocate
        allocs = ("uniform",) if pattern == "2:4" else ("uniform", "sensitivity")
        rows += calibrated_rows(dict(pattern=pattern, sparsity=sparsity), label, cal, allocs)
    for s in (0.3, 0.5):
        label = f"channel {s:.0%}"
        kw = dict(pattern="channel", sparsity=s, criterion="magnitude")
        rows.append(Row("magnitude", label, kw))
        rows.append(Row("magnitude + refit", label, dict(kw, refit=True, **cal)))
        # (sensitivity allocation spreads a weight sparsity; channel pruning refuses it)
    return rows


def permute_rows(kw: dict, cal: dict) -> List[Row]:
    """Calibrated 2:4 per criterion without and with ``--permute`` (and magnitude without
    data): the permutation's effect on the task metric."""
    rows = []
    for permute in (False, True):
        label = "2:4 (50%)" + (" + permute" if permute else "")
        base = dict(kw, pattern="2:4", sparsity=None, permute=permute)
        rows += calibrated_rows(base, label, cal, ("uniform",))
    return rows


def ppocr_rows(calib: str, samples: int, input_name: str, quick: bool,
               permute: bool = False) -> List[Row]:
    rows: List[Row] = []
    shapes = {input_name: (1, 3, 48, 320)}
    cal = dict(calibration=calib, calibration_samples=samples)
    if permute:
        return permute_rows(dict(input_shapes=shapes), cal)
    settings = [("unstructured", 0.5, "unstructured 50%"), ("2:4", None, "2:4 (50%)")]
    if not quick:  # where 50 % and 2:4 no longer separate the calibrated methods
        settings.append(("unstructured", 0.7, "unstructured 70%"))
    for pattern, sparsity, label in settings:
        allocs = ("uniform",) if pattern == "2:4" or quick else ("uniform", "sensitivity")
        rows += calibrated_rows(dict(pattern=pattern, sparsity=sparsity, input_shapes=shapes),
                                label, cal, allocs)
    return rows


# =============================================================================================
# digits
# =============================================================================================
def run_digits(args) -> dict:
    test = np.load(MODELS / "digits_test.npz")
    x, labels = test["input"], test["labels"]
    model = MODELS / "digits_cnn.onnx"
    calib = "models/digits_calib.npz"  # as the user would pass it (run from the repo root)

    def evaluate(path: str):
        s = session(path)
        logits = s.run(None, {s.get_inputs()[0].name: x})[0]
        return float(np.mean(logits.argmax(axis=1) == labels)), None

    dense, _ = evaluate(str(model))
    print(f"digits: dense top-1 {dense:.4f} on {len(labels)} test images")
    samples = args.samples or 256
    rows = digits_rows(calib, samples, args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            run_rows(model, rows, evaluate, args.row_timeout, Path(tmp))
        finally:
            os.chdir(cwd)
    return {"dense": dense, "dense_exact": None, "rows": rows, "n_test": len(labels),
            "samples": min(samples, 256)}


# =============================================================================================
# PP-OCRv4 rec
# =============================================================================================
def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_scores(preds: Sequence[str], truths: Sequence[str]) -> tuple:
    """(mean character accuracy, exact-line accuracy); predictions are stripped of leading and
    trailing spaces (the model sometimes emits a space class at a line's padded end; the
    rendered truths have none there)."""
    preds = [p.strip(" ") for p in preds]
    char = [max(0.0, 1.0 - edit_distance(p, t) / len(t)) for p, t in zip(preds, truths)]
    exact = [p == t for p, t in zip(preds, truths)]
    return float(np.mean(char)), float(np.mean(exact))


def run_ppocr(args) -> Optional[dict]:
    if not PPOCR_REC.exists() or not PPOCR_KEYS.exists():
        print(f"ppocr: {PPOCR_REC} or its keys are not cached (python tools/fetch_corpus.py); "
              "skipped")
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import render_text_lines as rtl

    classes = rtl.load_classes(PPOCR_KEYS)
    dense_sess = session(str(PPOCR_REC))
    input_name = dense_sess.get_inputs()[0].name
    n_classes = dense_sess.get_outputs()[0].shape[-1]
    if n_classes != len(classes):
        raise SystemExit(f"dictionary has {len(classes)} classes (blank + keys + space), the "
                         f"model outputs {n_classes}")
    latin, cjk = rtl.find_fonts()
    maker = rtl.LineMaker(classes, latin, cjk)
    n_test = 60 if args.quick else args.test_lines
    n_cal = args.samples or 128
    n_cal = min(n_cal, 32) if args.quick else n_cal
    test = maker.lines(n_test, seed=1)
    cal = maker.lines(n_cal, seed=2)
    truths = [t for t, _ in test]
    print(f"ppocr: {maker.describe()}")
    print(f"ppocr: {n_test} test lines (seed 1), {n_cal} calibration lines (seed 2), "
          f"input '{input_name}'")

    def run_model(sess, x):
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: x[i:i + 16]})[0]
                               for i in range(0, len(x), 16)])

    dense_by_order = {}
    for order in ("BGR", "RGB"):
        x = np.stack([rtl.preprocess(im, order) for _, im in test])
        dense_by_order[order] = ocr_scores(rtl.ctc_greedy(run_model(dense_sess, x), classes),
                                           truths)
        print(f"ppocr: dense {order}: char acc {dense_by_order[order][0]:.4f}, "
              f"exact {dense_by_order[order][1]:.4f}")
    # Higher dense character accuracy wins; a tie keeps BGR (PaddleOCR reads with cv2).
    order = max(("BGR", "RGB"), key=lambda o: (dense_by_order[o][0], o == "BGR"))
    x_test = np.stack([rtl.preprocess(im, order) for _, im in test])
    x_cal = np.stack([rtl.preprocess(im, order) for _, im in cal])
    dense, dense_exact = dense_by_order[order]
    print(f"ppocr: using {order}")

    def evaluate(path: str):
        return ocr_scores(rtl.ctc_greedy(run_model(session(path), x_test), classes), truths)

    with tempfile.TemporaryDirectory() as tmp:
        calib = str(Path(tmp) / "ppocr_calib.npz")
        np.savez(calib, **{input_name: x_cal})
        rows = ppocr_rows(calib, n_cal, input_name, args.quick, args.permute)
        run_rows(PPOCR_REC, rows, evaluate, args.row_timeout, Path(tmp))
    return {"dense": dense, "dense_exact": dense_exact, "rows": rows, "n_test": n_test,
            "samples": n_cal, "order": order, "dense_by_order": dense_by_order,
            "charset": maker.describe()}


# =============================================================================================
# markdown
# =============================================================================================
def _fmt_row(r: Row, dense: float, dense_exact: Optional[float], ocr: bool) -> str:
    if r.error:
        cells = ["not measured"] * (3 if ocr else 2) + ["—", "—", "—"]
        cells[-1] = r.error.replace("|", "\\|")
        return f"| {r.label} | {r.setting} | " + " | ".join(cells) + " |"
    pct = f"{100 * r.accuracy / dense:.1f}%"
    said = "—" if r.said is None else f"{100 * r.said:.1f}% ({r.said_samples} {r.said_on})"
    size = f"{r.zeros:.3f}"
    if r.params_ratio is not None and r.params_ratio < 0.999:
        size += f" (params ×{r.params_ratio:.2f})"
    acc = f"{r.accuracy:.4f}"
    if ocr:
        return (f"| {r.label} | {r.setting} | {acc} | {r.exact:.4f} | {pct} | {said} | {size} | "
                f"{r.seconds:.1f} |")
    return f"| {r.label} | {r.setting} | {acc} | {pct} | {said} | {size} | {r.seconds:.1f} |"


def table(result: dict, ocr: bool) -> List[str]:
    dense, dense_exact = result["dense"], result["dense_exact"]
    if ocr:
        head = ["| method | setting | char acc | exact lines | % of dense (char) | report says | "
                "zeros | time s |", "|---|---|---|---|---|---|---|---|",
                f"| dense | — | {dense:.4f} | {dense_exact:.4f} | 100% | — | — | — |"]
    else:
        head = ["| method | setting | top-1 | % of dense | report says | zeros | time s |",
                "|---|---|---|---|---|---|---|",
                f"| dense | — | {dense:.4f} | 100% | — | — | — |"]
    return head + [_fmt_row(r, dense, dense_exact, ocr) for r in result["rows"]]


def targets(result: dict, model: str) -> List[str]:
    """Each target with its measured value, met or not (uniform and sensitivity separately)."""
    dense = result["dense"]
    rows = [r for r in result["rows"] if r.error is None]
    by = {(r.method, r.setting, r.allocate): r for r in rows}
    out = []

    def pct(r):
        return 100 * r.accuracy / dense

    def check(name, method, setting, floor):
        parts = []
        for alloc in ("uniform", "sensitivity"):
            r = by.get((method, setting, alloc))
            if r is None:
                continue
            ok = pct(r) >= floor
            parts.append(f"{alloc}: {pct(r):.1f}% {'met' if ok else 'NOT met'}")
        out.append(f"- {name} (≥ {floor:g}% of dense): " + ("; ".join(parts) or "not measured"))

    check("sparsegpt, unstructured 50%", "sparsegpt", "unstructured 50%", 98)
    check("sparsegpt, 2:4", "sparsegpt", "2:4 (50%)", 95)
    if model == "digits":
        for s in ("channel 30%",):
            check(f"magnitude + refit, {s}", "magnitude + refit", s, 95)
    # calibrated beats magnitude wherever magnitude loses more than one point
    settings = []
    for r in rows:
        if r.setting not in settings and r.method == "magnitude":
            settings.append(r.setting)
    for name, pick in (("default allocation with calibration data (sensitivity where the "
                        "sparsity is free, uniform for N:M)",
                        lambda crit, setting: by.get((crit, setting, "sensitivity"))
                        or by.get((crit, setting, "uniform"))),
                       ("uniform allocation", lambda crit, setting:
                        by.get((crit, setting, "uniform")))):
        fails, wins, n = [], 0, 0
        for setting in settings:
            mag = by.get(("magnitude", setting, "uniform"))
            if mag is None or dense - mag.accuracy <= 0.01:
                continue
            for crit in CALIBRATED:
                r = pick(crit, setting)
                if r is None:
                    continue
                n += 1
                if r.accuracy > mag.accuracy:
                    wins += 1
                else:
                    fails.append(f"{r.label} at {setting} ({r.accuracy:.4f} vs magnitude "
                                 f"{mag.accuracy:.4f})")
        line = (f"- each calibrated method beats magnitude (no data) where magnitude loses "
                f"> 1 point, {name}: {wins}/{n} comparisons")
        line += " — met" if not fails else " — NOT met: " + "; ".join(fails)
        out.append(line)
    return out


def code_version() -> str:
    """Which onnxprune was measured (read-only git calls)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "onnxprune"],
                               capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return "onnxprune (git not available)"
    dirty = [d[3:] for d in dirty if d.strip()]
    import hashlib

    digest = hashlib.sha1()
    for f in sorted((ROOT / "onnxprune").rglob("*.py")):
        digest.update(f.read_bytes())
    return (f"onnxprune at {head}" + (f" + uncommitted {', '.join(dirty)}" if dirty else "")
            + f" (sources sha1 {digest.hexdigest()[:10]})")


def machine_note(code_before: str, started_load, ended_load) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnx

    code_after = code_version()
    same = code_after.rsplit("(", 1)[-1] == code_before.rsplit("(", 1)[-1]
    code = code_before if code_after == code_before else (
        f"{code_before} at start, {code_after} at end "
        + ("(committed during the run; same sources)" if same
           else "(the sources CHANGED during the run)"))
    return (f"{code}; {os.cpu_count()} cores ({cpu}), shared with other jobs: load average "
            f"{started_load[0]:.1f} at start, {ended_load[0]:.1f} at end; Python "
            f"{platform.python_version()}, numpy {np.__version__}, onnx {onnx.__version__}, "
            f"onnxruntime {ort.__version__}")


ZEROS_NOTE = ("`zeros` = fraction of the pruned weights' elements that are zero or removed "
              "(weights left alone — excluded, or convs N:M cannot lay groups on — are not "
              "counted); `params ×r` = params left after channels are removed.")


def block(model: str, result: dict, command: str, machine: str) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {machine}. Times are one run each; "
             "read them as rough.", ""]
    if model == "digits":
        lines += [f"Test split: {result['n_test']} images (models/digits_test.npz); calibration: "
                  f"first {result['samples']} images of models/digits_calib.npz (training split)."
                  " " + ZEROS_NOTE, ""]
    else:
        b, r = result["dense_by_order"]["BGR"], result["dense_by_order"]["RGB"]
        lines += [f"Test: {result['n_test']} rendered lines (seed 1); calibration: "
                  f"{result['samples']} other rendered lines (seed 2), saved as an .npz keyed "
                  f"by the model's input name. Characters: {result['charset']}. " + ZEROS_NOTE, "",
                  f"Channel order: dense char accuracy BGR {b[0]:.4f} (exact {b[1]:.4f}), RGB "
                  f"{r[0]:.4f} (exact {r[1]:.4f}); the rows use **{result['order']}**.", ""]
    lines += table(result, model == "ppocr") + ["", "Targets:", ""] + targets(result, model)
    return "\n".join(lines)


def write_blocks(path: Path, blocks: Dict[str, str]) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Accuracy after pruning\n"
    for name, body in blocks.items():
        begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
        new = f"{begin}\n{body}\n{end}"
        if begin in text and end in text:
            i, j = text.index(begin), text.index(end) + len(end)
            text = text[:i] + new + text[j:]
        else:
            text = text.rstrip("\n") + f"\n\n## {name}\n\n{new}\n"
    path.write_text(text, encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("digits", "ppocr"), help="one model only")
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration samples (digits: taken from digits_calib.npz, default all "
                         "256; ppocr: rendered calibration lines, default 128)")
    ap.add_argument("--test-lines", type=int, default=300, help="ppocr test lines (300)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer settings; ppocr: 60 test lines, at most 32 calibration lines")
    ap.add_argument("--row-timeout", type=float, default=600.0,
                    help="seconds one prune call may take before it is stopped (600)")
    ap.add_argument("--permute", action="store_true",
                    help="ppocr: only calibrated 2:4, without and with --permute")
    ap.add_argument("--write", metavar="MD", help="update the generated blocks of this file")
    ap.add_argument("--json", metavar="FILE", help="also dump the results as JSON")
    args = ap.parse_args(argv)
    command = "python tools/eval_accuracy.py " + " ".join(argv if argv is not None
                                                           else sys.argv[1:])
    load0 = os.getloadavg()
    code0 = code_version()
    results = {}
    if args.only in (None, "digits"):
        results["digits"] = run_digits(args)
    if args.only in (None, "ppocr"):
        got = run_ppocr(args)
        if got is not None:
            results["ppocr"] = got
    machine = machine_note(code0, load0, os.getloadavg())
    blocks = {m: block(m, r, command, machine) for m, r in results.items()}
    for m, b in blocks.items():
        print(f"\n## {m}\n\n{b}")
    if args.write:
        write_blocks(Path(args.write), blocks)
        print(f"\nwrote {args.write}")
    if args.json:
        dump = {m: dict({k: v for k, v in r.items() if k != "rows"},
                        rows=[{k: v for k, v in vars(row).items()} for row in r["rows"]])
                for m, r in results.items()}
        Path(args.json).write_text(json.dumps(dump, indent=1, default=str))


if __name__ == "__main__":
    main()
