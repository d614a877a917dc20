"""The fused-attention family: what onnxruntime's transformer optimizer emits and the opset-23
ops: ``com.microsoft`` ``Attention`` (packed QKV weight), ``MultiHeadAttention``,
``GroupQueryAttention``, ``SkipLayerNormalization``, ``SkipSimplifiedLayerNormalization``,
``FastGelu``, ``BiasGelu``, ``Gelu``, ``BiasAdd``; ``SimplifiedLayerNormalization`` (RMSNorm,
which onnxruntime registers in the default domain); ONNX ``Attention`` (opset 23) and
``RMSNormalization``.

Each op's entry: weight layout ``W[out, in]`` (only ``com.microsoft`` ``Attention`` has a weight:
``W [D, Q+K+V]`` like a MatMul's right operand, the Q, K and V columns its rows ``out``, the input
features ``D`` the reduction axis ``in``, so N:M groups run along ``D`` on the packed weight),
activation operand and bias slot of that weight, MAC formula, the output shapes ONNX's inference
cannot give (custom domains), constant propagation of the Gelu forms, and the channel rules.

Heads as channels. A head is one unit: head ``h`` is the columns ``h*dq .. (h+1)*dq`` of Q, the
same of K and ``h*dv ..`` of V (three slices of a packed weight and bias), index ``h`` of the
head axis of a past/present cache or a per-head attention bias, and ``h*dv ..`` of the output,
whose reader (the output projection) loses those input rows. The rule ties every one of these
positions to the head's first output position (:func:`tie_units`), so the channel graph sees one
unit per head. Removing it is exact: head ``h`` reads only its own Q, K, V slices and writes only
its own output slice, the softmax runs per head, and the default scale ``1/sqrt(dq)`` does not
change (head sizes stay). Masked (Q, K, V slices and biases zero) the head attends uniformly to
zero values and the output projection's rows for it are zero: the same outputs as the model with
the head deleted. Q.K^T reduces over a head's own columns only, so the op is no "sink" for
dead-channel removal: a head whose output rows nobody reads (zero output-projection rows) goes
exactly. ``num_heads`` / ``kv_num_heads`` / ``q_num_heads`` / ``qkv_hidden_sizes`` are
rewritten on resize.

Grouped-query attention. ``num_heads / kv_num_heads`` Q heads share one K/V head: the unit is a
whole group (its KV head and every Q head reading it), so a KV head is never removed without its
Q heads, nor a Q head alone (its KV head would still be read by the rest of the group, and the
ratio ``num_heads / kv_num_heads`` must stay whole).

Normalizations. (Skip)LayerNormalization / RMSNorm statistics are taken over the hidden axis —
the residual stream — so removing one channel would change every other's mean / variance: the
rules tie batch and sequence axes and freeze the normalized axes with that reason. FastGelu,
BiasGelu, Gelu and BiasAdd are element-wise along the FFN width (their bias sliced with it;
onnxruntime runs BiasAdd on CUDA only, so its resize is checked by the channel graph alone).

One module (about 730 lines) on purpose: it is one op family (the fused transformer ops), and
they share the head-as-unit rules; splitting it would spread one meaning over files.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops._channel import (BIAS, CONSUMER, FACTOR, PRODUCER, STAT, NodeCtx, norm_axis,
                                    set_attr, tie_all, tie_broadcast)
from onnxprune.ops.layouts import Layout
from onnxprune.ops.registry import Activation, BiasSlot, Shapes, define, numel, shape_in

MS = "com.microsoft"


def ms(*ops: str) -> Tuple[str, ...]:
    """Registry keys of ``com.microsoft`` ops."""
    return tuple(f"{MS}:{op}" for op in ops)


# -- heads as units ----------------------------------------------------------------------------
def heads_of(count: int, size: int, per_unit: int = 1) -> np.ndarray:
    """Unit of each position of ``count`` heads of ``size`` positions laid out head after head;
    ``per_unit`` consecutive heads form one unit (a GQA group)."""
    return np.repeat(np.arange(count, dtype=np.int64) // per_unit, size)


def tie_units(ctx: NodeCtx, members: Sequence[Tuple[Optional[str], int, np.ndarray]]) -> None:
    """Make every position ``i`` of each member ``(tensor, axis, unit of each position)`` the
    same channel as the anchor's (the first member's) first position of unit ``units[i]``: one
    connected unit per head (or group) across all members. Members with no tensor are skipped."""
    members = [m for m in members if m[0]]
    anchor, axis, units = members[0]
    first = np.full(int(units.max()) + 1, -1, dtype=np.int64)
    for i in range(len(units) - 1, -1, -1):
        first[units[i]] = i
    for name, ax, u in members:
        ctx.tie_map((name, ax), np.arange(len(u), dtype=np.int64), (anchor, axis), first[u],
                    len(u), len(units))


def _stored_role(ctx: NodeCtx, name: Optional[str], axis: int, role: str) -> None:
    if name is not None and ctx.is_const(name):
        ctx.role(name, axis, role)


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


def _ok_axes(ctx: NodeCtx, name: Optional[str], skip: Sequence[int] = ()) -> None:
    """Axes of ``name`` other than ``skip`` carry no channels (batch, sequence, head size)."""
    r = ctx.rank(name) if name else None
    if r is None:
        ctx.ok(name)
        return
    for j in range(r):
        if j not in skip:
            ctx.ok(name, j)


def _tie_rows(ctx: NodeCtx, a: Optional[str], b: Optional[str], axes: int = 2) -> None:
    """Tie the leading ``axes`` axes (batch, sequence) of ``a`` and ``b``."""
    if a and b:
        for j in range(axes):
            ctx.tie((a, j), (b, j))


def _per_head_tensor(ctx: NodeCtx, name: Optional[str], axis: int, heads: int,
                     units: np.ndarray, role: str, members: list) -> None:
    """A tensor with a head axis (caches, per-head attention bias, head sinks): a member when the
    axis holds ``heads`` entries; a size-1 (broadcast) axis carries no channels."""
    if not name:
        return
    shape = ctx.shape(name)
    if shape is None or axis >= len(shape):
        return  # finish() freezes it (shape unknown)
    size = shape[axis]
    if size == heads:
        members.append((name, axis, units))
        _stored_role(ctx, name, axis, role)
        _ok_axes(ctx, name, (axis,))
    elif size == 1:
        _ok_axes(ctx, name)
    else:
        ctx.freeze(name, axis, f"axis {axis} of '{name}' ({size}) is not the {heads} heads")


def _rewrite_heads(ctx: NodeCtx, probe: Tuple[str, int], per_unit_positions: int,
                   attrs: Sequence[Tuple[str, int, int]],
                   hidden: Optional[Tuple[Sequence[int], Sequence[int]]] = None) -> None:
    """On resize: ``units = removed positions of probe / per_unit_positions``; each attribute
    ``(name, current value, heads per unit)`` present on the node (or required) loses
    ``units * heads per unit``; ``hidden`` = (current qkv_hidden_sizes, per-unit sizes)."""
    def rewrite(node, rc, probe=probe, per=per_unit_positions, attrs=tuple(attrs),
                hidden=hidden):
        units = len(rc.removed(*probe)) // per
        if not units:
            return
        for name, value, k in attrs:
            set_attr(node, name, int(value - units * k))
        if hidden is not None and attr(node, "qkv_hidden_sizes", None) is not None:
            sizes, per_unit = hidden
            set_attr(node, "qkv_hidden_sizes", [int(s - units * p)
                                                for s, p in zip(sizes, per_unit)])
    ctx.rewrite(rewrite)


# -- com.microsoft Attention (packed QKV weight) -------------------------------------------------
def _packed_sizes(node: onnx.NodeProto, width: int) -> Optional[Tuple[int, int, int]]:
    sizes = attr(node, "qkv_hidden_sizes", None)
    if sizes is not None:
        sizes = tuple(int(s) for s in sizes)
        return sizes if len(sizes) == 3 and sum(sizes) == width else None
    return (width // 3,) * 3 if width % 3 == 0 else None


def _attention_layout(node, index, shape):
    # W [D, Q+K+V] (input 1) multiplies the input x [B, S, D] like MatMul's right operand.
    if index != 1 or len(shape) != 2:
        return None
    return Layout("Attention", shape, (1, 0), 1, out_axis=1, in_axis=0)


def _attention_activation(node, index, weight_shape):
    return Activation(0, rows_last=False) if index == 1 else None


def _attention_bias(node, index):
    # y = x W + bias, bias [Q+K+V] per column of W (input 2).
    return BiasSlot(2, operand="bias") if index == 1 else None


def _attention_fold(node, index, shape):
    if index != 1:
        return "only Attention's weight input reads the hidden state"
    if len(node.input) < 3 or not node.input[2]:
        return "Attention has no bias input the constant could move into"
    return None


def _attention_zero_filter(node, bias, x):
    # A head whose Q/K/V columns are zero still attends (uniformly) over its V bias: no
    # per-column constant of the output, so dead-channel removal keeps it unless unread.
    return np.full(np.shape(bias), np.nan)


def _attention_channels(ctx: NodeCtx) -> None:
    x, w, b = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    y, present = ctx.out(0), ctx.out(1)
    heads = int(ctx.attr("num_heads", 0))
    ws = ctx.shape(w)
    if not _static(ws) or len(ws) != 2 or heads < 1:
        return  # finish() freezes: the packed Q/K/V columns cannot be told apart
    _stored_role(ctx, w, 1, PRODUCER)
    _stored_role(ctx, w, 0, CONSUMER)
    ctx.tie((x, 2), (w, 0))  # the hidden features: W's reduction axis
    _tie_rows(ctx, x, y)
    sizes = _packed_sizes(ctx.node, ws[1])
    if sizes is None or any(s % heads for s in sizes):
        ctx.freeze(w, 1, f"weight {list(ws)} does not split into Q, K, V of {heads} heads "
                         "(qkv_hidden_sizes)")
        return
    dq, dk, dv = (s // heads for s in sizes)
    packed = np.concatenate([heads_of(heads, dq), heads_of(heads, dk), heads_of(heads, dv)])
    members = [(y, 2, heads_of(heads, dv)), (w, 1, packed)]
    if b:
        members.append((b, 0, packed))
        _stored_role(ctx, b, 0, BIAS)
    ctx.ok(ctx.inp(3))  # mask_index: batch / sequence only
    units = np.arange(heads, dtype=np.int64)
    _per_head_tensor(ctx, ctx.inp(4), 2, heads, units, STAT, members)  # past [2,B,N,P,H]
    _per_head_tensor(ctx, present, 2, heads, units, STAT, members)
    _per_head_tensor(ctx, ctx.inp(5), 1, heads, units, STAT, members)  # attention bias
    ctx.ok(ctx.inp(6))  # past_sequence_length
    tie_units(ctx, members)
    _rewrite_heads(ctx, (y, 2), dv, [("num_heads", heads, 1)], (sizes, (dq, dk, dv)))


def _attention_shapes(node, shape_of):
    x, w = shape_of(node.input[0]), shape_of(node.input[1])
    if x is None or w is None or len(x) != 3 or len(w) != 2 or not isinstance(w[1], int):
        return [(0, None)]
    sizes = _packed_sizes(node, w[1])
    return [(0, (x[0], x[1], sizes[2] if sizes else None))]


def _attention_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # x W: B*S*D*(Q+K+V); per head Q.K^T and A.V over the S (+ past) positions:
    # B*S*T*(Q + V) with T = S when no past (a past's length is not counted).
    x, w = shape_in(shapes, node, 0), shape_in(shapes, node, 1)
    if x is None or w is None or len(x) != 3 or len(w) != 2:
        return None
    sizes = _packed_sizes(node, w[1])
    if sizes is None:
        return None
    b, s, d = (int(v) for v in x)
    return b * s * d * int(w[1]) + b * s * s * (sizes[0] + sizes[2])


# -- com.microsoft MultiHeadAttention ---------------------------------------------------------
def _width(shape, axes: Sequence[int]) -> Optional[int]:
    if shape is None or any(a >= len(shape) or not isinstance(shape[a], int) for a in axes):
        return None
    return numel([shape[a] for a in axes])


def _mha_channels(ctx: NodeCtx) -> None:
    q, k, v, bias = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.inp(3)
    y = ctx.out(0)
    heads = int(ctx.attr("num_heads", 0))
    qs, ks, vs = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    if heads < 1 or qs is None:
        return
    units = np.arange(heads, dtype=np.int64)
    members: List[Tuple[Optional[str], int, np.ndarray]] = []
    if len(qs) == 5 or (ks is not None and len(ks) == 5):
        # Packed QKV [B, S, N, 3, H] / KV [B, L, N, 2, H]: onnxruntime runs these on GPU only,
        # so the rule could not be checked against a resized model; they stay.
        ctx.freeze(q, None, "packed QKV/KV layouts of MultiHeadAttention are not mapped "
                            "(onnxruntime's CPU kernel does not run them to check a resize)")
        return
    if len(qs) == 3 and ks is not None and vs is not None and len(ks) == len(vs):
        dq_all = _width(qs, (2,))
        if dq_all is None or dq_all % heads:
            ctx.freeze(q, 2, f"query width {qs[2]} is not {heads} heads")
            return
        dq = dq_all // heads
        _tie_rows(ctx, q, y)
        members += [(q, 2, heads_of(heads, dq))]
        if len(ks) == 3:  # K, V [B, L, D]: projected, head after head
            dk_all, dv_all = _width(ks, (2,)), _width(vs, (2,))
            if dk_all is None or dv_all is None or dk_all % heads or dv_all % heads:
                ctx.freeze(k, 2, f"key/value widths {ks[2]}/{vs[2]} are not {heads} heads")
                return
            dk, dv = dk_all // heads, dv_all // heads
            members += [(k, 2, heads_of(heads, dk)), (v, 2, heads_of(heads, dv))]
            ctx.tie((k, 0), (q, 0))
            ctx.tie((v, 0), (q, 0))
            ctx.tie((k, 1), (v, 1))
        elif len(ks) == 4:  # K, V [B, N, L, H]: already split into heads
            if ks[1] != heads or vs[1] != heads or not all(
                    isinstance(t[a], int) for t in (ks, vs) for a in (1, 3)):
                ctx.freeze(k, 1, f"key/value {list(ks)}/{list(vs)} do not hold {heads} heads")
                return
            dk, dv = ks[3], vs[3]
            members += [(k, 1, units), (v, 1, units)]
            _ok_axes(ctx, k, (1,))
            _ok_axes(ctx, v, (1,))
        else:
            return
        members.insert(0, (y, 2, heads_of(heads, dv)))
        bias_units = np.concatenate([heads_of(heads, dq), heads_of(heads, dk),
                                     heads_of(heads, dv)])
    else:
        return  # other layouts: finish() freezes them
    if bias:
        if ctx.size(bias, 0) != len(bias_units):
            ctx.freeze(bias, 0, "bias does not hold Q, K, V of every head")
        else:
            members.append((bias, 0, bias_units))
            _stored_role(ctx, bias, 0, BIAS)
    ctx.ok(ctx.inp(4))  # key_padding_mask
    _per_head_tensor(ctx, ctx.inp(5), 1, heads, units, STAT, members)  # attention_bias
    for i in (6, 7):  # past_key / past_value [B, N, P, H]
        _per_head_tensor(ctx, ctx.inp(i), 1, heads, units, STAT, members)
    for i in range(8, len(ctx.node.input)):  # past_sequence_length, cache_indirection
        ctx.ok(ctx.inp(i))
    for i in (1, 2, 3):  # present_key / present_value [B, N, T, H], qk [B, N, S, T]
        _per_head_tensor(ctx, ctx.out(i), 1, heads, units, STAT, members)
    tie_units(ctx, members)
    _rewrite_heads(ctx, (y, 2), dv, [("num_heads", heads, 1)])


def _mha_shapes(node, shape_of):
    q = shape_of(node.input[0])
    k = shape_of(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    v = shape_of(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    heads = int(attr(node, "num_heads", 0))
    if q is None:
        return [(0, None)]
    if len(q) == 5 and k is None:
        dv = q[2] * q[4] if _static((q[2], q[4])) else None
    elif v is not None and len(v) == 3:
        dv = v[2]
    elif v is not None and len(v) == 4:
        dv = v[1] * v[3] if _static((v[1], v[3])) else None
    else:
        dv = None
    out = [(0, (q[0], q[1], dv))]
    if k is not None and v is not None and len(v) in (3, 4) and len(k) == len(v) and \
            len(q) == 3 and heads:
        hd = None if not isinstance(dv, int) else dv // heads
        hk = None if k is None or not isinstance(k[-1], int) else (
            k[-1] // heads if len(k) == 3 else k[-1])
        past = len(node.input) > 6 and node.input[6]
        t = None if past else (k[1] if len(k) == 3 else k[2])
        out += [(0, (q[0], heads, t, hk)), (0, (q[0], heads, t, hd))]
    return out


def _mha_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Per head Q.K^T and A.V: B*S*L*(Dq + Dv) for 3-D query/key/value (projections are
    # separate MatMuls, counted there).
    q, k, v = (shape_in(shapes, node, i) for i in range(3))
    if q is None or k is None or v is None or len(q) != 3 or len(k) != 3 or len(v) != 3:
        return None
    return int(q[0]) * int(q[1]) * int(k[1]) * (int(q[2]) + int(v[2]))


# -- com.microsoft GroupQueryAttention ---------------------------------------------------------
def _gqa_channels(ctx: NodeCtx) -> None:
    q, k, v = ctx.inp(0), ctx.inp(1), ctx.inp(2)
    y = ctx.out(0)
    heads, kv = int(ctx.attr("num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
    qs = ctx.shape(q)
    if heads < 1 or kv < 1 or heads % kv or qs is None or len(qs) != 3 or \
            not isinstance(qs[2], int):
        return
    per = heads // kv
    groups = np.arange(kv, dtype=np.int64)
    if k is None:  # packed QKV [B, S, (N + 2 KV) H]
        if qs[2] % (heads + 2 * kv):
            ctx.freeze(q, 2, f"packed QKV width {qs[2]} is not {heads} + 2x{kv} heads")
            return
        hs = qs[2] // (heads + 2 * kv)
        members = [(y, 2, heads_of(heads, hs, per)),
                   (q, 2, np.concatenate([heads_of(heads, hs, per), heads_of(kv, hs),
                                          heads_of(kv, hs)]))]
    else:
        ks, vs = ctx.shape(k), ctx.shape(v)
        if qs[2] % heads or ks is None or vs is None or len(ks) != 3 or len(vs) != 3 or \
                ks[2] != vs[2] or not isinstance(ks[2], int) or ks[2] % kv:
            ctx.freeze(q, 2, "query/key/value widths do not split into the heads")
            return
        hs = qs[2] // heads
        members = [(y, 2, heads_of(heads, hs, per)), (q, 2, heads_of(heads, hs, per)),
                   (k, 2, heads_of(kv, ks[2] // kv)), (v, 2, heads_of(kv, ks[2] // kv))]
        for t in (k, v):
            ctx.tie((t, 0), (q, 0))
            ctx.tie((t, 1), (q, 1))
    _tie_rows(ctx, q, y)
    for i in (3, 4):  # past_key / past_value [B, KV, P, H]
        _per_head_tensor(ctx, ctx.inp(i), 1, kv, groups, STAT, members)
    for i in (1, 2):  # present_key / present_value
        _per_head_tensor(ctx, ctx.out(i), 1, kv, groups, STAT, members)
    for i in range(5, len(ctx.node.input)):
        name = ctx.inp(i)
        if i == 10:  # attention_bias [B|1, N|1, S, T]
            _per_head_tensor(ctx, name, 1, heads, np.arange(heads) // per, STAT, members)
        elif i == 11 and name and ctx.size(name, 0) == heads:  # head_sink [N]
            members.append((name, 0, np.arange(heads) // per))
            _stored_role(ctx, name, 0, STAT)
        else:  # seqlens_k, total_sequence_length, cos/sin caches, position_ids
            ctx.ok(name)
    tie_units(ctx, members)
    _rewrite_heads(ctx, (y, 2), per * hs, [("num_heads", heads, per), ("kv_num_heads", kv, 1)])


def _gqa_shapes(node, shape_of):
    q = shape_of(node.input[0])
    heads, kv = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    if q is None or len(q) != 3 or not heads or not isinstance(q[2], int):
        return [(0, None)]
    packed = len(node.input) < 2 or not node.input[1]
    hs = q[2] // (heads + 2 * kv) if packed else q[2] // heads
    return [(0, (q[0], q[1], heads * hs)), (0, (q[0], kv, None, hs)), (0, (q[0], kv, None, hs))]


def _gqa_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Q.K^T and A.V per Q head over the S new positions (a past's length is not counted).
    q, y = shape_in(shapes, node, 0), shape_in(shapes, node, 0, output=True)
    if q is None or y is None or len(y) != 3:
        return None
    b, s, d = (int(t) for t in y)
    return 2 * b * s * s * d


# -- ONNX Attention (opset 23) -----------------------------------------------------------------
def _onnx_attention_channels(ctx: NodeCtx) -> None:
    q, k, v, mask = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.inp(3)
    y = ctx.out(0)
    qs, ks, vs = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    if qs is None or ks is None or vs is None or not len(qs) == len(ks) == len(vs):
        return
    if len(qs) == 4:  # [B, N, S, H]
        heads, kv = qs[1], ks[1]
        if not isinstance(heads, int) or not isinstance(kv, int) or vs[1] != kv or heads % kv:
            return
        per = heads // kv
        members = [(y, 1, np.arange(heads) // per), (q, 1, np.arange(heads) // per),
                   (k, 1, np.arange(kv)), (v, 1, np.arange(kv))]
        for t in (q, k, v, y):
            _ok_axes(ctx, t, (1,))
        probe, per_positions = (y, 1), per
        dv = None
    elif len(qs) == 3:  # [B, S, N*H]: q_num_heads / kv_num_heads say the split
        heads, kv = int(ctx.attr("q_num_heads", 0)), int(ctx.attr("kv_num_heads", 0))
        if heads < 1 or kv < 1 or heads % kv or not _static(qs[2:]) or not _static(ks[2:]) \
                or not _static(vs[2:]) or qs[2] % heads or ks[2] % kv or vs[2] % kv:
            return
        per = heads // kv
        dv = vs[2] // kv
        members = [(y, 2, heads_of(heads, dv, per)), (q, 2, heads_of(heads, qs[2] // heads, per)),
                   (k, 2, heads_of(kv, ks[2] // kv)), (v, 2, heads_of(kv, dv))]
        _tie_rows(ctx, q, y)
        ctx.tie((k, 0), (q, 0))
        ctx.tie((v, 0), (q, 0))
        ctx.tie((k, 1), (v, 1))
        probe, per_positions = (y, 2), per * dv
    else:
        return
    groups = np.arange(kv, dtype=np.int64)
    if mask:
        r = ctx.rank(mask)
        if r == 4:
            _per_head_tensor(ctx, mask, 1, heads, np.arange(heads) // per, STAT, members)
        else:
            _ok_axes(ctx, mask)
    for i in (4, 5):  # past_key / past_value [B, KV, P, H]
        _per_head_tensor(ctx, ctx.inp(i), 1, kv, groups, STAT, members)
    for i in range(6, len(ctx.node.input)):  # nonpad_kv_seqlen
        ctx.ok(ctx.inp(i))
    for i in (1, 2):
        _per_head_tensor(ctx, ctx.out(i), 1, kv, groups, STAT, members)
    _per_head_tensor(ctx, ctx.out(3), 1, heads, np.arange(heads) // per, STAT, members)
    tie_units(ctx, members)
    attrs = [(n, val, f) for n, val, f in (("q_num_heads", heads, per), ("kv_num_heads", kv, 1))
             if ctx.attr(n, None) is not None]
    _rewrite_heads(ctx, probe, per_positions, attrs)


def _onnx_attention_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Q.K^T and A.V: per Q head S*T*(H + Hv) for every batch entry.
    q, k, y = shape_in(shapes, node, 0), shape_in(shapes, node, 1), \
        shape_in(shapes, node, 0, output=True)
    if q is None or k is None or y is None or len(q) != len(k):
        return None
    if len(q) == 4:
        b, n, s, h = (int(t) for t in q)
        return b * n * s * int(k[2]) * (h + int(y[3]))
    if len(q) == 3:
        return int(q[0]) * int(q[1]) * int(k[1]) * (int(q[2]) + int(y[2]))
    return None


# -- normalizations: the residual stream stays ----------------------------------------------------
def _normalized(ctx: NodeCtx, x: str, outs, params, axis: int, what: str,
                others=()) -> None:
    """Tie ``x``'s leading axes (before ``axis``) to each output's; freeze the normalized axes
    with the reason; parameter vectors (``params``: names) tie to the normalized axes."""
    r = ctx.rank(x)
    if r is None:
        return
    axis = norm_axis(axis, r)
    for o in list(outs) + list(others):
        if not o:
            continue
        ro = ctx.rank(o)
        if ro is None:
            continue
        for j in range(min(axis, ro)):
            ctx.tie((x, j), (o, j))
    reason = (f"{what} normalizes over the hidden width (the residual stream): it subtracts "
              "the mean of every channel, and the mean of the kept channels is another mean "
              "(even where the removed ones are 0)")
    for t in [x] + [o for o in list(outs) + list(others) if o]:
        rt = ctx.rank(t)
        for j in range(axis, r):
            if rt is not None and j < rt:
                ctx.freeze(t, j, reason)
    for p in params:
        if p and ctx.rank(p) is not None:
            for j in range(ctx.rank(p)):
                ctx.freeze(p, j, reason)


def _skip_norm_rule(n_params: int):
    """SkipLayerNormalization (gamma, beta, bias: 3 parameter inputs) and
    SkipSimplifiedLayerNormalization (gamma, bias: 2)."""
    return lambda ctx: _skip_norm_channels(ctx, n_params)


def _skip_norm_channels(ctx: NodeCtx, n_params: int) -> None:
    # input, skip [B, S, D] (skip may broadcast), parameters [D]; outputs: output, mean,
    # inv_std_var, input_skip_bias_sum (the residual stream the next block reads).
    x, skip = ctx.inp(0), ctx.inp(1)
    params = [ctx.inp(i) for i in range(2, 2 + n_params)]
    y, mean, inv, total = (ctx.out(i) for i in range(4))
    if skip and ctx.rank(skip) == ctx.rank(x):
        tie_all(ctx, skip, x)
    if n_params == 2:  # SkipSimplifiedLayerNormalization: gamma rewritten, bias added
        _rms_channels(ctx, x, [y, total], params[0], [mean, inv], -1, extra_zero=[skip],
                      bias=params[1])
    else:
        _normalized(ctx, x, [y, total], params, -1, ctx.node.op_type, (mean, inv))
    if skip and ctx.rank(skip) is not None and ctx.rank(skip) != ctx.rank(x):
        ctx.freeze(skip, None, "skip broadcasts over the batch")


def _rmsnorm_channels(ctx: NodeCtx) -> None:
    _rms_channels(ctx, ctx.inp(0), [ctx.out(0)], ctx.inp(1), [ctx.out(1), ctx.out(2)],
                  int(ctx.attr("axis", -1)))


def _rms_channels(ctx: NodeCtx, x: str, outs, scale: Optional[str], stats, axis: int,
                  extra_zero=(), bias: Optional[str] = None) -> None:
    """RMSNorm as one op: ``y = x / sqrt(mean(x^2) + epsilon) * scale`` over the axes from
    ``axis`` on. Removing channels that are 0 in the masked model (checked: ``need_zero``)
    leaves the sum of squares; on resize ``epsilon`` becomes ``epsilon * n / k`` and ``scale``
    ``scale * sqrt(n / k)`` (n, k: the normalized width before and after), which gives exactly
    the masked model's ``x / sqrt(sum / n + epsilon) * scale``. A statistics output
    (``inv_std_var``) would change: read by anything, the stream freezes."""
    r = ctx.rank(x)
    if r is None:
        return
    axis = norm_axis(axis, r)
    op = ctx.node.op_type
    for o in list(outs) + [s for s in stats if s]:
        ro = ctx.rank(o)
        for j in range(min(axis, ro if ro is not None else 0)):
            ctx.tie((x, j), (o, j))
    for o in outs:
        if o and ctx.rank(o) == r:
            for j in range(axis, r):
                ctx.tie((x, j), (o, j))
    for o in stats:
        if o and ctx.rank(o) is not None:
            for j in range(axis, ctx.rank(o)):
                ctx.ok(o, j)
    read = [o for o in stats if o and (ctx.b.consumers.get(o) or o in ctx.b.graph_outputs)]
    why = (f"{op} normalizes over the hidden width (the residual stream): exact under removal "
           "only where the removed channels are 0 in the masked model")
    for j in range(axis, r):
        if ctx.size(x, j) == 1:
            continue
        if read:
            ctx.freeze(x, j, f"{op} normalizes over the hidden width (the residual stream) and "
                             f"its statistics output '{read[0]}' is read: it would change")
            continue
        for t in [x] + [e for e in extra_zero if e and ctx.rank(e) == r]:
            ctx.need_zero(t, j, why)
    for p, role in ((scale, FACTOR), (bias, BIAS)):
        if not p or ctx.rank(p) is None:
            continue
        for pj in range(ctx.rank(p)):
            j = r - ctx.rank(p) + pj
            if j >= axis and ctx.size(p, pj) not in (None, 1):
                ctx.tie((p, pj), (x, j))
                if ctx.is_const(p):
                    ctx.role(p, pj, role)
            else:
                ctx.ok(p, pj)
    if scale is None or not ctx.is_const(scale):
        if scale is not None:
            ctx.freeze(x, None, f"{op}: its scale '{scale}' is computed in-graph")
        return
    shape = ctx.shape(x)

    def rewrite(node, rc, x=x, axis=axis, shape=shape, scale=scale):
        n = k = 1  # over the axes that lose channels (the others cancel)
        for j in range(axis, len(shape)):
            if len(rc.removed(x, j)):
                n *= int(shape[j])
                k *= int(shape[j]) - len(rc.removed(x, j))
        if n == k:
            return
        set_attr(node, "epsilon", float(attr(node, "epsilon", 1e-5)) * n / k)
        index = list(node.input).index(scale)
        value = np.asarray(rc.graph_const(scale))
        rc.replaced.append(scale)
        node.input[index] = rc.new_constant(scale, (value * math.sqrt(n / k)).astype(
            value.dtype))
    ctx.rewrite(rewrite)


def _skip_shapes(node, shape_of):
    x = shape_of(node.input[0])
    if x is None:
        return [(0, None)]
    stat = tuple(x[:-1]) + (1,)
    return [(0, x), (0, stat), (0, stat), (0, x)]


def _simplified_shapes(node, shape_of):
    x = shape_of(node.input[0])
    if x is None:
        return [(0, None)]
    axis = norm_axis(int(attr(node, "axis", -1)), len(x))
    return [(0, x), (0, tuple(x[:axis]) + (1,) * (len(x) - axis))]


def _embed_layernorm_channels(ctx: NodeCtx) -> None:
    # input_ids, segment_ids [B, S]; word / position / segment tables [*, D]; gamma, beta [D];
    # mask, position_ids. Outputs: output [B, S, D], mask_index [B], embedding_sum [B, S, D].
    ids, y, total = ctx.inp(0), ctx.out(0), ctx.out(2)
    for o in (y, total):
        _tie_rows(ctx, ids, o)
    for i in (1, 7, 8):
        _tie_rows(ctx, ids, ctx.inp(i)) if ctx.rank(ctx.inp(i) or "") == 2 else ctx.ok(ctx.inp(i))
    ctx.ok(ctx.out(1))
    reason = ("EmbedLayerNormalization normalizes over the hidden width (the residual stream): "
              "removing a channel would change every other channel's mean/variance")
    for o in (y, total):
        ctx.freeze(o, 2, reason)
    for i in (2, 3, 4, 5, 6):
        name = ctx.inp(i)
        if name:
            ctx.freeze(name, None, reason)


def _embed_layernorm_shapes(node, shape_of):
    ids, table = shape_of(node.input[0]), shape_of(node.input[2])
    if ids is None or table is None or len(ids) != 2 or len(table) != 2:
        return [(2, None)]
    mask = 7 if len(node.input) > 7 and node.input[7] else 0
    out = (ids[0], ids[1], table[1])
    return [(2, out), (mask, (ids[0],)), (2, out)]


# -- Gelu forms, BiasAdd: element-wise along the FFN width -------------------------------------
def _bias_elementwise(ctx: NodeCtx) -> None:
    # FastGelu (x, bias), BiasGelu (a, b), Gelu (x), BiasAdd (x, bias, skip): y = f(x + ...).
    x, y = ctx.inp(0), ctx.out(0)
    tie_all(ctx, x, y)
    for i in range(1, len(ctx.node.input)):
        name = ctx.inp(i)
        if name:
            tie_broadcast(ctx, name, y, BIAS)


def _gelu_erf(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_const(fn):
    def const(node, vals, read):
        vals = list(vals)
        if not vals or vals[0] is None or any(v is None for i, v in enumerate(vals)
                                              if i < len(node.input) and node.input[i]):
            return None
        x = np.asarray(vals[0], np.float64)
        for v in vals[1:]:
            if v is not None:
                x = x + np.asarray(v, np.float64)
        return [fn(x)]
    return const


def _sum_const(node, vals, read):
    if any(v is None for v in vals):
        return None
    return [sum(np.asarray(v, np.float64) for v in vals)]


# -- registration ------------------------------------------------------------------------------
define(*ms("Attention"), layout=_attention_layout, activation=_attention_activation,
       bias=_attention_bias, fold=_attention_fold, zero_filter=_attention_zero_filter,
       channels=_attention_channels,
       output_shape=_attention_shapes, macs=_attention_macs)
define(*ms("MultiHeadAttention"), channels=_mha_channels, output_shape=_mha_shapes,
       macs=_mha_macs)
define(*ms("GroupQueryAttention"), channels=_gqa_channels, output_shape=_gqa_shapes,
       macs=_gqa_macs)
define("Attention", channels=_onnx_attention_channels, macs=_onnx_attention_macs)
define(*ms("SkipLayerNormalization"), channels=_skip_norm_rule(3), output_shape=_skip_shapes)
define(*ms("SkipSimplifiedLayerNormalization"), channels=_skip_norm_rule(2),
       output_shape=_skip_shapes)
# onnxruntime registers SimplifiedLayerNormalization in the default domain; ONNX has
# RMSNormalization since opset 23 (its shapes inferred by ONNX).
define("SimplifiedLayerNormalization", *ms("SimplifiedLayerNormalization"),
       channels=_rmsnorm_channels, output_shape=_simplified_shapes)
define("RMSNormalization", channels=_rmsnorm_channels)
define(*ms("EmbedLayerNormalization"), channels=_embed_layernorm_channels,
       output_shape=_embed_layernorm_shapes)
define(*ms("FastGelu"), channels=_bias_elementwise, output_like=lambda node: (0,),
       const=_gelu_const(_gelu_tanh))
define(*ms("BiasGelu", "Gelu"), channels=_bias_elementwise, output_like=lambda node: (0,),
       const=_gelu_const(_gelu_erf))
define(*ms("BiasAdd"), channels=_bias_elementwise, output_like=lambda node: (0,),
       const=_sum_const)
