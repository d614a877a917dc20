"""Inputs generated from a model's input signature: seeded, valid for nearly every model.

One of the input layer's sources (the others are the user's files, read by
:mod:`onnxprune.inputs.dataset`): validation feeds these when no ``--inputs`` are given, and
calibration serves them as a data-free set (:func:`onnxprune.inputs.dataset.generated_calibration`).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import onnx

from onnxprune.errors import InputDataError
from onnxprune.inputs.roles import INT_HIGH, InputRole, input_roles
from onnxprune.inputs.signature import (DEFAULT_BATCH, FLOAT_TYPES, InputShape, InputSpec,
                                        ModelOrPath, concrete_shapes, input_signature)

__all__ = ["INT_HIGH", "generated_notes", "make_inputs"]

def make_inputs(model: ModelOrPath,
                shapes: Optional[Mapping[str, InputShape]] = None, seed: int = 0,
                batch: int = DEFAULT_BATCH,
                roles: Optional[Mapping[str, InputRole]] = None) -> Dict[str, np.ndarray]:
    """Seeded random inputs from the model's own input signature.

    Shapes come from :func:`resolve_input_shapes` (``shapes`` overrides by name, an ``int``
    binds a symbolic dim). Values follow each input's role (:mod:`onnxprune.inputs.roles`,
    computed here unless ``roles`` is given):

    * float (fp16/bf16/fp32/fp64): standard normal;
    * token ids (the indices of a ``Gather`` over an embedding table): ``0..rows-1`` of that
      table; other integers ``0..9``; ``uint8``: ``0..255`` (image pixels);
    * attention masks: attend everywhere (all ones, or all zeros / false for a padding mask);
      token types: all zeros; position ids:
      ``0, 1, 2, ...``;
    * bool: fair coin flips (a bool mask: as attention masks).

    >>> make_inputs(model, {"pixels": (2, 3, 64, 64)})       # doctest: +SKIP
    {'pixels': array([...], dtype=float32)}
    """
    specs = input_signature(model)
    resolved = concrete_shapes(specs, shapes, batch, require_all=True)
    if roles is None:
        roles = input_roles(model, specs)
    rng = np.random.default_rng(seed)
    inputs: Dict[str, np.ndarray] = {}
    for spec in specs:
        shape = resolved[spec.name] or ()
        try:
            itemsize = np.dtype(spec.dtype).itemsize
        except Exception:  # a type with no numpy form: its own error comes below
            itemsize = 1
        size = float(np.prod([float(d) for d in shape])) * itemsize
        if size > GENERATED_LIMIT:
            raise InputDataError(
                f"input '{spec.name}' would take {size / 2 ** 30:.1f} GiB generated at shape "
                f"{'x'.join(str(d) for d in shape)} (what the model declares); pass "
                f"--input-shape {spec.name}:DIMS with the sizes you run it at, or real inputs "
                "with --inputs FILE.npz")
        role = roles.get(spec.name, PLAIN)
        inputs[spec.name] = np.asarray(_random_tensor(spec, resolved[spec.name], rng, role))
    return inputs


def generated_notes(model: ModelOrPath, shapes: Optional[Mapping[str, InputShape]] = None,
                    batch: int = DEFAULT_BATCH) -> List[str]:
    """One line per input that is not plain random data (token ids, masks, token types,
    positions, past keys/values), saying what :func:`make_inputs` generates for it and why."""
    specs = input_signature(model)
    resolved = concrete_shapes(specs, shapes, batch, require_all=True)
    roles = input_roles(model, specs)
    return [roles[s.name].describe(s.name, resolved[s.name] or ()) for s in specs
            if roles[s.name].kind != "plain"]


PLAIN = InputRole("plain")
#: The largest input generated (bytes): a declared shape past it is a mistake or a hostile file.
GENERATED_LIMIT = 1 << 30


def _random_tensor(spec: InputSpec, shape: Tuple[int, ...], rng: np.random.Generator,
                   role: InputRole = PLAIN) -> np.ndarray:
    et = spec.elem_type
    if et in FLOAT_TYPES:
        return rng.standard_normal(shape).astype(spec.dtype)
    if et == onnx.TensorProto.BOOL:
        if role.kind == "mask":
            return np.full(shape, bool(role.fill))
        return rng.random(shape) < 0.5
    if et == onnx.TensorProto.STRING or et == onnx.TensorProto.UNDEFINED:
        raise InputDataError(f"input '{spec.name}' has element type "
                             f"{onnx.TensorProto.DataType.Name(et)}, which onnxprune cannot "
                             "generate; pass real inputs with --inputs FILE.npz")
    dtype = spec.dtype
    if dtype.kind in "iu":
        if role.kind == "mask":
            return np.full(shape, role.fill, dtype=dtype)
        if role.kind == "type":
            return np.zeros(shape, dtype=dtype)
        if role.kind == "position":
            last = shape[-1] if shape else 1
            return np.broadcast_to(np.arange(last, dtype=dtype), shape).copy()
        if dtype == np.uint8:
            return rng.integers(0, 256, size=shape).astype(dtype)
        high = role.high if role.kind == "ids" and role.high else INT_HIGH
        high = min(high, int(np.iinfo(dtype).max) + 1)
        return rng.integers(0, high, size=shape).astype(dtype)
    raise InputDataError(f"input '{spec.name}' has element type "
                         f"{onnx.TensorProto.DataType.Name(et)}, which onnxprune cannot "
                         "generate; pass real inputs with --inputs FILE.npz")
