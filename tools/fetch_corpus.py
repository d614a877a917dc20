"""Build the cache of real-architecture ONNX models used by the corpus tests and benchmarks (no torch).

    python tools/fetch_corpus.py                     # everything, into $ONNXPRUNE_CORPUS or ~/.cache/onnxprune/corpus
    python tools/fetch_corpus.py --only light        # only the onnx "light" models
    python tools/fetch_corpus.py --only ppocr --dest /tmp/corpus
    python tools/fetch_corpus.py --ops               # also print op histograms and where weights live

Two collections:

``light/``  The architecture-only models shipped inside the installed ``onnx`` package
            (``onnx/backend/test/data/light/light_*.onnx``: AlexNet, DenseNet-121, Inception v1/v2, ResNet-50,
            ShuffleNet, SqueezeNet, VGG-19, ZFNet-512). Their big weights are ``ConstantOfShape`` nodes filled
            with 0.02; each one becomes an initializer of seeded random values chosen by the weight's role
            (He-normal conv/Gemm weights, BN scale ~1, small biases), seeded from the tensor name.
            BatchNormalization mean/var are then set from one seeded random input, layer by layer, so
            activations stay near unit scale instead of doubling at every residual block. The few real
            initializers the files ship (small biases) are kept. The graphs are written with IR version 4 and
            initializers are no longer listed as graph inputs (the originals are IR 3, where they had to be).
            Files keep the package's names: ``light/light_resnet50.onnx`` etc.

``ppocr/``  PP-OCRv4 det and rec and the mobile v2.0 direction classifier, as shipped in the
            ``rapidocr-onnxruntime`` wheel (``pip download --no-deps``, then unzipped). These are paddle2onnx
            exports: every weight is a ``Constant`` node, none is an initializer. The rec model carries its
            character dictionary in the model metadata (key ``character``, 6623 entries; the wheel ships no
            ppocr_keys*.txt); it is written out as ``ch_PP-OCRv4_rec_keys.txt``, one entry a line. The rec
            output has 6625 classes: index 0 is the CTC blank, 1..6623 the entries in file order, and 6624
            a space (rapidocr appends " "). The wheel's ``config.yaml`` (pre-processing: det mean/std 0.5,
            rec input 3x48x320, cls input 3x48x192 with labels 0/180) is kept as ``rapidocr_config.yaml``.

Every model is checked with ``onnx.checker`` (full check) and run once in onnxruntime on a seeded random input
before it is kept; failures are reported, not hidden. The run is idempotent: ``manifest.json`` records what
was built from which source, and entries whose source and output are unchanged are skipped (``--force``
rebuilds).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

TOOL_VERSION = 1  # bump when the way models are built changes: cached entries are rebuilt
RAPIDOCR_VERSION = "1.4.4"
RAPIDOCR_MODELS = {  # file in the wheel -> (cache name, input shape used for the check run)
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 128, 128)),
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": (
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        (1, 3, 48, 192),
    ),
}
REC_KEYS_NAME = "ch_PP-OCRv4_rec_keys.txt"
SHAPE_ONLY_OPS = {"Unsqueeze", "Reshape", "Squeeze", "Identity", "Flatten", "Transpose", "Cast"}


def default_corpus_dir() -> Path:
    env = os.environ.get("ONNXPRUNE_CORPUS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxprune" / "corpus"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def seeded_rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@dataclass
class Entry:
    """One cached model: where it came from, what it is, and whether it passed the checks."""

    path: str  # relative to the corpus root
    source: str
    source_sha256: str
    sha256: str = ""
    size: int = 0
    nodes: int = 0
    params: int = 0
    ok: bool = False
    problem: str = ""
    notes: list[str] = field(default_factory=list)
    tool_version: int = TOOL_VERSION


# --------------------------------------------------------------------------------------------------
# light/: materialize ConstantOfShape weights
# --------------------------------------------------------------------------------------------------


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = collections.defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                users[name].append((node, i))
    return users


def _final_use(name: str, users) -> tuple[str, int, onnx.NodeProto | None]:
    """The first consumer that is not a shape-only op, following Unsqueeze/Reshape/... chains."""
    seen = set()
    while name not in seen:
        seen.add(name)
        uses = users.get(name, [])
        if not uses:
            return "", -1, None
        node, idx = uses[0]
        if node.op_type in SHAPE_ONLY_OPS and idx == 0:
            name = node.output[0]
            continue
        return node.op_type, idx, node
    return "", -1, None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fan_in(shape: tuple[int, ...], op: str, idx: int, node: onnx.NodeProto | None) -> int:
    if op == "Gemm" and idx == 1 and len(shape) == 2:
        return shape[1] if _attr(node, "transB", 0) else shape[0]
    if op == "MatMul" and len(shape) >= 2:
        return shape[-2]
    if op == "ConvTranspose" and len(shape) >= 2:
        return shape[0] * int(np.prod(shape[2:])) // max(1, _attr(node, "group", 1))
    # Conv [Cout, Cin/g, kh, kw], and a Gemm weight reached through a Reshape from caffe2's [out, in, 1, 1]
    return max(1, int(np.prod(shape[1:]))) if len(shape) > 1 else max(1, shape[0] if shape else 1)


def random_weight(key: str, shape: tuple[int, ...], op: str, idx: int, node: onnx.NodeProto | None):
    """Seeded values that fit the weight's role, so activations stay finite and roughly unit scale."""
    rng = seeded_rng(key)
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and idx == 1:
        role, std = "weight", float(np.sqrt(2.0 / _fan_in(shape, op, idx, node)))
        values = rng.standard_normal(shape) * std
    elif op == "BatchNormalization" and idx == 1 or op == "Mul":
        role, values = "scale", rng.uniform(0.8, 1.2, shape)
    elif op == "BatchNormalization" and idx == 3:
        role, values = "mean", rng.standard_normal(shape) * 0.1
    elif op == "BatchNormalization" and idx == 4:
        role, values = "var", rng.uniform(0.5, 1.5, shape)
    elif op in ("Conv", "ConvTranspose", "Gemm", "BatchNormalization", "Add", "Sub"):
        role, values = "bias", rng.standard_normal(shape) * 0.02
    else:
        role, values = f"unknown ({op or 'no consumer'} input {idx})", rng.standard_normal(shape) * 0.02
    return role, values.astype(np.float32)


