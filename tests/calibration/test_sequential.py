"""Layer-by-layer ("sequential") calibrated pruning: the asymmetric reconstruction math, paired
statistics against a reference model, exposing sessions that drop unneeded nodes, waves, and
end to end through onnxprune.prune. Every expectation is recomputed directly with numpy (and
onnxruntime for activations), never hard-coded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.calibration.extract import activation_rows
from onnxprune.calibration.statistics import collect_layer_stats
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.runtime import session as runtime_session
from onnxprune.runtime.session import needed_nodes
from onnxprune.model.io import load
from onnxprune.calibration.reconstruct import (asymmetric_bias, asymmetric_target, centered_cross,
                                   sparsegpt_prune)
from onnxprune.masking.selection import select
from onnxprune.calibration.sequential import sequential_waves
from onnxprune.ops.weights import find_weights

import builders as B

F = TensorProto.FLOAT


# =============================================================================================
# helpers
# =============================================================================================
def _vi(name, shape=None):
    return helper.make_tensor_value_info(name, F, shape)


def _expose(model: onnx.ModelProto, names, feeds) -> dict:
    """Run a copy of ``model`` whose outputs are the intermediate tensors ``names``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(_vi(n) for n in names)
    return {n: v.astype(np.float64) for n, v in zip(names, B.run(copy, feeds))}


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    (t,) = [t for t in model.graph.initializer if t.name == name]
    return numpy_helper.to_array(t)


def _w2d(result, name: str) -> np.ndarray:
    """The ``W[out, in]`` view of weight ``name`` in a prune result."""
    (w,) = [w for w in result.state.weights if w.name == name]
    return w.layout.to_2d(result.state.handle.read(w.tensor)).astype(np.float64)


def _record(result, name: str):
    (rec,) = [r for r in result.state.records if r.name == name]
    return rec


def _correlated(n, cols, r, mean=0.0):
    mix = r.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    return r.standard_normal((n, cols)) @ mix + mean


def _pair(n=1200, cols=32, rows=16, seed=0):
    """(X_ref, X, W): X is X_ref through a near-identity linear map plus noise, as an input
    whose upstream was pruned looks to a layer."""
    r = np.random.default_rng(seed)
    x_ref = _correlated(n, cols, r, mean=0.5)
    distort = np.eye(cols) + 0.2 * r.standard_normal((cols, cols)) / np.sqrt(cols)
    x = x_ref @ distort + 0.1 * r.standard_normal((n, cols))
    w = r.standard_normal((rows, cols))
    return x_ref, x, w


def _ref_err(x_ref, x, w, q):
    """Relative error of ``X Q^T`` against the reference output ``X_ref W^T``."""
    ref = x_ref @ w.T
    return np.linalg.norm(ref - x @ np.asarray(q, dtype=np.float64).T) / np.linalg.norm(ref)


