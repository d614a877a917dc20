"""Loading and saving models: paths or protos in, atomic files out, external data kept external.

A model is held as a :class:`ModelHandle`: the ``ModelProto`` with external tensors *not* pulled
into protobuf (so a 10 GB model costs only its graph in memory), the folder its external data is
read from, and the external tensors onnxprune has rewritten. Weight arrays are read one at a time
on demand with :meth:`ModelHandle.read` and written back with :meth:`ModelHandle.write`; a
rewritten external tensor goes to a spill file on disk (``tempfile``'s folder, ``$TMPDIR``), not
to memory, so pruning a model costs about one weight of memory whatever its size. The spill is an
unnamed temporary file: freed by :meth:`ModelHandle.close`, when the handle is garbage-collected,
or when the process ends however it ends (nothing is left behind even after a kill).

Saving never overwrites the input, never leaves a partial file: data and model go to temporary
files beside the target and are renamed into place only when complete. External tensors are
copied to the output's data file in chunks, from the spill or straight from the input's data
file (byte for byte when untouched), never as whole arrays.

This module owns the handle, loading with its integrity checks, weightless copies for the
checker and shape inference, and saving. The bytes of external tensors (reading, the spill file,
chunked copies, pointing a tensor at a data file) are :mod:`onnxprune.model.external`'s.

One module (about 625 lines) on purpose: ``load`` and ``save`` are the two halves of one
contract on the handle's external-data state (save repoints tensors at the output's data file
and restores them; load's integrity checks are what save relies on), and splitting them would
put that state's invariants in two places.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from onnxprune.model.output import check_output, commit, default_output, temp_beside
from onnxprune.errors import ModelLoadError, OutputError
from onnxprune.model import external as ext
from onnxprune.model.external import (ALIGN, SpillStore, copy_range, external_span, external_state,
                                      is_external, point_external, restore_external, tensor_dtype,
                                      write_all)
from onnxprune.model.index import GraphIndex, subgraphs

ModelLike = Union[str, os.PathLike, onnx.ModelProto, "ModelHandle"]
_PROTO_LIMIT = 2_000_000_000  # protobuf cannot serialize 2 GiB; past this, weights go external
_KEEP_VALUES = 4096  # tensors up to this many elements keep their values in weightless copies


@dataclass
class ModelHandle:
    """A model being pruned: the proto, where its external data lives, and rewritten tensors.

    Usable as a context manager: leaving it deletes the spill of rewritten external tensors
    (:meth:`close`); save the model first.
    """

    model: onnx.ModelProto
    path: Optional[Path] = None  # the file it came from, None for an in-memory proto
    base_dir: Optional[Path] = None  # folder that external-data locations are relative to
    _external_updates: SpillStore = field(default_factory=SpillStore)
    _index: Optional[GraphIndex] = field(default=None, repr=False, compare=False)

    # -- structure -------------------------------------------------------------------------
    @property
    def index(self) -> GraphIndex:
        """The graph index of the model as it is now (see :mod:`onnxprune.model.index`):
        built on first use, rebuilt after :meth:`graph_changed` or when the main graph's node,
        initializer, input or output count moved."""
        if self._index is None or not self._index.current(self.model):
            self._index = GraphIndex(self.model)
        return self._index

    def graph_changed(self) -> None:
        """Drop the cached index: call after editing nodes, their inputs/outputs, or the
        graph's initializers (writing tensor values through :meth:`write` needs no call)."""
        self._index = None

    # -- tensors ---------------------------------------------------------------------------
    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values in its own dtype (external data read from disk, not cached)."""
        spilled = self._external_updates.read(tensor)
        if spilled is not None:
            return spilled
        if is_external(tensor):
            return ext.read_external(tensor, self.base_dir)  # via the module: tests watch reads
        return numpy_helper.to_array(tensor)

    def write(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Replace the tensor's values (same dtype; shape may change when channels are removed).

        An external tensor stays external: its shape goes into the proto, its bytes to the
        spill file until :func:`save` copies them to the output.
        """
        values = np.asarray(values, dtype=tensor_dtype(tensor))
        if is_external(tensor):
            self._external_updates.write(tensor, values)
            del tensor.dims[:]
            tensor.dims.extend(values.shape)
            return
        new = numpy_helper.from_array(values, tensor.name)
        tensor.CopyFrom(new)

    def is_rewritten(self, tensor: onnx.TensorProto) -> bool:
        """Whether ``tensor`` is external and was rewritten (its values live in the spill)."""
        return tensor in self._external_updates

    def rewritten_values(self) -> Iterator[Tuple[onnx.TensorProto, np.ndarray]]:
        """``(tensor, current values)`` for each rewritten external tensor, read one at a time."""
        return self._external_updates.values()

    @property
    def rewritten_external(self) -> int:
        """How many external tensors were rewritten (their values live in the spill)."""
        return len(self._external_updates)

    @property
    def spilled_bytes(self) -> int:
        """Disk taken by rewritten external tensors (their spill file); 0 once closed."""
        return self._external_updates.nbytes

    def close(self) -> None:
        """Free the spill; rewritten external tensors are lost (save first)."""
        self._external_updates.close()

    def __enter__(self) -> "ModelHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def has_external_data(self) -> bool:
        return any(is_external(t) for _, t in every_tensor(self.model))

    def file_size(self) -> Optional[int]:
        """Bytes on disk of the model file plus its external data, when loaded from a file."""
        if self.path is None:
            return None
        return sum(f.stat().st_size for f in input_files(self) if f.is_file())


