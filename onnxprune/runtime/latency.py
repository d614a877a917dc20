"""Per-layer onnxruntime CPU timing tables: what a channel width costs on this machine.

:func:`latency_table` answers "how long does each MAC-counted node (Conv, Gemm, MatMul, ...)
take at a given amount of work", for the model as the user will run it (the session threads
of :func:`~onnxprune.runtime.session.session_threads`, the input shapes given):

* the model at a few uniform widths (every prunable channel group keeping e.g. 100 %, 75 %,
  50 %, 25 % of its channels, rounded with ``round_to``/``min_channels`` exactly as pruning
  rounds them, so counts that hit fast kernels are the ones timed) — made by the caller's
  ``at_width`` (the channel layer's :func:`~onnxprune.channels.allocate.uniform_width`: this
  layer knows nothing of channels);
* every counted node of each resized model becomes a one-node model (its stored weights as
  initializers, its other inputs fed random values of their inferred shapes), and the whole
  resized model is timed too;
* all of those run interleaved, in sessions whose threads do not spin between runs (one run of each per round, after warm-up rounds), and each
  time is the median over the rounds: the noise of a shared machine hits all of them alike.

The table keeps, per node, its MACs and median seconds at each width; :meth:`LatencyTable.seconds`
interpolates piecewise-linearly in MACs (through ``(0, 0)``; made non-decreasing first, so noise
never makes less work cost more). The predicted time of an allocation is the sum of its nodes'
interpolated times plus the *rest* (the time not spent in those nodes), which
:meth:`LatencyTable.rest_model` splits into a fixed part and a part that scales with the
tabled nodes' time (fit on the whole model timed at each width).

Tables are cached as JSON under ``$ONNXPRUNE_CACHE`` (default ``~/.cache/onnxprune``), in
``latency/``, keyed by the model's content hash, the thread count, input shapes, rounding and
widths: a second run on the same model and machine opens no session.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model.index import node_key
from onnxprune.model.io import ModelHandle
from onnxprune.model.shapes import infer_shapes
from onnxprune.inputs.signature import resolve_input_shapes
from onnxprune.ops.registry import complete_types, counted_nodes
from onnxprune.runtime.session import (_THREADS, model_source, ort_session,
                                       session_threads)

WIDTHS = (1.0, 0.75, 0.5, 0.25)
TABLE_VERSION = 1


def cache_dir() -> Path:
    """Where latency tables are cached: ``$ONNXPRUNE_CACHE/latency`` or
    ``~/.cache/onnxprune/latency``."""
    root = os.environ.get("ONNXPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "onnxprune")
    return Path(root) / "latency"


def current_threads() -> Optional[int]:
    """The intra-op thread count sessions opened now use (None: onnxruntime's default)."""
    return _THREADS.get()


@dataclass
class LatencyTable:
    """Per node key: ``{"op_type", "macs": [...], "seconds": [...]}`` at each of ``widths``;
    ``model_seconds`` the whole model at each width."""

    key: str
    threads: Optional[int]
    input_shapes: Dict[str, List[int]]
    round_to: int
    widths: List[float]
    nodes: Dict[str, dict] = field(default_factory=dict)
    model_seconds: List[float] = field(default_factory=list)
    repeats: int = 0

    def seconds(self, key: str, macs: float) -> Optional[float]:
        """Interpolated seconds of node ``key`` doing ``macs`` MACs (None: not in the table)."""
        entry = self.nodes.get(key)
        if entry is None:
            return None
        xs = np.asarray(entry["macs"], dtype=np.float64)
        ys = np.asarray(entry["seconds"], dtype=np.float64)
        order = np.argsort(xs, kind="stable")
        xs, ys = np.concatenate([[0.0], xs[order]]), np.concatenate([[0.0], ys[order]])
        ys = np.maximum.accumulate(ys)
        if macs >= xs[-1]:  # beyond the dense width (not expected): proportional
            return float(ys[-1] * (macs / xs[-1])) if xs[-1] > 0 else float(ys[-1])
        return float(np.interp(macs, xs, ys))

    @property
    def dense_seconds(self) -> float:
        """The whole dense model's median time."""
        return float(self.model_seconds[0]) if self.model_seconds else float(
            sum(e["seconds"][0] for e in self.nodes.values()))

    @property
    def rest(self) -> float:
        """The dense model's time outside the tabled nodes (at least 0)."""
        return max(0.0, self.dense_seconds - sum(self.node_dense_seconds().values()))

    def rest_model(self) -> Tuple[float, float]:
        """The time outside the tabled nodes as ``fixed + scale x (the tabled nodes' time)``.

        Elementwise ops, activations, normalizations and resizes shrink with the channels just
        as the tabled nodes do (PP-OCRv4 det at 320x320: 62 % of its time is outside its Convs,
        and it falls from 72 to 19 ms between widths 1 and 0.25), so a fixed rest predicts far
        too little speed-up and an allocation removes far more than the target needs. Fit by
        least squares over the widths whose whole model was timed (scale >= 0, fixed >= 0);
        with fewer than two such widths: ``(rest, 0)``."""
        pts = [(sum(e["seconds"][i] for e in self.nodes.values()), m)
               for i, m in enumerate(self.model_seconds) if m > 0]
        if len(pts) < 2:
            return self.rest, 0.0
        x = np.array([p[0] for p in pts], dtype=np.float64)
        y = np.array([p[1] - p[0] for p in pts], dtype=np.float64)
        if np.ptp(x) <= 0:
            return self.rest, 0.0
        scale, fixed = np.polyfit(x, y, 1)
        if scale <= 0:
            return max(0.0, float(y.mean())), 0.0
        if fixed < 0:  # through the origin
            return 0.0, max(0.0, float((x @ y) / (x @ x)))
        return float(fixed), float(scale)

    def node_dense_seconds(self) -> Dict[str, float]:
        return {k: float(self.seconds(k, max(e["macs"])) or 0.0) for k, e in self.nodes.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "LatencyTable":
        return cls(**{k: d[k] for k in ("key", "threads", "input_shapes", "round_to", "widths",
                                         "nodes", "model_seconds", "repeats")})


def table_key(handle: ModelHandle, threads: Optional[int],
              input_shapes: Mapping[str, Sequence[int]], round_to: int, min_channels: int,
              widths: Sequence[float]) -> str:
    """sha256 over the model's content (graph and weights) and what the timings depend on."""
    h = hashlib.sha256()
    with model_source(handle, allow_external_folder=False) as (source, _):
        if isinstance(source, (bytes, bytearray)):
            h.update(source)
        else:
            with open(source, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    meta = {"v": TABLE_VERSION, "threads": threads, "round_to": round_to,
            "min_channels": min_channels, "widths": list(widths),
            "inputs": {k: list(v) for k, v in sorted(input_shapes.items())}}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def latency_table(handle: ModelHandle, at_width: Callable[[float], ModelHandle],
                  input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                  round_to: int = 1, min_channels: int = 1, widths: Sequence[float] = WIDTHS,
                  threads: Optional[int] = None, repeats: int = 15, warmup: int = 3,
                  cache: bool = True) -> Tuple[LatencyTable, bool]:
    """The timing table of ``handle``'s model (see the module doc) and whether it came from the
    cache. ``at_width(w)`` makes the model resized to width ``w`` (the channel layer's
    :func:`~onnxprune.channels.allocate.uniform_width`; called only when measuring);
    ``round_to``/``min_channels`` are the rounding it applies (part of the cache key).
    ``threads`` None: the threads sessions get now."""
    threads = current_threads() if threads is None else threads
    resolved = {k: list(v) for k, v in
                resolve_input_shapes(handle.model, input_shapes, require_all=False).items()}
    key = table_key(handle, threads, resolved, round_to, min_channels, widths)
    path = cache_dir() / f"{key}.json"
    if cache and path.is_file():
        try:
            return LatencyTable.from_dict(json.loads(path.read_text())), True
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again
    variants = [(float(w), handle if w >= 1.0 else at_width(float(w))) for w in widths]
    table = measure_table(variants, resolved, threads, repeats, warmup)
    table.round_to = round_to
    table.key = key
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table.to_dict()))
            os.replace(tmp, path)
        except OSError:
            pass  # an unwritable cache costs a measurement next time, nothing else
    return table, False


def node_models(handle: ModelHandle, input_shapes: Mapping[str, Sequence[int]]
                ) -> Dict[str, Tuple[str, int, onnx.ModelProto, Dict[str, np.ndarray]]]:
    """Per counted node key: (op type, MACs, a one-node model, its feed)."""
    proto = handle.model
    inferred = infer_shapes(handle, input_shapes, keep_value_info=True, complete=complete_types)
    shapes, types = inferred.static(), inferred.types
    stored = handle.index.stored
    rng = np.random.default_rng(0)
    out = {}
    for node, macs in counted_nodes(proto.graph, shapes):
        inits, inputs, feed = [], [], {}
        ok = True
        for name in node.input:
            if not name or name in feed or any(i.name == name for i in inits):
                continue
            if name in stored:
                inits.append(onnx.numpy_helper.from_array(handle.read(stored[name]), name))
            elif name in shapes and types.get(name):
                dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name])
                inputs.append(onnx.helper.make_tensor_value_info(name, types[name],
                                                                 list(shapes[name])))
                feed[name] = (rng.standard_normal(shapes[name]) * 0.1).astype(dtype)
            else:
                ok = False
        if not ok or not all(types.get(o) for o in node.output if o):
            continue
        outputs = [onnx.helper.make_tensor_value_info(o, types[o], None) for o in node.output if o]
        g = onnx.helper.make_graph([copy.deepcopy(node)], "node", inputs, outputs, inits)
        m = onnx.helper.make_model(g, opset_imports=list(proto.opset_import))
        m.ir_version = proto.ir_version
        out[node_key(node)] = (node.op_type, int(macs), m, feed)
    return out


