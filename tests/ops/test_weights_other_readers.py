"""A weight that something else reads too (a tied embedding table read by Gather and by the
LM-head MatMul; a weight also fed to Add/ReduceSum or a graph output, directly or through a
pass-through op) is left alone, listed in the skipped weights with a reason naming the other
reader — never changed silently under it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as B
import onnxprune
from onnxprune.model.io import ModelHandle
from onnxprune.ops.weights import find_weights
from onnxprune.report.reasons import explain

vi = helper.make_tensor_value_info


def _tied_embeddings() -> onnx.ModelProto:
    """ids -> Gather(E) -> h; logits = h @ E^T (MatMul on Transpose(E)); plus an ordinary
    prunable W so the run has something to prune."""
    r = B.rng(0)
    inits = [numpy_helper.from_array(r.standard_normal((32, 16)).astype(np.float32), "E"),
             numpy_helper.from_array(r.standard_normal((16, 16)).astype(np.float32), "W")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["h2"], name="mlp"),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="tie"),
             helper.make_node("MatMul", ["h2", "Et"], ["logits"], name="lm_head")]
    return B.make_model(nodes, [vi("ids", TensorProto.INT64, [1, 5])],
                        [vi("logits", TensorProto.FLOAT, [1, 5, 32])], inits)


def _also(reader: str) -> onnx.ModelProto:
    """y = x @ W (+ W2 prunable), with W also read by ``reader``."""
    r = B.rng(1)
    inits = [numpy_helper.from_array(r.standard_normal((16, 8)).astype(np.float32), "W"),
             numpy_helper.from_array(r.standard_normal((8, 8)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2")]
    outputs = [vi("y", TensorProto.FLOAT, [2, 8])]
    if reader == "add":
        nodes.append(helper.make_node("Add", ["W", "W"], ["w_sum"], name="double"))
        outputs.append(vi("w_sum", TensorProto.FLOAT, [16, 8]))
    elif reader == "reducesum":
        nodes.append(helper.make_node("ReduceSum", ["W"], ["w_total"], keepdims=0,
                                      name="total"))
        outputs.append(vi("w_total", TensorProto.FLOAT, []))
    elif reader == "output":
        outputs.append(vi("W", TensorProto.FLOAT, [16, 8]))
    elif reader == "cast_output":  # through a pass-through op, then a graph output
        nodes.append(helper.make_node("Identity", ["W"], ["W_id"], name="ident"))
        outputs.append(vi("W_id", TensorProto.FLOAT, [16, 8]))
    return B.make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 16])], outputs, inits)


READERS = {"add": "Add 'double'", "reducesum": "ReduceSum 'total'", "output": "graph output 'W'",
           "cast_output": "graph output 'W_id'"}


def _skipped(model):
    weights, skipped = find_weights(ModelHandle(model=model))
    return [w.name for w in weights], {s.name: s.reason for s in skipped}


def test_tied_embedding_table_left_alone_naming_gather():
    names, skipped = _skipped(_tied_embeddings())
    assert names == ["W"]
    assert "also read by Gather 'embed'" in skipped["E"]
    model = _tied_embeddings()
    res = onnxprune.prune(model, sparsity=0.5)
    out = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    np.testing.assert_array_equal(out["E"], numpy_helper.to_array(model.graph.initializer[0]))
    assert (out["W"] == 0).sum() == 128
    assert ("E", explain("weight", skipped["E"])) in [tuple(s) for s in res.report.skipped]


@pytest.mark.parametrize("reader", sorted(READERS))
def test_weight_with_another_reader_left_alone(reader):
    model = _also(reader)
    names, skipped = _skipped(model)
    assert names == ["W2"]
    assert skipped["W"].startswith(f"also read by {READERS[reader]}")
    res = onnxprune.prune(model, sparsity=0.5, resize=False)
    out = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    np.testing.assert_array_equal(out["W"], numpy_helper.to_array(model.graph.initializer[0]))
    assert [r.name for r in res.report.rows] == ["W2"]


def test_weight_read_by_a_subgraph_non_prunable_node_left_alone():
    r = B.rng(2)
    w = numpy_helper.from_array(r.standard_normal((16, 8)).astype(np.float32), "W")
    then = helper.make_graph([helper.make_node("ReduceMax", ["W"], ["m"], keepdims=0)], "then",
                             [], [vi("m", TensorProto.FLOAT, [])])
    other = helper.make_graph([helper.make_node("ReduceMin", ["W"], ["n"], keepdims=0)], "else",
                              [], [vi("n", TensorProto.FLOAT, [])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("If", ["c"], ["z"], then_branch=then, else_branch=other,
                              name="branch")]
    model = B.make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 16]),
                                 vi("c", TensorProto.BOOL, [])],
                         [vi("y", TensorProto.FLOAT, [2, 8]), vi("z", TensorProto.FLOAT, [])],
                         [w])
    names, skipped = _skipped(model)
    assert names == [] and skipped["W"].startswith("also read by ")
    assert "ReduceMax 'ReduceMax(m)'" in skipped["W"] and "ReduceMin 'ReduceMin(n)'" in skipped["W"]


def test_channel_pruning_names_the_other_reader_of_a_resized_tied_table():
    # E's column axis is tied (through Gather and Transpose) to W's channels: removing them
    # slices E too, consistently for both readers, and the report says so by name
    model = _tied_embeddings()
    res = onnxprune.prune(model, sparsity=0.5, pattern="channel")
    out = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    assert out["E"].shape == (32, 8) and out["W"].shape == (8, 8)
    note = [n for n in res.report.notes if n.startswith("'E'")]
    assert note == ["'E' (not pruned as a weight: also read by Gather 'embed') lost the "
                    "channels of its group: 32x16 -> 32x8; those readers see the same channels "
                    "removed"]
    assert res.report.comparison["logits"].ok