def _check_pattern(keep: np.ndarray, spec: str, zeros=None, name="") -> None:
    rows, cols = keep.shape
    if spec == "2:4":
        assert cols % 4 == 0, name
        assert (keep.reshape(rows, cols // 4, 4).sum(-1) == 2).all(), name
    elif spec == "4x1":
        assert rows % 4 == 0, name
        blocks = keep.reshape(rows // 4, 4, cols)
        assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all(), name
    if zeros is not None:
        assert int((~keep).sum()) == zeros, name


# =============================================================================================
# 1. asymmetric_target
# =============================================================================================
def test_asymmetric_target_is_w_when_nothing_upstream_changed():
    x_ref, _, w = _pair()
    h = x_ref.T @ x_ref
    for damp in (1e-8, 0.01, 0.5):
        np.testing.assert_allclose(asymmetric_target(w, h, h, damp), w, rtol=1e-10, atol=1e-10)
    # grouped form too
    h3 = np.stack([h, 2 * h, h + np.eye(h.shape[0])])
    w3 = np.concatenate([w, w[::-1], -w])
    np.testing.assert_allclose(asymmetric_target(w3, h3, h3), w3, rtol=1e-10, atol=1e-10)


def test_asymmetric_target_reproduces_the_reference_better_than_w():
    x_ref, x, w = _pair()
    target = asymmetric_target(w, x.T @ x, x.T @ x_ref)
    assert target.shape == w.shape and target.dtype == np.float64
    assert _ref_err(x_ref, x, w, target) < 0.5 * _ref_err(x_ref, x, w, w)


def test_asymmetric_target_is_least_squares_with_tiny_damp():
    x_ref, x, w = _pair(n=600, cols=20, rows=7, seed=1)
    target = asymmetric_target(w, x.T @ x, x.T @ x_ref, damp=1e-12)
    lstsq = np.linalg.lstsq(x, x_ref @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(target, lstsq, rtol=1e-6, atol=1e-8)


def test_asymmetric_target_closed_form_and_dead_inputs():
    x_ref, x, w = _pair(n=500, cols=18, rows=6, seed=2)
    dead = [3, 11]
    x[:, dead] = 0.0  # inputs the pruned upstream no longer drives
    h, c = x.T @ x, x.T @ x_ref
    damp = 0.05
    live = np.diag(h) > 0
    lam = damp * np.diag(h)[live].mean()  # the mean over live inputs only
    expect = (w @ c.T + lam * w) @ np.linalg.inv(h + lam * np.eye(h.shape[0]))
    target = asymmetric_target(w, h, c, damp)
    np.testing.assert_allclose(target, expect, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(target[:, dead], w[:, dead], rtol=1e-12)  # pulled toward W
    # the ridge normal equations hold
    grad = x.T @ (x @ target.T - x_ref @ w.T) + lam * (target - w).T
    assert np.abs(grad).max() < 1e-8 * np.abs(x.T @ x_ref @ w.T).max()


def test_asymmetric_target_groups_are_separate_problems():
    parts = [_pair(n=400, cols=12, rows=4, seed=s) for s in (3, 4, 5)]
    h = np.stack([x.T @ x for _, x, _ in parts])
    c = np.stack([x.T @ xr for xr, x, _ in parts])
    w = np.concatenate([wi for _, _, wi in parts])
    joint = asymmetric_target(w, h, c, damp=0.02)
    alone = np.concatenate([asymmetric_target(wi, h[i], c[i], damp=0.02)
                            for i, (_, _, wi) in enumerate(parts)])
    np.testing.assert_allclose(joint, alone, rtol=1e-12, atol=1e-12)


# =============================================================================================
# 2. centered_cross and asymmetric_bias
# =============================================================================================
def test_centered_cross_flat_and_grouped():
    r = np.random.default_rng(6)
    x = r.standard_normal((3, 50, 7)) + r.standard_normal((3, 1, 7)) * 2
    x_ref = x + 0.3 * r.standard_normal(x.shape) + 1.0
    n = x.shape[1]
    # [in] sums
    got = centered_cross(x[0].T @ x_ref[0], x[0].sum(0), x_ref[0].sum(0), n)
    expect = (x[0] - x[0].mean(0)).T @ (x_ref[0] - x_ref[0].mean(0))
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-10)
    # [g, in] sums against [g, in, in] cross
    cross = np.matmul(x.transpose(0, 2, 1), x_ref)
    got = centered_cross(cross, x.sum(1), x_ref.sum(1), n)
    xc, rc = x - x.mean(1, keepdims=True), x_ref - x_ref.mean(1, keepdims=True)
    np.testing.assert_allclose(got, np.matmul(xc.transpose(0, 2, 1), rc), rtol=1e-10,
                               atol=1e-10)
    # with X_ref = X it is the centered Hessian
    h = x[1].T @ x[1]
    xc = x[1] - x[1].mean(0)
    np.testing.assert_allclose(centered_cross(h, x[1].sum(0), x[1].sum(0), n), xc.T @ xc,
                               rtol=1e-10, atol=1e-10)


def test_asymmetric_bias_restores_the_reference_mean():
    x_ref, x, w_ref = _pair(n=300, cols=16, rows=8, seed=7)
    b = np.random.default_rng(7).standard_normal(8)
    w_new = np.where(np.random.default_rng(8).random(w_ref.shape) < 0.5, 0.0, w_ref * 1.1)
    delta = asymmetric_bias(w_ref, w_new, x.mean(0), x_ref.mean(0))
    assert delta.shape == (8,)
    np.testing.assert_allclose((x @ w_new.T + b + delta).mean(0), (x_ref @ w_ref.T + b).mean(0),
                               rtol=1e-10, atol=1e-10)


def test_asymmetric_bias_per_row_group():
    g, per, cols, n = 4, 3, 9, 80
    r = np.random.default_rng(9)
    x = r.standard_normal((g, n, cols)) + r.standard_normal((g, 1, cols))
    x_ref = x * 1.2 + 0.5
    w_ref = r.standard_normal((g * per, cols))
    w_new = w_ref * (r.random(w_ref.shape) < 0.5)
    b = r.standard_normal(g * per)
    delta = asymmetric_bias(w_ref, w_new, x.mean(1), x_ref.mean(1))
    for i in range(g):
        rows = slice(i * per, (i + 1) * per)
        np.testing.assert_allclose((x[i] @ w_new[rows].T + b[rows] + delta[rows]).mean(0),
                                   (x_ref[i] @ w_ref[rows].T + b[rows]).mean(0),
                                   rtol=1e-10, atol=1e-10)


# =============================================================================================
# 3. SparseGPT toward the asymmetric target
# =============================================================================================
@pytest.mark.parametrize("spec", ["unstructured", "2:4", "4x1"])
def test_sparsegpt_toward_the_target_beats_sparsegpt_on_w(spec):
    x_ref, x, w = _pair()
    h = x.T @ x
    zeros = w.size // 2
    target = asymmetric_target(w, h, x.T @ x_ref)
    new, keep = sparsegpt_prune(target, h, spec, zeros, blocksize=16)
    plain, plain_keep = sparsegpt_prune(w, h, spec, zeros, blocksize=16)
    assert np.all(new[~keep] == 0) and np.all(plain[~plain_keep] == 0)
    _check_pattern(keep, spec, zeros)
    _check_pattern(plain_keep, spec, zeros)
    assert _ref_err(x_ref, x, w, new) < 0.97 * _ref_err(x_ref, x, w, plain)


# =============================================================================================
# 4. paired statistics
# =============================================================================================
def _two_conv_model(group=1, seed=0):
    """x[n,4,8,8] -> conv1(8, 3x3, pad 1)+b -> Relu -> conv2(8, 3x3, pad 1, stride 2, group)+b."""
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1],
                         strides=[2, 2], group=group, name="conv2"),
    ]
    inits = [B.tensor("c1.w", (8, 4, 3, 3), seed), B.tensor("c1.b", (8,), seed + 1),
             B.tensor("c2.w", (8, 8 // group, 3, 3), seed + 2), B.tensor("c2.b", (8,), seed + 3)]
    return B.make_model(nodes, [_vi("x", ["n", 4, 8, 8])], [_vi("c2", ["n", 8, 4, 4])], inits)


def _with_weight(model, name, value):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return copy


def _conv2(model):
    weights, _ = find_weights(load(model))
    (w,) = [w for w in weights if w.name == "c2.w"]
    return w


@pytest.mark.parametrize("group", [1, 2, 8])
def test_paired_stats_against_itself(group):
    model = _two_conv_model(group)
    x = np.random.default_rng(10).standard_normal((6, 4, 8, 8)).astype(np.float32)
    data = CalibrationSet.from_arrays(model, {"x": x})
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    w = _conv2(model)
    st = collect_layer_stats(model, [w], data, batch_size=4, reference=ref)[w.key]
    assert st.cross.shape == (group, w.layout.shape2d[1], w.layout.shape2d[1])
    hess = st.group_hessians if group > 1 else st.hessian[None]
    np.testing.assert_allclose(st.cross, hess, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.ref_sums, st.group_sums, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", [1, 2, 8])
def test_paired_stats_match_direct_cross_moments(group):
    dense = _two_conv_model(group)
    r = np.random.default_rng(11)
    w1 = _init(dense, "c1.w")
    pruned = _with_weight(dense, "c1.w", np.where(r.random(w1.shape) < 0.5, 0, w1 * 0.8))
    x = r.standard_normal((7, 4, 8, 8)).astype(np.float32)
    data = CalibrationSet.from_arrays(pruned, {"x": x})
    handle = load(pruned)
    before = (handle.model.SerializeToString(), dense.SerializeToString())
    w = _conv2(handle)
    stats = collect_layer_stats(handle, [w], data, batch_size=3, reference=dense)
    st = stats[w.key]
    # what each model's conv2 reads, from onnxruntime, turned into X by activation_rows
    xs = activation_rows(w, _expose(pruned, ["r1"], {"x": x})["r1"])
    xs_ref = activation_rows(w, _expose(dense, ["r1"], {"x": x})["r1"])
    assert xs.shape[0] == group and not np.allclose(xs, xs_ref)
    scale = np.abs(xs).max() * np.abs(xs_ref).max() * xs.shape[1]
    np.testing.assert_allclose(st.cross, np.matmul(xs.transpose(0, 2, 1), xs_ref),
                               rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(st.ref_sums, xs_ref.sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(st.group_sums, xs.sum(1), rtol=1e-5, atol=1e-4)
    assert st.group_rows == xs.shape[1]
    hess = np.matmul(xs.transpose(0, 2, 1), xs)
    np.testing.assert_allclose(st.group_hessians if group > 1 else st.hessian[None], hess,
                               rtol=1e-5, atol=1e-6 * scale)
    # both protos are left exactly as they were (outputs and dropped nodes restored)
    assert (handle.model.SerializeToString(), dense.SerializeToString()) == before
    # without the Hessian: no cross moment, but the reference's sums still come
    light = collect_layer_stats(handle, [w], data, want_hessian=False, reference=dense)[w.key]
    assert light.cross is None and light.hessian is None
    np.testing.assert_allclose(light.ref_sums, st.ref_sums, rtol=1e-12)


# =============================================================================================
# 5. exposing sessions keep only the nodes the exposed tensors need
# =============================================================================================
def _node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)


def test_needed_nodes_on_a_branching_graph():
    nodes = [
        _node("Relu", ["x"], ["a"]),  # 0
        _node("Neg", ["a"], ["b"]),  # 1
        _node("Exp", ["x"], ["c"]),  # 2
        _node("Add", ["b", "c"], ["d"]),  # 3
        _node("Abs", ["a"], ["e"]),  # 4
        _node("Mul", ["d", "e"], ["f"]),  # 5
    ]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2])], [_vi("f", [2])])
    assert needed_nodes(graph, ["a"]) == [0]
    assert needed_nodes(graph, ["b"]) == [0, 1]
    assert needed_nodes(graph, ["c"]) == [2]
    assert needed_nodes(graph, ["d"]) == [0, 1, 2, 3]
    assert needed_nodes(graph, ["c", "e"]) == [0, 2, 4]
    assert needed_nodes(graph, ["f"]) == list(range(6))
    assert needed_nodes(graph, ["x"]) == []  # a graph input needs no node


def test_needed_nodes_follow_outer_scope_reads_of_subgraphs():
    cond_out = helper.make_tensor_value_info("t", F, [2])
    then_g = helper.make_graph([_node("Identity", ["p"], ["t"])], "then", [], [cond_out])
    else_g = helper.make_graph([_node("Identity", ["x"], ["t"])], "else", [], [cond_out])
    # a Loop body holding an If whose branch reads outer 'u' two scopes up
    inner_then = helper.make_graph([_node("Add", ["v", "u"], ["w"])], "it", [], [_vi("w", [2])])
    inner_else = helper.make_graph([_node("Identity", ["v"], ["w"])], "ie", [], [_vi("w", [2])])
    body = helper.make_graph(
        [_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("If", ["cond_in"], ["w"], then_branch=inner_then,
                          else_branch=inner_else, name="inner_if"),
         _node("Identity", ["w"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _vi("v", [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _vi("v_out", [2])])
    nodes = [
        _node("Neg", ["x"], ["p"]),  # 0: read only inside the If's then-branch
        _node("Relu", ["x"], ["q"]),  # 1: read by nobody needed
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g,
                         name="if"),  # 2
        _node("Exp", ["x"], ["u"]),  # 3: read only inside the Loop body's nested If
        helper.make_node("Loop", ["trip", "cond", "y"], ["z"], body=body, name="loop"),  # 4
        _node("Abs", ["q"], ["out"]),  # 5
    ]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2])], [_vi("z", [2])])
    assert needed_nodes(graph, ["y"]) == [0, 2]
    assert needed_nodes(graph, ["z"]) == [0, 2, 3, 4]
    assert needed_nodes(graph, ["out"]) == [1, 5]


def test_exposing_an_early_tensor_runs_only_its_ancestors(monkeypatch):
    r = np.random.default_rng(12)
    model = B.relu_mlp3(12)
    nodes = list(model.graph.node)
    seen = []
    real = runtime_session.open_session

    def spy(handle):
        seen.append([n.name for n in handle.model.graph.node])
        return real(handle)

    monkeypatch.setattr(runtime_session, "open_session", spy)
    handle = load(model)
    weights, _ = find_weights(handle)
    data = CalibrationSet.from_arrays(model, {"x": r.standard_normal((5, 6)).astype(np.float32)})
    stats = collect_layer_stats(handle, [w for w in weights if w.name == "W2"], data)
    assert seen == [["mm1", "relu1"]]
    r1 = _expose(model, ["r1"], {"x": next(data.batches(8))["x"]})["r1"]
    np.testing.assert_allclose(stats["W2"].hessian, r1.T @ r1, rtol=1e-5, atol=1e-5)
    assert [n.name for n in handle.model.graph.node] == [n.name for n in nodes]


# =============================================================================================
# 6. waves
# =============================================================================================
def _plans(model):
    weights, _ = find_weights(load(model))
    plans, _ = select(weights, pattern="unstructured", sparsity=0.5, criterion="magnitude")
    return plans


def _wave_keys(model):
    waves, outside = sequential_waves(model, _plans(model))
    return [sorted(p.weight.key for p in wave) for wave in waves], [p.weight.key
                                                                   for p in outside]


def test_waves_of_a_chain_go_one_weight_at_a_time_in_order():
    nodes = []
    prev = "x"
    for i in range(4):
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"]),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        prev = f"r{i}"
    model = B.make_model(nodes, [_vi("x", [2, 8])], [_vi(prev, [2, 8])],
                         [B.tensor(f"W{i}", (8, 8), i) for i in range(4)])
    assert _wave_keys(model) == ([["W0"], ["W1"], ["W2"], ["W3"]], [])


def test_qkv_projections_share_a_wave():
    d = 8
    nodes = [helper.make_node("MatMul", ["x", f"W{p}"], [p]) for p in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]),  # no weight: activations only
              helper.make_node("Softmax", ["s"], ["a"], axis=-1),
              helper.make_node("MatMul", ["a", "v"], ["ctx"]),
              helper.make_node("MatMul", ["ctx", "Wo"], ["o"]),
              helper.make_node("Add", ["o", "x"], ["res"]),
              helper.make_node("MatMul", ["res", "Wff"], ["y"])]
    model = B.make_model(nodes, [_vi("x", [5, d])], [_vi("y", [5, d])],
                         [B.tensor(f"W{p}", (d, d), i) for i, p in enumerate("qkv")]
                         + [B.tensor("Wo", (d, d), 5), B.tensor("Wff", (d, d), 6)])
    assert _wave_keys(model) == ([["Wk", "Wq", "Wv"], ["Wo"], ["Wff"]], [])


