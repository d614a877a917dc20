"""The quantization family: QDQ (QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear), the
QOperator ops (QLinearConv, ConvInteger, QLinearMatMul, MatMulInteger) and the ``com.microsoft``
quantized ops (QGemm, QLinearAdd, QLinearMul, QLinearGlobalAveragePool, DynamicQuantizeMatMul,
MatMulIntegerToFloat, MatMulNBits; DynamicQuantizeLSTM is in ``recurrent``). Other
``com.microsoft`` ops (QAttention, QLinearConcat, QLinearSigmoid, ...) have no entry: their
channels freeze with "no channel rule".

Each op's entry: how a stored weight passes through it (Q/DQ), the weight layout ``W[out, in]``
of the integer ops' weight operand, the channel rule, the MAC formula.

**Zero point = zero.** A quantized weight dequantizes as ``(q - zero_point) * scale``. onnxprune
masks by writing 0 into the stored tensor, so an integer weight is pruned (masks, N:M groups,
channels) only when its zero point is 0 everywhere (symmetric quantization, what onnxruntime's
quantizer writes for weights): then the written 0 *is* the zero point and dequantizes to exactly
0, and every count (sparsity, N:M per group) is a count of zero-point entries. A weight with a
nonzero (or in-graph computed) zero point is left alone with that reason and its channels
freeze — except where the per-channel scale of a removed output channel is zeroed instead,
which makes the channel exactly 0 whatever its zero point (MatMulNBits), and except integer
tables read by ``Gather`` (an embedding with zero point 138), whose removed columns are masked
with their zero point (:func:`zero_value`) where every reader agrees on it. Scales and zero points
are never requantized: kept channels keep their integer values, scales and zero points, so the
output stays quantized with the same scheme and dtypes.

**Channels.** ``DequantizeLinear``/``QuantizeLinear`` keep the shape: every axis of the input is
the same axis of the output. A per-axis scale (and zero point) is tied to its ``axis`` and
sliced with it; a per-tensor one is a scalar and carries no channels. Opset-21 ``block_size``
(blocked quantization) is left frozen: a block spans several channels along its axis.

One module (about 710 lines) on purpose: one op family whose entries share the one rule above
(zero point = zero: which weights may be written, what a masked integer holds) and the scale
handling; split by op, that rule would live in several places.
``DynamicQuantizeLinear`` passes channels through: its per-tensor scale and zero point come from
``min(0, min x)`` and ``max(0, max x)`` — the range always includes 0 — so deleting channels that
hold exactly 0 changes neither, and the kept values quantize to the same integers: removal is
exact where the removed channels are 0 at its input in the masked model, which is checked
(``channels/zeros.py``: a masked producer's row with its bias, through ``Gelu``/``Relu``, heads
through attention's two MatMuls) and the group frozen where they are not (a ``Sigmoid`` or an
added constant before it). The QOperator ops tie like Conv and MatMul (their weight at
its own input index); per-output-channel weight scales / zero points are sliced with the output
channels, the activation's and output's per-tensor parameters carry none, QLinearConv's int32
bias is the bias. An integer output of a masked channel is its zero point (QLinear ops: the
output zero point), which the next DequantizeLinear / QLinear op reads as exactly 0.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops._channel import (BIAS, CONSUMER, PRODUCER, SCALE, STAT, NodeCtx, norm_axis,
                                    set_attr, tie_all, tie_broadcast)
from onnxprune.ops.conv import _conv_channels, _conv_macs
from onnxprune.ops.layouts import Layout
from onnxprune.ops.linear import _gemm_channels, _gemm_layout, _gemm_macs, _matmul_macs
from onnxprune.ops.registry import (Activation, Shapes, define, numel, op_key, same_axis, shape_in,
                                    unchanged_step)

MS = "com.microsoft"


# -- zero points --------------------------------------------------------------------------------
def zero_point_issue(value: Optional[np.ndarray], present: bool) -> Optional[str]:
    """Why a weight whose zero point is ``value`` (None: computed in-graph; ``present`` False:
    the input is absent, i.e. 0) cannot be masked by writing 0, or None when it can."""
    if not present:
        return None
    if value is None:
        return "its zero point is computed in-graph, not a stored constant"
    if np.any(np.asarray(value) != 0):
        return ("its zero point is not 0 (asymmetric quantization): a pruned entry is written "
                "as 0, which would not dequantize to 0")
    return None


#: Integer ops: input index of the weight operand -> input index of its zero point.
_WEIGHT_ZERO_POINT = {
    "MatMulInteger": {1: 3}, "ConvInteger": {1: 3}, "QLinearMatMul": {3: 5},
    "QLinearConv": {3: 5}, f"{MS}:DynamicQuantizeMatMul": {1: 3}, f"{MS}:QGemm": {3: 5},
    f"{MS}:MatMulIntegerToFloat": {1: 5}, f"{MS}:DynamicQuantizeLSTM": {1: 9, 2: 11},
}


def integer_weight_refusal(chain: Sequence[onnx.NodeProto], consumer: onnx.NodeProto,
                           index: int, read: Callable[[str], Optional[np.ndarray]]
                           ) -> Optional[str]:
    """Why an integer stored tensor reaching input ``index`` of ``consumer`` through the
    pass-through nodes ``chain`` is not prunable by masking, or None when it is: it must be read
    as quantized values (a DequantizeLinear on the way, or the weight operand of an integer op)
    whose zero point is 0 (see the module docstring). ``read(name)`` is a stored value or None."""
    dq = [n for n in chain if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]
    if dq:
        node, zp_index = dq[-1], 2
        if int(attr(node, "block_size", 0) or 0):
            return ("blocked quantization (DequantizeLinear block_size): a block's scale spans "
                    "several input channels; left alone")
    else:
        zp_index = _WEIGHT_ZERO_POINT.get(op_key(consumer), {}).get(index)
        node = consumer
        if zp_index is None:
            return ("read as plain integers (no DequantizeLinear, no integer op operand); only "
                    "float and quantized weights are pruned")
    name = node.input[zp_index] if zp_index < len(node.input) and node.input[zp_index] else None
    issue = zero_point_issue(None if name is None else read(name), name is not None)
    return issue


#: Integer ops: input index of the weight operand -> input index of its scale.
_WEIGHT_SCALE = {
    "QLinearMatMul": {3: 4}, "QLinearConv": {3: 4}, f"{MS}:DynamicQuantizeMatMul": {1: 2},
    f"{MS}:MatMulIntegerToFloat": {1: 3}, f"{MS}:DynamicQuantizeLSTM": {1: 8, 2: 10},
    f"{MS}:QGemm": {3: 4},
}


def weight_scale(chain: Sequence[onnx.NodeProto], consumer: onnx.NodeProto, index: int,
                 stored_shape: Sequence[int], read: Callable[[str], Optional[np.ndarray]]
                 ) -> Optional[np.ndarray]:
    """The scale of a quantized stored weight, broadcastable to its stored shape (its values
    dequantize as ``(q - 0) * scale``), so criteria can rank it on what it computes; None when
    unknown (computed in-graph, applied by a later Mul as in MatMulInteger, or a layout step
    before the DequantizeLinear)."""
    shape = tuple(int(d) for d in stored_shape)
    if chain and chain[0].op_type == "DequantizeLinear" and chain[0].domain in ("", "ai.onnx"):
        node, scale_index = chain[0], 1
        axis = int(attr(node, "axis", 1))
    elif not chain:
        node, scale_index = consumer, _WEIGHT_SCALE.get(op_key(consumer), {}).get(index)
        if scale_index is None:
            return None
        axis = 0 if consumer.op_type == "QLinearConv" or (
            consumer.op_type == "QGemm" and attr(consumer, "transB", 0)) else len(shape) - 1
    else:
        return None
    name = node.input[scale_index] if scale_index < len(node.input) else ""
    value = read(name) if name else None
    if value is None:
        return None
    value = np.asarray(value, np.float64)
    if value.size == 1:
        return value.reshape(())
    if node.op_type == "DynamicQuantizeLSTM" and value.ndim == 2:  # [dirs, 4H] on (0, 2)
        return value.reshape(value.shape[0], 1, value.shape[1])
    if node.op_type == "DynamicQuantizeLSTM":  # [dirs]
        axis = 0
    axis = axis + len(shape) if axis < 0 else axis
    if value.ndim != 1 or axis >= len(shape) or shape[axis] != value.size:
        return None
    view = [1] * len(shape)
    view[axis] = value.size
    return value.reshape(view)


def stored_scale(index, name: str, read: Callable[[str], Optional[np.ndarray]]
                 ) -> Optional[np.ndarray]:
    """:func:`weight_scale` of the stored tensor ``name`` from the one node that reads it (a
    DequantizeLinear, or a QLinear / com.microsoft op as its weight), for channel scores;
    None for float tensors, several readers or an unknown scale. ``index`` is the graph index."""
    tensor = index.stored.get(name)
    readers = index.consumers(name)
    if tensor is None or tensor.data_type not in _INTEGER_DTYPES or len(readers) != 1:
        return None
    node, i = readers[0]
    if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and i == 0:
        return weight_scale((node,), node, 0, tensor.dims, read)
    return weight_scale((), node, i, tensor.dims, read)


#: Ops that move input 0's values unchanged (a stored table on the way to its dequantization;
#: zeros of a run-time shape, channels/zeros.py).
MOVES = ("Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten",
         "Slice", "Expand")


def zero_value(index, name: str, read: Callable[[str], Optional[np.ndarray]]
               ) -> Optional[np.ndarray]:
    """The integer value that every reader of the stored integer tensor ``name`` dequantizes to
    exactly 0 — what masking writes into a removed channel — or None when there is none or it
    is unknown. Readers are followed through ops that move values (a ``Gather`` of an embedding
    table, layout ops) to a ``DequantizeLinear`` (its per-tensor zero point; absent: 0), a
    ``Cast`` to float then ``Sub`` of a constant zero point (or straight into a ``Mul``/``Div``
    scale: 0), or the weight operand of an integer op (its zero point input). All must agree."""
    tensor = index.stored.get(name)
    if tensor is None or tensor.data_type not in _INTEGER_DTYPES:
        return None
    found = []
    stack, seen = [name], set()
    while stack:
        value_name = stack.pop()
        if value_name in seen:
            continue
        seen.add(value_name)
        readers = index.consumers(value_name)
        if not readers:
            continue
        for node, i in readers:
            if node.domain not in ("", "ai.onnx") and op_key(node) not in _WEIGHT_ZERO_POINT:
                return None
            if node.op_type in MOVES and i == 0:
                stack.append(node.output[0])
                continue
            zp = _reader_zero_point(index, node, i, read)
            if zp is None:
                return None
            found.append(zp)
    if not found or any(np.any(f != found[0]) for f in found[1:]):
        return None
    return np.asarray(found[0]).astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _uniform(value) -> Optional[np.ndarray]:
    """A constant's one value (a scalar, or a vector of equal entries), else None."""
    if value is None:
        return None
    flat = np.asarray(value).ravel()
    return flat[0] if flat.size and np.all(flat == flat[0]) else None


