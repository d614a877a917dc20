"""The residual width of a transformer, pruned through its RMSNorms: a T5-like decoder (uint8
embedding table with zero point 138, RMSNorm as ``Pow -> ReduceMean -> Add -> Sqrt -> Div`` or
``-> Reciprocal -> Mul``, attention and FFN blocks, an LM head) whose residual stream is one
prunable group, masked == resized; and the cases where a removed channel is not 0 where a
statistic reads it (frozen with the cause)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from tests.channel_models import G, masked_and_resized_with_graph, run

D, V, S, F = 16, 20, 5, 24
ZP = 138


def _table(g: G, ids: str, form: str) -> str:
    """The uint8 embedding table [V, D] (zero point 138) gathered and dequantized."""
    q = np.clip(np.rint(g.rng.standard_normal((V, D)) * 30 + ZP), 0, 255).astype(np.uint8)
    table = g.c(q, "table")
    rows = g.op("Gather", [table, ids])
    if form == "dq":
        return g.op("DequantizeLinear", [rows, g.c(np.float32(0.02), "tscale"),
                                         g.c(np.uint8(ZP), "tzp")])
    f = g.op("Cast", [rows], to=TensorProto.FLOAT)
    return g.op("Mul", [g.op("Sub", [f, g.c(np.float32(ZP))]), g.c(np.float32(0.02))])


def _rmsnorm(g: G, x: str, form: str, opset: int, reduce: str = "ReduceMean") -> str:
    sq = g.op("Pow", [x, g.c(np.float32(2.0))])
    keep = 0 if form == "keepdims0" else 1
    if opset >= 18:
        mean = g.op(reduce, [sq, g.c(np.array([-1], np.int64))], keepdims=keep)
    else:
        mean = g.op(reduce, [sq], axes=[-1], keepdims=keep)
    if not keep:
        mean = g.op("Unsqueeze", [mean, g.c(np.array([-1], np.int64))])
    root = g.op("Sqrt", [g.op("Add", [mean, g.c(np.float32(1e-6))])])
    if form == "reciprocal":
        normed = g.op("Mul", [x, g.op("Reciprocal", [root])])
    else:
        normed = g.op("Div", [x, root])
    return g.op("Mul", [g.w([D], positive=True), normed])


def t5_block_model(norm="div", table="dq", opset=17, stream_op=None, reduce="ReduceMean"):
    """ids [1, S] -> embedding -> (attention, FFN) with RMSNorms -> final RMSNorm -> LM head.
    ``stream_op`` puts an op on the stream before the first norm ("add1": x + 1,
    "sigmoid")."""
    g = G(7)
    h = _table(g, "ids", table)
    if stream_op == "add1":
        h = g.op("Add", [h, g.c(np.float32(1.0))])
    elif stream_op == "sigmoid":
        h = g.op("Sigmoid", [h])
    # attention (one head)
    n = _rmsnorm(g, h, norm, opset, reduce)
    q, k, v = (g.op("MatMul", [n, g.w([D, 8])]) for _ in range(3))
    att = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])],
               axis=-1)
    h = g.op("Add", [h, g.op("MatMul", [g.op("MatMul", [att, v]), g.w([8, D])])])
    # FFN
    n = _rmsnorm(g, h, "reciprocal" if norm == "div" else norm, opset)
    up = g.op("Relu", [g.op("MatMul", [n, g.w([D, F])])])
    h = g.op("Add", [h, g.op("MatMul", [up, g.w([F, D])])])
    # final norm and LM head
    n = _rmsnorm(g, h, norm, opset)
    g.op("MatMul", [n, g.w([D, V], name="lm_head")])
    g.nodes[-1].output[0] = "logits"
    return g.typed_model("t5ish", [("ids", TensorProto.INT64, [1, S])],
                         [("logits", TensorProto.FLOAT, [1, S, V])], opset=opset)


FEEDS = {"ids": np.array([[3, 0, 19, 7, 3]], np.int64)}


def stream_group(graph):
    [g] = [g for g in graph.groups if any(m.tensor == "table" for m in g.members)]
    return g


def check_exact(model):
    graph, masked, resized, removed, sizes = masked_and_resized_with_graph(model, sparsity=0.25)
    group = stream_group(graph)
    a, b = run(masked, FEEDS)[0], run(resized, FEEDS)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    return graph, group, masked, resized, removed, sizes


@pytest.mark.parametrize("norm", ["div", "reciprocal", "keepdims0"])
@pytest.mark.parametrize("opset", [17, 18])
def test_residual_stream_prunable_and_exact(norm, opset):
    graph, group, masked, resized, removed, sizes = check_exact(t5_block_model(norm, opset=opset))
    assert group.prunable, group.frozen
    assert group.size == D
    # every writer (o-proj, FFN down) produces it; every reader (Q/K/V, FFN up, LM head) consumes
    assert len(group.producers) == 2 and len(group.consumers) == 5
    assert "lm_head" in group.consumers
    roles = {m.tensor: m.roles for m in group.members if m.stored}
    assert roles["table"] == ("bias",)
    assert sum(r == ("factor",) for r in roles.values()) == 3  # the three RMSNorm weights
    gone = removed[group.id]
    assert len(gone) == D - (D - int(np.floor(0.25 * D)))  # 4 of 16
    # masked: the uint8 table's removed columns hold its zero point (dequantized: exactly 0)
    table = numpy_helper.to_array(next(t for t in masked.graph.initializer if t.name == "table"))
    assert (table[:, gone] == ZP).all() and (table[:, [c for c in range(D) if c not in gone]]
                                            != ZP).any()
    # resized: the stream is 12 wide everywhere, each mean still divides by 16
    assert sizes["table"] == ((V, D), (V, D - 4))
    assert sizes["lm_head"] == ((D, V), (D - 4, V))
    ratios = [n for n in resized.graph.node if n.name.endswith("_width_ratio")]
    assert len(ratios) == 3 and all(n.op_type == "Mul" for n in ratios)
    value = {t.name: numpy_helper.to_array(t) for t in resized.graph.initializer}
    assert all(float(value[n.input[1]]) == pytest.approx(12 / 16) for n in ratios)
    onnx.checker.check_model(resized, full_check=True)


def test_cast_sub_mul_table_is_masked_with_its_zero_point():
    graph, group, masked, *_ = check_exact(t5_block_model(table="cast"))
    assert group.prunable, group.frozen
    assert graph.zero_values["table"] == ZP


def test_masked_stream_keeps_dense_when_nothing_removed():
    """The width-ratio rewrite is inert without removal: resize with nothing removed leaves the
    graph's nodes as they were."""
    model = t5_block_model()
    h = load(model)
    graph = build_channel_graph(h)
    from onnxprune.channels.resize import resize_channels
    before = [n.op_type for n in h.model.graph.node]
    resize_channels(h, graph, {})
    assert [n.op_type for n in h.model.graph.node] == before


