"""Attention heads when the reshapes' targets are computed by ``Shape -> Gather -> Unsqueeze ->
Concat`` subgraphs (as torch exports write ``x.view(b, s, -1, hd)``): the subgraph is evaluated
statically, heads are removed as units across Q, K, V and the output projection, and every
shape constant that carries a head count is overridden exactly (never edited in place when
shared)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.select import select_channels
from onnxprune.model.io import load
from onnxprune.ops.shapevec import DimRef, reshape_output, shape_vector
from channel_models import G, masked_and_resized_with_graph

D, H, HD, T = 32, 4, 8, 6
SHAPES = {"x": [1, T, D]}


def _dim(g: G, x: str, axis: int) -> str:
    """Unsqueeze(Gather(Shape(x), axis)): a [1] vector holding x's size on ``axis``."""
    s = g.op("Shape", [x])
    return g.op("Unsqueeze", [g.op("Gather", [s, g.c(np.int64(axis))], axis=0),
                              g.c(np.array([0], np.int64))])


def transposed_keys(g: G, k: str) -> str:
    """Kᵀ as torch's SDPA export writes it: view(-1, s, hd) (batch and heads merged), transpose,
    view back to [b, h, hd, s] from slices of Shape(k)."""
    sh = g.op("Shape", [k])
    last = g.op("Slice", [sh, g.c(np.array([-1], np.int64)), g.c(np.array([2**63 - 1]))])
    mid = g.op("Slice", [sh, g.c(np.array([-2], np.int64)), g.c(np.array([-1], np.int64))])
    front = g.op("Slice", [sh, g.c(np.array([-2**63], np.int64)), g.c(np.array([-2], np.int64))])
    k3 = g.op("Reshape", [k, g.op("Concat", [g.c(np.array([-1], np.int64)), mid, last], axis=0)])
    kt = g.op("Transpose", [k3], perm=[0, 2, 1])
    return g.op("Reshape", [kt, g.op("Concat", [front, last, mid], axis=0)])


def attention_dynamic(style: str = "minus_one", layers: int = 1, seed: int = 0,
                      merged_keys: bool = False):
    """x[batch, seq, 32] -> ``layers`` blocks of 4-head attention + GELU FFN, reshapes built at
    run time. ``style``: "minus_one" (``view(b, s, -1, 8)``, merge ``view(b, s, -1)``), "count"
    (``view(b, s, 4, -1)``, merge ``view(b, s, 32)``: head count and width as constants),
    "shared" (like count, one head-count initializer and one target vector shared by every
    reshape of every layer), "constant_node" (the head count from a Constant node)."""
    g = G(seed)
    x = "x"
    shared = {}

    def split_target(y):
        b, s = _dim(g, "x", 0), _dim(g, "x", 1)
        if style == "minus_one":
            return g.op("Concat", [b, s, g.c(np.array([-1], np.int64)),
                                   g.c(np.array([HD], np.int64))], axis=0)
        if style == "constant_node":
            count = g.op("Constant", [], value=numpy_helper.from_array(np.array([H], np.int64)))
            return g.op("Concat", [b, s, count, g.c(np.array([-1], np.int64))], axis=0)
        if style == "shared":
            if "split" not in shared:
                shared["count"] = g.c(np.array([H], np.int64), name="head_count")
                shared["split"] = g.op("Concat", [b, s, shared["count"],
                                                  g.c(np.array([-1], np.int64))], axis=0)
            return shared["split"]
        return g.op("Concat", [b, s, g.c(np.array([H], np.int64)),
                               g.c(np.array([-1], np.int64))], axis=0)

    def merge_target():
        b, s = _dim(g, "x", 0), _dim(g, "x", 1)
        last = -1 if style == "minus_one" else D
        return g.op("Concat", [b, s, g.c(np.array([last], np.int64))], axis=0)

    def proj(x, n):
        return g.op("Add", [g.op("MatMul", [x, g.w([D if n != D else D, n])]), g.w([n], 0.1)])

    def heads(y):
        y = g.op("Reshape", [y, split_target(y)])
        return g.op("Transpose", [y], perm=[0, 2, 1, 3])

    for _ in range(layers):
        q, k, v = heads(proj(x, D)), heads(proj(x, D)), heads(proj(x, D))
        kt = transposed_keys(g, k) if merged_keys else g.op("Transpose", [k], perm=[0, 1, 3, 2])
        s = g.op("MatMul", [q, kt])
        s = g.op("Softmax", [g.op("Div", [s, g.c(np.float32(np.sqrt(HD)))])], axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [s, v])], perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, merge_target()])
        o = g.op("Add", [g.op("MatMul", [o, g.w([D, D])]), x])
        n = g.op("LayerNormalization", [o, g.w([D], positive=True), g.w([D], 0.1)], axis=-1)
        m = g.op("Add", [g.op("MatMul", [n, g.w([D, 64])]), g.w([64], 0.1)])
        m = g.op("Mul", [m, g.op("Mul", [g.c(np.float32(0.5)), g.op("Add", [
            g.op("Erf", [g.op("Div", [m, g.c(np.float32(1.41421))])]), g.c(np.float32(1.0))])])])
        x = g.op("Add", [g.op("MatMul", [m, g.w([64, D])]), n])
    io = ("x", TensorProto.FLOAT, ["batch", "seq", D])
    return g.typed_model("attn", [io], [(x,) + io[1:]])