def materialize_light(model: onnx.ModelProto, stem: str) -> tuple[onnx.ModelProto, list[str]]:
    """Replace every ConstantOfShape(shape initializer) weight by a seeded random initializer."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    notes: list[str] = []
    roles: collections.Counter[str] = collections.Counter()
    new_inits: list[onnx.TensorProto] = []
    dropped: set[int] = set()
    for k, node in enumerate(graph.node):
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        fill = numpy_helper.to_array(_attr(node, "value", numpy_helper.from_array(np.zeros(1, np.float32))))
        if fill.dtype != np.float32:
            notes.append(f"kept ConstantOfShape {node.output[0]} (dtype {fill.dtype})")
            continue
        op, idx, user = _final_use(node.output[0], users)
        role, values = random_weight(f"{stem}/{node.output[0]}", shape, op, idx, user)
        roles[role.split(" ")[0]] += 1
        if role.startswith("unknown"):
            notes.append(f"{node.output[0]}: {role}, filled N(0, 0.02)")
        new_inits.append(numpy_helper.from_array(values, node.output[0]))
        dropped.add(k)
    kept_nodes = [n for k, n in enumerate(graph.node) if k not in dropped]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(new_inits)

    # Dead tensors: shape initializers no node reads any more (and any other unread initializer).
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    dead = len(graph.initializer) - len(live)
    del graph.initializer[:]
    graph.initializer.extend(live)

    # IR >= 4: initializers need not be graph inputs. Keep only the real inputs.
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names and i.name in used]
    del graph.input[:]
    graph.input.extend(real_inputs)
    model.ir_version = max(model.ir_version, 4)
    model.producer_name = "onnxprune fetch_corpus (from onnx light model)"
    notes.insert(
        0, f"{len(new_inits)} ConstantOfShape weights materialized ({dict(roles)}), {dead} dead initializers removed"
    )
    return model, notes


def calibrate_batchnorm(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Set each BatchNormalization's mean/var to its input's per-channel statistics on `feeds`.

    Done in order of BN depth (how many BNs lie upstream), one onnxruntime run per depth, with the BN
    statistics fed as graph inputs so the session is built once.
    """
    graph = model.graph
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        return 0
    inits = {t.name: t for t in graph.initializer}
    depth: dict[str, int] = {}  # tensor -> number of BNs on the deepest path from the inputs
    levels: dict[int, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:  # nodes are topologically sorted (the checker enforces it)
        d = max((depth.get(x, 0) for x in node.input if x), default=0)
        if node.op_type == "BatchNormalization":
            levels[d].append(node)
            d += 1
        for out in node.output:
            depth[out] = d

    stat_names = {name for bn in bns for name in bn.input[3:5]}
    if not stat_names <= set(inits):
        raise ValueError("BatchNormalization statistics are not all initializers")
    stats = {name: numpy_helper.to_array(inits[name]).copy() for name in stat_names}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    kept = [t for t in probe.graph.initializer if t.name not in stat_names]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    for name, value in stats.items():
        probe.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    probe.graph.output.extend(helper.make_empty_tensor_value_info(bn.input[0]) for bn in bns)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep BN unfused
    sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for level in sorted(levels):
        wanted = [bn.input[0] for bn in levels[level]]
        values = sess.run(wanted, {**feeds, **stats})
        for bn, x in zip(levels[level], values):
            axes = tuple(i for i in range(x.ndim) if i != 1)
            stats[bn.input[3]] = x.mean(axis=axes).astype(np.float32)
            stats[bn.input[4]] = x.var(axis=axes).astype(np.float32) + np.float32(1e-3)
    for name, value in stats.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    return len(bns)


def random_feeds(model: onnx.ModelProto, key: str, shapes: dict[str, tuple[int, ...]] | None = None):
    inits = {t.name for t in model.graph.initializer}
    rng = seeded_rng(key)
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if shapes and inp.name in shapes:
            shape = shapes[inp.name]
        else:
            shape = tuple(d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim)
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def check_and_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str:
    """'' when the model passes the full checker and runs to finite outputs, else the reason."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # report, don't hide: the caller records it in the manifest
        return f"checker: {str(exc).splitlines()[0][:200]}"
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(None, feeds)
    except Exception as exc:
        return f"onnxruntime: {str(exc).splitlines()[0][:200]}"
    for meta, out in zip(sess.get_outputs(), outs):
        if not np.all(np.isfinite(out)):
            return f"onnxruntime: non-finite values in output {meta.name}"
    return ""


def _output_summary(model: onnx.ModelProto, feeds) -> str:
    """Scale of the pre-softmax logits (or the outputs), to show the random weights keep activations sane."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    softmax_in = [n.input[0] for n in probe.graph.node if n.op_type == "Softmax"]
    if softmax_in:
        probe.graph.output.append(helper.make_empty_tensor_value_info(softmax_in[-1]))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)[-1]
    label = "logits" if softmax_in else "output"
    return f"{label} std {float(out.std()):.3g}, max |x| {float(np.abs(out).max()):.3g}"


