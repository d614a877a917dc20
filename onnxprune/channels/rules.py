"""Per-op channel rules: how each op ties the channel axes of its inputs and outputs.

One rule per op type, registered with :func:`register_rule`. A rule receives a :class:`NodeCtx`
and calls

* ``ctx.tie((a, axis), (b, axis))`` for axes that are the same channels index for index,
* ``ctx.tie_map(...)`` for explicit index maps (Concat/Split offsets, Flatten blocks, groups),
* ``ctx.role(name, axis, ROLE)`` for stored tensors whose slices belong to a channel (weights,
  biases, BN parameters, per-channel constants) — what masking zeroes and scoring reads,
* ``ctx.rewrite(fn)`` for attributes/constants that resize must rewrite (Conv ``group``, Split
  sizes, Slice starts/ends, Reshape shape),
* ``ctx.ok(name)`` for control inputs (shape vectors, scalars) that carry no channels.

Every axis of every input/output that a rule does not tie is **frozen** afterwards — never
guessed. An op without a rule freezes every tensor it touches. Weight layouts (which raw axis is
out/in) come from :mod:`onnxprune.ops.layouts`, never re-derived here.

Each rule may also carry a ``const`` function used by dead-channel detection: given the constant
value (per unit) of its channel inputs, the constant it outputs, or None when the output is not
input-independent (e.g. zero padding at borders). See :mod:`.dead`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model.index import subgraph_reads
from onnxprune.ops.layouts import layout_for
from onnxprune.channels.graph import BIAS, CONSUMER, FACTOR, PRODUCER, SCALE, STAT, Builder

TieFn = Callable[["NodeCtx"], None]


@dataclass
class ChannelRule:
    op_types: Tuple[str, ...]
    tie: TieFn
    const: Optional[Callable] = None  # dead-channel constant propagation (see dead.py)


RULES: Dict[str, ChannelRule] = {}


def register_rule(*op_types: str, const: Optional[Callable] = None) -> Callable[[TieFn], TieFn]:
    """Decorator: the channel rule for ``op_types`` (default ONNX domain only)."""

    def deco(fn: TieFn) -> TieFn:
        rule = ChannelRule(tuple(op_types), fn, const)
        for op in op_types:
            RULES[op] = rule
        return fn

    return deco


def rule_for(node: onnx.NodeProto) -> Optional[ChannelRule]:
    if node.domain not in ("", "ai.onnx"):
        return None
    return RULES.get(node.op_type)


class NodeCtx:
    """What a rule sees: the node, shapes, constants, and the builder's tie/freeze/role calls."""

    def __init__(self, builder: Builder, node: onnx.NodeProto, opset: int) -> None:
        self.b = builder
        self.node = node
        self.opset = opset
        self.mentioned: set = set()
        self.quiet: set = set()
        self.label = f"{node.op_type} '{node.name or node.output[0]}'"

    # -- reading -------------------------------------------------------------------------
    def inp(self, i: int) -> Optional[str]:
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def out(self, i: int = 0) -> Optional[str]:
        return self.node.output[i] if i < len(self.node.output) and self.node.output[i] else None

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

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


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def apply_rules(builder: Builder) -> None:
    """Run every main-graph node's rule, freezing graph boundaries and subgraph reads."""
    graph = builder.graph
    opset = _opset(builder.handle.model)
    init_names = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name not in init_names:
            builder.freeze(vi.name, None, f"graph input '{vi.name}' keeps its shape")
    for vi in graph.output:
        builder.freeze(vi.name, None, f"graph output '{vi.name}' keeps its shape")
    for node in graph.node:
        for name in subgraph_reads(node):
            builder.freeze(name, None, f"'{name}' is read inside a subgraph of "
                                       f"{node.op_type} '{node.name}'")
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        rule = rule_for(node)
        if rule is None:
            label = f"{node.domain + ':' if node.domain else ''}{node.op_type}"
            for name in list(node.input) + list(node.output):
                if name:
                    builder.freeze(name, None, f"no channel rule for {label} "
                                               f"'{node.name or node.output[0]}'")
            continue
        ctx = NodeCtx(builder, node, opset)
        rule.tie(ctx)
        ctx.finish()


# -- helpers ---------------------------------------------------------------------------------
def _same_extent(a, b) -> Optional[bool]:
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
        same = _same_extent(si[j], so[off + j])
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


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def new_initializer(handle_graph: onnx.GraphProto, base: str, values: np.ndarray) -> str:
    names = {t.name for t in handle_graph.initializer} | {o for n in handle_graph.node
                                                          for o in n.output}
    name, k = f"{base}_pruned", 1
    while name in names:
        name, k = f"{base}_pruned{k}", k + 1
    handle_graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values), name))
    return name


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


