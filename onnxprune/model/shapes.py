"""The one weight-free shape inference: every tensor's shape and element type without weights.

MAC counting (:mod:`onnxprune.report.macs`), the channel graph and its resize
(:mod:`onnxprune.channels`) and calibration's memory planning
(:mod:`onnxprune.calibration.statistics`) all ask here. The steps, the same for every caller:

1. a weightless copy of the model (:func:`onnxprune.model.io.weightless_copy`): tensors over
   ``_KEEP_VALUES`` elements keep name, type and dims only, so a multi-GB model costs only its
   graph; small ones (shape operands: Reshape shapes, Slice starts, Resize scales) keep their
   values, read from external data when a handle can;
2. graph inputs given in ``input_shapes`` fixed to those dims;
3. the copy converted to opset :data:`DATA_PROP_OPSET` when older (``upgrade``): onnx
   propagates shape *values* (Shape -> Slice -> Concat -> Reshape, as paddle2onnx and older
   torch exports emit) only through recent op versions; a graph the converter cannot handle is
   inferred at its own opset;
4. ``onnx.shape_inference`` with data propagation, non-strict (an op it does not know leaves
   its outputs unknown instead of failing the model); a failure leaves the declared shapes.

The result keeps symbolic dims (their name) and unknown dims (``None``); :meth:`Shapes.static`
is the fully-known view. A dim that is a product of run-time sizes (a ``complete`` step solving
``Mul(Shape(x)[0], 6)`` in a Reshape target) has one spelling, the symbols then the constant:
``"batch*6"``, ``"seq*batch"`` (:func:`onnxprune.ops.shapevec.product_symbol`; the channel
rules read it back with ``dim_factors``). Two choices are the caller's, each for a stated reason:

* ``keep_value_info``: the declared ``value_info`` is dropped before inference unless kept. A
  model under edit carries stale intermediate shapes; MAC counting keeps them, trusting what
  the exporter declared for ops inference cannot see (custom domains).
* ``upgrade`` (step 3, on by default): the channel graph and calibration's memory planning
  turn it off. For the channel graph the upgrade would change results, not just speed: on
  older-opset models more shapes become known and fewer channel groups are frozen (PP-OCRv4
  rec, opset 12: 23 prunable groups instead of 17), a behaviour change kept out of this
  restructuring; calibration runs inference once per wave, and the conversion would cost that
  much each time for sizes it does not need exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.model.index import constant_tensor, opset
from onnxprune.model.io import ModelHandle, iter_graphs, weightless_copy

Dim = Union[int, str, None]
Shape = Tuple[Dim, ...]

#: Inference runs at this opset at least (see step 3 of the module doc).
DATA_PROP_OPSET = 17


@dataclass
class Shapes:
    """Shapes (symbolic dims by name, unknown dims ``None``) and ONNX element types of every
    value inference reached, graph inputs/outputs and main-graph initializers included.
    ``error`` is the first line of why inference failed, if it did."""

    shapes: Dict[str, Shape] = field(default_factory=dict)
    types: Dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None

    def get(self, name: str) -> Optional[Shape]:
        return self.shapes.get(name)

    def static(self) -> Dict[str, Tuple[int, ...]]:
        """Only the shapes whose every dim is known."""
        return {n: s for n, s in self.shapes.items()  # type: ignore[misc]
                if all(isinstance(d, int) and d >= 0 for d in s)}

    def nbytes(self, name: str) -> Optional[int]:
        """Bytes of the value when its shape and type are known, else None."""
        shape, elem = self.shapes.get(name), self.types.get(name)
        if shape is None or not elem or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).itemsize
        return int(np.prod(shape, dtype=np.int64)) * itemsize


def infer_shapes(model: Union[onnx.ModelProto, ModelHandle],
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 keep_value_info: bool = False, upgrade: bool = True,
                 complete: Optional[Callable[[onnx.GraphProto], bool]] = None) -> Shapes:
    """Infer every value's shape and type without touching the weights (see the module doc).

    ``model`` is a proto or a handle (a handle reads small external shape operands too);
    ``input_shapes`` fixes graph inputs' dims by name. The caller's proto is never changed.
    ``complete`` types the outputs of ops ONNX's inference leaves untyped (callers pass
    :func:`onnxprune.ops.registry.complete_types`; this layer does not import the op registry)
    and returns whether it typed any; inference then goes on from there, up to 8 rounds.
    """
    handle = model if isinstance(model, ModelHandle) else None
    proto = handle.model if handle is not None else model
    copy = weightless_copy(proto, handle)
    if not keep_value_info:
        del copy.graph.value_info[:]
    bound: Dict[str, int] = {}  # an input's symbolic dim -> the value given for it
    for vi in copy.graph.input:
        dims = (input_shapes or {}).get(vi.name)
        if dims is None or not vi.type.HasField("tensor_type"):
            continue
        shape = vi.type.tensor_type.shape
        for old, d in zip(shape.dim, dims):
            if old.dim_param:
                bound.setdefault(old.dim_param, int(d))
        shape.Clear()
        shape.SetInParent()
        for d in dims:
            shape.dim.add().dim_value = int(d)
    # Kept value_info written with the inputs' symbols (a pruned model's, ours) takes the same
    # values, or inference would keep the symbol where the input now says a number.
    for vi in copy.graph.value_info if bound else ():
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in bound:
                    d.dim_value = bound[d.dim_param]
    if upgrade:
        copy = upgrade_opset(copy)
    result = Shapes()
    prop = _safe_to_propagate(copy)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False,
                                                     data_prop=prop)
        for _ in range(64 if complete is not None else 0):  # one round per layer, at worst
            if not complete(inferred.graph):
                break
            inferred = onnx.shape_inference.infer_shapes(inferred, check_type=False,
                                                         strict_mode=False, data_prop=prop)
    except Exception as exc:  # malformed graphs: what the declared shapes allow
        result.error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        inferred = copy
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.WhichOneof("value") != "tensor_type":
            continue
        tt = vi.type.tensor_type
        if tt.elem_type:
            result.types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            result.shapes[vi.name] = tuple(_dim(d) for d in tt.shape.dim)
    for t in proto.graph.initializer:
        result.shapes[t.name] = tuple(int(d) for d in t.dims)
        result.types[t.name] = t.data_type
    return result


#: Elements onnx's data propagation may build for one ``ConstantOfShape`` (it materializes the
#: values: a hostile ``ConstantOfShape([10**9])`` would take 8 GB before any check).
_PROPAGATE_LIMIT = 1 << 20


def _safe_to_propagate(model: onnx.ModelProto) -> bool:
    """False when a ``ConstantOfShape`` of a stored shape would make more than
    :data:`_PROPAGATE_LIMIT` values: shape inference then runs without data propagation."""
    stored = {}
    for _, g in iter_graphs(model.graph):
        stored.update({t.name: t for t in g.initializer})
        for node in g.node:
            value = constant_tensor(node)
            if value is not None:
                stored[node.output[0]] = value
    for _, g in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type != "ConstantOfShape" or not node.input or \
                    node.input[0] not in stored:
                continue
            t = stored[node.input[0]]
            if t.data_location == onnx.TensorProto.EXTERNAL or not t.dims or t.dims[0] > 64:
                continue
            try:
                dims = onnx.numpy_helper.to_array(t).astype(np.float64)
            except Exception:
                continue
            if dims.size and float(np.prod(np.maximum(dims, 0))) > _PROPAGATE_LIMIT:
                return False
    return True


def upgrade_opset(model: onnx.ModelProto, version: int = DATA_PROP_OPSET) -> onnx.ModelProto:
    """``model`` converted to opset ``version`` when older, else ``model`` itself; a graph the
    converter cannot handle comes back unconverted."""
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import) or \
            opset(model) >= version:
        return model
    try:
        return onnx.version_converter.convert_version(model, version)
    except Exception:
        return model


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value"):
        return int(d.dim_value) if d.dim_value >= 0 else None
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None


__all__: List[str] = ["DATA_PROP_OPSET", "Dim", "Shape", "Shapes", "infer_shapes",
                      "upgrade_opset"]
