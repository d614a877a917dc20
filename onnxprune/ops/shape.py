"""The layout family: ops that move values between axes without computing — Transpose,
Squeeze/Unsqueeze, Reshape/Flatten, Concat, Split, Slice, Gather, Shape, DepthToSpace/
SpaceToDepth, Expand, Tile — and ``Constant``.

Each op's entry: channel rule (axes tied 1:1, or through index maps for merged/split/offset
axes; shape operands rewritten on resize) and constant propagation (values pass unchanged).

One module (about 1100 lines) on purpose: the layout ops' rules share the reshape-block and
shape-operand machinery (``reshape_blocks``, ``tie_reshape``, the rewrites); the static
evaluation of computed shape vectors lives in :mod:`onnxprune.ops.shapevec`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model.index import attr, node_key
from onnxprune.ops._channel import (BIAS, NodeCtx, axes_arg, norm_axis, pass_through_const,
                                    set_attr, tie_broadcast)
from onnxprune.ops.registry import copies_values, define
from onnxprune.ops.shapevec import (ONE_VALUE_OPS, VECTOR_OPS, DimProduct, DimRef, Entry,
                                    dim_factors, shape_vector, size_function)

_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)


def _constant(ctx: NodeCtx) -> None:
    # A stored value, not an op on channels: whatever reads it decides its axes' roles.
    ctx.ok(ctx.out())


# -- layout ops ------------------------------------------------------------------------------
def _transpose(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    perm = ctx.attr("perm", None) or list(reversed(range(r)))
    for i, p in enumerate(perm):
        ctx.tie((x, int(p)), (y, i))


def _squeeze(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    rx, ry = ctx.rank(x), ctx.rank(y)
    if rx is None or ry is None:
        return
    axes = axes_arg(ctx, 1)
    if ctx.node.op_type == "Squeeze":
        if axes is None:
            axes = [j for j in range(rx) if ctx.size(x, j) == 1]
        axes = {norm_axis(a, rx) for a in axes}
        kept = [j for j in range(rx) if j not in axes]
        for k, j in enumerate(kept):
            ctx.tie((x, j), (y, k))
        for j in axes:
            ctx.ok(x, j)
    else:
        if axes is None:
            return
        axes = {norm_axis(a, ry) for a in axes}
        kept = [j for j in range(ry) if j not in axes]
        for k, j in enumerate(kept):
            ctx.tie((x, k), (y, j))
        for j in axes:
            ctx.ok(y, j)


def reshape_blocks(s: Sequence[int], t: Sequence[int]):
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
            # a symbol merged with the axis after it ([batch, 12] <-> "batch*12", batch-major)
            if isinstance(si, str) and isinstance(tj, str) and i + 1 < len(s) and \
                    isinstance(s[i + 1], int) and tj == f"{si}*{s[i + 1]}":
                blocks.append(([i, i + 1], [j]))
                i, j = i + 2, j + 1
                continue
            if isinstance(si, str) and isinstance(tj, str) and j + 1 < len(t) and \
                    isinstance(t[j + 1], int) and si == f"{tj}*{t[j + 1]}":
                blocks.append(([i], [j, j + 1]))
                i, j = i + 1, j + 2
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
            if not (isinstance(pi, int) and isinstance(pj, int)) or \
                    (pi < pj and i < len(s) and not isinstance(s[i], int)) or \
                    (pj < pi and j < len(t) and not isinstance(t[j], int)):
                return None  # a symbol inside a merged/split block: no exact map
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
    axis of a block frozen. An axis sized by a run-time product (``"batch*6"``, a
    :class:`DimProduct` target entry) is its symbols and its units: the symbols pair with
    the same symbols and carry nothing, the 6 units take part in blocks like any axis (the
    merged axis carries them as they are, position ``b*6 + h`` being unit h)."""
    s, t = ctx.shape(x), ctx.shape(y)
    if s is None or t is None:
        return False
    blocks = reshape_blocks(s, t)
    ox, oy = list(range(len(s))), list(range(len(t)))  # block axis -> the tensor's axis
    if blocks is None and any(_is_product(d) for d in list(s) + list(t)):
        (s, ox), (t, oy) = _expand_products(s), _expand_products(t)
        blocks = reshape_blocks(s, t)
    if blocks is None:
        return False
    expanded = len(ox) != len(ctx.shape(x)) or len(oy) != len(ctx.shape(y))
    for bi, bj in blocks:
        if len(bi) == 1 and len(bj) == 1:
            ax, ay = ox[bi[0]], oy[bj[0]]
            if expanded and isinstance(s[bi[0]], str) and (
                    _is_product(ctx.shape(x)[ax]) or _is_product(ctx.shape(y)[ay])):
                # the batch of "batch*6" against a batch: no channels, and the axes are not
                # the same axis (the product one carries the units)
                for side, a in ((x, ax), (y, ay)):
                    if not _is_product(ctx.shape(side)[a]):
                        ctx.ok(side, a)
                continue
            ctx.tie((x, ax), (y, ay))
            continue
        if not bi or not bj:
            for a in bi:
                ctx.ok(x, ox[a])
            for a in bj:
                ctx.ok(y, oy[a])
            continue
        if isinstance(s[bi[0]], str) or isinstance(t[bj[0]], str):
            # [batch, n] <-> "batch*n": position b*n + c is channel c of every batch entry, so
            # the merged axis carries the n channels as they are (the batch axis none)
            if len(bj) == 1:
                ctx.tie((x, bi[1]), (y, bj[0]))
                ctx.ok(x, bi[0])
            else:
                ctx.tie((x, bi[0]), (y, bj[1]))
                ctx.ok(y, bj[0])
            continue
        if len(bj) == 1:  # merge: carrier is the input axis linked to weights
            cands = [a for a in bi if s[a] > 1 and ctx.b.is_linked((x, ox[a]))]
            many, one, side_many, side_one, own_many, own_one = bi, bj[0], x, y, ox, oy
            shape_many = [s[a] for a in bi]
        elif len(bi) == 1:  # split: outermost non-1 output axis carries the channels
            cands = [a for a in bj if t[a] > 1]
            if len(cands) > 1 and _unstacked(ctx.b, y, oy[cands[0]]):
                cands = cands[1:]  # fused qkv [3, heads, hd]: the 3 is split apart, heads carry
            cands = cands[:1]
            many, one, side_many, side_one, own_many, own_one = bj, bi[0], y, x, oy, ox
            shape_many = [t[a] for a in bj]
        else:
            cands = []
        if len(cands) != 1:
            for a in bi:
                ctx.freeze(x, ox[a], "reshape block has no single channel-carrying axis")
            for a in bj:
                ctx.freeze(y, oy[a], "reshape block has no single channel-carrying axis")
            continue
        carrier = cands[0]
        k = many.index(carrier)
        flat = np.arange(int(np.prod(shape_many))).reshape(shape_many)
        idx_one = np.moveaxis(flat, k, 0).reshape(shape_many[k], -1)
        idx_carrier = np.repeat(np.arange(shape_many[k]), idx_one.shape[1])
        ctx.tie_map((side_many, own_many[carrier]), idx_carrier, (side_one, own_one[one]),
                    idx_one.ravel(), shape_many[k], int(np.prod(shape_many)))
        for a in many:
            if a != carrier:
                ctx.freeze(side_many, own_many[a], "reshape merges/splits it with a channel axis")
    return True