def _resnet_block_model():
    """stem -> r0; r0 -> conv1 -> relu -> conv2; r0 -> down (1x1, stride 2); add -> relu -> c3."""
    def conv(inp, w, out, **attrs):
        return helper.make_node("Conv", [inp, w, w.replace(".w", ".b")], [out], name=out, **attrs)

    nodes = [conv("x", "stem.w", "s", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s"], ["r0"]),
             conv("r0", "c1.w", "c1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             conv("r1", "c2.w", "c2", pads=[1, 1, 1, 1]),
             conv("r0", "down.w", "dn", strides=[2, 2]),
             helper.make_node("Add", ["c2", "dn"], ["sum"]),
             helper.make_node("Relu", ["sum"], ["r2"]),
             conv("r2", "c3.w", "y", pads=[1, 1, 1, 1])]
    shapes = {"stem.w": (8, 3, 3, 3), "c1.w": (8, 8, 3, 3), "c2.w": (8, 8, 3, 3),
              "down.w": (8, 8, 1, 1), "c3.w": (8, 8, 3, 3)}
    inits = []
    for i, (name, shape) in enumerate(shapes.items()):
        inits += [B.tensor(name, shape, 2 * i), B.tensor(name.replace(".w", ".b"), (8,), 2 * i + 1)]
    return B.make_model(nodes, [_vi("x", ["n", 3, 8, 8])], [_vi("y", ["n", 8, 4, 4])], inits)


def test_residual_block_downsample_shares_the_first_convs_wave():
    waves, outside = _wave_keys(_resnet_block_model())
    assert waves == [["stem.w"], ["c1.w", "down.w"], ["c2.w"], ["c3.w"]] and outside == []


def test_waves_see_through_outer_scope_reads_of_subgraphs():
    # W1 reads the If's output; only the If's then-branch reads h0 (outer scope), W0's output
    out = _vi("t", [2, 8])
    then_g = helper.make_graph([_node("Relu", ["h0"], ["t"])], "then", [], [out])
    else_g = helper.make_graph([_node("Relu", ["x"], ["t"])], "else", [], [out])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="mm0"),
             helper.make_node("If", ["cond"], ["i"], then_branch=then_g, else_branch=else_g,
                              name="if"),
             helper.make_node("MatMul", ["i", "W1"], ["y"], name="mm1")]
    model = B.make_model(nodes, [_vi("x", [2, 8]),
                                 helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                         [_vi("y", [2, 8])], [B.tensor("W0", (8, 8), 0), B.tensor("W1", (8, 8), 1)])
    assert _wave_keys(model) == ([["W0"], ["W1"]], [])


def test_subgraph_weights_are_outside_the_waves():
    model = B.if_subgraph_model()
    waves, outside = _wave_keys(model)
    assert waves == [] and sorted(outside) == sorted(p.weight.key for p in _plans(model))


# =============================================================================================
# 7. end to end
# =============================================================================================
def _gemm_chain_model():
    """x[n,16] -> Gemm(32)+b -> Relu -> Gemm(12)+b."""
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
             helper.make_node("Gemm", ["r1", "W2", "b2"], ["y"], transB=1, name="fc2")]
    inits = [B.tensor("W1", (32, 16), 20), B.tensor("b1", (32,), 21),
             B.tensor("W2", (12, 32), 22), B.tensor("b2", (12,), 23)]
    return B.make_model(nodes, [_vi("x", ["n", 16])], [_vi("y", ["n", 12])], inits)


