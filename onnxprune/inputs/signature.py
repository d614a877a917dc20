"""A model's input signature and the concrete shapes used for it.

This module owns :class:`InputSpec` (one runtime input: name, element type, declared dims),
:func:`input_signature`, the CLI's ``--input-shape`` text (:func:`parse_input_shapes`) and
:func:`resolve_input_shapes`, which fills dynamic dims the same way for generated inputs,
calibration and MAC counting (:func:`bind_input_shapes` turns dim-name bindings such as
``sequence=32`` into the whole shapes of the inputs declaring them, once per run). It also
holds the two spellings every input message shares: :func:`fmt_shape` and :func:`type_name`.

Default sizes for dynamic dimensions (symbolic like ``"batch"``, or unnamed):

* axis 0 is the batch: ``batch`` (default 1);
* a rank-4 input is taken as an image: its unknown spatial axes become 224 — axes 2 and 3
  (NCHW), or axes 1 and 2 when the last axis is a known size of at most 4 (NHWC);
* a symbolic dim whose name contains ``past`` (a KV-cache length) becomes 1;
* any other unknown axis becomes 16 (sequence lengths, feature counts);
* a symbolic name is one size everywhere: ``seq`` in ``input_ids`` and ``attention_mask`` gets one
  value, and an override for one input fixes it for every input that shares the name;
  ``--input-shape seq=32`` fixes it by name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.errors import InputDataError, ModelLoadError, OptionError
from onnxprune.model.io import ModelHandle, load

ModelOrPath = Union[str, os.PathLike, onnx.ModelProto, ModelHandle]
Dim = Union[int, str, None]  # a static size, a symbolic name, or unknown
#: One ``--input-shape`` entry: an input's whole shape (a tuple), or the size a symbolic dim
#: name is bound to (an int), e.g. ``{"pixels": (1, 3, 64, 64), "sequence": 32}``.
InputShape = Union[int, Tuple[int, ...]]

#: Batch size for an unknown axis 0 (``make_inputs(batch=...)`` overrides it).
DEFAULT_BATCH = 1
#: Size of an unknown spatial axis of a rank-4 (image-like) input.
DEFAULT_IMAGE_SIZE = 224
#: Size of any other unknown axis.
DEFAULT_DIM = 16
#: ONNX element types served as floats (numpy float data is cast to them).
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})
_SHAPE_FORM = ("NAME:DIMS, like input:1x3x224x224, input:1,3,224,224 or (Polygraphy's form) "
               "input:[1,3,224,224], or dim names with sizes, like batch=1,sequence=32")


def model_proto(model: ModelOrPath) -> onnx.ModelProto:
    """The proto of a proto, handle or path (a path is read graph only: external data stays on
    disk)."""
    if isinstance(model, ModelHandle):
        return model.model
    if isinstance(model, onnx.ModelProto):
        return model
    return load(model).model


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
    proto = model_proto(model)
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
    if d.HasField("dim_value") and d.dim_value >= 0:
        return int(d.dim_value)  # 0 too: a declared empty axis (refused by concrete_shapes)
    if d.HasField("dim_param") and d.dim_param and d.dim_param not in _ANONYMOUS_DIMS:
        return d.dim_param
    return None


def parse_input_shapes(specs: Sequence[str]) -> Dict[str, InputShape]:
    """``["x:1x3x224x224", "ids:1,128"]`` -> ``{"x": (1, 3, 224, 224), "ids": (1, 128)}``.

    Three spellings, several per text separated by ``;`` (and by spaces between bracketed or
    dim-name pieces):

    * ``NAME:DIMS`` with dims joined by ``x`` or ``,``; the name is everything before the *last*
      colon, so TensorFlow names like ``input:0`` work (``input:0:1x3x224x224``);
    * Polygraphy's ``NAME:[d0,d1,...]`` (``x:[]`` is a scalar), several in one text separated
      by spaces (``"x:[1,3,224,224] y:[1,10]"``);
    * dim names: ``batch=1,sequence=32`` binds the symbolic dims ``batch`` and ``sequence`` of
      every input that declares them. A binding is kept as an ``int`` value (an input's shape
      is a tuple), so ``{"batch": 1, "x": (1, 3, 8, 8)}`` holds one of each.

    Raises :class:`OptionError` naming the bad piece and the expected form.
    """
    shapes: Dict[str, InputShape] = {}
    for spec in specs:
        for part in str(spec).split(";"):
            if not part.strip():
                continue
            for piece, name, dims_text, kind in _shape_pieces(part):
                value: InputShape = (int(dims_text) if kind == "dim" else
                                     _parse_dims(piece, dims_text, kind == "bracketed"))
                if name in shapes:
                    what = "dim" if kind == "dim" else "input"
                    raise OptionError(f"--input-shape gives {what} '{name}' twice; give it once")
                shapes[name] = value
    return shapes


#: One Polygraphy-style ``NAME:[dims]`` piece: the name runs up to the ``:`` before ``[``.
_BRACKETED = re.compile(r"\s*(?P<piece>(?P<name>[^\[\]]*?):\[(?P<dims>[^\[\]]*)\])(?=\s|$)")
#: One dim-name binding ``NAME=SIZE`` (``batch=1``), separated from the next by ``,`` or spaces.
_BINDING = re.compile(r"[\s,]*(?P<piece>(?P<name>[^\s,=:\[\]]+)=(?P<size>[^\s,]*))")


def _shape_pieces(text: str) -> List[Tuple[str, str, str, str]]:
    """``(piece, name, dims text, kind)`` for each input or dim ``text`` gives a shape; kind is
    ``plain``, ``bracketed`` or ``dim`` (a ``NAME=SIZE`` binding, its size checked here)."""
    text = text.strip()
    if "[" not in text and "]" not in text and ":" not in text and "=" in text:
        return _bindings(text)
    if "[" not in text and "]" not in text:
        name, sep, dims_text = text.rpartition(":")
        if not sep or not name or not dims_text.strip():
            raise OptionError(f"--input-shape '{text}' is not {_SHAPE_FORM}")
        return [(text, name, dims_text.strip(), "plain")]
    pieces, pos = [], 0
    while text[pos:].strip():
        m = _BRACKETED.match(text, pos)
        if m is None or not m.group("name").strip():
            bad = text[pos:].split()[0]
            if "=" in bad and ":" not in bad:
                pieces += _bindings(bad)
                pos = text.index(bad, pos) + len(bad)
                continue
            raise OptionError(f"--input-shape '{bad}' is not {_SHAPE_FORM} (several bracketed "
                              "shapes are separated by spaces)")
        pieces.append((m.group("piece"), m.group("name").strip(), m.group("dims"), "bracketed"))
        pos = m.end()
    return pieces


def _bindings(text: str) -> List[Tuple[str, str, str, str]]:
    pieces, pos = [], 0
    while text[pos:].strip(" ,\t"):
        m = _BINDING.match(text, pos)
        if m is None:
            bad = text[pos:].strip(" ,\t").split(",")[0].split()[0]
            raise OptionError(f"--input-shape '{bad}' is not {_SHAPE_FORM}")
        size = m.group("size").strip()
        if not size.isdigit() or int(size) <= 0:
            raise OptionError(f"--input-shape '{m.group('piece')}': the size of dim "
                              f"'{m.group('name')}' must be a positive integer; expected "
                              f"{_SHAPE_FORM}")
        pieces.append((m.group("piece"), m.group("name"), size, "dim"))
        pos = m.end()
    return pieces


def _parse_dims(piece: str, dims_text: str, bracketed: bool) -> Tuple[int, ...]:
    parts = [p.strip() for p in re.split(r"[x,]", dims_text)]
    if bracketed and parts == [""]:
        return ()  # x:[] is a scalar
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise OptionError(f"--input-shape '{piece}': dims '{dims_text}' must be positive "
                          f"integers; expected {_SHAPE_FORM}") from None
    if any(d <= 0 for d in dims):
        raise OptionError(f"--input-shape '{piece}': every dim must be a positive integer; "
                          f"expected {_SHAPE_FORM}")
    return dims


def resolve_input_shapes(model: ModelOrPath,
                         overrides: Optional[Mapping[str, InputShape]] = None,
                         batch: int = DEFAULT_BATCH,
                         require_all: bool = True) -> Dict[str, Tuple[int, ...]]:
    """Concrete shapes for the runtime inputs: declared static dims, then ``overrides`` by
    name (an ``int`` value binds a symbolic dim name, see :func:`parse_input_shapes`), then the
    defaults in this module's docstring for dynamic dims.

    Raises :class:`OptionError` for an override naming no input (the real names are listed), an
    override of the wrong rank or contradicting a static dim, and — when ``require_all`` — an
    input that declares no shape and has no override (with ``require_all=False`` such inputs
    are left out of the result).
    """
    specs = input_signature(model)
    shapes = concrete_shapes(specs, overrides, batch, require_all=require_all)
    return {k: v for k, v in shapes.items() if v is not None}


def concrete_shapes(specs: Sequence[InputSpec], overrides: Optional[Mapping[str, InputShape]],
                    batch: int, require_all: bool) -> Dict[str, Optional[Tuple[int, ...]]]:
    """Each input's concrete shape (None for a shapeless input when not ``require_all``); see
    :func:`resolve_input_shapes`."""
    bindings = split_bindings(specs, overrides)
    overrides = {k: tuple(int(d) for d in v) for k, v in (overrides or {}).items()
                 if not _is_binding(v)}
    for spec in specs:
        empty = [axis for axis, d in enumerate(spec.dims or ()) if d == 0]
        if empty:
            raise ModelLoadError(f"input '{spec.name}' declares a zero-size dim {spec.declared} "
                                 f"(axis {empty[0]}): it can only hold empty tensors, which "
                                 "onnxprune cannot calibrate or validate on; re-export the "
                                 "model with a positive or symbolic size for that axis")
    if batch < 1:
        raise OptionError(f"batch must be a positive integer, got {batch}")
    names = [s.name for s in specs]
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise OptionError(f"--input-shape names {', '.join(repr(u) for u in unknown)}, which "
                          f"the model has no input called; its inputs are: "
                          f"{', '.join(names) or '(none)'}")
    symbols: Dict[str, int] = dict(bindings)
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
                              f"{spec.declared}; the given shape {fmt_shape(shape)} has rank "
                              f"{len(shape)}")
        for axis, (declared, given) in enumerate(zip(spec.dims, shape)):
            if isinstance(declared, int) and declared != given:
                raise OptionError(f"dim {axis} of input '{spec.name}' is fixed to {declared} "
                                  f"by the model {spec.declared}; the given shape "
                                  f"{fmt_shape(shape)} says {given}")
            if isinstance(declared, str):
                bound = symbols.setdefault(declared, given)
                if bound != given and declared in bindings:
                    raise OptionError(f"dim '{declared}' is bound to {bound} by --input-shape "
                                      f"{declared}={bound}, but the shape given for "
                                      f"'{spec.name}' says {given}; give one of them")
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


def _is_binding(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def split_bindings(specs: Sequence[InputSpec], overrides: Optional[Mapping[str, InputShape]]
                   ) -> Dict[str, int]:
    """The dim-name bindings of ``overrides`` (its ``int`` values: ``batch=1``), checked: each
    size positive, each name a symbolic dim some input declares (else :class:`OptionError`
    naming the symbols the model declares)."""
    bindings = {k: int(v) for k, v in (overrides or {}).items() if _is_binding(v)}
    if not bindings:
        return {}
    declared: List[str] = []
    for spec in specs:
        for d in spec.dims or ():
            if isinstance(d, str) and d not in declared:
                declared.append(d)
    unknown = [k for k in bindings if k not in declared]
    if unknown:
        have = (f"the symbolic dims its inputs declare are: {', '.join(declared)}" if declared
                else "its inputs declare no symbolic dims (give whole shapes, NAME:DIMS)")
        raise OptionError(f"--input-shape binds dim {', '.join(repr(u) for u in unknown)}, "
                          f"which no input of the model declares; {have}")
    bad = [k for k, v in bindings.items() if v <= 0]
    if bad:
        raise OptionError(f"--input-shape {bad[0]}={bindings[bad[0]]}: a dim size must be a "
                          "positive integer")
    return bindings


def bind_input_shapes(model: ModelOrPath, overrides: Optional[Mapping[str, InputShape]]
                      ) -> Optional[Dict[str, Tuple[int, ...]]]:
    """``overrides`` with its dim-name bindings applied: every input that declares a bound
    symbol gets its whole concrete shape (its other dynamic dims by the defaults), the inputs
    given by name keep theirs; what every shape consumer (shape inference, the channel graph,
    MACs, generated inputs, calibration) then reads by input name. Without bindings the
    overrides come back unchanged."""
    if not overrides or not any(_is_binding(v) for v in overrides.values()):
        return overrides  # type: ignore[return-value]
    specs = input_signature(model)
    bindings = split_bindings(specs, overrides)
    shapes = concrete_shapes(specs, overrides, DEFAULT_BATCH, require_all=False)
    out = {k: tuple(int(d) for d in v) for k, v in overrides.items() if not _is_binding(v)}
    for spec in specs:
        if any(isinstance(d, str) and d in bindings for d in spec.dims or ()):
            shape = shapes.get(spec.name)
            if shape is not None:
                out[spec.name] = shape
    return out


def _default_dim(dims: Tuple[Dim, ...], axis: int, batch: int) -> int:
    name = dims[axis]
    if isinstance(name, str) and "past" in name.lower():
        return 1  # a KV-cache length: the shortest non-empty past
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


def fmt_shape(shape: Sequence[int]) -> str:
    """``(1, 3, 8)`` -> ``1x3x8``; a scalar's ``()`` stays ``()``."""
    return "x".join(str(d) for d in shape) or "()"


def type_name(spec: InputSpec) -> str:
    """The input's ONNX element type in lower case, e.g. ``float`` or ``int64``."""
    return onnx.TensorProto.DataType.Name(spec.elem_type).lower()
