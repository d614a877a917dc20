"""Dead channels: found after any masking, removed only where removing them is exact.

A unit (channel) of a non-frozen group is dead when

* **unread**: every consumer's input slice for it is zero and no weight-free op reduces over it
  (an activation x activation MatMul), so its value never matters; or
* **constant**: every producer row of it is zero, so it carries an input-independent constant
  (the bias, BN shift, act(bias)...). The constant is propagated through the group's ops with
  each op's registry ``const`` function (:mod:`onnxprune.ops.registry`; what a zero filter
  outputs is its ``zero_filter``, the bias it adds its ``bias`` slot); where it is 0 at every
  consumer the channel goes, otherwise it is folded into each consumer's bias **only where that
  is exact** (the entry's ``fold`` rule, told the weight's shape: Gemm's right operand, MatMul
  with a constant 2-D right operand, Conv with no padding). A zero-padded Conv sees 0 instead
  of the constant at its borders, ConvTranspose spreads it unevenly, a batched MatMul weight
  adds a different row per batch entry, and an op that is not a consumer weight cannot take a
  bias: those channels are kept, and the record lists them as ``kept_nonzero_const`` with the
  reason (the fold rule's, or the first op or parameter that made the value unknown).

A value past float32's finite range is unknown too: the walk's float64 arithmetic does not
overflow where the model's fp32 run does, and no bias can take an infinite constant.

A unit can be several channels of one tensor (a grouped conv's groups, a depthwise multiplier,
the halves of a Split added back): it carries one constant only where all of them hold the same
value; otherwise the value is unknown, never the first channel's.

:func:`remove_dead_channels` runs the whole step (find, fold, resize) on a model; the
:class:`~onnxprune.passes.structure.RemoveDeadChannels` pass calls it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx

from onnxprune.model.external import tensor_dtype
from onnxprune.model.index import node_key
from onnxprune.model.io import ModelHandle
from onnxprune.ops.layouts import layout_for
from onnxprune.ops.registry import (BiasSlot, activation_of, bias_slot, copies_values, field_of,
                                    fold_refusal)
from onnxprune.channels.graph import ChannelGraph, ChannelGroup, Member, build_channel_graph
from onnxprune.channels.resize import resize_channels, zero_slices
from onnxprune.channels.rules import new_initializer
from onnxprune.ops._channel import CONSUMER, PRODUCER, set_attr


_F32_MAX = float(np.finfo(np.float32).max)


class _Walk:
    """Per-unit constants of one group's tensors (NaN = not constant / unknown)."""

    def __init__(self, handle: ModelHandle, graph: ChannelGraph, group: ChannelGroup,
                 nodes: List[onnx.NodeProto]) -> None:
        self.h, self.g, self.group = handle, graph, group
        self.members: Dict[str, Member] = {}
        for m in group.members:
            self.members.setdefault(m.tensor, m)
        self.nodes = nodes
        self.values: Dict[str, np.ndarray] = {}
        self.why: Dict[int, str] = {}  # unit -> first reason its value became unknown
        self.by_node_roles: Dict[Tuple[str, int], List[Tuple[str, Member]]] = defaultdict(list)
        for m in group.members:
            for role, node_name, idx in graph.roles.get((m.tensor, m.axis), []):
                self.by_node_roles[(node_name, idx)].append((role, m))

    def lost(self, units, reason: str) -> None:
        """Record ``reason`` for the units (a mask or indices) whose value became unknown."""
        for u in np.flatnonzero(np.asarray(units)) if np.asarray(units).dtype == bool \
                else units:
            self.why.setdefault(int(u), reason)

    def param(self, name: str) -> Optional[np.ndarray]:
        """Per-unit value of a per-channel parameter of this group, or a scalar constant."""
        m = self.members.get(name)
        if m is not None and m.stored:
            arr = np.asarray(self.h.read(self.g.stored[name]), np.float64)
            if arr.size != arr.shape[m.axis]:
                return None  # more than one value per channel: not one constant per unit
            flat = arr.reshape(-1)
            # A unit can be several channels of the tensor (the groups of a grouped conv read
            # channel c of each group through one weight slice): one constant only where they
            # all hold the same value, else unknown (NaN), never the first one's.
            vals = flat[m.index_map]
            same = np.all(vals == vals[:, :1], axis=1)
            for u in np.flatnonzero(~same):
                self.lost([u], f"channels {m.index_map[u].tolist()} of '{name}' are one unit "
                               f"but hold different values {np.round(vals[u], 6).tolist()}")
            return np.where(same, vals[:, 0], np.nan)
        src = name
        while src not in self.g.stored:
            return None
        arr = np.asarray(self.h.read(self.g.stored[src]), np.float64)
        return np.full(self.group.size, float(arr.ravel()[0])) if arr.size == 1 else None

    def run(self) -> None:
        nan = np.full(self.group.size, np.nan)
        for node in self.nodes:
            key = node_key(node)
            zero_filter = field_of(node, "zero_filter")
            if zero_filter is not None:
                produced = [i for i in range(len(node.input))
                            for r, m in self.by_node_roles.get((key, i), []) if r == PRODUCER]
                if produced:
                    self.values[node.output[0]] = self._producer_const(node, key, produced[0],
                                                                       zero_filter)
                continue
            ins = []
            for name in node.input:
                if not name:
                    ins.append(None)
                elif name in self.values:
                    ins.append(self.values[name])
                elif name in self.members and not self.members[name].stored:
                    # an activation of this group no constant reached: unknown, not absent
                    ins.append(np.full(self.group.size, np.nan))
                else:
                    ins.append(self.param(name))
            if all(v is None for v in ins[:1]) and not any(n in self.values for n in node.input):
                continue
            const = field_of(node, "const")
            out = None if const is None else const(node, ins, self._read_const)
            for o, v in zip(node.output, out if out is not None else []):
                if o in self.members:
                    self.values[o] = nan if v is None else np.asarray(v, np.float64)
            if out is None:
                for o in node.output:
                    if o in self.members:
                        self.values[o] = nan
            first = next((np.asarray(v, np.float64) for v in ins if v is not None), nan)
            for o in node.output:
                if o in self.members:
                    self.values[o] = self._finite(self.values[o], f"{node.op_type} '{key}'")
                    self.lost(np.isnan(self.values[o]) & ~np.isnan(first),
                              f"{node.op_type} '{key}' " + ("has no constant rule" if const is None
                                                            else "does not keep it constant"))

    def _finite(self, v: np.ndarray, where: str) -> np.ndarray:
        """``v`` with values outside float32's finite range made unknown (NaN): the walk's
        float64 arithmetic does not overflow where the model's fp32 run gives inf (Exp of a
        large bias), and no bias can take an infinite constant (inf * W is inf or NaN)."""
        big = ~np.isnan(v) & ~(np.abs(v) <= _F32_MAX)
        if big.any():
            self.lost(big, f"{where} makes it overflow float32")
            v = np.where(big, np.nan, v)
        return v

    def _producer_const(self, node, key, weight_index, zero_filter) -> np.ndarray:
        bias = np.zeros(self.group.size)
        slot = bias_slot(node, weight_index)
        if slot is not None and slot.index is not None and len(node.input) > slot.index \
                and node.input[slot.index]:
            # The bias the zero row outputs: one per unit of this group, or a scalar broadcast
            # to all; any other (a Gemm C of [M, 1] or a computed one) varies along another
            # axis or is unknown, so the channel is not a known constant.
            v = self._through_copies(node.input[slot.index])
            if v is None:
                self.lost(np.arange(self.group.size),
                          f"the bias '{node.input[slot.index]}' of {node.op_type} '{key}' is not "
                          "one known value per channel")
                return np.full(self.group.size, np.nan)
            bias = v * slot.beta
        out = np.asarray(zero_filter(node, bias, self.values.get(node.input[0])), np.float64)
        out = self._finite(out, f"{node.op_type} '{key}'")
        self.lost(np.isnan(out) & ~np.isnan(bias),
                  f"{node.op_type} '{key}': its zero filter's output is not known here")
        return out

    def _through_copies(self, name: str) -> Optional[np.ndarray]:
        """:meth:`param` of ``name``, or of the stored tensor it copies through value-copying
        ops (an fp32 bias behind a Cast in an fp16 model), each applied with its registry
        ``const`` (a Cast rounds to its type); None when it is neither."""
        chain = []
        while name not in self.g.stored and len(chain) < 8:
            p = self.h.index.producer(name)
            if p is None or not copies_values(p) or not p.input:
                return None
            chain.append(p)
            name = p.input[0]
        v = self.param(name)
        for p in reversed(chain):
            const = field_of(p, "const")
            out = None if (v is None or const is None) else const(p, [v], self._read_const)
            v = None if not out or out[0] is None else np.asarray(out[0], np.float64)
        return v

    def _read_const(self, name: str):
        if name in self.g.stored:
            return self.h.read(self.g.stored[name])
        return None


