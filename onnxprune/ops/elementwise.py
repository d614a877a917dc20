"""The element-wise family: unary ops (activations, casts, math) and broadcasting binary ops.

Each op's entry: channel rule (every axis tied to the output's, broadcast axes right-aligned; a
constant operand's channel axis gets the role that masking zeroes) and constant propagation
(the op applied to the per-channel constant).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops._channel import (BIAS, FACTOR, NodeCtx, pass_through_const, tie_all,
                                    tie_broadcast)
from onnxprune.ops.registry import define, same_axis, unchanged_step

# -- unary ------------------------------------------------------------------------------------
_UNARY_NP = {
    "Relu": lambda x, n: np.maximum(x, 0),
    "Sigmoid": lambda x, n: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "Abs": lambda x, n: np.abs(x), "Neg": lambda x, n: -x,
    "Exp": lambda x, n: np.exp(x), "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Softsign": lambda x, n: x / (1 + np.abs(x)),
    "HardSigmoid": lambda x, n: np.clip(attr(n, "alpha", 0.2) * x + attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6 + 0.5, 0, 1),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, attr(n, "alpha", 0.01) * x),
    "Elu": lambda x, n: np.where(x >= 0, x, attr(n, "alpha", 1.0) * (np.exp(x) - 1)),
    "Selu": lambda x, n: attr(n, "gamma", 1.0507) * np.where(
        x > 0, x, attr(n, "alpha", 1.67326) * (np.exp(x) - 1)),
    "Celu": lambda x, n: np.maximum(0, x) + np.minimum(
        0, attr(n, "alpha", 1.0) * (np.exp(x / attr(n, "alpha", 1.0)) - 1)),
    "Mish": lambda x, n: x * np.tanh(np.log1p(np.exp(x))),
    "ThresholdedRelu": lambda x, n: np.where(x > attr(n, "alpha", 1.0), x, 0),
    "Erf": lambda x, n: np.vectorize(math.erf)(x), "Log": lambda x, n: np.log(x),
    "Sqrt": lambda x, n: np.sqrt(x), "Reciprocal": lambda x, n: 1 / x,
    "Floor": lambda x, n: np.floor(x), "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x), "Sign": lambda x, n: np.sign(x),
    "Sin": lambda x, n: np.sin(x), "Cos": lambda x, n: np.cos(x),
    "Gelu": lambda x, n: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
}
#: Unary ops with a channel rule but no constant propagation (the constant is not followed).
_UNARY_OPAQUE = ("Shrink", "Not", "IsNaN", "IsInf", "Swish")


def _unary(ctx: NodeCtx) -> None:
    x = ctx.inp(0)
    for i in range(1, len(ctx.node.input)):  # Clip min/max, Dropout ratio: scalars
        ctx.ok(ctx.inp(i))
    for o in ctx.node.output:
        if o:
            tie_all(ctx, x, o)


def _unary_const(node, vals, read):
    if vals[0] is None:
        return None
    return [_UNARY_NP[node.op_type](vals[0], node)]


def _clip_const(node, vals, read):
    if vals[0] is None:
        return None
    lo = read(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "min", None)
    hi = read(node.input[2]) if len(node.input) > 2 and node.input[2] else attr(node, "max", None)
    for i, bound in ((1, lo), (2, hi)):
        if bound is None and len(node.input) > i and node.input[i]:
            return None  # a computed bound: the clipped value is not known
    x = vals[0]
    x = x if lo is None else np.maximum(x, float(np.asarray(lo)))
    return [x if hi is None else np.minimum(x, float(np.asarray(hi)))]


define(*_UNARY_NP, channels=_unary, const=_unary_const)
define("Clip", channels=_unary, const=_clip_const)
#: How far (relative) the float64 constant the dead-channel walk computes may lie from the value
#: the model's own fp32 arithmetic produces (a few fp32 ulps: BN, activations, adds before it).
_WALK_ERROR = 2.0 ** -19


def _cast_const(node, vals, read):
    """The constant rounded to the target float type; to any other type (integers, and bf16/fp8,
    which numpy holds as opaque types) it is not followed.

    A cast to a type narrower than fp32 (fp16: a rounding step far coarser than fp32's) is
    followed only where the rounding is decided: every value within ``_WALK_ERROR`` of the
    walk's constant rounds to the same one and it is finite. Near a rounding boundary the
    model's fp32 value may fall on the other side than the float64 one (the fold would be off
    by a whole fp16 step), and an overflow to inf is no constant a bias can take: unknown (NaN).
    """
    if vals[0] is None:
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(attr(node, "to", 0))))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.kind != "f":
        return None
    v = np.asarray(vals[0], np.float64)
    with np.errstate(all="ignore"):
        out = v.astype(dtype).astype(np.float64)
        if np.finfo(dtype).eps > np.finfo(np.float32).eps:
            lo = (v - np.abs(v) * _WALK_ERROR).astype(dtype).astype(np.float64)
            hi = (v + np.abs(v) * _WALK_ERROR).astype(dtype).astype(np.float64)
            out = np.where((lo == out) & (hi == out), out, np.nan)
        return [np.where(np.isfinite(out), out, np.nan)]


# Copies: the constant passes unchanged (Dropout is the identity at inference).
define("Identity", "Dropout", channels=_unary, const=pass_through_const)
define("Cast", channels=_unary, const=_cast_const)
# A weight reaches its consumer through them unchanged (fp16 exports: Cast).
define("Cast", "Identity", weight_step=unchanged_step, axis_source=same_axis, copies_values=True)
define(*_UNARY_OPAQUE, channels=_unary)


# -- binary (broadcasting) --------------------------------------------------------------------
def _binary_rule(role: str):
    def rule(ctx: NodeCtx) -> None:
        out = ctx.out()
        for i, name in enumerate(ctx.node.input):
            if not name:
                continue
            r = role
            if ctx.node.op_type == "Sub" and i == 1 and ctx.is_const(name):
                r = BIAS  # c - x: zeroing c keeps a masked channel at 0
            tie_broadcast(ctx, name, out, r)

    return rule


def _numpy_const(fn):
    def const(node, vals, read):
        a, b = vals[0], vals[1] if len(vals) > 1 else None
        if a is None or b is None:
            return None
        with np.errstate(all="ignore"):
            return [fn(a, b)]

    return const


def _variadic_const(fn):
    def const(node, vals, read):
        if any(v is None for v in vals):
            return None  # an operand that is not a known constant: the result is not either
        return [fn(np.stack([v for v in vals if v is not None]), axis=0)]

    return const


def _prelu_const(node, vals, read):
    a, b = vals[0], vals[1] if len(vals) > 1 else None
    if a is None or b is None:
        return None
    return [np.where(a >= 0, a, b * a)]


for _op, _fn in (("Add", np.add), ("Sub", np.subtract)):
    define(_op, channels=_binary_rule(BIAS), const=_numpy_const(_fn))
for _op, _fn in (("Mul", np.multiply), ("Div", np.divide), ("Max", np.maximum),
                 ("Min", np.minimum), ("Pow", np.power)):
    define(_op, channels=_binary_rule(FACTOR), const=_numpy_const(_fn))
define("Sum", channels=_binary_rule(BIAS), const=_variadic_const(np.sum))
define("Mean", channels=_binary_rule(BIAS), const=_variadic_const(np.mean))
define("PRelu", channels=_binary_rule(FACTOR), const=_prelu_const)
# Comparisons, logic, Where, Mod: tied like any broadcast, the constant is not followed.


# -- a stored integer weight dequantized by Cast + [Sub zero point] + Mul/Div scale -----------
def _dequant_step(kind: str):
    """``weight_step`` of Mul/Div (``kind`` "scale") and Sub (``kind`` "zero_point"): the stored
    weight at input 0, the constant at input 1. The step is ``(kind, 1)``; the weight finder
    (:mod:`onnxprune.ops.weights`) follows it only for an integer tensor cast to float (a
    dequantization: ``(q - zero_point) * scale`` or ``/ scale``), never for a float weight, and
    only when the constant does not widen the weight by broadcasting."""

    def step(node, seen_shape, read):
        if len(node.input) != 2 or not node.input[1]:
            return None
        other = read(1)
        if other is None:
            return None
        other = np.asarray(other)
        if other.ndim > len(seen_shape):
            return None
        padded = (1,) * (len(seen_shape) - other.ndim) + tuple(other.shape)
        if any(o not in (1, s) for o, s in zip(padded, seen_shape)):
            return None
        return (kind, 1)

    return step


def _scaled_axis_source(node, axis, shape_of):
    """A constant scaled by another constant (``W * s``, ``W / s``) keeps input 0's axes when the
    scale does not broadcast it wider: slicing the stored ``W`` (and the scale, by its own
    channel rule) slices the product."""
    s_in, s_out = shape_of(node.input[0]), shape_of(node.output[0])
    if s_in is None or s_out is None or tuple(s_in) != tuple(s_out):
        return None
    return axis


define("Mul", "Div", weight_step=_dequant_step("scale"), axis_source=_scaled_axis_source)
define("Sub", weight_step=_dequant_step("zero_point"))
define("Where", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor",
       "Mod", channels=_binary_rule(FACTOR))
