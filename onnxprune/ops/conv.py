"""The convolution family: Conv, ConvTranspose (the integer/QLinear forms are in ``quant``).

Each op's entry: weight layout ``W[out, in]``, activation operand with its im2col geometry,
bias slot, exact-fold condition, zero-filter constant, channel rule (groups, depthwise
multipliers), MAC formula.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops._channel import BIAS, CONSUMER, PRODUCER, NodeCtx, set_attr
from onnxprune.ops.layouts import Layout, layout_for
from onnxprune.ops.registry import (Activation, BiasSlot, ConvGeometry, Shapes, define, numel,
                                    operand, shape_in)


# -- weight layout ------------------------------------------------------------------------------
def _kernel_layout(out_axis: int, in_axis: int):
    """Conv ``[Cout, Cin/g, k...]`` (out axis 0) and ConvTranspose ``[Cin, Cout/g, k...]`` (out
    axis 1): ``in = (k..., channel)`` with the input channel innermost per kernel position."""

    def rule(node, index, shape):
        if index != 1 or len(shape) < 3:
            return None
        return Layout(node.op_type, shape, (out_axis, *range(2, len(shape)), in_axis), 1,
                      out_axis=out_axis, in_axis=in_axis, group=int(attr(node, "group", 1)))

    return rule


# -- activation columns (im2col), bias, folding ---------------------------------------------------
def geometry(node: onnx.NodeProto, weight_shape: Tuple[int, ...]) -> ConvGeometry:
    """The im2col parameters of a Conv/ConvTranspose with weight ``[*, *, k...]``."""
    kernel = tuple(int(k) for k in weight_shape[2:])
    nd = len(kernel)
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    return ConvGeometry(kernel=kernel, group=int(attr(node, "group", 1)),
                        strides=tuple(attr(node, "strides", [1] * nd)),
                        dilations=tuple(attr(node, "dilations", [1] * nd)),
                        pads=tuple(attr(node, "pads", [0] * (2 * nd))),
                        auto_pad=auto_pad,
                        output_padding=tuple(attr(node, "output_padding", [0] * nd)),
                        output_shape=tuple(attr(node, "output_shape", [])),
                        transpose=node.op_type == "ConvTranspose")


def _conv_activation(node, index, weight_shape):
    if index != 1 or not operand(node, 0):
        return None
    return Activation(0, conv=geometry(node, weight_shape))


def _conv_bias(node, index):
    return BiasSlot(2) if index == 1 else None


def _conv_transpose_bias(node, index):
    # Its layout rows are Cout/g per group: calibration's per-row mean shift does not apply.
    return BiasSlot(2, mean_shift=False) if index == 1 else None


def _conv_fold(node, index, shape):
    # Without padding every output position sees the whole kernel over the constant channel,
    # so it adds sum(W[o, c, k...]) * constant to every output of row o; grouped convs read
    # channel c of each group through the same slice (the tied channels' constants must be
    # equal, which the caller checks). A zero-padded Conv sees 0 instead at its borders.
    if index != 1:
        return f"{node.op_type} input {index} is not its weight"
    pads = attr(node, "pads", None)
    auto = attr(node, "auto_pad", b"NOTSET")
    if (pads and any(pads)) or auto not in (b"NOTSET", b"VALID"):
        return "zero padding: the border outputs see 0, not the constant"
    return None


def _conv_transpose_fold(node, index, shape):
    return "ConvTranspose spreads a constant input unevenly over its output"


def _conv_zero_filter(node, bias, x):
    # An all-zero filter row outputs its bias at every position whatever it reads (padding
    # included): grouped and depthwise alike, the unit is dead only when every producer row
    # of it (the depthwise rows too) is zero.
    return bias


# -- channel rules ------------------------------------------------------------------------------
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


def _depthwise_ties(ctx: NodeCtx, x, y, cin: int, cout: int, multiplier: int) -> None:
    """Depthwise: input channel c owns output channels c*m .. c*m+m-1."""
    if multiplier == 1:
        ctx.tie((x, 1), (y, 1))
    else:
        c = np.repeat(np.arange(cin), multiplier)
        ctx.tie_map((x, 1), c, (y, 1), np.arange(cout), cin, cout)


def _regroup(ctx: NodeCtx, x, cin: int) -> None:
    """On resize, a depthwise op's ``group`` becomes its new input channel count."""
    def regroup(node, rc, x=x, cin=cin):
        set_attr(node, "group", cin - len(rc.removed(x, 1)))
    ctx.rewrite(regroup)


def _conv_channels(ctx: NodeCtx) -> None:
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
        _depthwise_ties(ctx, x, y, cin, cout, cout_g)
        _regroup(ctx, x, cin)
        return
    # Grouped: remove the same positions in every group so the groups stay equal.
    gi, ki = _group_maps(group, cin_g)
    ctx.tie_map((x, 1), gi, (x, 1), ki, cin, cin)
    ctx.tie_map((x, 1), np.arange(cin_g), (w, layout.in_axis), np.arange(cin_g), cin, cin_g)
    ctx.role(w, layout.in_axis, CONSUMER)
    go, ko = _group_maps(group, cout_g)
    ctx.tie_map((y, 1), go, (y, 1), ko, cout, cout)


def _conv_transpose_channels(ctx: NodeCtx) -> None:
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
        _depthwise_ties(ctx, x, y, cin, cout, cout_g)
        if b:
            ctx.tie((b, 0), (y, 1))
        _regroup(ctx, x, cin)
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


# -- MACs ---------------------------------------------------------------------------------------
def _conv_macs(weight_index: int):
    def formula(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
        # Y[N, Cout, out...] with W[Cout, Cin/g, k...]: every output element is a dot product
        # of length Cin/g * prod(k). Grouped and depthwise convs fall out of W's shape.
        y = shape_in(shapes, node, 0, output=True)
        w = shape_in(shapes, node, weight_index)
        if y is None or w is None:
            return None
        return numel(y) * numel(w[1:])

    return formula


def _conv_transpose_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Every input element X[n, ci, in...] is scattered through W[ci, Cout/g, k...]: Cout/g *
    # prod(k) MACs each. Output cropping by pads is not subtracted (the common convention).
    x = shape_in(shapes, node, 0)
    w = shape_in(shapes, node, 1)
    if x is None or w is None:
        return None
    return numel(x) * numel(w[1:])


define("Conv", layout=_kernel_layout(0, 1), activation=_conv_activation, bias=_conv_bias,
       fold=_conv_fold, zero_filter=_conv_zero_filter, channels=_conv_channels,
       macs=_conv_macs(1))
define("ConvTranspose", layout=_kernel_layout(1, 0), activation=_conv_activation,
       bias=_conv_transpose_bias, fold=_conv_transpose_fold, zero_filter=_conv_zero_filter,
       channels=_conv_transpose_channels, macs=_conv_transpose_macs)