def run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def masked_and_resized(model, sparsity=0.5, shapes=SHAPES):
    return masked_and_resized_with_graph(model, shapes, sparsity=sparsity)


def _inputs():
    r = np.random.default_rng(5)
    return [r.standard_normal(s).astype(np.float32) for s in ((1, T, D), (2, 9, D), (3, 1, D))]


@pytest.mark.parametrize("style", ["minus_one", "count", "shared", "constant_node"])
def test_heads_removed_as_units_masked_equals_resized(style):
    model = attention_dynamic(style, layers=2)
    graph, masked, resized, removed, shapes = masked_and_resized(model)
    onnx.checker.check_model(resized, full_check=True)
    heads = [g for g in graph.groups if g.size == H]
    assert len(heads) == 2 and all(g.prunable and len(g.producers) == 3 for g in heads)
    for g in heads:  # half the heads of each layer, whole heads
        assert len(removed[g.id]) == 2
    q = next(m for m in heads[0].members if m.tensor == heads[0].producers[0] and m.axis == 1)
    assert q.index_map.shape == (H, HD)
    assert q.index_map[1].tolist() == list(range(HD, 2 * HD))
    # Q/K/V columns and output-projection rows lose 2 heads x 8
    assert sum(1 for before, after in shapes.values() if before == (D, D) and after == (D, 16)) \
        == 6
    assert sum(1 for before, after in shapes.values() if before == (D, D) and after == (16, D)) \
        == 2
    for x in _inputs():  # any batch and sequence: the targets still come from Shape at run time
        want, got = run(masked, x), run(resized, x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        assert not np.allclose(run(model, x), want, atol=1e-3)  # something was removed


def test_shared_head_count_is_never_edited_in_place():
    """Both layers read one head-count initializer; each layer's reshapes get their own override
    of the entry (a Where before the Reshape); the shared constant keeps its value."""
    model = attention_dynamic("shared", layers=2)
    _, masked, resized, removed, _ = masked_and_resized(model)
    count = next(t for t in resized.graph.initializer if t.name == "head_count")
    assert numpy_helper.to_array(count).tolist() == [H]
    wheres = [n for n in resized.graph.node if n.op_type == "Where"]
    reshapes = [n for n in resized.graph.node if n.op_type == "Reshape"]
    assert len(wheres) == len(reshapes) == 8  # 3 splits + 1 merge per layer
    assert all(r.input[1] in {w.output[0] for w in wheres} for r in reshapes)


def test_minus_one_needs_no_override():
    model = attention_dynamic("minus_one")
    _, _, resized, _, _ = masked_and_resized(model)
    assert not any(n.op_type == "Where" for n in resized.graph.node)


def test_shape_vector_evaluates_the_subgraph():
    model = attention_dynamic("count")
    handle = load(model)
    graph = build_channel_graph(handle, SHAPES)
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    entries = shape_vector(reshape.input[1], graph.shapes.get,
                           lambda n: numpy_helper.to_array(handle.index.stored[n])
                           if n in handle.index.stored else None, handle.index.producer)
    assert entries == [DimRef("x", 0), DimRef("x", 1), H, -1]
    # symbols flow through as symbols; -1 is solved when they cancel
    assert reshape_output(("batch", "seq", 32), ["batch", "seq", -1, 8], True) == \
        ("batch", "seq", 4, 8)
    assert reshape_output(("batch", 4, "seq", 8), [-1, "seq", 8], True) == \
        ("batch*4", "seq", 8)
    assert reshape_output(("batch", "seq", 8), [-1, 8], True) is None  # two symbols left
    assert reshape_output((2, 6, 32), [0, 0, -1, 8], False) == (2, 6, 4, 8)


def test_symbolic_input_shapes_resolve_heads():
    """Without --input-shape the batch and sequence stay symbols and heads are still found."""
    graph = build_channel_graph(load(attention_dynamic("minus_one")), None)
    assert [g.size for g in graph.groups if g.prunable and g.size == H] == [H]


def fused_qkv(seed: int = 1, gather: bool = False):
    """SVTR/timm style: one qkv MatMul [32, 96] -> view(b, s, 3, 4, 8) -> Transpose(2,0,3,1,4)
    -> Split (or Gather) along the 3 -> q, k, v; merge view(b, s, 32); output projection."""
    g = G(seed)
    b, s = _dim(g, "x", 0), _dim(g, "x", 1)
    qkv = g.op("Add", [g.op("MatMul", ["x", g.w([D, 3 * D])]), g.w([3 * D], 0.1)])
    shape = g.op("Concat", [b, s, g.c(np.array([3, H, HD], np.int64))], axis=0)
    t = g.op("Transpose", [g.op("Reshape", [qkv, shape])], perm=[2, 0, 3, 1, 4])
    if gather:
        q, k, v = (g.op("Gather", [t, g.c(np.int64(i))], axis=0) for i in range(3))
    else:
        parts = g.op("Split", [t, g.c(np.array([1, 1, 1], np.int64))], n_out=3, axis=0)
        q, k, v = (g.op("Squeeze", [p, g.c(np.array([0], np.int64))]) for p in parts)
    att = g.op("Softmax", [g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k],
                                                                     perm=[0, 1, 3, 2])]),
                                         g.c(np.float32(0.35))])], axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
    b2, s2 = _dim(g, "x", 0), _dim(g, "x", 1)
    o = g.op("Reshape", [o, g.op("Concat", [b2, s2, g.c(np.array([D], np.int64))], axis=0)])
    y = g.op("Add", [g.op("MatMul", [o, g.w([D, D])]), "x"])
    io = ("x", TensorProto.FLOAT, ["batch", "seq", D])
    return g.typed_model("fused", [io], [(y,) + io[1:]])


