"""com.microsoft DynamicQuantizeLSTM (ops/recurrent.py): int8 W/R stored transposed follow the
LSTM hidden-unit rule, per-row scales / zero points are sliced, N:M groups run along the input
axis, and computed zero initial states are dropped on resize (plain LSTM too)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune
from channel_models import assert_close, feeds_for, masked_and_resized, run
from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.ops.layouts import layout_for
from quant_models import dq_lstm, lstm_zero_state


def node_of(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("per_row", [False, True])
def test_hidden_units_removed_exactly(per_row):
    model = dq_lstm(per_row=per_row)
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    node = node_of(resized, "DynamicQuantizeLSTM")
    assert next(a.i for a in node.attribute if a.name == "hidden_size") == 4
    w, r = inits(resized)[node.input[1]], inits(resized)[node.input[2]]
    assert (w.shape, r.shape, w.dtype, r.dtype) == ((2, 4, 16), (2, 4, 16), np.int8, np.int8)
    scales = [inits(resized)[node.input[i]].shape for i in (8, 9, 10, 11)]
    assert scales == ([(2, 16)] * 4 if per_row else [(2,)] * 4)
    # the zero initial states (ConstantOfShape -> Slice) are dropped: absent means zeros
    assert list(node.input[5:7]) == ["", ""]


def test_layout_and_two_four_along_the_input_axis():
    node = helper.make_node("DynamicQuantizeLSTM", ["x", "w", "r"], ["y"],
                            domain="com.microsoft", hidden_size=8)
    lay = layout_for(node, 1, (2, 12, 32))
    assert (lay.shape2d, lay.out_axis, lay.in_axis) == ((64, 12), 2, 1)
    model = dq_lstm()
    result = onnxprune.prune(copy.deepcopy(model), pattern="2:4", validate=True)
    onnx.checker.check_model(result.model, full_check=True)
    node = node_of(result.model, "DynamicQuantizeLSTM")
    for i in (1, 2):
        arr = inits(result.model)[node.input[i]]
        assert arr.dtype == np.int8
        groups = arr.transpose(0, 2, 1).reshape(2, 32, -1, 4)  # 4 consecutive inputs per row
        assert (np.count_nonzero(groups, axis=-1) == 2).all()  # zero point 0: 2 zeros of 4


def test_channel_pattern_through_the_api():
    model = dq_lstm()
    result = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.25,
                             validate=True)
    onnx.checker.check_model(result.model, full_check=True)
    node = node_of(result.model, "DynamicQuantizeLSTM")
    assert next(a.i for a in node.attribute if a.name == "hidden_size") == 6
    assert run(result.model, feeds_for(model))[0].shape == (5, 2, 3)


def test_nonzero_zero_point_freezes_the_units():
    model = dq_lstm()
    node = node_of(model, "DynamicQuantizeLSTM")
    for t in model.graph.initializer:
        if t.name == node.input[11]:
            t.CopyFrom(numpy_helper.from_array(np.array([0, 3], np.int8), t.name))
    g = build_channel_graph(load(model))
    group = g.group_of(node.input[2])
    assert f"quantized weight '{node.input[2]}': its zero point is not 0" in group.frozen


def test_plain_lstm_zero_state_is_dropped_not_frozen():
    model = lstm_zero_state()
    g = build_channel_graph(load(copy.deepcopy(model)))
    lstm = node_of(model, "LSTM")
    assert g.group_of(lstm.input[2]).prunable
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert list(node_of(resized, "LSTM").input[5:7]) == ["", ""]


def test_macs_of_custom_domain_ops_are_counted():
    from onnxprune.report.macs import count_macs
    from quant_models import matmul_nbits

    counted = count_macs(dq_lstm())
    lstm = next(k for k, op in counted.op_types.items() if op == "DynamicQuantizeLSTM")
    # seq 5 * batch 2 * (numel W + numel R) = 10 * (2*8*32 + 2*8*32)
    assert counted.per_node[lstm] == 10 * 1024
    nbits = count_macs(matmul_nbits())
    assert 4 * 12 * 32 in nbits.per_node.values()
