"""LSTM / GRU / RNN hidden units as channels: removed across gates, directions, states and the
next layer's input weights, exactly (resized == masked, and == an independent numpy zeroing)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from channel_models import assert_close, feeds_for, masked_and_resized, run
from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from recurrent_models import (BATCH, FEAT, GATES, last_state_classifier, recurrent, single,
                              stacked_bilstm)
from channel_models import G

CASES = [("LSTM", 1, {}), ("LSTM", 2, {}), ("GRU", 1, {"linear_before_reset": 0}),
         ("GRU", 2, {"linear_before_reset": 1}), ("GRU", 2, {"linear_before_reset": 0}),
         ("GRU", 1, {"linear_before_reset": 1}), ("RNN", 1, {}), ("RNN", 2, {}),
         ("LSTM", 1, {"direction": "reverse"}), ("LSTM", 2, {"clip": 0.5, "input_forget": 1}),
         ("RNN", 2, {"activations": ["Sigmoid", "Relu"]})]


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.FLOAT)


def single_params(op, dirs, hidden, width, *, states=False, peepholes=False, classes=3):
    """The float parameters of :func:`single` with ``hidden`` units and ``width`` inputs."""
    g = GATES[op]
    n = FEAT * width + dirs * g * hidden * (width + hidden) + dirs * 2 * g * hidden
    if states:
        n += BATCH * dirs * hidden * (2 if op == "LSTM" else 1)
    if peepholes:
        n += dirs * 3 * hidden
    return n + dirs * hidden * classes + classes


def hidden_group(graph, w_name):
    return next(g for g in graph.groups if any(m.tensor == w_name and m.axis == 1
                                               for m in g.members))


def node_of(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def zero_units(model, op, hidden, units, in_units):
    """Independent reference: the model with hidden ``units`` and input features ``in_units``
    zeroed by hand (every gate row, R's columns, biases, the classifier rows), numpy only."""
    m = copy.deepcopy(model)
    node = node_of(m, op)
    gates = GATES[op]
    vals = inits(m)
    w, r = vals[node.input[1]].copy(), vals[node.input[2]].copy()
    rows = [k * hidden + j for k in range(gates) for j in units]
    w[:, rows, :] = 0
    w[:, :, in_units] = 0
    r[:, rows, :] = 0
    r[:, :, units] = 0
    new = {node.input[1]: w, node.input[2]: r}
    if len(node.input) > 3 and node.input[3]:
        b = vals[node.input[3]].copy()
        b[:, [k * hidden + j for k in range(2 * gates) for j in units]] = 0
        new[node.input[3]] = b
    emb = next(n for n in m.graph.node if n.op_type == "MatMul")
    e = vals[emb.input[1]].copy()
    e[:, in_units] = 0
    new[emb.input[1]] = e
    last = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm")][-1]
    c = vals[last.input[1]].copy()
    dirs = w.shape[0]
    feat_rows = [d * hidden + j for d in range(dirs) for j in units]
    if last.op_type == "Gemm":
        c[:, feat_rows] = 0
    else:
        c[feat_rows, :] = 0
    new[last.input[1]] = c
    for t in m.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name], t.name))
    return m


