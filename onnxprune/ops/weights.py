"""Finding prunable weights wherever exporters put them.

A weight is a stored tensor — an initializer or a ``Constant`` node's value, in the main graph or
any ``If``/``Loop``/``Scan`` body — that reaches a prunable input of a Conv/ConvTranspose/Gemm/
MatMul, directly or through the ops whose registry entry carries it on (``weight_step``:
``Cast``/``Identity`` in fp16 exports, Q/DQ pairs, a Transpose or constant Reshape). A tensor read by several nodes
is one :class:`Weight` with several consumers, pruned once; if the consumers disagree on its
``W[out, in]`` view it is skipped with a reason rather than guessed. A tensor that anything
else reads as well — a ``Gather`` on a tied embedding table, an ``Add``/``ReduceSum``, a graph
output, directly or after a pass-through op — is skipped with a reason naming that reader:
pruning it would change the other reader's values silently.

An integer tensor is a weight only when it is dequantized on its way: ``Cast`` to float, then
``Mul``/``Div`` by a constant scale (scalar or per output channel; the registry's ``("scale", i)``
step), as int8 exports without Q/DQ write it. Its :class:`Dequant` says how: masks and channel
cuts go into the stored integers (0 stays 0 through the scale), criteria and refits see the
dequantized values (:meth:`Weight.values_2d`, :meth:`Weight.stored_from_2d`), and the output keeps
the integer + Cast + scale scheme. A zero point (``Sub`` before the scale) is left alone with a
reason: a masked entry would have to hold the zero point, which the masking passes do not write.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx

from onnxprune.model.external import tensor_dtype
from onnxprune.model.index import GraphIndex, constant_tensor, node_label
from onnxprune.model.io import ModelHandle
from onnxprune.ops.layouts import Layout, layout_for
from onnxprune.ops.quant import integer_weight_refusal, stored_values, weight_scale
from onnxprune.ops.registry import bias_slot, weight_step

#: Element types onnxprune can rewrite (values keep their dtype on write).
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE}
#: Quantized weights, pruned when their zero point is 0 (:mod:`onnxprune.ops.quant`).
INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                 onnx.TensorProto.UINT16}


@dataclass
class Consumer:
    """One node input that reads a weight."""

    node: onnx.NodeProto
    input_index: int
    graph: str
    via: Tuple[str, ...] = ()  # ops passed through between the stored tensor and the node

    @property
    def node_name(self) -> str:
        return node_label(self.node)


@dataclass(frozen=True)
class Dequant:
    """How a stored integer weight becomes the float one its consumer reads:
    ``q * scale`` (``divide``: ``q / scale``), with ``scale`` broadcast against the stored
    shape (it never varies along the weight's ``in`` axis)."""

    scale: onnx.TensorProto
    divide: bool = False

    def factor(self, handle: ModelHandle, shape: Tuple[int, ...]) -> np.ndarray:
        """The float64 multiplier of each stored entry, broadcast to ``shape``."""
        s = np.asarray(handle.read(self.scale), dtype=np.float64)
        if self.divide:
            with np.errstate(divide="ignore"):
                s = 1.0 / s
        return np.broadcast_to(s, shape)


@dataclass
class Weight:
    """A stored tensor that feeds a prunable op input, with its logical ``W[out, in]`` view."""

    name: str
    tensor: onnx.TensorProto
    location: str  # "initializer" or "constant"
    graph: str
    layout: Layout
    consumers: List[Consumer] = field(default_factory=list)
    #: A weight quantized by DequantizeLinear or read by a QOperator op: its scale, broadcastable
    #: to its stored shape; None for float weights or when unknown.
    scale: Optional[np.ndarray] = None
    #: An integer tensor dequantized on its way by Cast + Mul/Div (see module); None otherwise.
    dequant: Optional[Dequant] = None

    def factor(self, handle: ModelHandle, shape: Optional[Tuple[int, ...]] = None
               ) -> Optional[np.ndarray]:
        """The float64 multiplier of each stored entry (its dequantization), broadcast to
        ``shape`` (default: the stored shape); None for a float weight. The one place both
        quantized forms meet."""
        shape = self.layout.stored_shape if shape is None else shape
        if self.dequant is not None:
            return self.dequant.factor(handle, shape)
        if self.scale is not None:
            return np.broadcast_to(np.asarray(self.scale, np.float64), shape)
        return None

    def values_2d(self, handle: ModelHandle, raw: Optional[np.ndarray] = None) -> np.ndarray:
        """``W[out, in]`` as the consumer sees it (dequantized for an integer weight); ``raw``
        is the stored array when already read. Float weights: the stored values' own view."""
        raw = handle.read(self.tensor) if raw is None else raw
        w2d = self.layout.to_2d(raw)
        factor = self.factor(handle, tuple(raw.shape))
        return w2d if factor is None else w2d * self.layout.to_2d(factor)

    def stored_from_2d(self, handle: ModelHandle, w2d: np.ndarray, dtype: np.dtype
                       ) -> np.ndarray:
        """The stored array for new consumer-side values ``w2d`` (``W[out, in]``): the layout's
        inverse, and for an integer weight the values divided by the scale, rounded and clipped
        to the integer type (exact zeros stay exact zeros)."""
        dtype = np.dtype(dtype)
        if self.factor(handle) is None or dtype.kind not in "iu":
            return self.layout.from_2d(np.asarray(w2d).astype(dtype))
        info = np.iinfo(dtype)
        if self.dequant is not None:
            self._widen_scale(handle, np.asarray(w2d, np.float64), info)
        factor = self.layout.to_2d(self.factor(handle))
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(factor != 0, np.asarray(w2d, np.float64) / factor, 0.0)
        return self.layout.from_2d(stored_values(q, dtype))
    def _widen_scale(self, handle: ModelHandle, w2d: np.ndarray, info) -> None:
        """A refit can move a row past what its scale reaches (``qmax * scale``): with one
        scale per output row held by this weight alone, that row's scale grows to fit it
        (the scheme stays integer + scale); a scalar or shared scale stays and values clip."""
        dq = self.dequant
        rows = w2d.shape[0]
        scale = np.asarray(handle.read(dq.scale))
        if scale.size != rows or rows == 1 or dq.divide or \
                handle.index.read_anywhere(dq.scale.name) != 1:
            return
        factor = self.layout.to_2d(dq.factor(handle, self.layout.stored_shape))[:, 0]
        qmax = float(min(info.max, -info.min))
        need = np.abs(w2d).max(axis=1) / qmax
        grow = need > np.abs(factor)
        if grow.any():
            # the scale broadcasts against the stored shape; its rows follow W[out]'s order
            per_row = np.where(grow, need * np.sign(np.where(factor == 0, 1.0, factor)), factor)
            handle.write(dq.scale, per_row.reshape(scale.shape).astype(scale.dtype))

    @property
    def op_type(self) -> str:
        return self.consumers[0].node.op_type

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def dtype(self) -> np.dtype:
        return tensor_dtype(self.tensor)

    @property
    def key(self) -> str:
        """Unique across subgraphs: the name, prefixed by the subgraph path when not main."""
        return self.name if "/" not in self.graph else f"{self.graph}:{self.name}"


@dataclass
class Skipped:
    """A tensor feeding a prunable op that onnxprune leaves alone, and why."""

    name: str
    reason: str
    readers: Tuple[str, ...] = ()  # what else reads it, when that is why it was skipped


@dataclass
class _Source:
    tensor: onnx.TensorProto
    location: str
    graph: str
    name: str
    via: Tuple[str, ...] = ()
    view: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()  # Reshape/Transpose steps on the way
    nodes: Tuple[onnx.NodeProto, ...] = ()  # the pass-through nodes of ``via``
    dequant: Optional[Dequant] = None
    refused: Optional[str] = None  # why an integer tensor on its way is not prunable

    @property
    def stored_shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims)

    @property
    def seen_shape(self) -> Tuple[int, ...]:
        shape = self.stored_shape
        for op, arg in self.view:
            shape = arg if op == "reshape" else tuple(shape[i] for i in arg)
        return shape

    def then(self, node: onnx.NodeProto, step=None) -> "_Source":
        """This source seen through one more pass-through node."""
        return _Source(self.tensor, self.location, self.graph, self.name,
                       self.via + (node.op_type,), self.view + ((step,) if step else ()),
                       self.nodes + (node,), self.dequant, self.refused)

    def dequantized(self, node: onnx.NodeProto, step: tuple, scale: Optional[onnx.TensorProto]
                    ) -> Optional["_Source"]:
        """This integer source seen through a ``("scale" | "zero_point", i)`` step of ``node``
        (the constant at input ``i`` is ``scale``), or None when that is no dequantization (a
        float weight, no Cast to float before it, a view on the way, a second scale)."""
        kind = step[0]
        if self.refused is not None and kind == "scale":
            return self.then(node)  # carried on, to be named where it is consumed
        if self.tensor.data_type in FLOAT_TYPES or "Cast" not in self.via or self.view \
                or self.dequant is not None or self.refused is not None or scale is None:
            return None
        out = _Source(self.tensor, self.location, self.graph, self.name,
                      self.via + (node.op_type,), (), self.nodes + (node,))
        if kind == "zero_point":
            out.refused = (f"integer weight with a zero point ({node.op_type} "
                           f"'{node_label(node)}'); a masked entry would have to hold the zero "
                           "point, so it is left alone")
        elif kind == "scale":
            out.dequant = Dequant(scale, divide=node.op_type == "Div")
        else:
            return None
        return out