def find_dead(handle: ModelHandle, graph: ChannelGraph):
    """Per group: units to remove, (unit, consumer member, node, k) folds, and kept notes."""
    # The index's node wrappers: protobuf hands out a new wrapper per access, so id()s (and
    # positions) are only comparable among the index's own.
    index = handle.index
    position = index.position
    nodes_by_name = index.by_key()
    result = []
    for group in graph.prunable():
        zero_rows = _all_zero(handle, graph, group, PRODUCER)
        zero_cols = _all_zero(handle, graph, group, CONSUMER)
        sinks = any("sink" in m.roles for m in group.members)
        unread = zero_cols if not sinks else np.zeros(group.size, bool)
        if not group.consumers and not sinks:
            unread = np.ones(group.size, bool)
        const_units = np.flatnonzero(zero_rows & ~unread)
        remove = set(np.flatnonzero(unread).tolist())
        folds, kept = [], []
        folded_units = set()
        if len(const_units):
            tensors = {m.tensor for m in group.members if not m.stored}
            nodes = sorted({id(n): n for t in tensors for n, _ in index.consumers(t)}.values(),
                           key=position)
            producers = sorted({id(nodes_by_name[nn]): nodes_by_name[nn]
                                for m in group.members
                                for r, nn, _ in graph.roles.get((m.tensor, m.axis), [])
                                if r == PRODUCER and nn in nodes_by_name}.values(),
                               key=position)
            allnodes = sorted({id(n): n for n in nodes + producers}.values(), key=position)
            walk = _Walk(handle, graph, group, allnodes)
            walk.run()
            consumer_inputs = []  # (member, node, input index, activation name)
            for m in group.members:
                for r, nn, idx in graph.roles.get((m.tensor, m.axis), []):
                    if r == CONSUMER and nn in nodes_by_name:
                        node = nodes_by_name[nn]
                        act = activation_of(node, idx, graph.stored[m.tensor].dims)
                        consumer_inputs.append((m, node, idx,
                                                node.input[act.index] if act else ""))
            sink_tensors = [m.tensor for m in group.members if "sink" in m.roles]
            for u in const_units.tolist():
                vals = [walk.values.get(act, np.full(group.size, np.nan))[u]
                        for _, _, _, act in consumer_inputs]
                svals = [walk.values.get(t, np.full(group.size, np.nan))[u] for t in sink_tensors]
                if any(np.isnan(v) for v in vals + svals) or any(v != 0 for v in svals):
                    why = walk.why.get(u) or ("read by an op with no weight (a sink)"
                                              if not any(np.isnan(v) for v in svals + vals)
                                              else "no constant reaches its reader")
                    kept.append(f"{group.describe()} channel {u}: zero filter, value not "
                                f"constant/zero where it is read: {why}")
                    continue
                plan = [(m, node, idx, float(v)) for (m, node, idx, _), v
                        in zip(consumer_inputs, vals) if v != 0 and _reads(handle, graph, m, u)]
                if not plan:
                    remove.add(u)
                    continue
                # The first reason a fold would not be exact: the op's (registry) or the bias's.
                refused = next((r for r in (_refusal(graph, m, node, idx)
                                            for m, node, idx, _ in plan) if r), None)
                unfit = None if refused else next(
                    (r for r in (_bias_unfit(index, graph, node, idx)
                                 for _, node, idx, _ in plan) if r), None)
                if refused:
                    kept.append(f"{group.describe()} channel {u}: constant "
                                f"{[round(k, 6) for *_, k in plan]} reaches a consumer where "
                                f"folding is not exact: {refused}")
                elif unfit:
                    kept.append(f"{group.describe()} channel {u}: constant "
                                f"{[round(k, 6) for *_, k in plan]} cannot be folded: {unfit}")
                else:
                    folded_units.add(u)
                    # zero every consumer's slice so the next pass sees the unit as unread
                    in_plan = {(id(m), id(node)) for m, node, _, _ in plan}
                    folds.extend((u, m, node, idx, k) for m, node, idx, k in plan)
                    # value 0 there: zeroing the slice is exact and makes the unit unread
                    folds.extend((u, m, node, idx, 0.0) for m, node, idx, _ in consumer_inputs
                                 if (id(m), id(node)) not in in_plan)
        # Never remove every channel: keep the group alive with one unit.
        if len(remove) + len(folded_units) >= group.size:
            last = max(remove | folded_units)
            remove.discard(last)
            folded_units.discard(last)
            kept.append(f"{group.describe()}: all channels dead; one kept so the graph stays "
                        "connected")
            folds = [f for f in folds if f[0] != last]
        result.append((group, sorted(remove), folds, kept))
    return result