@pytest.mark.parametrize("op,dirs,attrs", CASES)
@pytest.mark.parametrize("gemm", [False, True])
def test_hidden_units_removed_exactly(op, dirs, attrs, gemm):
    hidden = 6
    model = single(op, dirs, hidden, gemm=gemm, **attrs)
    graph = build_channel_graph(load(copy.deepcopy(model)))
    node = node_of(model, op)
    group = hidden_group(graph, node.input[1])
    assert group.frozen is None and group.size == hidden
    gates = GATES[op]
    w = next(m for m in group.members if m.tensor == node.input[1] and m.axis == 1)
    # unit j is row j of every gate: j, H+j, 2H+j, ...
    assert w.index_map.tolist() == [[k * hidden + j for k in range(gates)]
                                    for j in range(hidden)]
    b = next(m for m in group.members if m.tensor == node.input[3])
    assert b.index_map.shape == (hidden, 2 * gates)
    r_axes = sorted(m.axis for m in group.members if m.tensor == node.input[2])
    assert r_axes == [1, 2]  # R loses rows (every gate) and columns

    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    units = removed[group.id]
    assert len(units) == 3
    in_group = next(g for g in graph.groups if any(m.tensor == node.input[1] and m.axis == 2
                                                   for m in g.members))
    in_units = removed[in_group.id]
    assert len(in_units) == 3  # 7 features, floor(3.5) removed
    feeds = feeds_for(model)
    got = run(resized, feeds)
    assert_close(got, run(masked, feeds))
    assert_close(got, run(zero_units(model, op, hidden, units, in_units), feeds))
    assert shapes[node.input[1]] == ((dirs, gates * 6, 7), (dirs, gates * 3, 4))
    assert shapes[node.input[2]] == ((dirs, gates * 6, 6), (dirs, gates * 3, 3))
    assert shapes[node.input[3]] == ((dirs, 2 * gates * 6), (dirs, 2 * gates * 3))
    rnode = node_of(resized, op)
    assert [a.i for a in rnode.attribute if a.name == "hidden_size"] == [3]
    assert params(model) == single_params(op, dirs, 6, 7)
    assert params(resized) == single_params(op, dirs, 3, 4)


def test_kept_units_are_the_weak_ones_across_gates_and_directions():
    # Scale down unit 2 in every gate of the forward direction only: the pair (fwd 2, bwd 2)
    # is one channel, ranked by its rows in both directions; it goes first.
    model = single("LSTM", 2, 6)
    node = node_of(model, "LSTM")
    for t in model.graph.initializer:
        if t.name in (node.input[1], node.input[2]):
            a = numpy_helper.to_array(t).copy()
            a[:, [2, 8, 14, 20], :] *= 1e-3
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    masked, resized, removed, _ = masked_and_resized(model, sparsity=1 / 6)
    graph = build_channel_graph(load(copy.deepcopy(model)))
    assert removed[hidden_group(graph, node.input[1]).id] == [2]


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_nonzero_initial_states_and_peepholes(op):
    # Stored initial_h / initial_c (and LSTM peepholes) lose the same units; exact though the
    # removed units' states are not zero in the dense model.
    model = single(op, 2, 6, states=True, peepholes=op == "LSTM")
    node = node_of(model, op)
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert shapes[node.input[5]] == ((2, BATCH, 6), (2, BATCH, 3))
    if op == "LSTM":
        assert shapes[node.input[6]] == ((2, BATCH, 6), (2, BATCH, 3))
        assert shapes[node.input[7]] == ((2, 18), (2, 9))
    lstm = op == "LSTM"
    assert params(resized) == single_params(op, 2, 3, 4, states=True, peepholes=lstm)