def model_feed(handle: ModelHandle, input_shapes: Mapping[str, Sequence[int]]
               ) -> Dict[str, np.ndarray]:
    """Random inputs of the given shapes for the model's runtime inputs."""
    from onnxprune.inputs.signature import input_signature

    rng = np.random.default_rng(0)
    feed = {}
    for spec in input_signature(handle.model):
        if spec.name not in input_shapes:
            continue
        dtype = spec.dtype
        shape = input_shapes[spec.name]
        if np.issubdtype(np.dtype(dtype), np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype=dtype)
    return feed


def time_sessions(runs: Sequence[Tuple], repeats: int = 15, warmup: int = 3) -> List[float]:
    """Median seconds of each ``(session, feed)``, run interleaved: ``warmup`` rounds, then
    ``repeats`` rounds of one run each, the order rotated every round."""
    n = len(runs)
    samples: List[List[float]] = [[] for _ in range(n)]
    for r in range(warmup + repeats):
        shift = r % max(n, 1)
        for i in list(range(shift, n)) + list(range(shift)):
            session, feed = runs[i]
            t0 = time.perf_counter()
            session.run(None, feed)
            dt = time.perf_counter() - t0
            if r >= warmup:
                samples[i].append(dt)
    return [float(statistics.median(s)) if s else 0.0 for s in samples]