def build_light(dest: Path, manifest: dict[str, dict], force: bool) -> list[Entry]:
    light_dir = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    sources = sorted(light_dir.glob("light_*.onnx"))
    if not sources:
        raise SystemExit(f"no light_*.onnx models in {light_dir} (onnx {onnx.__version__})")
    out_dir = dest / "light"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for src in sources:
        stem = src.stem.removeprefix("light_")  # seeds use the bare name
        rel = f"light/{src.name}"  # the file keeps the onnx package's name, e.g. light/light_resnet50.onnx
        src_sha = sha256_file(src)
        cached = manifest.get(rel)
        if not force and _is_fresh(dest, rel, cached, src_sha):
            entries.append(Entry(**cached))
            print(f"  cached  {rel}")
            continue
        start = time.perf_counter()
        entry = Entry(path=rel, source=f"onnx {onnx.__version__}: {src.name}", source_sha256=src_sha)
        model = onnx.load(str(src))
        model, entry.notes = materialize_light(model, stem)
        feeds = random_feeds(model, f"{stem}/input")
        calibrated = calibrate_batchnorm(model, feeds)
        if calibrated:
            entry.notes.append(f"{calibrated} BatchNormalization mean/var set from one random input")
        entry.problem = check_and_run(model, feeds)
        entry.ok = not entry.problem
        if entry.ok:
            entry.notes.append(_output_summary(model, feeds))
        _finish(dest, rel, model, entry)
        entries.append(entry)
        status = "ok" if entry.ok else f"FAILED: {entry.problem}"
        print(f"  built   {rel}  {status}  ({time.perf_counter() - start:.1f} s)")
    return entries


