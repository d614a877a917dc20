"""onnxruntime sessions: for whole models, for parts of a graph, and running them.

This module owns every onnxruntime session onnxprune opens:

* :func:`open_session` for a path, proto or :class:`~onnxprune.model.io.ModelHandle` (external
  data read from its folder, rewritten external weights written out first, protos past
  protobuf's 2 GiB limit through a temporary file: :func:`model_source`);
* :func:`part_session` for a piece of a handle's main graph (some nodes, other inputs and
  outputs), :func:`exposing_session` for intermediate tensors with only the nodes they need,
  and :func:`exposed_batches`, which serves such tensors over a calibration set;
* :func:`run_model` / :func:`run_calibration`, which turn onnxruntime's failures into errors
  that say whose fault they are (:func:`inputs_error` for the user's inputs,
  :class:`InvalidOutputModel` for a model onnxprune made).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import InputDataError
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.inputs.signature import ModelOrPath, fmt_shape
from onnxprune.model.external import is_external
from onnxprune.model.index import names_read
from onnxprune.model.io import ModelHandle, every_tensor, save

_PROTO_LIMIT = 2_000_000_000  # protobuf cannot serialize 2 GiB: such models go through a file
_THREADS: contextvars.ContextVar = contextvars.ContextVar("onnxprune_threads", default=None)


@contextlib.contextmanager
def session_threads(threads: Optional[int]) -> Iterator[None]:
    """Sessions opened inside use ``threads`` intra-op threads (None: onnxruntime's default,
    one per physical core). onnxruntime's CPU kernels split work over outputs, never over a
    reduction, so results do not depend on it (tests/runtime check this bit for bit)."""
    token = _THREADS.set(threads)
    try:
        yield
    finally:
        _THREADS.reset(token)


class InvalidOutputModel(RuntimeError):
    """A model onnxprune produced fails ``onnx.checker`` or onnxruntime refuses to load it.

    Not an :class:`~onnxprune.errors.OnnxPruneError`: the input was valid, so an invalid output
    is a bug in onnxprune and keeps its trace. ``stage`` is ``"onnx.checker"`` or
    ``"onnxruntime"``.
    """

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage} rejected the model: {message}")
        self.stage = stage
        self.detail = message


def open_session(model: ModelOrPath):
    """An onnxruntime ``InferenceSession`` on the CPU provider (default graph optimizations).

    A handle's external data is read from its folder without copying. Raises
    :class:`InvalidOutputModel` when onnxruntime refuses the model.
    """
    with model_source(model, allow_external_folder=True) as (source, folder):
        # A temporary file made for a large proto may go once the session is built: onnxruntime
        # has read (or, on POSIX, mapped) it by then.
        return ort_session(source, folder)


def ort_session(source: Union[bytes, str], folder: Optional[str], spin: bool = True):
    """A CPU session on ``source`` (bytes or a path, from :func:`model_source`), quiet, with
    ``folder`` holding the external data of a proto given as bytes; :class:`InvalidOutputModel`
    when onnxruntime refuses it. ``spin=False``: its worker threads sleep between runs instead
    of spinning (many sessions timed side by side would otherwise steal each other's cores)."""
    import onnxruntime as ort  # deferred: importing onnxruntime costs ~0.3 s

    options = ort.SessionOptions()
    # Failures reach the user through our exceptions; onnxruntime's own log would repeat them
    # (and warn about unused initializers, which is noise here).
    options.log_severity_level = 4
    threads = _THREADS.get()
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if folder is not None:
        # Lets a proto given as bytes find its external data files.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         folder)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidOutputModel("onnxruntime", error_text(exc)) from exc


def run_model(model, inputs: Mapping[str, np.ndarray],
              output_names: Optional[Sequence[str]] = None,
              candidate: bool = False) -> Dict[str, np.ndarray]:
    """Run ``model`` (a path, proto, handle or an open ``InferenceSession``) on ``inputs``;
    returns the outputs by name, in graph output order.

    Pass an open session (from :func:`open_session`) to run many batches without reloading.
    When onnxruntime fails, who is at fault decides the error: for the user's model
    (``candidate=False``) the inputs do not suit it — :class:`InputDataError` naming the shapes
    fed and how to give others; for a model onnxprune made (``candidate=True``) it is our bug —
    :class:`InvalidOutputModel`.
    """
    is_session = hasattr(model, "run") and hasattr(model, "get_outputs")
    session = model if is_session else open_session(model)
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    feed = {k: np.asarray(v) for k, v in inputs.items()}
    try:
        results = session.run(names, feed)
    except Exception as exc:
        if candidate:
            raise InvalidOutputModel("onnxruntime", error_text(exc)) from exc
        raise inputs_error("inputs", feed, exc, "pass --input-shape NAME:DIMS with the sizes "
                           "the model was exported for, or real inputs with --inputs FILE.npz"
                           ) from None
    return dict(zip(names, results))


def inputs_error(what: str, feed: Mapping[str, np.ndarray], exc: BaseException,
                 advice: str) -> InputDataError:
    """The error for inputs onnxruntime could not run the user's model on: the shapes fed
    (``what`` names them), onnxruntime's first line, and ``advice``."""
    fed = ", ".join(f"{k}:{fmt_shape(np.shape(v)) if np.ndim(v) else 'scalar'} "
                    f"{np.asarray(v).dtype}"
                    for k, v in feed.items())
    return InputDataError(f"onnxruntime could not run the model on {what} {fed} "
                          f"({error_text(exc).splitlines()[0][:300]}); {advice}")


@contextlib.contextmanager
def model_source(model: ModelOrPath, allow_external_folder: bool
            ) -> Iterator[Tuple[Union[bytes, str], Optional[str]]]:
    """(bytes or a path for onnx/onnxruntime, folder holding external data or None)."""
    if isinstance(model, (str, os.PathLike)):
        yield str(model), None
        return
    handle = model if isinstance(model, ModelHandle) else ModelHandle(model=model)
    proto = handle.model
    external = any(is_external(t) for _, t in every_tensor(proto))
    rewritten = bool(handle.rewritten_external)
    if external and handle.base_dir is None:
        raise ValueError("the model has external data but no folder to read it from; "
                         "load it with onnxprune.model.io.load(path) or pass its path")
    in_memory = not rewritten and proto.ByteSize() < _PROTO_LIMIT
    if in_memory and (not external or allow_external_folder):
        yield proto.SerializeToString(), (str(handle.base_dir) if external else None)
        return
    with tempfile.TemporaryDirectory(prefix="onnxprune-validate-") as tmp:
        path = save(handle, Path(tmp) / "model.onnx")
        yield str(path), None


def error_text(exc: BaseException) -> str:
    """An exception's message for ours (at most 2000 characters; its type when empty)."""
    text = str(exc).strip()
    return text[:2000] if text else type(exc).__name__


def run_calibration(session, names: Sequence[str], feed: Mapping[str, np.ndarray],
                    batch: Optional[Mapping[str, np.ndarray]] = None) -> list:
    """``session.run(names, feed)``; when onnxruntime fails, an :class:`InputDataError` naming the
    calibration batch (``batch``, the graph inputs; ``feed`` when not given) and what to do."""
    try:
        return session.run(list(names), dict(feed))
    except Exception as exc:
        raise inputs_error("the calibration inputs", batch if batch is not None else feed, exc,
                           "give real inputs with --calibration, or the sizes the model was "
                           "exported for with --input-shape NAME:DIMS") from None


def fit_batch(handle: ModelHandle, data: CalibrationSet, batch_size: int) -> Optional[str]:
    """Check the model runs on ``data`` in batches of ``batch_size``; when it does not but runs
    one sample at a time (an export that leaves the batch axis dynamic on its inputs yet bakes
    batch 1 into a Reshape inside), set ``data.batch_limit = 1`` and return a note saying so.

    Runs the whole model once on the first batch (twice when that fails). Nothing to check when
    the inputs fix the batch, or for a single sample. When batch 1 fails as well, the inputs
    themselves are wrong: that error is raised (:class:`InputDataError`)."""
    if data.fixed_batch is not None or len(data) < 2 or batch_size < 2:
        return None
    session = open_session(handle)
    feed = next(data.batches(batch_size))
    try:
        session.run(None, feed)
        return None
    except Exception as exc:
        first = error_text(exc).splitlines()[0].split(" Status Message")[0]
        first = first.split("FAIL : ")[-1][:200]
    single = {k: (v[:1] if np.ndim(v) else v) for k, v in feed.items()}
    run_calibration(session, [o.name for o in session.get_outputs()], single)
    data.batch_limit = 1
    shown = min(batch_size, len(data))
    return (f"the model does not run on {shown} samples at once (onnxruntime: {first}) but runs "
            f"on one: its graph fixes batch 1 inside although its inputs leave it open; "
            f"calibration runs one sample at a time (slower)")


def exposed_batches(handle: ModelHandle, names: Sequence[str], data: CalibrationSet,
                    batch_size: int, types: Optional[Mapping[str, int]] = None
                    ) -> Iterator[Dict[str, np.ndarray]]:
    """``{name: array}`` per batch of ``data``: tensors a node produces come from one
    :func:`exposing_session` (``types``: their ONNX element types where known), the others
    (graph inputs) from the feed."""
    produced = {o for node in handle.model.graph.node for o in node.output if o}
    exposed = [n for n in names if n in produced]
    session = exposing_session(handle, exposed, types or {}) if exposed else None
    for feed in data.batches(batch_size):
        got = dict(zip(exposed, run_calibration(session, exposed, feed))) if session else {}
        got.update({n: feed[n] for n in names if n not in produced})
        yield got


def exposing_session(handle: ModelHandle, names: Sequence[str], types: Mapping[str, int]):
    """An onnxruntime session whose outputs are exactly ``names`` (intermediate tensors).

    Only the requested tensors are outputs, and the nodes they do not depend on are left out
    of the session (onnxruntime runs every node of a graph, needed or not): exposing an early
    layer's input costs only the part of the model before it.
    """
    outputs = [onnx.helper.make_tensor_value_info(name, types[name], None)
               if types.get(name) else onnx.ValueInfoProto(name=name) for name in names]
    graph = handle.model.graph
    needed = needed_nodes(graph, names)
    nodes = [graph.node[i] for i in needed] if len(needed) < len(graph.node) else None
    return part_session(handle, nodes, outputs)


def part_session(handle: ModelHandle, nodes: Optional[Sequence[onnx.NodeProto]],
                  outputs: Sequence, inputs: Optional[Sequence] = None):
    """A session of the handle's main graph cut down to ``nodes`` (None: all of them), with
    ``outputs`` (ValueInfoProtos) and, when given, ``inputs`` in place of the graph's (a piece
    fed at its cut points: the full graph's ``value_info`` is dropped with them).

    The session is built on a separate proto holding the piece's nodes and only the tensors
    they read (a segment or a trial does not serialize every weight of the model: SVTRv2's
    76 MB took 37 of 85 s), external tensors read from the handle's folder and rewritten ones
    from its spill. The handle's proto is never touched: passes hold its node and tensor
    objects (a weight stored in a ``Constant`` node is written through that node), and a
    piece built by swapping the graph's nodes for copies once sent every later write of
    such a weight to a detached copy — the pruned model came out unpruned."""
    if nodes is None:
        nodes = handle.model.graph.node
    part = _part_model(handle, nodes, outputs, inputs)
    return open_session(ModelHandle(model=part, base_dir=handle.base_dir))


def _part_model(handle: ModelHandle, nodes: Sequence[onnx.NodeProto], outputs: Sequence,
                inputs: Optional[Sequence]) -> onnx.ModelProto:
    """A model of ``nodes`` of the handle's main graph with the initializers they read
    (subgraph bodies' outer reads included), ``outputs``, and ``inputs`` (or the graph's
    inputs, less the initializers left out, and its ``value_info``). A tensor rewritten into
    the handle's spill is written into the part with its current values."""
    model = handle.model
    graph = model.graph
    read: set = set()
    for node in nodes:
        read |= names_read(node)
    part = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                           domain=model.domain, model_version=model.model_version)
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    g = part.graph
    g.name = graph.name
    g.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name in read]
    g.initializer.extend(kept)
    g.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in read)
    if handle.rewritten_external:
        # the copies lost their link to the spill (kept by object): give them their values
        pairs = list(zip(kept, g.initializer))
        pairs += [(a, b) for n, c in zip(nodes, g.node)
                  for a, b in zip(_node_tensors(n), _node_tensors(c))]
        for original, copy in pairs:
            if handle.is_rewritten(original):
                copy.CopyFrom(numpy_helper.from_array(handle.read(original), original.name))
    stored = {t.name for t in graph.initializer} | {t.values.name for t in
                                                     graph.sparse_initializer}
    if inputs is None:
        g.input.extend(vi for vi in graph.input if vi.name not in stored or vi.name in read)
        g.value_info.extend(graph.value_info)
    else:
        g.input.extend(inputs)
    g.output.extend(outputs)
    return part


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """The tensors a node holds (attributes, subgraph initializers and nodes), in a fixed
    order: a node and its copy yield their tensors pairwise."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            yield a.t
        elif a.type == onnx.AttributeProto.TENSORS:
            yield from a.tensors
        for body in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                     list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            yield from body.initializer
            for inner in body.node:
                yield from _node_tensors(inner)


def needed_nodes(graph: onnx.GraphProto, names: Sequence[str]) -> List[int]:
    """Indices (in graph order) of the nodes that ``names`` depend on. A node with subgraphs
    needs every name its bodies read (outer-scope values included)."""
    wanted = set(names)
    keep = []
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if not any(o in wanted for o in node.output):
            continue
        keep.append(i)
        wanted |= names_read(node)
    return keep[::-1]
