"""The matrix family: Gemm, MatMul, Einsum (the integer/QLinear forms are in ``quant``).

Each op's entry: weight layout ``W[out, in]``, activation operand, bias slot (Gemm's
alpha/beta), exact-fold condition, zero-filter constant, channel rule (the reduction axis is
tied between both operands; an activation x activation product is a sink), MAC formula.
"""

from __future__ import annotations

import string
from typing import Dict, Optional

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops._channel import (BIAS, CONSUMER, PRODUCER, NodeCtx, same_extent,
                                    tie_broadcast)
from onnxprune.ops.layouts import Layout, layout_for
from onnxprune.ops.registry import Activation, BiasSlot, Shapes, define, numel, shape_in


# -- weight layout ------------------------------------------------------------------------------
def _gemm_layout(node, index, shape):
    if len(shape) != 2:
        return None
    if index == 1:  # B: [K, N], or [N, K] with transB=1
        if attr(node, "transB", 0):
            return Layout("Gemm", shape, (0, 1), 1, out_axis=0, in_axis=1)
        return Layout("Gemm", shape, (1, 0), 1, out_axis=1, in_axis=0)
    if index == 0:  # constant A: [M, K], or [K, M] with transA=1; rows of A are the outputs
        if attr(node, "transA", 0):
            return Layout("Gemm", shape, (1, 0), 1, out_axis=1, in_axis=0)
        return Layout("Gemm", shape, (0, 1), 1, out_axis=0, in_axis=1)
    return None


def _matmul_layout(node, index, shape):
    rank = len(shape)
    if rank < 2:
        return None
    batch = tuple(range(rank - 2))
    if index == 1:  # X @ W with W [..., K, N]: out = (batch..., N), in = K
        return Layout("MatMul", shape, (*batch, rank - 1, rank - 2), rank - 1,
                      out_axis=rank - 1, in_axis=rank - 2)
    if index == 0:  # W @ X with W [..., M, K]: out = (batch..., M), in = K
        return Layout("MatMul", shape, tuple(range(rank)), rank - 1,
                      out_axis=rank - 2, in_axis=rank - 1)
    return None


# -- activation operand, bias, folding ----------------------------------------------------------
def _gemm_activation(node, index, weight_shape):
    if index == 1:  # Y = A' B': X rows are the rows of A' (A transposed when transA)
        return Activation(0, rows_last=bool(attr(node, "transA", 0)))
    if index == 0:  # constant A: X rows are the columns of B' (B itself when transB)
        return Activation(1, rows_last=not attr(node, "transB", 0))
    return None


def _matmul_activation(node, index, weight_shape):
    if index == 1:  # X @ W
        return Activation(0, rows_last=False)
    if index == 0:  # W @ X: X rows are the columns of the right operand
        return Activation(1, rows_last=True)
    return None


def _gemm_bias(node, index):
    # C is per output column = per row of B; for a constant A its rows are C's rows, which
    # calibration's per-row mean shift does not handle.
    if index not in (0, 1):
        return None
    return BiasSlot(2, alpha=float(attr(node, "alpha", 1.0)), beta=float(attr(node, "beta", 1.0)),
                    operand="C", beta_attr="beta", mean_shift=index == 1)


def _matmul_bias(node, index):
    # No bias input: the [out] constant of a single Add after ``x @ W``.
    return BiasSlot(None) if index == 1 else None


def _gemm_fold(node, index, shape):
    # A' @ B' with a constant column k of A': adds const * B'[k, :] to every row; the bias C is
    # per output column. A constant A (index 0) has its rows as outputs: not a per-column bias.
    if index != 1:
        return "the constant reaches Gemm's left operand (its bias is per column)"
    return None


def _matmul_fold(node, index, shape):
    # X @ W with W [K, N] adds const * W[k, :] to every row: an [N] bias after it. A batched
    # W [B.., K, N] adds const * W[b, k, :], different per batch entry: not one [N] bias.
    if index != 1:
        return "the constant reaches MatMul's left operand (W @ X: no per-column bias)"
    if shape is None:
        return "the MatMul weight's shape is unknown"
    if len(shape) > 2 and numel(shape[:-2]) != 1:
        return (f"the MatMul weight {list(shape)} is batched: the constant adds a different "
                "row per batch entry, not one bias")
    return None


