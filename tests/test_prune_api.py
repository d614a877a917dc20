"""onnxprune.prune end to end on built models: exact zero counts, pattern invariants on the real
weight layouts, dtypes, Constant-node/subgraph/shared weights, external data, the pass API.

Mask invariants are asserted with ``resize=False`` (shapes kept); removing dead channels is
tested on its own below."""

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import builders as B
import onnxprune
from onnxprune.model.io import iter_tensors
from onnxprune.passes.base import PruneState
from onnxprune.passes.masking import ApplyMasks, ScoreWeights
from onnxprune.passes.validate import Validate
from onnxprune.passes.weights import FindWeights, SelectWeights


def arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in iter_tensors(model.graph) if t.name}


def w2d(result, name):
    w = {w.name: w for w in result.state.weights}[name]
    return w.layout.to_2d(result.state.handle.read(w.tensor))


def zeros(a):
    return int(a.size - np.count_nonzero(a))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_local_unstructured_exact_zero_count_per_layer(sparsity):
    res = onnxprune.prune(B.conv_gemm_model(), sparsity=sparsity, resize=False)
    a = arrays(res.model)
    assert zeros(a["conv.w"]) == round(sparsity * a["conv.w"].size)
    assert zeros(a["fc.w"]) == round(sparsity * a["fc.w"].size)
    assert zeros(a["conv.b"]) == 0  # biases are never pruned


def test_global_exact_total_and_bounds():
    res = onnxprune.prune(B.conv_gemm_model(), sparsity=0.7, scope="global", max_sparsity=0.75, resize=False)
    a = arrays(res.model)
    total = a["conv.w"].size + a["fc.w"].size
    assert zeros(a["conv.w"]) + zeros(a["fc.w"]) == round(0.7 * total)
    assert zeros(a["fc.w"]) <= int(0.75 * a["fc.w"].size)
    assert zeros(a["conv.w"]) <= int(0.75 * a["conv.w"].size)


def test_existing_zeros_count_toward_target():
    model = B.matmul_model(k=40, n=10)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.ravel()[::2] = 0  # 0.5 sparse already
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    res = onnxprune.prune(model, sparsity=0.8, resize=False)
    assert zeros(arrays(res.model)["W"]) == 320


def test_int_sparsity_is_a_zero_count():
    res = onnxprune.prune(B.conv_gemm_model(), sparsity=500, scope="global", resize=False)
    a = arrays(res.model)
    assert zeros(a["conv.w"]) + zeros(a["fc.w"]) == 500


@pytest.mark.parametrize("make,name", [
    (lambda: B.conv_gemm_model(), "conv.w"),
    (lambda: B.gemm_model(0, k=16, n=12), "W"),
    (lambda: B.gemm_model(1, k=16, n=12), "W"),
    (lambda: B.matmul_model(k=24, n=12), "W"),
    (lambda: B.matmul_model(k=24, n=12, left=True), "W"),
])
def test_two_four_along_reduction_axis(make, name):
    res = onnxprune.prune(make(), pattern="2:4")
    m = w2d(res, name)
    assert m.shape[1] % 4 == 0
    nnz = (m.reshape(m.shape[0], -1, 4) != 0).sum(axis=2)
    assert nnz.max() <= 2 and (nnz == 2).all()  # random weights: exactly 2 kept per group


def test_two_four_on_conv_counts_input_channels_per_kernel_position():
    res = onnxprune.prune(B.conv_gemm_model(), pattern="2:4", op_types="Conv")
    raw = arrays(res.model)["conv.w"]  # [16, 8, 3, 3]
    groups = (raw != 0).reshape(16, 2, 4, 3, 3).sum(axis=2)  # 4 consecutive Cin at (cout,kh,kw)
    assert groups.max() == 2


@pytest.mark.parametrize("name,make", [("conv.w", B.conv_gemm_model),
                                       ("W", lambda: B.gemm_model(0))])
