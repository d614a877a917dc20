"""The recurrent family: LSTM, GRU, RNN.

Each op's entry: weight layout ``W[out, in]`` (``W``/``R`` per direction are ``[gates*H, in]``
and ``[gates*H, H]``: the rows of every gate and direction are ``out``, the last axis is the
reduction axis ``in``, so N:M groups run along the input / hidden-state features), the
activation operand of ``W`` (the sequence input ``X``; ``R`` reads the previous hidden state,
which is no graph tensor, so it has none), no bias slot (``B`` packs ``W``'s and ``R``'s biases),
the fold refusal and zero-filter value that keep dead-channel removal exact (a constant input
feature is not folded into ``B``; a unit with zero rows is no constant), the channel rule
(hidden units coupled across gates, directions and states), MAC formula.

Hidden units as channels. ONNX packs the gates of one direction along one axis, gate by gate
(LSTM ``iofc``, GRU ``zrh``, RNN one gate): hidden unit ``j`` is the rows ``j, H+j, 2H+j, ...``
of ``W [dirs, G*H, I]`` and ``R [dirs, G*H, H]``, the entries ``j + kH`` of
``B [dirs, 2*G*H]`` (``Wb`` then ``Rb``) and of the LSTM peepholes ``P [dirs, 3*H]``, column
``j`` of ``R`` (what the unit's previous output feeds into every gate), index ``j`` of the last
axis of ``initial_h``/``initial_c``/``Y_h``/``Y_c`` and of ``Y``. One unit is all of these, tied
with ``tie_map`` index lists (:func:`tie_blocks`). Both directions of a bidirectional layer share
``hidden_size``, so their tensors lose the same number of units: unit ``j`` is the pair
(forward ``j``, backward ``j``), one channel. The sequence input's feature axis is ``W``'s last
axis, like a MatMul's reduction axis, so the producer of ``X`` (a Conv, the previous layer's
``Y`` through Transpose/Reshape) loses the columns of ``W`` that read its removed channels.

Why removal is exact. Within one time step, every gate of unit ``j`` reads ``x`` through rows
``j (+kH)`` of ``W``, the previous state through rows ``j (+kH)`` of ``R``, the biases ``j
(+kH)`` and its own cell state (peepholes, ``c``); other units see ``h_j`` only through column
``j`` of ``R``. Masking a unit zeroes its rows, biases, states, ``R``'s column ``j`` and every
consumer's input slice, so whatever the unit then computes (an LSTM unit with zero rows is
``c = 0.5 c_prev``; a GRU unit ``h = 0.5 h_prev``; an RNN unit with a Sigmoid activation
``0.5``) is read by nobody: the masked model equals the one with the unit deleted, for every
activation, ``clip``, ``input_forget``, ``linear_before_reset`` and initial state. (With zero
biases and zero initial states a zeroed unit also outputs exactly 0 for the default
activations, but the exactness does not rely on it.) ``layout=1`` (batch first) moves only the
batch/sequence axes. The ``hidden_size`` attribute is rewritten on resize.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops._channel import BIAS, CONSUMER, PRODUCER, STAT, NodeCtx
from onnxprune.ops._channel import set_attr
from onnxprune.ops.layouts import Layout
from onnxprune.ops.registry import Activation, Shapes, define, numel, shape_in

#: Gates packed along W/R's rows, in ONNX order.
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# -- weight layout, activation ----------------------------------------------------------------
def _recurrent_layout(node, index, shape):
    # W [dirs, G*H, I] (input 1), R [dirs, G*H, H] (input 2): out = (dirs, G*H), in = last.
    if index not in (1, 2) or len(shape) != 3:
        return None
    return Layout(node.op_type, shape, (0, 1, 2), 2, out_axis=1, in_axis=2)


def _recurrent_activation(node, index, weight_shape):
    # W multiplies every time step of X ([seq, batch, I], or [batch, seq, I] with layout=1):
    # the rows of X are all (step, batch) positions, its columns the input features. R reads
    # the previous hidden state, which exists only inside the op.
    return Activation(0, rows_last=False) if index == 1 else None


def _recurrent_bias(node, index):
    # B [dirs, 2*G*H] packs W's biases (Wb) with R's (Rb) per direction: no [out] vector of
    # W2d's rows on its own, so bias correction and constant folds leave it alone.
    return None


def _recurrent_zero_filter(node, bias, x):
    # A unit whose W and R rows are all zero is no constant: its gates still read B, its own
    # cell/previous state and the activations (LSTM c = f c_prev + i g over the time steps), so
    # it is unknown here and dead-channel removal keeps it (it goes only when nobody reads it).
    return np.full(np.shape(bias), np.nan)


#: Activations that map 0 to 0: a unit whose inputs are all 0 keeps its state at 0 through them.
_ZERO_AT_ZERO = {"Tanh", "Relu", "LeakyRelu", "Softsign", "Elu", "ThresholdedRelu", "ScaledTanh"}
#: Per op: the number of activations per direction, and which of them must map 0 to 0 (LSTM's
#: cell input g and output h, GRU's candidate g, RNN's f); the defaults.
_STATE_ACTS = {"LSTM": (3, (1, 2), ["Sigmoid", "Tanh", "Tanh"]),
               "GRU": (2, (1,), ["Sigmoid", "Tanh"]), "RNN": (1, (0,), ["Tanh"])}


def _recurrent_masked_zero(node, ins) -> bool:
    """A removed hidden unit (its W and R rows zeroed, its B entries and initial states 0 or
    absent) outputs exactly 0 at every step: its gates see 0, so LSTM's ``c = f c + i g(0)``,
    GRU's ``h = (1 - z) g(0) + z h`` and RNN's ``f(0)`` stay 0 where those activations map 0
    to 0. Its B (3), initial_h (5) and initial_c (6) must be known zeros here."""
    op = "LSTM" if node.op_type == "DynamicQuantizeLSTM" else node.op_type
    if op not in _STATE_ACTS:
        return False
    count, must, default = _STATE_ACTS[op]
    acts = [a.decode() if isinstance(a, bytes) else str(a)
            for a in (attr(node, "activations", None) or [])] or default
    dirs = 2 if attr(node, "direction", "forward") == "bidirectional" else 1
    if len(acts) == count and dirs == 2:
        acts = acts * 2
    if len(acts) != count * dirs or any(acts[d * count + k] not in _ZERO_AT_ZERO
                                        for d in range(dirs) for k in must):
        return False
    for i in (3, 5, 6):
        v = ins[i] if i < len(ins) else None
        if v is not None and (np.isnan(v).any() or np.any(v)):
            return False
    return True


def _recurrent_fold(node, index, shape):
    if index == 2:
        return "R reads the hidden state, not a graph tensor a constant could come from"
    return ("a constant input feature would move into B's input half (Wb) per direction; that "
            "fold is not implemented")


# -- channel rule ------------------------------------------------------------------------------
def tie_blocks(ctx: NodeCtx, blocked, plain, blocks: int, size: int) -> None:
    """Tie axis ``blocked`` (``blocks`` consecutive blocks of ``size``) to axis ``plain`` (one
    block): index ``k*size + j`` of ``blocked`` is channel ``j`` of ``plain`` for every ``k``."""
    ia = np.arange(blocks * size, dtype=np.int64)
    ib = np.tile(np.arange(size, dtype=np.int64), blocks)
    ctx.tie_map(blocked, ia, plain, ib, blocks * size, size)


def _stored_role(ctx: NodeCtx, name: Optional[str], axis: int, role: str) -> None:
    if name is not None and ctx.is_const(name):
        ctx.role(name, axis, role)


def _recurrent_channels(ctx: NodeCtx, gate_axis: int = 1, in_axis: int = 2) -> Optional[tuple]:
    """The hidden-unit rule. ``W``/``R`` hold the gate rows on ``gate_axis`` and the input /
    hidden columns on ``in_axis`` (ONNX: 1 and 2; com.microsoft DynamicQuantizeLSTM stores them
    transposed, ``[dirs, I, G*H]``: 2 and 1). Returns ``(unit dim, gates, hidden)`` once tied."""
    op = "LSTM" if ctx.node.op_type == "DynamicQuantizeLSTM" else ctx.node.op_type
    gates = GATES[op]
    x, w, r, b = ctx.inp(0), ctx.inp(1), ctx.inp(2), ctx.inp(3)
    seq_lens, h0 = ctx.inp(4), ctx.inp(5)
    c0 = ctx.inp(6) if op == "LSTM" else None
    p = ctx.inp(7) if op == "LSTM" else None
    y, yh = ctx.out(0), ctx.out(1)
    yc = ctx.out(2) if op == "LSTM" else None
    ws, rs = ctx.shape(w), ctx.shape(r)
    if ws is None or rs is None or len(ws) != 3 or len(rs) != 3 or not all(
            isinstance(d, int) for d in tuple(ws) + tuple(rs)):
        return None  # finish() freezes every axis: the gate blocks cannot be told apart
    dirs, rows, hidden = rs[0], rs[gate_axis], rs[in_axis]
    if rows != gates * hidden or (ws[0], ws[gate_axis]) != (dirs, rows):
        ctx.freeze(w, None, f"W {list(ws)} / R {list(rs)} do not hold {gates} gates of "
                            f"{hidden} units")
        return None
    batch_first = bool(ctx.attr("layout", 0))
    # Axes of X / Y / the [dirs, batch, H] states, per layout.
    x_seq, x_batch = (1, 0) if batch_first else (0, 1)
    y_seq, y_dir, y_batch = (1, 2, 0) if batch_first else (0, 1, 2)
    s_dir, s_batch = (1, 0) if batch_first else (0, 1)

    # The hidden units: R's column axis is the anchor every other hidden axis maps onto.
    unit = (r, in_axis)
    _stored_role(ctx, r, in_axis, CONSUMER)
    _stored_role(ctx, r, gate_axis, PRODUCER)
    _stored_role(ctx, w, gate_axis, PRODUCER)
    tie_blocks(ctx, (r, gate_axis), unit, gates, hidden)
    tie_blocks(ctx, (w, gate_axis), unit, gates, hidden)
    if b is not None:
        _stored_role(ctx, b, 1, BIAS)
        tie_blocks(ctx, (b, 1), unit, 2 * gates, hidden)
    if p is not None:
        _stored_role(ctx, p, 1, BIAS)
        tie_blocks(ctx, (p, 1), unit, 3, hidden)
    # A computed all-zero initial state (ConstantOfShape -> Slice, as exporters write the
    # default) is dropped on resize instead: an absent initial state is zeros, exactly.
    dropped = [i for i, state in ((5, h0), (6, c0)) if state is not None and
               _zero_state(ctx, state)]
    for i in dropped:
        ctx.ok(ctx.inp(i))
    h0, c0 = (None if 5 in dropped else h0), (None if 6 in dropped else c0)
    for state in (h0, c0):
        if state is not None:
            _stored_role(ctx, state, 2, BIAS)
            ctx.tie((state, 2), unit)
    for out in (yh, yc):
        if out is not None:
            ctx.tie((out, 2), unit)
    if y is not None:
        ctx.tie((y, 3), unit)

    # The input features: W's last axis reads X's like a MatMul's reduction axis.
    ctx.tie((x, 2), (w, in_axis))
    _stored_role(ctx, w, in_axis, CONSUMER)

    # Directions (never channels: both keep the same hidden units) and batch / sequence.
    dir_axes = [(w, 0), (r, 0)] + [(t, 0) for t in (b, p) if t is not None] + \
        [(t, s_dir) for t in (h0, c0, yh, yc) if t is not None] + \
        ([(y, y_dir)] if y is not None else [])
    for a in dir_axes[1:]:
        ctx.tie(dir_axes[0], a)
    batch_axes = [(t, s_batch) for t in (h0, c0, yh, yc) if t is not None] + \
        ([(y, y_batch)] if y is not None else []) + \
        ([(seq_lens, 0)] if seq_lens is not None else [])
    for a in batch_axes:
        ctx.tie((x, x_batch), a)
    if y is not None:
        ctx.tie((x, x_seq), (y, y_seq))
    else:
        ctx.ok(x, x_seq)

    def hidden_size(node, rc, r=r, hidden=hidden, axis=in_axis, dropped=tuple(dropped)):
        new = rc.new_size(r, axis, hidden)
        if new != hidden:
            set_attr(node, "hidden_size", int(new))
            for i in dropped:
                node.input[i] = ""
    ctx.rewrite(hidden_size)
    return unit, gates, hidden


#: Ops that hand a computed zero state on unchanged in value (only its shape changes).
_ZERO_KEEPING = {"Slice", "Identity", "Cast", "Reshape", "Expand", "Squeeze", "Unsqueeze",
                 "Transpose", "Tile", "Gather"}


def _zero_state(ctx: NodeCtx, name: str) -> bool:
    """True when ``name`` is computed in-graph and provably all zeros: a ``ConstantOfShape``
    of 0 (its default), passed only through ops that keep the values' zeros."""
    for _ in range(16):
        node = ctx.b.index.producer(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "ConstantOfShape":
            value = attr(node, "value", None)
            return value is None or not np.any(onnx.numpy_helper.to_array(value))
        if node.op_type not in _ZERO_KEEPING or not node.input:
            return False
        name = node.input[0]
    return False


# -- MACs --------------------------------------------------------------------------------------
def _recurrent_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Per time step and batch row, every gate of every direction multiplies the input by W
    # [dirs, gates*H, I] and the hidden state by R [dirs, gates*H, H]: numel(W) + numel(R).
    # Element-wise gate math is not counted.
    x = shape_in(shapes, node, 0)
    w = shape_in(shapes, node, 1)
    r = shape_in(shapes, node, 2)
    if x is None or w is None or r is None or len(x) != 3:
        return None
    seq, batch = (x[1], x[0]) if attr(node, "layout", 0) else (x[0], x[1])
    return int(seq) * int(batch) * (numel(w) + numel(r))


define("LSTM", "GRU", "RNN", layout=_recurrent_layout, activation=_recurrent_activation,
       bias=_recurrent_bias, fold=_recurrent_fold, zero_filter=_recurrent_zero_filter,
       masked_zero=_recurrent_masked_zero, channels=_recurrent_channels, macs=_recurrent_macs)


# -- com.microsoft DynamicQuantizeLSTM ---------------------------------------------------------
# onnxruntime's dynamically quantized LSTM (quantize_dynamic of an LSTM): the LSTM's inputs with
# int8 ``W [dirs, I, 4H]`` / ``R [dirs, H, 4H]`` stored transposed, then their scales and zero
# points (inputs 8-11: per direction ``[dirs]`` or per gate row ``[dirs, 4H]``). X and the
# hidden state are quantized inside the op per tensor (the range always includes 0). The hidden
# units are the LSTM's (same gate order), so the LSTM rule runs with the axes swapped; per-row
# scales / zero points are sliced with the units. A masked unit (zero rows, biases) starting from
# a zero state outputs exactly 0 at every step, so the in-op quantization of the hidden state
# sees the same range without it: removal is exact. Weights with a nonzero zero point freeze
# (masking writes 0, see :mod:`onnxprune.ops.quant`).
def _dq_lstm_layout(node, index, shape):
    # W [dirs, I, 4H] (input 1), R [dirs, H, 4H] (input 2): out = (dirs, 4H), in = axis 1.
    if index not in (1, 2) or len(shape) != 3:
        return None
    return Layout(node.op_type, shape, (0, 2, 1), 2, out_axis=2, in_axis=1)


def _dq_lstm_channels(ctx: NodeCtx) -> None:
    from onnxprune.ops.quant import zero_point_issue

    pairs = ((ctx.inp(1), ctx.inp(8), ctx.inp(9)), (ctx.inp(2), ctx.inp(10), ctx.inp(11)))
    for weight, _, zp in pairs:
        issue = zero_point_issue(ctx.const(zp), zp is not None)
        if issue is not None:
            ctx.freeze(weight, None, f"quantized weight '{weight}': {issue}")
    tied = _recurrent_channels(ctx, gate_axis=2, in_axis=1)
    if tied is None:
        return
    unit, gates, hidden = tied
    for weight, scale, zp in pairs:
        for name in (scale, zp):
            shape = ctx.shape(name) if name else None
            if shape is None:
                continue
            ctx.tie((name, 0), (weight, 0))  # directions
            if len(shape) == 2:
                tie_blocks(ctx, (name, 1), unit, gates, hidden)
                if ctx.is_const(name):
                    ctx.role(name, 1, STAT)


def _dq_lstm_outputs(node):
    """Y ``[seq, dirs, batch, H]``, Y_h / Y_c ``[dirs, batch, H]`` (ONNX's shape inference does
    not know the op)."""
    def shape_of(typed, name):
        vi = typed.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in vi.type.tensor_type.shape.dim]

    def make(kind):
        def compute(typed):
            x = shape_of(typed, node.input[0])
            hidden = attr(node, "hidden_size", None)
            if not x or len(x) != 3 or hidden is None:
                return None
            dirs = 2 if attr(node, "direction", b"forward") == b"bidirectional" else 1
            state = [dirs, x[1], int(hidden)]
            dims = [x[0]] + state if kind == "y" else state
            return onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, dims)
        return compute
    return (make("y"), make("state"), make("state"))


define("com.microsoft:DynamicQuantizeLSTM", layout=_dq_lstm_layout,
       activation=_recurrent_activation, bias=_recurrent_bias, fold=_recurrent_fold,
       zero_filter=_recurrent_zero_filter, masked_zero=_recurrent_masked_zero,
       channels=_dq_lstm_channels, macs=_recurrent_macs,
       output_like=_dq_lstm_outputs)
