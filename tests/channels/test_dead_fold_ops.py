"""Dead-channel folds through the ops the property test draws least often, one deterministic
case each: a rounding Cast (fp16) between producer and consumer, Resize (nearest, linear),
ConvTranspose as consumer and as producer, Gather on and off the channel axis. Each removes the
dead channels of a small model and checks the result against the unresized model (outputs within
float tolerance, onnx's full check); each names exactly what was removed, folded or kept and why.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.dead import remove_dead_channels
from onnxprune.model.io import load
from onnxprune.ops.registry import entry_of, fold_refusal
from channel_models import assert_close, run

X = [1, 3, 4, 4]


def _init(name, arr, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(arr, dtype), name)


def _model(nodes, inits, out, x_shape=X, opset=17):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          x_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    feeds = {"x": np.zeros(x_shape, np.float32)}
    shape = run(model, feeds)[0].shape
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
    onnx.checker.check_model(model, full_check=True)
    return model


def _remove(model, x_shape=X):
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    for seed in (0, 1):
        feeds = {"x": np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)}
        assert_close(run(handle.model, feeds), run(model, feeds))
    return handle, rec


def _weights(handle):
    return {t.name: numpy_helper.to_array(t) for t in handle.model.graph.initializer}


def _conv_w(rng, cout, cin, zero_rows=(), k=1):
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    w[list(zero_rows)] = 0
    return w


# -- Cast (fp16 round trip) -------------------------------------------------------------------
# 2^-11 + 2^-30 is an fp32 value; 1 + it is, exactly, 2^-30 above the fp16 rounding midpoint
# between 1 and 1 + 2^-10. Exact (float64) arithmetic rounds it up to 1 + 2^-10; the runtime's
# fp32 Add rounds the sum to the midpoint itself, which fp16 rounds (to even) down to 1.0.
_NEAR_MIDPOINT = 2.0 ** -11 + 2.0 ** -30


def _cast_model(bias, shift):
    """Conv (row 1 zero, bias ``bias``) -> Add(shift) -> Cast fp16 -> Cast fp32 -> 1x1 Conv."""
    rng = np.random.default_rng(11)
    inits = [_init("W1", _conv_w(rng, 3, 3, (1,))), _init("B1", [0.2, bias, -0.3]),
             _init("K", np.array([0.0, shift, 0.0]).reshape(3, 1, 1)),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Add", ["y", "K"], ["s"], name="add"),
             helper.make_node("Cast", ["s"], ["h"], name="to16", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["f"], name="to32", to=TensorProto.FLOAT),
             helper.make_node("Conv", ["f", "W2"], ["z"], name="c2")]
    return _model(nodes, inits, "z")


def test_a_constant_rounded_by_an_fp16_cast_folds_as_the_rounded_value():
    # 0.1 + 1.3 is far from an fp16 rounding boundary: the unit carries fp16(1.4) exactly.
    handle, rec = _remove(_cast_model(1.3, 0.1))
    assert rec.channels_removed == 1 and rec.kept_nonzero_const == []
    want = float(np.float16(np.float32(1.3) + np.float32(0.1)))
    assert rec.folded == [f"unit 1 (constant {want:.6g}) folded into Conv 'c2'"]
    w = _weights(handle)
    assert w["W1"].shape == (2, 3, 1, 1) and w["W2"].shape == (2, 2, 1, 1)


def test_a_constant_at_an_fp16_rounding_boundary_is_kept_with_the_reason():
    # Was: folded as 1 + 2^-10 (float64 rounding) where the model's fp32 run carries 1.0: the
    # consumer's bias was off by 2^-10 * sum(W2[:, 1]).
    model = _cast_model(1.0, _NEAR_MIDPOINT)
    got = run(model, {"x": np.zeros(X, np.float32)})  # the model's own value of the channel
    handle, rec = _remove(model)
    assert rec.channels_removed == 0 and rec.folded == []
    assert len(rec.kept_nonzero_const) == 1
    assert rec.kept_nonzero_const[0].endswith("Cast 'to16' does not keep it constant")
    assert _weights(handle)["W1"].shape == (3, 3, 1, 1)
    assert np.isfinite(got[0]).all()


def test_a_constant_an_fp16_cast_overflows_is_kept():
    # 1e5 is +inf in fp16: inf * W2 is inf or NaN, never a finite bias.
    handle, rec = _remove_nonfinite(_cast_model(1e5, 0.0))
    assert rec.channels_removed == 0 and rec.folded == []
    assert len(rec.kept_nonzero_const) == 1
    assert _weights(handle)["W1"].shape == (3, 3, 1, 1)


def _remove_nonfinite(model):
    """Like :func:`_remove` for a model whose outputs hold inf/NaN: equal where the original is
    finite, the same non-finite pattern elsewhere."""
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal(X).astype(np.float32)}
    (got,), (want,) = run(handle.model, feeds), run(model, feeds)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-4)
    return handle, rec


def test_the_cast_constant_rule_rounds_or_gives_up():
    cast = entry_of("Cast").const
    node = helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16)
    out = cast(node, [np.array([1.4, 1.0 + _NEAR_MIDPOINT, 1e5, 0.0, -2.5])], lambda n: None)[0]
    assert out[0] == float(np.float16(1.4)) and out[3] == 0.0 and out[4] == -2.5
    assert np.isnan(out[1]) and np.isnan(out[2])
    # widening and fp32 targets round as the type does; integer targets are not followed
    to32 = helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT)
    assert cast(to32, [np.array([1.0 + _NEAR_MIDPOINT])], None)[0][0] == \
        float(np.float32(1.0 + _NEAR_MIDPOINT))
    for to in (TensorProto.INT64, TensorProto.BFLOAT16):
        assert cast(helper.make_node("Cast", ["a"], ["b"], to=to), [np.array([1.5])], None) is None


# -- Resize -----------------------------------------------------------------------------------
def _resize_model(mode, bias, opset=17, scales=(1, 1, 2, 2), pads=0):
    rng = np.random.default_rng(12)
    inits = [_init("W1", _conv_w(rng, 3, 3, (0,))), _init("B1", [bias, 0.2, -0.4]),
             _init("S", scales), _init("W2", rng.standard_normal((2, 3, 2, 2))),
             _init("B2", [0.1, -0.1])]
    ins = ["y", "S"] if opset < 11 else ["y", "", "S"]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Resize", ins, ["r"], name="rs", mode=mode),
             helper.make_node("Conv", ["r", "W2", "B2"], ["z"], name="c2", kernel_shape=[2, 2],
                              pads=[pads] * 4)]
    return _model(nodes, inits, "z", opset=opset)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("opset", [10, 13])
def test_a_constant_through_resize_folds_into_an_unpadded_conv(mode, opset):
    if mode == "cubic" and opset < 11:
        pytest.skip("cubic Resize is opset 11+")
    for scales in ((1, 1, 2, 2), (1, 1, 0.5, 0.5), (1, 1, 1.5, 1.5)):
        handle, rec = _remove(_resize_model(mode, 0.8, opset, scales))
        assert rec.channels_removed == 1 and rec.kept_nonzero_const == [], scales
        assert rec.folded == ["unit 0 (constant 0.8) folded into Conv 'c2'"]
        w = _weights(handle)
        assert w["W1"].shape == (2, 3, 1, 1) and w["W2"].shape == (2, 2, 2, 2)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_a_constant_through_resize_into_a_padded_conv_is_kept(mode):
    handle, rec = _remove(_resize_model(mode, 0.8, pads=1))
    assert rec.channels_removed == 0 and rec.folded == []
    assert rec.kept_nonzero_const[0].endswith(
        "Conv 'c2': zero padding: the border outputs see 0, not the constant")
    # a zero constant needs no fold: the channel goes even before a padded conv
    handle, rec = _remove(_resize_model(mode, 0.0, pads=1))
    assert rec.channels_removed == 1 and rec.folded == [] and rec.kept_nonzero_const == []


@pytest.mark.parametrize("axes", [None, [2, 3], [1, 2, 3], [-3, -2, -1], [3]])
def test_resize_sizes_are_rewritten_at_the_channel_axis_entry(axes):
    # Resize by ``sizes`` with the opset-18 ``axes`` attribute: ``sizes`` has one entry per
    # named axis. Was: entry 1 was taken as the channel count whatever ``axes`` said, so with
    # axes=[2, 3] removing a dead channel rewrote the output width to the channel count.
    rng = np.random.default_rng(20)
    full = {2: 6, 3: 7}
    named = [0, 1, 2, 3] if axes is None else [a % 4 for a in axes]
    sizes = [{0: 1, 1: 4}.get(a, full.get(a)) for a in named]
    inits = [_init("W1", _conv_w(rng, 4, 3, (1,))), _init("B1", [0.2, 0.0, -0.3, 0.5]),
             _init("SZ", sizes, np.int64), _init("W2", rng.standard_normal((2, 4, 1, 1)))]
    attrs = {} if axes is None else {"axes": axes}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Resize", ["y", "", "", "SZ"], ["r"], name="rs", mode="nearest",
                              **attrs),
             helper.make_node("Conv", ["r", "W2"], ["z"], name="c2")]
    model = _model(nodes, inits, "z", opset=19)
    handle, rec = _remove(model)
    assert rec.channels_removed == 1 and rec.folded == [] and rec.kept_nonzero_const == []
    resize = next(n for n in handle.model.graph.node if n.op_type == "Resize")
    new = _weights(handle)[resize.input[3]].tolist()
    assert new == [{1: 3}.get(a, s) for a, s in zip(named, sizes)]


def test_tf_crop_and_resize_writes_its_extrapolation_value_outside_the_box():
    rng = np.random.default_rng(13)
    roi = [0, 0, -0.5, -0.5, 1, 1, 1.5, 1.5]  # a box reaching past the input: extrapolated
    inits = [_init("W1", _conv_w(rng, 3, 3, (0,))), _init("B1", [0.8, 0.2, -0.4]),
             _init("roi", roi), _init("S", [1, 1, 2, 2]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Resize", ["y", "roi", "S"], ["r"], name="rs", mode="linear",
                              coordinate_transformation_mode="tf_crop_and_resize",
                              extrapolation_value=0.0),
             helper.make_node("Conv", ["r", "W2"], ["z"], name="c2")]
    handle, rec = _remove(_model(nodes, inits, "z"))
    assert rec.channels_removed == 0 and rec.folded == []
    assert rec.kept_nonzero_const[0].endswith("Resize 'rs' does not keep it constant")


# -- ConvTranspose ----------------------------------------------------------------------------
def test_a_constant_reaching_a_conv_transpose_is_kept_with_the_reason():
    rng = np.random.default_rng(14)
    inits = [_init("W1", _conv_w(rng, 3, 3, (2,))), _init("B1", [0.2, 0.4, 1.1]),
             _init("T", rng.standard_normal((3, 2, 3, 3))), _init("TB", [0.3, -0.3])]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("ConvTranspose", ["y", "T", "TB"], ["z"], name="ct",
                              strides=[2, 2])]
    handle, rec = _remove(_model(nodes, inits, "z"))
    assert rec.channels_removed == 0 and rec.folded == []
    assert rec.kept_nonzero_const[0].endswith(
        "ConvTranspose 'ct': ConvTranspose spreads a constant input unevenly over its output")
    assert "ConvTranspose" in fold_refusal(nodes[1], 1, (3, 2, 3, 3))


def test_a_zero_input_channel_before_a_conv_transpose_goes_without_a_fold():
    # bias 0: the dead channel carries 0, which any consumer may drop
    rng = np.random.default_rng(14)
    inits = [_init("W1", _conv_w(rng, 3, 3, (2,))), _init("B1", [0.2, 0.4, 0.0]),
             _init("T", rng.standard_normal((3, 2, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("ConvTranspose", ["y", "T"], ["z"], name="ct", strides=[2, 2])]
    handle, rec = _remove(_model(nodes, inits, "z"))
    assert rec.channels_removed == 1 and rec.folded == [] and rec.kept_nonzero_const == []
    w = _weights(handle)
    assert w["W1"].shape == (2, 3, 1, 1) and w["T"].shape == (2, 2, 3, 3)


@pytest.mark.parametrize("pads", [0, 1])
def test_a_zero_conv_transpose_filter_outputs_its_bias_and_folds(pads):
    # ConvTranspose T[:, 1] all zero: output channel 1 is its bias 0.6 everywhere (the output
    # padding positions too), folded into the 1x1 conv after it.
    rng = np.random.default_rng(15)
    t = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
    t[:, 1] = 0
    inits = [_init("T", t), _init("TB", [0.3, 0.6, -0.2]),
             _init("W2", rng.standard_normal((2, 3, 1, 1))), _init("B2", [0.5, 0.25])]
    nodes = [helper.make_node("ConvTranspose", ["x", "T", "TB"], ["y"], name="ct",
                              strides=[2, 2], pads=[pads] * 4, output_padding=[1, 1]),
             helper.make_node("Conv", ["y", "W2", "B2"], ["z"], name="c2")]
    handle, rec = _remove(_model(nodes, inits, "z"))
    assert rec.channels_removed == 1 and rec.kept_nonzero_const == []
    assert rec.folded == ["unit 1 (constant 0.6) folded into Conv 'c2'"]
    w = _weights(handle)
    assert w["T"].shape == (3, 2, 2, 2) and w["TB"].shape == (2,) and w["W2"].shape == (2, 2, 1, 1)


def test_a_grouped_conv_transpose_producer_needs_one_constant_per_unit():
    # group=2: output channels 0 and 2 (position 0 of each group) are one unit, both zero
    # filters; their biases differ, so the unit carries no one constant.
    rng = np.random.default_rng(16)
    t = rng.standard_normal((4, 2, 1, 1)).astype(np.float32)
    t[:, 0] = 0
    inits = [_init("W0", _conv_w(rng, 4, 3)), _init("T", t),
             _init("W2", rng.standard_normal((2, 4, 1, 1)))]
    for tb, removed in (([0.5, 0.1, 0.5, -0.1], 1), ([0.5, 0.1, 0.7, -0.1], 0)):
        model_inits = inits + [_init("TB", tb)]
        nodes = [helper.make_node("Conv", ["x", "W0"], ["a"], name="c0"),
                 helper.make_node("ConvTranspose", ["a", "T", "TB"], ["y"], name="ct", group=2),
                 helper.make_node("Conv", ["y", "W2"], ["z"], name="c2")]
        handle, rec = _remove(_model(nodes, model_inits, "z"))
        assert rec.channels_removed == removed, tb
        assert len(rec.kept_nonzero_const) == 1 - removed, tb
        assert _weights(handle)["T"].shape == (4, 2 - removed, 1, 1)


# -- Gather -----------------------------------------------------------------------------------
def _gather_model(axis, indices, bias=0.9):
    rng = np.random.default_rng(17)
    inits = [_init("W1", _conv_w(rng, 4, 3, (1,))), _init("B1", [0.2, bias, -0.4, 0.3]),
             _init("I", indices, np.int64)]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Gather", ["y", "I"], ["g"], name="ga", axis=axis)]
    model_inits = list(inits)
    return nodes, model_inits, rng


def test_gather_selecting_channels_keeps_them_and_stays_exact():
    # Gather on the channel axis with constant indices (channel 1 twice, channel 3 dropped):
    # the channel map is not one to one, so the groups are frozen and nothing is removed.
    nodes, inits, rng = _gather_model(1, [1, 0, 1, 2])
    inits.append(_init("W2", rng.standard_normal((2, 4, 1, 1))))
    nodes.append(helper.make_node("Conv", ["g", "W2"], ["z"], name="c2"))
    handle, rec = _remove(_model(nodes, inits, "z"))
    assert rec.channels_removed == 0 and rec.folded == []
    assert _weights(handle)["W1"].shape == (4, 3, 1, 1)


@pytest.mark.parametrize("axis", [2, 3])
def test_a_constant_through_gather_on_a_spatial_axis_folds(axis):
    # Gather of rows/columns [0, 2, 3]: every channel keeps its values, the dead one its constant.
    nodes, inits, rng = _gather_model(axis, [0, 2, 3])
    inits.append(_init("W2", rng.standard_normal((2, 4, 1, 1))))
    nodes.append(helper.make_node("Conv", ["g", "W2"], ["z"], name="c2"))
    handle, rec = _remove(_model(nodes, inits, "z"))
    assert rec.channels_removed == 1 and rec.kept_nonzero_const == []
    assert rec.folded == ["unit 1 (constant 0.9) folded into Conv 'c2'"]
    w = _weights(handle)
    assert w["W1"].shape == (3, 3, 1, 1) and w["W2"].shape == (2, 3, 1, 1)


def test_a_gather_on_an_embedding_table_is_not_a_constant_rule_for_its_indices():
    # The Gather constant rule follows its data operand only: indices carry no channel value.
    gather = entry_of("Gather").const
    node = helper.make_node("Gather", ["d", "i"], ["y"], axis=2)
    assert gather(node, [None, np.array([3.0, 3.0])], None) is None
    out = gather(node, [np.array([0.5, np.nan]), np.array([3.0, 3.0])], None)
    np.testing.assert_array_equal(out[0], [0.5, np.nan])


def test_a_constant_that_overflows_float32_is_kept_with_the_reason():
    # Exp(100) is 2.7e43 in float64, inf in the model's fp32 run. Was: 2.7e43 * sum(W2) folded
    # into the consumer's bias (inf), where the model computes inf * W2 (inf or NaN).
    rng = np.random.default_rng(18)
    inits = [_init("W1", _conv_w(rng, 3, 3, (1,))), _init("B1", [0.2, 100.0, -0.3]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Exp", ["y"], ["e"], name="exp"),
             helper.make_node("Conv", ["e", "W2"], ["z"], name="c2")]
    handle, rec = _remove_nonfinite(_model(nodes, inits, "z"))
    assert rec.channels_removed == 0 and rec.folded == []
    assert rec.kept_nonzero_const[0].endswith("Exp 'exp' makes it overflow float32")
    assert _weights(handle)["W1"].shape == (3, 3, 1, 1)


def test_a_constant_cast_to_fp16_folds_into_an_fp16_consumer_within_one_fp16_step():
    # Conv (fp32, row 1 zero, bias 0.8) -> Cast fp16 -> Conv (fp16 weights and bias): the unit
    # carries fp16(0.8); its fold lands in the fp16 bias, rounded as the model's own fp16 bias
    # is, so the outputs agree to within one fp16 step of their magnitude.
    rng = np.random.default_rng(19)
    inits = [_init("W1", _conv_w(rng, 3, 3, (1,))), _init("B1", [0.2, 0.8, -0.3]),
             _init("W2", rng.standard_normal((2, 3, 1, 1)), np.float16),
             _init("B2", [0.1, 0.2], np.float16)]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["y"], name="c1"),
             helper.make_node("Cast", ["y"], ["h"], name="to16", to=TensorProto.FLOAT16),
             helper.make_node("Conv", ["h", "W2", "B2"], ["z16"], name="c2"),
             helper.make_node("Cast", ["z16"], ["z"], name="to32", to=TensorProto.FLOAT)]
    model = _model(nodes, inits, "z")
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    assert rec.channels_removed == 1 and rec.kept_nonzero_const == []
    assert rec.folded == [f"unit 1 (constant {float(np.float16(0.8)):.6g}) folded into Conv 'c2'"]
    w = _weights(handle)
    assert w["W2"].shape == (2, 2, 1, 1) and w["B2"].dtype == np.float16
    feeds = {"x": np.random.default_rng(0).standard_normal(X).astype(np.float32)}
    (got,), (want,) = run(handle.model, feeds), run(model, feeds)
    assert np.abs(got - want).max() <= 2.0 ** -10 * np.abs(want).max()


def test_the_prune_report_names_the_cast_that_kept_a_dead_channel():
    # End to end: masks keeping exactly the nonzeros (W1's row 1 was zero already), the default
    # run removes dead channels; the one behind the undecided fp16 rounding stays, and the
    # report's notes say which Cast made its value unknown.
    import onnxprune

    model = _cast_model(1.0, _NEAR_MIDPOINT)
    masks = {t.name: numpy_helper.to_array(t) != 0 for t in model.graph.initializer
             if t.name in ("W1", "W2")}
    result = onnxprune.prune(copy.deepcopy(model), masks=masks)
    notes = [n for n in result.report.notes if "not folded exactly" in n or "Cast" in n]
    assert any("Cast 'to16' does not keep it constant" in n for n in notes), result.report.notes
    assert _weights(result)["W1"].shape == (3, 3, 1, 1)
    feeds = {"x": np.random.default_rng(0).standard_normal(X).astype(np.float32)}
    assert_close(run(result.model, feeds), run(model, feeds))