# -- unary / elementwise ---------------------------------------------------------------------
_UNARY_NP = {
    "Relu": lambda x, n: np.maximum(x, 0),
    "Sigmoid": lambda x, n: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "Identity": lambda x, n: x, "Cast": lambda x, n: x, "Dropout": lambda x, n: x,
    "Abs": lambda x, n: np.abs(x), "Neg": lambda x, n: -x,
    "Exp": lambda x, n: np.exp(x), "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Softsign": lambda x, n: x / (1 + np.abs(x)),
    "HardSigmoid": lambda x, n: np.clip(_a(n, "alpha", 0.2) * x + _a(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6 + 0.5, 0, 1),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, _a(n, "alpha", 0.01) * x),
    "Elu": lambda x, n: np.where(x >= 0, x, _a(n, "alpha", 1.0) * (np.exp(x) - 1)),
    "Selu": lambda x, n: _a(n, "gamma", 1.0507) * np.where(
        x > 0, x, _a(n, "alpha", 1.67326) * (np.exp(x) - 1)),
    "Celu": lambda x, n: np.maximum(0, x) + np.minimum(
        0, _a(n, "alpha", 1.0) * (np.exp(x / _a(n, "alpha", 1.0)) - 1)),
    "Mish": lambda x, n: x * np.tanh(np.log1p(np.exp(x))),
    "ThresholdedRelu": lambda x, n: np.where(x > _a(n, "alpha", 1.0), x, 0),
    "Gelu": None, "Erf": None, "Log": None, "Sqrt": None, "Reciprocal": None, "Floor": None,
    "Ceil": None, "Round": None, "Sign": None, "Sin": None, "Cos": None, "Clip": None,
    "Shrink": None, "Not": None, "IsNaN": None, "IsInf": None, "Swish": None,
}


def _a(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _unary_const(node, vals, ctx_read):
    fn = _UNARY_NP.get(node.op_type)
    if node.op_type == "Clip":
        lo = ctx_read(node.input[1]) if len(node.input) > 1 and node.input[1] else _a(
            node, "min", None)
        hi = ctx_read(node.input[2]) if len(node.input) > 2 and node.input[2] else _a(
            node, "max", None)
        x = vals[0]
        x = x if lo is None else np.maximum(x, float(np.asarray(lo)))
        return [x if hi is None else np.minimum(x, float(np.asarray(hi)))]
    if fn is None:
        import math
        table = {"Erf": np.vectorize(math.erf), "Log": np.log, "Sqrt": np.sqrt,
                 "Reciprocal": lambda v: 1 / v, "Floor": np.floor, "Ceil": np.ceil,
                 "Round": np.round, "Sign": np.sign, "Sin": np.sin, "Cos": np.cos,
                 "Gelu": lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))}
        f = table.get(node.op_type)
        return None if f is None else [f(vals[0])]
    return [fn(vals[0], node)]


@register_rule(*_UNARY_NP, const=_unary_const)
def _unary(ctx: NodeCtx) -> None:
    x = ctx.inp(0)
    for i in range(1, len(ctx.node.input)):  # Clip min/max, Dropout ratio: scalars
        ctx.ok(ctx.inp(i))
    for o in ctx.node.output:
        if o:
            tie_all(ctx, x, o)


_BINARY_ROLE = {"Add": BIAS, "Sub": BIAS, "Sum": BIAS, "Mean": BIAS, "Mul": FACTOR,
                "Div": FACTOR, "Pow": FACTOR, "Max": FACTOR, "Min": FACTOR, "PRelu": FACTOR,
                "Where": FACTOR, "Equal": FACTOR, "Greater": FACTOR, "Less": FACTOR,
                "GreaterOrEqual": FACTOR, "LessOrEqual": FACTOR, "And": FACTOR, "Or": FACTOR,
                "Xor": FACTOR, "Mod": FACTOR}


def _binary_const(node, vals, ctx_read):
    op = node.op_type
    a, b = vals[0], vals[1] if len(vals) > 1 else None
    fns = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
           "Max": np.maximum, "Min": np.minimum, "Pow": np.power}
    if op in fns and b is not None:
        with np.errstate(all="ignore"):
            return [fns[op](a, b)]
    if op == "Sum":
        return [np.sum(np.stack(vals), axis=0)]
    if op == "Mean":
        return [np.mean(np.stack(vals), axis=0)]
    if op == "PRelu" and b is not None:
        return [np.where(a >= 0, a, b * a)]
    return None


