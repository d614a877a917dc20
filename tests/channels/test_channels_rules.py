"""Per-rule unit tests: exact group structure, index maps, roles and attribute rewrites."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from onnxprune.channels.graph import _components, build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.channels.select import kept_count, select_channels
from onnxprune.ops.shape import reshape_blocks as _reshape_blocks
from onnxprune.model.io import load
from channel_models import BUILDERS, G, IMG, feeds_for, run


def graph_of(name):
    handle = load(BUILDERS[name]())
    return handle, build_channel_graph(handle)


def group_with(graph, producer):
    return next(g for g in graph.groups if producer in g.producers)


def member(group, tensor, axis=None):
    return next(m for m in group.members if m.tensor == tensor and (axis is None or
                                                                    m.axis == axis))


def test_conv_bn_relu_groups_and_roles():
    handle, graph = graph_of("conv_bn_relu")
    g = group_with(graph, "w1")
    assert g.size == 16 and g.frozen is None
    assert g.consumers == ["w13"]
    assert member(g, "w2").roles == ("bias",)  # conv bias
    assert member(g, "w5").roles == ("scale",) and member(g, "w6").roles == ("bias",)
    assert member(g, "w7").roles == member(g, "w8").roles == ("stat",)
    assert member(g, "w13", 1).index_map.ravel().tolist() == list(range(16))
    inp = next(x for x in graph.groups if any(m.tensor == "x" for m in x.members))
    assert "graph input 'x'" in inp.frozen
    out = group_with(graph, "w25")
    assert "graph output" in out.frozen


def test_depthwise_is_tied_one_to_one_and_group_rewritten():
    handle, graph = graph_of("depthwise")
    g = group_with(graph, "w1")
    assert {"w1", "w15", "w27"} <= set(g.producers)  # 1x1, depthwise, depthwise x2
    m = member(g, "w27", 0)  # multiplier 2: unit c owns outputs 2c, 2c+1
    assert m.index_map[:3].tolist() == [[0, 1], [2, 3], [4, 5]]
    resize_channels(handle, graph, {g.id: [0, 5, 9]})
    groups = {n.name: [a.i for a in n.attribute if a.name == "group"] for n in
              handle.model.graph.node if n.op_type == "Conv"}
    assert sorted(v[0] for v in groups.values() if v and v[0] > 1) == [13, 13]
    onnx.checker.check_model(handle.model, full_check=True)


def test_grouped_conv_removes_same_position_in_every_group():
    handle, graph = graph_of("grouped")
    g = group_with(graph, "w1")  # 16 channels into a 4-group conv (4 per group)
    assert g.size == 4
    assert member(g, "w1", 0).index_map.tolist() == [[0, 4, 8, 12], [1, 5, 9, 13],
                                                      [2, 6, 10, 14], [3, 7, 11, 15]]
    out = group_with(graph, "w7")  # 32 outputs = 4 groups x 8 positions
    assert out.size == 8 and member(out, "w7", 0).index_map.shape == (8, 4)


def test_concat_offsets():
    handle, graph = graph_of("concat")
    b = group_with(graph, "w7")
    cat = next(m for m in b.members if not m.stored and m.axis == 1 and m.index_map[0, 0] >= 8)
    assert cat.index_map.ravel().tolist() == list(range(8, 20))


def test_split_and_slice_rewrites():
    handle, graph = graph_of("split_slice")
    a, b = [g for g in graph.groups if "w1" in g.producers]
    assert (a.size, b.size) == (6, 10)
    sl = [g for g in graph.groups if "w21" in g.producers]
    assert sorted(g.size for g in sl) == [8, 8]  # sliced window and the unread rest
    window = next(g for g in sl if g.consumers)
    assert member(window, "w21", 0).index_map.ravel().tolist() == list(range(4, 12))
    rest = next(g for g in sl if not g.consumers)
    resize_channels(handle, graph, {a.id: [0, 1], b.id: [3], rest.id: [0, 1, 2]})
    nodes = {n.op_type: n for n in handle.model.graph.node}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in handle.model.graph.initializer}
    assert inits[nodes["Split"].input[1]].tolist() == [4, 9]
    # channels 0,1,2 (before the window at 4) removed: window now starts at 1
    assert inits[nodes["Slice"].input[1]].tolist() == [1]
    assert inits[nodes["Slice"].input[2]].tolist() == [9]
    onnx.checker.check_model(handle.model, full_check=True)


def test_flatten_block_map():
    handle, graph = graph_of("flatten_gemm")
    g = group_with(graph, "w1")
    gemm = member(g, next(c for c in g.consumers), 1)
    assert gemm.index_map.shape == (8, 16)
    assert gemm.index_map[2].tolist() == list(range(32, 48))


def test_heads_reshape_prunes_whole_heads():
    handle, graph = graph_of("attention")
    heads = next(g for g in graph.groups if g.size == 4 and g.frozen is None)
    q = member(heads, heads.producers[0], 1)
    assert q.index_map.shape == (4, 8) and q.index_map[1].tolist() == list(range(8, 16))
    # residual stream: frozen by the graph input and the LayerNorm statistics
    assert any("graph input" in (g.frozen or "") for g in graph.groups if g.size == 32)
    removed = select_channels(handle, graph, 0.5)
    mask_channels(handle, removed, graph)
    resize_channels(handle, graph, removed)
    onnx.checker.check_model(handle.model, full_check=True)
    shapes = [tuple(onnx.numpy_helper.to_array(t).tolist()) for t in handle.model.graph.initializer
              if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1 and t.dims[0] == 4]
    assert (1, 6, 2, 8) in shapes  # Reshape constant rewritten to 2 heads
    assert sum(1 for v in removed.values() if v) >= 2


def test_transpose_moves_axis():
    handle, graph = graph_of("transpose_nhwc")
    g = group_with(graph, "w1")
    assert any(not m.stored and m.axis == 3 for m in g.members)
    assert member(g, "w9", 0).roles == ("consumer",)


def test_conv_transpose_roles():
    handle, graph = graph_of("conv_transpose")
    g = group_with(graph, "w7")
    assert set(member(g, "w7", 1).roles) == {"producer"}
    assert member(g, "w13", 0).roles == ("producer",)  # depthwise ConvTranspose
    assert group_with(graph, "w1").consumers == ["w7"]


def test_constant_node_and_cast_weights():
    handle, graph = graph_of("constant_weight")
    names = {n for g in graph.groups for n in g.producers}
    assert {"constant1", "constant3"} <= names  # a Constant node, and fp16 Constant + Cast


def test_unknown_op_freezes_with_reason():
    handle, graph = graph_of("unknown_op")
    g = group_with(graph, "w1")
    assert "no channel rule for com.example:Mystery" in g.frozen
    assert all(g.frozen for g in graph.groups if g.producers)


def test_graph_output_conv_frozen():
    handle, graph = graph_of("output_conv")
    assert "graph output" in group_with(graph, "w7").frozen
    assert group_with(graph, "w1").frozen is None


def test_subgraph_read_freezes():
    g = G(20)
    y = g.op("Relu", [g.conv("x", 3, 8)])
    body = helper.make_graph([helper.make_node("Identity", [y], ["t"])], "b", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    cond = g.c(np.array(True))
    z = g.op("If", [cond], then_branch=body, else_branch=body)
    m = g.model(IMG, [g.conv(y, 8, 4, k=1), z])
    graph = build_channel_graph(load(m))
    assert "read inside a subgraph" in group_with(graph, "w1").frozen


def test_layernorm_axis_frozen_and_broadcast_constants():
    handle, graph = graph_of("attention")
    frozen = [r for _, r in graph.frozen()]
    assert any("LayerNormalization normalizes" in r or "graph input" in r for r in frozen)
    handle, graph = graph_of("residual")
    g = group_with(graph, "w1")
    assert any(m.roles == ("factor",) for m in g.members)  # per-channel Mul constant


def test_reshape_blocks():
    assert _reshape_blocks([1, 64, 7, 7], [1, 3136]) == [([0], [0]), ([1, 2, 3], [1])]
    assert _reshape_blocks([1, 6, 32], [1, 6, 4, 8]) == [([0], [0]), ([1], [1]),
                                                          ([2], [2, 3])]
    assert _reshape_blocks(["N", 16, 1, 1], ["N", 16]) == [([0], [0]), ([1], [1]), ([2], []),
                                                            ([3], [])]
    assert _reshape_blocks([6, 4], [4, 6]) == [([0, 1], [0, 1])]  # 2->2: frozen by the rule


def test_components():
    lab = _components(6, np.array([0, 2, 4]), np.array([1, 3, 2]))
    assert lab.tolist() == [0, 0, 2, 2, 2, 5]


@pytest.mark.parametrize("n,s,k,m,want", [(64, 0.3, 1, 1, 45), (64, 0.3, 8, 1, 48),
                                          (64, 0.5, 8, 1, 32), (6, 0.5, 8, 1, 6),
                                          (10, 0.95, 8, 1, 8), (64, 0.9, 1, 16, 16),
                                          (4, 0.99, 1, 1, 1)])
def test_kept_count(n, s, k, m, want):
    assert kept_count(n, s, k, m) == want


def test_round_to_keeps_multiples():
    handle, graph = graph_of("conv_bn_relu")
    removed = select_channels(handle, graph, 0.3, round_to=8)
    for gid, units in removed.items():
        n = graph.groups[gid].size
        assert (n - len(units)) % 8 == 0 or n <= 8


def test_global_scope_respects_cap_and_user_scores():
    handle, graph = graph_of("conv_bn_relu")
    g = group_with(graph, "w1")
    scores = np.arange(16, dtype=float)[::-1] + 1  # unit 15 least important
    removed = select_channels(handle, graph, 0.25, channel_scores={"w1": scores})
    assert removed[g.id] == [12, 13, 14, 15]
    removed = select_channels(handle, graph, 0.85, scope="global", max_group_sparsity=0.5)
    for gid, units in removed.items():
        assert len(units) <= graph.groups[gid].size * 0.5


def test_external_data_roundtrip(tmp_path):
    model = BUILDERS["conv_bn_relu"]()
    src = tmp_path / "m.onnx"
    onnx.save(copy.deepcopy(model), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    out = onnxprune.prune(src, pattern="channel", sparsity=0.5,
                          output=tmp_path / "p.onnx").output
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    ref = load(copy.deepcopy(model))
    graph = build_channel_graph(ref)
    removed = select_channels(ref, graph, 0.5)
    assert any(removed.values())
    mask_channels(ref, removed, graph)
    feeds = feeds_for(model)
    for a, b in zip(run(pruned, feeds), run(ref.model, feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5)
