"""Weight discovery and the logical W[out, in] view."""

import numpy as np
import onnx
import pytest
from onnx import helper

import builders as B
from onnxprune.model.io import load
from onnxprune.ops.layouts import layout_for
from onnxprune.ops.weights import find_weights


def _weights(model):
    return {w.name: w for w in find_weights(load(model))[0]}


def test_conv_and_gemm_found_biases_not():
    ws = _weights(B.conv_gemm_model())
    assert set(ws) == {"conv.w", "fc.w"}
    assert ws["conv.w"].layout.shape2d == (16, 8 * 9)
    assert ws["fc.w"].layout.shape2d == (10, 16)


def test_conv_view_puts_input_channel_innermost():
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    w = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    lay = layout_for(node, 1, w.shape)
    w2d = lay.to_2d(w)
    # column j = (kh, kw, cin) with cin fastest
    assert w2d[1, 0] == w[1, 0, 0, 0] and w2d[1, 1] == w[1, 1, 0, 0] and w2d[1, 3] == w[1, 0, 0, 1]
    np.testing.assert_array_equal(lay.from_2d(w2d), w)


def test_conv_transpose_out_is_axis_one():
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"])
    w = np.arange(3 * 4 * 2 * 2).reshape(3, 4, 2, 2)  # [Cin, Cout, kh, kw]
    lay = layout_for(node, 1, w.shape)
    w2d = lay.to_2d(w)
    assert w2d.shape == (4, 12)
    assert w2d[2, 1] == w[1, 2, 0, 0]
    np.testing.assert_array_equal(lay.from_2d(w2d), w)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_view_rows_are_outputs(trans_b):
    w = _weights(B.gemm_model(trans_b))["W"]
    arr = onnx.numpy_helper.to_array(w.tensor)
    w2d = w.layout.to_2d(arr)
    assert w2d.shape == (12, 16)
    np.testing.assert_array_equal(w2d, arr if trans_b else arr.T)


@pytest.mark.parametrize("left", [False, True])
def test_matmul_constant_either_side(left):
    w = _weights(B.matmul_model(left=left))["W"]
    arr = onnx.numpy_helper.to_array(w.tensor)
    w2d = w.layout.to_2d(arr)
    assert w2d.shape == (12, 24)
    np.testing.assert_array_equal(w2d, arr if left else arr.T)


def test_batched_matmul_weight_view():
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    w = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # [batch, K, N]
    lay = layout_for(node, 1, w.shape)
    assert lay.shape2d == (8, 3)
    np.testing.assert_array_equal(lay.to_2d(w)[5], w[1, :, 1])
    np.testing.assert_array_equal(lay.from_2d(lay.to_2d(w)), w)


def test_constant_node_weight_found():
    ws = _weights(B.matmul_model(constant_node=True))
    assert ws["W"].location == "constant"


def test_weight_behind_cast_keeps_fp16():
    w = _weights(B.fp16_cast_model())["W16"]
    assert w.dtype == np.float16 and w.consumers[0].via == ("Cast",)


def test_shared_weight_is_one_weight_with_two_consumers():
    w = _weights(B.shared_weight_model())["W"]
    assert [c.node.name for c in w.consumers] == ["mm1", "mm2"]


def test_subgraph_weights_found_with_outer_scope():
    ws = _weights(B.if_subgraph_model())
    assert set(ws) == {"W_then", "W_else", "W_outer"}
    assert ws["W_else"].location == "constant"
    assert ws["W_outer"].consumers[0].node.name == "mm_outer"
    assert "/" in ws["W_then"].graph and ws["W_then"].key.endswith(":W_then")


def test_integer_weight_skipped_with_reason():
    model = B.matmul_model()
    t = model.graph.initializer[0]
    t.CopyFrom(onnx.numpy_helper.from_array(np.ones((24, 12), np.int32), "W"))
    model.graph.node[0].op_type = "MatMulInteger"  # not prunable op: nothing found at all
    weights, skipped = find_weights(load(model))
    assert weights == []


def test_weight_behind_reshape_uses_consumer_view():
    from onnx import TensorProto, numpy_helper
    import onnxprune
    w = B.rng(3).standard_normal((1, 1, 12, 16)).astype(np.float32)  # stored 4-D, used as [N, K]
    nodes = [helper.make_node("Reshape", ["W4", "shape"], ["W"], name="reshape"),
             helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")]
    model = B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
                         [numpy_helper.from_array(w, "W4"),
                          numpy_helper.from_array(np.array([12, -1], np.int64), "shape")])
    found = _weights(model)["W4"]
    assert found.layout.shape2d == (12, 16) and found.consumers[0].via == ("Reshape",)
    res = onnxprune.prune(model, pattern="2:4")
    out = numpy_helper.to_array(res.model.graph.initializer[0])
    assert out.shape == (1, 1, 12, 16)
    assert ((out.reshape(12, 4, 4) != 0).sum(axis=2) == 2).all()


def test_weight_behind_transpose_uses_consumer_view():
    from onnx import TensorProto, numpy_helper
    import onnxprune
    w = B.rng(4).standard_normal((16, 12)).astype(np.float32)  # stored [K, N], fed as [N, K]
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")]
    model = B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])],
                         [numpy_helper.from_array(w, "Wt")])
    found = _weights(model)["Wt"]
    assert found.layout.shape2d == (12, 16) and found.consumers[0].via == ("Transpose",)
    np.testing.assert_array_equal(found.layout.to_2d(w), w.T)
    np.testing.assert_array_equal(found.layout.from_2d(w.T), w)
    res = onnxprune.prune(model, pattern="2:4")
    out = numpy_helper.to_array(res.model.graph.initializer[0])
    assert ((out.T.reshape(12, 4, 4) != 0).sum(axis=2) == 2).all()
