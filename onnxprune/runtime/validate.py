"""Validation: model inputs, validity checks, running models, and comparing their outputs.

This module owns everything the *validate* step needs:

* the model's input signature and the concrete shapes used for it (:func:`resolve_input_shapes`,
  shared with :mod:`onnxprune.ops.macs` so both fill dynamic dimensions the same way);
* inputs, generated from that signature (:func:`make_inputs`) or loaded from a user's ``.npz``
  (:func:`load_inputs`), and the CLI's ``--input-shape`` text (:func:`parse_input_shapes`);
* validity: ``onnx.checker`` plus an onnxruntime session (:func:`check_valid`);
* running a model in onnxruntime (:func:`run_model`);
* comparing outputs (:func:`compare`), with results as objects that carry the statistics and also
  answer yes/no (:meth:`Comparison.passed`), as Polygraphy's comparator does.

Default sizes for dynamic dimensions (symbolic like ``"batch"``, or unnamed):

* axis 0 is the batch: ``batch`` (default 1);
* a rank-4 input is taken as an image: its unknown spatial axes become 224 — axes 2 and 3
  (NCHW), or axes 1 and 2 when the last axis is a known size of at most 4 (NHWC);
* any other unknown axis becomes 16 (sequence lengths, feature counts);
* a symbolic name is one size everywhere: ``seq`` in ``input_ids`` and ``attention_mask`` gets one
  value, and an override for one input fixes it for every input that shares the name.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union)

import numpy as np
import onnx

from onnxprune.errors import InputDataError, OptionError
from onnxprune.model.io import ModelHandle, is_external, iter_tensors, load, save

ModelOrPath = Union[str, os.PathLike, onnx.ModelProto, ModelHandle]
Dim = Union[int, str, None]  # a static size, a symbolic name, or unknown

#: Batch size for an unknown axis 0 (``make_inputs(batch=...)`` overrides it).
DEFAULT_BATCH = 1
#: Size of an unknown spatial axis of a rank-4 (image-like) input.
DEFAULT_IMAGE_SIZE = 224
#: Size of any other unknown axis.
DEFAULT_DIM = 16
#: Generated integer inputs are drawn from ``0..INT_HIGH-1``: small enough to be valid token ids,
#: class indices or gather positions in nearly every model.
INT_HIGH = 10
_PROTO_LIMIT = 2_000_000_000  # protobuf cannot serialize 2 GiB: such models go through a file
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}
_SHAPE_FORM = "NAME:DIMS, like input:1x3x224x224 or input:1,3,224,224"


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


# -- input signature --------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """One runtime input of a model: name, ONNX element type and declared dims (None if no
    shape is declared at all)."""

    name: str
    elem_type: int
    dims: Optional[Tuple[Dim, ...]]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    @property
    def declared(self) -> str:
        """The declared shape as text, e.g. ``[batch, 3, 224, 224]`` (``?`` for unnamed)."""
        if self.dims is None:
            return "<no shape>"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


def input_signature(model: ModelOrPath) -> List[InputSpec]:
    """The model's runtime inputs in graph order; graph inputs that are initializers (old
    exporters list every weight as an input) are weights, not inputs, and are left out."""
    proto = _proto(model)
    init_names = {t.name for t in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in init_names:
            continue
        kind = vi.type.WhichOneof("value")
        if kind != "tensor_type":
            raise InputDataError(f"input '{vi.name}' is a {kind or 'untyped value'}, not a "
                                 "tensor; onnxprune can only feed tensor inputs")
        tt = vi.type.tensor_type
        dims: Optional[Tuple[Dim, ...]] = None
        if tt.HasField("shape"):
            dims = tuple(_dim(d) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, tt.elem_type, dims))
    return specs


#: dim_param spellings exporters use for "unknown" rather than as a shared name (paddle2onnx
#: writes "?" for every dynamic dim; tying those together would force unrelated dims equal).
_ANONYMOUS_DIMS = {"?", "-1", "None", "none", "unk", "dynamic"}


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param and d.dim_param not in _ANONYMOUS_DIMS:
        return d.dim_param
    return None


def parse_input_shapes(specs: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """``["x:1x3x224x224", "ids:1,128"]`` -> ``{"x": (1, 3, 224, 224), "ids": (1, 128)}``.

    The name is everything before the *last* colon, so TensorFlow names like ``input:0`` work
    (``input:0:1x3x224x224``). Raises :class:`OptionError` with the expected form.
    """
    shapes: Dict[str, Tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims_text = str(spec).strip().rpartition(":")
        if not sep or not name or not dims_text.strip():
            raise OptionError(f"--input-shape '{spec}' is not {_SHAPE_FORM}")
        parts = re.split(r"[x,]", dims_text.strip())
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise OptionError(f"--input-shape '{spec}': dims '{dims_text}' must be positive "
                              f"integers; expected {_SHAPE_FORM}") from None
        if any(d <= 0 for d in dims):
            raise OptionError(f"--input-shape '{spec}': every dim must be a positive integer; "
                              f"expected {_SHAPE_FORM}")
        if name in shapes:
            raise OptionError(f"--input-shape gives input '{name}' twice; give it once")
        shapes[name] = dims
    return shapes


def resolve_input_shapes(model: ModelOrPath,
                         overrides: Optional[Mapping[str, Sequence[int]]] = None,
                         batch: int = DEFAULT_BATCH,
                         require_all: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Concrete shapes for the runtime inputs: declared static dims, then ``overrides`` by
    name, then the defaults in this module's docstring for dynamic dims.

    Raises :class:`OptionError` for an override naming no input (the real names are listed), an
    override of the wrong rank or contradicting a static dim, and — when ``require_all`` — an
    input that declares no shape and has no override (with ``require_all=False`` such inputs
    are left out of the result).
    """
    specs = input_signature(model)
    shapes = _resolve(specs, overrides, batch, require_all=require_all)
    return {k: v for k, v in shapes.items() if v is not None}