@register_rule(*_BINARY_ROLE, const=_binary_const)
def _binary(ctx: NodeCtx) -> None:
    out = ctx.out()
    role = _BINARY_ROLE[ctx.node.op_type]
    for i, name in enumerate(ctx.node.input):
        if not name:
            continue
        r = role
        if ctx.node.op_type == "Sub" and i == 1 and ctx.is_const(name):
            r = BIAS  # c - x: zeroing c keeps a masked channel at 0
        tie_broadcast(ctx, name, out, r)


# -- Conv / ConvTranspose ----------------------------------------------------------------------
def _group_maps(groups: int, per: int):
    """Indices ``g*per + k`` and the position ``k`` they share, for all groups g > 0."""
    g = np.arange(1, groups)[:, None]
    k = np.arange(per)[None, :]
    return (g * per + k).ravel(), np.broadcast_to(k, (groups - 1, per)).ravel()


def _conv_head(ctx: NodeCtx):
    """Conv/ConvTranspose operands, static weight shape, its layout and ``group``; None when
    the weight shape is unknown or impossible for the op (nothing is mapped: frozen)."""
    x, w, b, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out()
    ws = ctx.shape(w)
    if ws is None or not all(isinstance(d, int) for d in ws):
        return None
    layout = layout_for(ctx.node, 1, ws)
    if layout is None:
        return None
    return x, w, b, y, ws, layout, int(ctx.attr("group", 1))


@register_rule("Conv")
def _conv(ctx: NodeCtx) -> None:
    head = _conv_head(ctx)
    if head is None:
        return
    x, w, b, y, ws, layout, group = head
    cout, cin_g = ws[layout.out_axis], ws[layout.in_axis]
    cin = cin_g * group
    ctx.tie((x, 0), (y, 0))
    ctx.tie((w, layout.out_axis), (y, 1))
    if b:
        ctx.tie((b, 0), (y, 1))
        ctx.role(b, 0, BIAS)
    ctx.role(w, layout.out_axis, PRODUCER)
    if group == 1:
        ctx.tie((w, layout.in_axis), (x, 1))
        ctx.role(w, layout.in_axis, CONSUMER)
        return
    cout_g = cout // group
    ctx.ok(w, layout.in_axis)
    if cin_g == 1:  # depthwise (multiplier cout_g): input c owns outputs c*m .. c*m+m-1
        if cout_g == 1:
            ctx.tie((x, 1), (y, 1))
        else:
            c = np.repeat(np.arange(cin), cout_g)
            ctx.tie_map((x, 1), c, (y, 1), np.arange(cout), cin, cout)

        def regroup(node, rc, x=x, cin=cin):
            set_attr(node, "group", cin - len(rc.removed(x, 1)))
        ctx.rewrite(regroup)
        return
    # Grouped: remove the same positions in every group so the groups stay equal.
    gi, ki = _group_maps(group, cin_g)
    ctx.tie_map((x, 1), gi, (x, 1), ki, cin, cin)
    ctx.tie_map((x, 1), np.arange(cin_g), (w, layout.in_axis), np.arange(cin_g), cin, cin_g)
    ctx.role(w, layout.in_axis, CONSUMER)
    go, ko = _group_maps(group, cout_g)
    ctx.tie_map((y, 1), go, (y, 1), ko, cout, cout)


@register_rule("ConvTranspose")
def _conv_transpose(ctx: NodeCtx) -> None:
    head = _conv_head(ctx)
    if head is None:
        return
    x, w, b, y, ws, layout, group = head
    cin, cout_g = ws[layout.in_axis], ws[layout.out_axis]
    cout = cout_g * group
    cin_g = cin // group
    ctx.tie((x, 0), (y, 0))
    ctx.tie((w, layout.in_axis), (x, 1))
    if b:
        ctx.role(b, 0, BIAS)
    if group == 1:
        ctx.tie((w, layout.out_axis), (y, 1))
        if b:
            ctx.tie((b, 0), (y, 1))
        ctx.role(w, layout.out_axis, PRODUCER)
        ctx.role(w, layout.in_axis, CONSUMER)
        return
    ctx.ok(w, layout.out_axis)
    if cin_g == 1:  # depthwise: input c owns outputs c*m .. c*m+m-1 and weight row c
        ctx.role(w, layout.in_axis, PRODUCER)
        if cout_g == 1:
            ctx.tie((x, 1), (y, 1))
        else:
            c = np.repeat(np.arange(cin), cout_g)
            ctx.tie_map((x, 1), c, (y, 1), np.arange(cout), cin, cout)
        if b:
            ctx.tie((b, 0), (y, 1))

        def regroup(node, rc, x=x, cin=cin):
            set_attr(node, "group", cin - len(rc.removed(x, 1)))
        ctx.rewrite(regroup)
        return
    gi, ki = _group_maps(group, cin_g)
    ctx.tie_map((x, 1), gi, (x, 1), ki, cin, cin)
    ctx.role(w, layout.in_axis, CONSUMER)
    go, ko = _group_maps(group, cout_g)
    ctx.tie_map((y, 1), go, (y, 1), ko, cout, cout)
    ctx.tie_map((y, 1), np.arange(cout_g), (w, layout.out_axis), np.arange(cout_g), cout,
                cout_g)
    ctx.role(w, layout.out_axis, PRODUCER)
    if b:
        ctx.tie((b, 0), (y, 1))


