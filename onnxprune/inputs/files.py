"""Reading arrays from ``.npz``/``.npy`` files and dicts, safely and lazily.

This module owns how array data enters onnxprune: :func:`read_headers` reads each array's shape
and dtype without its data (a ``.npz``'s members are not decompressed), so a file is checked
(:mod:`onnxprune.inputs.check`) before anything large is read, and its arrays are read only when
a :class:`Part` is loaded. Pickled arrays are refused everywhere (``allow_pickle=False``): a
``.npz`` from someone else cannot run code. :func:`read_npz` serves the other ``.npz`` files the
CLI takes (scores, masks), with the same safety.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from onnxprune.errors import InputDataError
from onnxprune.inputs.check import (SAVE_HINT, Header, check_arrays, coerce, map_names)
from onnxprune.inputs.signature import InputSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
ARRAY_EXTENSIONS = (".npy", ".npz")
_NPY_MAGIC = b"\x93NUMPY"


@dataclass
class Part:
    """A slice of the user's data: ``count`` samples (None: one feed, no sample axis), loaded
    on demand as ``{input name: array}``, checked and in the model's dtypes. ``load(limit)``
    reads only the first ``limit`` samples where the source allows (files are read up to what is
    needed, never whole: ``--calibration-samples 2`` on a 1.5 GB file reads two samples);
    ``load(limit, start)`` reads samples ``start`` to ``limit`` only (a window: validation
    streams a large file one batch at a time)."""

    count: Optional[int]
    load: Callable[..., Dict[str, np.ndarray]]
    label: str


def array_kind(path: Path) -> str:
    """``"npz"`` or ``"npy"``: by suffix, else by the file's first bytes (``np.load`` reads
    either whatever the name)."""
    suffix = path.suffix.lower()
    if suffix in ARRAY_EXTENSIONS:
        return suffix[1:]
    if zipfile.is_zipfile(path):
        return "npz"
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            return "npy"
    raise InputDataError(f"'{path}' is neither a .npz/.npy file nor a folder; {SAVE_HINT}")


def read_headers(path: Path, kind: str) -> Dict[str, Header]:
    """Shape and dtype of each array in the file (a ``.npy``'s one array under ``""``), read
    from the headers alone."""
    try:
        if kind == "npy":
            with open(path, "rb") as f:
                return {"": _header(f)}
        out = {}
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    out[info.filename[: -len(".npy")]] = _header(f)
        return out
    except Exception as exc:
        raise InputDataError(f"'{path}' is not a readable .npz/.npy file ({exc}); "
                             f"{SAVE_HINT}") from None


def _header(f) -> Header:
    shape, _, dtype = _read_header(f)
    return shape, dtype


def _read_header(f) -> tuple:
    """(shape, fortran order, dtype) from the ``.npy`` stream ``f``, left at its data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), fortran, np.dtype(dtype)


def file_part(path: Path, specs: Sequence[InputSpec], samples: bool, single_ok: bool = False,
              want: Optional[Mapping[str, Sequence[int]]] = None,
              extra_ok: bool = False) -> Part:
    """One ``.npz``/``.npy`` file as a :class:`Part`, checked from its headers now and read
    (and coerced) when loaded. A ``.npy`` serves a one-input model."""
    kind = array_kind(path)
    if kind == "npy" and len(specs) != 1:
        raise InputDataError(f"'{path}' is a .npy (one array) but the model has {len(specs)} "
                             f"inputs ({', '.join(s.name for s in specs)}); use a .npz keyed "
                             "by input name")
    headers = read_headers(path, kind)
    if kind == "npy":
        names = {"": specs[0].name}
    else:
        names = map_names(str(path), specs, list(headers), extra_ok)
    count, adds_axis = check_arrays(str(path), specs, {names[k]: v for k, v in headers.items()
                                                       if k in names},
                                    samples, single_ok, want)
    by_input = {v: k for k, v in names.items()}

    def load(limit: Optional[int] = None, start: int = 0) -> Dict[str, np.ndarray]:
        try:
            raw = {}
            for s in specs:
                whole = adds_axis[s.name] or not samples
                rows = None if (limit is None or whole) else limit
                first = 0 if whole else start
                if kind == "npy":
                    with open(path, "rb") as f:
                        raw[s.name] = _read_rows(f, rows, str(path), first)
                else:
                    with zipfile.ZipFile(path) as zf, zf.open(by_input[s.name] + ".npy") as f:
                        raw[s.name] = _read_rows(f, rows, str(path), first)
        except InputDataError:
            raise
        except Exception as exc:
            raise InputDataError(f"'{path}' is not a readable .npz/.npy file ({exc}); "
                                 f"{SAVE_HINT}") from None
        return {s.name: coerce(str(path), s, raw[s.name], adds_axis[s.name]) for s in specs}

    return Part(count, load, path.name)


def _read_rows(f, rows: Optional[int], where: str, start: int = 0) -> np.ndarray:
    """The array in the ``.npy`` stream ``f``, only its entries ``start`` to ``rows`` along
    axis 0 when given (C order: those are consecutive bytes, the ones before skipped; a ``.npz``
    member is streamed, decompressed only as far as needed). Pickled (object) arrays are
    refused."""
    shape, fortran, dtype = _read_header(f)
    if dtype.hasobject:
        raise InputDataError(f"'{where}' holds Python objects (a pickled array), which "
                             "onnxprune never loads; save plain numeric arrays")
    first = 0
    if shape and not fortran:
        stop = shape[0] if rows is None else min(int(rows), shape[0])
        first = min(int(start), stop)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if first:
            f.seek(first * row_bytes, 1)
        shape = (stop - first,) + tuple(shape[1:])
    count = int(np.prod(shape, dtype=np.int64))
    data = f.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError("the array data is truncated")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    if fortran:  # rows are not consecutive: read whole, then cut
        arr = arr.reshape(shape[::-1]).T
        return arr[start:rows].copy() if shape else arr.copy()
    return arr.reshape(shape).copy()


def arrays_part(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec], label: str,
                samples: bool, want: Optional[Mapping[str, Sequence[int]]] = None,
                extra_ok: bool = False) -> Part:
    """In-memory arrays keyed by input name (or ``arr_0, arr_1, ...``), checked like a file."""
    names = map_names(label, specs, list(arrays), extra_ok)
    arrays = {names[k]: np.asarray(v) for k, v in arrays.items() if k in names}
    count, adds_axis = check_arrays(label, specs,
                                    {k: (v.shape, v.dtype) for k, v in arrays.items()},
                                    samples, want=want)
    conformed = {s.name: coerce(label, s, arrays[s.name], adds_axis[s.name]) for s in specs}
    def load(limit: Optional[int] = None, start: int = 0) -> Dict[str, np.ndarray]:
        if count is None or (limit is None and not start):
            return dict(conformed)
        return {k: v if v.ndim == 0 else v[start:limit] for k, v in conformed.items()}

    return Part(count, load, label)


def read_npz(path, what: str) -> Dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` by key (pickles refused); ``what`` names the
    file in the error (e.g. ``--scores``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise InputDataError(f"{what} '{path}' is not a readable .npz file ({exc})") from None
