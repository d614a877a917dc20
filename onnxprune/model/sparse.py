"""Sparse storage: weights with enough zeros written as ONNX ``sparse_initializer`` entries.

A ``SparseTensorProto`` holds the nonzero ``values`` and their ``indices`` into the dense tensor
(COO). Stock onnxruntime loads a main-graph sparse initializer whatever op reads it: it turns it
back into a dense initializer when the session is built, so the model computes exactly what the
dense-stored one does (checked with onnxruntime 1.32: Conv, Gemm, MatMul, Add at opsets 11-21;
float32, float16, float64, int32 values; IR versions 3-10). What it accepts for the indices
(measured, see tests/model/test_sparse_storage.py):

- a 1-D index of linearized (row-major) positions, or a 2-D ``[nnz, rank]`` one; the 1-D form is
  the smaller and the one written here;
- int8, int16, int32 or int64 indices (unsigned types are refused). onnx.checker accepts only
  int64, and its strict check (``full_check``) refuses any model with a sparse initializer read
  by an op (shape inference types it as a sparse tensor), so the output passes the basic check.

So there are two forms: ``sparse`` (int64 indices, valid for onnx.checker and onnxruntime;
12 bytes per nonzero float32, which pays only past 2/3 zeros) and ``sparse-compact`` (the
smallest signed type that holds the largest position: int8/int16/int32; onnxruntime loads it,
onnx.checker refuses it; 8 bytes per nonzero float32 for tensors past 32767 elements).

A tensor is written sparse only when at least :data:`MIN_ZEROS` of it is zero *and* the sparse
form is smaller than the dense one; everything else stays dense, each with its reason
(:class:`StorageDecision`): Constant-node and subgraph tensors, external-data tensors,
initializers that are also graph inputs (a caller may override them; onnxruntime does not take
a sparse initializer as an input's default), string/bool and other element types not checked.
This module owns that decision and the conversion of a model proto both ways:
:func:`onnxprune.model.io.save` calls :func:`sparsify` for ``storage="sparse"``/
``"sparse-compact"``, :func:`onnxprune.model.io.load` calls :func:`densify` (a sparse-stored
model is read as onnxruntime reads it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.model.external import is_external, tensor_dtype

#: The ``--storage`` choices (``bitmask``: :mod:`onnxprune.model.bitmask`).
STORAGES = ("dense", "sparse", "sparse-compact", "bitmask")
#: A tensor is stored sparse only with at least this fraction of zeros (and when smaller).
MIN_ZEROS = 0.5
#: Element types onnxruntime was checked to densify exactly (see the module docstring).
SPARSE_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float16, np.float64, np.int8,
                                                 np.int32, np.int64))
_BF16 = onnx.TensorProto.BFLOAT16
#: Signed index types onnxruntime accepts, smallest first (int8/int16/int32/int64).
_INDEX_TYPES = (np.int8, np.int16, np.int32, np.int64)


@dataclass
class StorageDecision:
    """How one initializer was written: ``sparse`` or ``dense`` and why, with its sizes."""

    name: str
    numel: int
    nonzeros: int
    dense_bytes: int
    stored_bytes: int
    stored: str  # "sparse", "bitmask" or "dense"
    reason: str = ""
    index_type: str = ""

    @property
    def zeros(self) -> float:
        return 1 - self.nonzeros / max(1, self.numel)


def index_type(numel: int, compact: bool) -> np.dtype:
    """The index element type for a tensor of ``numel`` elements: int64 unless ``compact``, then
    the smallest signed type holding ``numel - 1``."""
    if not compact:
        return np.dtype(np.int64)
    for t in _INDEX_TYPES:
        if numel - 1 <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def sparse_bytes(numel: int, nonzeros: int, itemsize: int, compact: bool = False) -> int:
    """Bytes of the values and indices of the sparse form (protobuf framing aside)."""
    return nonzeros * (itemsize + index_type(numel, compact).itemsize)


def estimated_saving(rows: List[Tuple[int, int, int]], compact: bool = False,
                     form: str = "sparse") -> int:
    """Bytes ``--storage sparse`` (``compact``: ``sparse-compact``; ``form="bitmask"``:
    ``--storage bitmask``) would save over ``(numel, nonzeros, itemsize)`` per weight, counting
    only the weights it would store that way."""
    from onnxprune.model.bitmask import bitmask_bytes

    saved = 0
    for numel, nonzeros, itemsize in rows:
        if numel and 1 - nonzeros / numel >= MIN_ZEROS:
            size = bitmask_bytes(numel, nonzeros, itemsize) if form == "bitmask" else \
                sparse_bytes(numel, nonzeros, itemsize, compact)
            saved += max(0, numel * itemsize - size)
    return saved


def decide(tensor: onnx.TensorProto, values: Optional[np.ndarray], form: str,
           why_dense: str = "") -> StorageDecision:
    """Whether ``tensor`` (``values``: its array, or None when ``why_dense`` already says it
    stays dense) is stored in ``form`` (``sparse``, ``sparse-compact`` or ``bitmask``)."""
    compact = form == "sparse-compact"
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    itemsize = tensor_dtype(tensor).itemsize if tensor.data_type != onnx.TensorProto.STRING else 0
    dense = numel * itemsize
    if values is None:
        return StorageDecision(tensor.name, numel, numel, dense, dense, "dense", why_dense)
    nz = int(np.count_nonzero(values))
    d = StorageDecision(tensor.name, numel, nz, dense, dense, "dense")
    if form == "bitmask":
        from onnxprune.model.bitmask import bitmask_bytes

        size, parts = bitmask_bytes(numel, nz, itemsize), "values + 1 bit per element"
    else:
        size = sparse_bytes(numel, nz, itemsize, compact)
        parts = f"values + {index_type(numel, compact).name} indices"
    if d.zeros < MIN_ZEROS:
        d.reason = f"{100 * d.zeros:.0f}% zeros, under the {100 * MIN_ZEROS:.0f}% threshold"
    elif size >= dense:
        d.reason = (f"{form} form ({size} B: {parts}) would not be smaller than dense "
                    f"({dense} B)")
    else:
        d.stored, d.stored_bytes = ("bitmask" if form == "bitmask" else "sparse"), size
        d.index_type = "" if form == "bitmask" else index_type(numel, compact).name
    return d


def to_sparse(values: np.ndarray, name: str, compact: bool) -> onnx.SparseTensorProto:
    """``values`` as a ``SparseTensorProto``: nonzero values, 1-D linearized indices."""
    flat = values.reshape(-1)
    positions = np.flatnonzero(flat)
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(numpy_helper.from_array(flat[positions], name))
    sparse.indices.CopyFrom(numpy_helper.from_array(
        positions.astype(index_type(flat.size, compact)), name + "_indices"))
    sparse.dims.extend(values.shape)
    return sparse


def sparsify(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], np.ndarray],
             compact: bool = False) -> List[StorageDecision]:
    """Move the main-graph initializers worth it into ``graph.sparse_initializer``, in place
    (``read(tensor)`` gives a tensor's values). Returns one decision per initializer."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    decisions: List[StorageDecision] = []
    keep: List[onnx.TensorProto] = []
    for tensor in graph.initializer:
        why = why_dense(tensor, inputs)
        values = None if why else read(tensor)
        d = decide(tensor, values, "sparse-compact" if compact else "sparse", why)
        decisions.append(d)
        if d.stored == "sparse":
            graph.sparse_initializer.append(to_sparse(values, tensor.name, compact))
        else:
            keep.append(tensor)
    if len(keep) != len(graph.initializer):
        replace_all(graph.initializer, keep)
    return decisions


def replace_all(field, items) -> None:
    """Set the repeated message ``field`` (initializers, nodes, metadata) to ``items``, which
    may be its own elements: they are copied first, since protobuf detaches what it removes."""
    copies = []
    for item in items:
        copies.append(type(item)())
        copies[-1].CopyFrom(item)
    del field[:]
    field.extend(copies)


def densify(model: onnx.ModelProto, where: str = "the model") -> int:
    """Turn the main graph's sparse initializers into dense initializers, in place, as
    onnxruntime does when it loads a model (so onnxprune reads, prunes and re-saves a
    sparse-stored model like any other). Returns how many were converted. Raises
    :class:`~onnxprune.errors.ModelLoadError` for indices that do not fit the dense shape."""
    from onnxprune.errors import ModelLoadError

    graph = model.graph
    dense = []
    for sp in graph.sparse_initializer:
        name = sp.values.name
        if is_external(sp.values) or is_external(sp.indices):
            raise ModelLoadError(f"{where}: sparse initializer '{name}' keeps its values in "
                                 "external data, which onnxprune does not read; store it dense")
        shape = tuple(int(d) for d in sp.dims)
        values = numpy_helper.to_array(sp.values).reshape(-1)
        indices = numpy_helper.to_array(sp.indices).astype(np.int64)
        numel = int(np.prod(shape, dtype=np.int64))
        if indices.ndim == 2 and indices.shape[1] == len(shape) and len(shape) > 0:
            if (indices < 0).any() or (indices >= np.array(shape)).any():
                indices = np.array([-1])
            else:
                indices = np.ravel_multi_index(tuple(indices.T), shape)
        if indices.ndim != 1 or len(indices) != len(values) or (indices < 0).any() \
                or (indices >= numel).any():
            raise ModelLoadError(f"{where}: sparse initializer '{name}' has indices that do "
                                 f"not fit its shape {list(shape)} (or its values); the file "
                                 "is corrupt, re-export it")
        array = np.zeros(numel, dtype=values.dtype)
        array[indices] = values
        dense.append(numpy_helper.from_array(array.reshape(shape), name))
    if dense:
        del graph.sparse_initializer[:]
        graph.initializer.extend(dense)
    return len(dense)


def why_dense(tensor: onnx.TensorProto, inputs) -> str:
    """Why ``tensor`` stays dense whatever its values, or ''."""
    if is_external(tensor):
        return "external data (kept dense: stored in the .data file as it was)"
    if tensor.name in inputs:
        return "also a graph input (a caller may override it)"
    if tensor.data_type == _BF16 or tensor.data_type == onnx.TensorProto.STRING:
        return "element type not checked with onnxruntime's sparse storage"
    if tensor_dtype(tensor) not in SPARSE_DTYPES:
        return "element type not checked with onnxruntime's sparse storage"
    if not len(tensor.dims):
        return "a scalar"
    return ""


def summary(decisions: List[StorageDecision], storage: str,
            size: Optional[int] = None) -> str:
    """One line for the report: how many tensors went sparse, the bytes saved and (with the
    written file's ``size``) the ratio to the file dense storage would have written."""
    sparse = [d for d in decisions if d.stored != "dense"]
    saved = sum(d.dense_bytes - d.stored_bytes for d in sparse)
    form = {"sparse": "as sparse_initializers (int64 indices)",
            "sparse-compact": "as sparse_initializers (int8/16/32 indices, which onnx.checker "
                              "refuses and onnxruntime loads)",
            "bitmask": "as nonzero values + 1 bit per element (standard ops that onnxruntime "
                       "folds back into the dense weight when the session starts)"}[storage]
    ratio = f", {size / (size + saved):.2f}x of the dense file" if size else ""
    reasons = Counter(_reason_kind(d.reason) for d in decisions if d.stored == "dense")
    kept = "; ".join(f"{n} {kind}" for kind, n in reasons.most_common())
    return (f"--storage {storage}: {len(sparse)} of {len(decisions)} initializers written "
            f"{form}: {saved / 2**20:.2f} MiB smaller{ratio}"
            + (f"; kept dense: {kept}" if kept else ""))


def _reason_kind(reason: str) -> str:
    for key, kind in (("threshold", f"under {100 * MIN_ZEROS:.0f}% zeros"),
                      ("not be smaller", "not smaller stored sparse"), ("external", "external data"),
                      ("graph input", "graph inputs"), ("element type", "other element types"),
                      ("scalar", "scalars")):
        if key in reason:
            return kind
    return reason


def rows(decisions: List[StorageDecision]) -> List[dict]:
    """The decisions as a report table."""
    return [{"tensor": d.name, "zeros": round(d.zeros, 4), "stored": d.stored,
             "dense bytes": d.dense_bytes, "stored bytes": d.stored_bytes,
             "why dense": d.reason} for d in decisions]


__all__ = ["MIN_ZEROS", "SPARSE_DTYPES", "STORAGES", "StorageDecision", "decide", "densify",
           "estimated_saving", "index_type", "rows", "sparse_bytes", "sparsify", "summary",
           "replace_all", "to_sparse", "why_dense"]