def _wanda_mask(w2d, act2d, sparsity=0.5):
    """Keep mask of local unstructured Wanda: the lowest |W| * ||X_j|| go."""
    scores = np.abs(w2d) * np.sqrt((act2d ** 2).sum(0))[None, :]
    keep = np.ones(w2d.size, dtype=bool)
    keep[np.argsort(scores, axis=None, kind="stable")[:int(round(sparsity * w2d.size))]] = False
    return keep.reshape(w2d.shape)


def test_wanda_norms_come_from_the_pruned_upstream():
    model = _gemm_chain_model()
    r = np.random.default_rng(13)
    x = (r.standard_normal((64, 16)) * r.uniform(0.2, 3.0, 16) + 0.5).astype(np.float32)
    res = onnxprune.prune(model, criterion="wanda", calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False)
    w1, w2 = _init(model, "W1").astype(np.float64), _init(model, "W2").astype(np.float64)
    # layer 1 reads the model input: Wanda on x
    keep1 = _wanda_mask(w1, x.astype(np.float64))
    np.testing.assert_array_equal(_w2d(res, "W1") != 0, keep1)
    np.testing.assert_array_equal(_w2d(res, "W1"), np.where(keep1, w1, 0))  # no updates
    # layer 2: norms of r1 in the model whose first layer is pruned and bias-corrected
    r1_now = _expose(res.model, ["r1"], {"x": x})["r1"]
    keep2 = _wanda_mask(w2, r1_now)
    np.testing.assert_array_equal(_w2d(res, "W2") != 0, keep2)
    # ... which is not what the dense model's norms would choose
    r1_dense = _expose(model, ["r1"], {"x": x})["r1"]
    assert (keep2 != _wanda_mask(w2, r1_dense)).any()
    assert not np.array_equal(_init(res.model, "b1"), _init(model, "b1"))  # bias was moved