def _resolve(specs: Sequence[InputSpec], overrides: Optional[Mapping[str, Sequence[int]]],
             batch: int, require_all: bool) -> Dict[str, Optional[Tuple[int, ...]]]:
    overrides = {k: tuple(int(d) for d in v) for k, v in (overrides or {}).items()}
    if batch < 1:
        raise OptionError(f"batch must be a positive integer, got {batch}")
    names = [s.name for s in specs]
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise OptionError(f"--input-shape names {', '.join(repr(u) for u in unknown)}, which "
                          f"the model has no input called; its inputs are: "
                          f"{', '.join(names) or '(none)'}")
    symbols: Dict[str, int] = {}
    # Overrides bind symbolic names first, so every input sharing a name follows the override.
    for spec in specs:
        if spec.name not in overrides:
            continue
        shape = overrides[spec.name]
        if any(d <= 0 for d in shape):
            raise OptionError(f"input shape for '{spec.name}' has a non-positive dim: {shape}")
        if spec.dims is None:
            continue
        if len(shape) != len(spec.dims):
            raise OptionError(f"input '{spec.name}' has rank {len(spec.dims)} "
                              f"{spec.declared}; the given shape {_fmt(shape)} has rank "
                              f"{len(shape)}")
        for axis, (declared, given) in enumerate(zip(spec.dims, shape)):
            if isinstance(declared, int) and declared != given:
                raise OptionError(f"dim {axis} of input '{spec.name}' is fixed to {declared} "
                                  f"by the model {spec.declared}; the given shape "
                                  f"{_fmt(shape)} says {given}")
            if isinstance(declared, str):
                bound = symbols.setdefault(declared, given)
                if bound != given:
                    raise OptionError(f"dim '{declared}' is {bound} in one --input-shape and "
                                      f"{given} in the one for '{spec.name}'; inputs sharing "
                                      "a dim name must agree")
    shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
    for spec in specs:
        if spec.name in overrides:
            shapes[spec.name] = overrides[spec.name]
            continue
        if spec.dims is None:
            if require_all:
                raise OptionError(f"input '{spec.name}' declares no shape; pass "
                                  f"--input-shape {spec.name}:DIMS (e.g. "
                                  f"{spec.name}:1x3x224x224)")
            shapes[spec.name] = None
            continue
        dims = []
        for axis, d in enumerate(spec.dims):
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str) and d in symbols:
                dims.append(symbols[d])
            else:
                value = _default_dim(spec.dims, axis, batch)
                if isinstance(d, str):
                    symbols[d] = value
                dims.append(value)
        shapes[spec.name] = tuple(dims)
    return shapes


