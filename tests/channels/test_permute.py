"""Permuting channel groups keeps the dense function: random permutations of every group the
channel graph can change, on every channel rule case, give the same outputs."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.permute import column_permutation, permute_channels
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights
from channel_models import BUILDERS, G, IMG, assert_close, feeds_for, run

RUNNABLE = sorted(n for n in BUILDERS if n != "unknown_op")


def permuted(model, seed=0):
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    rng = np.random.default_rng(seed)
    perms = {g.id: rng.permutation(g.size) for g in graph.groups if g.prunable}
    changed = permute_channels(handle, graph, perms)
    return handle, graph, perms, changed


@pytest.mark.parametrize("name", RUNNABLE)
def test_random_permutations_keep_the_function(name):
    model = BUILDERS[name]()
    handle, graph, perms, changed = permuted(model)
    onnx.checker.check_model(handle.model, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(handle.model, feeds), run(model, feeds))
    if perms:
        # something really moved: at least one stored tensor differs from the original
        before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert any(not np.array_equal(handle.read(graph.stored[n]), before[n])
                   for n in changed if n in before)


def conv_bn_concat_residual_gemm():
    """Conv->BN->Relu->Conv, a Concat of two convs into a conv, a residual Add tie and a Gemm
    chain behind a global pool, in one model."""
    g = G(7)
    a = g.op("Relu", [g.bn(g.conv("x", 3, 8), 8)])
    b = g.conv(a, 8, 8)
    c = g.conv(a, 8, 4, k=1)
    cat = g.op("Concat", [b, c], axis=1)
    d = g.op("Relu", [g.conv(cat, 12, 8)])
    res = g.op("Add", [d, a])  # ties d's channels to a's
    p = g.op("Flatten", [g.op("GlobalAveragePool", [res])])
    h = g.op("Relu", [g.op("Gemm", [p, g.w([16, 8]), g.w([16], 0.1)], transB=1)])
    y = g.op("Gemm", [h, g.w([16, 5]), g.w([5], 0.1)])
    return g.model(IMG, [y])


def test_tied_groups_permute_every_member():
    model = conv_bn_concat_residual_gemm()
    handle, graph, perms, changed = permuted(model, seed=3)
    feeds = feeds_for(model, seed=1)
    assert_close(run(handle.model, feeds), run(model, feeds))
    # the residual group holds two producers, BN parameters and several consumers, all moved
    res = max((g for g in graph.groups if g.prunable), key=lambda g: len(g.producers))
    assert len(res.producers) >= 2
    assert set(res.producers) | set(res.consumers) <= set(changed)
    bn_params = [m.tensor for m in res.members if m.stored and m.tensor not in res.producers
                 and m.tensor not in res.consumers]
    assert bn_params and set(bn_params) <= set(changed)
    # the concat group: its consumer's input columns are a block after the other group's
    assert any(m.index_map.min() > 0 for g in graph.groups if g.prunable for m in g.members)


def test_graph_output_groups_stay_in_order():
    model = BUILDERS["output_conv"]()
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    frozen = [g for g in graph.groups if not g.prunable and g.producers]
    assert frozen
    with pytest.raises(ValueError, match="frozen"):
        permute_channels(handle, graph, {frozen[0].id: np.arange(frozen[0].size)[::-1]})


def test_not_a_permutation_is_refused():
    handle = load(BUILDERS["conv_bn_relu"]())
    graph = build_channel_graph(handle)
    g = next(g for g in graph.groups if g.prunable)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_channels(handle, graph, {g.id: np.zeros(g.size, dtype=np.int64)})


def test_gemm_chain_permutation_moves_rows_and_columns():
    """x @ W1 (+b1) -> Relu -> x @ W2: the hidden group moves W1's columns, b1 and W2's rows."""
    w1 = np.arange(12, dtype=np.float32).reshape(3, 4)
    b1 = np.array([10, 20, 30, 40], np.float32)
    w2 = np.arange(8, dtype=np.float32).reshape(4, 2)
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"],
             ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [vi("x", TensorProto.FLOAT, [2, 3])], [vi("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (b1, "b1"), (w2, "W2"))]),
        opset_imports=[helper.make_opsetid("", 17)])
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    g = next(g for g in graph.groups if g.prunable)
    perm = np.array([2, 0, 3, 1])
    permute_channels(handle, graph, {g.id: perm})
    np.testing.assert_array_equal(handle.read(graph.stored["W1"]), w1[:, perm])
    np.testing.assert_array_equal(handle.read(graph.stored["b1"]), b1[perm])
    np.testing.assert_array_equal(handle.read(graph.stored["W2"]), w2[perm])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    assert_close(run(handle.model, feeds), run(model, feeds))
    # W2's W[out, in] view is W2.T: its columns moved as the hidden channels did
    weights = {w.name: w for w in find_weights(handle)[0]}
    moves = [(0, np.arange(4), perm)]
    np.testing.assert_array_equal(column_permutation(weights["W2"].layout, moves), perm)
