"""The convolution family: Conv, ConvTranspose (and the integer/QLinear Conv forms' MACs).

Each op's entry: weight layout ``W[out, in]``, activation operand with its im2col geometry,
bias slot, exact-fold condition, zero-filter constant, MAC formula.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops.layouts import Layout
from onnxprune.ops.registry import (Activation, BiasSlot, ConvGeometry, Shapes, define, numel,
                                    operand, shape_in)


# -- weight layout ------------------------------------------------------------------------------
def _conv_layout(node, index, shape):
    # [Cout, Cin/g, k...]: in = (k..., Cin/g) with Cin innermost per kernel position.
    if index != 1 or len(shape) < 3:
        return None
    rank = len(shape)
    return Layout("Conv", shape, (0, *range(2, rank), 1), 1, out_axis=0, in_axis=1,
                  group=int(attr(node, "group", 1)))


def _conv_transpose_layout(node, index, shape):
    # [Cin, Cout/g, k...]: out = Cout/g (axis 1), in = (k..., Cin) with Cin innermost.
    if index != 1 or len(shape) < 3:
        return None
    rank = len(shape)
    return Layout("ConvTranspose", shape, (1, *range(2, rank), 0), 1, out_axis=1, in_axis=0,
                  group=int(attr(node, "group", 1)))


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


def _conv_fold(node, index):
    # A zero-padded Conv sees 0 instead of the constant at its borders.
    pads = attr(node, "pads", None)
    auto = attr(node, "auto_pad", b"NOTSET")
    return (not pads or not any(pads)) and auto in (b"NOTSET", b"VALID")


def _conv_zero_filter(node, bias, x):
    # Grouped/depthwise: a zero filter outputs its bias only; a constant input through padding
    # would not be constant, so an input constant other than 0 makes it unknown.
    if int(attr(node, "group", 1)) > 1 and x is not None:
        return np.where(x == 0, bias, np.nan)
    return bias


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


define("Conv", layout=_conv_layout, activation=_conv_activation, bias=_conv_bias,
       fold=_conv_fold, zero_filter=_conv_zero_filter, macs=_conv_macs(1))
define("ConvInteger", macs=_conv_macs(1))
define("QLinearConv", macs=_conv_macs(3))
# ConvTranspose spreads a constant input unevenly over its output: never an exact fold.
define("ConvTranspose", layout=_conv_transpose_layout, activation=_conv_activation,
       bias=_conv_transpose_bias, zero_filter=_conv_zero_filter, macs=_conv_transpose_macs)