def run_reference(model, feeds):
    """onnx's reference runtime (onnxruntime refuses ``layout=1`` recurrent ops)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_batch_first_layout(op):
    model = single(op, 2, 6, batch_first=True, states=True)
    # batch-first graph: x is [batch, seq, feat]
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [BATCH, 5, FEAT]))
    fixed = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(fixed.graph.output[0])
    graph = build_channel_graph(load(copy.deepcopy(model)))
    node = node_of(model, op)
    assert hidden_group(graph, node.input[1]).frozen is None
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run_reference(resized, feeds), run_reference(masked, feeds))
    assert shapes[node.input[5]] == ((BATCH, 2, 6), (BATCH, 2, 3))


def test_stacked_bilstm_next_layer_loses_both_directions_columns():
    model = stacked_bilstm()
    l1, l2 = [n for n in model.graph.node if n.op_type == "LSTM"]
    graph = build_channel_graph(load(copy.deepcopy(model)))
    g1 = hidden_group(graph, l1.input[1])
    assert g1.frozen is None and g1.size == 6
    # layer 2's W reads [seq, batch, 2*6]: unit j of layer 1 is its columns j and 6 + j
    nxt = next(m for m in g1.members if m.tensor == l2.input[1])
    assert nxt.axis == 2 and nxt.index_map.tolist() == [[j, 6 + j] for j in range(6)]
    g2 = hidden_group(graph, l2.input[1])
    assert g2.frozen is None and g2.size == 5 and g2.id != g1.id
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert len(removed[g1.id]) == 3 and len(removed[g2.id]) == 2
    assert shapes[l2.input[1]] == ((2, 20, 12), (2, 12, 6))
    assert shapes[l2.input[2]] == ((2, 20, 5), (2, 12, 3))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert shapes[gemm.input[1]] == ((3, 10), (3, 6))
    before, after = params(model), params(resized)
    # embed 8x7->8x4; L1 W 2x24x7->2x12x4, R 2x24x6->2x12x3, B 2x48->2x24;
    # L2 W 2x20x12->2x12x6, R 2x20x5->2x12x3, B 2x40->2x24; Gemm 3x10->3x6 (+3 bias)
    assert before == 56 + 336 + 288 + 96 + 480 + 200 + 80 + 30 + 3
    assert after == 32 + 96 + 72 + 48 + 144 + 72 + 48 + 18 + 3


def test_final_state_consumer():
    model = last_state_classifier("GRU")
    node = node_of(model, "GRU")
    graph = build_channel_graph(load(copy.deepcopy(model)))
    assert hidden_group(graph, node.input[1]).frozen is None
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert shapes[gemm.input[1]] == ((3, 12), (3, 6))


def test_state_graph_output_freezes_the_units():
    # Y_h is a graph output: its shape must stay, so the hidden units stay.
    g = G(0)
    x = g.op("MatMul", ["x", g.w([FEAT, 7])])
    y, yh = recurrent(g, "LSTM", x, 7, 6, 2)
    model = g.model([("x", [5, BATCH, FEAT])], [y, yh])
    graph = build_channel_graph(load(model))
    group = hidden_group(graph, node_of(model, "LSTM").input[1])
    assert "graph output" in group.frozen


def _with_output(model, name):
    m = copy.deepcopy(model)
    m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m


@pytest.mark.parametrize("op,attrs,dead", [
    ("LSTM", {}, True), ("GRU", {"linear_before_reset": 0}, True),
    ("GRU", {"linear_before_reset": 1}, True), ("RNN", {}, True),
    ("RNN", {"activations": ["Relu", "Relu"]}, True), ("RNN", {"activations": ["Sigmoid", "Sigmoid"]}, False)])
def test_zeroed_unit_output(op, attrs, dead):
    # The dead-unit argument, checked: with no bias and zero initial states, a unit whose rows
    # are zeroed outputs exactly 0 (LSTM: g = tanh(0) = 0 keeps c = 0; GRU: n = tanh(0) = 0 and
    # h = z * h_prev stays 0; RNN tanh/Relu(0) = 0) -- but not with a Sigmoid RNN (0.5). The
    # removal is exact either way: R's column and the consumers' rows of the unit are zeroed.
    model = single(op, 2, 6, bias=False, **attrs)
    node = node_of(model, op)
    masked, resized, removed, _ = masked_and_resized(model, sparsity=0.5)
    graph = build_channel_graph(load(copy.deepcopy(model)))
    units = removed[hidden_group(graph, node.input[1]).id]
    feeds = feeds_for(model)
    y = run(_with_output(masked, node.output[0]), feeds)[-1]
    zero = np.all(y[..., units] == 0)
    assert zero == dead
    assert_close(run(resized, feeds), run(masked, feeds))


def test_symbolic_sequence_length_with_exporter_reshape():
    # PyTorch writes Reshape(Transpose(Y), [0, 0, -1]) and a symbolic sequence axis: the hidden
    # units still reach the classifier's rows j and H + j.
    g = G(0)
    x = g.op("MatMul", ["x", g.w([FEAT, 7])])
    y = recurrent(g, "LSTM", x, 7, 6, 2)[0]
    t = g.op("Transpose", [y], perm=[0, 2, 1, 3])
    f = g.op("Reshape", [t, g.c(np.array([0, 0, -1], np.int64))])
    out = g.op("MatMul", [f, g.w([12, 3])])
    model = g.model([("x", ["seq", BATCH, FEAT])], [out])
    node = node_of(model, "LSTM")
    graph = build_channel_graph(load(copy.deepcopy(model)))
    group = hidden_group(graph, node.input[1])
    assert group.frozen is None
    cls = next(m for m in group.members if m.tensor == model.graph.node[-1].input[1])
    assert cls.index_map.tolist() == [[j, 6 + j] for j in range(6)]
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((9, BATCH, FEAT)).astype(np.float32)}
    assert_close(run(resized, feeds), run(masked, feeds))


def test_encoder_state_initializes_the_decoder():
    # seq2seq: the encoder's Y_h is the decoder's initial_h, so unit j of both is one channel
    # (the decoder's R columns, the encoder's rows, the classifier rows all follow).
    g = G(0)
    x = g.op("MatMul", ["x", g.w([FEAT, 7])])
    yh = recurrent(g, "GRU", x, 7, 6)[1]
    dec_in = g.op("MatMul", ["x", g.w([FEAT, 5])])
    ins = [dec_in, g.w([1, 18, 5]), g.w([1, 18, 6]), g.w([1, 36], 0.3), "", yh]
    y = g.op("GRU", ins, n_out=1, hidden_size=6)
    feat = g.op("Squeeze", [y, g.c(np.array([1], np.int64))])
    out = g.op("MatMul", [feat, g.w([6, 3])])
    model = g.model([("x", [5, BATCH, FEAT])], [out])
    enc, dec = [n for n in model.graph.node if n.op_type == "GRU"]
    graph = build_channel_graph(load(copy.deepcopy(model)))
    group = hidden_group(graph, enc.input[1])
    assert group is hidden_group(graph, dec.input[1]) and group.frozen is None
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert shapes[dec.input[2]] == ((1, 18, 6), (1, 9, 3))
    assert shapes[enc.input[2]] == ((1, 18, 6), (1, 9, 3))


def test_bidirectional_encoder_state_merged_into_the_decoder():
    # Y_h [2, batch, H] -> Transpose -> Reshape [batch, 2H] -> Unsqueeze: the decoder's unit
    # d*H + j is the encoder's unit j of direction d, so one channel removes two decoder units.
    g = G(0)
    x = g.op("MatMul", ["x", g.w([FEAT, 7])])
    yh = recurrent(g, "GRU", x, 7, 6, 2)[1]
    t = g.op("Transpose", [yh], perm=[1, 0, 2])
    flat = g.op("Reshape", [t, g.c(np.array([BATCH, 12], np.int64))])
    h0 = g.op("Unsqueeze", [flat, g.c(np.array([0], np.int64))])
    dec_in = g.op("MatMul", ["x", g.w([FEAT, 5])])
    ins = [dec_in, g.w([1, 36, 5]), g.w([1, 36, 12]), g.w([1, 72], 0.3), "", h0]
    y = g.op("GRU", ins, n_out=1, hidden_size=12)
    feat = g.op("Squeeze", [y, g.c(np.array([1], np.int64))])
    out = g.op("MatMul", [feat, g.w([12, 3])])
    model = g.model([("x", [5, BATCH, FEAT])], [out])
    enc, dec = [n for n in model.graph.node if n.op_type == "GRU"]
    graph = build_channel_graph(load(copy.deepcopy(model)))
    group = hidden_group(graph, enc.input[1])
    assert group is hidden_group(graph, dec.input[1]) and group.frozen is None
    assert group.size == 6
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert shapes[enc.input[2]] == ((2, 18, 6), (2, 9, 3))
    assert shapes[dec.input[2]] == ((1, 36, 12), (1, 18, 6))
    sizes = [[a.i for a in n.attribute if a.name == "hidden_size"]
             for n in resized.graph.node if n.op_type == "GRU"]
    assert sizes == [[3], [6]]