def _is_product(d) -> bool:
    return isinstance(d, str) and "*" in d


def _expand_products(shape) -> Tuple[list, List[int]]:
    """A shape with each product dim (``"batch*6"``) as its factors (``batch``, ``6``), and for
    each factor the axis it belongs to."""
    out: list = []
    owner: List[int] = []
    for a, d in enumerate(shape):
        if _is_product(d):
            syms, n = dim_factors(d)
            parts = list(syms) + ([n] if n != 1 else [])
        else:
            parts = [d]
        out += parts
        owner += [a] * len(parts)
    return out, owner


def _unstacked(b, name: str, axis: int, depth: int = 0) -> bool:
    """Whether every reader of ``name`` takes its ``axis`` apart into single slices (a Split into
    sizes of 1 or a Gather of one index along it, through Transposes and Squeeze/Unsqueeze of
    other axes): a stacking axis such as
    the 3 of a fused ``[3, heads, head_dim]`` projection, which holds no channels of its own."""
    readers = b.consumers.get(name, [])
    if not readers or depth > 8 or name in b.graph_outputs:
        return False
    for node, idx in readers:
        if idx != 0 or node.domain not in ("", "ai.onnx"):
            return False
        r = len(b.shape(name) or ())
        if node.op_type == "Transpose":
            perm = attr(node, "perm", None)
            if perm is None or not _unstacked(b, node.output[0], list(perm).index(axis),
                                              depth + 1):
                return False
        elif node.op_type in ("Squeeze", "Unsqueeze"):
            # torch's MultiheadAttention: unflatten(3, E).unsqueeze(0).transpose(0, -2)
            # .squeeze(-2) moves the 3 to the front before taking it apart
            axes = b.const_value(node.input[1]) if len(node.input) > 1 and node.input[1] \
                else attr(node, "axes", None)
            if axes is None:
                return False
            if node.op_type == "Squeeze":
                gone = {norm_axis(int(a), r) for a in np.ravel(axes)}
                if axis in gone:
                    return False
                moved = axis - sum(1 for a in gone if a < axis)
            else:
                ro = r + len(np.ravel(axes))
                new = {norm_axis(int(a), ro) for a in np.ravel(axes)}
                kept = [j for j in range(ro) if j not in new]
                moved = kept[axis]
            if not _unstacked(b, node.output[0], moved, depth + 1):
                return False
        elif node.op_type == "Split":
            if norm_axis(int(attr(node, "axis", 0)), r) != axis or \
                    any(b.size(o, axis) != 1 for o in node.output):
                return False
        elif node.op_type == "Gather":
            i = b.const_value(node.input[1])
            if norm_axis(int(attr(node, "axis", 0)), r) != axis or i is None or \
                    np.ndim(i) != 0:
                return False
        else:
            return False
    return True


def _constant_shape(ctx: NodeCtx) -> bool:
    """Input 1 is a shape vector: True when it is constant, else the op is frozen."""
    x, shp, y = ctx.inp(0), ctx.inp(1), ctx.out()
    ctx.ok(shp)
    if ctx.const(shp) is None:
        ctx.freeze(x, None, f"{ctx.node.op_type} shape is computed at run time")
        ctx.freeze(y, None, f"{ctx.node.op_type} shape is computed at run time")
        return False
    return True


