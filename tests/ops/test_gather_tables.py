"""Tables read by ``Gather`` (onnxprune/ops/shape.py ``_gather``): T5's relative position bias
(a [buckets, heads] table gathered, transposed, sliced with a run-time ``-seq`` start and added
onto every layer's scores) goes with the heads; an embedding table tied to an LM head is pruned
only as both readers agree; a Slice with run-time bounds keeps the axes it does not slice."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.model.io import load
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.shapevec import complete_shapes
from channel_models import G, masked_and_resized_with_graph

D, H, HD, T, BUCKETS, MAXS = 32, 4, 8, 6, 16, 12


def _dim(g: G, x: str, axis: int) -> str:
    """Unsqueeze(Gather(Shape(x), axis)): a [1] vector holding x's size on ``axis``."""
    s = g.op("Shape", [x])
    return g.op("Unsqueeze", [g.op("Gather", [s, g.c(np.int64(axis))], axis=0),
                              g.c(np.array([0], np.int64))])


def run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def masked_and_resized(model, sparsity, shapes):
    return masked_and_resized_with_graph(model, shapes, sparsity=sparsity)


def t5_attention(layers: int = 2, seed: int = 0, decoder: bool = False) -> onnx.ModelProto:
    """x[batch, seq, 32] -> ``layers`` blocks of 4-head attention without biases whose scores
    get one position bias computed once (as T5 exports it): ``table[buckets, heads]`` gathered
    by a [seq, seq] bucket matrix (a slice of a constant one), Transpose(2, 0, 1), Unsqueeze(0),
    then ``bias[:, :, -seq:, :]`` (start ``Neg(Shape(x)[1])``) and Add onto each layer's
    scores. ``decoder`` adds what T5's decoder export writes: a causal mask expanded by
    torch's ``expand(b, 1, -1, -1)`` (target ``Where(Equal(v, -1), 1s, v)``), the keys passed
    through a one-input Concat on the sequence axis (the KV cache's), and the cross-attention
    style ``zeros(1, heads, seq, seq)`` bias from ConstantOfShape on a computed shape."""
    g = G(seed)
    seq = _dim(g, "x", 1)
    mask = None
    if decoder:
        s1 = g.op("Squeeze", [seq, g.c(np.array([0], np.int64))])
        rng = g.op("Range", [g.c(np.int64(0)), s1, g.c(np.int64(1))])
        causal = g.op("Cast", [g.op("Greater", [rng, g.op("Unsqueeze", [
            rng, g.c(np.array([1], np.int64))])])], to=TensorProto.FLOAT)
        causal = g.op("Mul", [causal, g.c(np.float32(-1e4))])
        causal = g.op("Unsqueeze", [causal, g.c(np.array([0, 1], np.int64))])
        v = g.op("Reshape", [g.op("Concat", [_dim(g, "x", 0), g.c(np.array([1, -1, -1],
                                                                            np.int64))],
                                  axis=0), g.c(np.array([-1], np.int64))])
        ones = g.op("ConstantOfShape", [g.op("Shape", [v])],
                    value=onnx.numpy_helper.from_array(np.array([1], np.int64)))
        minus = g.op("Mul", [ones, g.c(np.int64(-1))])
        target = g.op("Where", [g.op("Equal", [v, minus]), ones, v])
        mask = g.op("Expand", [causal, target])
    r = np.random.default_rng(seed + 1)
    buckets = g.c(r.integers(0, BUCKETS, (MAXS, MAXS)).astype(np.int64), name="buckets")
    zero2 = g.c(np.array([0, 0], np.int64))
    ends = g.op("Concat", [seq, seq], axis=0)
    idx = g.op("Slice", [buckets, zero2, ends, g.c(np.array([0, 1], np.int64))])
    table = g.w([BUCKETS, H], 0.5, name="relative_attention_bias")
    bias = g.op("Unsqueeze", [g.op("Transpose", [g.op("Gather", [table, idx])], perm=[2, 0, 1]),
                              g.c(np.array([0], np.int64))])
    neg = g.op("Neg", [g.op("Gather", [g.op("Shape", ["x"]), g.c(np.int64(1))], axis=0)])
    bias = g.op("Slice", [bias, g.op("Unsqueeze", [neg, g.c(np.array([0], np.int64))]),
                          g.c(np.array([2 ** 63 - 1], np.int64)), g.c(np.array([2], np.int64)),
                          g.c(np.array([1], np.int64))])

    def heads(y):
        target = g.op("Concat", [_dim(g, "x", 0), seq, g.c(np.array([-1, HD], np.int64))],
                      axis=0)
        return g.op("Transpose", [g.op("Reshape", [y, target])], perm=[0, 2, 1, 3])

    x = "x"
    for _ in range(layers):
        q, k, v = (heads(g.op("MatMul", [x, g.w([D, D])])) for _ in range(3))
        if decoder:
            k = g.op("Concat", [k], axis=2)
        s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        s = g.op("Add", [s, bias])
        if decoder:
            zeros = g.op("ConstantOfShape", [g.op("Concat", [
                g.c(np.array([1, H], np.int64)), seq, seq], axis=0)],
                value=onnx.numpy_helper.from_array(np.array([0], np.float32)))
            s = g.op("Add", [g.op("Add", [s, mask]), zeros])
        s = g.op("Softmax", [s], axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [s, v])], perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, g.op("Concat", [_dim(g, "x", 0), seq,
                                                g.c(np.array([-1], np.int64))], axis=0)])
        x = g.op("Add", [g.op("MatMul", [o, g.w([D, D])]), x])
    io = ("x", TensorProto.FLOAT, ["batch", "seq", D])
    return g.typed_model("t5", [io], [(x,) + io[1:]])


