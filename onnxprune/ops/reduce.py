"""The reduction family: Reduce*, ArgMax/ArgMin, Softmax/LogSoftmax/Hardmax.

Each op's entry: channel rule (axes not reduced pass through; reduced axes are not channels
afterwards, softmax axes are frozen) and constant propagation (a constant's mean/max/min is
itself).

A reduction over a channel axis (RMSNorm's ``Pow -> ReduceMean`` over the residual stream) is a
statistic of every channel. A sum (``ReduceSum``, ``ReduceSumSquare``, ``ReduceL1``, ``ReduceL2``,
``ReduceLogSum``) is unchanged by deleting channels that hold 0, so it is exact under removal
where the removed channels are 0 at its input in the masked model — the rule asks for that
(``ctx.need_zero``; checked on the built group by :mod:`onnxprune.channels.zeros`, which freezes
the group with the cause where they are not). ``ReduceMean`` divides by the width: on resize a
``Mul`` by ``kept / original`` is inserted after it, so it still divides by the original width.
``ReduceMax``/``Min``/``Prod``/``LogSumExp`` and ArgMax/ArgMin change even with zeros removed (a
0 can be the max; ``exp(0)`` is 1): they freeze the axis.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops._channel import NodeCtx, axes_arg, norm_axis, pass_through_const, tie_all
from onnxprune.ops.registry import define

#: Reductions unchanged by deleting channels that hold 0 (ReduceMean: with its divisor kept).
_SUMS = ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceMean")


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
        axes = axes_arg(ctx, 1) if uses_input else ctx.attr("axes", None)
        if axes is None and ctx.inp(1):
            return  # axes not constant
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0):
                tie_all(ctx, x, y)
                return
            axes = list(range(r))
    axes = {norm_axis(int(a), r) for a in axes}
    for j in sorted(axes):  # a statistic over the channels (RMSNorm's Pow -> ReduceMean)
        if ctx.size(x, j) == 1:
            continue
        if op in _SUMS:
            ctx.need_zero(x, j, f"{op} reduces over axis {j} (a statistic over every channel, "
                                "as in RMSNorm's Pow -> ReduceMean): exact under removal only "
                                "where the removed channels are 0 in the masked model")
        else:
            ctx.freeze(x, j, f"{op} reduces over axis {j} (a statistic over every channel: "
                             "removing some would change it, even channels that are 0)")
    if op == "ReduceMean":
        _keep_divisor(ctx, x, y, sorted(axes))
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


def _keep_divisor(ctx: NodeCtx, x: str, y: str, axes) -> None:
    """On resize, a ReduceMean over axes that lost channels is followed by a new ``Mul`` by
    ``kept / original`` (its output renamed, the Mul writing the old name), so it divides by the
    original width: the mean the masked model takes over zeros and kept channels alike."""
    shape = ctx.shape(x)
    dtype = ctx.dtype(x) or onnx.TensorProto.FLOAT

    def rewrite(node, rc, x=x, y=y, axes=tuple(axes), shape=shape, dtype=dtype):
        factor = 1.0
        for j in axes:
            gone = len(rc.removed(x, j))
            if gone:
                factor *= (int(shape[j]) - gone) / int(shape[j])
        if factor == 1.0:
            return
        graph = rc.handle.model.graph
        kept = rc.unique_name(f"{y}_kept_mean")
        node.output[0] = kept
        value = np.asarray(factor, onnx.helper.tensor_dtype_to_np_dtype(dtype))
        scale = rc.new_constant(f"{y}_width_ratio", value)
        mul = onnx.helper.make_node("Mul", [kept, scale], [y], name=f"{node.name}_width_ratio")
        at = next(i for i, n in enumerate(graph.node) if n is node)
        graph.node.insert(at + 1, mul)
    ctx.rewrite(rewrite)


def _softmax(ctx: NodeCtx) -> None:
    x, y = ctx.inp(0), ctx.out()
    r = ctx.rank(x)
    if r is None:
        return
    axis = norm_axis(int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)), r)
    for j in range(r):
        if (ctx.opset >= 13 and j != axis) or (ctx.opset < 13 and j < axis):
            ctx.tie((x, j), (y, j))




_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum", "ArgMax", "ArgMin")
define(*_REDUCE, channels=_reduce)
define("ReduceMean", "ReduceMax", "ReduceMin", const=pass_through_const)
def _softmax_classes(node, rank: int, opset: int) -> Optional[int]:
    """Softmax normalizes over its axis: the output holds class scores along it. Before opset
    13 the input is flattened from ``axis`` on, which names one class axis only when it is the
    last."""
    if rank < 1:
        return None
    axis = norm_axis(int(attr(node, "axis", -1 if opset >= 13 else 1)), rank)
    return axis if (opset >= 13 or axis == rank - 1) else None


define("Softmax", "LogSoftmax", "Hardmax", channels=_softmax, class_axis=_softmax_classes)
