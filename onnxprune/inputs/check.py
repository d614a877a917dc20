"""The one check and coercion of user arrays against a model's input signature.

Every source of user data (a ``.npz``, a ``.npy``, a folder of them, a dict of arrays) goes
through :func:`map_names`, :func:`check_arrays` (on shapes and dtypes alone, before any data is
read) and :func:`coerce` (on the values, when they are read), so calibration and validation
accept the same files and say the same thing about a bad one. Each message is an
:class:`~onnxprune.errors.InputDataError` naming the input, the file (``where``) and what to do.

Two ways to read an array's axis 0:

* **feed** (``samples=False``, validation's ``--inputs``): the arrays are fed as they are, so
  every declared dim is checked, axis 0 included, and ``--input-shape`` shapes must match;
* **samples** (``samples=True``, calibration): axis 0 counts samples and is served in batches,
  so it is not checked against the model and must agree across inputs; with ``single_ok`` (a
  file in a folder) an array one rank lower is one sample.

In both, a symbolic dim shared by several inputs (``seq`` in ``input_ids`` and
``attention_mask``) must have one size. Floats are cast to the input's float type (numpy's
float64 default into a float32 model is the common case) and integers to its integer type when
the values fit; any other dtype mismatch is an error.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.errors import InputDataError
from onnxprune.inputs.signature import FLOAT_TYPES, InputSpec, fmt_shape, type_name

Header = Tuple[Tuple[int, ...], np.dtype]  # an array's shape and dtype, read without its data

#: How a user is told to save inputs (every message about a file's layout ends with it).
SAVE_HINT = "save one array per input with np.savez(path, **{name: array})"


def map_names(where: str, specs: Sequence[InputSpec], keys: List[str],
              extra_ok: bool = False) -> Dict[str, str]:
    """Array key -> input name: by name, or positionally for ``arr_0, arr_1, ...`` (what
    ``np.savez(path, a, b)`` writes). Every input must have an array and every array an input
    (``extra_ok``: arrays that are no input, such as labels beside validation inputs, are left
    out of the mapping instead)."""
    wanted = [s.name for s in specs]
    positional = [f"arr_{i}" for i in range(len(keys))]
    if keys and sorted(keys) == sorted(positional) and not set(keys) & set(wanted):
        if len(keys) != len(specs):
            raise InputDataError(f"'{where}' holds {len(keys)} unnamed arrays but the model has "
                                 f"{len(specs)} inputs ({', '.join(wanted)}); save them by "
                                 "name: np.savez(path, **{name: array})")
        return {f"arr_{i}": wanted[i] for i in range(len(keys))}
    missing = [s for s in specs if s.name not in keys]
    extra = sorted(k for k in keys if k not in wanted)
    if missing:
        want = ", ".join(f"'{s.name}' {s.declared} {type_name(s)}" for s in missing)
        raise InputDataError(f"'{where}' has no array for input(s) {want}; it holds "
                             f"{', '.join(repr(k) for k in keys) or 'nothing'}; {SAVE_HINT}")
    if extra and not extra_ok:
        raise InputDataError(f"'{where}' has array(s) {', '.join(repr(e) for e in extra)} that "
                             f"are not model inputs; the inputs are: {', '.join(wanted)}")
    return {k: k for k in keys if k in wanted}


def check_arrays(where: str, specs: Sequence[InputSpec], headers: Mapping[str, Header],
                 samples: bool, single_ok: bool = False,
                 want: Optional[Mapping[str, Sequence[int]]] = None
                 ) -> Tuple[Optional[int], Dict[str, bool]]:
    """Check each input's array shape and dtype (``headers`` by input name) against ``specs``.

    Returns (the number of samples, None in feed mode; which inputs need a sample axis added).
    ``want`` holds shapes asked for with ``--input-shape`` (feed mode).
    """
    want = {k: tuple(int(d) for d in v) for k, v in (want or {}).items()}
    counts: Dict[str, int] = {}
    adds_axis: Dict[str, bool] = {}
    symbols: Dict[str, Tuple[int, str]] = {}
    for spec in specs:
        shape, dtype = headers[spec.name]
        shape = tuple(int(d) for d in shape)
        check_dtype(where, spec, dtype)
        # A zero-length axis is an empty tensor: nothing to calibrate or compare on (a zero
        # sample count is said by the caller, which counts the samples).
        empty = [axis for axis, d in enumerate(shape) if d == 0 and not (samples and axis == 0)]
        if empty:
            raise InputDataError(f"input '{spec.name}' in '{where}' has shape "
                                 f"{fmt_shape(shape)}: axis {empty[0]} is empty (size 0); "
                                 "give arrays with at least one element along every axis")
        adds_axis[spec.name] = False
        if spec.name in want and shape != want[spec.name]:
            raise InputDataError(f"input '{spec.name}' in '{where}' has shape "
                                 f"{fmt_shape(shape)}; --input-shape asks for "
                                 f"{fmt_shape(want[spec.name])}")
        if spec.dims is None:  # no declared shape: trust the file (axis 0 = samples)
            if samples:
                counts[spec.name] = shape[0] if shape else 1
            continue
        rank = len(spec.dims)
        if samples and rank == 0:
            if shape:
                raise InputDataError(f"input '{spec.name}' is a scalar; '{where}' gives shape "
                                     f"{fmt_shape(shape)}: give one value (a 0-d array), used "
                                     "for every sample")
            continue
        full = shape
        if samples and single_ok and len(shape) == rank - 1:
            full = (1,) + shape
            adds_axis[spec.name] = True
        elif len(shape) != rank:
            tail = ""
            if samples:
                ranks = f"rank {rank}" + (f" (or {rank - 1} for one sample)" if single_ok else "")
                tail = f", so the array needs {ranks} with samples on axis 0"
            raise InputDataError(f"input '{spec.name}' in '{where}' has shape "
                                 f"{fmt_shape(shape)} (rank {len(shape)}); the model expects "
                                 f"{spec.declared} (rank {rank}) {type_name(spec)}{tail}")
        first = 1 if samples else 0  # a sample axis is served in batches, never fed as it is
        for axis in range(first, rank):
            declared, got = spec.dims[axis], full[axis]
            if isinstance(declared, int) and declared != got:
                raise InputDataError(f"input '{spec.name}' in '{where}' has shape "
                                     f"{fmt_shape(shape)}; the model expects {spec.declared} "
                                     f"(dim {axis} must be {declared})")
            if isinstance(declared, str):
                seen = symbols.setdefault(declared, (got, spec.name))
                if seen[0] != got:
                    raise InputDataError(f"dim '{declared}' is {seen[0]} in input '{seen[1]}' "
                                         f"but {got} in input '{spec.name}' ('{where}'); "
                                         "inputs sharing a dim name must agree")
        if samples:
            counts[spec.name] = full[0]
    if not samples:
        return None, adds_axis
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{k}': {v}" for k, v in counts.items())
        raise InputDataError(f"'{where}' holds different sample counts per input ({detail}); "
                             "axis 0 of every array is the sample axis")
    if not counts:
        raise InputDataError(f"'{where}' gives only scalar inputs; calibration needs at least "
                             "one input with samples on axis 0")
    return next(iter(counts.values())), adds_axis


def check_finite(where: str, name: str, arr: np.ndarray) -> None:
    """Raise naming the first sample (axis 0) of ``arr`` that holds NaN or infinity."""
    if arr.dtype.kind not in "fc" or not arr.size:
        return
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = np.argwhere(~finite)[0]
    value = arr[tuple(bad)]
    sample = f"sample {int(bad[0])} (index {tuple(int(i) for i in bad)})" if arr.ndim else "its value"
    count = int(arr.size - np.count_nonzero(finite))
    raise InputDataError(f"input '{name}' in '{where}' holds {value} at {sample}"
                         f"{f' and {count - 1} more non-finite values' if count > 1 else ''}; "
                         "onnxprune calibrates and validates only on finite data: fix or drop "
                         "those samples")


def check_dtype(where: str, spec: InputSpec, dtype: np.dtype) -> None:
    """Raise unless an array of ``dtype`` can serve ``spec`` (same type, float to float, or
    integer to integer; whether integer values fit is checked by :func:`coerce`)."""
    dtype = np.dtype(dtype)
    target = spec.dtype
    if dtype == target:
        return
    if spec.elem_type in FLOAT_TYPES and dtype.kind == "f":
        return
    if target.kind in "iu" and dtype.kind in "iu":
        return
    if spec.elem_type == onnx.TensorProto.STRING and dtype.kind in "US":
        return  # np.savez writes strings as unicode/bytes arrays (no pickle); fed as objects
    if dtype.kind == "O":  # pickled Python objects: never unpickled, so never usable
        raise InputDataError(f"input '{spec.name}' in '{where}' is object (an array of pickled "
                             f"Python objects, which onnxprune never loads); the model expects "
                             f"{type_name(spec)} {spec.declared}: save a numeric array")
    raise InputDataError(f"input '{spec.name}' in '{where}' is {dtype}; the model expects "
                         f"{type_name(spec)} {spec.declared}")


def coerce(where: str, spec: InputSpec, arr: np.ndarray, add_axis: bool = False) -> np.ndarray:
    """``arr`` in the input's dtype (with a sample axis added when ``add_axis``); integers that
    do not fit the input's integer type are an error, never wrapped around, and so are NaN or
    infinite floats (one NaN pixel would turn every statistic, and so every corrected bias, into
    NaN, or make every comparison meaningless)."""
    if add_axis:
        arr = arr[None]
    check_finite(where, spec.name, arr)
    target = spec.dtype
    if arr.dtype == target:
        return arr
    if spec.elem_type == onnx.TensorProto.STRING:
        return arr.astype(object)
    if target.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
        info = np.iinfo(target)
        if arr.min() < info.min or arr.max() > info.max:
            raise InputDataError(f"input '{spec.name}' in '{where}' is {arr.dtype}; the model "
                                 f"expects {type_name(spec)} {spec.declared}, and its values "
                                 f"do not fit {target}")
    return arr.astype(target)