def _bias_only(node, bias, x):
    return bias


# -- channel rules ------------------------------------------------------------------------------
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


def _gemm_channels(ctx: NodeCtx) -> None:
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


def _matmul_channels(ctx: NodeCtx) -> None:
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
            same = same_extent(sa[j], sy[yj])
            if same:
                ctx.tie((name, j), (y, yj))
            elif same is None:
                ctx.freeze(name, j, "cannot tell broadcast batch axis")
            else:
                ctx.ok(name, j)
    _weight_roles(ctx, 0)
    _weight_roles(ctx, 1)


# -- MACs ---------------------------------------------------------------------------------------
def _gemm_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Y = alpha * A' B' + beta * C with A' [M, K], B' [K, N]: M*N*K (the C add is not counted).
    a = shape_in(shapes, node, 0)
    b = shape_in(shapes, node, 1)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m, k = (a[1], a[0]) if attr(node, "transA", 0) else a
    n = b[0] if attr(node, "transB", 0) else b[1]
    return int(m) * int(n) * int(k)


def _matmul_macs(a_index: int, b_index: int):
    def formula(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
        # numpy matmul semantics: A[..., M, K] @ B[..., K, N] with broadcast batch dims;
        # a 1-D A is [1, K], a 1-D B is [K, 1]. prod(batch) * M * N * K.
        a = shape_in(shapes, node, a_index)
        b = shape_in(shapes, node, b_index)
        if a is None or b is None or not a or not b:
            return None
        k = a[-1]
        m = a[-2] if len(a) >= 2 else 1
        n = b[-1] if len(b) >= 2 else 1
        try:
            batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        except ValueError:
            return None
        return numel(batch) * int(m) * int(n) * int(k)

    return formula


def _einsum_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # A naive contraction of n operands costs (n - 1) * prod(size of every distinct index).
    equation = attr(node, "equation", b"")
    if isinstance(equation, bytes):
        equation = equation.decode()
    lhs = equation.replace(" ", "").split("->")[0]
    operands = lhs.split(",")
    if "." in lhs or len(operands) != len(node.input):
        return None
    if len(operands) < 2:
        return 0
    sizes: Dict[str, int] = {}
    for term, name in zip(operands, node.input):
        shape = shapes.get(name)
        if shape is None or len(shape) != len(term):
            return None
        for letter, size in zip(term, shape):
            if letter not in string.ascii_letters:
                return None
            # Broadcast size-1 dims take the other operand's size.
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return (len(operands) - 1) * numel(sizes.values())


def _head_classes(node, rank: int, opset: int) -> Optional[int]:
    """A linear layer's output features, when its output is a model output of rank 2
    (``[batch, classes]``) or 3 (``[batch, positions, vocabulary]``): a classifier or LM head."""
    return rank - 1 if rank in (2, 3) else None


def _product_const(node, vals, read):
    """MatMul of two activations (attention's scores and context): a channel its output keeps
    (a batch axis such as the heads, A's rows, B's columns; the sum runs over the other axis) is
    0 where either operand's is 0, else unknown."""
    a, b = (list(vals) + [None, None])[:2]
    if a is None or b is None:
        return None
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return [np.where((a == 0) | (b == 0), 0.0, np.nan)]


define("Gemm", "MatMul", class_axis=_head_classes)
define("Gemm", layout=_gemm_layout, activation=_gemm_activation, bias=_gemm_bias,
       fold=_gemm_fold, zero_filter=_bias_only, channels=_gemm_channels,
       macs=_gemm_macs)
define("MatMul", layout=_matmul_layout, activation=_matmul_activation, bias=_matmul_bias,
       fold=_matmul_fold, zero_filter=_bias_only, channels=_matmul_channels,
       macs=_matmul_macs(0, 1), const=_product_const)
define("Einsum", macs=_einsum_macs)