@pytest.mark.parametrize("decoder", [False, True])
@pytest.mark.parametrize("shapes", [None, {"x": [1, T, D]}])
def test_relative_position_bias_goes_with_the_heads(shapes, decoder):
    """Head h of every layer reads column h of the one bias table: one group of H units with
    the Q/K/V of both layers as producers, the table a (stored) member on its heads axis."""
    graph = build_channel_graph(load(t5_attention(decoder=decoder)), shapes)
    heads = [g for g in graph.groups if g.size == H]
    assert len(heads) == 1 and heads[0].prunable, [(g.size, g.frozen) for g in graph.groups]
    assert len(heads[0].producers) == 6  # q, k, v of two layers
    table = [m for m in heads[0].members if m.tensor == "relative_attention_bias"]
    assert [(m.axis, m.stored, m.index_map.ravel().tolist()) for m in table] == \
        [(1, True, list(range(H)))]
    assert "bias" in table[0].roles


@pytest.mark.parametrize("decoder", [False, True])
def test_relative_position_bias_masked_equals_resized(decoder):
    model = t5_attention(decoder=decoder)
    graph, masked, resized, removed, shapes = masked_and_resized(model, 0.5, {"x": [1, T, D]})
    onnx.checker.check_model(resized, full_check=True)
    gid = next(g.id for g in graph.groups if g.size == H)
    assert len(removed[gid]) == H // 2
    assert shapes["relative_attention_bias"] == ((BUCKETS, H), (BUCKETS, H // 2))
    kept = sorted(set(range(H)) - set(int(u) for u in removed[gid]))
    table = {t.name: onnx.numpy_helper.to_array(t) for t in resized.graph.initializer}
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(table["relative_attention_bias"],
                                  original["relative_attention_bias"][:, kept])
    r = np.random.default_rng(3)
    for b, s in ((1, T), (2, 9), (1, 1)):  # any sequence: the slice start is read at run time
        x = r.standard_normal((b, s, D)).astype(np.float32)
        want, got = run(masked, x), run(resized, x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        assert not np.allclose(run(model, x), want, atol=1e-3)


def test_refine_shapes_solves_a_negative_sequence_start():
    """``bias[:, :, -seq:, :]`` over an axis of size seq is the whole axis (a symbol or not)."""
    model = t5_attention(layers=1)
    slices = [n for n in model.graph.node if n.op_type == "Slice"]
    for shapes, s in ((None, "seq"), ({"x": [1, T, D]}, T)):
        got = infer_shapes(model, shapes, upgrade=False, complete=complete_shapes)
        assert got.get(slices[-1].output[0]) == (1, H, s, s)
        out = model.graph.output[0].name
        assert got.get(out)[1:] == (s, D)


def test_slice_with_run_time_bounds_ties_the_axes_it_keeps():
    """A Slice whose start is computed keeps axes 0 and 2 whole: the channel axis (2) is tied
    through it (prunable), the sliced one frozen."""
    g = G(4)
    y = g.op("MatMul", ["x", g.w([D, 16])])
    neg = g.op("Neg", [g.op("Gather", [g.op("Shape", ["x"]), g.c(np.int64(1))], axis=0)])
    half = g.op("Div", [neg, g.c(np.int64(2))])  # a start no shape rule evaluates
    y = g.op("Slice", [y, g.op("Unsqueeze", [half, g.c(np.array([0], np.int64))]),
                       g.c(np.array([2 ** 63 - 1], np.int64)), g.c(np.array([1], np.int64))])
    y = g.op("MatMul", [g.op("Relu", [y]), g.w([16, D])])
    model = g.model([("x", [1, T, D])], [y])
    graph = build_channel_graph(load(copy.deepcopy(model)), {"x": [1, T, D]})
    hidden = [g for g in graph.groups if g.size == 16]
    assert len(hidden) == 1 and hidden[0].prunable
    _, masked, resized, removed, _ = masked_and_resized(model, 0.5, {"x": [1, T, D]})
    x = np.random.default_rng(1).standard_normal((1, T, D)).astype(np.float32)
    np.testing.assert_allclose(run(resized, x), run(masked, x), atol=1e-5, rtol=1e-4)


def test_embedding_tied_to_lm_head_is_pruned_as_both_readers_agree():
    """One [vocab, hidden] table read by Gather (embedding) and by MatMul through Transpose (LM
    head): its hidden axis is one dim, so the embedding's columns and the head's input rows are
    the same channels; masking zeroes the table's columns (a float table is a bias-like
    parameter) and resized == masked."""
    vocab, hid = 20, 16
    g = G(6)
    table = g.w([vocab, hid], 1.0, name="embed")
    e = g.op("Gather", [table, "ids"])
    h = g.op("Relu", [g.op("Add", [g.op("MatMul", [e, g.w([hid, hid])]), g.w([hid], 0.1)])])
    h = g.op("MatMul", [h, g.w([hid, hid])])
    logits = g.op("MatMul", [h, g.op("Transpose", [table], perm=[1, 0])])
    model = g.typed_model("lm", [("ids", TensorProto.INT64, [1, T])],
                          [(logits, TensorProto.FLOAT, [1, T, vocab])])
    masked = load(copy.deepcopy(model))
    cg = build_channel_graph(masked, None)
    stream = [grp for grp in cg.groups
              if any(m.tensor == "embed" and m.axis == 1 for m in grp.members)]
    # The embedding's hidden axis and the LM head's input axis: one dim of one stored tensor.
    assert len(stream) == 1
    embed = [m for m in stream[0].members if m.tensor == "embed"]
    assert [m.axis for m in embed] == [1] and "bias" in embed[0].roles
    assert stream[0].prunable
    shapes = {"ids": [1, T]}
    mask_channels(masked, {stream[0].id: np.array([1, 4, 9])}, cg)
    arr = onnx.numpy_helper.to_array(next(t for t in masked.model.graph.initializer
                                          if t.name == "embed"))
    assert not arr[:, [1, 4, 9]].any() and arr[:, 0].all()
    resized = load(copy.deepcopy(masked.model))
    cg2 = build_channel_graph(resized, shapes)
    sizes = resize_channels(resized, cg2, {stream[0].id: np.array([1, 4, 9])})
    assert sizes["embed"] == ((vocab, hid), (vocab, hid - 3))
    ids = np.random.default_rng(0).integers(0, vocab, (1, T)).astype(np.int64)
    outs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            .run(None, {"ids": ids})[0] for m in (masked.model, resized.model)]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-4)


def torch_mha(seed: int = 2) -> onnx.ModelProto:
    """What torch's ``nn.MultiheadAttention`` (seq-first) exports: one in-projection [32, 96] ->
    view(s, b, 3, 32) -> unsqueeze(0).transpose(0, -2).squeeze(-2) -> Gather 0/1/2 -> q, k, v
    viewed as [s, b*4, 8]; a key padding mask [b, s] viewed [b, 1, 1, s] and Expanded over the
    heads to [b, 4, 1, s] (a constant target) then viewed [b*4, 1, s] and added to the
    scores."""
    g = G(seed)
    B, S = 1, T
    qkv = g.op("Add", [g.op("MatMul", ["x", g.w([D, 3 * D])]), g.w([3 * D], 0.1)])
    t = g.op("Reshape", [qkv, g.c(np.array([S, B, 3, D], np.int64))])
    t = g.op("Unsqueeze", [t, g.c(np.array([0], np.int64))])
    t = g.op("Transpose", [t], perm=[3, 1, 2, 0, 4])
    t = g.op("Squeeze", [t, g.c(np.array([-2], np.int64))])
    q, k, v = (g.op("Transpose", [g.op("Reshape", [
        g.op("Gather", [t, g.c(np.int64(i))], axis=0), g.c(np.array([S, B * H, HD], np.int64))])],
        perm=[1, 0, 2]) for i in range(3))
    mask = g.op("Reshape", ["m", g.c(np.array([B, 1, 1, S], np.int64))])
    mask = g.op("Expand", [mask, g.c(np.array([B, H, 1, S], np.int64))])
    mask = g.op("Reshape", [mask, g.c(np.array([B * H, 1, S], np.int64))])
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])
    s = g.op("Softmax", [g.op("Add", [s, mask])], axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [s, v])], perm=[1, 0, 2])
    o = g.op("Reshape", [o, g.c(np.array([S, B, D], np.int64))])
    y = g.op("Add", [g.op("MatMul", [o, g.w([D, D])]), "x"])
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(g.nodes, "mha", [vi("x", TensorProto.FLOAT, [S, B, D]),
                                               vi("m", TensorProto.FLOAT, [B, S])],
                              [vi(y, TensorProto.FLOAT, [S, B, D])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_torch_multihead_attention_heads_through_squeeze_and_an_expanded_mask():
    """The 3 of the fused projection reaches its Gathers through Unsqueeze/Transpose/Squeeze
    (a stacking axis, no channels); the padding mask expanded over the heads takes the heads'
    channels (its Expand target entry is rewritten): heads are units and masked == resized."""
    model = torch_mha()
    shapes = {"x": [T, 1, D], "m": [1, T]}
    graph, masked, resized, removed, sizes = masked_and_resized(model, 0.5, shapes)
    heads = [grp for grp in graph.groups if grp.size == H]
    assert len(heads) == 1 and heads[0].prunable, [(grp.size, grp.frozen) for grp in graph.groups]
    assert len(removed[heads[0].id]) == H // 2
    assert sorted(after for before, after in sizes.values() if before == (D, 3 * D)) == \
        [(D, 3 * D // 2)]
    expand = next(n for n in resized.graph.node if n.op_type == "Expand")
    target = next(t for t in resized.graph.initializer if t.name == expand.input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [1, H // 2, 1, T]
    r = np.random.default_rng(0)

    def run2(m, x, pad):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]
                                    ).run(None, {"x": x, "m": pad})[0]

    for _ in range(2):
        x = r.standard_normal((T, 1, D)).astype(np.float32)
        pad = np.where(r.random((1, T)) < 0.3, -1e4, 0).astype(np.float32)
        np.testing.assert_allclose(run2(resized, x, pad), run2(masked, x, pad), atol=1e-5,
                                   rtol=1e-4)
        assert not np.allclose(run2(model, x, pad), run2(masked, x, pad), atol=1e-3)


@pytest.mark.parametrize("fill,prunable", [(0.0, True), (1.0, False)])
def test_constant_of_shape_takes_channels_only_as_a_zero_fill(fill, prunable):
    """``h + fill`` over a computed [batch, seq, 16] shape: a zero fill adds nothing to any
    channel (the 16 stay prunable, masked == resized); a nonzero one is a value per channel."""
    g = G(7)
    h = g.op("Relu", [g.op("MatMul", ["x", g.w([D, 16])])])
    shape = g.op("Concat", [_dim(g, "x", 0), _dim(g, "x", 1), g.c(np.array([16], np.int64))],
                 axis=0)
    fillv = g.op("ConstantOfShape", [shape],
                 value=onnx.numpy_helper.from_array(np.array([fill], np.float32)))
    y = g.op("MatMul", [g.op("Add", [h, fillv]), g.w([16, D])])
    model = g.model([("x", [1, T, D])], [y])
    shapes = {"x": [1, T, D]}
    graph = build_channel_graph(load(copy.deepcopy(model)), shapes)
    assert [grp.prunable for grp in graph.groups if grp.size == 16] == [prunable]
    if prunable:
        _, masked, resized, removed, _ = masked_and_resized(model, 0.5, shapes)
        assert any(n.op_type == "Where" for n in resized.graph.node)  # the 16 overridden
        x = np.random.default_rng(2).standard_normal((1, T, D)).astype(np.float32)
        np.testing.assert_allclose(run(resized, x), run(masked, x), atol=1e-5, rtol=1e-4)


def svtr_attention(seed: int = 5) -> onnx.ModelProto:
    """SVTR/timm style attention on a LayerNorm'ed stream whose reshape targets read the stream
    width ``C = x.shape[2]``: qkv viewed (B, N, 3, H, C // H), heads merged back with
    reshape(B, N, C) (C from the stream, not from the attention output)."""
    g = G(seed)
    x = g.op("LayerNormalization", ["x", g.w([D], positive=True), g.w([D], 0.1)], axis=-1)
    b, n = _dim(g, x, 0), _dim(g, x, 1)
    c = g.op("Gather", [g.op("Shape", [x]), g.c(np.int64(2))], axis=0)
    hd = g.op("Unsqueeze", [g.op("Div", [c, g.c(np.int64(H))]), g.c(np.array([0], np.int64))])
    c1 = g.op("Unsqueeze", [c, g.c(np.array([0], np.int64))])
    qkv = g.op("MatMul", [x, g.w([D, 3 * D])])
    shape = g.op("Concat", [b, n, g.c(np.array([3, H], np.int64)), hd], axis=0)
    t = g.op("Transpose", [g.op("Reshape", [qkv, shape])], perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op("Gather", [t, g.c(np.int64(i))], axis=0) for i in range(3))
    att = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])],
               axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.op("Concat", [b, n, c1], axis=0)])
    y = g.op("Add", [g.op("MatMul", [o, g.w([D, D])]), x])
    io = ("x", TensorProto.FLOAT, ["batch", "seq", D])
    return g.typed_model("svtr", [io], [(y,) + io[1:]])


def test_heads_merged_back_with_the_stream_width_read_at_run_time():
    """The targets read the stream's width (and C // H from it): that width is pinned (frozen,
    with the reason) and the entries become constants overridden on resize, so the heads are
    units of their own and masked == resized."""
    model = svtr_attention()
    shapes = {"x": [1, T, D]}
    graph, masked, resized, removed, sizes = masked_and_resized(model, 0.5, shapes)
    heads = [grp for grp in graph.groups if grp.size == H]
    assert len(heads) == 1 and heads[0].prunable, [(grp.size, grp.frozen) for grp in graph.groups]
    assert [grp.prunable for grp in graph.groups if grp.size == D] == [False]  # the stream
    assert sizes[heads[0].producers[0]] == ((D, 3 * D), (D, 3 * D // 2))
    assert sum(1 for n in resized.graph.node if n.op_type == "Where") == 2  # H, the merge C
    r = np.random.default_rng(4)
    for b, s in ((1, T), (2, 3)):
        x = r.standard_normal((b, s, D)).astype(np.float32)
        np.testing.assert_allclose(run(resized, x), run(masked, x), atol=1e-5, rtol=1e-4)
        assert not np.allclose(run(model, x), run(masked, x), atol=1e-3)