def _refusal(graph: ChannelGraph, m: Member, node: onnx.NodeProto, idx: int) -> Optional[str]:
    """Why folding into the weight ``m`` read by ``node`` at ``idx`` is not exact (the op
    registry's ``fold`` rule, told the stored weight's shape), or None."""
    why = fold_refusal(node, idx, tuple(graph.stored[m.tensor].dims))
    return None if why is None else f"{node.op_type} '{node_key(node)}': {why}"


def _all_zero(handle, graph, group, role) -> np.ndarray:
    flags = np.ones(group.size, bool)
    any_member = False
    for m in group.members:
        if not m.stored or role not in m.roles:
            continue
        any_member = True
        arr = np.asarray(handle.read(graph.stored[m.tensor]))
        rows = np.moveaxis(arr, m.axis, 0).reshape(arr.shape[m.axis], -1)
        nz = np.any(rows != 0, axis=1)
        flags &= ~nz[m.index_map].any(axis=1)
    return flags if any_member else np.zeros(group.size, bool)


def _reads(handle, graph, m: Member, u: int) -> bool:
    arr = np.asarray(handle.read(graph.stored[m.tensor]))
    return bool(np.any(np.take(arr, m.index_map[u], axis=m.axis) != 0))


def set_input(node: onnx.NodeProto, index: int, name: str) -> None:
    """Make ``name`` input ``index`` of ``node``: an explicit empty optional input (``""``)
    is filled in place, missing ones before it become ``""``; the node never grows past it."""
    while len(node.input) < index:
        node.input.append("")
    if len(node.input) > index:
        node.input[index] = name
    else:
        node.input.append(name)


