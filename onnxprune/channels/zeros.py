"""What a removed channel holds in the masked model, for the statistics that need it to be 0.

A sum over a channel axis (``ReduceSum``, ``ReduceSumSquare``, ``ReduceL1``/``L2``, the
``Pow -> ReduceMean`` of an RMSNorm, the normalization of ``SimplifiedLayerNormalization``) is
unchanged by deleting channels that hold exactly 0 — and a mean only needs its divisor kept
(the rules' rewrites). So such a rule does not freeze the axis; it asks
(:meth:`onnxprune.ops._channel.NodeCtx.need_zero`) and :func:`check_zeros` answers once the
groups are built: is every removed channel of that group **0 at that tensor** in the masked
model? Otherwise the group freezes with the rule's reason and the cause.

The value of a removed channel is followed forward, in graph order, through the group's
tensors, with the registry's entries (the same ones dead-channel detection uses):

* a node whose weight *produces* the group's channels outputs its ``zero_filter`` of the bias
  (a masked row's output: the bias, itself masked to 0 when the bias is the group's), or 0
  where its ``masked_zero`` says so (a recurrent unit whose state starts at 0);
* a stored member whose role masking zeroes (``ZERO_ON_MASK``) holds its masked value: 0, or for
  an integer table the zero point its dequantization subtracts (:func:`onnxprune.ops.quant.
  zero_value`), which the ``DequantizeLinear`` after it turns back into 0;
* any other op applies its ``const`` rule. An operand that is not the group's (the RMSNorm's
  ``1/sqrt(mean)``, a scale computed in-graph) is unknown but finite: it is evaluated at two
  different probe values, and a channel is 0 only if it is 0 for both (``0 * s``, ``0 / s``,
  ``Pow(0, 2)``, ``Relu``/``Tanh``/``Gelu`` of 0 are; ``0 + 1``, ``Sigmoid(0)``, ``Exp(0)`` are
  not). An op with no ``const`` rule, a graph input, or an unknown operand the value depends
  on makes it unknown: not 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import onnx

from onnxprune.model.index import node_key
from onnxprune.ops._channel import PRODUCER, ZERO_ON_MASK
from onnxprune.ops.quant import MOVES
from onnxprune.ops.registry import bias_slot, copies_values, field_of

if TYPE_CHECKING:  # the builder calls check_zeros: a runtime import would be a cycle
    from onnxprune.channels.graph import Builder, ChannelGroup

#: Values an operand from outside the group takes (unknown, finite): one row each.
PROBES = np.array([[0.7390851332151607], [-1.3247179572447460]])


def check_zeros(builder: "Builder", groups: List["ChannelGroup"]) -> None:
    """Freeze every prunable group a rule reduces over (``builder.need_zero``) whose removed
    channels are not 0 at the reduced tensor in the masked model, with the rule's reason and the
    first op that makes them nonzero."""
    if not builder.need_zero:
        return
    where: Dict[Tuple[str, int], "ChannelGroup"] = {}
    for g in groups:
        for m in g.members:
            where.setdefault((m.tensor, m.axis), g)
    walks: Dict[int, _Walk] = {}
    for name, axis, why, stream in builder.need_zero:
        g = where.get((name, axis))
        if g is None or g.frozen:
            continue
        if g.id not in walks:
            walks[g.id] = _Walk(builder, g)
        cause = walks[g.id].cause(name)
        if cause is not None:
            g.frozen = f"{why}; here they are not: {cause}"
        elif g.stream is None and stream:
            g.stream = why.split(": ", 1)[0]  # the node's label: "ReduceMean 'ln/mean'"


class _Walk:
    """The masked value of a group's removed channels at each of its activations (rows: the two
    probes; NaN: unknown), computed once per group in graph order."""

    def __init__(self, builder: "Builder", group: "ChannelGroup") -> None:
        self.b = builder
        self.group = group
        self.activations = {m.tensor for m in group.members if not m.stored}
        self.stored = {}
        for m in group.members:
            if m.stored:
                self.stored.setdefault(m.tensor, m)
        self.roles: Dict[Tuple[str, int], set] = defaultdict(set)
        for m in group.members:
            for role, key, index in builder.roles.get((m.tensor, m.axis), []):
                self.roles[(key, index)].add(role)
        self.values: Dict[str, np.ndarray] = {}
        self.why: Dict[str, str] = {}
        self._run()

    def cause(self, name: str) -> Optional[str]:
        v = self.values.get(name)
        if v is not None and not np.isnan(v).any() and not v.any():
            return None
        return self.why.get(name, f"'{name}' is computed where onnxprune cannot follow it")

    def _run(self) -> None:
        for node in self.b.graph.node:
            outs = [o for o in node.output if o in self.activations]
            if not outs:
                continue
            key = node_key(node)
            ins = [self._operand(node, key, i) for i in range(len(node.input))]
            produced = [i for i in range(len(node.input)) if PRODUCER in self.roles[(key, i)]]
            label = f"{node.op_type} '{key}'"
            if produced:
                out = self._producer(node, produced[0], ins)
                exact = field_of(node, "masked_zero")
                if np.isnan(out).any() and exact is not None and exact(node, ins):
                    out = np.zeros((1, 1))
                results = [out] + [None] * (len(node.output) - 1)
                what = f"{label} outputs its bias there"
            else:
                const = field_of(node, "const")
                results = None
                if const is not None:
                    with np.errstate(all="ignore"):
                        try:
                            results = const(node, ins, self._read)
                        except (ValueError, TypeError, IndexError):
                            results = None
                what = label if const is not None else f"{label} (an op whose values are not followed)"
            for k, o in enumerate(node.output):
                if o not in self.activations:
                    continue
                v = None if results is None or k >= len(results) else results[k]
                v = np.full((2, 1), np.nan) if v is None else np.asarray(v, np.float64)
                self.values[o] = v
                if np.isnan(v).any() or v.any():
                    broken = next((self.why[n] for n in node.input if n in self.why), None)
                    self.why[o] = broken or self._describe(what, v)

    @staticmethod
    def _describe(what: str, v: np.ndarray) -> str:
        finite = v[~np.isnan(v)] if v.size else v
        if np.isnan(v).any() or finite.size == 0:
            return f"{what} leaves them unknown"
        if np.ptp(finite) == 0:
            return f"{what} makes them {float(finite.ravel()[0]):.6g}"
        return f"{what} makes them nonzero"

    def _producer(self, node, weight_index: int, ins) -> np.ndarray:
        zero_filter = field_of(node, "zero_filter")
        if zero_filter is None:
            return np.full((2, 1), np.nan)
        bias = np.zeros((1, 1))
        slot = bias_slot(node, weight_index)
        if slot is not None and slot.index is not None and slot.index < len(ins) and \
                ins[slot.index] is not None:
            bias = ins[slot.index] * slot.beta
        with np.errstate(all="ignore"):
            return np.asarray(zero_filter(node, bias, None), np.float64)

    def _operand(self, node, key: str, i: int) -> Optional[np.ndarray]:
        name = node.input[i]
        if not name:
            return None
        if name in self.values:
            return self.values[name]
        if name in self.activations:  # a graph input, or made by a node with no value
            if name not in self.why:
                self.why[name] = (f"'{name}' is a graph input" if self.b.index.producer(name)
                                  is None else f"'{name}' is not followed")
            return np.full((2, 1), np.nan)
        roles = self.roles[(key, i)]
        src = self.b.stored_source(name, 0) if roles & ZERO_ON_MASK else None
        if src is not None:
            return np.full((1, 1), float(self.b.zero_values.get(src[0], 0)))
        m = self.stored.get(name)
        if m is not None and any(r in ZERO_ON_MASK for r, _, _ in
                                 self.b.roles.get((m.tensor, m.axis), [])):
            # a member masking zeroes, read here on its way to where its role is (a bias
            # reshaped to [1, C, 1, 1] before its Add)
            return np.full((1, 1), float(self.b.zero_values.get(name, 0)))
        value = self.b.const_value(name)
        if value is None:
            return np.zeros((1, 1)) if self._all_zero(name) else PROBES
        value = np.asarray(value, np.float64)
        if value.size == 1:
            return value.reshape(1, 1)
        if m is not None and value.size == value.shape[m.axis]:
            vals = value.reshape(-1)[m.index_map]
            same = np.all(vals == vals[:, :1], axis=1)
            return np.where(same, vals[:, 0], np.nan)[None, :]
        return PROBES

    def _all_zero(self, name: str, depth: int = 0) -> bool:
        """Whether ``name`` is zeros of a run-time shape: ``ConstantOfShape`` of 0 (a torch
        export's initial recurrent state, sized from the batch), through ops that only move,
        cut or repeat values."""
        node = self.b.index.producer(name)
        if node is None or depth > 8 or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return value is None or not np.any(onnx.numpy_helper.to_array(value))
        if (node.op_type in MOVES or node.op_type == "Tile" or copies_values(node)) and \
                node.input:
            return self._all_zero(node.input[0], depth + 1)
        return False

    def _read(self, name: str):
        return self.b.const_value(name)
