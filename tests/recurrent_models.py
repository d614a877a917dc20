"""Seeded LSTM / GRU / RNN models for the recurrent tests (onnx.helper only, no torch).

Every builder returns ``(model, layers)``: ``layers`` lists, per recurrent node, its op, the
number of directions, hidden size, input width and which optional inputs it has, so tests can
compute the parameter counts a removal must leave.
"""

from __future__ import annotations

import numpy as np

from channel_models import G

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SEQ, BATCH, FEAT = 5, 2, 8


def recurrent(g: G, op: str, x: str, width: int, hidden: int, dirs: int = 1, *,
              bias: bool = True, states: bool = False, peepholes: bool = False,
              batch_first: bool = False, outputs: int = 2, **attrs):
    """One recurrent node reading ``x`` (``width`` features); returns its outputs."""
    gates = GATES[op]
    ins = [x, g.w([dirs, gates * hidden, width]), g.w([dirs, gates * hidden, hidden])]
    ins.append(g.w([dirs, 2 * gates * hidden], 0.3) if bias else "")
    if states or peepholes:
        ins.append("")  # sequence_lens
        shape = [BATCH, dirs, hidden] if batch_first else [dirs, BATCH, hidden]
        ins.append(g.w(shape, 0.5) if states else "")
        if op == "LSTM":
            ins.append(g.w(shape, 0.5) if states else "")
            if peepholes:
                ins.append(g.w([dirs, 3 * hidden], 0.3))
    while ins and ins[-1] == "":
        ins.pop()
    if dirs == 2:
        attrs["direction"] = "bidirectional"
    if batch_first:
        attrs["layout"] = 1
    return g.op(op, ins, n_out=outputs, hidden_size=hidden, **attrs)


def merge_directions(g: G, y: str, dirs: int, hidden: int, seq: int = SEQ,
                     batch: int = BATCH) -> str:
    """``Y [seq, dirs, batch, H]`` -> ``[seq, batch, dirs*H]`` as exporters write it."""
    t = g.op("Transpose", [y], perm=[0, 2, 1, 3])
    return g.op("Reshape", [t, g.c(np.array([seq, batch, dirs * hidden], np.int64))])


def classifier(g: G, x: str, width: int, classes: int = 3, gemm: bool = False) -> str:
    if gemm:
        flat = g.op("Reshape", [x, g.c(np.array([-1, width], np.int64))])
        return g.op("Gemm", [flat, g.w([classes, width]), g.w([classes], 0.1)], transB=1)
    return g.op("Add", [g.op("MatMul", [x, g.w([width, classes])]), g.w([classes], 0.1)])


def single(op: str, dirs: int, hidden: int = 6, gemm: bool = False, seed: int = 0, **kw):
    """MatMul embedding -> one recurrent layer -> directions merged -> classifier."""
    g = G(seed)
    width = 7
    x = g.op("MatMul", ["x", g.w([FEAT, width])])
    y = recurrent(g, op, x, width, hidden, dirs, **kw)[0]
    if kw.get("batch_first"):
        y = g.op("Transpose", [y], perm=[1, 0, 2, 3])  # back to [seq, dirs, batch, H]
    if dirs == 1:
        feat = g.op("Squeeze", [y, g.c(np.array([1], np.int64))])
    else:
        feat = merge_directions(g, y, dirs, hidden)
    out = classifier(g, feat, dirs * hidden, gemm=gemm)
    return g.model([("x", [SEQ, BATCH, FEAT])], [out])


def stacked_bilstm(hidden=(6, 5), seed: int = 0, gemm: bool = True):
    """Two BiLSTM layers with Transpose+Reshape between them, then a Gemm classifier."""
    g = G(seed)
    width = 7
    x = g.op("MatMul", ["x", g.w([FEAT, width])])
    y1 = recurrent(g, "LSTM", x, width, hidden[0], 2)[0]
    f1 = merge_directions(g, y1, 2, hidden[0])
    y2 = recurrent(g, "LSTM", f1, 2 * hidden[0], hidden[1], 2)[0]
    f2 = merge_directions(g, y2, 2, hidden[1])
    out = classifier(g, f2, 2 * hidden[1], gemm=gemm)
    return g.model([("x", [SEQ, BATCH, FEAT])], [out])


def last_state_classifier(op: str = "GRU", hidden: int = 6, seed: int = 0):
    """A bidirectional layer whose ``Y_h`` feeds the classifier (Y unused)."""
    g = G(seed)
    width = 7
    x = g.op("MatMul", ["x", g.w([FEAT, width])])
    yh = recurrent(g, op, x, width, hidden, 2)[1]
    t = g.op("Transpose", [yh], perm=[1, 0, 2])
    flat = g.op("Reshape", [t, g.c(np.array([BATCH, 2 * hidden], np.int64))])
    out = g.op("Gemm", [flat, g.w([3, 2 * hidden]), g.w([3], 0.1)], transB=1)
    return g.model([("x", [SEQ, BATCH, FEAT])], [out])