def test_sparsegpt_layer_is_the_centered_ridge_fit_to_the_dense_output():
    # fc2 keeps every weight (sparsity 0), so SparseGPT returns its target untouched: the ridge
    # fit, on centered moments, of the dense fc2's output from what fc2 reads now, with the
    # bias taking the means. Its normal equations must hold on the activations themselves.
    model = _gemm_chain_model()
    r = np.random.default_rng(14)
    x = (r.standard_normal((96, 16)) + 1.0).astype(np.float32)
    res = onnxprune.prune(model, criterion="sparsegpt", calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False, config={"rules": [{"op_names": ["fc2"], "sparsity": 0.0}]})
    assert (_w2d(res, "W1") == 0).sum() == 256 and (_w2d(res, "W2") == 0).sum() == 0
    xs = _expose(res.model, ["r1"], {"x": x})["r1"]
    xs_ref = _expose(model, ["r1"], {"x": x})["r1"]
    w, fit = _init(model, "W2").astype(np.float64), _w2d(res, "W2")
    xc, rc = xs - xs.mean(0), xs_ref - xs_ref.mean(0)
    diag = (xc ** 2).sum(0)
    lam = 0.01 * diag[diag > 0].mean()
    grad = xc.T @ (xc @ fit.T - rc @ w.T) + lam * (fit - w).T
    assert np.abs(grad).max() < 1e-5 * np.abs(xc.T @ rc @ w.T).max()
    b_new = _init(model, "b2") + w @ xs_ref.mean(0) - fit @ xs.mean(0)
    np.testing.assert_allclose(_init(res.model, "b2"), b_new, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fit, w)  # it really moved: the upstream changed


def _biased_model(seed=30):
    """x[n,4,8,8] -> conv1+b -> Relu -> conv2+b -> Relu -> GAP -> Flatten -> MatMul + Add."""
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "W3"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b3"], ["y"], name="fc_bias"),
    ]
    inits = [B.tensor("c1.w", (8, 4, 3, 3), seed), B.tensor("c1.b", (8,), seed + 1),
             B.tensor("c2.w", (8, 8, 3, 3), seed + 2), B.tensor("c2.b", (8,), seed + 3),
             B.tensor("W3", (8, 12), seed + 4), B.tensor("b3", (12,), seed + 5)]
    return B.make_model(nodes, [_vi("x", ["n", 4, 8, 8])], [_vi("y", ["n", 12])], inits)


def _calib(shape, seed=31, mean=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) + mean).astype(np.float32)


def _layer_means(model, x, names=("c1", "c2", "y")):
    """Mean of each layer's output (before its activation) per channel over the data."""
    outs = _expose(model, list(names), {"x": x})
    return {n: v.mean(axis=tuple(i for i in range(v.ndim) if i != 1)) for n, v in outs.items()}


@pytest.fixture(scope="module")
def biased():
    model = _biased_model()
    x = _calib((32, 4, 8, 8))
    res = onnxprune.prune(model, criterion="sparsegpt", calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False)
    return model, x, res