def _reader_zero_point(index, node, i: int, read) -> Optional[np.ndarray]:
    """The zero point ``node`` subtracts from its input ``i`` (see :func:`zero_value`)."""
    def operand(k):
        return node.input[k] if k < len(node.input) and node.input[k] else None
    if node.op_type == "DequantizeLinear" and i == 0:
        if int(attr(node, "block_size", 0) or 0):
            return None
        zp = operand(2)
        return np.int64(0) if zp is None else _uniform(read(zp))
    if node.op_type == "Cast" and i == 0:
        values = set()
        for reader, k in index.consumers(node.output[0]):
            if reader.op_type == "Sub" and k == 0 and len(reader.input) == 2:
                v = _uniform(read(reader.input[1]))
            elif reader.op_type in ("Mul", "Div") and k == 0 or reader.op_type == "Mul":
                v = 0
            else:
                return None
            if v is None or float(v) != round(float(v)):
                return None
            values.add(int(round(float(v))))
        return np.int64(values.pop()) if len(values) == 1 else None
    zp_index = _WEIGHT_ZERO_POINT.get(op_key(node), {}).get(i)
    if zp_index is None:
        return None
    zp = operand(zp_index)
    return np.int64(0) if zp is None else _uniform(read(zp))


def _dequantize_const(node, vals, read):
    """DequantizeLinear of a known value: ``(x - zero_point) * scale`` (a masked table column
    holds its zero point: 0 after this)."""
    x = vals[0]
    scale = vals[1] if len(vals) > 1 else None
    zp = vals[2] if len(vals) > 2 and node.input[2] else 0
    if x is None or scale is None or zp is None or int(attr(node, "block_size", 0) or 0):
        return None
    return [(np.asarray(x, np.float64) - zp) * scale]


