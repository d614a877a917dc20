"""Heads whose reshape target is ``batch * heads`` computed at run time, as torch's
``nn.MultiheadAttention`` exports it: q/k/v viewed as ``[seq, batch * heads, head_dim]`` with the
entry ``Mul(Shape(x)[1], heads)``. The product is a :class:`DimProduct` entry (never evaluated
with the bound batch): the heads are prunable units, a resize rewrites the Mul's constant to the
heads kept, and the written model runs at any batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.shapevec import (DimProduct, DimRef, complete_shapes, dim_factors, entry_size,
                                    product_symbol, reshape_output, shape_vector)
from channel_models import G, masked_and_resized_with_graph

E, H, HD, T = 24, 6, 4, 5
SHAPES = {"x": [T, 1, E]}  # what prune binds: --input-shape batch=1,seq=5


def _scalar(g: G, x: str, axis: int) -> str:
    """Squeeze(Shape(x, start=axis, end=axis+1)): x's size on ``axis`` as a scalar."""
    return g.op("Squeeze", [g.op("Shape", [x], start=axis, end=axis + 1)])


def _vec(g: G, scalar: str) -> str:
    return g.op("Reshape", [scalar, g.c(np.array([-1], np.int64))])


def torch_mha(factor: int = H, heads: int = H, const_first: bool = False,
              expose_product: bool = False, split_first: bool = False, div: bool = False,
              seed: int = 0):
    """x[seq, batch, E] -> torch-MHA-like self-attention + residual. q/k/v are viewed as
    ``[seq, batch * factor, E // factor]`` with the entry ``Mul(Shape(x)[1], factor)`` (one
    Mul and one constant shared by the three views and the merge), attention runs over the
    merged axis, ``[seq * batch, E]`` (a product of two run-time sizes) feeds the output
    projection. ``const_first``: ``Mul(factor, batch)``; ``expose_product``: the product is
    also a graph output (so its Mul cannot be edited in place); ``split_first``: q/k/v are
    first viewed as ``[seq, batch, heads, E // heads]`` (a constant head count) and then as
    ``[seq, batch * factor, -1]``; ``div``: the entry is ``Div(Mul(batch, 2 * factor), 2)``."""
    g = G(seed)
    seq, batch = _scalar(g, "x", 0), _scalar(g, "x", 1)
    k = g.c(np.int64(factor * (2 if div else 1)), name="heads_factor")
    prod = g.op("Mul", [k, batch] if const_first else [batch, k])
    if div:
        prod = g.op("Div", [prod, g.c(np.int64(2))])
    bh = _vec(g, prod)
    seqv = g.op("Shape", ["x"], start=0, end=1)
    batchv = g.op("Shape", ["x"], start=1, end=2)
    target = g.op("Concat", [seqv, bh, g.c(np.array([-1 if split_first else E // factor],
                                                    np.int64))], axis=0)

    def view(y):
        if split_first:
            y = g.op("Reshape", [y, g.op("Concat", [seqv, batchv, g.c(np.array(
                [heads, E // heads], np.int64))], axis=0)])
        return g.op("Transpose", [g.op("Reshape", [y, target])], perm=[1, 0, 2])

    def proj(x):
        return g.op("Add", [g.op("MatMul", [x, g.w([E, E])]), g.w([E], 0.1)])

    q, kk, v = view(proj("x")), view(proj("x")), view(proj("x"))
    s = g.op("MatMul", [q, g.op("Transpose", [kk], perm=[0, 2, 1])])
    a = g.op("Softmax", [g.op("Mul", [s, g.c(np.float32(0.5))])], axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [a, v])], perm=[1, 0, 2])
    flat = g.op("Concat", [_vec(g, g.op("Mul", [seq, batch])), g.c(np.array([E], np.int64))],
                axis=0)
    o = g.op("Add", [g.op("MatMul", [g.op("Reshape", [o, flat]), g.w([E, E])]), g.w([E], 0.1)])
    back = g.op("Concat", [seqv, batchv, g.c(np.array([E], np.int64))], axis=0)
    y = g.op("Add", [g.op("Reshape", [o, back]), "x"])
    io = ("x", TensorProto.FLOAT, ["seq", "batch", E])
    outs = [(y,) + io[1:]] + ([(bh, TensorProto.INT64, [1])] if expose_product else [])
    return g.typed_model("mha", [io], outs)


def run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _inputs():
    r = np.random.default_rng(3)
    return [r.standard_normal(s).astype(np.float32) for s in ((T, 1, E), (T, 3, E), (7, 3, E),
                                                              (2, 2, E))]


def _factor(model) -> int:
    """The value of the constant the ``batch * heads`` Mul reads now."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and
               any(i.startswith("heads_factor") for i in n.input))
    return int(next(inits[i] for i in mul.input if i.startswith("heads_factor")))


def test_shape_vector_keeps_the_product_symbolic():
    model = torch_mha()
    graph = build_channel_graph(load(model), SHAPES)
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape" and
                   graph.shapes.get(n.output[0]) == (T, H, HD))
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    entries = shape_vector(reshape.input[1], graph.shapes.get, consts.get,
                           {o: n for n in model.graph.node for o in n.output}.get)
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and "heads_factor" in n.input)
    assert entries == [DimRef("x", 0), DimProduct((DimRef("x", 1),), H, mul.output[0]),
                       E // H]
    # the bound batch (1) gives the size the graph was built on; a symbol stays a symbol
    assert entry_size(entries[1], graph.shapes.get) == H
    assert entry_size(entries[1], {"x": ("seq", "batch", E)}.get) == "batch*6"


def test_product_spelling_is_one_representation():
    assert product_symbol(["batch", 6]) == "batch*6"
    assert product_symbol(["seq", "batch"]) == "seq*batch"
    assert product_symbol(["batch*6", 2]) == "batch*12"
    assert product_symbol([1, 6]) == 6
    assert dim_factors("batch*6") == (["batch"], 6)
    assert dim_factors(12) == ([], 12)
    # Reshape's -1 solved through a product dim: [seq, batch*6, 4] -> [seq, batch, -1]
    assert reshape_output(("seq", "batch*6", 4), ["seq", "batch", -1], False) == \
        ("seq", "batch", 24)
    assert reshape_output(("seq", "batch", 24), ["seq", -1, 4], False) == ("seq", "batch*6", 4)


@pytest.mark.parametrize("const_first,bound", [(False, SHAPES), (True, SHAPES),
                                                (False, None)])
def test_batch_times_heads_heads_are_units_and_the_factor_is_rewritten(const_first, bound):
    """Built on batch 1 (as prune binds it) or on the symbols (the axis is "batch*6", its 6
    units carried as they are): the same heads, the same rewrite."""
    model = torch_mha(const_first=const_first)
    graph, masked, resized, removed, shapes = masked_and_resized_with_graph(
        model, bound, sparsity=0.5)
    if bound is None:
        assert {"batch*6", "seq*batch"} <= {d for s in graph.shapes.values() for d in s}
    onnx.checker.check_model(resized, full_check=True)
    heads = [g for g in graph.groups if g.size == H]
    assert len(heads) == 1 and heads[0].prunable and len(heads[0].producers) == 3
    assert len(removed[heads[0].id]) == 3
    q = next(m for m in heads[0].members if m.tensor == heads[0].producers[0] and m.axis == 1)
    assert q.index_map[2].tolist() == list(range(2 * HD, 3 * HD))
    assert sorted(after for before, after in shapes.values() if before == (E, E)) == \
        [(E // 2, E)] + [(E, E // 2)] * 3
    # the Mul now reads batch * 3 (the heads kept), still Shape(x)[1] at run time
    assert _factor(model) == H and _factor(resized) == H - 3
    assert not any(n.name.endswith("_kept_units_mul") for n in resized.graph.node)
    inferred = infer_shapes(resized, complete=complete_shapes).shapes
    assert sum(s == ("seq", "batch*3", HD) for s in inferred.values()) == 4  # 3 views + merge
    for x in _inputs():  # batch 1 (as built) and 3, 2: nothing baked
        want, got = run(masked, x)[0], run(resized, x)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        assert not np.allclose(run(model, x)[0], want, atol=1e-3)


def test_a_product_read_elsewhere_is_scaled_in_front_of_each_reshape():
    """The product is also a graph output: its Mul stays as it is (the output still says
    batch * 6) and each Reshape scales its own entry by kept / 6 with a Mul and a Div."""
    model = torch_mha(expose_product=True)
    graph, masked, resized, removed, _ = masked_and_resized_with_graph(model, SHAPES,
                                                                       sparsity=0.5)
    assert [len(removed[g.id]) for g in graph.groups if g.size == H and g.prunable] == [3]
    assert _factor(resized) == H
    assert sum(n.name.endswith("_kept_units_mul") for n in resized.graph.node) == 3
    # the scaled target still reads as batch * 3 where the batch is a symbol
    inferred = infer_shapes(resized, complete=complete_shapes).shapes
    views = [n.output[0] for n in resized.graph.node if n.op_type == "Reshape" and
             n.input[1].endswith("_kept_target")]
    assert [inferred[v] for v in views] == [("seq", "batch*3", HD)] * 3
    for x in _inputs():
        want, got = run(masked, x), run(resized, x)
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-4)
        assert got[1].tolist() == [x.shape[1] * H]


def test_a_product_divided_by_a_constant_is_scaled_in_front_of_each_reshape():
    """``batch * 12 / 2``: the entry is the product batch x 6 (Div exact on the factor); its
    outermost node is the Div, so each Reshape scales its own entry."""
    model = torch_mha(div=True)
    graph, masked, resized, removed, _ = masked_and_resized_with_graph(model, SHAPES,
                                                                       sparsity=0.5)
    assert [len(removed[g.id]) for g in graph.groups if g.size == H and g.prunable] == [3]
    assert _factor(resized) == 2 * H
    assert sum(n.name.endswith("_kept_units_mul") for n in resized.graph.node) == 3
    for x in _inputs():
        np.testing.assert_allclose(run(resized, x)[0], run(masked, x)[0], atol=1e-5,
                                   rtol=1e-4)


def test_shape_vector_products_and_quotients():
    g = G()
    b = _scalar(g, "x", 1)
    twelve = g.op("Mul", [b, g.c(np.int64(12))])
    six = g.op("Div", [twelve, g.c(np.int64(2))])
    one = g.op("Div", [six, g.c(np.int64(6))])
    odd = g.op("Div", [six, g.c(np.int64(4))])
    both = g.op("Mul", [_scalar(g, "x", 0), b])
    consts = {t.name: numpy_helper.to_array(t) for t in g.inits}
    producer = {o: n for n in g.nodes for o in n.output}.get
    shape_of = {"x": ("seq", "batch", E)}.get
    ev = {v: shape_vector(v, shape_of, consts.get, producer) for v in (six, one, odd, both)}
    assert ev[six] == [DimProduct((DimRef("x", 1),), 6, six)]
    assert ev[one] == [DimRef("x", 1)]  # batch * 6 / 6 is the batch itself
    assert ev[odd] is None  # 6 / 4 is no integer factor
    assert ev[both] == [DimProduct((DimRef("x", 0), DimRef("x", 1)), 1, both)]
    assert entry_size(ev[both][0], shape_of) == "seq*batch"


def test_a_factor_that_is_not_the_head_count_freezes_with_a_reason():
    """q viewed as [seq, batch, 6, 4] and then as [seq, batch * 8, 3]: the 8 cuts across
    heads, no axis carries whole units, so the group freezes and the Mul is left alone."""
    model = torch_mha(factor=8, split_first=True)
    graph, masked, resized, removed, _ = masked_and_resized_with_graph(model, SHAPES,
                                                                       sparsity=0.5)
    q = next(n for n in model.graph.node if n.op_type == "MatMul")
    group = next(g for g in graph.groups if q.input[1] in g.producers)
    assert not group.prunable
    assert "reshape block has no single channel-carrying axis" in group.frozen
    assert _factor(resized) == 8
    for x in _inputs():
        np.testing.assert_allclose(run(resized, x)[0], run(model, x)[0], atol=1e-5,
                                   rtol=1e-4)


def test_built_on_a_batch_above_one_the_heads_freeze():
    """Bound to batch 2 the merged axis is 12 = 2 x 6 positions: the graph never turns it into
    units, so the heads freeze (bind the batch to 1) and nothing is rewritten."""
    model = torch_mha()
    graph, masked, resized, removed, _ = masked_and_resized_with_graph(
        model, {"x": [T, 2, E]}, sparsity=0.5)
    q = next(n for n in model.graph.node if n.op_type == "MatMul")
    group = next(g for g in graph.groups if q.input[1] in g.producers)
    assert not group.prunable and "Reshape" in group.frozen
    assert _factor(resized) == H
    for x in _inputs():
        np.testing.assert_allclose(run(resized, x)[0], run(model, x)[0], atol=1e-5,
                                   rtol=1e-4)
