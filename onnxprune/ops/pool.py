"""The spatial family: pooling, resampling (Resize/Upsample) and padding.

Each op's entry: channel rule (batch and channel axes pass through; spatial axes are not
channels) and constant propagation (where a constant channel stays constant: padding with
another value or averaging padded borders does not keep it).
"""

from __future__ import annotations

import numpy as np

from onnxprune.model.index import attr
from onnxprune.ops._channel import NodeCtx, norm_axis, pass_through_const
from onnxprune.ops.registry import define


def _pool_channels(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    ctx.tie((x, 0), (y, 0))
    ctx.tie((x, 1), (y, 1))


def _average_pool_const(node, vals, read):
    # A window over padding (explicit pads, auto_pad SAME_*, or ceil_mode's partial last
    # window) averages the constant with zeros when count_include_pad counts them.
    padded = any(attr(node, "pads", None) or ()) or \
        attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID") or \
        bool(attr(node, "ceil_mode", 0))
    if padded and attr(node, "count_include_pad", 0):
        return [np.where(vals[0] == 0, 0.0, np.nan)]
    return [vals[0]]


def _resize_channels(ctx: NodeCtx) -> None:
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
    # ``sizes`` has one entry per axis of the ``axes`` attribute (opset 18; all axes without
    # it): the channel axis's entry is at its position there, or absent (nothing to rewrite).
    axes = ctx.attr("axes", None)
    axes = list(range(r)) if axes is None else [norm_axis(int(a), r) for a in axes]
    if sizes and ctx.const(sizes) is not None and 1 in tied:
        def resize_sizes(node, rc, y=y, at=axes.index(1) if 1 in axes else None):
            if at is None:
                return
            old = rc.graph_const(node.input[3])
            new = np.array(old, dtype=np.int64)
            new[at] = rc.new_size(y, 1, int(old[at]))
            if not np.array_equal(new, old):
                node.input[3] = rc.add_initializer(node.input[3], new)
        ctx.rewrite(resize_sizes)
    elif sizes:
        ctx.freeze(x, 1, "Resize 'sizes' is not a constant")


def _pad_channels(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    for i in range(1, len(ctx.node.input)):
        ctx.ok(ctx.inp(i))
    r = ctx.rank(x)
    pads = ctx.attr("pads", None) if ctx.opset < 11 else ctx.const(ctx.inp(1))
    if r is None or pads is None:
        return
    pads = np.asarray(pads).astype(np.int64)
    axes = ctx.const(ctx.inp(3)) if ctx.inp(3) else None
    axes = list(range(r)) if axes is None else [norm_axis(int(a), r) for a in axes]
    n = len(axes)
    padded = {a for k, a in enumerate(axes) if pads[k] != 0 or pads[k + n] != 0}
    for j in range(r):
        if j not in padded:
            ctx.tie((x, j), (y, j))


def _pad_const(node, vals, read):
    """A constant channel stays constant only where the pad value equals it. The pad value is
    input 2 (opset 11+; an unknown one makes every channel unknown), attribute ``value``
    (opset < 11: the pads are then an attribute and the node has one input), or 0."""
    if attr(node, "mode", b"constant") != b"constant":
        return [vals[0]]
    if len(node.input) > 2 and node.input[2]:
        pv = vals[2]
        if pv is None:
            return [np.full_like(vals[0], np.nan)]
    elif len(node.input) == 1:
        pv = float(attr(node, "value", 0.0))
    else:
        pv = 0.0
    return [np.where(vals[0] == pv, vals[0], np.nan)]


define("MaxPool", "GlobalAveragePool", "GlobalMaxPool", channels=_pool_channels,
       const=pass_through_const)
define("AveragePool", channels=_pool_channels, const=_average_pool_const)
define("LpPool", "GlobalLpPool", channels=_pool_channels)
def _resize_const(node, vals, read):
    # Interpolation weights sum to 1, so a constant map stays constant, except that
    # tf_crop_and_resize writes extrapolation_value outside the crop box.
    mode = attr(node, "coordinate_transformation_mode", b"half_pixel")
    if mode == b"tf_crop_and_resize":
        ev = float(attr(node, "extrapolation_value", 0.0))
        return [np.where(vals[0] == ev, vals[0], np.nan)]
    return [vals[0]]


define("Resize", "Upsample", channels=_resize_channels, const=_resize_const)
define("Pad", channels=_pad_channels, const=_pad_const)