def _bias_unfit(index, graph: ChannelGraph, node: onnx.NodeProto, weight_index: int
                ) -> Optional[str]:
    """Why the bias a fold into ``node`` would edit cannot take it (None when it can): it must
    be absent (a new one is made), or a stored tensor no other node reads. A bias that is a graph
    input or computed (an fp32 bias behind a Cast in an fp16 model) cannot be edited, and one
    shared by two layers (optimizers merge equal initializers) would shift the other layer."""
    slot = bias_slot(node, weight_index)
    if slot is None or slot.index is None or len(node.input) <= slot.index \
            or not node.input[slot.index]:
        return None  # a new bias input, or an Add after a MatMul, is created for the fold
    name = node.input[slot.index]
    if name not in graph.stored:
        return f"the bias '{name}' of {node.op_type} '{node_key(node)}' is not a stored tensor"
    readers = index.read_anywhere(name)
    if readers != 1:
        return (f"the bias '{name}' of {node.op_type} '{node_key(node)}' is shared by "
                f"{readers} nodes")
    return None


def apply_folds(handle: ModelHandle, graph: ChannelGraph, folds) -> List[str]:
    """Add ``k * sum(W[:, slice of unit])`` to each consumer's bias (creating one if needed) and
    zero that slice, which leaves the model's function unchanged and the unit unread."""
    notes = []
    deltas: Dict[int, Tuple[onnx.NodeProto, BiasSlot, np.ndarray]] = {}
    zero: Dict[str, List[Tuple[int, np.ndarray]]] = defaultdict(list)
    for u, m, node, idx, k in folds:
        if k == 0:
            continue
        w = np.asarray(handle.read(graph.stored[m.tensor]), np.float64)
        layout = layout_for(node, idx, w.shape)
        taken = np.take(w, m.index_map[u], axis=m.axis)
        other = tuple(a for a in range(w.ndim) if a != layout.out_axis)
        delta = k * taken.sum(axis=other)
        slot = bias_slot(node, idx)
        if slot.alpha != 1.0:
            delta = delta * slot.alpha
        prev = deltas.get(id(node))
        deltas[id(node)] = (node, slot, delta if prev is None else prev[2] + delta)
        notes.append(f"unit {u} (constant {k:.6g}) folded into {node.op_type} "
                     f"'{node_key(node)}'")
    for u, m, node, idx, k in folds:
        zero[m.tensor].append((m.axis, m.index_map[u]))
    zero_slices(handle, graph, zero)
    g = handle.model.graph
    inserts: Dict[int, onnx.NodeProto] = {}
    for node, slot, delta in deltas.values():
        if slot.index is not None:
            if len(node.input) > slot.index and node.input[slot.index]:
                _add_bias(handle, graph, node, slot.index,
                          delta if slot.beta == 1.0 else delta / slot.beta)
            else:  # a new bias holds delta as is: its scale attribute (Gemm beta) becomes 1
                name = new_initializer(g, f"{node_key(node)}_{slot.operand}",
                                       delta.astype(_dtype_of(handle, graph, node)))
                set_input(node, slot.index, name)
                if slot.beta_attr:
                    set_attr(node, slot.beta_attr, 1.0)
        else:  # no bias input (MatMul): an Add after it
            out, key = node.output[0], node_key(node)
            mid = out + "_prefold"
            node.output[0] = mid
            name = new_initializer(g, key + "_fold", delta.astype(_dtype_of(handle, graph, node)))
            inserts[mid] = onnx.helper.make_node("Add", [mid, name], [out], name=key + "_fold")
    if inserts:
        nodes = []
        for n in g.node:
            nodes.append(n)
            if n.output and n.output[0] in inserts:
                nodes.append(inserts[n.output[0]])
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(copies)
    handle.graph_changed()
    return notes