@pytest.mark.parametrize("op, value", [("add1", "1"), ("sigmoid", "0.5")])
def test_stream_not_zero_when_removed_is_frozen_with_the_cause(op, value):
    graph = build_channel_graph(load(t5_block_model(stream_op=op)))
    group = stream_group(graph)
    assert not group.prunable
    assert "ReduceMean reduces over axis 2" in group.frozen
    assert "exact under removal only where the removed channels are 0" in group.frozen
    assert f"makes them {value}" in group.frozen
    assert ("Add" if op == "add1" else "Sigmoid") in group.frozen.split("here they are not")[1]


def test_reduce_max_over_the_stream_stays_frozen():
    graph = build_channel_graph(load(t5_block_model(reduce="ReduceMax")))
    group = stream_group(graph)
    assert not group.prunable
    assert "ReduceMax reduces over axis 2" in group.frozen
    assert "even channels that are 0" in group.frozen


@pytest.mark.parametrize("reduce", ["ReduceSumSquare", "ReduceL2", "ReduceSum"])
def test_sums_over_the_stream_are_exact(reduce):
    """A sum needs no rewrite: removed channels that are 0 add nothing."""
    g = G(5)
    h = _table(g, "ids", "dq")
    total = (g.op(reduce, [h, g.c(np.array([-1], np.int64))], keepdims=1) if reduce == "ReduceSum"
             else g.op(reduce, [h], axes=[-1], keepdims=1))
    h = g.op("Mul", [h, total])
    out = g.op("MatMul", [g.op("Relu", [g.op("MatMul", [h, g.w([D, F])])]), g.w([F, D])])
    h = g.op("Add", [h, out])
    g.op("MatMul", [h, g.w([D, V])])
    g.nodes[-1].output[0] = "logits"
    model = g.typed_model("sums", [("ids", TensorProto.INT64, [1, S])],
                          [("logits", TensorProto.FLOAT, [1, S, V])])
    graph, group, masked, resized, removed, sizes = check_exact(model)
    assert group.prunable and len(removed[group.id]) == 4
    assert not [n for n in resized.graph.node if n.name.endswith("_width_ratio")]