def find_weights(handle: ModelHandle) -> Tuple[List[Weight], List[Skipped]]:
    """All prunable weights in the model, in graph order, and the tensors skipped with a reason."""
    found: Dict[int, Weight] = {}
    order: List[int] = []
    skipped: Dict[str, Skipped] = {}
    # id(stored tensor) -> what else reads it (not a prunable input, not a pass-through)
    others: Dict[int, List[str]] = {}
    scopes: Dict[str, Dict[str, Optional[_Source]]] = {}

    def other_reader(source: _Source, what: str) -> None:
        readers = others.setdefault(id(source.tensor), [])
        if what not in readers:
            readers.append(what)

    def visit(graph: onnx.GraphProto, path: str, outer: Dict[str, Optional[_Source]]) -> None:
        scope: Dict[str, Optional[_Source]] = dict(outer)
        scopes[path] = scope
        for init in graph.initializer:
            scope[init.name] = _Source(init, "initializer", path, init.name)
        # Graph inputs that shadow an initializer keep it as a default value (old exporters list
        # every initializer as an input); only a true runtime input hides an outer name.
        init_names = {i.name for i in graph.initializer}
        for inp in graph.input:
            if inp.name not in init_names:
                scope[inp.name] = None
        for node in graph.node:
            read = []
            for index, name in enumerate(node.input):
                source = scope.get(name) if name else None
                if source is not None and not _consider(node, index, source, path):
                    read.append((index, source))
            handed_on = _define_outputs(node, scope, path)
            for index, source in read:
                if not (handed_on and index == 0):
                    other_reader(source, f"{node.op_type} '{node_label(node)}'")
            for a in node.attribute:
                label = f"{path}/{node.name or node.op_type}.{a.name}"
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g, label, scope)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for i, g in enumerate(a.graphs):
                        visit(g, f"{label}[{i}]", scope)
        for out in graph.output:
            source = scope.get(out.name)
            if source is not None:
                other_reader(source, f"graph output '{out.name}'")

    def _consider(node: onnx.NodeProto, index: int, source: _Source, path: str) -> bool:
        """Record ``node`` as a consumer of ``source`` when it reads it as a prunable weight
        (True), else False."""
        layout = layout_for(node, index, source.seen_shape)
        if layout is None:
            return False
        if source.view:
            layout = replace(layout, view=source.view, source_shape=source.stored_shape)
        consumer = Consumer(node, index, path, source.via)
        if source.refused is not None:
            skipped.setdefault(source.name, Skipped(source.name, source.refused))
            return True
        if source.tensor.data_type not in FLOAT_TYPES and source.dequant is None and (
                source.tensor.data_type not in INTEGER_TYPES or
                _refuse_integer(source, node, index, path)):
            dtype_name = onnx.TensorProto.DataType.Name(source.tensor.data_type)
            reason = (_refuse_integer(source, node, index, path)
                      if source.tensor.data_type in INTEGER_TYPES else None)
            skipped.setdefault(source.name, Skipped(
                source.name, f"{dtype_name} weight: {reason}" if reason else
                f"{dtype_name} weight (quantized or integer); only float weights are pruned"))
            return True
        if source.dequant is not None:
            scale = handle.read(source.dequant.scale)
            varies = _varies_along(np.asarray(scale), source.stored_shape, layout)
            if varies:
                skipped.setdefault(source.name, Skipped(
                    source.name, "integer weight whose dequantization scale varies along its "
                                 "input axis; criteria and refits need one scale per output "
                                 "row, so it is left alone"))
                return True
        key = id(source.tensor)
        weight = found.get(key)
        if weight is None:
            found[key] = Weight(source.name, source.tensor, source.location, source.graph,
                                layout, [consumer], None if source.dequant else
                                _scale_of(source, node, index, path), source.dequant)
            order.append(key)
        elif weight.dequant != source.dequant:
            skipped[source.name] = Skipped(
                source.name, f"shared by {weight.op_type} and {node.op_type} through different "
                             "dequantizations; pruning it for one would mis-scale the other")
        elif weight.layout.same_view(layout):
            weight.consumers.append(consumer)
        else:
            skipped[source.name] = Skipped(
                source.name, f"shared by {weight.op_type} and {node.op_type} with different "
                             "W[out, in] views; pruning it for one would mis-shape the other")
        return True

    def _refuse_integer(source: _Source, node: onnx.NodeProto, index: int, path: str):
        """Why an integer weight is not prunable (ops/quant.py: zero point 0), or None."""
        scope = scopes[path]

        def read(name: str):
            s = scope.get(name)
            return None if s is None else handle.read(s.tensor)
        return integer_weight_refusal(source.nodes, node, index, read)

    def _scale_of(source: _Source, node: onnx.NodeProto, index: int, path: str):
        if source.tensor.data_type in FLOAT_TYPES:
            return None
        scope = scopes[path]

        def read(name: str):
            s = scope.get(name)
            return None if s is None else handle.read(s.tensor)
        return weight_scale(source.nodes, node, index, source.stored_shape, read)

    def _define_outputs(node: onnx.NodeProto, scope: Dict[str, Optional[_Source]],
                        path: str) -> bool:
        """Define ``node``'s outputs in ``scope``; True when it hands its input 0's stored
        tensor on (a pass-through op)."""
        tensor = constant_tensor(node)
        if tensor is not None:
            scope[node.output[0]] = _Source(tensor, "constant", path, node.output[0])
            return False
        src = scope.get(node.input[0]) if node.input and node.input[0] else None
        if src is not None:
            # Cast/Identity/Q-DQ hand it on, Transpose/constant Reshape change its view.
            def read(i: int):
                s = scope.get(node.input[i]) if node.input[i] else None
                return None if s is None else handle.read(s.tensor)
            step = weight_step(node, src.seen_shape, read)
            if step is not None and step and step[0] in ("scale", "zero_point"):
                const = scope.get(node.input[step[1]])
                out = src.dequantized(node, step, None if const is None else const.tensor)
                if out is not None:
                    scope[node.output[0]] = out
                    return True
            elif step is not None:
                scope[node.output[0]] = src.then(node, step)
                return True
        for out in node.output:
            if out:
                scope[out] = None
        return False

    visit(handle.model.graph, handle.model.graph.name or "main", {})
    weights = [found[k] for k in order]
    pruned_names = {w.name for w in weights}
    skipped_list = [s for s in skipped.values()]
    # A tensor skipped for mixed views must not also be pruned through its first consumer.
    mixed = {s.name for s in skipped_list if s.reason.startswith("shared by")}
    # A tensor something else reads too is left alone, naming that reader.
    for w in weights:
        readers = others.get(id(w.tensor))
        if readers and w.name not in mixed:
            shown = ", ".join(readers[:3]) + (f" and {len(readers) - 3} more"
                                               if len(readers) > 3 else "")
            mixed.add(w.name)
            skipped_list.append(Skipped(
                w.name, f"also read by {shown}, not as a prunable weight; pruning it for "
                        f"{w.op_type} would change what that reader sees", tuple(readers)))
    weights = [w for w in weights if w.name not in mixed]
    skipped_list = [s for s in skipped_list if s.name not in pruned_names or s.name in mixed]
    return weights, skipped_list


