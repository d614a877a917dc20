"""Counting multiply-accumulates (MACs): one formula per op type, in a registry.

:func:`count_macs` fixes the graph inputs' dynamic dims (the same defaults as validation:
:func:`onnxprune.inputs.signature.resolve_input_shapes`), infers every tensor's shape on a copy of the
model that carries no weight data (:mod:`onnxprune.model.shapes`: models with external data or
over 2 GB work, and the caller's proto is never touched), then applies the formula registered for
each main-graph node.

What counts: the multiply-accumulates of the ops that dominate inference cost — Conv,
ConvTranspose, Gemm, MatMul (and their integer/QLinear forms), Einsum, LSTM/GRU/RNN. Bias adds,
normalization, activations, pooling and other per-element ops count 0 (they have no registered
formula and are left out of ``per_node``): they are memory-bound and small next to the MAC-heavy
ops, and leaving them out is what common MAC counters do, so numbers compare with published
ones (ResNet-50 at 224x224: 4.09 G). Adding an op = one function decorated with
:func:`register_macs`.

``If``/``Loop``/``Scan`` bodies are not counted: a node whose body holds a counted op is listed in
``MacCount.unknown`` (a loop's trip count is usually unknown); one whose bodies hold only cheap
ops counts 0.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model.index import attr, node_label
from onnxprune.model.io import ModelHandle, ModelLike, iter_graphs, load
from onnxprune.model.shapes import infer_shapes
from onnxprune.inputs.signature import input_signature, resolve_input_shapes
from onnxprune.model.weights import find_weights

Shapes = Mapping[str, Tuple[int, ...]]
MacFormula = Callable[[onnx.NodeProto, Shapes], Optional[int]]
_FORMULAS: Dict[str, MacFormula] = {}
_CONTROL_FLOW = {"If", "Loop", "Scan"}


def register_macs(*op_types: str) -> Callable[[MacFormula], MacFormula]:
    """Decorator: register the MAC formula for one or more op types (default ONNX domain).

    A formula receives the node and a mapping from tensor name to its fully known shape
    (tensors with an unknown dim are absent) and returns the node's MACs, or None when a shape
    it needs is unknown.
    """

    def deco(fn: MacFormula) -> MacFormula:
        for op in op_types:
            _FORMULAS[op] = fn
        return fn

    return deco


def counted_op_types() -> Tuple[str, ...]:
    """Op types with a MAC formula."""
    return tuple(sorted(_FORMULAS))


@dataclass
class MacCount:
    """MACs of a model on concrete input shapes.

    ``per_node`` maps each counted main-graph node (see :func:`node_label`) to its MACs;
    ``sparse_total`` scales the MACs of nodes given a weight density (nonzeros / numel) by that
    density — the work a sparse kernel would do — and equals ``total`` without densities.
    ``unknown`` lists counted nodes whose shapes could not be inferred (they add 0 to totals).
    """

    total: int
    per_node: Dict[str, int] = field(default_factory=dict)
    sparse_total: int = 0
    unknown: List[str] = field(default_factory=list)
    input_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    op_types: Dict[str, str] = field(default_factory=dict)  # node label -> op type
    notes: List[str] = field(default_factory=list)

    def per_op_type(self) -> Dict[str, int]:
        """MACs summed by op type, largest first."""
        sums: Dict[str, int] = {}
        for name, macs in self.per_node.items():
            op = self.op_types.get(name, "?")
            sums[op] = sums.get(op, 0) + macs
        return dict(sorted(sums.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict:
        return {"total": self.total, "sparse_total": self.sparse_total,
                "per_node": dict(self.per_node), "per_op_type": self.per_op_type(),
                "unknown": list(self.unknown),
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "notes": list(self.notes)}


def count_macs(model: ModelLike,
               input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
               densities: Optional[Mapping[str, float]] = None,
               batch: int = 1) -> MacCount:
    """Count the MACs of every main-graph node on concrete input shapes.

    ``input_shapes`` overrides input dims by name (unknown names raise
    :class:`~onnxprune.errors.OptionError`); inputs that declare no shape and are not
    overridden stay unknown, and so does everything they feed. ``densities`` maps node labels
    (:func:`node_label`) to the density of their weight in ``[0, 1]``; labels of nodes not
    counted are ignored.

    >>> count_macs(onnx.load("resnet50.onnx")).total                   # doctest: +SKIP
    4089184256
    """
    # A path loads without external data; a bare proto has no folder to read small external
    # shape operands from (their dims still serve inference).
    handle = None if isinstance(model, onnx.ModelProto) else load(model)
    proto = model if handle is None else handle.model
    resolved = resolve_input_shapes(proto, input_shapes, batch, require_all=False)
    notes: List[str] = []
    shapeless = [s.name for s in input_signature(proto) if s.name not in resolved]
    if shapeless:
        notes.append(f"input(s) {', '.join(shapeless)} declare no shape; pass --input-shape to "
                     "count the nodes they feed")
    inferred = infer_shapes(proto if handle is None else handle, resolved, keep_value_info=True)
    if inferred.error:
        notes.append(f"shape inference failed ({inferred.error}); MACs use declared shapes only")
    shapes = inferred.static()

    per_node: Dict[str, int] = {}
    op_types: Dict[str, str] = {}
    unknown: List[str] = []
    for node in proto.graph.node:
        label = _unique(node_label(node), per_node, unknown)
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _CONTROL_FLOW:
            if _has_counted_ops(node):
                unknown.append(label)
            continue
        formula = _FORMULAS.get(node.op_type)
        if formula is None:
            continue
        macs = formula(node, shapes)
        if macs is None:
            unknown.append(label)
        else:
            per_node[label] = int(macs)
            op_types[label] = node.op_type

    densities = dict(densities or {})
    for label, density in densities.items():
        if not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density of '{label}' must be within [0, 1], got {density}")
    total = sum(per_node.values())
    sparse = sum(int(round(macs * float(densities[label]))) if label in densities else macs
                 for label, macs in per_node.items())
    return MacCount(total=total, per_node=per_node, sparse_total=sparse,
                    unknown=unknown, op_types=op_types,
                    input_shapes=dict(resolved), notes=notes)


def weight_densities(handle: ModelHandle, weights=None) -> Dict[str, float]:
    """Density (nonzeros / numel) of each prunable weight, keyed by the label of every
    main-graph node that reads it — the ``densities`` argument of :func:`count_macs`.

    ``weights`` defaults to :func:`onnxprune.model.weights.find_weights`; each weight is read once.
    A node reading two weights gets the lower density.
    """
    if weights is None:
        weights, _ = find_weights(handle)
    densities: Dict[str, float] = {}
    main = handle.model.graph.name or "main"
    for weight in weights:
        values = handle.read(weight.tensor)
        density = float(np.count_nonzero(values)) / max(values.size, 1)
        for consumer in weight.consumers:
            if consumer.graph != main:
                continue
            label = node_label(consumer.node)
            densities[label] = min(density, densities.get(label, 1.0))
    return densities


def _unique(label: str, *taken: object) -> str:
    # Exported graphs occasionally repeat a node name; keep every node's count.
    def used(name: str) -> bool:
        return any(name in t for t in taken)

    if not used(label):
        return label
    i = 2
    while used(f"{label}#{i}"):
        i += 1
    return f"{label}#{i}"


def _has_counted_ops(node: onnx.NodeProto) -> bool:
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for _, sub in iter_graphs(g):
                if any(n.op_type in _FORMULAS or n.op_type in _CONTROL_FLOW for n in sub.node):
                    return True
    return False


# -- formulas ---------------------------------------------------------------------------------
def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)  # Python ints: no overflow on large models
    return n


def _get(shapes: Shapes, node: onnx.NodeProto, index: int, output: bool = False
         ) -> Optional[Tuple[int, ...]]:
    names = node.output if output else node.input
    if index >= len(names) or not names[index]:
        return None
    return shapes.get(names[index])


def _conv_like(weight_index: int) -> MacFormula:
    def formula(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
        # Y[N, Cout, out...] with W[Cout, Cin/g, k...]: every output element is a dot product
        # of length Cin/g * prod(k). Grouped and depthwise convs fall out of W's shape.
        y = _get(shapes, node, 0, output=True)
        w = _get(shapes, node, weight_index)
        if y is None or w is None:
            return None
        return _numel(y) * _numel(w[1:])

    return formula


register_macs("Conv", "ConvInteger")(_conv_like(1))
register_macs("QLinearConv")(_conv_like(3))


@register_macs("ConvTranspose")
def _conv_transpose(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Every input element X[n, ci, in...] is scattered through W[ci, Cout/g, k...]: Cout/g *
    # prod(k) MACs each. Output cropping by pads is not subtracted (the common convention).
    x = _get(shapes, node, 0)
    w = _get(shapes, node, 1)
    if x is None or w is None:
        return None
    return _numel(x) * _numel(w[1:])


@register_macs("Gemm")
def _gemm(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Y = alpha * A' B' + beta * C with A' [M, K], B' [K, N]: M*N*K (the C add is not counted).
    a = _get(shapes, node, 0)
    b = _get(shapes, node, 1)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else a
    n = b[0] if attr(node, "transB", 0) else b[1]
    return int(m) * int(n) * int(k)


def _matmul_like(a_index: int, b_index: int) -> MacFormula:
    def formula(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
        # numpy matmul semantics: A[..., M, K] @ B[..., K, N] with broadcast batch dims;
        # a 1-D A is [1, K], a 1-D B is [K, 1]. prod(batch) * M * N * K.
        a = _get(shapes, node, a_index)
        b = _get(shapes, node, b_index)
        if a is None or b is None or not a or not b:
            return None
        k = a[-1]
        m = a[-2] if len(a) >= 2 else 1
        n = b[-1] if len(b) >= 2 else 1
        try:
            batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        except ValueError:
            return None
        return _numel(batch) * int(m) * int(n) * int(k)

    return formula


register_macs("MatMul", "MatMulInteger")(_matmul_like(0, 1))
register_macs("QLinearMatMul")(_matmul_like(0, 3))


@register_macs("LSTM", "GRU", "RNN")
def _recurrent(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Per time step and batch row, every gate of every direction multiplies the input by W
    # [dirs, gates*H, I] and the hidden state by R [dirs, gates*H, H]: numel(W) + numel(R).
    # Element-wise gate math is not counted.
    x = _get(shapes, node, 0)
    w = _get(shapes, node, 1)
    r = _get(shapes, node, 2)
    if x is None or w is None or r is None or len(x) != 3:
        return None
    seq, batch = (x[1], x[0]) if attr(node, "layout", 0) else (x[0], x[1])
    return int(seq) * int(batch) * (_numel(w) + _numel(r))


@register_macs("Einsum")
def _einsum(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # A naive contraction of n operands costs (n - 1) * prod(size of every distinct index).
    equation = attr(node, "equation", b"")
    if isinstance(equation, bytes):
        equation = equation.decode()
    lhs = equation.replace(" ", "").split("->")[0]
    operands = lhs.split(",")
    if "." in lhs or len(operands) != len(node.input):
        return None
    if len(operands) < 2:
        return 0
    sizes: Dict[str, int] = {}
    for term, name in zip(operands, node.input):
        shape = shapes.get(name)
        if shape is None or len(shape) != len(term):
            return None
        for letter, size in zip(term, shape):
            if letter not in string.ascii_letters:
                return None
            # Broadcast size-1 dims take the other operand's size.
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return (len(operands) - 1) * _numel(sizes.values())