def _default_dim(dims: Tuple[Dim, ...], axis: int, batch: int) -> int:
    if axis == 0:
        return batch
    if len(dims) == 4:
        last = dims[3]
        nhwc = isinstance(last, int) and last <= 4 and not (isinstance(dims[1], int)
                                                             and dims[1] <= 4)
        spatial = (1, 2) if nhwc else (2, 3)
        if axis in spatial:
            return DEFAULT_IMAGE_SIZE
    return DEFAULT_DIM


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


# -- inputs -----------------------------------------------------------------------------------
def make_inputs(model: ModelOrPath,
                shapes: Optional[Mapping[str, Sequence[int]]] = None, seed: int = 0,
                batch: int = DEFAULT_BATCH) -> Dict[str, np.ndarray]:
    """Seeded random inputs from the model's own input signature.

    Shapes come from :func:`resolve_input_shapes` (``shapes`` overrides by name). Values by
    element type:

    * float (fp16/bf16/fp32/fp64): standard normal;
    * integers: ``0..9`` (valid token ids / indices almost everywhere); ``uint8``: ``0..255``
      (image pixels); an integer input whose name contains ``mask`` gets all ones (attend
      everywhere), one containing ``type`` or ``segment`` all zeros (BERT token types have a
      vocabulary of 2);
    * bool: fair coin flips.

    >>> make_inputs(model, {"pixels": (2, 3, 64, 64)})       # doctest: +SKIP
    {'pixels': array([...], dtype=float32)}
    """
    specs = input_signature(model)
    resolved = _resolve(specs, shapes, batch, require_all=True)
    rng = np.random.default_rng(seed)
    inputs: Dict[str, np.ndarray] = {}
    for spec in specs:
        inputs[spec.name] = np.asarray(_random_tensor(spec, resolved[spec.name], rng))
    return inputs


def _random_tensor(spec: InputSpec, shape: Tuple[int, ...], rng: np.random.Generator
                   ) -> np.ndarray:
    et = spec.elem_type
    if et in _FLOAT_TYPES:
        return rng.standard_normal(shape).astype(spec.dtype)
    if et == onnx.TensorProto.BOOL:
        return rng.random(shape) < 0.5
    if et == onnx.TensorProto.STRING or et == onnx.TensorProto.UNDEFINED:
        raise InputDataError(f"input '{spec.name}' has element type "
                             f"{onnx.TensorProto.DataType.Name(et)}, which onnxprune cannot "
                             "generate; pass real inputs with --inputs FILE.npz")
    dtype = spec.dtype
    if dtype.kind in "iu":
        lowered = spec.name.lower()
        if "mask" in lowered:
            return np.ones(shape, dtype=dtype)
        if "type" in lowered or "segment" in lowered:
            return np.zeros(shape, dtype=dtype)
        high = 256 if dtype == np.uint8 else INT_HIGH
        return rng.integers(0, high, size=shape).astype(dtype)
    raise InputDataError(f"input '{spec.name}' has element type "
                         f"{onnx.TensorProto.DataType.Name(et)}, which onnxprune cannot "
                         "generate; pass real inputs with --inputs FILE.npz")