def test_integer_table_without_a_zero_value_is_only_sliced():
    """An integer table read as plain integers (no dequantization onnxprune follows) has no
    value that reads as 0: it is sliced, not masked, and a statistic over the stream freezes."""
    g = G(9)
    q = g.rng.integers(0, 255, (V, D)).astype(np.uint8)
    h = g.op("Cast", [g.op("Gather", [g.c(q, "table"), "ids"])], to=TensorProto.FLOAT)
    h = g.op("Add", [h, g.op("MatMul", [g.op("Relu", [g.op("MatMul", [h, g.w([D, F])])]),
                                        g.w([F, D])])])
    n = _rmsnorm(g, h, "div", 17)
    g.op("MatMul", [n, g.w([D, V])])
    g.nodes[-1].output[0] = "logits"
    model = g.typed_model("plain", [("ids", TensorProto.INT64, [1, S])],
                          [("logits", TensorProto.FLOAT, [1, S, V])])
    graph = build_channel_graph(load(model))
    group = stream_group(graph)
    assert "table" not in graph.zero_values
    assert not any(m.roles for m in group.members if m.tensor == "table")
    assert not group.prunable and "here they are not: Gather" in group.frozen


def test_zero_value_needs_every_reader_to_agree():
    from onnxprune.ops.quant import zero_value
    h = load(t5_block_model())
    read = lambda n: numpy_helper.to_array(h.index.stored[n]) if n in h.index.stored else None  # noqa: E731
    assert zero_value(h.index, "table", read) == ZP
    # a second reader with another zero point: no value reads as 0 for both
    h.model.graph.initializer.append(numpy_helper.from_array(np.uint8(7), "zp7"))
    h.model.graph.node.append(helper.make_node("DequantizeLinear", ["table", "tscale", "zp7"],
                                               ["other"]))
    h.graph_changed()
    assert zero_value(h.index, "table", read) is None


# -- RMSNorm as one op: epsilon and scale rewritten ------------------------------------------------
def fused_model(op: str, read_stats: bool = False):
    """x -> MatMul (the stream) -> fused RMSNorm -> FFN + residual -> MatMul -> y."""
    g = G(11)
    a = g.op("MatMul", ["x", g.w([D, D])])
    domain, opset = ("com.microsoft", 17) if op.startswith("Skip") else ("", 17)
    if op == "RMSNormalization":
        opset = 23
    if op == "SkipSimplifiedLayerNormalization":
        b = g.op("MatMul", ["x", g.w([D, D])])
        n, _, inv, total = g.op(op, [a, b, g.w([D], positive=True, name="gamma"),
                                     g.w([D], 0.1, name="beta")], n_out=4, domain=domain,
                                epsilon=1e-3)
    else:
        n, inv = g.op(op, [a, g.w([D], positive=True, name="gamma")], n_out=2, axis=-1,
                      epsilon=1e-3) if op != "RMSNormalization" else \
            (g.op(op, [a, g.w([D], positive=True, name="gamma")], axis=-1, epsilon=1e-3), None)
        total = a
    up = g.op("Relu", [g.op("MatMul", [n, g.w([D, F])])])
    h = g.op("Add", [total, g.op("MatMul", [up, g.w([F, D])])])
    if read_stats:
        h = g.op("Mul", [h, inv])
    return g.model([("x", [1, S, D])], [g.op("MatMul", [h, g.w([D, 7])])], opset=opset)


def _ort_runs(model) -> bool:
    try:
        run(model, {"x": np.zeros((1, S, D), np.float32)})
        return True
    except Exception:
        return False