# --------------------------------------------------------------------------------------------------
# ppocr/: PP-OCR models from the rapidocr-onnxruntime wheel
# --------------------------------------------------------------------------------------------------


def build_ppocr(dest: Path, manifest: dict[str, dict], force: bool) -> list[Entry]:
    out_dir = dest / "ppocr"
    rels = [f"ppocr/{name}" for name, _ in RAPIDOCR_MODELS.values()]
    source = f"rapidocr-onnxruntime {RAPIDOCR_VERSION} wheel"
    fresh = all(
        (manifest.get(rel) or {}).get("source") == source and _is_fresh(dest, rel, manifest.get(rel), None)
        for rel in rels
    )
    if not force and fresh and (out_dir / REC_KEYS_NAME).is_file():
        print("  cached  ppocr/ (3 models)")
        return [Entry(**manifest[rel]) for rel in rels]
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-rapidocr-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        subprocess.run(cmd + [f"rapidocr-onnxruntime=={RAPIDOCR_VERSION}"], check=True)
        wheel = next(Path(tmp).glob("rapidocr_onnxruntime-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            keys_files = sorted(n for n in names if Path(n).name.startswith("ppocr_keys") and n.endswith(".txt"))
            if "rapidocr_onnxruntime/config.yaml" in names:
                write_atomic(out_dir / "rapidocr_config.yaml", zf.read("rapidocr_onnxruntime/config.yaml"))
            for member, (name, shape) in RAPIDOCR_MODELS.items():
                rel = f"ppocr/{name}"
                if member not in names:
                    entries.append(Entry(path=rel, source=source, source_sha256="", problem=f"{member} not in wheel"))
                    continue
                data = zf.read(member)
                entry = Entry(path=rel, source=source, source_sha256=hashlib.sha256(data).hexdigest())
                model = onnx.load_from_string(data)
                feeds = random_feeds(model, f"ppocr/{name}", {model.graph.input[0].name: shape})
                entry.problem = check_and_run(model, feeds)
                entry.ok = not entry.problem
                entry.notes.append(f"checked on input {list(shape)}")
                if "rec" in name:
                    entry.notes.append(_write_rec_keys(model, out_dir, zf, keys_files))
                write_atomic(out_dir / name, data)  # byte-for-byte as shipped
                _record(dest, rel, model, entry)
                entries.append(entry)
                print(f"  built   {rel}  {'ok' if entry.ok else 'FAILED: ' + entry.problem}")
    return entries


def _write_rec_keys(model: onnx.ModelProto, out_dir: Path, zf: zipfile.ZipFile, keys_files: list[str]) -> str:
    meta = {p.key: p.value for p in model.metadata_props}
    if keys_files:
        text = zf.read(keys_files[0]).decode("utf-8")
        origin = f"wheel file {keys_files[0]}"
    elif "character" in meta:
        text = meta["character"]
        origin = "rec model metadata_props['character'] (the wheel ships no ppocr_keys*.txt)"
    else:
        return "no character dictionary found in the wheel or the model metadata"
    entries = text.splitlines()  # what rapidocr does with the metadata value
    write_atomic(out_dir / REC_KEYS_NAME, ("\n".join(entries) + "\n").encode("utf-8"))
    count = len(entries)
    return f"{REC_KEYS_NAME}: {count} entries from {origin}"


# --------------------------------------------------------------------------------------------------
# manifest, reporting
# --------------------------------------------------------------------------------------------------


def _is_fresh(dest: Path, rel: str, cached: dict | None, src_sha: str | None) -> bool:
    if not cached or cached.get("tool_version") != TOOL_VERSION or not cached.get("ok"):
        return False
    if src_sha is not None and cached.get("source_sha256") != src_sha:
        return False
    path = dest / rel
    return path.is_file() and path.stat().st_size == cached.get("size")


def _record(dest: Path, rel: str, model: onnx.ModelProto, entry: Entry) -> None:
    path = dest / rel
    entry.size = path.stat().st_size
    entry.sha256 = sha256_file(path)
    entry.nodes = len(model.graph.node)
    entry.params = _param_count(model)


def _finish(dest: Path, rel: str, model: onnx.ModelProto, entry: Entry) -> None:
    """Write a model that passed its checks; a failed one is only recorded, so tests never pick it up."""
    path = dest / rel
    if not entry.ok:
        path.unlink(missing_ok=True)
        entry.nodes, entry.params = len(model.graph.node), _param_count(model)
        return
    write_atomic(path, model.SerializeToString())
    _record(dest, rel, model, entry)


def _param_count(model: onnx.ModelProto) -> int:
    count = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    count += int(np.prod(a.t.dims))
    return count


def load_manifest(dest: Path) -> dict[str, dict]:
    path = dest / "manifest.json"
    if not path.is_file():
        return {}
    try:
        return {e["path"]: e for e in json.loads(path.read_text())["models"]}
    except (ValueError, KeyError, TypeError):
        return {}


def save_manifest(dest: Path, manifest: dict[str, dict]) -> None:
    body = {"tool_version": TOOL_VERSION, "models": [manifest[k] for k in sorted(manifest)]}
    write_atomic(dest / "manifest.json", (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode())


def weight_locations(model: onnx.ModelProto) -> str:
    """Where the weights of the Conv/ConvTranspose/Gemm/MatMul nodes come from."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    where: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in inits:
            where["initializer"] += 1
        elif name in producer and producer[name].op_type == "Constant":
            where["Constant node"] += 1
        elif name in producer:
            where[f"computed ({producer[name].op_type})"] += 1
        else:
            where["graph input"] += 1
    return ", ".join(f"{k} {v}" for k, v in where.most_common())


def print_table(dest: Path, entries: list[Entry], show_ops: bool) -> None:
    print(f"\ncorpus: {dest}")
    print(f"{'model':44s} {'MiB':>8s} {'nodes':>6s} {'params':>11s}  status")
    total = 0
    for e in entries:
        total += e.size
        status = "ok" if e.ok else f"FAILED {e.problem}"
        print(f"{e.path:44s} {e.size / 2**20:8.2f} {e.nodes:6d} {e.params:11,d}  {status}")
        for note in e.notes:
            print(f"{'':46s}{note}")
    print(f"{'total':44s} {total / 2**20:8.2f}")
    if show_ops:
        for e in entries:
            model = onnx.load(str(dest / e.path))
            ops = collections.Counter(n.op_type for n in model.graph.node)
            print(f"\n{e.path}: opset {[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]}, "
                  f"{len(model.graph.initializer)} initializers, "
                  f"{sum(1 for n in model.graph.node if n.op_type == 'Constant')} Constant nodes")  # fmt: skip
            print("    ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
            print("    weights of Conv/ConvTranspose/Gemm/MatMul: " + weight_locations(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest", type=Path, default=None, help="cache folder (default: $ONNXPRUNE_CORPUS or ~/.cache/onnxprune/corpus)"
    )
    parser.add_argument("--only", choices=["light", "ppocr"], help="build one collection")
    parser.add_argument("--force", action="store_true", help="rebuild entries even when cached")
    parser.add_argument("--ops", action="store_true", help="print op histograms and where weights live")
    args = parser.parse_args(argv)
    dest = (args.dest or default_corpus_dir()).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(dest)
    entries: list[Entry] = []
    if args.only in (None, "light"):
        print("light/ (onnx package, weights materialized)")
        light = build_light(dest, manifest, args.force)
        entries += light
        manifest = {k: v for k, v in manifest.items() if not k.startswith("light/")}  # forget stale entries
        manifest.update({e.path: asdict(e) for e in light})
        save_manifest(dest, manifest)
    if args.only in (None, "ppocr"):
        print(f"ppocr/ (rapidocr-onnxruntime {RAPIDOCR_VERSION})")
        ppocr = build_ppocr(dest, manifest, args.force)
        entries += ppocr
        manifest = {k: v for k, v in manifest.items() if not k.startswith("ppocr/")}
        manifest.update({e.path: asdict(e) for e in ppocr})
        save_manifest(dest, manifest)
    print_table(dest, entries, args.ops)
    failed = [e.path for e in entries if not e.ok]
    if failed:
        print(f"\n{len(failed)} model(s) failed their checks: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