# -- Gemm / MatMul -------------------------------------------------------------------------
def _weight_roles(ctx: NodeCtx, index: int) -> None:
    name = ctx.inp(index)
    shape = ctx.shape(name)
    if name is None or shape is None or not ctx.is_const(name):
        return
    if not all(isinstance(d, int) for d in shape):
        return
    layout = layout_for(ctx.node, index, shape)
    if layout is None:
        return
    ctx.role(name, layout.out_axis, PRODUCER)
    ctx.role(name, layout.in_axis, CONSUMER)


def _mark_sinks(ctx: NodeCtx, a, b) -> None:
    if not ctx.is_const(a[0]) and not ctx.is_const(b[0]):
        ctx.b.sink(a[0], a[1], ctx.node, 0)
        ctx.b.sink(b[0], b[1], ctx.node, 1)


@register_rule("Gemm")
def _gemm(ctx: NodeCtx) -> None:
    a, b, c, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out()
    am, ak = (1, 0) if ctx.attr("transA", 0) else (0, 1)
    bk, bn = (1, 0) if ctx.attr("transB", 0) else (0, 1)
    ctx.tie((a, ak), (b, bk))
    _mark_sinks(ctx, (a, ak), (b, bk))
    ctx.tie((a, am), (y, 0))
    ctx.tie((b, bn), (y, 1))
    if c:
        tie_broadcast(ctx, c, y, BIAS)
    _weight_roles(ctx, 0)
    _weight_roles(ctx, 1)


@register_rule("MatMul")
def _matmul(ctx: NodeCtx) -> None:
    a, b, y = ctx.inp(0), ctx.inp(1), ctx.out()
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra is None or rb is None or ry is None:
        return
    ak = ra - 1
    bk = 0 if rb == 1 else rb - 2
    ctx.tie((a, ak), (b, bk))
    _mark_sinks(ctx, (a, ak), (b, bk))
    out_axis = ry
    if rb > 1:
        out_axis -= 1
        ctx.tie((b, rb - 1), (y, out_axis))
    if ra > 1:
        out_axis -= 1
        ctx.tie((a, ra - 2), (y, out_axis))
    nbatch = out_axis  # y axes [0, nbatch) are broadcast batch axes
    for name, r in ((a, ra), (b, rb)):
        nb = max(r - 2, 0)
        sa, sy = ctx.shape(name), ctx.shape(y)
        for j in range(nb):
            yj = nbatch - nb + j
            same = _same_extent(sa[j], sy[yj])
            if same:
                ctx.tie((name, j), (y, yj))
            elif same is None:
                ctx.freeze(name, j, "cannot tell broadcast batch axis")
            else:
                ctx.ok(name, j)
    _weight_roles(ctx, 0)
    _weight_roles(ctx, 1)


