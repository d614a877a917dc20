"""Loading and saving models: paths or protos in, atomic files out, external data kept external.

A model is held as a :class:`ModelHandle`: the ``ModelProto`` with external tensors *not* pulled
into protobuf (so a 10 GB model costs only its graph in memory), the folder its external data is
read from, and the arrays onnxprune has rewritten for external tensors. Weight arrays are read one
at a time on demand with :meth:`ModelHandle.read` and written back with :meth:`ModelHandle.write`.

Saving never overwrites the input, never leaves a partial file: data and model go to temporary
files beside the target and are renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo

from .errors import ModelLoadError, OutputError

ModelLike = Union[str, os.PathLike, onnx.ModelProto, "ModelHandle"]
_ALIGN = 4096  # external tensors start on page boundaries (mmap-friendly, as onnx does)
_PROTO_LIMIT = 2_000_000_000
_KEEP_VALUES = 4096  # tensors up to this many elements keep their values in weightless copies  # protobuf cannot serialize 2 GiB; past this, weights go external


@dataclass
class ModelHandle:
    """A model being pruned: the proto, where its external data lives, and rewritten tensors."""

    model: onnx.ModelProto
    path: Optional[Path] = None  # the file it came from, None for an in-memory proto
    base_dir: Optional[Path] = None  # folder that external-data locations are relative to
    _external_updates: Dict[int, Tuple[onnx.TensorProto, np.ndarray]] = field(default_factory=dict)

    # -- tensors ---------------------------------------------------------------------------
    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values in its own dtype (external data read from disk, not cached)."""
        update = self._external_updates.get(id(tensor))
        if update is not None and update[0] is tensor:
            return update[1]
        if is_external(tensor):
            return _read_external(tensor, self.base_dir)
        return numpy_helper.to_array(tensor)

    def write(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Replace the tensor's values (same dtype; shape may change when channels are removed)."""
        values = np.asarray(values, dtype=tensor_dtype(tensor))
        if is_external(tensor):
            # Keep external tensors out of protobuf; shape goes into the proto, bytes at save.
            del tensor.dims[:]
            tensor.dims.extend(values.shape)
            self._external_updates[id(tensor)] = (tensor, values)
            return
        new = numpy_helper.from_array(values, tensor.name)
        tensor.CopyFrom(new)

    @property
    def has_external_data(self) -> bool:
        return any(is_external(t) for t in iter_tensors(self.model.graph))

    def file_size(self) -> Optional[int]:
        """Bytes on disk of the model file plus its external data, when loaded from a file."""
        if self.path is None:
            return None
        return size_on_disk(self.path, self.model)


def tensor_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def estimated_size(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held inside the proto, from dims alone (``ByteSize`` walks it all)."""
    total = 0
    for t in iter_tensors(model.graph):
        if not is_external(t) and t.data_type != onnx.TensorProto.STRING:
            total += int(np.prod(t.dims, dtype=np.int64)) * tensor_dtype(t).itemsize
    return total


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _read_external(tensor: onnx.TensorProto, base_dir: Optional[Path]) -> np.ndarray:
    info = ExternalDataInfo(tensor)
    if base_dir is None:
        raise ModelLoadError(f"tensor '{tensor.name}' has external data but the model was given "
                             "as a proto without a folder; load it from its file path instead")
    data_path = (base_dir / info.location).resolve()
    if not data_path.is_file():
        raise ModelLoadError(f"external data file '{data_path}' for tensor '{tensor.name}' is "
                             "missing; keep the .onnx file beside its data file(s)")
    dtype = tensor_dtype(tensor)
    shape = tuple(tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    offset = int(info.offset or 0)
    expected = count * dtype.itemsize
    length = int(info.length) if info.length else expected
    if length != expected or offset + length > data_path.stat().st_size:
        raise ModelLoadError(f"external data for tensor '{tensor.name}' in '{data_path}' is "
                             f"truncated or malformed (needs {expected} bytes at offset {offset})")
    with open(data_path, "rb") as f:
        f.seek(offset)
        raw = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=count)
    return raw.astype(dtype, copy=False).reshape(shape)


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
        return ModelHandle(model=model)
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
    for tensor in iter_tensors(proto.graph):
        if is_external(tensor):
            location = ExternalDataInfo(tensor).location
            if not (handle.base_dir / location).is_file():
                raise ModelLoadError(f"external data file '{location}' for tensor "
                                     f"'{tensor.name}' is missing next to '{path}'; keep the "
                                     ".onnx file beside its data file(s)")
    return handle


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
def default_output(input_path: Union[str, os.PathLike], suffix: str = ".pruned.onnx") -> Path:
    """``dir/model.onnx`` -> ``dir/model.pruned.onnx`` (any other name gets the suffix added)."""
    path = Path(input_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + suffix)


def resolve_output(input_path: Optional[Path], output: Optional[Union[str, os.PathLike]],
                   force: bool, suffix: str = ".pruned.onnx") -> Path:
    """The output path: given, or ``<stem>.pruned.onnx`` beside the input; checked before work.

    Refuses the input itself, an existing file without ``force``, a folder, and an unwritable
    location, so that nothing is computed only to fail at the end.
    """
    if output is None:
        if input_path is None:
            raise OutputError("no output path given for an in-memory model; pass output=...")
        out = default_output(input_path, suffix)
    else:
        out = Path(output)
    if out.exists() and out.is_dir():
        raise OutputError(f"output '{out}' is a directory; give a file path like "
                          f"'{out / 'model.pruned.onnx'}'")
    if input_path is not None and out.resolve() == input_path.resolve():
        raise OutputError(f"output '{out}' is the input model; onnxprune never overwrites its "
                          "input, choose another -o/--output")
    if out.exists() and not force:
        raise OutputError(f"output '{out}' already exists; pass --force (force=True) to "
                          "overwrite it or choose another -o/--output")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"folder '{parent}' for output '{out}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder '{parent}' is not writable; choose another -o/--output")
    return out


def save(handle: ModelHandle, output: Union[str, os.PathLike]) -> Path:
    """Write the model atomically; tensors that were external stay external, in
    ``<output>.data`` beside it. Returns the path written."""
    out = Path(output)
    model = handle.model
    external = [t for t in iter_tensors(model.graph) if is_external(t)]
    too_big = not external and estimated_size(model) > _PROTO_LIMIT
    if too_big:
        external = [t for t in iter_tensors(model.graph) if len(t.raw_data) >= 1024]
    with contextlib.ExitStack() as stack:
        data_name = out.name + ".data"
        data_tmp = model_tmp = None
        saved_entries = []
        try:
            if external:
                data_tmp = _tmp_beside(out.with_name(data_name))
                with open(data_tmp, "wb") as f:
                    for tensor in external:
                        saved_entries.append((tensor, _external_state(tensor)))
                        values = handle.read(tensor)
                        _write_external(f, tensor, values, data_name)
            model_tmp = _tmp_beside(out)
            with open(model_tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            if data_tmp is not None:
                os.replace(data_tmp, out.with_name(data_name))
                data_tmp = None
            os.replace(model_tmp, out)
            model_tmp = None
        finally:
            for tmp in (data_tmp, model_tmp):
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
            # The handle keeps reading from the original files: restore its external entries.
            for tensor, state in saved_entries:
                _restore_external(tensor, state)
    return out


def _tmp_beside(path: Path) -> str:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    # mkstemp makes 0600 files; the output should get the permissions any new file gets.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    return name


def _external_state(tensor: onnx.TensorProto):
    return (tensor.data_location, [(e.key, e.value) for e in tensor.external_data],
            tensor.raw_data if tensor.HasField("raw_data") else None)


def _restore_external(tensor: onnx.TensorProto, state) -> None:
    location, entries, raw = state
    del tensor.external_data[:]
    for k, v in entries:
        tensor.external_data.add(key=k, value=v)
    tensor.data_location = location
    if raw is None:
        tensor.ClearField("raw_data")
    else:
        tensor.raw_data = raw


def _write_external(f, tensor: onnx.TensorProto, values: np.ndarray, location: str) -> None:
    pad = (-f.tell()) % _ALIGN
    if pad:
        f.write(b"\0" * pad)
    offset = f.tell()
    data = np.ascontiguousarray(values, dtype=tensor_dtype(tensor).newbyteorder("<"))
    f.write(data.tobytes())
    for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                       "string_data"):
        tensor.ClearField(field_name)
    tensor.ClearField("raw_data")
    del tensor.dims[:]
    tensor.dims.extend(values.shape)
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(data.nbytes))):
        tensor.external_data.add(key=k, value=v)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def size_on_disk(path: Path, model: onnx.ModelProto) -> int:
    size = path.stat().st_size
    seen = set()
    for tensor in iter_tensors(model.graph):
        if is_external(tensor):
            loc = ExternalDataInfo(tensor).location
            if loc not in seen and (path.parent / loc).is_file():
                seen.add(loc)
                size += (path.parent / loc).stat().st_size
    return size
