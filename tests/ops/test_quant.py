"""The quantization family (ops/quant.py): QDQ and QOperator weights are pruned in zero-point
terms, their channels removed exactly with per-channel scales / zero points sliced, and the
output keeps its dtypes and quantization scheme (onnxruntime runs it)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from channel_models import assert_close, feeds_for, masked_and_resized, run
from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.ops.layouts import layout_for, prunable_op_types
from onnxprune.ops.registry import entry, macs_of
from onnxprune.ops.weights import find_weights
from quant_models import (QG, conv_integer, dynamic_matmul_integer, matmul_nbits, ms_matmuls,
                          qdq_conv, qdq_matmul, qoperator_net,
                          qdq_per_axis_activation, qlinear_conv, qlinear_depthwise,
                          qlinear_matmul)

BUILDERS = {"qdq_conv": qdq_conv, "qdq_matmul": qdq_matmul, "qlinear_conv": qlinear_conv,
            "qlinear_matmul": qlinear_matmul, "dynamic_matmul_integer": dynamic_matmul_integer,
            "matmul_nbits": matmul_nbits, "qdq_per_axis_activation": qdq_per_axis_activation,
            "qlinear_depthwise": qlinear_depthwise, "conv_integer": conv_integer,
            "ms_matmuls": ms_matmuls, "qoperator_net": qoperator_net}


def dtypes(model):
    return {t.name: t.data_type for t in model.graph.initializer}


def ops(model):
    return [(n.domain, n.op_type) for n in model.graph.node]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_resized_equals_masked(name, sparsity):
    model = BUILDERS[name]()
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=sparsity)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert sum(len(v) for v in removed.values()) > 0
    changed = {t for t, (before, after) in shapes.items() if before != after}
    assert changed
    # Same scheme: the same ops, every stored tensor keeps its dtype.
    assert ops(resized) == ops(model)
    before = dtypes(model)
    assert {n: t for n, t in dtypes(resized).items() if n in before} == \
        {n: before[n] for n in dtypes(resized) if n in before}


def _dims(model, name):
    return tuple(next(t.dims for t in model.graph.initializer if t.name == name))


def test_per_channel_scales_and_zero_points_are_sliced_with_the_channels():
    model = qdq_conv()
    _, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    dq = [n for n in resized.graph.node if n.op_type == "DequantizeLinear"
          and any(t.name == n.input[0] for t in resized.graph.initializer)]
    assert len(dq) == 3
    for node in dq:
        q, s, z = (_dims(resized, i) for i in node.input)
        assert s == z == (q[0],)  # axis 0: one scale / zero point per kept output channel
    assert shapes[dq[0].input[0]] == ((8, 3, 3, 3), (4, 3, 3, 3))
    assert shapes[dq[0].input[1]] == ((8,), (4,))


def test_per_axis_activation_quantization_slices_its_scale():
    model = qdq_per_axis_activation()
    _, resized, _, shapes = masked_and_resized(model, sparsity=0.5)
    q = next(n for n in resized.graph.node if n.op_type == "QuantizeLinear")
    dq = next(n for n in resized.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] == q.output[0])
    assert _dims(resized, q.input[1]) == _dims(resized, q.input[2]) == (4,)
    assert list(dq.input[1:]) == list(q.input[1:])  # still the one shared scale / zero point
    s = numpy_helper.to_array(next(t for t in resized.graph.initializer
                                   if t.name == q.input[1]))
    assert (s > 0).all()  # sliced, never zeroed (QuantizeLinear divides by it)


def test_depthwise_qlinear_conv_regroups():
    _, resized, _, _ = masked_and_resized(qlinear_depthwise(), sparsity=0.5)
    dw = [n for n in resized.graph.node if n.op_type == "QLinearConv"][1]
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    assert _dims(resized, dw.input[3]) == (4, 1, 3, 3)


def test_qlinear_conv_keeps_int32_bias_and_output_zero_point():
    model = qlinear_conv()
    _, resized, _, shapes = masked_and_resized(model, sparsity=0.5)
    conv = [n for n in resized.graph.node if n.op_type == "QLinearConv"]
    for node in conv[:2]:
        w = _dims(resized, node.input[3])
        assert _dims(resized, node.input[4]) == _dims(resized, node.input[5]) == (w[0],)
        assert _dims(resized, node.input[8]) == (w[0],)
        assert _dims(resized, node.input[6]) == _dims(resized, node.input[7]) == ()
    assert [_dims(resized, n.input[3])[:2] for n in conv] == [(4, 3), (3, 4), (4, 3)]


def test_nbits_n_removal_rewrites_n_and_slices_blocks():
    model = matmul_nbits()
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    node = next(n for n in resized.graph.node if n.op_type == "MatMulNBits")
    n = next(a.i for a in node.attribute if a.name == "N")
    assert n == 6
    assert shapes["B"] == ((12, 2, 8), (6, 2, 8))
    assert shapes["scales"] == ((24,), (12,))
    assert shapes["zp"] == ((12,), (6,))  # one packed byte (two 4-bit zero points) per row
    # The masked channels' scales are zeroed: their output is exactly 0 whatever the zero point.
    group = build_channel_graph(load(copy.deepcopy(model))).group_of("B")
    gone = np.asarray(removed[group.id])
    y = run(masked, feeds_for(model))
    scales = numpy_helper.to_array(next(t for t in masked.graph.initializer
                                        if t.name == "scales")).reshape(12, 2)
    assert (scales[gone] == 0).all() and (scales[np.setdiff1d(np.arange(12), gone)] != 0).all()
    assert np.isfinite(y[0]).all()


def test_nbits_input_channels_are_frozen_with_a_reason():
    model = matmul_nbits(pre=True)
    g = build_channel_graph(load(model))
    k_group = g.group_of(model.graph.node[0].input[1])
    assert k_group.frozen.endswith("MatMulNBits packs K inside its blocks (input channels not "
                                   "removed)")
    assert g.group_of("B").prunable


@pytest.mark.parametrize("name", ["qdq_conv", "qdq_matmul", "qlinear_conv", "qlinear_matmul",
                                  "dynamic_matmul_integer", "conv_integer", "ms_matmuls",
                                  "qoperator_net"])
def test_two_four_on_integer_weights_counts_zero_points(name):
    model = BUILDERS[name]()
    result = onnxprune.prune(copy.deepcopy(model), pattern="2:4", validate=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert ops(result.model) == ops(model)
    pruned = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    handle = load(copy.deepcopy(result.model))
    weights, _ = find_weights(handle)
    checked = 0
    for w in weights:
        arr = pruned[w.name]
        assert arr.dtype.kind in "iu"  # still quantized
        w2d = w.layout.to_2d(arr)
        if w2d.shape[1] % 4:
            continue
        groups = w2d.reshape(w2d.shape[0], -1, 4)
        # zero point 0: a pruned entry is the zero point, two per group of 4 along `in`
        assert (np.count_nonzero(groups, axis=-1) <= 2).all()
        checked += 1
    assert checked
    run(result.model, feeds_for(model))


@pytest.mark.parametrize("name", ["qdq_conv", "qlinear_matmul", "dynamic_matmul_integer"])
def test_channel_pattern_through_the_api_keeps_the_scheme(name):
    model = BUILDERS[name]()
    result = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.25,
                             validate=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert ops(result.model) == ops(model)
    rows = [r for r in result.report.rows if tuple(r.shape_after) != tuple(r.shape)]
    assert rows
    before = dtypes(model)
    for t in result.model.graph.initializer:
        if t.name in before:
            assert t.data_type == before[t.name]
    feeds = feeds_for(model)
    for a, b in zip(run(result.model, feeds), run(model, feeds)):
        assert a.shape == b.shape and a.dtype == b.dtype


def _asymmetric_qdq_matmul():
    g = QG(7)
    q = g.c(np.random.default_rng(0).integers(0, 255, size=(16, 12)).astype(np.uint8))
    s = g.c(np.full(12, 0.01, np.float32))
    z = g.c(np.full(12, 128, np.uint8))
    w = g.op("DequantizeLinear", [q, s, z], axis=1)
    h = g.op("Relu", [g.op("MatMul", ["x", g.w([16, 16])])])
    h = g.op("Relu", [g.op("MatMul", [h, w])])
    y = g.op("MatMul", [h, g.w([12, 5])])
    return g.model([("x", [4, 16])], [y], opset=13), q


def test_nonzero_zero_point_is_left_alone_with_a_reason():
    model, q = _asymmetric_qdq_matmul()
    handle = load(copy.deepcopy(model))
    weights, skipped = find_weights(handle)
    assert q not in {w.name for w in weights}
    reason = next(s.reason for s in skipped if s.name == q)
    assert reason == ("UINT8 weight: its zero point is not 0 (asymmetric quantization): a "
                      "pruned entry is written as 0, which would not dequantize to 0")
    g = build_channel_graph(load(copy.deepcopy(model)))
    frozen = [gr.frozen for gr in g.groups if q in [m.tensor for m in gr.members]]
    assert len(frozen) == 2 and all(f and f"integer weight '{q}': its zero point is not 0" in f
                                    for f in frozen)


def test_blocked_dequantize_is_left_alone():
    g = QG(8)
    q = g.c(np.ones((16, 12), np.int8))
    s = g.c(np.full((4, 12), 0.01, np.float32))
    w = g.op("DequantizeLinear", [q, s], axis=0, block_size=4)
    y = g.op("MatMul", [g.op("Relu", [g.op("MatMul", ["x", g.w([16, 16])])]), w])
    model = g.model([("x", [4, 16])], [y], opset=21)
    weights, skipped = find_weights(load(model))
    assert q not in {w.name for w in weights}
    assert "blocked quantization" in next(s.reason for s in skipped if s.name == q)
    frozen = [gr.frozen for gr in build_channel_graph(load(model)).groups if gr.frozen]
    assert any("blocked quantization" in f for f in frozen)


def test_plain_integer_operand_is_not_a_weight():
    g = QG(9)
    w = g.op("Cast", [g.c(np.ones((16, 12), np.int8))], to=TensorProto.FLOAT)
    y = g.op("MatMul", ["x", w])
    model = g.model([("x", [4, 16])], [y])
    weights, skipped = find_weights(load(model))
    assert not weights
    assert "read as plain integers" in skipped[0].reason


def test_registry_entries():
    assert {"MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv"} <= \
        set(prunable_op_types())
    qconv = helper.make_node("QLinearConv", list("abcdefgh"), ["y"], group=2)
    lay = layout_for(qconv, 3, (8, 4, 3, 3))
    assert (lay.out_axis, lay.in_axis, lay.group) == (0, 1, 2)
    assert layout_for(qconv, 0, (1, 8, 5, 5)) is None
    mmi = helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])
    assert layout_for(mmi, 1, (16, 12)).shape2d == (12, 16)
    qmm = helper.make_node("QLinearMatMul", list("abcdefgh"), ["y"])
    assert macs_of(qmm, {"a": (4, 16), "d": (16, 12)}) == 4 * 16 * 12
    assert macs_of(qconv, {"y": (1, 8, 5, 5), "d": (8, 4, 3, 3)}) == 200 * 36
    nbits = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft",
                             K=32, N=12, bits=4, block_size=16)
    assert macs_of(nbits, {"a": (2, 4, 32)}) == 8 * 12 * 32
    assert entry(nbits) is not None
    qgemm = helper.make_node("QGemm", list("abcdefghi"), ["y"], domain="com.microsoft", transB=1)
    lay = layout_for(qgemm, 3, (5, 8))
    assert (lay.shape2d, lay.out_axis, lay.in_axis) == ((5, 8), 0, 1)
    assert layout_for(qgemm, 0, (1, 8)) is None
    assert macs_of(qgemm, {"a": (2, 8), "d": (5, 8)}) == 2 * 5 * 8
    other = helper.make_node("MatMulNBits", ["a"], ["y"], domain="custom.domain")
    assert entry(other) is None


def test_per_channel_scales_rank_dequantized_values():
    """Column scales 1000x apart: magnitude ranks (q - 0) * scale, not the raw integers."""
    g = QG(16)
    q = g.rng.integers(-127, 128, size=(16, 12)).astype(np.int8)
    scale = np.geomspace(1e-4, 1e-1, 12).astype(np.float32)
    w = g.op("DequantizeLinear", [g.c(q, "q"), g.c(scale, "s"), g.c(np.zeros(12, np.int8))],
             axis=1)
    y = g.op("MatMul", [g.op("Relu", [g.op("MatMul", ["x", g.w([16, 16])])]), w])
    model = g.model([("x", [4, 16])], [y], opset=13)
    weights, _ = find_weights(load(copy.deepcopy(model)))
    assert next(x for x in weights if x.name == "q").scale.shape == (1, 12)
    result = onnxprune.prune(copy.deepcopy(model), sparsity=0.5, include="^q$", resize=False)
    pruned = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                        if t.name == "q"))
    value = np.abs(q.astype(np.float64) * scale)
    gone = (pruned == 0) & (q != 0)
    assert gone.sum() >= 90
    assert value[gone].max() <= value[pruned != 0].min()
    # raw integers would have pruned small integers in every column alike
    assert gone[:, -1].sum() < gone[:, 0].sum()


def test_channel_scores_use_the_per_channel_scales():
    """Identical integer columns (and consumer rows), scales 1000x apart: the low-scale
    channels go."""
    g = QG(17)
    col = g.rng.integers(-127, 128, size=(16, 1)).astype(np.int8)
    q = np.repeat(col, 12, axis=1)
    scale = np.geomspace(1e-4, 1e-1, 12).astype(np.float32)[::-1].copy()
    w = g.op("DequantizeLinear", [g.c(q, "q"), g.c(scale, "s"), g.c(np.zeros(12, np.int8))],
             axis=1)
    h = g.op("Relu", [g.op("MatMul", ["x", w])])
    same_rows = np.tile(g.rng.standard_normal((1, 3)), (12, 1)).astype(np.float32)
    y = g.op("MatMul", [h, g.c(same_rows)])  # the consumer scores every channel alike
    model = g.model([("x", [4, 16])], [y], opset=13)
    result = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.5,
                             include="^q$")
    kept = numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                      if t.name.startswith("s")))
    np.testing.assert_array_equal(kept, scale[:6])  # the six largest scales stay


def _group_of(model, weight):
    graph = build_channel_graph(load(copy.deepcopy(model)))
    return next(g for g in graph.groups if weight in g.producers)


def test_dynamic_quantize_needs_the_removed_channels_at_zero():
    """DynamicQuantizeLinear's scale is a min/max over every channel: removal is exact only
    where the removed channels are 0 at its input. After Relu(x W + b) they are (masked row and
    bias); after a Sigmoid they are 0.5, and the group stays whole, saying why."""
    relu = dynamic_matmul_integer()
    w1 = next(n for n in relu.graph.node if n.op_type == "MatMulInteger").input[1]
    assert _group_of(relu, w1).prunable
    sig = dynamic_matmul_integer(act="Sigmoid")
    group = _group_of(sig, w1)
    assert not group.prunable
    assert "DynamicQuantizeLinear" in group.frozen and "min/max over every channel" in \
        group.frozen and "Sigmoid" in group.frozen
    # not a residual stream: pruned without --prune-stream
    result = onnxprune.prune(relu, pattern="channel", sparsity=0.5)
    assert not result.report.frozen or all("residual stream" not in why
                                           for _, why in result.report.frozen)
    assert result.report.params_after < result.report.params_before


@pytest.mark.parametrize("activations, prunable", [
    (None, True), (["Sigmoid", "Tanh", "Relu"], True), (["Sigmoid", "Tanh", "Sigmoid"], False)])
def test_lstm_units_reach_a_dynamic_quantizer_as_zeros(activations, prunable):
    """A removed LSTM unit (rows, bias, zero initial state) outputs exactly 0 when its g and h
    activations map 0 to 0: the quantizer after it is exact, the units prunable; masked ==
    resized. With h = Sigmoid the unit outputs 0.5 x 0.5 and the units stay whole."""
    from quant_models import lstm_dynamic_head

    model = lstm_dynamic_head(activations=activations)
    w = next(n for n in model.graph.node if n.op_type == "LSTM").input[1]
    group = _group_of(model, w)
    assert group.prunable == prunable, group.frozen
    if not prunable:
        assert "DynamicQuantizeLinear" in group.frozen
        return
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    assert shapes[w][1][1] == 4 * 4  # 8 units -> 4, four gates
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))


def test_matmul_of_two_activations_keeps_a_zero_channel():
    """Attention's context (softmax @ V) of a removed head is 0 when V's is, whatever the
    softmax holds: MatMul's value rule, which the zero checks follow to a quantizer."""
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    const = entry(node).const
    probes = np.array([[0.7], [-1.3]])
    out = const(node, [probes, np.zeros((1, 1))], None)[0]
    assert out.shape == (2, 1) and not out.any()
    out = const(node, [np.array([[0.25, 0.0]]), np.array([[0.0, 2.0]])], None)[0]
    np.testing.assert_array_equal(out, [[0.0, 0.0]])
    out = const(node, [probes, np.array([[1.0]])], None)[0]
    assert np.isnan(out).all()  # a nonzero channel's sum is unknown
    assert const(node, [None, np.zeros((1, 1))], None) is None