def measure_table(variants: Sequence[Tuple[float, ModelHandle]],
                  input_shapes: Mapping[str, Sequence[int]], threads: Optional[int] = None,
                  repeats: int = 15, warmup: int = 3) -> LatencyTable:
    """Time every counted node and the whole model of each ``(width, model at that width)``,
    the dense model first (see the module doc)."""
    widths = [float(w) for w, _ in variants]
    table = LatencyTable("", threads, {k: list(v) for k, v in input_shapes.items()}, 1,
                         widths, repeats=repeats)
    runs, slots = [], []  # slots: ("node", key, width index) or ("model", None, width index)
    per_width = []
    with session_threads(threads):
        for wi, (_, twin) in enumerate(variants):
            parts = node_models(twin, input_shapes)
            per_width.append(parts)
            runs.append((_quiet_session(twin), model_feed(twin, input_shapes)))
            slots.append(("model", None, wi))
            for key, (_, _, m, feed) in parts.items():
                runs.append((ort_session(m.SerializeToString(), None, spin=False), feed))
                slots.append(("node", key, wi))
        seconds = time_sessions(runs, repeats, warmup)
    table.model_seconds = [0.0] * len(widths)
    keys = [k for k in per_width[0] if all(k in p for p in per_width)]
    for k in keys:
        table.nodes[k] = {"op_type": per_width[0][k][0],
                          "macs": [int(p[k][1]) for p in per_width],
                          "seconds": [0.0] * len(widths)}
    for (kind, key, wi), s in zip(slots, seconds):
        if kind == "model":
            table.model_seconds[wi] = s
        elif key in table.nodes:
            table.nodes[key]["seconds"][wi] = s
    return table


def _quiet_session(handle: ModelHandle):
    """A session whose threads do not spin between runs (see :func:`ort_session`)."""
    with model_source(handle, allow_external_folder=True) as (source, folder):
        return ort_session(source, folder, spin=False)


def predict_seconds(table: LatencyTable, nodes, kept: Mapping[int, float]) -> float:
    """Predicted model time with group ``g`` keeping the fraction ``kept[g]`` (``nodes``: the
    :class:`~onnxprune.channels.allocate.NodeCost` list): the rest plus every tabled node's
    interpolated time, the rest as :meth:`LatencyTable.rest_model` scales it; a node the table
    lacks keeps its dense share inside the rest."""
    fixed, scale = table.rest_model()
    total = 0.0
    for n in nodes:
        s = table.seconds(n.key, n.macs * n.fraction(kept))
        if s is not None:
            total += s
    return fixed + (1.0 + scale) * total


def measure_speedup(dense: ModelHandle, pruned: ModelHandle,
                    input_shapes: Mapping[str, Sequence[int]], threads: Optional[int] = None,
                    repeats: int = 30, warmup: int = 5) -> Tuple[float, float, float]:
    """(dense seconds, pruned seconds, speed-up) measured interleaved on random inputs."""
    threads = current_threads() if threads is None else threads
    with session_threads(threads):
        runs = [(_quiet_session(h), model_feed(h, input_shapes)) for h in (dense, pruned)]
        a, b = time_sessions(runs, repeats, warmup)
    return a, b, (a / b if b > 0 else float("inf"))

