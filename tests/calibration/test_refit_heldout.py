"""The channel refit's strength chosen on held-out calibration data
(:func:`onnxprune.calibration.sequential.choose_refit`): the held-out error from moments equals
the explicit one, a refit that would only fit noise is not made, a refit that is right is made
(and recovers the layer), the statistics' split parts are the even and odd batches, and the
choice reaches the report. Every expectation is recomputed with numpy."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.calibration.reconstruct import heldout_error
from onnxprune.calibration.sequential import REFIT_DAMPS, choose_refit, mean_shift
from onnxprune.calibration.statistics import LayerStats, collect_layer_stats
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights


def _stats(x: np.ndarray, x_ref: np.ndarray) -> LayerStats:
    """Paired statistics of rows ``x`` (now) and ``x_ref`` (dense), as collect_layer_stats
    gives them for an ungrouped layer."""
    return LayerStats(in_sq_norms=(x * x).sum(0), hessian=x.T @ x, count=len(x),
                      in_sums=x.sum(0), group_sums=x.sum(0)[None], group_rows=len(x),
                      ref_sums=x_ref.sum(0)[None], cross=(x.T @ x_ref)[None])


def _split(x: np.ndarray, x_ref: np.ndarray, n_fit: int) -> LayerStats:
    whole = _stats(x, x_ref)
    whole.parts = [_stats(x[:n_fit], x_ref[:n_fit]), _stats(x[n_fit:], x_ref[n_fit:])]
    return whole


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_shift", [False, True])
def test_heldout_error_from_moments_is_the_explicit_error(groups, with_shift):
    rng = np.random.default_rng(3)
    rows, cols, n = 12, 10, 50
    w = rng.normal(size=(rows, cols))
    cand = rng.normal(size=(rows, cols))
    cand[:, [2, 7]] = 0.0  # removed input columns
    shift = rng.normal(size=rows) if with_shift else None
    xs = [rng.normal(size=(n, cols)) + 0.3 for _ in range(groups)]
    refs = [x + 0.2 * rng.normal(size=(n, cols)) for x in xs]
    h = np.stack([x.T @ x for x in xs])
    c = np.stack([x.T @ r for x, r in zip(xs, refs)])
    sums = np.stack([x.sum(0) for x in xs])
    ref_sums = np.stack([r.sum(0) for r in refs])
    got = heldout_error(w, cand, h if groups > 1 else h[0], c if groups > 1 else c[0],
                        sums, ref_sums, n, shift)
    per = rows // groups
    explicit = const = 0.0
    for i, (x, r) in enumerate(zip(xs, refs)):
        sl = slice(i * per, (i + 1) * per)
        out = r @ w[sl].T - x @ cand[sl].T - (0.0 if shift is None else shift[sl])
        explicit += np.sum(out ** 2)
        const += np.sum((r @ w[sl].T) ** 2)
    np.testing.assert_allclose(got + const, explicit, rtol=1e-10)


def test_a_refit_that_would_fit_noise_keeps_the_weights():
    # The removed inputs are independent of the kept ones: no refit can predict them, and a
    # least squares over 48 kept inputs from 60 rows only fits those rows' noise.
    rng = np.random.default_rng(11)
    rows, cols, n = 16, 64, 120
    kept = np.arange(48)
    w = rng.normal(size=(rows, cols))
    x = rng.normal(size=(n, cols))
    st = _split(x, x, 60)
    now = w.copy()
    now[:, 48:] = 0.0
    choice = choose_refit(st, w, now, kept, np.ones(rows, bool), has_bias=False)
    assert choice.damp is None and not choice.shift and choice.label == "kept as is"
    # the choice is the least held-out error over every candidate, and each refit is worse
    assert set(choice.errors) == {(None, False)} | {(d, False) for d in REFIT_DAMPS}
    assert all(e > choice.errors[(None, False)] for k, e in choice.errors.items()
               if k != (None, False))
    # and that is right on fresh data from the same distribution: the explicit error of the
    # smallest-damp refit exceeds the kept weights'
    from onnxprune.calibration.reconstruct import asymmetric_target
    fresh = rng.normal(size=(2000, cols))
    fit = asymmetric_target(w, st.parts[0].hessian, st.parts[0].cross, 0.001, kept=kept)
    err_fit = np.linalg.norm(fresh @ w.T - fresh[:, kept] @ fit.T)
    err_kept = np.linalg.norm(fresh @ w.T - fresh[:, kept] @ w[:, kept].T)
    assert err_fit > err_kept


def test_a_refit_that_is_right_is_made_and_recovers_the_layer():
    # The removed inputs are linear in the kept ones: the refit recovers the dense output
    # exactly (up to the smallest ridge), and the held-out choice takes it.
    rng = np.random.default_rng(12)
    rows, cols, n = 16, 40, 400
    kept = np.arange(30)
    w = rng.normal(size=(rows, cols))
    base = rng.normal(size=(n, 30))
    mix = rng.normal(size=(30, 10))
    x = np.hstack([base, base @ mix])
    st = _split(x, x, 200)
    now = w.copy()
    now[:, 30:] = 0.0
    choice = choose_refit(st, w, now, kept, np.ones(rows, bool), has_bias=False)
    assert choice.damp == min(REFIT_DAMPS)
    from onnxprune.calibration.reconstruct import asymmetric_target
    new = asymmetric_target(w, st.hessian, st.cross, choice.damp, kept=kept)
    fresh = rng.normal(size=(500, 30))
    fresh = np.hstack([fresh, fresh @ mix])
    ref = fresh @ w.T
    assert np.linalg.norm(ref - fresh[:, kept] @ new.T) < 1e-2 * np.linalg.norm(ref)
    assert np.linalg.norm(ref - fresh[:, kept] @ w[:, kept].T) > 0.3 * np.linalg.norm(ref)


def test_the_bias_shift_is_kept_only_where_it_helps_on_held_out_data():
    rng = np.random.default_rng(13)
    rows, cols, n = 8, 20, 400
    kept = np.arange(0, 20, 2)
    w = rng.normal(size=(rows, cols))
    now = w.copy()
    now[:, 1::2] = 0.0
    ones = np.ones(rows, bool)
    # removed inputs with a large mean, independent of the kept ones: only the mean can be
    # recovered, by the bias
    x = rng.normal(size=(n, cols))
    x[:, 1::2] += 3.0
    choice = choose_refit(_split(x, x, 200), w, now, kept, ones, has_bias=True)
    assert choice.shift
    # zero-mean inputs: the shift of the fit part's mean is noise on held-out rows
    x = rng.normal(size=(n, cols))
    x -= x.mean(0)
    st = _split(x, x, 200)
    choice = choose_refit(st, w, now, kept, ones, has_bias=True)
    for damp in [None, *REFIT_DAMPS]:
        assert choice.errors[(damp, False)] < choice.errors[(damp, True)] or \
            np.allclose(mean_shift(st.parts[0], w, now), 0)
    assert not choice.shift


def test_no_held_out_rows_means_no_choice():
    x = np.random.default_rng(0).normal(size=(30, 6))
    st = _stats(x, x)
    assert choose_refit(st, np.eye(6), np.eye(6), np.arange(4), np.ones(6, bool), False) is None
    st.parts = [_stats(x, x), _stats(x[:0], x[:0])]
    assert choose_refit(st, np.eye(6), np.eye(6), np.arange(4), np.ones(6, bool), False) is None


def _matmul_model(w: np.ndarray):
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_split_statistics_are_the_even_and_the_odd_batches():
    rng = np.random.default_rng(4)
    model = _matmul_model(rng.normal(size=(6, 5)))
    x = rng.normal(size=(10, 6)).astype(np.float32)
    handle = load(model)
    weights, _ = find_weights(handle)
    data = CalibrationSet.from_arrays(model, {"x": x})
    st = collect_layer_stats(handle, weights, data, batch_size=3, split=True)[weights[0].key]
    x64 = x.astype(np.float64)
    even = np.concatenate([x64[0:3], x64[6:9]])
    odd = np.concatenate([x64[3:6], x64[9:10]])
    for part, rows in zip(st.parts, (even, odd)):
        np.testing.assert_allclose(part.hessian, rows.T @ rows, rtol=1e-12)
        np.testing.assert_allclose(part.in_sums, rows.sum(0), rtol=1e-12)
        assert part.count == len(rows)
    np.testing.assert_allclose(st.hessian, x64.T @ x64, rtol=1e-12)
    assert st.count == 10
    plain = collect_layer_stats(handle, weights, data, batch_size=3)[weights[0].key]
    assert plain.parts is None


def test_the_choice_per_weight_is_in_the_report():
    # two MatMuls: x -> 12 -> 8; channel pruning removes hidden units of the first, the second
    # is refit (or kept) on the held-out batches, and the note says which
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(6, 12)).astype(np.float32)
    w2 = rng.normal(size=(12, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(64, 6)).astype(np.float32)
    res = onnxprune.prune(model, pattern="channel", sparsity=0.25, refit=True,
                          calibration={"x": x}, validate=False)
    note = [n for n in res.report.notes if n.startswith("refit strength chosen per weight on "
                                                         "held-out calibration batches")]
    assert len(note) == 1 and "per weight: " in note[0]
    assert "w2 " in note[0].split("per weight: ")[1]


@pytest.mark.parametrize("groups", [1, 2])
def test_ridge_path_is_the_refit_at_each_damp(groups):
    from onnxprune.calibration.reconstruct import asymmetric_target, ridge_path

    rng = np.random.default_rng(6)
    rows, cols = 8, 12
    w = rng.normal(size=(rows, cols))
    xs = [rng.normal(size=(40, cols)) for _ in range(groups)]
    refs = [x + 0.1 * rng.normal(size=x.shape) for x in xs]
    h = np.stack([x.T @ x for x in xs])
    c = np.stack([x.T @ r for x, r in zip(xs, refs)])
    h[:, 4, :] = h[:, :, 4] = 0.0  # a silent input
    c[:, 4, :] = 0.0
    kept = np.array([0, 1, 3, 4, 6, 7, 9, 11])
    damps = [0.001, 0.1, 10.0]
    for damp, got in zip(damps, ridge_path(w, h, c, damps, kept=kept)):
        np.testing.assert_allclose(got, asymmetric_target(w, h, c, damp, kept=kept),
                                   rtol=1e-8, atol=1e-10)
