"""``inspect``: prunable weights, their sparsity and the patterns they already satisfy."""

from __future__ import annotations

import io as stdio
import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxprune.report.inspect import inspect_model, satisfies_blocks, satisfies_nm

OPSET = [helper.make_opsetid("", 17)]


def _two_four(rows, cols, seed=0):
    """Random W[out, in] with the 2 largest of every 4 consecutive `in` elements kept."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    groups = w.reshape(rows, cols // 4, 4)
    order = np.argsort(np.abs(groups), axis=2)
    np.put_along_axis(groups, order[:, :, :2], 0.0, axis=2)
    return groups.reshape(rows, cols)


def _model():
    # conv: [Cout=8, Cin=4, 1, 1] -> W[out=8, in=4]; 2:4 on each row.
    conv_w = _two_four(8, 4).reshape(8, 4, 1, 1)
    # Gemm B [K=8, N=8] (transB=0): W[out, in] = B.T; zero whole blocks of 4 out rows.
    gemm_w2d = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    gemm_w2d[:4, 2] = 0
    gemm_w2d[4:, 5] = 0
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "gw"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(conv_w, "cw"),
         numpy_helper.from_array(np.ascontiguousarray(gemm_w2d.T), "gw")])
    return helper.make_model(graph, opset_imports=OPSET)


def test_inspect_rows_patterns_and_macs(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    report = inspect_model(path, {"x": (2, 4, 6, 6)})
    conv, fc = report.rows
    assert (conv.name, conv.op_type, conv.shape, conv.params) == ("cw", "Conv", (8, 4, 1, 1), 32)
    assert conv.nonzeros_before == conv.nonzeros_after == 16
    assert conv.pattern == "2:4"
    assert conv.macs_before == 2 * 8 * 36 * 4
    assert (fc.name, fc.pattern, fc.nonzeros_before) == ("gw", "4x1", 56)
    assert fc.macs_before == 2 * 8 * 8
    assert report.params_before == report.params_after == 96
    assert report.nonzeros_before == 72
    assert report.macs_before == 2 * 8 * 36 * 4 + 2 * 64
    assert report.sparse_macs_after == 2 * 8 * 36 * 4 // 2 + 2 * 56
    assert report.file_size_before == path.stat().st_size
    assert report.sections["inputs"] == [{"name": "x", "dtype": "float32",
                                          "declared": "[N, 4, 6, 6]",
                                          "shape used": [2, 4, 6, 6]}]
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [r["pattern"] for r in d["rows"]] == ["2:4", "4x1"]

    console = Console(record=True, width=120, file=stdio.StringIO(), color_system=None)
    report.render(console)
    text = console.export_text()
    assert "cw" in text and "gw" in text and "2:4" in text and "50.0%" in text


def test_inspect_without_input_shape_notes_instead_of_failing():
    model = _model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    report = inspect_model(model)
    assert report.macs_before == 0
    assert any("declare no shape" in n for n in report.notes)
    assert any("not counted" in n for n in report.notes)


def test_pattern_checks():
    w = _two_four(4, 8)
    assert satisfies_nm(w, 2, 4) and not satisfies_nm(w, 1, 4)
    assert not satisfies_nm(np.ones((2, 4)), 2, 4)
    # ragged tail: 6 columns = one group of 4 and a tail of 2 padded with zeros
    assert satisfies_nm(np.array([[1, 1, 0, 0, 1, 1]]), 2, 4)
    assert not satisfies_nm(np.array([[1, 1, 0, 0, 1, 1]]), 1, 4)

    blocks = np.ones((6, 3))
    assert not satisfies_blocks(blocks, 4, 1)  # dense: nothing to satisfy
    blocks[:4, 1] = 0
    assert satisfies_blocks(blocks, 4, 1)
    blocks[4, 2] = 0  # ragged 2x1 edge block half zero
    assert not satisfies_blocks(blocks, 4, 1)
    blocks[5, 2] = 0
    assert satisfies_blocks(blocks, 4, 1)
    blocks[0, 0] = 0
    assert not satisfies_blocks(blocks, 4, 1)


def test_inspect_says_what_channel_pruning_can_reach():
    """MatMul(8->6) -> Relu -> MatMul(6->3) -> output: the hidden width can lose channels, the
    output's cannot (a graph output keeps its shape); inspect lists the frozen group with why
    and the share of params in weights a channel pruning would change (all 66: both weights)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = inspect_model(model)
    assert len(report.frozen) == 1 and "w2" in report.frozen[0][0]
    assert "graph output 'y' keeps its shape" in report.frozen[0][1]
    note = next(n for n in report.notes if n.startswith("channel pruning"))
    assert "1 of 2 channel groups can lose channels" in note and "100% of the params" in note