def estimated_size(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held inside the proto, from dims alone (``ByteSize`` walks it all)."""
    total = 0
    for t in iter_tensors(model.graph):
        if not is_external(t) and t.data_type != onnx.TensorProto.STRING:
            total += int(np.prod(t.dims, dtype=np.int64)) * tensor_dtype(t).itemsize
    return total



def iter_graphs(graph: onnx.GraphProto, path: str = "") -> Iterator[Tuple[str, onnx.GraphProto]]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first, with a readable path."""
    path = path or (graph.name or "main")
    yield path, graph
    for node in graph.node:
        for attr in node.attribute:
            label = f"{path}/{node.name or node.op_type}.{attr.name}"
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g, label)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, g in enumerate(attr.graphs):
                    yield from iter_graphs(g, f"{label}[{i}]")


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every stored tensor: initializers and Constant-node values, in all subgraphs."""
    for _, g in iter_graphs(graph):
        yield from g.initializer
        for node in g.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t


def every_tensor(model: onnx.ModelProto) -> Iterator[Tuple[str, onnx.TensorProto]]:
    """Every tensor a model holds anywhere, with where it sits: initializers and sparse
    initializers, and every node attribute of tensor type (``Constant.value``,
    ``ConstantOfShape.value``, any op's TENSOR/TENSORS/SPARSE_TENSOR(S) attribute), in the main
    graph, every If/Loop/Scan body and every model-local function. Anything that may point at
    external data is here, so :func:`check_tensors` sees all of it before anything is read
    (onnxruntime would read an attribute's external data as readily as an initializer's)."""

    def from_nodes(path: str, nodes) -> Iterator[Tuple[str, onnx.TensorProto]]:
        for node in nodes:
            for a in node.attribute:
                where = f"{path}/{node.name or node.op_type}.{a.name}"
                if a.type == onnx.AttributeProto.TENSOR:
                    yield where, a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from ((where, t) for t in a.tensors)
                elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield from ((where, t) for t in (a.sparse_tensor.values,
                                                     a.sparse_tensor.indices))
                elif a.type == onnx.AttributeProto.SPARSE_TENSORS:
                    for sp in a.sparse_tensors:
                        yield from ((where, t) for t in (sp.values, sp.indices))

    def from_graphs(graph: onnx.GraphProto, path: str) -> Iterator[Tuple[str, onnx.TensorProto]]:
        for gpath, g in iter_graphs(graph, path):
            yield from ((gpath, t) for t in g.initializer)
            for sp in g.sparse_initializer:
                yield from ((gpath, t) for t in (sp.values, sp.indices))
            yield from from_nodes(gpath, g.node)

    yield from from_graphs(model.graph, "")
    for fn in model.functions:
        path = f"function {fn.domain}.{fn.name}" if fn.domain else f"function {fn.name}"
        yield from from_nodes(path, fn.node)
        for node in fn.node:
            for label, body in subgraphs(node):
                yield from from_graphs(body, f"{path}/{node.name or node.op_type}.{label}")


def weightless_copy(proto: onnx.ModelProto, handle: Optional[ModelHandle] = None,
                    stub: Optional[str] = None) -> onnx.ModelProto:
    """The model with big tensors reduced to name/dtype/dims: what shape inference and the
    checker need, without serializing gigabytes of weights. With ``stub``, the reduced tensors
    point at that external file (an empty one satisfies onnx.checker), so the copy checks clean.
    """
    copy = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        if proto.HasField(name):
            setattr(copy, name, getattr(proto, name))
    copy.opset_import.extend(proto.opset_import)
    copy.functions.extend(proto.functions)
    copy.graph.CopyFrom(_strip_graph(proto.graph, handle, stub))
    return copy


def _strip_graph(graph: onnx.GraphProto, handle: Optional[ModelHandle],
                 stub: Optional[str]) -> onnx.GraphProto:
    out = onnx.GraphProto(name=graph.name)
    out.input.extend(graph.input)
    out.output.extend(graph.output)
    out.value_info.extend(graph.value_info)
    out.sparse_initializer.extend(graph.sparse_initializer)
    out.initializer.extend(_strip_tensor(t, handle, stub) for t in graph.initializer)
    for node in graph.node:
        if not any(a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH,
                              onnx.AttributeProto.GRAPHS) for a in node.attribute):
            out.node.add().CopyFrom(node)
            continue
        # Copy field by field so that big Constant values are never duplicated in memory.
        new = out.node.add(name=node.name, op_type=node.op_type, domain=node.domain)
        new.input.extend(node.input)
        new.output.extend(node.output)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                a = new.attribute.add(name=attr.name, type=attr.type)
                a.t.CopyFrom(_strip_tensor(attr.t, handle, stub))
            elif attr.type == onnx.AttributeProto.GRAPH:
                a = new.attribute.add(name=attr.name, type=attr.type)
                a.g.CopyFrom(_strip_graph(attr.g, handle, stub))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                a = new.attribute.add(name=attr.name, type=attr.type)
                for g in attr.graphs:
                    a.graphs.add().CopyFrom(_strip_graph(g, handle, stub))
            else:
                new.attribute.add().CopyFrom(attr)
    return out


def _strip_tensor(t: onnx.TensorProto, handle: Optional[ModelHandle],
                  stub: Optional[str]) -> onnx.TensorProto:
    numel = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if numel <= _KEEP_VALUES:
        if not is_external(t):
            return t
        if handle is not None and handle.base_dir is not None:
            try:
                return numpy_helper.from_array(handle.read(t), t.name)
            except Exception:  # unreadable external data: the dims still serve inference
                pass
    stripped = onnx.TensorProto(name=t.name, data_type=t.data_type)
    stripped.dims.extend(t.dims)
    if stub is not None:
        stripped.external_data.add(key="location", value=stub)
        stripped.data_location = onnx.TensorProto.EXTERNAL
    return stripped


# -- loading ------------------------------------------------------------------------------
def load(model: ModelLike) -> ModelHandle:
    """A :class:`ModelHandle` from a path, a ``ModelProto`` or a handle (returned as is).

    Raises :class:`ModelLoadError` with the reason and a next step for anything that is not a
    readable ONNX model. External data stays on disk until a weight is read.
    """
    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, onnx.ModelProto):
        if len(model.graph.sparse_initializer) or len(model.metadata_props):
            # densified on a copy: the caller's is kept
            model, original = onnx.ModelProto(), model
            model.CopyFrom(original)
        handle = ModelHandle(model=model)
        check_tensors(handle)
        _densify(handle.model, "the model")
        return handle
    if not isinstance(model, (str, os.PathLike)):
        raise ModelLoadError(f"expected a path or onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model file '{path}' does not exist; check the path")
    if path.is_dir():
        raise ModelLoadError(f"'{path}' is a directory; pass the .onnx file inside it")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"'{path}' is empty (0 bytes); re-export or re-download the model")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"'{path}' is not a readable ONNX model ({_short(exc)}); "
                             "it may be truncated or not an .onnx file") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"'{path}' parsed as ONNX but has no graph; it is probably not an "
                             "ONNX model (wrong file?)")
    handle = ModelHandle(model=proto, path=path.resolve(), base_dir=path.resolve().parent)
    check_tensors(handle, str(path))
    _densify(handle.model, str(path))
    return handle


def _densify(model: onnx.ModelProto, where: str) -> None:
    """Sparse initializers (:func:`onnxprune.model.sparse.densify`) and bitmask-stored tensors
    (:func:`onnxprune.model.bitmask.decode`) read as dense initializers."""
    if len(model.graph.sparse_initializer):
        from onnxprune.model.sparse import densify

        densify(model, where)
    if any(p.key == "onnxprune.storage" for p in model.metadata_props):
        from onnxprune.model.bitmask import decode

        decode(model, where)


_FIELDS = {  # where a tensor's values live when not in raw_data, by element type
    "float_data": {onnx.TensorProto.FLOAT, onnx.TensorProto.COMPLEX64},
    "double_data": {onnx.TensorProto.DOUBLE, onnx.TensorProto.COMPLEX128},
    "int64_data": {onnx.TensorProto.INT64},
    "uint64_data": {onnx.TensorProto.UINT32, onnx.TensorProto.UINT64},
}


def check_tensors(handle: ModelHandle, where: str = "the model") -> None:
    """Refuse stored tensors onnxprune could not read back faithfully — an unknown element type,
    a name that is not UTF-8, values that do not fill the declared shape, external data that is
    missing, short, malformed or outside the model's folder — with :class:`ModelLoadError`,
    before any weight is read (a flipped byte must not turn into a traceback or, worse, into
    reading a file the model has no business pointing at)."""
    folder = handle.base_dir.resolve() if handle.base_dir is not None else None
    for place, tensor in every_tensor(handle.model):
        try:
            name = tensor.name  # protobuf hands invalid UTF-8 back as bytes or surrogates
            if isinstance(name, bytes):
                raise UnicodeError
            name.encode("utf-8")
        except UnicodeError:
            raise ModelLoadError(f"{where}: a stored tensor's name is not valid UTF-8; the file "
                                 "is corrupt, re-export it") from None
        name = name or f"(unnamed, in {place})"
        if tensor.data_type == onnx.TensorProto.STRING:
            continue
        try:
            dtype = tensor_dtype(tensor)
        except Exception:
            raise ModelLoadError(f"{where}: tensor '{name}' has element type {tensor.data_type}, "
                                 "which is no ONNX type; the file is corrupt, re-export it"
                                 ) from None
        numel = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{where}: tensor '{name}' has a negative dimension "
                                 f"{list(tensor.dims)}; the file is corrupt")
        if is_external(tensor):
            _check_external(tensor, name, folder, numel * dtype.itemsize, where)
        elif tensor.HasField("raw_data"):
            if len(tensor.raw_data) != numel * dtype.itemsize:
                raise ModelLoadError(f"{where}: tensor '{name}' holds {len(tensor.raw_data)} "
                                     f"bytes but its shape {list(tensor.dims)} needs "
                                     f"{numel * dtype.itemsize}; the file is corrupt")
        else:
            for field_name, types in _FIELDS.items():
                values = len(getattr(tensor, field_name))
                if values and tensor.data_type in types and values not in (numel, 2 * numel):
                    raise ModelLoadError(f"{where}: tensor '{name}' holds {values} values but "
                                         f"its shape {list(tensor.dims)} needs {numel}")


#: Longest external-data location accepted (Linux's PATH_MAX); a name part may have 255 bytes.
_MAX_LOCATION = 4096


def _check_external(tensor, name: str, folder: Optional[Path], nbytes: int, where: str) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if folder is None:
        raise ModelLoadError(f"tensor '{name}' has external data but the model was given as a "
                             "proto without a folder; load it from its file path instead")
    if (not location or "\0" in location or len(location) > _MAX_LOCATION
            or any(len(part) > 255 for part in location.replace("\\", "/").split("/"))):
        shown = location if len(location) <= 80 else location[:80] + "…"
        raise ModelLoadError(f"{where}: external data location {shown!r} of tensor '{name}' is "
                             "empty, holds a NUL byte or is too long to be a file beside the "
                             "model; the file is corrupt or hostile, re-export it")
    target = (folder / location).resolve()
    if Path(location).is_absolute() or folder not in target.parents:
        raise ModelLoadError(f"{where}: external data '{location}' of tensor '{name}' lies "
                             "outside the model's folder; onnxprune reads external data only "
                             "from files beside the model")
    if not target.is_file():
        raise ModelLoadError(f"external data file '{location}' for tensor '{name}' is missing "
                             f"next to '{where}'; keep the .onnx file beside its data file(s)")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries.get("length") or nbytes)
    except ValueError:
        offset = length = -1
    if offset < 0 or length != nbytes or offset + length > target.stat().st_size:
        raise ModelLoadError(f"{where}: external data of tensor '{name}' in '{location}' is "
                             f"truncated or malformed (needs {nbytes} bytes at offset "
                             f"{entries.get('offset', 0)}); the data file does not match the "
                             "model")


def check_input(handle: ModelHandle) -> bool:
    """Refuse an input model that onnx.checker rejects (:class:`ModelLoadError`).

    Returns whether it also passes the full check (strict shape inference): the output is held
    to the same level, since pruning cannot repair what the exporter wrote.
    """
    where = handle.path or "the model"
    try:  # the usual case costs one checker run: full check first, basic only if that fails
        check_graph(handle, full_check=True)
        return True
    except Exception:
        pass
    try:
        check_graph(handle, full_check=False)
    except Exception as exc:
        raise ModelLoadError(f"{where} is an invalid ONNX model (onnx.checker: {_short(exc)}); "
                             "re-export it or fix the graph first") from None
    return False


def check_graph(handle: ModelHandle, full_check: bool = True) -> None:
    """onnx.checker on the model's graph, weights left out (a weightless copy whose big tensors
    point at an empty stub file): the same verdict on structure, types and shapes, without
    serializing the weights — which for a >2 GB model protobuf could not do at all."""
    with tempfile.TemporaryDirectory(prefix="onnxprune-check-") as tmp:
        stub = "weights.stub"
        open(os.path.join(tmp, stub), "wb").close()
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(weightless_copy(handle.model, handle, stub).SerializeToString())
        onnx.checker.check_model(path, full_check=full_check)


@contextlib.contextmanager
def materialized(handle: ModelHandle) -> Iterator[Union[onnx.ModelProto, Path]]:
    """The model in a form onnx.checker and onnxruntime can open: the proto itself when it is
    self-contained and small, else a temporary file (with its external data) removed afterwards.
    """
    if not handle.has_external_data and estimated_size(handle.model) < _PROTO_LIMIT:
        yield handle.model
        return
    with tempfile.TemporaryDirectory(prefix="onnxprune-") as tmp:
        yield save(handle, Path(tmp) / "model.onnx")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# -- saving -------------------------------------------------------------------------------
def needs_external(handle: ModelHandle) -> bool:
    """Whether saving writes a ``<output>.data`` file (external tensors, or a proto too big)."""
    return handle.has_external_data or estimated_size(handle.model) > _PROTO_LIMIT


def resolve_output(input_path: Optional[Path], output: Optional[Union[str, os.PathLike]],
                   force: bool, suffix: str = ".pruned.onnx", external: bool = False,
                   reads: Sequence[Path] = ()) -> Path:
    """The path to write the model to: given, or ``<stem>.pruned.onnx`` beside the input;
    checked by :func:`onnxprune.model.output.check_output` before any work (``reads``: the
    files the input reads, the input path itself always among them). With ``external``, its
    ``.data`` file is checked too. Returns the real path (symlinks resolved)."""
    if output is None:
        if input_path is None:
            raise OutputError("no output path given for an in-memory model; pass output=...")
        output = default_output(input_path, suffix)
    reads = list(reads) + ([input_path] if input_path is not None else [])
    default_name = default_output(input_path, suffix).name if input_path is not None else None
    out = check_output(output, force, reads, "output", default_name=default_name)
    if external:
        check_output(out.with_name(out.name + ".data"), force, reads, "output data file")
    return out


def external_files(model: onnx.ModelProto, folder: Path) -> List[Path]:
    """The external data files ``model``'s tensors name, in ``folder``, each once."""
    files: List[Path] = []
    for _, tensor in every_tensor(model):
        if is_external(tensor):
            loc = ExternalDataInfo(tensor).location
            if loc and folder / loc not in files:
                files.append(folder / loc)
    return files


