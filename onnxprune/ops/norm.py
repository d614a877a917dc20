"""The normalization family: BatchNormalization, InstanceNormalization, LayerNormalization,
GroupNormalization.

Each op's entry: channel rule (per-channel parameters get their roles; statistics taken over an
axis freeze it) and constant propagation (a constant channel through the normalization).
"""

from __future__ import annotations

import numpy as np

from onnxprune.model.index import attr
from onnxprune.ops._channel import BIAS, SCALE, STAT, NodeCtx, norm_axis, set_attr, tie_all
from onnxprune.ops.registry import define


def _per_channel_params(ctx: NodeCtx, x: str, params) -> None:
    """Tie each present ``[C]`` parameter input to ``x``'s channel axis, with its role."""
    for i, role in params:
        p = ctx.inp(i)
        if p:
            ctx.tie((p, 0), (x, 1))
            if ctx.is_const(p):
                ctx.role(p, 0, role)


def _batchnorm_channels(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    tie_all(ctx, x, y)
    _per_channel_params(ctx, x, ((1, SCALE), (2, BIAS), (3, STAT), (4, STAT)))


def _batchnorm_const(node, vals, read):
    x, s, b, mu, var = (list(vals) + [None] * 5)[:5]
    if any(v is None for v in (x, s, b, mu, var)):
        return None
    eps = float(attr(node, "epsilon", 1e-5))
    return [(x - mu) / np.sqrt(var + eps) * s + b]


def _instancenorm_channels(ctx: NodeCtx) -> None:
    # Statistics are per (n, c) over the spatial axes: channels are independent.
    x, y = ctx.inp(0), ctx.out()
    ctx.tie((x, 0), (y, 0))
    ctx.tie((x, 1), (y, 1))
    _per_channel_params(ctx, x, ((1, SCALE), (2, BIAS)))


def _instancenorm_const(node, vals, read):
    # A constant map normalizes to 0 in exact arithmetic, but a runtime's float mean of c is
    # c only to the last bit, and that bit is scaled by 1/sqrt(epsilon): the output is the
    # shift (exactly) only for a map of zeros; any other constant is unknown.
    if vals[0] is None or len(vals) < 3 or vals[2] is None:
        return None
    return [np.where(np.asarray(vals[0], np.float64) == 0, vals[2], np.nan)]


def _layernorm_channels(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    axis = norm_axis(int(ctx.attr("axis", -1)), r)
    for j in range(axis):
        ctx.tie((x, j), (y, j))
    op = ctx.node.op_type
    for j in range(axis, r):
        # Mean/variance are taken over these axes. Unlike RMSNorm (a sum of squares, which
        # channels holding 0 do not change: ops/reduce.py, channels/zeros.py), the mean it
        # subtracts from every channel is taken over the removed ones too: the kept channels'
        # mean is another mean even where the removed ones are 0, so no rewrite of the op
        # keeps it exact.
        why = (f"{op} normalizes over axis {j} (it subtracts the mean of every channel of the "
               "stream, and the mean of the kept channels is another mean, even where the "
               "removed ones are 0)")
        ctx.freeze(x, j, why)
        ctx.freeze(y, j, why)
        for p in (ctx.inp(1), ctx.inp(2)):
            if p and ctx.rank(p) is not None and j - axis < ctx.rank(p):
                pj = ctx.rank(p) - (r - j)
                if pj >= 0:
                    ctx.tie((p, pj), (x, j))


def _groupnorm_channels(ctx: NodeCtx) -> None:
    # Mean/variance are per (n, group) over the group's C/G channels and the spatial axes: a
    # group goes as a unit (its channels tied into one) or not at all; num_groups is rewritten.
    x, y = ctx.inp(0), ctx.out()
    groups = int(ctx.attr("num_groups", 0))
    channels = ctx.size(x, 1)
    if ctx.rank(x) is None or not channels or groups < 1 or channels % groups:
        return
    per = channels // groups
    ctx.tie((x, 0), (y, 0))
    ctx.tie((x, 1), (y, 1))
    first = np.repeat(np.arange(groups) * per, per)
    ctx.tie_map((x, 1), np.arange(channels), (x, 1), first, channels, channels)
    for i, role in ((1, SCALE), (2, BIAS)):
        p = ctx.inp(i)
        if not p or ctx.size(p, 0) is None:
            continue
        if ctx.size(p, 0) == channels:  # opset 21: one value per channel
            ctx.tie((p, 0), (x, 1))
        elif ctx.size(p, 0) == groups:  # opset 18: one value per group
            ctx.tie_map((p, 0), np.arange(groups), (x, 1), np.arange(groups) * per, groups,
                        channels)
        else:
            continue
        if ctx.is_const(p):
            ctx.role(p, 0, role)

    def regroup(node, rc, x=x, groups=groups, per=per):
        set_attr(node, "num_groups", groups - len(rc.removed(x, 1)) // per)
    ctx.rewrite(regroup)


define("BatchNormalization", channels=_batchnorm_channels, const=_batchnorm_const)
define("InstanceNormalization", channels=_instancenorm_channels, const=_instancenorm_const)
# RMSNorm as one op (onnxruntime's SimplifiedLayerNormalization, opset-23 RMSNormalization)
# lives with the fused transformer ops in ops/attention.py.
define("LayerNormalization", channels=_layernorm_channels)
# No const: a group of different constants does not normalize to its shift.
# ONNX infers no shape for it (a function op without an inference function): output = input.
define("GroupNormalization", channels=_groupnorm_channels, output_like=lambda node: (0,))