def _rewrite_shape(ctx: NodeCtx, y: str, fixed: int) -> None:
    """On resize, entries of the shape vector (input 1, right-aligned with ``y``) on a resized
    axis take its new size, except the value ``fixed`` (Reshape's -1, Expand's 1)."""
    def rewrite(node, rc, y=y):
        old = np.asarray(rc.graph_const(node.input[1])).astype(np.int64)
        new = old.copy()
        ry = len(rc.graph.shapes.get(y) or old)
        for j, v in enumerate(old):
            ns = rc.new_size(y, ry - len(old) + j, None)
            if ns is not None and v != fixed:
                new[j] = ns
        if not np.array_equal(new, old):
            node.input[1] = rc.add_initializer(node.input[1], new)
    ctx.rewrite(rewrite)


def _reshape(ctx: NodeCtx) -> None:
    if ctx.const(ctx.inp(1)) is None:
        _computed_reshape(ctx)
    elif _constant_shape(ctx) and tie_reshape(ctx, ctx.inp(0), ctx.out()):
        _rewrite_shape(ctx, ctx.out(), fixed=-1)


def _vector_of(b, name: str) -> Optional[List[Entry]]:
    """:func:`shape_vector` on the channel graph builder's shapes and constants."""
    return shape_vector(name, b.shape, b.const_value, b.index.producer)


def _pinned(b, e, x: str, pins: list):
    """A :class:`DimRef` entry as its current size when it reads the width of a channel axis
    (tied to weights) of another tensor than the reshaped one (``C = x.shape[2]`` read from the
    residual stream to merge heads back): the axis goes into ``pins`` (the caller freezes it,
    so the size stays what the entry says). Else the entry itself."""
    if isinstance(e, DimRef) and e.tensor != x and b.is_linked((e.tensor, e.axis)) and \
            not _reaches(b, (e.tensor, e.axis), x):
        size = b.size(e.tensor, e.axis)
        if size is not None:
            pins.append(e)
            return size
    return e


def _reaches(b, key, x: str) -> bool:
    """Whether dim ``key`` already carries channels of one of ``x``'s axes (the same level-1
    class, or one joined to it by index maps: K viewed as [b*h, s, hd] and back)."""
    d = b.dim_id.get(key)
    if d is None:
        return False
    want = {b.dsu.find(b.dim_id[(x, a)]) for a in range(len(b.shape(x) or ()))
            if (x, a) in b.dim_id}
    seen = {b.dsu.find(d)}
    while True:
        if seen & want:
            return True
        more = set()
        for da, _, db, _ in b.map_ties:
            ra, rb = b.dsu.find(da), b.dsu.find(db)
            if ra in seen and rb not in seen:
                more.add(rb)
            elif rb in seen and ra not in seen:
                more.add(ra)
        if not more:
            return False
        seen |= more