def test_sparsegpt_keeps_every_layers_mean_output(biased):
    model, x, res = biased
    dense, now = _layer_means(model, x), _layer_means(res.model, x)
    for name in dense:
        scale = np.abs(dense[name]).max()
        np.testing.assert_allclose(now[name], dense[name], rtol=0, atol=1e-5 * scale + 1e-6,
                                   err_msg=name)
    for name in ("c1.w", "c2.w", "W3"):  # exact counts; weights really were updated
        w2d = _w2d(res, name)
        assert (w2d == 0).sum() == round(0.5 * w2d.size), name
        dense_w = [w for w in res.state.weights if w.name == name][0].layout.to_2d(
            _init(model, name)).astype(np.float64)
        assert not np.allclose(w2d[w2d != 0], dense_w[w2d != 0]), name
    # the means are the bias correction's doing: without it they drift
    off = onnxprune.prune(model, criterion="sparsegpt", calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False, bias_correction=False)
    drift = _layer_means(off.model, x)
    assert max(np.abs(drift[n] - dense[n]).max() / np.abs(dense[n]).max() for n in dense) > 1e-2


def test_sequential_record_and_report(biased):
    model, _, res = biased
    rec = _record(res, "sequential")
    assert rec.waves == [["c1.w"], ["c2.w"], ["W3"]]
    assert rec.bias_corrected == ["c1.w", "c2.w", "W3"]
    assert rec.model_runs > 0
    names = [r.name for r in res.state.records]
    assert "score" not in names and "mask" not in names and "bias-correction" not in names
    assert "sequential" in res.report.timings
    assert {row.name for row in res.report.rows} == {"c1.w", "c2.w", "W3"}
    assert any("mean outputs stay the dense model's" in n for n in res.report.notes)


def test_waves_in_the_record_of_a_residual_block():
    model = _resnet_block_model()
    x = _calib((8, 3, 8, 8), seed=32)
    res = onnxprune.prune(model, criterion="wanda", calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False)
    waves = [sorted(w) for w in _record(res, "sequential").waves]
    assert waves == [["stem.w"], ["c1.w", "down.w"], ["c2.w"], ["c3.w"]]


def _depthwise_model(seed=40):
    """x[n,4,8,8] -> conv1(8)+b -> Relu -> depthwise conv(8, group 8, 3x3)+b."""
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "dw.w", "dw.b"], ["y"], pads=[1, 1, 1, 1], group=8,
                         name="dw"),
    ]
    inits = [B.tensor("c1.w", (8, 4, 3, 3), seed), B.tensor("c1.b", (8,), seed + 1),
             B.tensor("dw.w", (8, 1, 3, 3), seed + 2), B.tensor("dw.b", (8,), seed + 3)]
    return B.make_model(nodes, [_vi("x", ["n", 4, 8, 8])], [_vi("y", ["n", 8, 8, 8])], inits)


@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda"])
def test_depthwise_conv_keeps_its_per_channel_mean(criterion):
    model = _depthwise_model()
    x = _calib((16, 4, 8, 8), seed=41)
    res = onnxprune.prune(model, criterion=criterion, calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False)
    assert "dw.w" in _record(res, "sequential").bias_corrected
    dense, now = _layer_means(model, x, ("c1", "y")), _layer_means(res.model, x, ("c1", "y"))
    for name in dense:
        np.testing.assert_allclose(now[name], dense[name], rtol=0,
                                   atol=1e-5 * np.abs(dense[name]).max() + 1e-6, err_msg=name)
    assert (_w2d(res, "dw.w") == 0).sum() == 36
    off = onnxprune.prune(model, criterion=criterion, calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False, bias_correction=False)
    assert np.abs(_layer_means(off.model, x, ("y",))["y"] - dense["y"]).max() > \
        1e-3 * np.abs(dense["y"]).max()


