"""The reduction family: Reduce*, ArgMax/ArgMin, Softmax/LogSoftmax/Hardmax.

Each op's entry: channel rule (axes not reduced pass through; reduced axes are not channels
afterwards, softmax axes are frozen) and constant propagation (a constant's mean/max/min is
itself).
"""

from __future__ import annotations

from typing import Optional

from onnxprune.model.index import attr
from onnxprune.ops._channel import NodeCtx, axes_arg, norm_axis, pass_through_const, tie_all
from onnxprune.ops.registry import define


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
    for j in axes:  # a statistic over the channels (RMSNorm's Pow -> ReduceMean): frozen
        if ctx.size(x, j) != 1:
            ctx.freeze(x, j, f"{op} reduces over axis {j} (a statistic over every channel, "
                             "as in RMSNorm's Pow -> ReduceMean; removing some would change it)")
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