# -- normalization ---------------------------------------------------------------------------
@register_rule("BatchNormalization")
def _batchnorm(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    tie_all(ctx, x, y)
    _per_channel_params(ctx, x, ((1, SCALE), (2, BIAS), (3, STAT), (4, STAT)))


def _per_channel_params(ctx: NodeCtx, x: str, params) -> None:
    """Tie each present ``[C]`` parameter input to ``x``'s channel axis, with its role."""
    for i, role in params:
        p = ctx.inp(i)
        if p:
            ctx.tie((p, 0), (x, 1))
            if ctx.is_const(p):
                ctx.role(p, 0, role)


@register_rule("InstanceNormalization")
def _instancenorm(ctx: NodeCtx) -> None:
    # Statistics are per (n, c) over the spatial axes: channels are independent.
    x, y = ctx.inp(0), ctx.out()
    ctx.tie((x, 0), (y, 0))
    ctx.tie((x, 1), (y, 1))
    _per_channel_params(ctx, x, ((1, SCALE), (2, BIAS)))


@register_rule("LayerNormalization")
def _layernorm(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    axis = _norm_axis(int(ctx.attr("axis", -1)), r)
    for j in range(axis):
        ctx.tie((x, j), (y, j))
    for j in range(axis, r):
        # Mean/variance are taken over these axes: removing a channel changes them for all.
        ctx.freeze(x, j, f"LayerNormalization normalizes over axis {j}")
        ctx.freeze(y, j, f"LayerNormalization normalizes over axis {j}")
        for p in (ctx.inp(1), ctx.inp(2)):
            if p and ctx.rank(p) is not None and j - axis < ctx.rank(p):
                pj = ctx.rank(p) - (r - j)
                if pj >= 0:
                    ctx.tie((p, pj), (x, j))


# -- pooling / resampling / padding --------------------------------------------------------
@register_rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
               "GlobalLpPool")
def _pool(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    ctx.tie((x, 0), (y, 0))
    ctx.tie((x, 1), (y, 1))


@register_rule("Resize", "Upsample")
def _resize(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    for i in range(1, len(ctx.node.input)):
        ctx.ok(ctx.inp(i))
    r = ctx.rank(x)
    if r is None:
        return
    tied = []
    for j in range(min(r, 2)):
        sx, sy = ctx.size(x, j), ctx.size(y, j)
        if sx is not None and sx == sy:
            ctx.tie((x, j), (y, j))
            tied.append(j)
        elif ctx.shape(x)[j] == ctx.shape(y)[j] and isinstance(ctx.shape(x)[j], str):
            ctx.tie((x, j), (y, j))
    sizes = ctx.inp(3) if ctx.node.op_type == "Resize" else None
    if sizes and ctx.const(sizes) is not None and 1 in tied:
        def resize_sizes(node, rc, y=y):
            old = rc.graph_const(node.input[3])
            new = np.array(old, dtype=np.int64)
            new[1] = rc.new_size(y, 1, int(old[1]))
            if not np.array_equal(new, old):
                node.input[3] = rc.add_initializer(node.input[3], new)
        ctx.rewrite(resize_sizes)
    elif sizes:
        ctx.freeze(x, 1, "Resize 'sizes' is not a constant")


@register_rule("Pad")
def _pad(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    for i in range(1, len(ctx.node.input)):
        ctx.ok(ctx.inp(i))
    r = ctx.rank(x)
    pads = ctx.attr("pads", None) if ctx.opset < 11 else ctx.const(ctx.inp(1))
    if r is None or pads is None:
        return
    pads = np.asarray(pads).astype(np.int64)
    axes = ctx.const(ctx.inp(3)) if ctx.inp(3) else None
    axes = list(range(r)) if axes is None else [_norm_axis(int(a), r) for a in axes]
    n = len(axes)
    padded = {a for k, a in enumerate(axes) if pads[k] != 0 or pads[k + n] != 0}
    for j in range(r):
        if j not in padded:
            ctx.tie((x, j), (y, j))


# -- layout ops ------------------------------------------------------------------------------
@register_rule("Transpose")
def _transpose(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    perm = ctx.attr("perm", None) or list(reversed(range(r)))
    for i, p in enumerate(perm):
        ctx.tie((x, int(p)), (y, i))


def _axes_arg(ctx: NodeCtx, input_index: int, attr: str = "axes") -> Optional[List[int]]:
    if ctx.inp(input_index):
        v = ctx.const(ctx.inp(input_index))
        ctx.ok(ctx.inp(input_index))
        return None if v is None else [int(a) for a in np.asarray(v).ravel()]
    v = ctx.attr(attr, None)
    return None if v is None else [int(a) for a in v]


@register_rule("Squeeze", "Unsqueeze")
def _squeeze(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return
    axes = _axes_arg(ctx, 1)
    if ctx.node.op_type == "Squeeze":
        if axes is None:
            axes = [j for j in range(rx) if ctx.size(x, j) == 1]
        axes = {_norm_axis(a, rx) for a in axes}
        kept = [j for j in range(rx) if j not in axes]
        for k, j in enumerate(kept):
            ctx.tie((x, j), (y, k))
        for j in axes:
            ctx.ok(x, j)
    else:
        if axes is None:
            return
        axes = {_norm_axis(a, ry) for a in axes}
        kept = [j for j in range(ry) if j not in axes]
        for k, j in enumerate(kept):
            ctx.tie((x, k), (y, j))
        for j in axes:
            ctx.ok(y, j)


def _reshape_blocks(s: Sequence[int], t: Sequence[int]):
    """Pair up axes of ``s`` and ``t`` into blocks of equal product (size-1 axes alone)."""
    blocks = []
    i = j = 0
    while i < len(s) or j < len(t):
        si = s[i] if i < len(s) else None
        tj = t[j] if j < len(t) else None
        if isinstance(si, str) or isinstance(tj, str) or si is None and i < len(s) or (
                tj is None and j < len(t)):
            # symbolic/unknown extents only pair with the same symbol, 1:1
            if isinstance(si, str) and si == tj:
                blocks.append(([i], [j]))
                i, j = i + 1, j + 1
                continue
            return None
        if i < len(s) and s[i] == 1 and (j >= len(t) or t[j] != 1):
            blocks.append(([i], []))
            i += 1
            continue
        if j < len(t) and t[j] == 1 and (i >= len(s) or s[i] != 1):
            blocks.append(([], [j]))
            j += 1
            continue
        if i >= len(s) or j >= len(t):
            return None
        bi, bj, pi, pj = [i], [j], s[i], t[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(s):
                pi *= s[i]
                bi.append(i)
                i += 1
            elif pj < pi and j < len(t):
                pj *= t[j]
                bj.append(j)
                j += 1
            else:
                return None
        blocks.append((bi, bj))
    return blocks


def tie_reshape(ctx: NodeCtx, x: str, y: str) -> bool:
    """Tie a reshape's axes exactly: equal axes 1:1; a merged/split block through one carrier
    axis (the one already linked to a weight for merges, the outermost for splits); every other
    axis of a block frozen."""
    s, t = ctx.shape(x), ctx.shape(y)
    if s is None or t is None:
        return False
    blocks = _reshape_blocks(s, t)
    if blocks is None:
        return False
    for bi, bj in blocks:
        if len(bi) == 1 and len(bj) == 1:
            ctx.tie((x, bi[0]), (y, bj[0]))
            continue
        if not bi or not bj:
            for a in bi:
                ctx.ok(x, a)
            for a in bj:
                ctx.ok(y, a)
            continue
        if len(bj) == 1:  # merge: carrier is the input axis linked to weights
            cands = [a for a in bi if s[a] > 1 and ctx.b.is_linked((x, a))]
            many, one, side_many, side_one = bi, bj[0], x, y
            shape_many = [s[a] for a in bi]
        elif len(bi) == 1:  # split: outermost non-1 output axis carries the channels
            cands = [a for a in bj if t[a] > 1][:1]
            many, one, side_many, side_one = bj, bi[0], y, x
            shape_many = [t[a] for a in bj]
        else:
            cands = []
        if len(cands) != 1:
            for a in bi:
                ctx.freeze(x, a, "reshape block has no single channel-carrying axis")
            for a in bj:
                ctx.freeze(y, a, "reshape block has no single channel-carrying axis")
            continue
        carrier = cands[0]
        k = many.index(carrier)
        flat = np.arange(int(np.prod(shape_many))).reshape(shape_many)
        idx_one = np.moveaxis(flat, k, 0).reshape(shape_many[k], -1)
        idx_carrier = np.repeat(np.arange(shape_many[k]), idx_one.shape[1])
        ctx.tie_map((side_many, carrier), idx_carrier, (side_one, one), idx_one.ravel(),
                    shape_many[k], int(np.prod(shape_many)))
        for a in many:
            if a != carrier:
                ctx.freeze(side_many, a, "reshape merges/splits it with a channel axis")
    return True


@register_rule("Reshape")
def _reshape(ctx: NodeCtx) -> None:
    x, shp, y = ctx.inp(0), ctx.inp(1), ctx.out()
    ctx.ok(shp)
    if ctx.const(shp) is None:
        ctx.freeze(x, None, "Reshape shape is computed at run time")
        ctx.freeze(y, None, "Reshape shape is computed at run time")
        return
    if not tie_reshape(ctx, x, y):
        return

    def reshape_shape(node, rc, y=y):
        old = np.asarray(rc.graph_const(node.input[1])).astype(np.int64)
        new = old.copy()
        for j, v in enumerate(old):
            ns = rc.new_size(y, j, None)
            if ns is not None and v != -1:
                new[j] = ns
        if not np.array_equal(new, old):
            node.input[1] = rc.add_initializer(node.input[1], new)
    ctx.rewrite(reshape_shape)


@register_rule("Flatten")
def _flatten(ctx: NodeCtx) -> None:
    tie_reshape(ctx, ctx.inp(0), ctx.out())


@register_rule("Concat")
def _concat(ctx: NodeCtx) -> None:
    y = ctx.out()
    r = ctx.rank(y)
    if r is None:
        return
    axis = _norm_axis(int(ctx.attr("axis")), r)
    total = ctx.size(y, axis)
    sizes = [ctx.size(x, axis) for x in ctx.node.input]
    if total is None or any(s is None for s in sizes):
        return
    off = 0
    for x, n in zip(ctx.node.input, sizes):
        for j in range(r):
            if j != axis:
                ctx.tie((x, j), (y, j))
        if n:
            ctx.tie_map((x, axis), np.arange(n), (y, axis), off + np.arange(n), n, total)
            if ctx.is_const(x):
                ctx.role(x, axis, BIAS)  # a constant slab is the channel's value
        else:
            ctx.ok(x, axis)
        off += n


@register_rule("Split")
def _split(ctx: NodeCtx) -> None:
    x = ctx.inp(0)
    r = ctx.rank(x)
    if r is None:
        return
    axis = _norm_axis(int(ctx.attr("axis", 0)), r)
    total = ctx.size(x, axis)
    outs = list(ctx.node.output)
    sizes = [ctx.size(o, axis) for o in outs]
    if total is None or any(s is None for s in sizes) or sum(sizes) != total:
        return
    if ctx.inp(1):
        ctx.ok(ctx.inp(1))
        if ctx.const(ctx.inp(1)) is None:
            return
    off = 0
    for o, n in zip(outs, sizes):
        for j in range(r):
            if j != axis:
                ctx.tie((x, j), (o, j))
        ctx.tie_map((x, axis), off + np.arange(n), (o, axis), np.arange(n), total, n)
        off += n

    def split_sizes(node, rc, outs=outs, sizes=sizes, axis=axis):
        new = np.array([n - len(rc.removed(o, axis)) for o, n in zip(outs, sizes)], np.int64)
        if np.array_equal(new, sizes):
            return
        if rc.opset >= 13:
            for i, a in enumerate(node.attribute):
                if a.name in ("num_outputs", "split"):
                    del node.attribute[i]
                    break
            name = rc.add_initializer(node.input[1] if len(node.input) > 1 and node.input[1]
                                      else (node.name or node.output[0]) + "_split", new)
            if len(node.input) > 1:
                node.input[1] = name
            else:
                node.input.append(name)
        else:
            set_attr(node, "split", [int(v) for v in new])
    ctx.rewrite(split_sizes)


@register_rule("Slice")
def _slice(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    if ctx.opset < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes, steps = ctx.attr("axes", None), None
    else:
        for i in range(1, len(ctx.node.input)):
            ctx.ok(ctx.inp(i))
        starts, ends = ctx.const(ctx.inp(1)), ctx.const(ctx.inp(2))
        axes = ctx.const(ctx.inp(3)) if ctx.inp(3) else None
        steps = ctx.const(ctx.inp(4)) if ctx.inp(4) else None
    if starts is None or ends is None or (ctx.inp(3) and axes is None) or (
            ctx.inp(4) and steps is None):
        return
    starts = np.asarray(starts, np.int64).ravel()
    ends = np.asarray(ends, np.int64).ravel()
    axes = list(range(len(starts))) if axes is None else [_norm_axis(int(a), r)
                                                           for a in np.ravel(axes)]
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).ravel()
    spans = {}
    for a, s0, e0, st in zip(axes, starts, ends, steps):
        n, m = ctx.size(x, a), ctx.size(y, a)
        if n is None or m is None:
            continue
        start = int(np.clip(s0 + n if s0 < 0 else s0, 0, n if st > 0 else n - 1))
        idx = start + int(st) * np.arange(m)
        if n == m and st == 1:
            ctx.tie((x, a), (y, a))
        elif st == 1:  # a window of channels: rewrite start/end on resize
            ctx.tie_map((x, a), idx, (y, a), np.arange(m), n, m)
            spans[a] = (start, start + m, n)
    for j in range(r):
        if j not in axes:
            ctx.tie((x, j), (y, j))
    if not spans or ctx.opset < 10:
        if spans:  # old attribute form: keep it frozen rather than rewrite attrs
            for a in spans:
                ctx.freeze(x, a, "Slice (opset<10) on a channel axis")
        return

    def slice_bounds(node, rc, spans=spans, axes=axes):
        st = np.asarray(rc.graph_const(node.input[1]), np.int64).copy()
        en = np.asarray(rc.graph_const(node.input[2]), np.int64).copy()
        changed = False
        for k, a in enumerate(axes):
            if a not in spans:
                continue
            start, end, n = spans[a]
            gone = rc.removed(x, a)
            if len(gone) == 0:
                continue
            new_start = start - int(np.sum(gone < start))
            new_end = end - int(np.sum(gone < end))
            st[k], en[k] = new_start, new_end
            changed = True
        if changed:
            node.input[1] = rc.add_initializer(node.input[1], st)
            node.input[2] = rc.add_initializer(node.input[2], en)
    ctx.rewrite(slice_bounds)


# -- reductions ---------------------------------------------------------------------------
@register_rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
               "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum", "ArgMax",
               "ArgMin")
def _reduce(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    op = ctx.node.op_type
    if op in ("ArgMax", "ArgMin"):
        axes = [int(ctx.attr("axis", 0))]
    else:
        uses_input = (op == "ReduceSum" and ctx.opset >= 13) or ctx.opset >= 18
        axes = _axes_arg(ctx, 1) if uses_input else ctx.attr("axes", None)
        if axes is None and ctx.inp(1):
            return  # axes not constant
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0):
                tie_all(ctx, x, y)
                return
            axes = list(range(r))
    axes = {_norm_axis(int(a), r) for a in axes}
    keep = int(ctx.attr("keepdims", 1))
    k = 0
    for j in range(r):
        if j in axes:
            if keep:
                ctx.ok(y, k)
                k += 1
            continue
        ctx.tie((x, j), (y, k))
        k += 1


@register_rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    axis = _norm_axis(int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)), r)
    for j in range(r):
        if (ctx.opset >= 13 and j != axis) or (ctx.opset < 13 and j < axis):
            ctx.tie((x, j), (y, j))


@register_rule("Shape")
def _shape(ctx: NodeCtx) -> None:
    # Only the axes whose size is read are frozen (torch's x.view(x.size(0), -1) reads axis 0).
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    ctx.ok(y)
    if r is None:
        ctx.freeze(x, None, "its shape is read")
        return
    start = _norm_axis(int(ctx.attr("start", 0)), r)
    end = ctx.attr("end", None)
    end = r if end is None else min(_norm_axis(int(end), r), r)
    read = _shape_reads(ctx.b, y, start, end)
    for j in range(r):
        if j in read:
            ctx.freeze(x, j, f"its size on axis {j} is read by Shape")
        else:
            ctx.ok(x, j)


def _shape_reads(b: Builder, vec: str, start: int, end: int, depth: int = 0) -> set:
    """Axes whose size a shape vector's readers actually use: through Cast/Identity, Gather
    and Slice with constant indices; anything else reads them all."""
    everything = set(range(start, end))
    readers = b.consumers.get(vec, [])
    if depth > 4 or not readers:
        return everything if readers else set()
    n = end - start
    read: set = set()
    for node, idx in readers:
        if idx != 0:
            return everything
        if node.op_type in ("Cast", "Identity"):
            read |= _shape_reads(b, node.output[0], start, end, depth + 1)
        elif node.op_type == "Gather" and b.const_value(node.input[1]) is not None:
            read |= {start + _norm_axis(int(i), n) for i in np.ravel(b.const_value(node.input[1]))}
        elif node.op_type == "Slice" and all(b.const_value(i) is not None
                                             for i in node.input[1:] if i):
            vals = [np.ravel(b.const_value(i)) if i else None for i in list(node.input[1:]) +
                    [None] * (5 - len(node.input))]
            st = int(vals[0][0])
            en = int(vals[1][0])
            step = int(vals[3][0]) if vals[3] is not None else 1
            read |= {start + i for i in range(n)[slice(st, en, step)]}
        else:
            return everything
    return read


@register_rule("Gather")
def _gather(ctx: NodeCtx) -> None:
    data, idx, y = ctx.inp(0), ctx.inp(1), ctx.out()
    rd, ri = ctx.rank(data), ctx.rank(idx)
    if rd is None or ri is None:
        return
    axis = _norm_axis(int(ctx.attr("axis", 0)), rd)
    for j in range(axis):
        ctx.tie((data, j), (y, j))
    for j in range(ri):
        ctx.tie((idx, j), (y, axis + j))
    for j in range(axis + 1, rd):
        ctx.tie((data, j), (y, j - 1 + ri))
