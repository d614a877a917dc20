"""What a channel rule (the ``channels`` field of an op entry) works with: the roles a stored
tensor's axis plays, :class:`NodeCtx` (the node, its shapes and constants, and the builder's
tie/freeze/role calls), and the tie helpers several op families share.

A rule receives a :class:`NodeCtx` and calls

* ``ctx.tie((a, axis), (b, axis))`` for axes that are the same channels index for index,
* ``ctx.tie_map(...)`` for explicit index maps (Concat/Split offsets, Flatten blocks, groups),
* ``ctx.role(name, axis, ROLE)`` for stored tensors whose slices belong to a channel (weights,
  biases, BN parameters, per-channel constants) — what masking zeroes and scoring reads,
* ``ctx.rewrite(fn)`` for attributes/constants that resize must rewrite (Conv ``group``, Split
  sizes, Slice starts/ends, Reshape shape),
* ``ctx.ok(name)`` for control inputs (shape vectors, scalars) that carry no channels,
* ``ctx.need_zero(name, axis, why)`` for a statistic over a channel axis (a sum, a mean of
  squares) that stays exact under removal only where the removed channels hold 0 in the masked
  model: the group is checked once built (:mod:`onnxprune.channels.zeros`) and frozen with
  ``why`` and the cause where they do not.

Every axis of every input/output that a rule does not tie is **frozen** afterwards — never
guessed. The builder itself (union-find, groups) is :mod:`onnxprune.channels.graph`; this module
only needs its methods, so the op families do not import the channels layer.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import onnx

from onnxprune.model.index import attr, node_key

# Roles a stored tensor's axis plays in a group. Masking a channel zeroes the slices whose role is
# in ZERO_ON_MASK, so that the channel contributes nothing anywhere (see resize.mask_channels).
PRODUCER = "producer"      # weight out-channel rows (Conv W[c], Gemm/MatMul output columns)
CONSUMER = "consumer"      # weight input slices (Conv W[:, c], MatMul W[c, :])
BIAS = "bias"              # additive per-channel value: conv/gemm bias, Add constant, BN shift
SCALE = "scale"            # BN/InstanceNorm gamma: zeroed with the shift so the output is 0
STAT = "stat"              # BN running mean/var: left alone (var must stay positive)
FACTOR = "factor"          # Mul/Div constant, PRelu slope: 0 * k is already 0
ZERO_ON_MASK = {PRODUCER, CONSUMER, BIAS, SCALE}


class NodeCtx:
    """What a rule sees: the node, shapes, constants, and the builder's tie/freeze/role calls."""

    def __init__(self, builder, node: onnx.NodeProto, opset: int) -> None:
        self.b = builder
        self.node = node
        self.opset = opset
        self.mentioned: set = set()
        self.quiet: set = set()
        self.label = f"{node.op_type} '{node_key(node)}'"

    # -- reading -------------------------------------------------------------------------
    def inp(self, i: int) -> Optional[str]:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def out(self, i: int = 0) -> Optional[str]:
        return self.node.output[i] if i < len(self.node.output) and self.node.output[i] else None

    def attr(self, name: str, default=None):
        return attr(self.node, name, default)

    def shape(self, name: str):
        return self.b.shape(name)

    def rank(self, name: str) -> Optional[int]:
        s = self.b.shape(name)
        return None if s is None else len(s)

    def size(self, name: str, axis: int) -> Optional[int]:
        return self.b.size(name, axis)

    def const(self, name: Optional[str]) -> Optional[np.ndarray]:
        return None if name is None else self.b.const_value(name)

    def is_const(self, name: str) -> bool:
        return self.b.is_const(name)

    # -- effects -------------------------------------------------------------------------
    def tie(self, a: Tuple[str, int], b: Tuple[str, int]) -> bool:
        self.mentioned.add(a)
        self.mentioned.add(b)
        return self.b.tie(a, b, self.label)

    def tie_map(self, a, ia, b, ib, size_a: int, size_b: int) -> None:
        self.mentioned.add(a)
        self.mentioned.add(b)
        self.b.tie_map(a, ia, b, ib, size_a, size_b)

    def role(self, name: str, axis: int, role: str) -> None:
        index = list(self.node.input).index(name)
        self.b.role(name, axis, role, self.node, index)

    def ok(self, name: Optional[str], axis: Optional[int] = None) -> None:
        """Mark a control input (or one axis) as carrying no channels: not frozen."""
        if name:
            self.quiet.add((name, axis))

    def need_zero(self, name: str, axis: int, why: str, stream: bool = True) -> None:
        """``name``'s ``axis`` is reduced over here: removing its channels is exact only where
        they are 0 in the masked model (checked on the built group; frozen with ``why``).
        ``stream``: the reduction normalizes what it reads (an RMSNorm: a residual stream, kept
        whole unless ``--prune-stream``); False for one that only quantizes it."""
        self.mentioned.add((name, axis))
        self.b.need_zero.append((name, axis, f"{self.label}: {why}", stream))
        # its value matters here with no weight reading it: dead-channel removal may not take
        # a channel as unread, nor remove one whose constant is not 0 here
        self.b.sink(name, axis, self.node, list(self.node.input).index(name))

    def dtype(self, name: str) -> Optional[int]:
        """The ONNX element type of ``name`` (shape inference), or None."""
        return self.b.types.get(name)

    def freeze(self, name: Optional[str], axis: Optional[int], reason: str) -> None:
        if name:
            self.b.freeze(name, axis, f"{self.label}: {reason}")
            self.mentioned.add((name, axis))

    def rewrite(self, fn: Callable) -> None:
        self.b.rewrites.append((self.node, fn))

    def finish(self) -> None:
        """Freeze every axis of every input/output the rule left untied."""
        for name in list(self.node.input) + list(self.node.output):
            if not name or (name, None) in self.quiet:
                continue
            if name in self.node.output and not self.b.consumers.get(name) and \
                    name not in self.b.graph_outputs:
                continue  # an output nobody reads (Dropout's mask) constrains nothing
            r = self.rank(name)
            if r is None:
                # Even a tied axis is unsafe: the rule could not map the others, so the
                # channel would be lost on the far side.
                self.b.freeze(name, None, f"{self.label}: shape of '{name}' unknown "
                                          "(shape inference)")
                continue
            for axis in range(r):
                if (name, axis) not in self.mentioned and (name, axis) not in self.quiet:
                    self.b.freeze(name, axis, f"{self.label} does not map axis {axis} of "
                                              f"'{name}'")


