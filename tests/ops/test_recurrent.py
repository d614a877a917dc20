"""Registry entries of the recurrent family (ops/recurrent.py): LSTM / GRU / RNN weight layouts
(N:M groups and unstructured masks along the input axis of W and R), the channel pattern
through the API, and dead hidden units."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from channel_models import G, assert_close, feeds_for, run
from onnxprune.channels.dead import remove_dead_channels
from onnxprune.model.io import load
from onnxprune.ops.layouts import layout_for, prunable_op_types
from recurrent_models import BATCH, FEAT, GATES, recurrent, single, stacked_bilstm


def wide(op: str, dirs: int, width: int = 8, hidden: int = 8):
    """Input width and hidden size multiples of 4, so every N:M group is whole."""
    g = G(3)
    x = g.op("MatMul", ["x", g.w([FEAT, width])])
    y = recurrent(g, op, x, width, hidden, dirs)[1]  # Y_h [dirs, batch, H]
    t = g.op("Transpose", [y], perm=[1, 0, 2])
    flat = g.op("Reshape", [t, g.c(np.array([BATCH, dirs * hidden], np.int64))])
    out = g.op("Gemm", [flat, g.w([3, dirs * hidden])], transB=1)
    return g.model([("x", [5, BATCH, FEAT])], [out])


def weights_of(model, op):
    node = next(n for n in model.graph.node if n.op_type == op)
    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return vals[node.input[1]], vals[node.input[2]]


def test_layout_is_gate_rows_by_input():
    node = onnx.helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=6)
    w = layout_for(node, 1, (2, 24, 7))
    r = layout_for(node, 2, (2, 24, 6))
    assert (w.shape2d, w.out_axis, w.in_axis) == ((48, 7), 1, 2)
    assert (r.shape2d, r.out_axis, r.in_axis) == ((48, 6), 1, 2)
    assert layout_for(node, 3, (2, 48)) is None  # B is no weight matrix
    arr = np.arange(2 * 24 * 7).reshape(2, 24, 7)
    assert np.array_equal(w.to_2d(arr)[24 + 5], arr[1, 5])  # direction 1, row 5
    assert np.array_equal(w.from_2d(w.to_2d(arr)), arr)
    assert {"LSTM", "GRU", "RNN"} <= set(prunable_op_types())


@pytest.mark.parametrize("op,dirs", [("LSTM", 2), ("GRU", 1), ("RNN", 2)])
def test_two_four_groups_run_along_the_input_axis(op, dirs):
    model = wide(op, dirs)
    result = onnxprune.prune(model, pattern="2:4", validate=True)
    onnx.checker.check_model(result.model, full_check=True)
    for arr in weights_of(result.model, op):
        groups = arr.reshape(arr.shape[0], arr.shape[1], -1, 4)  # 4 consecutive inputs
        assert (np.count_nonzero(groups, axis=-1) == 2).all()
    w0, r0 = weights_of(model, op)
    assert result.state.layers[next(k for k in result.state.layers
                                    if result.state.layers[k].shape == w0.shape)
                                ].nonzeros_after == w0.size // 2
    feeds = feeds_for(model)
    run(result.model, feeds)  # onnxruntime runs it


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_unstructured_masks_w_and_r(op):
    model = wide(op, 2)
    result = onnxprune.prune(model, pattern="unstructured", sparsity=0.5)
    w, r = weights_of(result.model, op)
    w0, r0 = weights_of(model, op)
    assert np.count_nonzero(w) == w.size // 2 and np.count_nonzero(r) == r.size // 2
    # the largest magnitudes are kept, the rest zeroed in place
    for a, a0 in ((w, w0), (r, r0)):
        kept = np.abs(a0[a != 0])
        assert kept.min() >= np.abs(a0[a == 0]).max()
        assert np.array_equal(a[a != 0], a0[a != 0])


def test_channel_pattern_through_the_api():
    model = stacked_bilstm()
    result = onnxprune.prune(model, pattern="channel", sparsity=0.5, validate=True)
    onnx.checker.check_model(result.model, full_check=True)
    rep = result.report
    # weights only: embed 56 -> 32, layer 1 W 336 -> 96, R 288 -> 72, layer 2 W 480 -> 144,
    # R 200 -> 72, Gemm 30 -> 18 (hidden 6 -> 3 and 5 -> 3, features 7 -> 4)
    assert (rep.params_before, rep.params_after) == (1390, 434)
    assert not [f for f in result.report.to_dict()["frozen"] if "LSTM" in str(f)]
    lstms = [n for n in result.model.graph.node if n.op_type == "LSTM"]
    assert [[a.i for a in n.attribute if a.name == "hidden_size"] for n in lstms] == [[3], [3]]
    run(result.model, feeds_for(model))


def _edit(model, name, fn):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), t.name))


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_unread_hidden_unit_is_removed_exactly(op):
    # Unit 2's output is read by nobody (R's column 2 and the classifier's rows zero): the dead
    # step removes it from every gate and direction, outputs unchanged.
    model = single(op, 2, 6, gemm=True)
    node = next(n for n in model.graph.node if n.op_type == op)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")

    def no_col(a):
        a[:, :, 2] = 0
        return a

    def no_rows(a):
        a[:, [2, 8]] = 0
        return a
    _edit(model, node.input[2], no_col)
    _edit(model, gemm.input[1], no_rows)
    handle = load(copy.deepcopy(model))
    dead = remove_dead_channels(handle)
    assert dead.channels_removed == 1
    out = handle.model
    onnx.checker.check_model(out, full_check=True)
    gates = GATES[op]
    w, r = weights_of(out, op)
    assert w.shape == (2, gates * 5, 7) and r.shape == (2, gates * 5, 5)
    feeds = feeds_for(model)
    assert_close(run(out, feeds), run(model, feeds))


def test_zero_rows_unit_is_kept():
    # A unit whose W/R rows are all zero still evolves from its bias (c = f c + i g over time):
    # no per-channel constant, so it is not folded away.
    model = single("LSTM", 1, 6)
    node = next(n for n in model.graph.node if n.op_type == "LSTM")

    def no_rows(a):
        a[:, [1, 7, 13, 19], :] = 0
        return a
    _edit(model, node.input[1], no_rows)
    _edit(model, node.input[2], no_rows)
    handle = load(copy.deepcopy(model))
    dead = remove_dead_channels(handle)
    assert dead.channels_removed == 0
    assert len(dead.kept_nonzero_const) == 1 and "channel 1:" in dead.kept_nonzero_const[0]
    feeds = feeds_for(model)
    assert_close(run(handle.model, feeds), run(model, feeds))


def test_channel_refit_fits_the_input_weights_and_r():
    # --refit refits W (its activation X is a graph tensor) toward the dense model, and R on the
    # previous hidden states rebuilt from Y (calibration/extract.py RecurrentStateExtractor).
    # The refit brings the output closer to the dense one than plain removal.
    model = stacked_bilstm()
    rng = np.random.default_rng(0)
    cal = {"x": rng.standard_normal((40, BATCH, FEAT)).astype(np.float32)}
    feeds = [{"x": rng.standard_normal((5, BATCH, FEAT)).astype(np.float32)} for _ in range(4)]
    dense = [run(model, f)[0] for f in feeds]
    errs = []
    for refit in (False, True):
        res = onnxprune.prune(model, pattern="channel", sparsity=0.25, refit=refit,
                              calibration=cal)
        errs.append(np.mean([np.abs(run(res.model, f)[0] - d).mean()
                             for f, d in zip(feeds, dense)]))
        rec = next(r for r in res.state.records if hasattr(r, "refit"))
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert {n.input[1] for n in lstms} | {n.input[2] for n in lstms} <= set(rec.refit)
    assert errs[1] < errs[0] / 2


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_calibrated_criteria_prune_w_and_r_on_their_activations(criterion):
    # W's input is X (a graph tensor); R's is the previous hidden state, rebuilt from Y shifted
    # by one step: both get statistics and are pruned by the calibrated criterion.
    model = stacked_bilstm()
    cal = {"x": np.random.default_rng(0).standard_normal((40, BATCH, FEAT)).astype(np.float32)}
    res = onnxprune.prune(model, pattern="unstructured", sparsity=0.5, criterion=criterion,
                          calibration=cal)
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    skipped = {s.name: s.reason for s in res.state.skipped}
    for node in lstms:
        for name in node.input[1:3]:
            assert name in res.state.layers and name not in skipped
    w, r = weights_of(res.model, "LSTM")
    assert np.count_nonzero(r) < r.size and np.count_nonzero(w) < w.size


def test_constant_feature_into_lstm_is_kept_with_the_reason():
    # Feature 3 of the embedding is the constant 0.7 (zero column, bias 0.7): folding it would
    # mean moving W[:, :, 3] * 0.7 into B's input half, which is not done, so it stays.
    g = G(0)
    w = g.w([FEAT, 7])
    x = g.op("Add", [g.op("MatMul", ["x", w]), g.c(np.full(7, 0.7, np.float32))])
    y = recurrent(g, "LSTM", x, 7, 6, 1)[0]
    out = g.op("MatMul", [g.op("Squeeze", [y, g.c(np.array([1], np.int64))]), g.w([6, 3])])
    model = g.model([("x", [5, BATCH, FEAT])], [out])

    def no_col(a):
        a[:, 3] = 0
        return a
    _edit(model, w, no_col)
    handle = load(copy.deepcopy(model))
    dead = remove_dead_channels(handle)
    assert dead.channels_removed == 0
    assert len(dead.kept_nonzero_const) == 1
    assert "channel 3" in dead.kept_nonzero_const[0]
    assert "B's input half" in dead.kept_nonzero_const[0]