def _pinned_vector(b, name: str, x: str, pins: list, depth: int = 0) -> Optional[List[Entry]]:
    """:func:`_vector_of` with channel widths read from other tensors pinned (:func:`_pinned`),
    and entries computed from such a width (``C // heads``) evaluated."""
    entries = _vector_of(b, name)
    if entries is not None:
        return [_pinned(b, e, x, pins) for e in entries]
    node = b.index.producer(name)
    if node is None or depth > 8 or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    op = node.op_type
    if op == "Concat":
        parts = [_pinned_vector(b, i, x, pins, depth + 1) for i in node.input]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return _pinned_vector(b, node.input[0], x, pins, depth + 1)
    if op not in ("Div", "Mul", "Add", "Sub") or len(node.input) != 2:
        return None
    vals = [_pinned_vector(b, i, x, pins, depth + 1) for i in node.input]
    if any(v is None or len(v) != 1 or not isinstance(v[0], int) for v in vals):
        return None
    u, v = vals[0][0], vals[1][0]
    if op == "Div":
        return None if v == 0 or u % v else [u // v]
    return [u * v if op == "Mul" else u + v if op == "Add" else u - v]


def _computed_reshape(ctx: NodeCtx) -> None:
    """A Reshape whose target a shape subgraph computes (``x.view(b, s, -1, 32)``): tied like a
    constant one when the subgraph evaluates statically (:func:`shape_vector`). An entry that
    copies the size of some tensor's axis at run time ties that axis to the output axis it
    sizes (so both lose the same channels and the copied size stays right); a constant entry
    on a resized axis (other than -1) is overridden on resize by a ``Where`` in front of the
    Reshape, so a vector shared with other reshapes is never edited in place."""
    x, shp, y = ctx.inp(0), ctx.inp(1), ctx.out()
    ctx.ok(shp)
    pins: list = []
    entries = _pinned_vector(ctx.b, shp, x, pins)
    for e in pins:  # a width read into the target (C, C // heads) must stay what it is
        ctx.freeze(e.tensor, e.axis, f"its width is read into the target of "
                                     f"{ctx.node.op_type} '{node_key(ctx.node)}'")
    ry = ctx.rank(y)
    if entries is None or ry is None or len(entries) != ry or \
            not tie_reshape(ctx, x, y):
        why = ("shape is computed at run time" if entries is None else
               "computed shape does not match the output's rank or axes")
        ctx.freeze(x, None, f"{ctx.node.op_type} {why}")
        ctx.freeze(y, None, f"{ctx.node.op_type} {why}")
        for e in entries or ():  # a size it copies must not change under it either
            for r in _refs(e):
                ctx.freeze(r.tensor, r.axis, f"{ctx.node.op_type} '{node_key(ctx.node)}' "
                                             f"copies its size into a shape it cannot map")
        return
    allowzero = bool(ctx.attr("allowzero", 0))
    for j, e in enumerate(entries):
        if isinstance(e, DimRef):
            ctx.tie((e.tensor, e.axis), (y, j))
        elif isinstance(e, DimProduct):
            _product_axis(ctx, y, j, e)
    fixed = [(j, e) for j, e in enumerate(entries)
             if isinstance(e, int) and e != -1 and (e != 0 or allowzero)]
    if fixed:
        ctx.rewrite(_override_entries(y, fixed, len(entries), 1))
    products = [(j, e) for j, e in enumerate(entries)
                if isinstance(e, DimProduct) and e.factor > 1]
    if products:
        ctx.rewrite(_rewrite_products(ctx.b, y, products, len(entries)))


def _refs(e) -> tuple:
    """The run-time sizes an entry reads."""
    return (e,) if isinstance(e, DimRef) else e.refs if isinstance(e, DimProduct) else ()


def _product_axis(ctx: NodeCtx, y: str, j: int, e: DimProduct) -> None:
    """Output axis ``j`` sized ``refs * factor`` at run time (``batch * heads``). The sizes it
    reads are pinned (frozen: the product must stay what it is), never evaluated. With a
    factor > 1 the axis is a batch-major merge of the read sizes with ``factor`` units (heads):
    it keeps the channels :func:`tie_reshape` gave it, and a resize rewrites the factor to the
    units kept (:func:`_rewrite_products`), so the axis still scales with the batch. That needs
    the read sizes' product to be 1 where the graph is built (``--input-shape batch=1``) or
    symbolic (``"batch*6"``); a factor of 1 (``seq * batch``) carries no channels."""
    where = f"{ctx.node.op_type} '{node_key(ctx.node)}'"
    for r in e.refs:
        ctx.freeze(r.tensor, r.axis, f"its size is multiplied into the target of {where}")
    size = ctx.size(y, j)
    if e.factor <= 1:
        ctx.freeze(y, j, f"{where}: the axis is a product of run-time sizes")
    elif size is not None and size != e.factor:
        ctx.freeze(y, j, f"{where}: the axis is {size} positions for {e.factor} units with "
                         f"the bound sizes; the units are exact only where the sizes multiplied "
                         f"by {e.factor} are bound to 1 (--input-shape batch=1)")


def _new_factor(rc, y: str, j: int, factor: int) -> Optional[int]:
    """The factor of a product entry on axis ``j`` of ``y`` after the resize: the units kept
    (the axis is ``factor`` units per run-time batch entry, see :func:`_product_axis`)."""
    gone = len(rc.removed(y, j))
    return factor - gone if gone < factor else None


def _product_uses(b, origin: str) -> Optional[List[Tuple[str, int]]]:
    """Every (Reshape output, axis) whose computed target has the product ``origin`` as that
    axis's entry, when every use of ``origin`` ends (through the vector ops that keep its
    value) in such a Reshape target; else None (its constant cannot be rewritten in place)."""
    uses: List[Tuple[str, int]] = []
    stack, seen = [origin], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        readers = b.consumers.get(v, [])
        if v in b.graph_outputs or not readers:
            return None
        for node, idx in readers:
            if node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type == "Reshape" and idx == 1:
                entries = _vector_of(b, v)
                if entries is None:
                    return None
                uses += [(node.output[0], j) for j, e in enumerate(entries)
                         if isinstance(e, DimProduct) and e.origin == origin]
            elif node.op_type in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Concat",
                                  "Gather", "Slice", "Reshape") and \
                    (idx == 0 or node.op_type == "Concat"):
                stack.append(node.output[0])
            else:
                return None
    return uses


