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
ones (ResNet-50 at 224x224: 4.09 G). Each op's formula is the ``macs`` field of its registry
entry (:mod:`onnxprune.ops.registry`), in its family file; this module is the driver.

``If``/``Loop``/``Scan`` bodies are not counted: a node whose body holds a counted op is listed in
``MacCount.unknown`` (a loop's trip count is usually unknown); one whose bodies hold only cheap
ops counts 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model.index import node_label
from onnxprune.model.io import ModelHandle, ModelLike, iter_graphs, load
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.shapevec import complete_shapes
from onnxprune.inputs.signature import input_signature, resolve_input_shapes
from onnxprune.ops.weights import find_weights
from onnxprune.ops.registry import field_of, op_types_with

_CONTROL_FLOW = {"If", "Loop", "Scan"}


def counted_op_types() -> Tuple[str, ...]:
    """Op types with a MAC formula."""
    return op_types_with("macs")


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
    inferred = infer_shapes(proto if handle is None else handle, resolved, keep_value_info=True,
                            complete=complete_shapes)
    if inferred.error:
        notes.append(f"shape inference failed ({inferred.error}); MACs use declared shapes only")
    shapes = inferred.static()

    per_node: Dict[str, int] = {}
    op_types: Dict[str, str] = {}
    unknown: List[str] = []
    for node in proto.graph.node:
        label = _unique(node_label(node), per_node, unknown)
        if node.domain not in ("", "ai.onnx") and field_of(node, "macs") is None:
            continue  # a custom-domain op the registry has no formula for
        if node.op_type in _CONTROL_FLOW and node.domain in ("", "ai.onnx"):
            if _has_counted_ops(node):
                unknown.append(label)
            continue
        formula = field_of(node, "macs")
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

    ``weights`` defaults to :func:`onnxprune.ops.weights.find_weights`; each weight is read once.
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
                if any(field_of(n, "macs") is not None
                       or n.op_type in _CONTROL_FLOW for n in sub.node):
                    return True
    return False