# -- helpers shared by the op families ---------------------------------------------------------
def same_extent(a, b) -> Optional[bool]:
    """Do two aligned broadcast entries denote the same axis (True), a broadcast (False), or
    is it unknown (None)?"""
    if isinstance(a, int) and isinstance(b, int):
        if a == b:
            return True
        return False if (a == 1 or b == 1) else None
    if isinstance(a, str) and a == b:
        return True
    if a == 1 or b == 1:
        return False if (a == 1) != (b == 1) else True
    return None


def tie_broadcast(ctx: NodeCtx, name: str, out: str, role: Optional[str] = None) -> None:
    """Tie ``name``'s axes to ``out``'s, right-aligned (numpy broadcasting)."""
    si, so = ctx.shape(name), ctx.shape(out)
    if si is None or so is None:
        return
    off = len(so) - len(si)
    const = role is not None and ctx.is_const(name)
    for j in range(len(si)):
        same = same_extent(si[j], so[off + j])
        if same is None:
            ctx.freeze(name, j, f"cannot tell broadcast from equal extent on axis {j}")
            ctx.freeze(out, off + j, f"cannot tell broadcast on axis {off + j}")
        elif same:
            ctx.tie((name, j), (out, off + j))
            if const and si[j] != 1:
                ctx.role(name, j, role)
        else:
            ctx.ok(name, j)


def tie_all(ctx: NodeCtx, a: str, b: str) -> None:
    r = ctx.rank(a) if ctx.rank(a) is not None else ctx.rank(b)
    if r is None:
        return
    for axis in range(r):
        ctx.tie((a, axis), (b, axis))


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def axes_arg(ctx: NodeCtx, input_index: int, name: str = "axes") -> Optional[List[int]]:
    """An ``axes`` operand (input ``input_index`` when given, else attribute ``name``)."""
    if ctx.inp(input_index):
        v = ctx.const(ctx.inp(input_index))
        ctx.ok(ctx.inp(input_index))
        return None if v is None else [int(a) for a in np.asarray(v).ravel()]
    v = ctx.attr(name, None)
    return None if v is None else [int(a) for a in v]


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Set (replace) attribute ``name`` of ``node``."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def pass_through_const(node, vals, read):
    """Constant propagation of an op that moves values without changing them (a layout op,
    max pooling, a copy): every output carries the first known input constant."""
    v = next((x for x in vals if x is not None), None)
    return [v] * len(node.output)