@pytest.mark.parametrize("op", ["SimplifiedLayerNormalization", "RMSNormalization",
                                "SkipSimplifiedLayerNormalization"])
def test_fused_rmsnorm_follows_the_stream_exactly(op):
    model = fused_model(op)
    if not _ort_runs(model):
        pytest.skip(f"the installed onnxruntime does not run {op}")
    graph, masked, resized, removed, sizes = masked_and_resized_with_graph(model, sparsity=0.25)
    [group] = [g for g in graph.groups if any(m.tensor == "gamma" for m in g.members)]
    assert group.prunable, group.frozen
    assert len(removed[group.id]) == 4
    x = {"x": np.random.default_rng(1).standard_normal((1, S, D)).astype(np.float32)}
    np.testing.assert_allclose(run(masked, x)[0], run(resized, x)[0], rtol=1e-4, atol=1e-5)
    node = next(n for n in resized.graph.node if n.op_type == op)
    eps = next(a.f for a in node.attribute if a.name == "epsilon")
    assert eps == pytest.approx(1e-3 * 16 / 12)
    gamma = {t.name: numpy_helper.to_array(t) for t in resized.graph.initializer}[node.input[
        2 if op.startswith("Skip") else 1]]
    original = numpy_helper.to_array(next(t for t in model.graph.initializer
                                          if t.name == "gamma"))
    kept = [c for c in range(D) if c not in removed[group.id]]
    np.testing.assert_allclose(gamma, original[kept] * np.sqrt(16 / 12), rtol=1e-6)
    assert "gamma" not in {t.name for t in resized.graph.initializer}  # replaced, not shared
    if op.startswith("Skip"):
        assert sizes["beta"] == ((D,), (12,))


def test_fused_rmsnorm_whose_statistics_are_read_keeps_the_stream():
    graph = build_channel_graph(load(fused_model("SimplifiedLayerNormalization",
                                                 read_stats=True)))
    [group] = [g for g in graph.groups if any(m.tensor == "gamma" for m in g.members)]
    assert not group.prunable
    assert "its statistics output" in group.frozen and "is read: it would change" in group.frozen


def test_a_stream_channel_no_weight_reads_is_not_dead():
    """A removed stream channel whose consumer rows are all zero is still read by the RMSNorm's
    sum of squares: dead-channel removal keeps it (masked == dead-removed would not hold)."""
    from onnxprune.channels.dead import find_dead
    model = t5_block_model()
    h = load(model)
    graph = build_channel_graph(h)
    group = stream_group(graph)
    assert any("sink" in m.roles for m in group.members)
    for name in group.consumers:  # every weight reading channel 3 of the stream: zero rows
        m = next(m for m in group.members if m.tensor == name)
        arr = numpy_helper.to_array(h.index.stored[name]).copy()
        arr[tuple(m.indices([3]) if a == m.axis else slice(None) for a in range(arr.ndim))] = 0
        h.write(h.index.stored[name], arr)
    [(_, removed, folds, kept)] = [d for d in find_dead(h, build_channel_graph(h))
                                   if d[0].id == group.id]
    assert removed == [] and folds == []


@pytest.mark.parametrize("prune_stream", [False, True])
def test_the_stream_is_kept_unless_asked(tmp_path, prune_stream):
    """The channel graph can remove the stream; `prune` keeps it whole unless --prune-stream
    (a policy, reported as the group's reason), and with it removes the same 4 of 16."""
    from onnxprune.api import prune

    model = t5_block_model()
    out = tmp_path / "p.onnx"
    result = prune(model, output=out, pattern="channel", sparsity=0.25,
                   prune_stream=prune_stream, validate=False)
    pruned = onnx.load(str(out))
    dims = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert dims["lm_head"] == ((D - 4, V) if prune_stream else (D, V))
    assert dims["table"] == ((V, D - 4) if prune_stream else (V, D))
    reasons = [why for _, why in result.report.frozen]
    kept = [w for w in reasons if w.startswith("a residual stream (ReduceMean")]
    assert len(kept) == (0 if prune_stream else 1), reasons
    if not prune_stream:
        assert "kept whole unless --prune-stream" in kept[0]