@pytest.mark.parametrize("gather", [False, True])
def test_fused_qkv_heads_are_the_units(gather):
    """The 3 of [3, heads, head_dim] is taken apart by Split/Gather, so heads carry the channels:
    removing head h removes its q, k and v columns (h*8.. of each third of the fused weight)."""
    model = fused_qkv(gather=gather)
    graph, masked, resized, removed, shapes = masked_and_resized(model)
    heads = [g for g in graph.groups if g.size == H and g.prunable]
    assert len(heads) == 1
    qkv = next(m for m in heads[0].members if m.tensor == heads[0].producers[0] and m.axis == 1)
    assert qkv.index_map.shape == (H, 3 * HD)
    assert qkv.index_map[1].tolist() == [k * D + HD + d for k in range(3) for d in range(HD)]
    assert sorted(after for before, after in shapes.values() if before == (D, 3 * D)) == \
        [(D, 3 * D // 2)]
    for x in _inputs():
        np.testing.assert_allclose(run(resized, x), run(masked, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shapes", [SHAPES, None])
def test_keys_merged_with_a_symbolic_batch(shapes):
    """K viewed as [-1, s, hd] merges batch and heads: with the batch a symbol the merged axis is
    "batch*4", position b*4 + h being head h of every batch entry, so heads stay units."""
    model = attention_dynamic("minus_one", merged_keys=True)
    graph, masked, resized, removed, _ = masked_and_resized(model, shapes=shapes)
    assert [len(removed[g.id]) for g in graph.groups if g.size == H and g.prunable] == [2]
    if shapes is None:
        assert "batch*4" in {d for s in graph.shapes.values() for d in s}
    for x in _inputs():
        np.testing.assert_allclose(run(resized, x), run(masked, x), atol=1e-5, rtol=1e-4)


def test_wanda_heads_follow_output_projection_activation_norms():
    """criterion wanda: a head's output-projection columns count as |W| * ||X||, so a head
    whose attention output is quiet goes first even when its weights are the largest."""
    model = attention_dynamic("minus_one")
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle, SHAPES)
    heads = next(g for g in graph.groups if g.size == H and g.prunable)
    proj = heads.consumers[0]
    l1 = select_channels(handle, graph, 0.25)[heads.id]
    loud = l1[0]  # the head magnitude would remove first
    norms = np.full(D, 10.0)
    quiet = (loud + 1) % H
    norms[quiet * HD:(quiet + 1) * HD] = 1e-3
    wanda = select_channels(handle, graph, 0.25, criterion="wanda", in_norms={proj: norms})
    assert wanda[heads.id] == [quiet] != l1
    with pytest.raises(Exception, match="needs calibration data"):
        select_channels(handle, graph, 0.25, criterion="wanda")


def test_wanda_channel_criterion_through_the_api():
    import onnxprune

    model = attention_dynamic("minus_one")
    calib = {"x": np.random.default_rng(8).standard_normal((16, T, D)).astype(np.float32)}
    result = onnxprune.prune(copy.deepcopy(model), pattern="channel", criterion="wanda",
                             sparsity=0.5, calibration=calib, input_shapes={"x": [1, T, D]})
    shapes = sorted(tuple(t.dims) for t in result.model.graph.initializer if len(t.dims) == 2)
    assert shapes.count((D, D // 2)) == 3 and (D // 2, D) in shapes  # Q, K, V | projection


def test_refine_shapes_fills_slice_range_and_reshape_from_shape_subgraphs():
    """What ONNX's inference leaves unknown: a Slice whose end is a sequence length read by
    Shape (position ids), a Range up to the batch size, a Reshape to (b, s, -1, 8)."""
    from onnxprune.model.shapes import infer_shapes
    from onnxprune.ops.shapevec import complete_shapes

    g = G(2)
    seq = g.op("Slice", [g.op("Shape", ["x"]), g.c(np.array([1], np.int64)),
                         g.c(np.array([2], np.int64))])
    pos = g.op("Slice", [g.c(np.arange(64, dtype=np.int64)[None], name="pos_ids"),
                         g.c(np.array([0], np.int64)), seq, g.c(np.array([1], np.int64))])
    batch = g.op("Squeeze", [g.op("Slice", [g.op("Shape", ["x"]), g.c(np.array([0], np.int64)),
                                            g.c(np.array([1], np.int64))])])
    rng = g.op("Range", [g.c(np.int64(0)), batch, g.c(np.int64(1))])
    target = g.op("Concat", [_dim(g, "x", 0), _dim(g, "x", 1), g.c(np.array([-1, HD], np.int64))],
                  axis=0)
    y = g.op("Reshape", [g.op("MatMul", ["x", g.w([D, D])]), target])
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(g.nodes, "sub", [vi("x", TensorProto.FLOAT, ["batch", "seq", D])],
                              [vi(y, TensorProto.FLOAT, None), vi(pos, TensorProto.INT64, None),
                               vi(rng, TensorProto.INT64, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for shapes, want in ((None, ("batch", "seq")), ({"x": [2, 5, D]}, (2, 5))):
        got = infer_shapes(model, shapes, upgrade=False, complete=complete_shapes)
        b, s = want
        assert got.get(pos) == (1, s)
        assert got.get(rng) == (b,)
        assert got.get(y) == (b, s, D // HD, HD)


def test_macs_of_a_pruned_model_with_symbolic_value_info():
    """The pruned model keeps value_info written with the input's symbols ('seq'); counting its
    MACs at concrete shapes binds those symbols too, so every MatMul is counted, and the count
    equals the one without the kept value_info (and the report's)."""
    from onnxprune import prune
    from onnxprune.report.macs import count_macs

    model = onnx.shape_inference.infer_shapes(attention_dynamic("count", layers=2))
    shapes = {"x": [1, T, D]}
    result = prune(model, pattern="channel", sparsity=0.5, input_shapes=shapes)
    pruned = result.model
    assert any(d.dim_param == "seq" for vi in pruned.graph.value_info
               for d in vi.type.tensor_type.shape.dim)
    counted = count_macs(pruned, shapes)
    bare = copy.deepcopy(pruned)
    del bare.graph.value_info[:]
    assert counted.unknown == [] and counted.total == count_macs(bare, shapes).total
    assert counted.total < count_macs(model, shapes).total
    assert result.report.macs_after == counted.total
