"""A seeded encoder/decoder pair as two models (onnx.helper only), shaped like torch exports of
a GRU seq2seq model: a bidirectional GRU encoder whose ``memory_out`` and ``hidden_out`` are the
decoder's ``memory`` and ``hidden``; a decoder step as an unrolled GRU cell (``Gemm`` gates cut
by torch's ``chunk(3, 1)``: ``Shape -> Gather -> Add -> Div -> Mul -> Slice``), attention over
the memory, and the new state as ``hidden_out``, fed back as ``hidden`` at the next step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from channel_models import G

SEQ, BATCH, FEAT, ENC, DEC, EMB, COMB, CLASSES = 5, 2, 8, 6, 10, 7, 9, 5
MEM = 2 * ENC


def _chunks(g: G, x: str, n: int = 3):
    """torch's ``x.chunk(n, dim=1)`` as exported: bounds from x's own size."""
    size = g.op("Gather", [g.op("Shape", [x]), g.c(np.array(1, np.int64))])
    step = g.op("Div", [g.op("Add", [size, g.c(np.array(n - 1, np.int64))]),
                        g.c(np.array(n, np.int64))])
    bounds = [g.c(np.array([0], np.int64))] + [
        g.op("Unsqueeze", [g.op("Mul", [step, g.c(np.array(k + 1, np.int64))]),
                           g.c(np.array([0], np.int64))]) for k in range(n)]
    axes = g.c(np.array([1], np.int64))
    return [g.op("Slice", [x, bounds[k], bounds[k + 1], axes]) for k in range(n)]


def encoder(seed: int = 0) -> onnx.ModelProto:
    g = G(seed)
    emb = g.op("MatMul", ["src", g.w([FEAT, EMB])])                       # [seq, B, EMB]
    y, _ = g.op("GRU", [emb, g.w([2, 3 * ENC, EMB]), g.w([2, 3 * ENC, ENC]),
                        g.w([2, 6 * ENC], 0.3)], n_out=2, hidden_size=ENC,
                direction="bidirectional")                                   # [seq, 2, B, ENC]
    t = g.op("Transpose", [y], perm=[0, 2, 1, 3])
    mem = g.op("Reshape", [t, g.c(np.array([SEQ, BATCH, MEM], np.int64))])
    g.nodes.append(onnx.helper.make_node("Transpose", [mem], ["memory_out"], perm=[1, 0, 2]))
    pooled = g.op("ReduceMean", ["memory_out"], axes=[1], keepdims=0)
    h = g.op("Tanh", [g.op("Gemm", [pooled, g.w([DEC, MEM]), g.w([DEC], 0.1)], transB=1)])
    h = g.op("Unsqueeze", [h, g.c(np.array([1], np.int64))])                # [B, 1, DEC]
    # torch's h.expand(-1, 1, -1): the target computed as Where(Equal(v, -1), 1s, v)
    v = g.c(np.array([-1, 1, -1], np.int64))
    ones = g.op("ConstantOfShape", [g.c(np.array([3], np.int64))],
                value=onnx.numpy_helper.from_array(np.array([1], np.int64)))
    target = g.op("Where", [g.op("Equal", [v, g.op("Mul", [ones, g.c(np.array(-1, np.int64))])]),
                            ones, v])
    g.nodes.append(onnx.helper.make_node("Expand", [h, target], ["hidden_out"]))
    f = TensorProto.FLOAT
    return g.typed_model("encoder", [("src", f, [SEQ, BATCH, FEAT])],
                         [("memory_out", f, [BATCH, SEQ, MEM]),
                          ("hidden_out", f, [BATCH, 1, DEC])])


def decoder(seed: int = 1) -> onnx.ModelProto:
    g = G(seed)
    h = g.op("Squeeze", ["hidden", g.c(np.array([1], np.int64))])          # [B, DEC]
    x = g.op("MatMul", ["token", g.w([FEAT, EMB])])
    gi = g.op("Gemm", [x, g.w([3 * DEC, EMB]), g.w([3 * DEC], 0.3)], transB=1)
    gh = g.op("Gemm", [h, g.w([3 * DEC, DEC]), g.w([3 * DEC], 0.3)], transB=1)
    ir, iz, i_n = _chunks(g, gi)
    hr, hz, hn = _chunks(g, gh)
    r = g.op("Sigmoid", [g.op("Add", [ir, hr])])
    z = g.op("Sigmoid", [g.op("Add", [iz, hz])])
    n = g.op("Tanh", [g.op("Add", [i_n, g.op("Mul", [r, hn])])])
    new = g.op("Add", [g.op("Mul", [g.op("Sub", [g.c(np.array(1.0, np.float32)), z]), n]),
                       g.op("Mul", [z, h])])                                 # [B, DEC]
    q = g.op("Unsqueeze", [g.op("MatMul", [new, g.w([DEC, MEM])]), g.c(np.array([1], np.int64))])
    scores = g.op("MatMul", [q, g.op("Transpose", ["memory"], perm=[0, 2, 1])])
    ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), "memory"])    # [B, 1, MEM]
    ctx = g.op("Squeeze", [ctx, g.c(np.array([1], np.int64))])
    cat = g.op("Concat", [new, ctx], axis=1)
    comb = g.op("Tanh", [g.op("Gemm", [cat, g.w([COMB, DEC + MEM]), g.w([COMB], 0.1)],
                                 transB=1)])
    g.nodes.append(onnx.helper.make_node("Gemm", [comb, g.w([CLASSES, COMB]),
                                                  g.w([CLASSES], 0.1)], ["logits"], transB=1))
    g.nodes.append(onnx.helper.make_node("Unsqueeze", [new, g.c(np.array([1], np.int64))],
                                         ["hidden_out"]))
    f = TensorProto.FLOAT
    return g.typed_model("decoder", [("token", f, [BATCH, FEAT]),
                                     ("memory", f, [BATCH, SEQ, MEM]),
                                     ("hidden", f, [BATCH, 1, DEC])],
                         [("logits", f, [BATCH, CLASSES]), ("hidden_out", f, [BATCH, 1, DEC])])


def greedy(run, enc, dec, src: np.ndarray, tokens: np.ndarray):
    """The decoder's logits at each step (teacher-forced ``tokens[k]``), its state fed back."""
    memory, hidden = run(enc, {"src": src})
    out = []
    for tok in tokens:
        logits, hidden = run(dec, {"token": tok, "memory": memory, "hidden": hidden})
        out.append(logits)
    return out
