"""Inputs generated from a model's input signature: seeded, valid for nearly every model.

One of the input layer's sources (the others are the user's files, read by
:mod:`onnxprune.inputs.dataset`): validation feeds these when no ``--inputs`` are given, and
calibration serves them as a data-free set (:func:`onnxprune.inputs.dataset.generated_calibration`).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.errors import InputDataError
from onnxprune.inputs.signature import (DEFAULT_BATCH, FLOAT_TYPES, InputSpec, ModelOrPath,
                                        concrete_shapes, input_signature)

#: Generated integer inputs are drawn from ``0..INT_HIGH-1``: small enough to be valid token ids,
#: class indices or gather positions in nearly every model.
INT_HIGH = 10


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
    resolved = concrete_shapes(specs, shapes, batch, require_all=True)
    rng = np.random.default_rng(seed)
    inputs: Dict[str, np.ndarray] = {}
    for spec in specs:
        inputs[spec.name] = np.asarray(_random_tensor(spec, resolved[spec.name], rng))
    return inputs


def _random_tensor(spec: InputSpec, shape: Tuple[int, ...], rng: np.random.Generator
                   ) -> np.ndarray:
    et = spec.elem_type
    if et in FLOAT_TYPES:
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