def _rewrite_products(b, y: str, products, n: int) -> Callable:
    """A resize rewrite for product entries [(axis, DimProduct)] of a computed Reshape target:
    the factor becomes the units kept on that axis of ``y``, at run time still multiplied by
    the sizes it reads (never by their bound values). The constant of the ``Mul`` computing the
    product is replaced (a new initializer) when every Reshape reading the product wants the
    same factor; else a ``Mul``/``Div`` by ``kept``/``factor`` in front of this Reshape scales
    only its own entries."""
    plans = {}
    for _, e in products:
        node = b.index.producer(e.origin)
        uses = _product_uses(b, e.origin)
        plan = None
        if node is not None and node.op_type == "Mul" and uses is not None:
            for slot in (0, 1):
                c = b.const_value(node.input[slot])
                other = _vector_of(b, node.input[1 - slot])
                if c is not None and np.size(c) == 1 and other is not None and \
                        len(other) == 1 and not isinstance(other[0], int):
                    inner = other[0].factor if isinstance(other[0], DimProduct) else 1
                    plan = (node, slot, inner, uses)
                    break
        plans[e.origin] = plan

    def rewrite(node, rc, y=y, products=products, n=n):
        num, den = np.ones(n, np.int64), np.ones(n, np.int64)
        for j, e in products:
            kept = _new_factor(rc, y, j, e.factor)
            if kept is None or kept == e.factor:
                continue
            plan = plans[e.origin]
            if plan is not None:
                mul, slot, inner, uses = plan
                wants = {_new_factor(rc, yr, jr, e.factor) for yr, jr in uses}
                old = np.asarray(rc.graph_const(mul.input[slot]))
                if wants == {kept} and kept % inner == 0 and old.dtype == np.int64:
                    if int(np.ravel(old)[0]) * inner == e.factor:  # not yet rewritten
                        new = np.full(old.shape, kept // inner, np.int64)
                        mul.input[slot] = rc.add_initializer(mul.input[slot], new)
                    continue
            num[j], den[j] = kept, e.factor
        if (num == 1).all():
            return
        g = rc.handle.model.graph
        base = node_key(node)
        scaled = onnx.helper.make_node(
            "Mul", [node.input[1], rc.add_initializer(base + "_kept_units", num)],
            [base + "_scaled_target"], name=base + "_kept_units_mul")
        target = onnx.helper.make_node(
            "Div", [scaled.output[0], rc.add_initializer(base + "_all_units", den)],
            [base + "_kept_target"], name=base + "_kept_units_div")
        pos = next(i for i, n2 in enumerate(g.node) if list(n2.output) == list(node.output))
        g.node.insert(pos, target)
        g.node.insert(pos, scaled)
        node.input[1] = target.output[0]
    return rewrite


def _override_entries(y: str, fixed, n: int, slot: int) -> Callable:
    """A resize rewrite for a computed shape vector (input ``slot``) with constant entries
    ``fixed`` [(axis, value)] on axes of ``y`` that may be resized: a ``Where`` in front of
    the node replaces those entries by the new sizes (never editing a shared vector)."""

    def override(node, rc, y=y, fixed=fixed, n=n):
        mask = np.zeros(n, dtype=bool)
        vals = np.zeros(n, dtype=np.int64)
        for j, e in fixed:
            ns = rc.new_size(y, j, None)
            if ns is not None and ns != e:
                mask[j], vals[j] = True, ns
        if not mask.any():
            return
        g = rc.handle.model.graph
        base = node_key(node)
        m = rc.add_initializer(base + "_resized_mask", mask.astype(np.int64))
        for t in g.initializer:  # a bool condition (add_initializer writes int64)
            if t.name == m:
                t.CopyFrom(onnx.numpy_helper.from_array(mask, m))
        v = rc.add_initializer(base + "_resized_shape", vals)
        out = base + "_resized_target"
        where = onnx.helper.make_node("Where", [m, v, node.input[slot]], [out],
                                      name=base + "_resized_where")
        pos = next(i for i, n2 in enumerate(g.node) if list(n2.output) == list(node.output))
        g.node.insert(pos, where)
        node.input[slot] = out
    return override


def _constant_of_shape(ctx: NodeCtx) -> None:
    """A zero fill of a computed shape (T5's cross-attention ``position_bias = zeros(1, heads,
    q, k)``): an axis whose size copies a tensor's axis is tied to it; an axis of constant size
    carries no value of its own (every entry is 0, no contribution to any channel), so it takes
    whatever channels its readers tie to it, and its entry is overridden on resize. A nonzero
    fill would be a value per channel: frozen."""
    shp, y = ctx.inp(0), ctx.out()
    ctx.ok(shp)
    value = ctx.attr("value", None)
    if value is not None and np.any(onnx.numpy_helper.to_array(value)):
        return
    entries = _vector_of(ctx.b, shp) if ctx.const(shp) is None else \
        [int(v) for v in np.ravel(ctx.const(shp))]
    if entries is None or ctx.rank(y) != len(entries) or \
            any(isinstance(e, DimProduct) for e in entries):
        return
    fixed = []
    for j, e in enumerate(entries):
        if isinstance(e, DimRef):
            ctx.tie((e.tensor, e.axis), (y, j))
        else:
            ctx.ok(y, j)
            fixed.append((j, e))
    if fixed:
        ctx.rewrite(_override_entries(y, fixed, len(entries), 0))


def _flatten(ctx: NodeCtx) -> None:
    tie_reshape(ctx, ctx.inp(0), ctx.out())


def _concat(ctx: NodeCtx) -> None:
    y = ctx.out()
    r = ctx.rank(y)
    if r is None:
        return
    axis = norm_axis(int(ctx.attr("axis")), r)
    total = ctx.size(y, axis)
    sizes = [ctx.size(x, axis) for x in ctx.node.input]
    if total is None or any(s is None for s in sizes):
        # Along a symbolic axis (a KV cache's sequence): the other axes are copied whole; the
        # concatenated one stays frozen (all of it, a lone input's too, is whatever comes).
        for x in ctx.node.input:
            for j in range(r):
                if j != axis:
                    ctx.tie((x, j), (y, j))
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


def _split(ctx: NodeCtx) -> None:
    x = ctx.inp(0)
    r = ctx.rank(x)
    if r is None:
        return
    axis = norm_axis(int(ctx.attr("axis", 0)), r)
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
                                      else node_key(node) + "_split", new)
            if len(node.input) > 1:
                node.input[1] = name
            else:
                node.input.append(name)
        else:
            set_attr(node, "split", [int(v) for v in new])
    ctx.rewrite(split_sizes)


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
        chunk = chunk_of(ctx.b, ctx.node)
        if chunk is not None:
            _slice_chunk(ctx, x, y, r, *chunk)
            return
        _slice_computed_bounds(ctx, x, y, r, axes)
        return
    starts = np.asarray(starts, np.int64).ravel()
    ends = np.asarray(ends, np.int64).ravel()
    axes = list(range(len(starts))) if axes is None else [norm_axis(int(a), r)
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


def _slice_chunk(ctx: NodeCtx, x: str, y: str, r: int, axis: int, k: int, length: int) -> None:
    """Chunk ``k`` of equal chunks of ``length`` along ``axis``, its bounds computed from the
    axis's own size (torch's ``x.chunk(3, dim=1)``: ``Shape -> Gather -> Add -> Div -> Mul``).
    The bounds follow the size at run time, so the chunks stay equal when every chunk loses the
    same positions: position ``p`` of the axis is tied to ``p mod length`` (every chunk), and
    chunk ``k``'s to the output's. Nothing to rewrite."""
    n = ctx.size(x, axis)
    ctx.tie_map((x, axis), np.arange(n), (x, axis), np.arange(n) % length, n, n)
    ctx.tie_map((x, axis), k * length + np.arange(length), (y, axis), np.arange(length), n,
                length)
    for j in range(r):
        if j != axis:
            ctx.tie((x, j), (y, j))


def chunk_of(b, node: onnx.NodeProto) -> Optional[Tuple[int, int, int]]:
    """``(axis, k, length)`` when Slice ``node`` takes chunk ``k`` of the equal chunks of
    ``length`` that split its data's ``axis``, with bounds computed from that axis's size so
    that they stay chunk ``k`` at any size that is a multiple of the chunk count (checked at
    several sizes); else None."""
    if node.op_type != "Slice" or len(node.input) < 3 or len(node.input) > 5:
        return None
    x = node.input[0]
    r = len(b.shape(x) or ())
    if not r:
        return None
    if len(node.input) == 5 and node.input[4]:
        step = b.const_value(node.input[4])
        if step is None or step.size != 1 or int(step.ravel()[0]) != 1:
            return None
    axes = b.const_value(node.input[3]) if len(node.input) > 3 and node.input[3] else \
        np.zeros(1, np.int64)
    if axes is None or axes.size != 1:
        return None
    axis = norm_axis(int(axes.ravel()[0]), r)
    lo, hi = (size_function(n, x, b.shape, b.const_value, b.index.producer)
              for n in node.input[1:3])
    size = b.size(x, axis)
    if lo is None or hi is None or size is None or {lo[1], hi[1]} - {None, axis}:
        return None
    try:
        def at(d):
            s, e = lo[0](d), hi[0](d)
            return None if s is None or e is None or s < 0 or e < 0 else (s, min(e, d))

        got = at(size)
        if got is None or got[1] <= got[0]:
            return None
        length = got[1] - got[0]
        if size % length or got[0] % length:
            return None
        n, k = size // length, got[0] // length
        for h in {1, 2, 3, 5, max(1, length - 1), length + 1}:
            if at(n * h) != (k * h, (k + 1) * h):
                return None
    except (OverflowError, ZeroDivisionError, ValueError, TypeError):
        return None
    return axis, k, length


def _chunk_reads_only(b, name: str, x: str, axis: int) -> bool:
    """Whether every use of ``name`` (a size of ``x``'s ``axis``) ends in a chunk Slice's
    bounds on that axis (:func:`chunk_of`), through integer arithmetic and copies."""
    def accept(node, idx, value):
        if node.op_type == "Slice" and idx in (1, 2) and node.input[0] == x:
            chunk = chunk_of(b, node)
            return chunk is not None and chunk[0] == axis
        return None

    def follow(node, idx):
        return node.op_type in ("Add", "Sub", "Mul", "Div") or \
            node.op_type in ONE_VALUE_OPS and idx == 0 or \
            node.op_type == "Concat" and len(node.input) == 1

    return _every_use(b, name, accept, follow, 12)


def _every_use(b, name: str, accept, follow, limit: int, depth: int = 0) -> bool:
    """Whether every reader of ``name`` ends in an accepted use (``accept(node, input index,
    value name)``: True, or False for a refused one; None when the node is no end) or is
    followed (``follow(node, input index)``) to an output whose readers all do, within
    ``limit`` steps; never through a graph output or another domain's op."""
    readers = b.consumers.get(name, [])
    if not readers or depth > limit or name in b.graph_outputs:
        return False
    for node, idx in readers:
        if node.domain not in ("", "ai.onnx"):
            return False
        verdict = accept(node, idx, name)
        if verdict is not None:
            if not verdict:
                return False
            continue
        if not follow(node, idx) or not _every_use(b, node.output[0], accept, follow, limit,
                                                   depth + 1):
            return False
    return True


def _slice_computed_bounds(ctx: NodeCtx, x: str, y: str, r: int, axes) -> None:
    """Bounds computed at run time (T5's ``position_bias[:, :, -seq:, :]``): the sliced axes
    stay frozen, the axes it does not slice are copied whole and tied."""
    if axes is None:
        if ctx.inp(3):
            return
        s = ctx.shape(ctx.inp(1)) if ctx.opset >= 10 else None
        if s is None or len(s) != 1 or not isinstance(s[0], int):
            return
        axes = range(s[0])
    sliced = {norm_axis(int(a), r) for a in np.ravel(axes)}
    for j in range(r):
        if j not in sliced and ctx.size(x, j) is not None and \
                ctx.size(y, j) in (None, ctx.size(x, j)):
            ctx.tie((x, j), (y, j))


def _shape(ctx: NodeCtx) -> None:
    # Only the axes whose size is read are frozen (torch's x.view(x.size(0), -1) reads axis 0).
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    ctx.ok(y)
    if r is None:
        ctx.freeze(x, None, "its shape is read")
        return
    start = norm_axis(int(ctx.attr("start", 0)), r)
    end = ctx.attr("end", None)
    end = r if end is None else min(norm_axis(int(end), r), r)
    read = set() if _sizes_reshapes(ctx.b, y) else _shape_reads(ctx.b, y, start, end, x)
    for j in range(r):
        if j in read:
            ctx.freeze(x, j, f"its size on axis {j} is read by Shape")
        else:
            ctx.ok(x, j)


def _sizes_reshapes(b, vec: str) -> bool:
    """Whether every use of a shape vector ends, through the ops :func:`shape_vector` follows,
    in the target of a Reshape whose target evaluates statically: that Reshape's rule ties each
    axis the vector reads to the output axis it sizes (:func:`_computed_reshape`), so those
    reads need not freeze anything."""
    def accept(node, idx, value):
        if node.op_type == "Reshape" and idx == 1:
            return b.const_value(value) is None and _vector_of(b, value) is not None
        return None

    def follow(node, idx):
        return node.op_type in VECTOR_OPS and node.op_type != "Shape" and (
            idx == 0 or node.op_type == "Concat")

    return _every_use(b, vec, accept, follow, 16)


def _shape_reads(b, vec: str, start: int, end: int, x: str, depth: int = 0) -> set:
    """Axes of ``x`` whose size a shape vector's readers actually use: through Cast/Identity,
    Gather and Slice with constant indices (a size that only bounds chunks of ``x`` itself,
    :func:`chunk_of`, reads nothing); anything else reads them all."""
    everything = set(range(start, end))
    readers = b.consumers.get(vec, [])
    if depth > 4 or not readers:
        return everything if readers else set()
    n = end - start
    read: set = set()
    for node, idx in readers:
        if idx != 0:
            return everything
        if copies_values(node):
            read |= _shape_reads(b, node.output[0], start, end, x, depth + 1)
        elif node.op_type == "Gather" and b.const_value(node.input[1]) is not None:
            axes = {start + norm_axis(int(i), n) for i in np.ravel(b.const_value(node.input[1]))}
            if not (len(axes) == 1 and _chunk_reads_only(b, node.output[0], x, *axes)):
                read |= axes
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


def _gather(ctx: NodeCtx) -> None:
    data, idx, y = ctx.inp(0), ctx.inp(1), ctx.out()
    rd, ri = ctx.rank(data), ctx.rank(idx)
    if rd is None or ri is None:
        return
    axis = norm_axis(int(ctx.attr("axis", 0)), rd)
    for j in range(axis):
        ctx.tie((data, j), (y, j))
    for j in range(ri):
        ctx.tie((idx, j), (y, axis + j))
    for j in range(axis + 1, rd):
        ctx.tie((data, j), (y, j - 1 + ri))
    # A stored float table (embeddings, T5's relative position bias [buckets, heads]) is a
    # parameter like a bias: its columns are zeroed with their channel when masked (resize
    # slices every stored member anyway). An integer table is dequantized later: it is masked
    # with the value that reads as 0 there (its zero point), and only sliced where there is
    # none. A table also read as a weight (an LM head tied to the embeddings) is one stored
    # dim, so both readers prune it alike.
    table = ctx.b.stored.get(data)
    if table is not None and (table.data_type in _FLOAT_TYPES or
                              ctx.b.zero_value(data) is not None):
        for j in range(rd):
            if j != axis and ctx.size(data, j) not in (None, 1):
                ctx.role(data, j, BIAS)


def _blocks_rule(deep_is_input: bool):
    """DepthToSpace (input deep) / SpaceToDepth (output deep): channel c of the shallow side
    (C channels) is a block of b*b channels of the deep side (C*b*b): ``k*C + c`` for block
    offset k (DCR, SpaceToDepth's only order) or ``c*b*b + k`` (CRD). Removing c removes its
    whole block; blocksize stays."""

    def rule(ctx: NodeCtx) -> None:
        x, y = ctx.inp(0), ctx.out()
        deep, shallow = (x, y) if deep_is_input else (y, x)
        b = int(ctx.attr("blocksize", 1))
        nd, ns = ctx.size(deep, 1), ctx.size(shallow, 1)
        if ctx.rank(x) != 4 or nd is None or ns is None or nd != ns * b * b:
            return
        ctx.tie((x, 0), (y, 0))
        c, k = np.arange(ns)[:, None], np.arange(b * b)[None, :]
        crd = ctx.attr("mode", b"DCR") == b"CRD"
        index = (c * b * b + k) if crd else (k * ns + c)
        ctx.tie_map((shallow, 1), np.repeat(np.arange(ns), b * b), (deep, 1), index.ravel(),
                    ns, nd)

    return rule


def _expand(ctx: NodeCtx) -> None:
    # Broadcast to a constant shape: axes x already has tie 1:1 (the shape vector's entry is
    # rewritten when it names the size); axes it creates or widens are new, frozen.
    if _constant_shape(ctx):
        x, y = ctx.inp(0), ctx.out()
        tie_broadcast(ctx, x, y, BIAS)  # an expanded constant is the value
        # An axis the expand creates or widens holds one value repeated: any subset of it is
        # the same expand (a mask broadcast over the heads), so it takes its readers' channels
        # and its entry is rewritten on resize.
        sx, sy = ctx.shape(x), ctx.shape(y)
        if sx is not None and sy is not None:
            off = len(sy) - len(sx)
            for j in range(len(sy)):
                if (j < off or sx[j - off] == 1) and sy[j] != 1:
                    ctx.ok(y, j)
        _rewrite_shape(ctx, y, fixed=1)


def _tile(ctx: NodeCtx) -> None:
    # Output axis j is r_j copies of input axis j: channel c owns c + t*C for every copy t,
    # so the repeats stay as they are.
    x, reps, y = ctx.inp(0), ctx.inp(1), ctx.out()
    ctx.ok(reps)
    r = ctx.rank(x)
    repeats = ctx.const(reps)
    if r is None or repeats is None or len(np.ravel(repeats)) != r:
        return
    const = ctx.is_const(x)
    for j, t in enumerate(np.ravel(repeats).astype(np.int64)):
        n = ctx.size(x, j)
        if t == 1:
            ctx.tie((x, j), (y, j))
        elif n is not None and t > 1:
            yi = (np.arange(t)[None, :] * n + np.arange(n)[:, None]).ravel()
            ctx.tie_map((x, j), np.repeat(np.arange(n), t), (y, j), yi, n, n * int(t))
        else:
            continue
        if const and n != 1:
            ctx.role(x, j, BIAS)  # a tiled constant is the channel's value


# -- a stored weight seen through Transpose / constant Reshape --------------------------------
def _transpose_step(node, seen_shape, read):
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    rank = len(seen_shape)
    perm = tuple(perm) if perm else tuple(reversed(range(rank)))
    return ("transpose", perm) if sorted(perm) == list(range(rank)) else None


def _reshape_step(node, seen_shape, read):
    target = read(1) if len(node.input) > 1 else None
    if target is None:
        return None
    shape = reshaped(seen_shape, target, node)
    return ("reshape", shape) if shape is not None else None


def reshaped(shape: Tuple[int, ...], target: np.ndarray, node) -> Optional[Tuple[int, ...]]:
    """The output shape of Reshape(shape -> target) with ONNX's 0 and -1 rules, None if odd."""
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    dims = [int(d) for d in np.asarray(target).ravel()]
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d
           for i, d in enumerate(dims)]
    total = int(np.prod(shape, dtype=np.int64))
    if out.count(-1) == 1:
        rest = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if rest <= 0 or total % rest:
            return None
        out[out.index(-1)] = total // rest
    if any(d <= 0 for d in out) or int(np.prod(out, dtype=np.int64)) != total:
        return None
    return tuple(out)