def load_inputs(path: Union[str, os.PathLike], model: ModelOrPath,
                shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, np.ndarray]:
    """Inputs from a user's ``.npz`` keyed by input name (a ``.npy`` for a one-input model).

    Every runtime input must be present and nothing else; each array must have the declared
    rank, the model's static dims, one size per shared symbolic dim, and the shape in
    ``shapes`` when given. Floats are cast to the input's float type (numpy's float64 default
    into a float32 model is the common case) and integers to its integer type when the values
    fit; any other dtype mismatch is an error. Raises :class:`InputDataError` naming the input
    and the expected shape/dtype.
    """
    specs = input_signature(model)
    data = _read_arrays(Path(path), specs)
    expected = {s.name for s in specs}
    missing = [s for s in specs if s.name not in data]
    extra = sorted(k for k in data if k not in expected)
    if missing:
        want = ", ".join(f"'{s.name}' {s.declared} {_type_name(s)}" for s in missing)
        raise InputDataError(f"'{path}' has no array for input(s) {want}; save one array per "
                             "input with np.savez(path, **{name: array})")
    if extra:
        raise InputDataError(f"'{path}' has array(s) {', '.join(repr(e) for e in extra)} that "
                             f"are not model inputs; the inputs are: "
                             f"{', '.join(s.name for s in specs)}")
    shapes = {k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
    symbols: Dict[str, Tuple[int, str]] = {}
    out: Dict[str, np.ndarray] = {}
    for spec in specs:
        arr = data[spec.name]
        _check_shape(spec, arr, shapes.get(spec.name), symbols, path)
        out[spec.name] = _cast(spec, arr, path)
    return out


def _read_arrays(path: Path, specs: Sequence[InputSpec]) -> Dict[str, np.ndarray]:
    if not path.is_file():
        raise InputDataError(f"input file '{path}' does not exist; pass a .npz with one array "
                             "per model input")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputDataError(f"'{path}' is not a readable .npz/.npy file ({exc}); save inputs "
                             "with np.savez(path, **{name: array})") from None
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            raise InputDataError(f"'{path}' holds a single array but the model has "
                                 f"{len(specs)} inputs ({', '.join(s.name for s in specs)}); "
                                 "use a .npz keyed by input name")
        return {specs[0].name: loaded}
    with loaded:
        return {k: loaded[k] for k in loaded.files}


def _check_shape(spec: InputSpec, arr: np.ndarray, want: Optional[Tuple[int, ...]],
                 symbols: Dict[str, Tuple[int, str]], path) -> None:
    shape = tuple(arr.shape)
    if want is not None and shape != want:
        raise InputDataError(f"input '{spec.name}' in '{path}' has shape {_fmt(shape)}; "
                             f"--input-shape asks for {_fmt(want)}")
    if spec.dims is None:
        return
    if len(shape) != len(spec.dims):
        raise InputDataError(f"input '{spec.name}' in '{path}' has shape {_fmt(shape) or '()'} "
                             f"(rank {len(shape)}); the model expects {spec.declared} "
                             f"(rank {len(spec.dims)}) {_type_name(spec)}")
    for axis, (declared, got) in enumerate(zip(spec.dims, shape)):
        if isinstance(declared, int) and declared != got:
            raise InputDataError(f"input '{spec.name}' in '{path}' has shape {_fmt(shape)}; "
                                 f"the model expects {spec.declared} (dim {axis} must be "
                                 f"{declared})")
        if isinstance(declared, str):
            seen = symbols.setdefault(declared, (got, spec.name))
            if seen[0] != got:
                raise InputDataError(f"dim '{declared}' is {seen[0]} in input '{seen[1]}' but "
                                     f"{got} in input '{spec.name}' ('{path}'); inputs "
                                     "sharing a dim name must agree")


def _cast(spec: InputSpec, arr: np.ndarray, path) -> np.ndarray:
    target = spec.dtype
    if arr.dtype == target:
        return arr
    problem = f"input '{spec.name}' in '{path}' is {arr.dtype}; the model expects " \
              f"{_type_name(spec)} {spec.declared}"
    if spec.elem_type in _FLOAT_TYPES and arr.dtype.kind == "f":
        return arr.astype(target)
    if target.kind in "iu" and arr.dtype.kind in "iu":
        info = np.iinfo(target)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(target)
        raise InputDataError(f"{problem}, and its values do not fit {target}")
    raise InputDataError(problem)


def _type_name(spec: InputSpec) -> str:
    return onnx.TensorProto.DataType.Name(spec.elem_type).lower()


# -- validity and running ---------------------------------------------------------------------
def check_valid(model: ModelOrPath, full_check: bool = True) -> None:
    """Raise :class:`InvalidOutputModel` unless the model passes ``onnx.checker`` (with strict
    shape inference when ``full_check``) and onnxruntime (CPU) can load it.

    Pass ``full_check=False`` for a model whose *input* already failed the full check: pruning
    cannot repair what the exporter wrote, so the output is held to the input's level.

    A path is checked as a file: the checker and onnxruntime read large and external-data
    models themselves, so **pass the saved path for large models**. A proto or handle is
    checked in memory when it has no external data and fits protobuf's 2 GiB limit; otherwise
    it is first written to a temporary folder (the checker resolves external data relative to
    the model file, so an in-memory proto cannot point it at the handle's folder).
    """
    with _source(model, allow_external_folder=False) as (source, _):
        try:
            checked = _proto(model) if isinstance(source, bytes) else source
            onnx.checker.check_model(checked, full_check=full_check)
        except Exception as exc:
            raise InvalidOutputModel("onnx.checker", _message(exc)) from exc
        _ort_session(source, None)


def open_session(model: ModelOrPath):
    """An onnxruntime ``InferenceSession`` on the CPU provider (default graph optimizations).

    A handle's external data is read from its folder without copying. Raises
    :class:`InvalidOutputModel` when onnxruntime refuses the model.
    """
    with _source(model, allow_external_folder=True) as (source, folder):
        # A temporary file made for a large proto may go once the session is built: onnxruntime
        # has read (or, on POSIX, mapped) it by then.
        return _ort_session(source, folder)


def _ort_session(source: Union[bytes, str], folder: Optional[str]):
    import onnxruntime as ort  # deferred: importing onnxruntime costs ~0.3 s

    options = ort.SessionOptions()
    # Failures reach the user through our exceptions; onnxruntime's own log would repeat them
    # (and warn about unused initializers, which is noise here).
    options.log_severity_level = 4
    if folder is not None:
        # Lets a proto given as bytes find its external data files.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         folder)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidOutputModel("onnxruntime", _message(exc)) from exc


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
            raise InvalidOutputModel("onnxruntime", _message(exc)) from exc
        raise inputs_error("inputs", feed, exc, "pass --input-shape NAME:DIMS with the sizes "
                           "the model was exported for, or real inputs with --inputs FILE.npz"
                           ) from None
    return dict(zip(names, results))


def inputs_error(what: str, feed: Mapping[str, np.ndarray], exc: BaseException,
                 advice: str) -> InputDataError:
    """The error for inputs onnxruntime could not run the user's model on: the shapes fed
    (``what`` names them), onnxruntime's first line, and ``advice``."""
    fed = ", ".join(f"{k}:{_fmt(np.shape(v)) or 'scalar'} {np.asarray(v).dtype}"
                    for k, v in feed.items())
    return InputDataError(f"onnxruntime could not run the model on {what} {fed} "
                          f"({_message(exc).splitlines()[0][:300]}); {advice}")


@contextlib.contextmanager
def _source(model: ModelOrPath, allow_external_folder: bool
            ) -> Iterator[Tuple[Union[bytes, str], Optional[str]]]:
    """(bytes or a path for onnx/onnxruntime, folder holding external data or None)."""
    if isinstance(model, (str, os.PathLike)):
        yield str(model), None
        return
    handle = model if isinstance(model, ModelHandle) else ModelHandle(model=model)
    proto = handle.model
    external = any(is_external(t) for t in iter_tensors(proto.graph))
    rewritten = bool(handle._external_updates)  # noqa: SLF001 - io's handle, same package
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


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text[:2000] if text else type(exc).__name__


# -- comparison -------------------------------------------------------------------------------
_EPS = 1e-12  # keeps relative errors finite for all-zero references


@dataclass
class OutputStats:
    """How one output of a candidate model differs from the reference.

    * ``max_abs``: ``max |candidate - reference|``.
    * ``rel_error``: ``max_abs / max |reference|`` — the worst error as a fraction of the
      output's own scale; this is what :meth:`Comparison.passed` gates on (0 if both are all
      zero, ``inf`` if only the reference is).
    * ``mean_rel``: ``mean |candidate - reference| / (mean |reference| + 1e-12)`` — the typical
      error relative to the typical magnitude.
    * ``cosine``: cosine similarity of the flattened outputs (1.0 when both are all zero, 0.0
      when exactly one is).
    * ``top1_agreement``: fraction of positions whose argmax over the class axis agrees, for
      outputs that look like class scores (see :func:`class_axis`), else None. Informative,
      never gated.

    Statistics are computed in float64 over positions where both values are finite; positions
    where both hold the same inf/nan are equal. ``reason`` is set when the output cannot pass
    at all (missing, shape mismatch, a non-finite value where the reference is finite); its
    numeric fields are then ``inf``/``nan``.
    """

    name: str
    max_abs: float
    mean_rel: float
    cosine: float
    top1_agreement: Optional[float] = None
    rel_error: float = 0.0
    ref_scale: float = 0.0  # max |reference|
    shape: Tuple[int, ...] = ()
    candidate_shape: Optional[Tuple[int, ...]] = None
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        """True when the output was comparable (no ``reason``); says nothing about tolerance."""
        return self.reason is None

    def passed(self, max_error: float) -> bool:
        return self.reason is None and self.rel_error <= max_error

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape),
            "candidate_shape": None if self.candidate_shape is None else
            list(self.candidate_shape),
            "max_abs": _finite(self.max_abs), "rel_error": _finite(self.rel_error),
            "mean_rel": _finite(self.mean_rel), "cosine": _finite(self.cosine),
            "top1_agreement": _finite(self.top1_agreement),
            "ref_scale": _finite(self.ref_scale), "reason": self.reason,
        }


