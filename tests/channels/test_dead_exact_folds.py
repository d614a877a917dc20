"""Dead-channel folding is exact or not done: one deterministic case per inexact fold the
property test (test_dead_property.py) or reading the registry found. Each builds a model whose
zero filters make dead channels carry constants, removes them, and checks the outputs are the
unresized model's; where the fold cannot be exact the channel stays and the record says why."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.dead import remove_dead_channels
from onnxprune.model.io import load
from onnxprune.ops.registry import exact_fold, fold_refusal
from channel_models import assert_close, run


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


def _model(nodes, inits, x_shape, out, out_shape, opset=17):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def _remove(model, x_shape):
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)}
    assert_close(run(handle.model, feeds), run(model, feeds))
    return handle, rec


def _weights(handle):
    return {t.name: numpy_helper.to_array(t) for t in handle.model.graph.initializer}


def _conv_w(rng, cout, cin, zero_rows=()):
    w = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32)
    w[list(zero_rows)] = 0
    return w


def _grouped_consumer(bias):
    """Conv (4 ch, rows 0 and 2 zero) -> Conv group=2: channels 0 and 2 are one unit."""
    rng = np.random.default_rng(1)
    inits = [_init("W1", _conv_w(rng, 4, 3, (0, 2))), _init("B1", bias),
             _init("W2", rng.standard_normal((2, 2, 1, 1))), _init("B2", [0.1, -0.2])]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Conv", ["y", "W2", "B2"], ["z"], name="c2", group=2)]
    return _model(nodes, inits, [1, 3, 4, 4], "z", [1, 2, 4, 4])


def test_tied_channels_of_a_grouped_conv_with_different_constants_are_kept():
    # Was: the unit took channel 0's constant (1.0) for channel 2 (3.0) too, so the fold
    # added 1.0 * W2 for group 1 where the model adds 3.0 * W2.
    handle, rec = _remove(_grouped_consumer([1.0, 0.5, 3.0, -0.5]), [1, 3, 4, 4])
    assert rec.channels_removed == 0 and rec.folded == []
    assert len(rec.kept_nonzero_const) == 1
    assert "channel 0: zero filter, value not constant/zero" in rec.kept_nonzero_const[0]
    assert _weights(handle)["W1"].shape == (4, 3, 1, 1)


def test_tied_channels_of_a_grouped_conv_with_one_constant_fold_exactly():
    handle, rec = _remove(_grouped_consumer([2.0, 0.5, 2.0, -0.5]), [1, 3, 4, 4])
    assert rec.channels_removed == 1 and len(rec.folded) == 1
    assert rec.kept_nonzero_const == []
    w = _weights(handle)
    assert w["W1"].shape == (2, 3, 1, 1) and w["W2"].shape == (2, 1, 1, 1)


def test_a_concat_of_two_producers_before_a_grouped_conv_needs_equal_constants():
    # Concat(a, b) -> group=2 conv: a[0] and b[0] are one unit; their constants differ.
    rng = np.random.default_rng(2)
    inits = [_init("Wa", _conv_w(rng, 2, 3, (0,))), _init("Ba", [1.0, 0.3]),
             _init("Wb", _conv_w(rng, 2, 3, (0,))), _init("Bb", [-2.0, 0.4]),
             _init("W2", rng.standard_normal((2, 2, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], name="ca"),
             helper.make_node("Conv", ["x", "Wb", "Bb"], ["b"], name="cb"),
             helper.make_node("Concat", ["a", "b"], ["y"], name="cat", axis=1),
             helper.make_node("Conv", ["y", "W2"], ["z"], name="c2", group=2)]
    _, rec = _remove(_model(nodes, inits, [1, 3, 4, 4], "z", [1, 2, 4, 4]), [1, 3, 4, 4])
    assert rec.channels_removed == 0 and rec.folded == []
    assert len(rec.kept_nonzero_const) == 1


def test_a_constant_reaching_a_batched_matmul_weight_is_kept_with_the_reason():
    # x @ W1 + B1 -> y @ W2 with W2 [2, 6, 3]: the constant of y[..., 1] adds c * W2[b, 1, :],
    # different per batch entry b. Was: summed over the batch axis into one [3] bias.
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    w1[:, 1] = 0
    inits = [_init("W1", w1), _init("B1", np.arange(6) + 1.0),
             _init("W2", rng.standard_normal((2, 6, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="m1"),
             helper.make_node("Add", ["h", "B1"], ["y"], name="a1"),
             helper.make_node("MatMul", ["y", "W2"], ["z"], name="m2")]
    model = _model(nodes, inits, [2, 5, 4], "z", [2, 5, 3])
    handle, rec = _remove(model, [2, 5, 4])
    assert rec.channels_removed == 0 and rec.folded == []
    assert len(rec.kept_nonzero_const) == 1
    assert "MatMul 'm2': the MatMul weight [2, 6, 3] is batched" in rec.kept_nonzero_const[0]
    assert _weights(handle)["W2"].shape == (2, 6, 3)


def test_the_matmul_fold_rule_reads_the_weight_shape():
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert exact_fold(node, 1, (6, 3)) and exact_fold(node, 1, (1, 6, 3))
    assert not exact_fold(node, 1, (2, 6, 3)) and not exact_fold(node, 0, (6, 3))
    assert "shape is unknown" in fold_refusal(node, 1)
    assert "no exact-fold rule" in fold_refusal(helper.make_node("Relu", ["x"], ["y"]), 0)


def _pad_model(opset, value, bias):
    """Conv (row 0 zero, bias ``bias``) -> Pad(value) -> 1x1 Conv."""
    rng = np.random.default_rng(4)
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    inits = [_init("W1", _conv_w(rng, 3, 3, (0,))), _init("B1", [bias, 0.2, -0.4]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    if opset < 11:
        pad = helper.make_node("Pad", ["y"], ["p"], name="pad", pads=pads, value=value)
    else:
        inits += [_init("pads", pads, np.int64), _init("pv", value)]
        pad = helper.make_node("Pad", ["y", "pads", "pv"], ["p"], name="pad")
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"), pad,
             helper.make_node("Conv", ["p", "W2"], ["z"], name="c2")]
    return _model(nodes, inits, [1, 3, 4, 4], "z", [1, 2, 6, 6], opset=opset)


def test_an_opset10_pad_value_attribute_is_the_border_value():
    # Was: the attribute was ignored (pad value taken as 0), so a channel of zeros padded
    # with 0.7 counted as all-zero and was removed: the borders lost 0.7 * W2.
    for opset in (10, 13):
        _, rec = _remove(_pad_model(opset, 0.7, 0.0), [1, 3, 4, 4])
        assert rec.channels_removed == 0 and rec.folded == [], opset
        assert len(rec.kept_nonzero_const) == 1, opset


def test_an_opset10_pad_whose_value_is_the_constant_folds():
    for opset in (10, 13):
        handle, rec = _remove(_pad_model(opset, 0.7, 0.7), [1, 3, 4, 4])
        assert rec.channels_removed == 1 and len(rec.folded) == 1, opset
        assert _weights(handle)["W1"].shape == (2, 3, 1, 1)


def test_a_zero_gemm_column_outputs_its_scalar_bias():
    # Gemm C of shape [1] broadcasts to every column: a zero column of B outputs beta * C.
    # Was: no per-channel bias member was found, the constant taken as 0 and the unit removed.
    rng = np.random.default_rng(5)
    b1 = rng.standard_normal((4, 5)).astype(np.float32)
    b1[:, 2] = 0
    inits = [_init("B1", b1), _init("C1", [0.75]), _init("B2", rng.standard_normal((5, 3))),
             _init("C2", np.zeros(3))]
    nodes = [helper.make_node("Gemm", ["x", "B1", "C1"], ["h"], name="g1", beta=2.0),
             helper.make_node("Gemm", ["h", "B2", "C2"], ["z"], name="g2")]
    handle, rec = _remove(_model(nodes, inits, [2, 4], "z", [2, 3]), [2, 4])
    assert rec.channels_removed == 1 and len(rec.folded) == 1
    assert "constant 1.5" in rec.folded[0]
    assert _weights(handle)["B2"].shape == (4, 3)


def test_a_zero_gemm_column_with_a_bias_varying_along_rows_is_kept():
    # C [M, 1]: the zero column outputs C[m], not one constant.
    rng = np.random.default_rng(6)
    b1 = rng.standard_normal((4, 5)).astype(np.float32)
    b1[:, 2] = 0
    inits = [_init("B1", b1), _init("C1", [[0.5], [-1.0]]),
             _init("B2", rng.standard_normal((5, 3))), _init("C2", np.zeros(3))]
    nodes = [helper.make_node("Gemm", ["x", "B1", "C1"], ["h"], name="g1"),
             helper.make_node("Gemm", ["h", "B2", "C2"], ["z"], name="g2")]
    _, rec = _remove(_model(nodes, inits, [2, 4], "z", [2, 3]), [2, 4])
    assert rec.channels_removed == 0 and rec.folded == []
    assert len(rec.kept_nonzero_const) == 1


def test_sum_with_an_operand_that_is_not_constant_is_not_constant():
    # Sum(y, m) with m = ReduceMean(x) broadcast over channels: y's dead channel carries
    # bias + m, not the bias. Was: Sum dropped the unknown operand and folded the bias alone.
    rng = np.random.default_rng(7)
    inits = [_init("W1", _conv_w(rng, 3, 3, (1,))), _init("B1", [0.2, 1.5, -0.3]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("ReduceMean", ["x"], ["m"], name="rm", axes=[1], keepdims=1),
             helper.make_node("Sum", ["y", "m"], ["s"], name="sum"),
             helper.make_node("Conv", ["s", "W2"], ["z"], name="c2")]
    _, rec = _remove(_model(nodes, inits, [1, 3, 4, 4], "z", [1, 2, 4, 4]), [1, 3, 4, 4])
    assert rec.channels_removed == 0 and rec.folded == []


def _instance_norm_model(bias):
    rng = np.random.default_rng(8)
    inits = [_init("W1", _conv_w(rng, 3, 3, (1,))), _init("B1", [0.2, bias, -0.3]),
             _init("S", [1.0, 2.0, 0.5]), _init("T", [0.1, 0.6, -0.2]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("InstanceNormalization", ["y", "S", "T"], ["n"], name="in"),
             helper.make_node("Conv", ["n", "W2"], ["z"], name="c2")]
    return _model(nodes, inits, [1, 3, 4, 4], "z", [1, 2, 4, 4])


def test_instance_norm_of_a_nonzero_constant_map_is_not_taken_as_its_shift():
    # Exact arithmetic gives the shift, but the runtime's float mean of c is off by a bit that
    # 1/sqrt(epsilon) scales up: the model's output is not the shift to float tolerance.
    _, rec = _remove(_instance_norm_model(1.7), [1, 3, 4, 4])
    assert rec.channels_removed == 0 and rec.folded == []


def test_instance_norm_of_a_zero_map_is_its_shift_and_folds():
    handle, rec = _remove(_instance_norm_model(0.0), [1, 3, 4, 4])
    assert rec.channels_removed == 1 and len(rec.folded) == 1
    assert "constant 0.6" in rec.folded[0]


def test_a_zero_depthwise_row_outputs_its_bias_whatever_it_reads():
    # Conv row 1 zero (bias 0.9) -> padded 3x3 depthwise with row 1 zero (bias -0.3) -> 1x1
    # Conv: the unit carries -0.3 after the depthwise (its zero row ignores the padded input),
    # folded exactly. Was: kept, any nonzero input constant made a grouped zero row unknown.
    rng = np.random.default_rng(9)
    dw = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
    dw[1] = 0
    inits = [_init("W1", _conv_w(rng, 3, 3, (1,))), _init("B1", [0.2, 0.9, -0.3]),
             _init("D", dw), _init("DB", [0.1, -0.3, 0.5]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Conv", ["y", "D", "DB"], ["d"], name="dw", group=3,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "W2"], ["z"], name="c2")]
    handle, rec = _remove(_model(nodes, inits, [1, 3, 4, 4], "z", [1, 2, 4, 4]), [1, 3, 4, 4])
    assert rec.channels_removed == 1 and len(rec.folded) == 1
    assert "constant -0.3" in rec.folded[0]
    w = _weights(handle)
    assert w["W1"].shape == (2, 3, 1, 1) and w["D"].shape == (2, 1, 3, 3)


def test_a_kept_channel_says_why_its_value_is_unknown():
    _, rec = _remove(_pad_model(10, 0.7, 0.0), [1, 3, 4, 4])
    assert rec.kept_nonzero_const[0].endswith("Pad 'pad' does not keep it constant")
    _, rec = _remove(_grouped_consumer([1.0, 0.5, 3.0, -0.5]), [1, 3, 4, 4])
    assert "channels [0, 2] of 'B1' are one unit but hold different values [1.0, 3.0]" \
        in rec.kept_nonzero_const[0]


def test_a_clip_bound_that_is_computed_makes_the_value_unknown():
    # Clip(y, min=ReduceMax(x)): the dead channel carries max(0.5, max(x)), not 0.5. Was: a
    # bound that is not stored was read as no bound and 0.5 folded.
    rng = np.random.default_rng(10)
    inits = [_init("W1", _conv_w(rng, 3, 3, (1,))), _init("B1", [0.2, 0.5, -0.3]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("ReduceMax", ["x"], ["lo"], name="rm", keepdims=0),
             helper.make_node("Clip", ["y", "lo"], ["k"], name="clip"),
             helper.make_node("Conv", ["k", "W2"], ["z"], name="c2")]
    _, rec = _remove(_model(nodes, inits, [1, 3, 4, 4], "z", [1, 2, 4, 4]), [1, 3, 4, 4])
    assert rec.channels_removed == 0 and rec.folded == []
    assert rec.kept_nonzero_const[0].endswith("Clip 'clip' does not keep it constant")