def _varies_along(scale: np.ndarray, stored_shape: Tuple[int, ...], layout: Layout) -> bool:
    """Whether a dequantization ``scale`` (broadcast against the stored shape) takes more than
    one value within some row of the weight's ``W[out, in]`` view."""
    full = np.broadcast_to(np.asarray(scale, np.float64), stored_shape)
    w2d = layout.to_2d(full)
    return bool(w2d.size) and bool((w2d != w2d[:, :1]).any())


@dataclass
class StoredBias:
    """A layer's stored ``[out]`` bias and how it enters the output: ``y = scale' W x + beta b``
    (Gemm's ``alpha``/``beta``, else 1), so a change ``d`` of the mean of ``W x`` is undone by
    adding ``scale * d`` to ``b`` with ``scale = alpha / beta``."""

    tensor: onnx.TensorProto
    scale: float = 1.0

    def shift(self, handle: ModelHandle, delta: np.ndarray) -> None:
        """Add ``scale * delta`` (``[out]``, in ``W x`` units) to the stored bias."""
        b = handle.read(self.tensor)
        moved = b.astype(np.float64) + self.scale * np.asarray(delta).reshape(b.shape)
        handle.write(self.tensor, moved.astype(b.dtype))


def stored_bias(index: GraphIndex, weight: Weight) -> Optional[StoredBias]:
    """The stored bias of ``weight``'s single consumer that shifts each of its ``W[out, in]``
    rows' outputs, or None. Where it sits is the consumer op's registry ``bias`` slot
    (:func:`onnxprune.ops.registry.bias_slot`): Conv input B, Gemm input C when the weight is B
    (per output column = per weight row; ``beta = 0`` has none), or the ``[out]`` constant of
    the single ``Add`` after an ``x @ W`` MatMul. A bias tensor any other node reads too is not this layer's own
    (moving it would shift the other layer), so it is None as well."""
    if len(weight.consumers) != 1 or weight.consumers[0].graph != weight.graph:
        return None
    consumer = weight.consumers[0]
    node = consumer.node
    slot = bias_slot(node, consumer.input_index)
    if slot is None or not slot.mean_shift or slot.beta == 0.0:
        return None
    if slot.index is not None:
        if len(node.input) <= slot.index:
            return None
        name = node.input[slot.index]
    else:
        readers = index.consumer_nodes(node.output[0])
        if len(readers) != 1 or readers[0].op_type != "Add":
            return None
        other = [i for i in readers[0].input if i != node.output[0]]
        name = other[0] if len(other) == 1 else ""
    tensor = index.stored.get(name) if name else None
    if tensor is None or len(tensor.dims) != 1 or int(tensor.dims[0]) != weight.layout.shape2d[0]:
        return None
    if index.read_anywhere(name) != 1:
        return None
    return StoredBias(tensor, slot.scale)