def _dtype_of(handle, graph, node) -> np.dtype:
    w = node.input[1]
    return tensor_dtype(graph.stored[w]) if w in graph.stored else np.dtype(np.float32)


def _add_bias(handle, graph, node, index, delta) -> None:
    g = handle.model.graph
    if len(node.input) > index and node.input[index]:
        name = node.input[index]
        if name not in graph.stored:
            raise RuntimeError(f"bias '{name}' of '{node.name}' is not stored")
        t = graph.stored[name]
        b = np.asarray(handle.read(t), np.float64)
        b = b + delta  # [N], [1, N] and [M, N] biases all broadcast with [N]
        handle.write(t, b)
    else:
        name = new_initializer(g, node_key(node) + "_B",
                               delta.astype(_dtype_of(handle, graph, node)))
        set_input(node, index, name)


@dataclass
class DeadChannels:
    """What :func:`remove_dead_channels` did."""

    removed: Dict[int, List[int]]  # group id -> removed unit indices (non-empty lists only)
    folded: List[str] = field(default_factory=list)  # one note per constant folded into a bias
    kept_nonzero_const: List[str] = field(default_factory=list)  # dead, but not exactly removable

    @property
    def channels_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())


def remove_dead_channels(handle: ModelHandle, input_shapes: Optional[Dict] = None
                         ) -> DeadChannels:
    """Remove the channels left dead by any masking, exactly (the rule is the module's).

    Mutates ``handle.model``. Folding a constant zeroes the consumer slices it went into, so
    the next round sees those units as unread: up to three rounds of find and fold, then one
    resize of every coupled tensor.
    """
    folded: List[str] = []
    for _ in range(3):
        graph = build_channel_graph(handle, input_shapes)
        found = find_dead(handle, graph)
        folds = [f for _, _, fs, _ in found for f in fs]
        if not folds:
            break
        folded += apply_folds(handle, graph, folds)
    removed = {g.id: units for g, units, _, _ in found if units}
    resize_channels(handle, graph, removed)
    return DeadChannels(removed, folded, [k for _, _, _, ks in found for k in ks])
