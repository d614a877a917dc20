"""The op registry itself: one entry per op, fields set once, lookups by node and domain."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxprune.ops import registry
from onnxprune.ops.registry import (BiasSlot, activation_of, bias_slot, define, entry, entry_of,
                                    exact_fold, op_types_with)


def test_a_field_defined_twice_or_unknown_is_refused():
    with pytest.raises(ValueError, match="Conv.layout is defined twice"):
        define("Conv", layout=lambda *a: None)
    with pytest.raises(TypeError, match="unknown op entry field"):
        define("Conv", colour=lambda *a: None)


def test_lookup_respects_the_domain():
    assert entry(helper.make_node("Conv", ["x", "w"], ["y"])).op_type == "Conv"
    assert entry(helper.make_node("Conv", ["x", "w"], ["y"], domain="com.example")) is None
    assert entry_of("NoSuchOp") is None


def test_every_weighted_op_says_where_its_activation_and_bias_are():
    # An op with a weight layout is one calibration, bias correction and dead-channel folding
    # can handle: all of its weight fields are set.
    for e in registry.entries_with("layout"):
        assert e.activation and e.bias and e.zero_filter and e.channels and e.macs, e.op_type
    assert set(op_types_with("fold")) <= set(op_types_with("layout"))


@pytest.mark.parametrize("attrs,index,want", [
    ({}, 1, BiasSlot(2, operand="C", beta_attr="beta")),
    ({"alpha": 2.0, "beta": 0.5}, 1, BiasSlot(2, 2.0, 0.5, "C", "beta")),
    ({}, 0, BiasSlot(2, operand="C", beta_attr="beta", mean_shift=False)),
])
def test_gemm_bias_slot_carries_alpha_and_beta(attrs, index, want):
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], **attrs)
    assert bias_slot(node, index) == want
    assert want.scale == want.alpha / want.beta


def test_activation_operand_and_conv_geometry():
    gemm = helper.make_node("Gemm", ["a", "b"], ["y"], transA=1, transB=1)
    assert activation_of(gemm, 1, (4, 8)) == registry.Activation(0, rows_last=True)
    assert activation_of(gemm, 0, (8, 4)) == registry.Activation(1, rows_last=False)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 2],
                            pads=[1, 1, 1, 1], auto_pad="NOTSET")
    act = activation_of(conv, 1, (8, 2, 3, 3))
    assert act.index == 0 and act.conv.kernel == (3, 3) and act.conv.group == 2
    assert act.conv.strides == (2, 2) and act.conv.dilations == (1, 1)
    assert act.conv.auto_pad == "NOTSET" and not act.conv.transpose
    assert not exact_fold(conv, 1)  # zero padding: the constant is not seen at the borders
    assert exact_fold(helper.make_node("Conv", ["x", "w"], ["y"]), 1)
    assert not exact_fold(helper.make_node("ConvTranspose", ["x", "w"], ["y"]), 1)


def test_weight_steps():
    cast = helper.make_node("Cast", ["w"], ["y"], to=onnx.TensorProto.FLOAT)
    assert registry.weight_step(cast, (4, 3), lambda i: None) == ()
    tr = helper.make_node("Transpose", ["w"], ["y"], perm=[1, 0])
    assert registry.weight_step(tr, (4, 3), lambda i: None) == ("transpose", (1, 0))
    rs = helper.make_node("Reshape", ["w", "s"], ["y"])
    assert registry.weight_step(rs, (4, 3, 1, 1), lambda i: np.array([0, -1])) == (
        "reshape", (4, 3))
    assert registry.weight_step(helper.make_node("Relu", ["w"], ["y"]), (4,), None) is None