def test_four_by_one_blocks_span_output_channels(name, make):
    res = onnxprune.prune(make(), pattern="4x1", sparsity=0.5)
    m = w2d(res, name) != 0
    rows = m.shape[0] - m.shape[0] % 4
    blocks = m[:rows].reshape(rows // 4, 4, -1)
    assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all()
    assert zeros(w2d(res, name)) >= round(0.5 * m.size)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16])
def test_dtypes_preserved(dtype):
    model = B.conv_gemm_model()
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t).astype(dtype)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    # the graph computes in float: fp16/bf16/fp64 weights reach Conv/Gemm through Cast
    for t in list(model.graph.initializer):
        name = t.name
        t.name = name + ".stored"
        model.graph.node.insert(0, onnx.helper.make_node("Cast", [t.name], [name], to=1))
    res = onnxprune.prune(model, sparsity=0.5, resize=False)
    for t in res.model.graph.initializer:
        assert t.data_type == model.graph.initializer[0].data_type
    a = arrays(res.model)
    assert a["conv.w.stored"].dtype == np.dtype(dtype)
    assert zeros(a["conv.w.stored"]) == round(0.5 * a["conv.w.stored"].size)


def test_constant_node_weight_pruned():
    res = onnxprune.prune(B.matmul_model(constant_node=True), sparsity=0.5, resize=False)
    const = res.model.graph.node[0].attribute[0].t
    assert zeros(numpy_helper.to_array(const)) == 24 * 12 // 2


def test_subgraph_weights_pruned_and_model_runs():
    res = onnxprune.prune(B.if_subgraph_model(), sparsity=0.5, resize=False)
    a = arrays(res.model)
    for name in ("W_then", "W_else", "W_outer"):
        assert zeros(a[name]) == 16, name
    x = np.ones((2, 8), np.float32)
    assert B.run(res.model, {"x": x, "cond": np.array(True)})[0].shape == (2, 4)


def test_shared_weight_pruned_once():
    res = onnxprune.prune(B.shared_weight_model(), sparsity=0.5, resize=False)
    assert [r.name for r in res.report.rows] == ["W"]
    assert zeros(arrays(res.model)["W"]) == 32


def test_input_proto_never_modified():
    model = B.conv_gemm_model()
    before = model.SerializeToString()
    onnxprune.prune(model, sparsity=0.9)
    assert model.SerializeToString() == before


def test_user_masks_and_scores():
    model = B.matmul_model(k=8, n=4)
    keep = np.zeros((8, 4), bool)
    keep[0] = True
    res = onnxprune.prune(model, masks={"W": keep})
    np.testing.assert_array_equal(arrays(res.model)["W"] != 0, keep)
    scores = np.arange(32, dtype=np.float32).reshape(8, 4)  # raw layout [K, N]
    res = onnxprune.prune(model, criterion="scores", scores={"W": scores}, sparsity=0.25)
    kept = arrays(res.model)["W"] != 0
    assert not kept.ravel()[:8].any() and kept.ravel()[8:].all()


def test_external_data_model_keeps_layout(tmp_path):
    src = tmp_path / "ext.onnx"
    m = B.conv_gemm_model()
    onnx.save_model(m, str(src), save_as_external_data=True, location="ext.bin", size_threshold=0)
    res = onnxprune.prune(src, sparsity=0.5, output=tmp_path / "out.onnx", resize=False)
    out = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in out.graph.initializer)
    full = arrays(onnx.load(str(tmp_path / "out.onnx")))
    assert zeros(full["conv.w"]) == round(0.5 * full["conv.w"].size)
    assert res.report.comparison is not None


def test_pass_pipeline_records():
    state = PruneState.from_model(B.conv_gemm_model())
    results = [p(state) for p in [FindWeights(), SelectWeights(pattern="1x4", sparsity=0.5),
                                  ScoreWeights(), ApplyMasks(), Validate()]]
    assert [r.record.name for r in results] == ["find-weights", "select", "score", "mask",
                                                "validate"]
    assert results[3].modified and not results[0].modified
    assert state.comparison.worst_cosine < 1.0