_INTEGER_DTYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                   onnx.TensorProto.UINT16}


def stored_values(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` (a refit, computed in float) as a weight of ``dtype`` stores them: a float
    dtype is a cast; an integer dtype (a quantized weight, refit in its own integer units: the
    scale stays) is rounded and clipped to the dtype's range, never wrapped around."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return np.asarray(values).astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


# -- QDQ channel rules --------------------------------------------------------------------------
def _scalar(ctx: NodeCtx, name: Optional[str]) -> bool:
    s = ctx.shape(name) if name else ()
    return s is not None and numel([d if isinstance(d, int) else 2 for d in s]) == 1


def _qdq_channels(ctx: NodeCtx) -> None:
    """Q / DQ: same shape in and out; per-axis scale / zero point tied to ``axis``."""
    x, s, zp, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.out()
    rank = ctx.rank(x)
    if rank is None:
        return
    tie_all(ctx, x, y)
    dequantize = ctx.node.op_type == "DequantizeLinear"
    if int(ctx.attr("block_size", 0) or 0):
        ctx.freeze(x, None, "blocked quantization (block_size): a block spans several channels")
        return
    if _scalar(ctx, s) and (zp is None or _scalar(ctx, zp)):
        ctx.ok(s)
        ctx.ok(zp)
    else:
        per_axis = norm_axis(int(ctx.attr("axis", 1)), rank)
        for name in (s, zp):
            if name is None:
                continue
            if ctx.rank(name) != 1:
                ctx.freeze(x, None, f"'{name}' is neither per-tensor nor per-axis")
                return
            ctx.tie((name, 0), (x, per_axis))
            if ctx.is_const(name):
                # Sliced with the channels, never zeroed: Q divides by its scale.
                ctx.role(name, 0, STAT)
    if dequantize and ctx.is_const(x) and zp is not None:
        issue = zero_point_issue(ctx.const(zp), True)
        if issue is not None:
            ctx.freeze(x, None, f"integer weight '{x}': {issue}")


def _dynamic_quantize_channels(ctx: NodeCtx) -> None:
    """DynamicQuantizeLinear: channels pass through; the scale and zero point outputs are
    scalars. Exact where the removed channels are 0 at its input (see the module docstring):
    checked on the built group (``need_zero``), frozen otherwise."""
    x = ctx.inp(0)
    tie_all(ctx, x, ctx.out(0))
    for axis in range(ctx.rank(x) or 0):
        ctx.need_zero(x, axis, "its scale and zero point are a min/max over every channel",
                      stream=False)


# -- QOperator: layouts -------------------------------------------------------------------------
def _matrix_layout(weight_index: int):
    """A ``[K, N]`` weight at ``weight_index``: out = N (columns), in = K."""
    def rule(node, index, shape):
        if index != weight_index or len(shape) != 2:
            return None
        return Layout(node.op_type, shape, (1, 0), 1, out_axis=1, in_axis=0)
    return rule


def _kernel_layout(weight_index: int):
    """A Conv kernel ``[Cout, Cin/g, k...]`` at ``weight_index`` (input channel innermost)."""
    def rule(node, index, shape):
        if index != weight_index or len(shape) < 3:
            return None
        return Layout(node.op_type, shape, (0, *range(2, len(shape)), 1), 1, out_axis=0,
                      in_axis=1, group=int(attr(node, "group", 1)))
    return rule


# -- QOperator: channel rules -------------------------------------------------------------------
def _weight_zero_point_ok(ctx: NodeCtx, w: str, zp_index: Optional[int]) -> bool:
    """False (and the weight frozen) when the weight's zero point is not 0."""
    name = ctx.inp(zp_index) if zp_index is not None else None
    issue = zero_point_issue(ctx.const(name), name is not None)
    if issue is not None:
        ctx.freeze(w, None, f"quantized weight '{w}': {issue}")
        return False
    return True


def _per_channel(ctx: NodeCtx, params: Sequence[Optional[int]], target) -> None:
    """Scalars carry no channels; 1-D per-channel params are tied to ``target`` and sliced."""
    for i in params:
        name = ctx.inp(i) if i is not None else None
        if name is None:
            continue
        if _scalar(ctx, name):
            ctx.ok(name)
        elif ctx.rank(name) == 1:
            ctx.tie((name, 0), target)
            if ctx.is_const(name):
                ctx.role(name, 0, STAT)


def _matmul_like(act: int, weight: int, scalars: Sequence[int], per_col: Sequence[int],
                 bias: Optional[int] = None, zp: Optional[int] = None):
    """``Y[..., M, N] = X[..., M, K] @ W[K, N]`` with the weight at input ``weight``."""
    def rule(ctx: NodeCtx) -> None:
        a, b, y = ctx.inp(act), ctx.inp(weight), ctx.out()
        ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
        if ra is None or rb != 2 or ry != ra or ra < 2:
            return  # finish() freezes: only X[..., K] @ W[K, N] is mapped
        ctx.tie((a, ra - 1), (b, 0))
        ctx.tie((b, 1), (y, ry - 1))
        for j in range(ra - 1):
            ctx.tie((a, j), (y, j))
        if ctx.is_const(b):
            if not _weight_zero_point_ok(ctx, b, zp):
                return
            ctx.role(b, 1, PRODUCER)
            ctx.role(b, 0, CONSUMER)
        else:
            ctx.b.sink(a, ra - 1, ctx.node, act)
            ctx.b.sink(b, 0, ctx.node, weight)
        for i in scalars:
            name = ctx.inp(i)
            if name is not None and not _scalar(ctx, name):
                ctx.freeze(a, None, f"'{name}' is not per-tensor")
            ctx.ok(name)
        _per_channel(ctx, per_col, (b, 1))
        if bias is not None and ctx.inp(bias):
            ctx.tie((ctx.inp(bias), 0), (y, ry - 1))
            if ctx.is_const(ctx.inp(bias)):
                ctx.role(ctx.inp(bias), 0, BIAS)
    return rule


class _View:
    """A QLinearConv / ConvInteger / QGemm node seen by Conv's / Gemm's channel rule: inputs
    (x, w, bias) picked from the op's own positions, layouts asked as the float op's."""

    def __init__(self, ctx: NodeCtx, order: Sequence[Optional[int]], op_type: str) -> None:
        self._ctx = ctx
        self._order = order
        node = onnx.NodeProto()
        node.CopyFrom(ctx.node)
        node.op_type, node.domain = op_type, ""
        self.node = node

    def inp(self, i: int) -> Optional[str]:
        j = self._order[i] if i < len(self._order) else None
        return None if j is None else self._ctx.inp(j)

    @staticmethod
    def plain(node: onnx.NodeProto, order: Sequence[int], op_type: str) -> onnx.NodeProto:
        """A copy of ``node`` as ``op_type`` with only the inputs at ``order``."""
        copy = onnx.helper.make_node(op_type, [node.input[i] for i in order], list(node.output))
        copy.attribute.extend(node.attribute)
        return copy

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def _conv_like(x: int, w: int, bias: Optional[int], scalars: Sequence[int],
               per_out: Sequence[int], zp: int):
    def rule(ctx: NodeCtx) -> None:
        name = ctx.inp(w)
        if name is None or not ctx.is_const(name) or not _weight_zero_point_ok(ctx, name, zp):
            return
        _conv_channels(_View(ctx, (x, w, bias), "Conv"))
        for i in scalars:
            s = ctx.inp(i)
            if s is not None and not _scalar(ctx, s):
                ctx.freeze(ctx.inp(x), None, f"'{s}' is not per-tensor")
            ctx.ok(s)
        _per_channel(ctx, per_out, (name, 0))
    return rule


def _qgemm_channels(ctx: NodeCtx) -> None:
    """com.microsoft QGemm ``(A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp)``: Gemm's
    rule on (A, B, C); B's per-column scale / zero point follow its output columns."""
    b = ctx.inp(3)
    if b is None or not ctx.is_const(b) or not _weight_zero_point_ok(ctx, b, 5):
        return
    _gemm_channels(_View(ctx, (0, 3, 6), "Gemm"))
    for i in (1, 2, 7, 8):
        name = ctx.inp(i)
        if name is not None and not _scalar(ctx, name):
            ctx.freeze(ctx.inp(0), None, f"'{name}' is not per-tensor")
        ctx.ok(name)
    _per_channel(ctx, (4, 5), (b, 0 if ctx.attr("transB", 0) else 1))


def _qgemm_layout(node, index, shape):
    return _gemm_layout(node, 1, shape) if index == 3 else None


def _qgemm_output(node):
    def compute(typed):
        a, b = typed.get(node.input[0]), typed.get(node.input[3])
        da, db = (None if a is None else _dims(a)), (None if b is None else _dims(b))
        if not da or not db or len(da) != 2 or len(db) != 2:
            return None
        m = da[1] if attr(node, "transA", 0) else da[0]
        n = db[0] if attr(node, "transB", 0) else db[1]
        zp = typed.get(node.input[8]) if len(node.input) > 8 and node.input[8] else None
        elem = zp.type.tensor_type.elem_type if zp is not None else onnx.TensorProto.FLOAT
        return _typed(elem, [m, n])
    return (compute,)


# -- com.microsoft QLinear elementwise / pooling (QOperator models) -----------------------------
def _qlinear_global_pool_channels(ctx: NodeCtx) -> None:
    """QLinearGlobalAveragePool ``(X, x_scale, x_zp, y_scale, y_zp)``: batch and channels
    pass (per-tensor parameters); a masked channel is x's zero point, averaging to y's."""
    x, y = ctx.inp(0), ctx.out()
    c = ctx.rank(x) - 1 if ctx.attr("channels_last", 0) and ctx.rank(x) else 1
    ctx.tie((x, 0), (y, 0))
    ctx.tie((x, c), (y, c))
    for i in (1, 2, 3, 4):
        name = ctx.inp(i)
        if name is not None and not _scalar(ctx, name):
            ctx.freeze(x, None, f"'{name}' is not per-tensor")
        ctx.ok(name)


def _qlinear_global_pool_output(node):
    def compute(typed):
        x = typed.get(node.input[0])
        dims = None if x is None else _dims(x)
        if not dims or len(dims) < 3:
            return None
        c = len(dims) - 1 if attr(node, "channels_last", 0) else 1
        out = [d if i in (0, c) else 1 for i, d in enumerate(dims)]
        return _typed(x.type.tensor_type.elem_type, out)
    return (compute,)


def _qlinear_binary_channels(ctx: NodeCtx) -> None:
    """QLinearAdd / QLinearMul ``(A, a_scale, a_zp, B, b_scale, b_zp, c_scale, c_zp)``: numpy
    broadcasting between two activations (per-tensor parameters); a masked channel is each
    operand's zero point (real 0), so the result is 0 (c's zero point) as with Add / Mul.
    A stored per-channel operand is not mapped (it would need its zero point written)."""
    a, b, y = ctx.inp(0), ctx.inp(3), ctx.out()
    for name in (a, b):
        if name is not None and ctx.is_const(name) and not _scalar(ctx, name):
            return  # finish() freezes
    for name in (a, b):
        if name is not None:
            tie_broadcast(ctx, name, y)
    for i in (1, 2, 4, 5, 6, 7):
        name = ctx.inp(i)
        if name is not None and not _scalar(ctx, name):
            ctx.freeze(y, None, f"'{name}' is not per-tensor")
        ctx.ok(name)


# -- MatMulNBits (com.microsoft) ----------------------------------------------------------------
def _nbits_channels(ctx: NodeCtx) -> None:
    """``Y[..., N] = A[..., K] @ dequant(B)^T + bias`` with ``B [N, n_blocks, blob]`` packed
    ``bits``-wide along K, ``scales [N * n_blocks]`` (or ``[N, n_blocks]``), zero points packed
    per row (``[N * ceil(n_blocks * bits / 8)]`` uint8) or float like the scales. Output channel
    n is row n of B and the n-th equal share of every per-channel parameter: sliced on removal
    (``N`` rewritten). A masked channel's scales are zeroed, so it outputs exactly 0 (its bias
    too) whatever its zero point. Input channels (K) are packed inside B's blobs: frozen."""
    n, k = int(ctx.attr("N", 0)), int(ctx.attr("K", 0))
    a, b, scales, zp, y = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.inp(3), ctx.out()
    bias = ctx.inp(5)
    ra, ry = ctx.rank(a), ctx.rank(y)
    if not n or not k or ra is None or ry != ra or not ctx.is_const(b) or \
            not ctx.is_const(scales) or ctx.inp(4):
        return  # g_idx (act-order) or unknown shapes: finish() freezes
    for j in range(ra - 1):
        ctx.tie((a, j), (y, j))
    ctx.freeze(a, ra - 1, "MatMulNBits packs K inside its blocks (input channels not removed)")
    ctx.tie((b, 0), (y, ry - 1))
    ctx.role(b, 0, PRODUCER)
    for ax in range(1, ctx.rank(b) or 0):
        ctx.ok(b, ax)
    for name, role in ((scales, SCALE), (zp, STAT), (bias, BIAS)):
        if name is None:
            continue
        shape = ctx.shape(name)
        if shape is None or not ctx.is_const(name) or shape[0] % n:
            ctx.freeze(y, None, f"'{name}' {shape} is not N equal per-channel shares")
            return
        if len(shape) == 1 and shape[0] != n:
            share = shape[0] // n
            ctx.tie_map((name, 0), np.arange(n * share), (y, ry - 1),
                        np.repeat(np.arange(n), share), n * share, n)
        else:
            ctx.tie((name, 0), (y, ry - 1))
            for ax in range(1, len(shape)):
                ctx.ok(name, ax)
        ctx.role(name, 0, role)

    def rewrite(node, rc, y=y, axis=ry - 1, n=n):
        gone = rc.removed(y, axis)
        if len(gone):
            set_attr(node, "N", int(n - len(gone)))

    ctx.rewrite(rewrite)


def _nbits_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Y[..., N] = A[..., K] @ W^T: prod(A's leading dims) * N * K.
    a = shape_in(shapes, node, 0)
    if a is None:
        return None
    return numel(a[:-1]) * int(attr(node, "N", 0)) * int(attr(node, "K", 0))


# -- output types of com.microsoft ops (ONNX's shape inference does not know them) ----------------
def _dims(vi) -> Optional[list]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in t.shape.dim]


def _typed(elem: int, dims: Sequence) -> onnx.TypeProto:
    return onnx.helper.make_tensor_type_proto(elem, list(dims))


def _matmul_output(a_index: int, n_of: Callable):
    """``Y = A[..., K] @ W[K, N]``: float, ``A``'s leading dims then ``N``."""
    def output_like(node):
        def compute(typed):
            a = typed.get(node.input[a_index])
            dims = None if a is None else _dims(a)
            n = n_of(node, typed)
            if not dims or n is None:
                return None
            return _typed(onnx.TensorProto.FLOAT if a.type.tensor_type.elem_type in (
                onnx.TensorProto.UINT8, onnx.TensorProto.INT8) else a.type.tensor_type.elem_type,
                dims[:-1] + [n])
        return (compute,)
    return output_like


def _n_from_weight(node, typed):
    w = typed.get(node.input[1])
    dims = None if w is None else _dims(w)
    return dims[-1] if dims and isinstance(dims[-1], int) else None


# -- what calibration, bias correction and dead channels may use ------------------------------
def _no_activation(node, index, weight_shape):
    # Quantized convolutions and QGemm: statistics on the float tensor behind the quantizer
    # are not wired for them (im2col of an integer operand); matrix ops have a rule below.
    return None


def _quantized_matrix_activation(weight_slot: int, zero_point: int):
    """``A @ W`` with ``A`` integers quantizing a float tensor (MatMulInteger,
    MatMulIntegerToFloat, QLinearMatMul): up to the scales, the op computes ``X @ W`` on the
    float ``X`` the quantizer read, so statistics are taken there (``quantized``), or on
    ``A - zero point`` (input ``zero_point``) where no quantizer is in the graph."""
    def activation(node, index, weight_shape):
        return (Activation(0, quantized=True, zero_point=zero_point) if index == weight_slot
                else None)
    return activation


def _float_matrix_activation(node, index, weight_shape):
    # DynamicQuantizeMatMul quantizes its float A itself: A is the activation as it is.
    return Activation(0) if index == 1 else None


def _no_bias(node, index):
    # QLinearConv's bias is int32 in accumulator units (x_scale * w_scale per channel); the
    # others have none (or add it after the float conversion): no per-row float mean shift.
    return None


def _accumulator_filter(node, bias, x):
    # MatMulInteger / ConvInteger output the integer accumulator itself: a zero row (zero
    # point 0, which their rules require) sums to exactly 0.
    return np.zeros(np.shape(bias))


def _unknown_filter(node, bias, x):
    # A zero filter row's output is requantized (QLinear ops) or scaled in-graph afterwards:
    # not a constant this pass can fold, so dead-channel removal keeps it unless unread.
    return np.full(np.shape(bias), np.nan)


def _float_out_masked_zero(bias_index: int):
    """com.microsoft DynamicQuantizeMatMul / MatMulIntegerToFloat: a masked weight column
    (its zero point, which their rules require to be 0) gives 0 after the scales, then the
    bias: exactly 0 where the bias operand is absent or 0 there."""
    def exact(node, ins) -> bool:
        v = ins[bias_index] if bias_index < len(ins) else None
        return v is None or not (np.isnan(v).any() or np.any(v))
    return exact


_INTEGER_OPS = ("MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv",
                f"{MS}:DynamicQuantizeMatMul", f"{MS}:MatMulIntegerToFloat", f"{MS}:QGemm")


# -- entries ------------------------------------------------------------------------------------
define(*_INTEGER_OPS, bias=_no_bias)
define("MatMulInteger", "ConvInteger", zero_filter=_accumulator_filter)
define(*(op for op in _INTEGER_OPS if op not in ("MatMulInteger", "ConvInteger")),
       zero_filter=_unknown_filter)
define("ConvInteger", "QLinearConv", f"{MS}:QGemm", activation=_no_activation)
define("MatMulInteger", activation=_quantized_matrix_activation(1, 2))
define(f"{MS}:MatMulIntegerToFloat", activation=_quantized_matrix_activation(1, 4))
define("QLinearMatMul", activation=_quantized_matrix_activation(3, 2))
define(f"{MS}:DynamicQuantizeMatMul", activation=_float_matrix_activation)
define("QuantizeLinear", "DequantizeLinear", weight_step=unchanged_step, axis_source=same_axis,
       channels=_qdq_channels)
define("DequantizeLinear", const=_dequantize_const)
define("DynamicQuantizeLinear", channels=_dynamic_quantize_channels)
define(f"{MS}:DynamicQuantizeMatMul", masked_zero=_float_out_masked_zero(4))
define(f"{MS}:MatMulIntegerToFloat", masked_zero=_float_out_masked_zero(6))
define("MatMulInteger", layout=_matrix_layout(1), macs=_matmul_macs(0, 1),
       channels=_matmul_like(0, 1, scalars=(2,), per_col=(3,), zp=3))
define("QLinearMatMul", layout=_matrix_layout(3), macs=_matmul_macs(0, 3),
       channels=_matmul_like(0, 3, scalars=(1, 2, 6, 7), per_col=(4, 5), zp=5))
define("ConvInteger", layout=_kernel_layout(1), macs=_conv_macs(1),
       channels=_conv_like(0, 1, None, scalars=(2,), per_out=(3,), zp=3))
define("QLinearConv", layout=_kernel_layout(3), macs=_conv_macs(3),
       channels=_conv_like(0, 3, 8, scalars=(1, 2, 6, 7), per_out=(4, 5), zp=5))
define(f"{MS}:DynamicQuantizeMatMul", f"{MS}:MatMulIntegerToFloat",
       output_like=_matmul_output(0, _n_from_weight))
define(f"{MS}:MatMulNBits", output_like=_matmul_output(0, lambda node, typed: attr(node, "N")))
define(f"{MS}:DynamicQuantizeMatMul", layout=_matrix_layout(1), macs=_matmul_macs(0, 1),
       channels=_matmul_like(0, 1, scalars=(), per_col=(2, 3), bias=4, zp=3))
define(f"{MS}:MatMulIntegerToFloat", layout=_matrix_layout(1), macs=_matmul_macs(0, 1),
       channels=_matmul_like(0, 1, scalars=(2, 4), per_col=(3, 5), bias=6, zp=5))
define(f"{MS}:MatMulNBits", channels=_nbits_channels, macs=_nbits_macs)
define(f"{MS}:QLinearGlobalAveragePool", channels=_qlinear_global_pool_channels,
       output_like=_qlinear_global_pool_output)
define(f"{MS}:QLinearAdd", f"{MS}:QLinearMul", channels=_qlinear_binary_channels,
       output_like=lambda node: (0,))
define(f"{MS}:QGemm", layout=_qgemm_layout, channels=_qgemm_channels, output_like=_qgemm_output,
       macs=lambda node, shapes: _gemm_macs(_View.plain(node, (0, 3), "Gemm"), shapes))