def input_files(handle: ModelHandle) -> List[Path]:
    """The files ``handle``'s model reads: its file and its external data files."""
    files = [handle.path] if handle.path is not None else []
    if handle.base_dir is not None:
        files += external_files(handle.model, handle.base_dir)
    return files


def save(handle: ModelHandle, output: Union[str, os.PathLike], force: bool = True,
         storage: str = "dense", decisions: Optional[list] = None) -> Path:
    """Write the model atomically; tensors that were external stay external, in
    ``<output>.data`` beside it. Returns the path written. Without ``force`` each file is
    created exclusively (:func:`onnxprune.model.output.commit`): one that appeared meanwhile is
    never replaced.

    Tensor data is streamed: rewritten tensors from the spill, untouched ones byte for byte from
    their data file, so saving holds no tensor in memory whatever the model's size.

    ``storage``: ``"dense"``, or ``"sparse"``/``"sparse-compact"`` to write the initializers
    with enough zeros as sparse initializers (:mod:`onnxprune.model.sparse`), ``"bitmask"`` as
    values + bits (:mod:`onnxprune.model.bitmask`); a model with external data is written dense; ``decisions``, a list, receives one
    :class:`~onnxprune.model.sparse.StorageDecision` per initializer.
    """
    out = Path(output)
    model = handle.model
    if storage != "dense":
        from onnxprune.model import sparse

        if _saved_external(model):
            if decisions is not None:
                decisions.append(sparse.StorageDecision(
                    "(model)", 0, 0, 0, 0, "dense", "the model has external data: --storage "
                    "sparse applies to self-contained models only; written dense"))
        else:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            if storage == "bitmask":
                from onnxprune.model import bitmask

                found = bitmask.encode(copy, handle.read)
            else:
                found = sparse.sparsify(copy, handle.read, compact=storage == "sparse-compact")
            if decisions is not None:
                decisions.extend(found)
            return save(ModelHandle(model=copy), out, force)
    external = _saved_external(model)
    with contextlib.ExitStack() as stack:
        data_name = out.name + ".data"
        data_tmp = model_tmp = None
        made: List[str] = []  # every temp file created, recorded as it is created
        data_committed = False
        saved_entries = []
        try:
            if external:
                data_tmp = temp_beside(out.with_name(data_name), made)
                sources: Dict[Path, BinaryIO] = {}
                with open(data_tmp, "wb", buffering=0) as f:
                    for tensor in external:
                        saved_entries.append((tensor, external_state(tensor)))
                        write_all(f, bytes((-f.tell()) % ALIGN))
                        offset = f.tell()
                        length = handle._external_updates.copy_to(tensor, f)
                        if length is None and is_external(tensor):
                            path, start, length = external_span(tensor, handle.base_dir)
                            if path not in sources:
                                sources[path] = stack.enter_context(open(path, "rb", buffering=0))
                            copy_range(sources[path], start, length, f, tensor.name,
                                        str(path))
                        elif length is None:  # an inline tensor of a model past protobuf's limit
                            length = len(tensor.raw_data)
                            write_all(f, tensor.raw_data)
                        point_external(tensor, data_name, offset, length)
            model_tmp = temp_beside(out, made)
            with open(model_tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            if data_tmp is not None:
                commit(data_tmp, out.with_name(data_name), force, "output data file")
                data_committed = True
            commit(model_tmp, out, force)
            data_committed = False  # the pair is in place
        finally:
            for tmp in made:  # committed ones are gone already (moved or unlinked)
                if os.path.exists(tmp):
                    os.unlink(tmp)
            if data_committed:  # a data file without its model is no output: take it back
                os.unlink(out.with_name(data_name))
            # The handle keeps reading from the original files: restore its external entries.
            for tensor, state in saved_entries:
                restore_external(tensor, state)
    return out


def _saved_external(model: onnx.ModelProto) -> List[onnx.TensorProto]:
    """The tensors :func:`save` writes to the ``<output>.data`` file: those external now, or, for
    a model past protobuf's limit, every tensor of 1 KiB or more."""
    external = [t for t in iter_tensors(model.graph) if is_external(t)]
    if not external and estimated_size(model) > _PROTO_LIMIT:
        external = [t for t in iter_tensors(model.graph) if len(t.raw_data) >= 1024]
    return external


def size_on_disk(path: Path, model: onnx.ModelProto) -> int:
    """Bytes of ``model`` as :func:`save` wrote it to ``path``: the file and its ``.data`` file.
    (After a save, ``model``'s external entries name the input's data files again.)"""
    data = path.with_name(path.name + ".data")
    extra = data.stat().st_size if _saved_external(model) and data.is_file() else 0
    return path.stat().st_size + extra
