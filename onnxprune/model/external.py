"""External tensor data on disk: the bytes of tensors stored outside the protobuf.

Owns everything that touches those bytes and nothing about the model as a whole: where an
external tensor's bytes are (:func:`external_span`, checked against its file), reading them
(:func:`read_external`), little-endian byte views and unbuffered read/write/copy loops
(:func:`le_bytes`, :func:`write_all`, :func:`read_into`, :func:`copy_range`, which copies in the
kernel where it can), pointing a tensor at a new location and restoring it
(:func:`point_external`, :func:`external_state`, :func:`restore_external`), and the
:class:`SpillStore` that keeps rewritten external tensors in an unnamed temporary file instead of
memory. :mod:`onnxprune.model.io` builds the :class:`~onnxprune.model.io.ModelHandle`, loading and
saving on top of these.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from onnxprune.errors import ModelLoadError

ALIGN = 4096  # external tensors start on page boundaries (mmap-friendly, as onnx does)
_COPY_CHUNK = 16 << 20  # bytes moved at a time when streaming tensor data between files


class _Slot(NamedTuple):
    tensor: onnx.TensorProto  # held so that its id() stays unique while the slot lives
    offset: int
    nbytes: int
    capacity: int
    shape: Tuple[int, ...]


class SpillStore:
    """Rewritten external tensors, kept in one temporary file rather than in memory.

    Each tensor has a slot (rewritten in place when the new values fit, appended otherwise);
    reads come back from disk. Also a read-only mapping-like view: ``bool(store)``,
    ``len(store)``, ``store.values()`` -> ``(tensor, array)`` pairs read one at a time.
    """

    def __init__(self) -> None:
        self._slots: Dict[int, _Slot] = {}
        self._file: Optional[BinaryIO] = None
        self._end = 0
        self._finalizer: Optional[weakref.finalize] = None

    def __bool__(self) -> bool:
        return bool(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, tensor: onnx.TensorProto) -> bool:
        return self._slot(tensor) is not None

    def values(self) -> Iterator[Tuple[onnx.TensorProto, np.ndarray]]:
        for slot in list(self._slots.values()):
            yield slot.tensor, self.read(slot.tensor)

    def _slot(self, tensor: onnx.TensorProto) -> Optional[_Slot]:
        slot = self._slots.get(id(tensor))
        return slot if slot is not None and slot.tensor is tensor else None

    @property
    def nbytes(self) -> int:
        """Bytes the spill file takes (0 when nothing was spilled or after :meth:`close`)."""
        return 0 if self._file is None else os.fstat(self._file.fileno()).st_size

    def _open(self) -> BinaryIO:
        if self._file is None:
            # No name on disk (O_TMPFILE, or unlinked at once): the kernel frees it with the
            # last descriptor, so even a killed process leaves nothing behind.
            self._file = tempfile.TemporaryFile(prefix="onnxprune-spill-", buffering=0)
            self._finalizer = weakref.finalize(self, self._file.close)
        return self._file

    def write(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Store ``values`` (the tensor's dtype) as the tensor's new data, little-endian."""
        data = le_bytes(values, tensor_dtype(tensor))
        f = self._open()
        slot = self._slot(tensor)
        if slot is None or slot.capacity < data.nbytes:
            offset = self._end + (-self._end) % ALIGN
            self._end = offset + data.nbytes
            capacity = data.nbytes
        else:
            offset, capacity = slot.offset, slot.capacity
        f.seek(offset)
        write_all(f, data)
        self._slots[id(tensor)] = _Slot(tensor, offset, data.nbytes, capacity, values.shape)

    def read(self, tensor: onnx.TensorProto) -> Optional[np.ndarray]:
        """The tensor's stored values (a fresh, writable array), or None if it was not written."""
        slot = self._slot(tensor)
        if slot is None:
            return None
        dtype = tensor_dtype(tensor)
        values = np.empty(slot.shape, dtype=dtype.newbyteorder("<"))
        self._file.seek(slot.offset)
        read_into(self._file, values.reshape(-1).view(np.uint8), tensor.name, "the spill file")
        return values.astype(dtype, copy=False)

    def copy_to(self, tensor: onnx.TensorProto, out: BinaryIO) -> Optional[int]:
        """Append the tensor's stored bytes to ``out``; their length, or None if not written."""
        slot = self._slot(tensor)
        if slot is None:
            return None
        copy_range(self._file, slot.offset, slot.nbytes, out, tensor.name, "the spill file")
        return slot.nbytes

    def close(self) -> None:
        """Free the spill file and forget every stored tensor."""
        if self._finalizer is not None:
            self._finalizer()
        self._slots.clear()
        self._file = self._finalizer = None
        self._end = 0