# -- where a stored tensor's axis comes from (channels.graph.stored_source) --------------------
def _transpose_axis_source(node, axis, shape_of):
    perm = attr(node, "perm", None)
    return None if perm is None else int(perm[axis])


def _reshape_axis_source(node, axis, shape_of):
    # [C] -> [1, C, 1, 1] and friends: the axis must sit alone in a 1:1 block.
    s_in, s_out = shape_of(node.input[0]), shape_of(node.output[0])
    if s_in is None or s_out is None:
        return None
    blocks = reshape_blocks(s_in, s_out)
    hit = [bi for bi, bj in (blocks or []) if bj == [axis] and len(bi) == 1]
    return hit[0][0] if hit else None


def _gather_const(node, vals, read):
    """Gather moves its data's values along the gathered axis; a group's channels reach it only
    on another axis (the channel rule does not map the gathered one), so each channel keeps its
    constant. The indices carry no channel value."""
    return None if vals[0] is None else [vals[0]]


def _concat_const(node, vals, read):
    """The inputs a group's units come from all carry the constant: where two known inputs
    disagree (a unit spans both, as before a grouped conv), it is unknown (NaN)."""
    known = [np.asarray(v, np.float64) for v in vals if v is not None]
    if not known:
        return None
    first = known[0]
    same = np.all([np.asarray(k == first) for k in known], axis=0)
    return [np.where(same, first, np.nan)]


define("Constant", channels=_constant)
define("Transpose", channels=_transpose, const=pass_through_const, weight_step=_transpose_step)
define("Squeeze", "Unsqueeze", channels=_squeeze, const=pass_through_const)
define("Reshape", channels=_reshape, const=pass_through_const, weight_step=_reshape_step)
define("Flatten", channels=_flatten, const=pass_through_const)
define("Concat", channels=_concat, const=_concat_const)
define("Split", channels=_split, const=pass_through_const)
define("Slice", channels=_slice, const=pass_through_const)
define("Shape", channels=_shape, shape_only=True)
define("Size", shape_only=True)
define("Gather", channels=_gather, const=_gather_const)
define("DepthToSpace", channels=_blocks_rule(deep_is_input=True))
define("SpaceToDepth", channels=_blocks_rule(deep_is_input=False))
define("Expand", channels=_expand)
define("ConstantOfShape", channels=_constant_of_shape)
define("Tile", channels=_tile)
define("Transpose", axis_source=_transpose_axis_source)
define("Reshape", "Unsqueeze", "Squeeze", "Flatten", axis_source=_reshape_axis_source)