@pytest.mark.parametrize("spec", ["2:4", "4x1"])
def test_patterns_hold_after_sparsegpt_updates_and_bias_moves(spec):
    model = _biased_model(seed=50)
    x = _calib((24, 4, 8, 8), seed=51)
    res = onnxprune.prune(model, pattern=spec, sparsity=None if spec == "2:4" else 0.5,
                          criterion="sparsegpt", calibration={"x": x}, validate=False,
                          allocate="uniform", resize=False)
    rows = {row.name for row in res.report.rows}
    assert rows == {"c1.w", "c2.w", "W3"}
    for name in rows:
        w2d = _w2d(res, name)
        _check_pattern(w2d != 0, spec, w2d.size // 2, name)
    dense, now = _layer_means(model, x), _layer_means(res.model, x)
    for name in dense:
        np.testing.assert_allclose(now[name], dense[name], rtol=0,
                                   atol=1e-5 * np.abs(dense[name]).max() + 1e-6, err_msg=name)


def test_sequential_sparsegpt_beats_layers_fit_to_their_own_outputs(monkeypatch):
    # Without a dense reference each layer only fits its own output (X_ref = X); with it, later
    # layers also absorb their upstream's error, so the model output is closer to the dense one.
    from onnxprune.passes import sequential

    model = _biased_model(seed=60)
    x = _calib((32, 4, 8, 8), seed=61)
    dense = _expose(model, ["y"], {"x": x})["y"]
    kw = dict(criterion="sparsegpt", sparsity=0.6, calibration={"x": x}, validate=False,
              allocate="uniform", resize=False, bias_correction=False)

    def error(res):
        y = _expose(res.model, ["y"], {"x": x})["y"]
        return np.linalg.norm(y - dense) / np.linalg.norm(dense)

    paired = onnxprune.prune(model, **kw)
    monkeypatch.setattr(sequential, "load_dense_reference", lambda original, model: None)
    own = onnxprune.prune(model, **kw)
    assert error(paired) < error(own)


# =============================================================================================
# 8. the caller's model is never changed
# =============================================================================================
@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda"])
def test_input_model_is_untouched(criterion, tmp_path):
    model = _biased_model(seed=70)
    x = _calib((16, 4, 8, 8), seed=71)
    before = model.SerializeToString()
    res = onnxprune.prune(model, criterion=criterion, calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False)
    assert model.SerializeToString() == before
    assert res.model.SerializeToString() != before
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    on_disk = path.read_bytes()
    onnxprune.prune(path, criterion=criterion, calibration={"x": x}, validate=False,
                    allocate="uniform",
                    resize=False)
    assert path.read_bytes() == on_disk


# =============================================================================================
# biases that are not simply the layer's own: Gemm alpha/beta, a bias shared by two layers, a
# Gemm whose weight is input A. A layer the record lists as bias-corrected has the dense
# layer's mean output (one whose bias is not its own is left alone and not listed).
# =============================================================================================
def _corrected_means_hold(model, res, feeds, outputs, axis):
    corrected = _record(res, "sequential").bias_corrected
    dense, now = _expose(model, list(outputs.values()), feeds), \
        _expose(res.model, list(outputs.values()), feeds)
    for weight, out in outputs.items():
        if weight in corrected:
            np.testing.assert_allclose(now[out].mean(axis), dense[out].mean(axis), atol=1e-4,
                                       err_msg=weight)


@pytest.mark.parametrize("attrs", [dict(beta=0.5), dict(alpha=2.0)])
def test_gemm_alpha_beta_bias_correction(attrs):
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1, **attrs)]
    model = B.make_model(nodes, [_vi("x", ["n", 16])], [_vi("y", ["n", 8])],
                         [B.tensor("W", (8, 16), 1), B.tensor("b", (8,), 2)])
    x = _calib((64, 16), seed=80, mean=2.0)
    res = onnxprune.prune(model, criterion="sparsegpt", calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False)
    _corrected_means_hold(model, res, {"x": x}, {"W": "y"}, axis=0)
    assert _record(res, "sequential").bias_corrected == ["W"]