def tensor_dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def read_external(tensor: onnx.TensorProto, base_dir: Optional[Path]) -> np.ndarray:
    data_path, offset, length = external_span(tensor, base_dir)
    dtype = tensor_dtype(tensor)
    values = np.empty(tuple(tensor.dims), dtype=dtype.newbyteorder("<"))
    with open(data_path, "rb", buffering=0) as f:
        f.seek(offset)
        read_into(f, values.reshape(-1).view(np.uint8), tensor.name, str(data_path))
    return values.astype(dtype, copy=False)


def external_span(tensor: onnx.TensorProto, base_dir: Optional[Path]) -> Tuple[Path, int, int]:
    """(data file, offset, length) of an external tensor's bytes, checked against the file."""
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
    return data_path, offset, expected


def le_bytes(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` as a flat uint8 view of little-endian ``dtype`` data (a copy only if needed)."""
    data = np.ascontiguousarray(values, dtype=dtype.newbyteorder("<"))
    return data.reshape(-1).view(np.uint8)


def write_all(f: BinaryIO, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[f.write(view):]


def read_into(f: BinaryIO, buffer, name: str, where: str) -> None:
    view = memoryview(buffer).cast("B")
    while view.nbytes:
        got = f.readinto(view)
        if not got:
            raise ModelLoadError(f"data of tensor '{name}' ends early in {where}; the file was "
                                 "truncated while onnxprune was reading it")
        view = view[got:]


def copy_range(src: BinaryIO, offset: int, length: int, out: BinaryIO, name: str,
                where: str) -> None:
    """Append ``length`` bytes of ``src`` from ``offset`` to ``out`` (unbuffered files), in the
    kernel where it can (``copy_file_range``), else through one reused chunk buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(length - done, 1 << 30),
                                       offset + done)
                if n == 0:
                    break
                done += n
        except OSError:  # another file system, an old kernel: copy through user space
            pass
        out.seek(0, os.SEEK_END)  # copy_file_range moved the descriptor; keep f.tell() true
    if done < length:
        buffer = bytearray(min(_COPY_CHUNK, length - done))
        src.seek(offset + done)
        while done < length:
            view = memoryview(buffer)[:min(len(buffer), length - done)]
            read_into(src, view, name, where)
            write_all(out, view)
            done += view.nbytes


def external_state(tensor: onnx.TensorProto):
    return (tensor.data_location, [(e.key, e.value) for e in tensor.external_data],
            tensor.raw_data if tensor.HasField("raw_data") else None)


def restore_external(tensor: onnx.TensorProto, state) -> None:
    location, entries, raw = state
    del tensor.external_data[:]
    for k, v in entries:
        tensor.external_data.add(key=k, value=v)
    tensor.data_location = location
    if raw is None:
        tensor.ClearField("raw_data")
    else:
        tensor.raw_data = raw


def point_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``tensor`` an external tensor whose bytes are at ``offset`` in ``location``."""
    for field_name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                       "string_data"):
        tensor.ClearField(field_name)
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=k, value=v)
    tensor.data_location = onnx.TensorProto.EXTERNAL
