"""Masking and physically removing channels once groups and their removed units are known.

:func:`mask_channels` zeroes, for every removed channel, each stored slice whose role is in
``ZERO_ON_MASK``: producer rows, biases, BN/InstanceNorm scale *and* shift, additive constants,
and the consumers' input slices. Zeroing the consumer slices too is what makes the masked model a
faithful reference: a masked channel whose value is not 0 after an activation (Sigmoid(0)=0.5,
Clip with min>0, HardSigmoid) still contributes nothing, so removing it changes nothing.

:func:`resize_channels` deletes those indices from every coupled stored tensor (shared tensors
once), runs the rules' rewrites (Conv ``group``, Split sizes, Slice bounds, Reshape/Resize shape
constants), fixes graph-input entries of initializers, and refreshes ``value_info`` by shape
inference. External-data tensors go through :meth:`ModelHandle.write` and stay external.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model.io import ModelHandle
from onnxprune.channels.graph import ZERO_ON_MASK, ChannelGraph
from onnxprune.model.shapes import infer_shapes
from onnxprune.channels.rules import new_initializer
from onnxprune.ops.registry import copies_values
from onnxprune.ops.shapevec import complete_shapes

Removed = Dict[int, Sequence[int]]


def removed_by_dim(graph: ChannelGraph, removed: Removed) -> Dict[Tuple[str, int], np.ndarray]:
    """(tensor, axis) -> sorted indices removed there, over all groups."""
    parts: Dict[Tuple[str, int], List[np.ndarray]] = defaultdict(list)
    for gid, units in removed.items():
        if len(units) == 0:
            continue
        group = graph.groups[gid]
        for m in group.members:
            parts[(m.tensor, m.axis)].append(m.indices(units))
    return {k: np.unique(np.concatenate(v)) for k, v in parts.items()}


def mask_channels(handle: ModelHandle, removed: Removed, graph: ChannelGraph) -> None:
    """Zero the removed channels without resizing (see the module docstring for what is zeroed).

    The result is the reference the resized model must reproduce exactly.
    """
    zero: Dict[str, List[Tuple[int, np.ndarray]]] = defaultdict(list)
    for gid, units in removed.items():
        if len(units) == 0:
            continue
        for m in graph.groups[gid].members:
            if m.stored and ZERO_ON_MASK.intersection(m.roles):
                zero[m.tensor].append((m.axis, m.indices(units)))
    zero_slices(handle, graph, zero)


def zero_slices(handle: ModelHandle, graph: ChannelGraph,
                cuts_by_tensor: Dict[str, List[Tuple[int, np.ndarray]]]) -> None:
    """Set ``tensor[..., idx (on axis), ...] = 0`` for every (axis, idx) listed per stored
    tensor, reading and writing each tensor once. An integer table dequantized with a nonzero
    zero point gets that zero point instead (``graph.zero_values``): what reads as 0."""
    for name, cuts in cuts_by_tensor.items():
        tensor = graph.stored[name]
        arr = np.array(handle.read(tensor), copy=True)
        zero = graph.zero_values.get(name, 0)
        for axis, idx in cuts:
            sl = [slice(None)] * arr.ndim
            sl[axis] = idx
            arr[tuple(sl)] = zero
        handle.write(tensor, arr)


class ResizeContext:
    """What a rule's rewrite sees: removed indices per dim and helpers to replace constants."""

    def __init__(self, handle: ModelHandle, graph: ChannelGraph,
                 cut: Dict[Tuple[str, int], np.ndarray], opset: int) -> None:
        self.handle = handle
        self.graph = graph
        self.cut = cut
        self.opset = opset
        self.replaced: List[str] = []
        # Producers as they were before the rewrites (which add initializers, and nodes only
        # after the node they rewrite: ReduceMean's width ratio).
        self.index = handle.index

    def removed(self, name: str, axis: int) -> np.ndarray:
        return self.cut.get((name, axis), np.zeros(0, np.int64))

    def new_size(self, name: str, axis: int, default: Optional[int]) -> Optional[int]:
        gone = self.removed(name, axis)
        if len(gone) == 0:
            return default
        shape = self.graph.shapes.get(name)
        return int(shape[axis]) - len(gone)

    def graph_const(self, name: str) -> np.ndarray:
        g = self.handle.model.graph
        for t in g.initializer:
            if t.name == name:
                return self.handle.read(t)
        if name in self.graph.stored:
            return self.handle.read(self.graph.stored[name])
        node = self.index.producer(name)
        if node is not None and copies_values(node):
            return self.graph_const(node.input[0])
        if name in self.graph.folded:  # computed from constants (Builder.const_value)
            return self.graph.folded[name]
        raise KeyError(name)

    def unique_name(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``...: a value name no node or initializer uses."""
        g = self.handle.model.graph
        used = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | \
            {i.name for i in g.input}
        name, k = base, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        return name

    def new_constant(self, base: str, values: np.ndarray) -> str:
        """A new initializer holding ``values`` in their own dtype."""
        return new_initializer(self.handle.model.graph, base, np.asarray(values))

    def add_initializer(self, old_name: str, values: np.ndarray) -> str:
        """A new initializer holding ``values`` (the old one may be shared, so never edited)."""
        self.replaced.append(old_name)
        return new_initializer(self.handle.model.graph, old_name, np.asarray(values, np.int64))


def resize_channels(handle: ModelHandle, graph: ChannelGraph, removed: Removed
                    ) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """Delete the removed channels everywhere; returns stored tensor -> (shape before, after)."""
    cut = removed_by_dim(graph, removed)
    per_tensor: Dict[str, List[Tuple[int, np.ndarray]]] = defaultdict(list)
    for (name, axis), idx in cut.items():
        if name in graph.stored:
            per_tensor[name].append((axis, idx))
    shapes: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    for name, cuts in per_tensor.items():
        tensor = graph.stored[name]
        arr = handle.read(tensor)
        before = tuple(arr.shape)
        for axis, idx in cuts:
            arr = np.delete(arr, idx, axis=axis)
        handle.write(tensor, arr)
        shapes[name] = (before, tuple(arr.shape))
    rc = ResizeContext(handle, graph, cut, handle.index.opset())
    for node, fn in graph.rewrites:
        fn(node, rc)
    g = handle.model.graph
    # Old exporters list initializers as graph inputs: keep those entries' shapes in step.
    for vi in g.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[vi.name][1]):
                d.Clear()
                d.dim_value = v
    # A graph output whose channels go (a joined model's state, model/compose.py): its
    # declared fixed dims follow.
    for vi in g.output:
        for (name, axis), idx in cut.items():
            dims = vi.type.tensor_type.shape.dim
            if name == vi.name and axis < len(dims) and dims[axis].HasField("dim_value"):
                dims[axis].dim_value -= len(idx)
    _drop_unused(g, set(rc.replaced))
    handle.graph_changed()
    refresh_value_info(handle.model)
    return shapes


def _drop_unused(g: onnx.GraphProto, candidates: set) -> None:
    """Remove the ``candidates`` no node reads any more, in place: the other initializers stay
    the same objects (a rewritten external tensor's spilled values are keyed by its object;
    clearing the field and extending it with copies would orphan them)."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    for field in (g.initializer, g.input):
        for i in reversed(range(len(field))):
            if field[i].name in candidates and field[i].name not in used:
                del field[i]


def refresh_value_info(model: onnx.ModelProto) -> None:
    """Drop stale intermediate shapes and put back what shape inference now derives."""
    had = {vi.name for vi in model.graph.value_info}
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    del model.graph.value_info[:]
    if not had:
        return
    shapes = infer_shapes(model, upgrade=False, complete=complete_shapes).shapes
    for name in sorted(had):
        shape = shapes.get(name)
        if shape is None:
            continue
        dims = [d if d is not None else "" for d in shape]
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(
            name, elem[name], [d if d != "" else None for d in dims]))