def test_report_totals_match_weights():
    res = onnxprune.prune(B.conv_gemm_model(), sparsity=0.6, resize=False)
    rep = res.report
    a = arrays(res.model)
    assert rep.params_before == a["conv.w"].size + a["fc.w"].size
    assert rep.nonzeros_after == np.count_nonzero(a["conv.w"]) + np.count_nonzero(a["fc.w"])
    assert rep.macs_before == 16 * 100 * 8 * 9 + 10 * 16


def test_fixed_operand_and_nan_weights_left_alone_and_reported():
    from onnx import TensorProto, helper
    ramp = np.tile(np.arange(16, dtype=np.float32), (4, 1))  # [K=4, N=16] integer ramp
    bad = B.rng(1).standard_normal((16, 8)).astype(np.float32)
    bad[0, 0] = np.nan
    good = B.rng(2).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "ramp"], ["a"]),
             helper.make_node("MatMul", ["a", "bad"], ["b"]),
             helper.make_node("MatMul", ["b", "good"], ["y"])]
    model = B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                         [numpy_helper.from_array(a, n) for a, n in
                          ((ramp, "ramp"), (bad, "bad"), (good, "good"))])
    res = onnxprune.prune(model, sparsity=0.5, validate=False, resize=False)
    a = arrays(res.model)
    np.testing.assert_array_equal(a["ramp"], ramp)
    assert zeros(a["good"]) == 32 and zeros(a["bad"]) == 0
    reasons = dict(res.report.skipped)
    assert "fixed operand" in reasons["ramp"] and "NaN" in reasons["bad"]
    res = onnxprune.prune(model, sparsity=0.5, validate=False, guard_fixed=False, resize=False)
    assert zeros(arrays(res.model)["ramp"]) == 32


def _conv_chain_model():
    """Conv -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm: channels prunable end to end."""
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1)]
    inits = [B.tensor("w1", (32, 3, 3, 3), 1), B.tensor("b1", (32,), 2),
             B.tensor("w2", (24, 32, 3, 3), 3), B.tensor("b2", (24,), 4),
             B.tensor("fc", (10, 24), 5), B.tensor("fcb", (10,), 6)]
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


@pytest.mark.parametrize("round_to", [1, 8])
def test_channel_pattern_removes_channels_for_real(round_to):
    res = onnxprune.prune(_conv_chain_model(), pattern="channel", sparsity=0.5, round_to=round_to)
    a = arrays(res.model)
    assert a["w1"].shape[0] == 16 and a["w2"].shape == (a["w2"].shape[0], 16, 3, 3)
    assert a["w2"].shape[0] % round_to == 0 and a["w2"].shape[0] < 24
    assert a["fc"].shape == (10, a["w2"].shape[0]) and a["b1"].shape == (16,)
    rep = res.report
    assert rep.macs_after < rep.macs_before and rep.params_after < rep.params_before
    rows = {r.name: r for r in rep.rows}
    assert rows["w1"].channels == (32, 16)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert B.run(res.model, {"x": x})[0].shape == (1, 10)


def test_dead_channels_after_masks_removed_exactly():
    model = _conv_chain_model()
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    b1 = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w1[:6] = 0
    b1[:6] = -1.0  # relu(-1) = 0: these channels are dead and emit exactly zero
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(b1, "b1"))
    masked = onnxprune.prune(model, sparsity=0.3, resize=False)
    resized = onnxprune.prune(model, sparsity=0.3)
    assert arrays(resized.model)["w1"].shape[0] <= 26
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(B.run(resized.model, {"x": x})[0], B.run(masked.model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_nm_skips_convs_whose_input_channels_do_not_fill_groups():
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w2"], ["y"], pads=[1, 1, 1, 1])]
    model = B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
                         [B.tensor("w1", (8, 3, 3, 3), 1), B.tensor("w2", (8, 8, 3, 3), 2)])
    res = onnxprune.prune(model, pattern="2:4")
    assert "multiples of 4" in dict(res.report.skipped)["w1"]
    a = arrays(res.model)
    assert zeros(a["w1"]) == 0
    assert ((a["w2"] != 0).reshape(8, 2, 4, 3, 3).sum(axis=2) == 2).all()
