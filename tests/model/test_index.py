"""The graph index (onnxprune.model.index): producers, consumers, readers, stored tensors by
scope, labels and keys, attributes, opset; and staying in step with the graph it indexes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import if_subgraph_model, make_model, run
from onnxprune.channels.dead import apply_folds, find_dead
from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import resize_channels
from onnxprune.model.index import (GraphIndex, attr, constant_tensor, names_read, node_key,
                                   node_label, opset)
from onnxprune.model.io import load

vi = helper.make_tensor_value_info


def _scoped_model() -> onnx.ModelProto:
    """Main graph: a Constant weight, an initializer, an unnamed Relu, and an If whose branches
    read outer values (an activation, the initializer) and hold their own stored tensors."""
    r = np.random.default_rng(0)
    w = numpy_helper.from_array(r.standard_normal((4, 4)).astype(np.float32), "W")
    k = numpy_helper.from_array(r.standard_normal((4, 4)).astype(np.float32), "K")
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["T"],
                          value=numpy_helper.from_array(np.eye(4, dtype=np.float32), "T")),
         helper.make_node("MatMul", ["h", "T"], ["t0"], name="mm_then"),
         helper.make_node("Add", ["t0", "W"], ["t"], name="add_then")],
        "then", [], [vi("t", TensorProto.FLOAT, [4, 4])])
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["n"], name="neg_else"),
         helper.make_node("Add", ["n", "E"], ["e"], name="add_else")],
        "else", [], [vi("e", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(np.ones((4, 4), np.float32), "E")])
    nodes = [
        helper.make_node("Constant", [], ["C"], value=k, name="const"),
        helper.make_node("MatMul", ["x", "C"], ["m"], name="mm"),
        helper.make_node("Relu", ["m"], ["h"]),  # unnamed
        helper.make_node("Add", ["h", "h"], ["hh"], name="twice"),
        helper.make_node("MatMul", ["hh", "W"], ["y0"], name="mm_w"),
        helper.make_node("If", ["cond"], ["y1"], then_branch=then_g, else_branch=else_g,
                         name="if"),
        helper.make_node("Gemm", ["y0", "W"], ["y2"], name="gemm", transB=1),
    ]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, [4, 4]), vi("cond", TensorProto.BOOL, [])],
                      [vi("y0", TensorProto.FLOAT, [4, 4]), vi("y1", TensorProto.FLOAT, [4, 4]),
                       vi("y2", TensorProto.FLOAT, [4, 4])], [w])


def test_producers_consumers_and_readers_of_the_main_graph():
    idx = GraphIndex(_scoped_model())
    assert [n.op_type for n in idx.nodes] == ["Constant", "MatMul", "Relu", "Add", "MatMul",
                                              "If", "Gemm"]
    assert idx.producer("h").op_type == "Relu" and idx.producer_position("h") == 2
    assert idx.producer("x") is None and idx.producer("W") is None  # input, initializer
    assert idx.producer("C").name == "const"  # a Constant produces its value
    # Direct inputs with their slot; a node reading twice is listed twice, once as a node.
    assert [(n.name, i) for n, i in idx.consumers("h")] == [("twice", 0), ("twice", 1)]
    assert [n.name for n in idx.consumer_nodes("h")] == ["twice"]
    assert [(n.name, i) for n, i in idx.consumers("W")] == [("mm_w", 1), ("gemm", 1)]
    # Readers add the nodes whose subgraphs read the name from outside.
    assert [n.name for n in idx.readers("h")] == ["twice", "if"]
    assert [n.name for n in idx.readers("W")] == ["mm_w", "if", "gemm"]
    assert idx.reads(idx.nodes[5]) == names_read(idx.nodes[5]) == {"cond", "h", "W"}
    assert [idx.position(n) for n in idx.nodes] == list(range(7))
    assert idx.find("mm_w") is idx.nodes[4]
    assert idx.find(node_key(idx.nodes[2])) is idx.nodes[2]  # unnamed: its first output


def test_stored_tensors_by_scope():
    model = _scoped_model()
    idx = GraphIndex(model)
    assert sorted(idx.stored) == ["C", "W"]  # initializer and Constant value, main graph only
    assert idx.stored["W"] is not None and list(idx.stored["C"].dims) == [4, 4]
    assert list(idx.scopes) == ["test", "test/if.else_branch", "test/if.then_branch"]
    then_s, else_s = idx.scopes["test/if.then_branch"], idx.scopes["test/if.else_branch"]
    assert then_s.parent is idx.main and then_s.owner.name == "if"
    assert sorted(then_s.stored) == ["T"] and sorted(else_s.stored) == ["E"]
    # A subgraph sees its own and the outer stored tensors; an activation is not stored.
    assert then_s.lookup_stored("W") is idx.stored["W"]
    assert else_s.lookup_stored("E") is else_s.stored["E"]
    assert else_s.lookup_stored("n") is None and then_s.lookup_stored("h") is None
    assert then_s.producer("t").name == "add_then"
    assert [n.name for n, _ in then_s.consumers["W"]] == ["add_then"]
    # Every direct read of a name, in any scope, each node once.
    assert idx.read_anywhere("W") == 3  # mm_w, gemm, add_then
    assert idx.read_anywhere("h") == 3  # twice, mm_then, neg_else
    assert constant_tensor(idx.nodes[0]) is idx.stored["C"]
    assert constant_tensor(idx.nodes[1]) is None


def test_stored_tensors_in_if_subgraph_model_match_find_weights_sources():
    idx = GraphIndex(if_subgraph_model())
    scopes = {path.split("/")[-1]: s for path, s in idx.scopes.items()}
    assert sorted(scopes["if.then_branch"].stored) == ["W_then"]
    assert sorted(scopes["if.else_branch"].stored) == ["W_else"]
    assert sorted(idx.stored) == ["W_outer"]
    assert scopes["if.else_branch"].lookup_stored("W_outer") is idx.stored["W_outer"]
    assert [n.name for n in idx.readers("W_outer")] == ["if"]
    assert idx.consumers("W_outer") == []  # read only inside the body


def test_labels_keys_attributes_and_opset():
    model = _scoped_model()
    idx = GraphIndex(model)
    relu, gemm = idx.nodes[2], idx.nodes[6]
    assert node_label(relu) == "Relu(h)" and node_key(relu) == "h"
    assert node_label(gemm) == node_key(gemm) == "gemm"
    assert attr(gemm, "transB") == 1 and attr(gemm, "alpha", 1.0) == 1.0
    assert attr(gemm, "transA") is None
    assert idx.opset() == opset(model) == 17
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert opset(model, "com.microsoft") == 1 and opset(model, "ai.onnx") == 17
    assert GraphIndex(model.graph).opset() == 1  # a bare graph carries no opset


def test_handle_index_is_cached_per_model_state():
    handle = load(_scoped_model())
    idx = handle.index
    assert handle.index is idx
    # Writing values keeps the same TensorProto: no rebuild, the stored entry sees the values.
    handle.write(idx.stored["W"], np.zeros((4, 4), np.float32))
    assert handle.index is idx and not handle.read(idx.stored["W"]).any()
    # A node added without telling: the counts moved, the index is rebuilt.
    handle.model.graph.node.append(helper.make_node("Relu", ["y2"], ["y3"], name="late"))
    assert handle.index is not idx and handle.index.producer("y3").name == "late"
    # An in-place edit the counts cannot see is announced with graph_changed().
    idx = handle.index
    handle.model.graph.node[-1].input[0] = "y0"
    assert handle.index is idx  # stale until told
    handle.graph_changed()
    assert [n.name for n in handle.index.consumer_nodes("y0")] == ["gemm", "late"]
    # A new proto behind the handle is a new model state.
    handle.model = _scoped_model()
    assert handle.index.producer("y3") is None


def _fold_model() -> onnx.ModelProto:
    """x @ W1 + b1 -> Relu -> @ W2 (unnamed), with W1's column 2 zero and b1[2] = 1.5: channel
    2 is the constant relu(1.5), folded into an Add inserted after the second MatMul."""
    r = np.random.default_rng(3)
    w1 = r.standard_normal((8, 6)).astype(np.float32)
    w1[:, 2] = 0
    b1 = r.standard_normal(6).astype(np.float32)
    b1[2] = 1.5
    w2 = r.standard_normal((6, 4)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
         helper.make_node("Add", ["h", "b1"], ["a"], name="add1"),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        [vi("x", TensorProto.FLOAT, [2, 8])], [vi("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "W2")])


def test_index_follows_a_dead_channel_fold_that_inserts_a_node():
    model = _fold_model()
    x = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)
    want = run(model, {"x": x})[0]
    handle = load(model)
    before = handle.index
    graph = build_channel_graph(handle)
    folds = [f for _, _, fs, _ in find_dead(handle, graph) for f in fs]
    assert len(folds) == 1
    notes = apply_folds(handle, graph, folds)
    assert notes == ["unit 2 (constant 1.5) folded into MatMul 'y'"]
    idx = handle.index
    assert idx is not before
    assert [n.op_type for n in idx.nodes] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
    assert idx.producer("y").op_type == "Add" and idx.producer("y").name == "y_fold"
    assert [n.op_type for n in idx.consumer_nodes("y_prefold")] == ["Add"]
    assert idx.nodes[-1].input[1] in idx.stored  # the folded constant, a new initializer
    np.testing.assert_allclose(run(handle.model, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_index_follows_a_channel_resize():
    model = _fold_model()
    handle = load(model)
    graph = build_channel_graph(handle)
    group = next(g for g in graph.prunable() if "W1" in g.producers)
    before = handle.index
    resize_channels(handle, graph, {group.id: [0, 1]})
    idx = handle.index
    assert idx is not before
    for t in handle.model.graph.initializer:
        assert idx.stored[t.name] is not None
        assert list(idx.stored[t.name].dims) == list(t.dims)
    assert list(idx.stored["W1"].dims) == [8, 4] and list(idx.stored["W2"].dims) == [4, 4]
    assert idx.producer("y").op_type == "MatMul"


def test_a_value_of_a_subgraph_shadows_an_outer_stored_tensor():
    # Not valid SSA (the checker refuses it), but exporters emit it: the inner value wins.
    body = helper.make_graph([helper.make_node("Neg", ["x"], ["W"]),
                              helper.make_node("Add", ["W", "W"], ["t"])],
                             "then", [], [vi("t", TensorProto.FLOAT, [3])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body, name="if")],
        "g", [vi("x", TensorProto.FLOAT, [3]), vi("cond", TensorProto.BOOL, [])],
        [vi("y", TensorProto.FLOAT, [3])], [numpy_helper.from_array(np.ones(3, np.float32), "W")])
    idx = GraphIndex(helper.make_model(graph))
    assert idx.scopes["g/if.then_branch"].lookup_stored("W") is None
    assert idx.scopes["g/if.then_branch"].lookup_stored("x") is None
    assert idx.main.lookup_stored("W") is idx.stored["W"]


def test_constant_nodes_of_the_onnx_domain_only_are_stored():
    value = numpy_helper.from_array(np.ones(3, np.float32), "v")
    model = make_model(
        [helper.make_node("Constant", [], ["c"], value=value),
         helper.make_node("Add", ["x", "c"], ["y"])],
        [vi("x", TensorProto.FLOAT, [3])], [vi("y", TensorProto.FLOAT, [3])])
    idx = GraphIndex(model)
    assert list(idx.stored) == ["c"]
    custom = onnx.NodeProto()
    custom.CopyFrom(model.graph.node[0])
    custom.domain = "custom"
    assert constant_tensor(custom) is None