@dataclass
class Comparison:
    """Per-output statistics of a candidate model against a reference, answering yes/no too.

    >>> x = make_inputs(model)                                             # doctest: +SKIP
    >>> cmp = compare(run_model(model, x), run_model(pruned, x))           # doctest: +SKIP
    >>> cmp.passed(0.01), cmp.max_abs, cmp.worst_cosine                    # doctest: +SKIP
    (True, 0.0123, 0.99991)
    """

    outputs: List[OutputStats] = field(default_factory=list)
    extra_outputs: List[str] = field(default_factory=list)  # in candidate only: not compared

    def __getitem__(self, name: str) -> OutputStats:
        for stats in self.outputs:
            if stats.name == name:
                return stats
        raise KeyError(name)

    @property
    def max_abs(self) -> float:
        """Worst absolute error over all outputs (``inf`` if one could not be compared)."""
        return max((s.max_abs for s in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        """Worst :attr:`OutputStats.rel_error` over all outputs: the quantity that is gated."""
        return max((s.rel_error for s in self.outputs), default=0.0)

    @property
    def worst_cosine(self) -> float:
        """Lowest cosine over the comparable outputs (nan when none was comparable)."""
        cosines = [s.cosine for s in self.outputs if s.ok]
        if not cosines:
            return float("nan") if self.outputs else 1.0
        return min(cosines)

    def passed(self, max_error: Union[float, Mapping[str, float]]) -> bool:
        """True when every output is comparable and its relative max error
        (``max |candidate - reference| / max |reference|``) is at most ``max_error``.

        ``max_error`` is one tolerance for all outputs, or a mapping ``{output name: tolerance}``
        (outputs not in the mapping use its ``"*"`` entry, else are not gated).
        """
        return not self.failures(max_error)

    def failures(self, max_error: Union[float, Mapping[str, float]]) -> List[str]:
        """One line per output that does not pass, saying why (empty when all pass)."""
        lines = []
        for stats in self.outputs:
            tol = tolerance_for(max_error, stats.name)
            if stats.reason is not None:
                lines.append(f"output '{stats.name}': {stats.reason}")
            elif tol is not None and not stats.rel_error <= tol:
                lines.append(f"output '{stats.name}': relative max error {stats.rel_error:.3g} "
                             f"(max abs {stats.max_abs:.3g} on a scale of "
                             f"{stats.ref_scale:.3g}) exceeds {tol:g}")
        return lines

    def to_dict(self) -> dict:
        return {
            "max_abs": _finite(self.max_abs), "max_rel_error": _finite(self.max_rel_error),
            "worst_cosine": _finite(self.worst_cosine),
            "outputs": [s.to_dict() for s in self.outputs],
            "extra_outputs": list(self.extra_outputs),
        }


def tolerance_for(max_error: Union[float, Mapping[str, float]], name: str) -> Optional[float]:
    """The tolerance for output ``name``: ``max_error`` itself, or its entry for ``name`` (else
    its ``"*"`` entry) when it is a mapping; None means the output is not gated."""
    if isinstance(max_error, Mapping):
        value = max_error.get(name, max_error.get("*"))
        return None if value is None else float(value)
    return float(max_error)


def _finite(x: Optional[float]) -> Optional[float]:
    # JSON has no inf/nan; a failed output says why in its ``reason``.
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def class_axis(shape: Sequence[int], dtype: np.dtype) -> Optional[int]:
    """The class axis of an output that looks like class scores, else None.

    Rule: a floating-point output of rank 2 (``[batch, classes]``) or rank 3 (``[batch, seq,
    classes]``: language-model logits, CTC outputs) whose last axis has more than one element;
    the last axis holds the classes. Rank 4+ outputs (NCHW segmentation maps, feature maps) are
    ambiguous and get no top-1 statistic.
    """
    if np.dtype(dtype).kind != "f" or len(shape) not in (2, 3) or shape[-1] < 2:
        return None
    return len(shape) - 1


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
            ) -> Comparison:
    """Compare each reference output with the candidate output of the same name.

    See :class:`OutputStats` for the definitions; an output missing from ``candidate`` or of a
    different shape fails with a reason. Outputs only the candidate has are listed in
    ``extra_outputs`` and not compared.
    """
    stats = [_compare_one(name, np.asarray(ref), candidate.get(name))
             for name, ref in reference.items()]
    extra = [k for k in candidate if k not in reference]
    return Comparison(stats, extra)


def _failed(name: str, shape, cand_shape, reason: str) -> OutputStats:
    inf, nan = float("inf"), float("nan")
    return OutputStats(name, max_abs=inf, mean_rel=inf, cosine=nan, top1_agreement=None,
                       rel_error=inf, ref_scale=nan, shape=tuple(shape),
                       candidate_shape=cand_shape, reason=reason)


def _compare_one(name: str, ref: np.ndarray, cand: Optional[np.ndarray]) -> OutputStats:
    if cand is None:
        return _failed(name, ref.shape, None, "missing from the candidate's outputs")
    cand = np.asarray(cand)
    if ref.shape != cand.shape:
        return _failed(name, ref.shape, tuple(cand.shape),
                       f"shape {_fmt(cand.shape) or '()'} differs from the reference's "
                       f"{_fmt(ref.shape) or '()'}")
    a = ref.astype(np.float64).ravel()
    b = cand.astype(np.float64).ravel()
    fa, fb = np.isfinite(a), np.isfinite(b)
    same_nonfinite = ~fa & ~fb & ((a == b) | (np.isnan(a) & np.isnan(b)))
    bad = ~(fa & fb) & ~same_nonfinite
    if bad.any():
        return _failed(name, ref.shape, tuple(cand.shape),
                       f"{int(bad.sum())} value(s) are inf/nan in one model but not the other")
    both = fa & fb
    a, b = a[both], b[both]
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_scale = float(np.abs(a).max()) if a.size else 0.0
    if ref_scale > 0:
        rel_error = max_abs / ref_scale
    else:
        rel_error = 0.0 if max_abs == 0 else float("inf")
    mean_rel = float(diff.mean() / (np.abs(a).mean() + _EPS)) if diff.size else 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        cosine = 1.0
    elif na == 0 or nb == 0:
        cosine = 0.0
    else:
        cosine = float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))
    top1 = None
    axis = class_axis(ref.shape, ref.dtype)
    if axis is not None and ref.size:
        top1 = float(np.mean(np.argmax(ref, axis=axis) == np.argmax(cand, axis=axis)))
    return OutputStats(name, max_abs=max_abs, mean_rel=mean_rel, cosine=cosine,
                       top1_agreement=top1, rel_error=rel_error, ref_scale=ref_scale,
                       shape=tuple(ref.shape), candidate_shape=tuple(cand.shape))


def _proto(model: ModelOrPath) -> onnx.ModelProto:
    if isinstance(model, ModelHandle):
        return model.model
    if isinstance(model, onnx.ModelProto):
        return model
    return load(model).model  # a path: graph only, external data stays on disk
