"""Transformer pieces around the heads: RMSNorm (``Pow -> ReduceMean -> Add -> Sqrt -> Div`` and
``SimplifiedLayerNormalization``) follows the residual stream where its removed channels are 0
(more in tests/channels/test_residual.py); the
FFN hidden width with SiLU gating (``up * x*sigmoid(x)``) is one group across up/gate/down,
masked == resized; a tied embedding table (Gather + LM head) is left alone by both readers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights
from channel_models import G, assert_close, masked_and_resized, run

D, F, T = 16, 24, 5


def rms_ffn(norm: str = "decomposed"):
    """x -> RMSNorm -> SiLU-gated FFN (gate, up, down) + residual -> RMSNorm -> MatMul -> y."""
    g = G(3)

    def rmsnorm(x):
        if norm == "simplified":
            return g.op("SimplifiedLayerNormalization", [x, g.w([D], positive=True)], axis=-1,
                        epsilon=1e-6)
        ms = g.op("ReduceMean", [g.op("Pow", [x, g.c(np.float32(2.0))])], axes=[-1])
        rms = g.op("Sqrt", [g.op("Add", [ms, g.c(np.float32(1e-6))])])
        return g.op("Mul", [g.op("Div", [x, rms]), g.w([D], positive=True)])

    x = g.op("MatMul", ["x", g.w([D, D])])  # the stream starts at a weight, not the input
    n = rmsnorm(x)
    gate = g.op("MatMul", [n, g.w([D, F])])
    up = g.op("MatMul", [n, g.w([D, F])])
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    h = g.op("Mul", [silu, up])
    r = g.op("Add", [g.op("MatMul", [h, g.w([F, D])]), x])
    y = g.op("MatMul", [rmsnorm(r), g.w([D, 7])])
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(g.nodes, "rms", [vi("x", TensorProto.FLOAT, [1, T, D])],
                              [vi(y, TensorProto.FLOAT, [1, T, 7])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if norm != "simplified":  # an onnxruntime op the onnx checker does not know
        onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("norm", ["decomposed", "simplified"])
def test_rmsnorm_follows_the_residual_and_ffn_is_one_group(norm):
    """The stream starts at a weight and every writer zeroes a removed channel, so the RMSNorms
    (decomposed or one op) follow it: the residual width is a prunable group, masked ==
    resized."""
    model = rms_ffn(norm)
    graph = build_channel_graph(load(model))
    ffn = [g for g in graph.groups if g.size == F]
    assert len(ffn) == 1 and ffn[0].prunable
    assert len(ffn[0].producers) == 2 and len(ffn[0].consumers) == 1  # gate, up | down
    residual = [g for g in graph.groups if g.size == D and g.producers]
    assert len(residual) == 1 and residual[0].prunable
    assert len(residual[0].producers) == 2 and len(residual[0].consumers) == 3
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.25)
    x = {"x": np.random.default_rng(0).standard_normal((1, T, D)).astype(np.float32)}
    assert_close(run(resized, x), run(masked, x))
    assert shapes[residual[0].producers[0]][1][1] == D - D // 4


def test_swiglu_ffn_masked_equals_resized():
    model = rms_ffn()
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    x = {"x": np.random.default_rng(0).standard_normal((1, T, D)).astype(np.float32)}
    assert_close(run(resized, x), run(masked, x))
    # the residual width (through both RMSNorms) goes too
    assert sorted(after for before, after in shapes.values() if before == (D, F)) == \
        [(D // 2, F // 2)] * 2
    assert [after for before, after in shapes.values() if before == (F, D)] == \
        [(F // 2, D // 2)]


def test_tied_embedding_loses_only_what_both_readers_agree_with():
    """A table read by Gather (token embedding) and by the LM head MatMul (transposed) is no
    prunable weight of its own (the Gather reads it too); its hidden axis follows the residual
    group, so a column goes from both readers at once (masked == resized), and its vocabulary
    axis (the logits) stays."""
    vocab = 11
    g = G(4)
    table = g.w([vocab, D], name="table")
    e = g.op("Gather", [table, "ids"], axis=0)
    h = g.op("Add", [g.op("MatMul", [g.op("Relu", [g.op("MatMul", [e, g.w([D, F])])]),
                                     g.w([F, D])]), e])
    logits = g.op("MatMul", [h, g.op("Transpose", [table], perm=[1, 0])])
    model = g.typed_model("lm", [("ids", TensorProto.INT64, [1, T])],
                          [(logits, TensorProto.FLOAT, [1, T, vocab])])
    weights, skipped = find_weights(load(model))
    assert "table" not in {w.name for w in weights}
    assert "Gather" in next(s.reason for s in skipped if s.name == "table")
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.25)
    assert shapes["table"] == ((vocab, D), (vocab, D - D // 4))
    ids = {"ids": np.array([[1, 4, 0, 10, 7]], np.int64)}
    out = run(resized, ids)
    assert out[0].shape == (1, T, vocab)
    assert_close(out, run(masked, ids))