def test_shared_bias_tensor_keeps_means():
    nodes = [helper.make_node("Gemm", ["x", "W1", "b"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b"], ["y"], transB=1)]
    model = B.make_model(nodes, [_vi("x", ["n", 8])], [_vi("y", ["n", 8])],
                         [B.tensor("W1", (8, 8), 1), B.tensor("W2", (8, 8), 3),
                          B.tensor("b", (8,), 2)])
    x = _calib((64, 8), seed=81, mean=2.0)
    res = onnxprune.prune(model, criterion="sparsegpt", calibration={"x": x}, validate=False,
                          allocate="uniform",
                          resize=False)
    _corrected_means_hold(model, res, {"x": x}, {"W1": "h", "W2": "y"}, axis=0)
    assert _record(res, "sequential").bias_corrected == []  # 'b' is not one layer's


def test_gemm_constant_a_bias_is_not_a_row_bias():
    # Y[M, N] = W[M, K] @ X[K, N] + C[N]: row m of W makes output row m; C[n] shifts column n.
    nodes = [helper.make_node("Gemm", ["W", "xt", "c"], ["y"], name="gemm")]
    model = B.make_model(nodes, [_vi("xt", [16, 8])], [_vi("y", [8, 8])],
                         [B.tensor("W", (8, 16), 1), B.tensor("c", (8,), 2)])
    xt = _calib((128, 8), seed=82, mean=2.0)  # 8 batches of the fixed [16, 8] input
    res = onnxprune.prune(model, criterion="sparsegpt", calibration={"xt": xt}, validate=False,
                          allocate="uniform",
                          resize=False)
    corrected = _record(res, "sequential").bias_corrected
    batches = xt.reshape(8, 16, 8)
    dense = np.stack([B.run(model, {"xt": b})[0] for b in batches]).astype(np.float64)
    now = np.stack([B.run(res.model, {"xt": b})[0] for b in batches]).astype(np.float64)
    assert "W" not in corrected  # C shifts output columns, not the weight's rows
    if "W" in corrected:  # each output row's mean (the weight row's output) is the dense one
        np.testing.assert_allclose(now.mean(axis=(0, 2)), dense.mean(axis=(0, 2)), atol=1e-4)


# =============================================================================================
# channel pruning: the layer-by-layer refit toward the dense model
# =============================================================================================
def test_channel_refit_with_nothing_removed_returns_the_dense_model():
    model = _resnet_block_model()
    x = _calib((32, 3, 8, 8), seed=90, mean=0.5)
    res = onnxprune.prune(model, pattern="channel", sparsity=0.0, refit=True,
                          calibration={"x": x}, validate=False)
    assert all(r.shape == r.shape_after for r in res.report.rows)
    dense, now = _expose(model, ["y"], {"x": x})["y"], _expose(res.model, ["y"], {"x": x})["y"]
    np.testing.assert_allclose(now, dense, rtol=0, atol=1e-4 * np.abs(dense).max())


def test_channel_refit_keeps_the_output_mean_and_beats_no_refit():
    model = _resnet_block_model()
    x = _calib((64, 3, 8, 8), seed=91, mean=0.5)
    kw = dict(pattern="channel", sparsity=0.5, validate=False)
    plain = onnxprune.prune(model, **kw)
    refit = onnxprune.prune(model, refit=True, calibration={"x": x}, **kw)
    shapes = [(r.shape, r.shape_after) for r in refit.report.rows]
    assert shapes == [(r.shape, r.shape_after) for r in plain.report.rows]
    assert any(a != b for a, b in shapes)  # channels really went
    dense = _expose(model, ["y"], {"x": x})["y"].astype(np.float64)
    out = {name: _expose(r.model, ["y"], {"x": x})["y"].astype(np.float64)
           for name, r in (("plain", plain), ("refit", refit))}
    err = {k: np.linalg.norm(v - dense) / np.linalg.norm(dense) for k, v in out.items()}
    assert err["refit"] < 0.8 * err["plain"]
    # the last conv keeps its output channels (a graph output): its bias took the dense mean
    np.testing.assert_allclose(out["refit"].mean(axis=(0, 2, 3)), dense.mean(axis=(0, 2, 3)),
                               atol=1e-4 * np.abs(dense).max())
    assert any("layer by layer" in n for n in refit.report.notes)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "magnitude"])
def test_calibration_inputs_the_model_cannot_run_are_a_clear_input_error(criterion):
    from onnxprune.errors import InputDataError
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    model = B.make_model(nodes, [_vi("x", ["n", "k"])], [_vi("y", ["n", 8])],
                         [B.tensor("W1", (16, 8), 1), B.tensor("W2", (8, 8), 2)])
    x = _calib((8, 12), seed=95)  # 12 features; W1 wants 16: onnxruntime fails at the MatMul
    with pytest.raises(InputDataError, match="calibration inputs .*--input-shape"):
        onnxprune.prune(model, criterion=criterion, calibration={"x": x}, validate=False)


def test_layers_too_large_for_a_hessian_fall_back_to_wanda(monkeypatch):
    # The Hessian budget bounds memory: a layer whose [in, in] Hessian would pass it is scored
    # with wanda (norms only) instead, measured and pruned, and the report says so.
    from onnxprune.calibration import hessian
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    model = B.make_model(nodes, [_vi("x", ["n", 64])], [_vi("y", ["n", 8])],
                         [B.tensor("W1", (64, 16), 1), B.tensor("W2", (16, 8), 2)])
    budget = 16 * 16 * 8  # W2's Hessian fits, W1's (64 x 64) does not
    monkeypatch.setattr(hessian, "HESSIAN_BUDGET_BYTES", budget)  # the one budget
    x = _calib((64, 64), seed=96)
    for allocate in ("uniform", "sensitivity"):
        res = onnxprune.prune(model, criterion="sparsegpt", sparsity=0.5, calibration={"x": x},
                              validate=False, resize=False, allocate=allocate)
        crits = {r.name: r.criterion for r in res.report.rows}
        assert crits == {"W1": "wanda", "W2": "sparsegpt"}, allocate
        assert any("W1: its Hessian would take" in n for n in res.report.notes)
        zeros = sum(r.params - r.nonzeros_after for r in res.report.rows)
        assert abs(zeros - 0.5 * (64 * 16 + 16 * 8)) <= 2
    assert "wanda for some weights" in res.state.sensitivity.criterion


def test_channel_refit_skips_layers_too_large_for_a_hessian(monkeypatch):
    from onnxprune.calibration import hessian
    model = _resnet_block_model()
    x = _calib((16, 3, 8, 8), seed=97, mean=0.5)
    # stem (27 columns) and down (8) fit; the 3x3x8-input convs' 72 x 72 Hessians do not
    monkeypatch.setattr(hessian, "HESSIAN_BUDGET_BYTES", 27 * 27 * 8)
    res = onnxprune.prune(model, pattern="channel", sparsity=0.25, refit=True,
                          calibration={"x": x}, validate=False)
    skipped = {n.split(" ")[0] for n in res.report.notes if "not refit" in n}
    assert skipped == {"c1.w", "c2.w", "c3.w"}  # 72 columns each; stem 27, down 8


# =============================================================================================
# real exporter output (corpus cache; skipped without it)
# =============================================================================================
@pytest.mark.parametrize("name, shape", [
    ("ch_ppocr_mobile_v2.0_cls_infer", (8, 3, 48, 192)),  # depthwise, hardswish, SE blocks
    ("light_squeezenet", (8, 3, 224, 224)),  # fire modules: two branches per wave
])
def test_layer_by_layer_on_corpus_models(corpus_model, name, shape):
    path = corpus_model(name)
    model = onnx.load(str(path))
    x = np.random.default_rng(98).random(shape, dtype=np.float32)
    name_in, name_out = model.graph.input[0].name, model.graph.output[0].name
    feed = {name_in: x}

    def outputs(m):  # one sample at a time: squeezenet's batch is fixed at 1
        return np.concatenate([_expose(m, [name_out], {name_in: x[i:i + 1]})[name_out]
                               for i in range(len(x))])

    dense = outputs(model)

    def error(m):
        return np.linalg.norm(outputs(m) - dense) / np.linalg.norm(dense)

    kw = dict(sparsity=0.5, allocate="uniform", validate=True, resize=False)
    magnitude = onnxprune.prune(path, **kw)
    for criterion in ("wanda", "sparsegpt"):
        res = onnxprune.prune(path, criterion=criterion, calibration=feed, **kw)
        assert res.report.comparison is not None  # checker + onnxruntime ran it
        for row in res.report.rows:
            assert row.params - row.nonzeros_after == round(0.5 * row.params), row.name
        waves = _record(res, "sequential").waves
        assert sum(len(w) for w in waves) == len(res.report.rows)
        assert error(res.model) < error(magnitude.model), criterion
