"""Per-layer statistics (im2col, Gemm/MatMul rows, chunking); loading lives in test_inputs.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration import statistics as calibration
from onnxprune.calibration.extract import activation_rows
from onnxprune.calibration.statistics import collect_layer_stats
from onnxprune.inputs.dataset import CalibrationSet, generated_calibration
from onnxprune.errors import OptionError
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights

from builders import if_subgraph_model

F = TensorProto.FLOAT


def make_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(list(nodes), "t", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model  # outputs are left shapeless (onnxruntime infers them); no checker run


def _single_op_model(op, attrs, wshape, xshape, seed=0, relu_first=True):
    """x -> [Relu] -> op(W) -> y (no bias: the output is exactly X @ W2d^T)."""
    r = np.random.default_rng(seed)
    w = r.standard_normal(wshape).astype(np.float32)
    nodes = []
    act = "x"
    if relu_first:
        nodes.append(helper.make_node("Relu", ["x"], ["a"]))
        act = "a"
    inputs = [act, "W"] if op != "GemmA" else ["W", act]
    op_type = "Gemm" if op == "GemmA" else op
    nodes.append(helper.make_node(op_type, inputs, ["y"], name="layer", **attrs))
    return make_model(nodes, [helper.make_tensor_value_info("x", F, ["N"] + list(xshape[1:]))],
                      [helper.make_tensor_value_info("y", F, None)],
                      [numpy_helper.from_array(w, "W")]), w


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _weight(model):
    (w,), _ = find_weights(load(model))
    return w


def _npz(tmp_path, name="calib.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


CONV_CASES = [
    ("Conv", dict(pads=[1, 1, 1, 1]), (6, 4, 3, 3), (3, 4, 7, 8)),
    ("Conv", dict(strides=[2, 1], dilations=[1, 2], pads=[0, 2, 1, 0]), (6, 4, 3, 2), (3, 4, 9, 8)),
    ("Conv", dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1]), (6, 2, 3, 3), (3, 4, 7, 8)),
    ("Conv", dict(group=4, pads=[1, 1, 1, 1]), (4, 1, 3, 3), (3, 4, 6, 6)),  # depthwise
    ("Conv", dict(auto_pad="SAME_UPPER", strides=[2, 2]), (5, 3, 4, 3), (3, 3, 9, 8)),
    ("Conv", dict(auto_pad="SAME_LOWER", strides=[2, 2]), (5, 3, 4, 3), (3, 3, 9, 8)),
    ("Conv", dict(auto_pad="VALID", strides=[2, 3]), (5, 3, 3, 3), (3, 3, 9, 8)),
    ("Conv", dict(pads=[2, 1], strides=[2]), (5, 3, 3), (3, 3, 11)),  # 1-D
    ("Conv", dict(pads=[1, 0, 1, 1, 0, 1]), (4, 2, 3, 2, 2), (2, 2, 5, 4, 4)),  # 3-D
    ("ConvTranspose", dict(), (4, 3, 3, 3), (3, 4, 5, 6)),
    ("ConvTranspose", dict(strides=[2, 3], dilations=[2, 1], pads=[1, 2, 2, 0],
                           output_padding=[1, 1]), (4, 3, 3, 4), (2, 4, 5, 6)),
    ("ConvTranspose", dict(strides=[2, 2], group=2), (4, 3, 3, 3), (3, 4, 5, 6)),
    ("ConvTranspose", dict(strides=[2, 2], auto_pad="SAME_UPPER"), (4, 3, 3, 3), (3, 4, 5, 6)),
    ("ConvTranspose", dict(strides=[2, 2], auto_pad="SAME_LOWER"), (4, 3, 3, 3), (3, 4, 5, 6)),
    ("ConvTranspose", dict(strides=[2, 2], output_shape=[11, 12]), (4, 3, 3, 3), (3, 4, 5, 6)),
]


def _conv_out_by_row(op, y, group):
    """ORT output [N, C, *O] -> per W2d row, its outputs as [rows(W2d), N*prod(O) * reps]."""
    yc = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1).astype(np.float64)
    if op == "ConvTranspose":  # W2d row co serves output channel g*cog + co of every group
        cog = y.shape[1] // group
        return yc.reshape(group, cog, -1).transpose(1, 0, 2).reshape(cog, -1)
    return yc


@pytest.mark.parametrize("op,attrs,wshape,xshape", CONV_CASES)
def test_conv_rows_reproduce_output_and_hessian_is_exact(op, attrs, wshape, xshape):
    model, w_raw = _single_op_model(op, attrs, wshape, xshape)
    x = np.random.default_rng(1).standard_normal(xshape).astype(np.float32)
    y = _run(model, {"x": x})
    weight = _weight(model)
    w2d = weight.layout.to_2d(w_raw).astype(np.float64)
    group = attrs.get("group", 1)

    # X @ W2d^T is the op's output, position by position (im2col columns in layout order).
    rows = activation_rows(weight, np.maximum(x, 0))
    if op == "Conv":
        per_group = w2d.reshape(group, -1, w2d.shape[1])
        got = np.matmul(rows, per_group.transpose(0, 2, 1))  # [g, N*O, Cout/g]
        got = got.reshape(group, xshape[0], -1, per_group.shape[1])
        got = np.moveaxis(got, 3, 1).reshape(group * per_group.shape[1], xshape[0], *y.shape[2:])
        np.testing.assert_allclose(got.swapaxes(0, 1), y, rtol=1e-4, atol=1e-4)
    else:
        cin = wshape[0]
        col_group = np.tile(np.arange(cin) // (cin // group), rows.shape[2] // cin)
        outs = [(rows[0] * (col_group == g)) @ w2d.T for g in range(group)]
        got = np.concatenate([o.reshape(xshape[0], *y.shape[2:], -1) for o in outs], axis=-1)
        np.testing.assert_allclose(np.moveaxis(got, -1, 1), y, rtol=1e-4, atol=1e-4)

    # H from streaming ORT activations: w_r H w_r^T is the energy of W2d row r's outputs.
    path_data = CalibrationSet.from_arrays(model, {"x": x})
    stats = collect_layer_stats(model, [weight], path_data, batch_size=2)[weight.key]
    energy = (_conv_out_by_row(op, y, group) ** 2).sum(axis=1)
    if stats.group_hessians is not None:
        per_group = w2d.reshape(group, -1, w2d.shape[1])
        quad = np.einsum("gri,gij,grj->gr", per_group, stats.group_hessians, per_group).ravel()
        np.testing.assert_allclose(stats.group_hessians.sum(0), stats.hessian)
    else:
        quad = np.einsum("ri,ij,rj->r", w2d, stats.hessian, w2d)
    np.testing.assert_allclose(quad, energy, rtol=1e-4)
    np.testing.assert_allclose(stats.in_sq_norms, np.diag(stats.hessian), rtol=1e-12)
    reps = group if op == "ConvTranspose" else 1
    assert stats.count == rows.shape[0] * rows.shape[1] * reps


def _naive_im2col(x, kh, kw, stride, pad):
    """Loop im2col of x [N, C, H, W], columns (kh, kw, c), written independently of onnxprune."""
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad))
    xp[:, :, pad:pad + h, pad:pad + w] = x
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    rows = []
    for i in range(n):
        for oy in range(oh):
            for ox in range(ow):
                row = []
                for ky in range(kh):
                    for kx in range(kw):
                        for ci in range(c):
                            row.append(xp[i, ci, oy * stride + ky, ox * stride + kx])
                rows.append(row)
    return np.array(rows)


def test_conv_stats_match_naive_im2col_with_small_blocks(monkeypatch):
    # Tiny blocks force both streaming paths (several samples per block, row slices of one).
    model, _ = _single_op_model("Conv", dict(pads=[1, 1, 1, 1], strides=[2, 2]),
                                (5, 3, 3, 3), (4, 3, 9, 9))
    x = np.random.default_rng(2).standard_normal((4, 3, 9, 9)).astype(np.float32)
    ref = _naive_im2col(np.maximum(x, 0).astype(np.float64), 3, 3, 2, 1)
    data = CalibrationSet.from_arrays(model, {"x": x})
    weight = _weight(model)
    for block in (1 << 20, 27 * 8 * 30, 27 * 8 * 3):
        monkeypatch.setattr(calibration, "BLOCK_BYTES", block)
        stats = collect_layer_stats(model, [weight], data, batch_size=3)[weight.key]
        np.testing.assert_allclose(stats.hessian, ref.T @ ref, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(stats.in_sums, ref.sum(0), rtol=1e-10, atol=1e-9)
        assert stats.count == ref.shape[0]
        nostats = collect_layer_stats(model, [weight], data, want_hessian=False)[weight.key]
        assert nostats.hessian is None
        np.testing.assert_allclose(nostats.in_sq_norms, (ref ** 2).sum(0), rtol=1e-10)
        np.testing.assert_allclose(nostats.in_norms, np.sqrt((ref ** 2).sum(0)), rtol=1e-10)


@pytest.mark.parametrize("op,attrs,wshape,xshape,to_rows", [
    ("Gemm", dict(transB=1), (6, 5), (7, 5), lambda a: a),
    ("Gemm", dict(transA=1), (5, 6), (7, 5, 3), None),  # A is [K, M]: rows are A's columns
    ("GemmA", dict(transB=0), (6, 5), (7, 5, 4), None),  # constant A: rows are B's columns
    ("MatMul", dict(), (5, 6), (7, 3, 4, 5), lambda a: a.reshape(-1, 5)),  # 4-D activation
])
def test_matrix_rows(op, attrs, wshape, xshape, to_rows):
    if op == "Gemm" and attrs.get("transA"):
        xshape = (5, 7)
        to_rows = lambda a: a.T  # noqa: E731
    if op == "GemmA":
        xshape = (5, 4)
        to_rows = lambda a: a.T  # noqa: E731
    model, w_raw = _single_op_model(op, attrs, wshape, xshape)
    x = np.random.default_rng(3).standard_normal(xshape).astype(np.float32)
    data = CalibrationSet.from_arrays(model, {"x": x})
    weight = _weight(model)
    stats = collect_layer_stats(model, [weight], data, batch_size=xshape[0])[weight.key]
    ref = to_rows(np.maximum(x, 0).astype(np.float64))
    np.testing.assert_allclose(stats.hessian, ref.T @ ref, rtol=1e-10, atol=1e-10)
    assert stats.count == ref.shape[0]
    # the rows reproduce the output through the layout's view
    y = _run(model, {"x": x}).astype(np.float64)
    w2d = weight.layout.to_2d(w_raw).astype(np.float64)
    out = ref @ w2d.T
    np.testing.assert_allclose(out, y.T if op == "GemmA" else y.reshape(out.shape), atol=1e-4)


def test_shared_activation_chunks_and_record():
    # x feeds three MatMuls (Q/K/V-like: one accumulator); W3 and W4 both read their sum s.
    r = np.random.default_rng(4)
    ws = [numpy_helper.from_array(r.standard_normal((8, 8)).astype(np.float32), f"W{i}")
          for i in range(5)]
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"h{i}"]) for i in range(3)]
    nodes += [helper.make_node("Sum", ["h0", "h1", "h2"], ["s"]),
              helper.make_node("MatMul", ["s", "W3"], ["y3"]),
              helper.make_node("MatMul", ["s", "W4"], ["y4"]),
              helper.make_node("Add", ["y3", "y4"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, ["N", 8])],
                       [helper.make_tensor_value_info("y", F, ["N", 8])], ws)
    x = r.standard_normal((10, 8)).astype(np.float32)
    data = CalibrationSet.from_arrays(model, {"x": x})
    handle = load(model)
    weights, _ = find_weights(handle)
    one = collect_layer_stats(handle, weights, data, batch_size=4)
    assert one["W0"] is one["W1"] is one["W2"]  # one accumulator for one activation
    assert one["W3"] is one["W4"]
    assert len(one.record.chunks) == 1 and one.record.model_runs == 3
    tiny = collect_layer_stats(handle, weights, data, batch_size=4, budget_bytes=1)
    # the graph input costs nothing; 's' gets its own chunk, shared by W3 and W4
    assert tiny.record.chunks == [["W0", "W1", "W2"], ["W3", "W4"]]
    for k in one:
        np.testing.assert_allclose(tiny[k].hessian, one[k].hessian)
    s = x @ (numpy_helper.to_array(ws[0]) + numpy_helper.to_array(ws[1])
             + numpy_helper.to_array(ws[2]))
    np.testing.assert_allclose(one["W3"].hessian, s.T.astype(np.float64) @ s, rtol=1e-4)
    assert one.record.peak_bytes >= one["W3"].hessian.nbytes
    assert [h.name for h in handle.model.graph.output] == ["y"]  # proto restored


def test_subgraph_weights_are_skipped_with_reason():
    model = if_subgraph_model()
    handle = load(model)
    weights, _ = find_weights(handle)
    data = generated_calibration(model, n=2)
    stats = collect_layer_stats(handle, weights, data)
    assert not stats
    assert set(stats.record.skipped) == {w.key for w in weights}
    assert all("subgraph" in why for why in stats.record.skipped.values())


def test_progress_and_fixed_batch():
    model, _ = _single_op_model("MatMul", {}, (4, 3), (1, 4))  # batch declared symbolic
    seen = []
    data = generated_calibration(model, n=5, seed=1)
    assert data.data_free and len(data) == 5
    stats = collect_layer_stats(model, [_weight(model)], data, batch_size=2,
                                progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (3, 3) and stats.record.data_free
    fixed = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", F, [1, 4])],
                       [helper.make_tensor_value_info("y", F, [1, 3])],
                       [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")])
    fixed_data = generated_calibration(fixed, n=3)
    assert [b["x"].shape for b in fixed_data.batches(8)] == [(1, 4)] * 3


def test_float32_blocks_agree_with_float64():
    model, _ = _single_op_model("Conv", dict(pads=[1, 1, 1, 1]), (8, 6, 3, 3), (4, 6, 10, 10))
    x = np.random.default_rng(6).standard_normal((4, 6, 10, 10)).astype(np.float32)
    data = CalibrationSet.from_arrays(model, {"x": x})
    weight = _weight(model)
    s64 = collect_layer_stats(model, [weight], data)[weight.key]
    s32 = collect_layer_stats(model, [weight], data, precision="float32")[weight.key]
    assert s32.hessian.dtype == np.float64
    np.testing.assert_allclose(s32.hessian, s64.hessian, rtol=1e-5, atol=1e-4)
    with pytest.raises(OptionError, match="precision"):
        collect_layer_stats(model, [weight], data, precision="half")


def test_stats_follow_rewritten_external_weights(tmp_path):
    # Sequential pruning: W1 is rewritten in the handle (external data, not yet saved); the
    # statistics of W2's input must see the new W1, not the file's.
    r = np.random.default_rng(7)
    w1 = r.standard_normal((6, 5)).astype(np.float32)
    w2 = r.standard_normal((5, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, ["N", 6])],
                       [helper.make_tensor_value_info("y", F, ["N", 4])],
                       [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    handle = load(tmp_path / "m.onnx")
    weights, _ = find_weights(handle)
    x = r.standard_normal((9, 6)).astype(np.float32)
    data = CalibrationSet.from_arrays(handle, {"x": x})
    before = collect_layer_stats(handle, weights, data)["W2"].hessian
    np.testing.assert_allclose(before, (x @ w1).T.astype(np.float64) @ (x @ w1), rtol=1e-4)
    new_w1 = w1.copy()
    new_w1[:, 2] = 0
    handle.write(weights[0].tensor, new_w1)
    after = collect_layer_stats(handle, weights, data)["W2"]
    h = (x @ new_w1).astype(np.float64)
    np.testing.assert_allclose(after.hessian, h.T @ h, rtol=1e-4, atol=1e-6)
    assert after.in_sq_norms[2] == 0  # a dead input now


@pytest.mark.parametrize("op,attrs,wshape,xshape", CONV_CASES)
def test_conv_moments_without_im2col_equal_the_im2col_sums(op, attrs, wshape, xshape):
    # Without a Hessian, Conv stats come from strided slices (no im2col): they must equal the
    # sums over the im2col rows, column for column, group by group.
    from onnxprune.calibration.extract import extractor_for
    model, _ = _single_op_model(op, attrs, wshape, xshape)
    weight = _weight(model)
    ex, _ = extractor_for(weight, weight.consumers[0])
    x = np.random.default_rng(2).standard_normal(xshape).astype(np.float32)
    act = np.maximum(x, 0)
    quick = ex.moments(act)
    if op == "ConvTranspose":
        assert quick is None  # no shortcut: blocks are summed
        return
    rows = activation_rows(weight, act)  # [g, rows, in]
    sums, sq, n = quick
    np.testing.assert_allclose(sums, rows.sum(axis=1), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(sq, (rows ** 2).sum(axis=1), rtol=1e-10, atol=1e-10)
    assert n == rows.shape[1]
    data = CalibrationSet.from_arrays(model, {"x": x})
    fast = collect_layer_stats(model, [weight], data, want_hessian=False, batch_size=2)
    full = collect_layer_stats(model, [weight], data, want_hessian=True, batch_size=2)
    a, b = fast[weight.key], full[weight.key]
    np.testing.assert_allclose(a.in_sq_norms, b.in_sq_norms, rtol=1e-10)
    np.testing.assert_allclose(a.group_sums, b.group_sums, rtol=1e-10, atol=1e-12)
    assert (a.count, a.group_rows) == (b.count, b.group_rows)
