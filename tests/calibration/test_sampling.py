"""Sampled Conv statistics (row cap, seeded positions) and the shifted float32 accumulation."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calibration import statistics as calibration
from onnxprune.calibration.extract import activation_rows, extractor_for, sample_positions
from onnxprune.calibration.reconstruct import sparsegpt_prune
from onnxprune.calibration.statistics import collect_layer_stats, row_cap
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights

F = TensorProto.FLOAT


def _conv_model(cin=4, cout=8, k=3, group=1, stride=1, pad=1, seed=0):
    r = np.random.default_rng(seed)
    w = r.standard_normal((cout, cin // group, k, k)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Conv", ["a", "W"], ["y"], name="conv", group=group,
                              strides=[stride, stride], pads=[pad] * 4)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", F, ["N", cin, 16, 16])],
                              [helper.make_tensor_value_info("y", F, None)],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _data(model, n=12, cin=4, seed=1, mean=0.0):
    x = np.random.default_rng(seed).standard_normal((n, cin, 16, 16)).astype(np.float32) + mean
    return CalibrationSet.from_arrays(model, {"x": x}), x


def _weight(model):
    (w,), _ = find_weights(load(model))
    return w


@pytest.fixture
def small_cap(monkeypatch):
    """A cap small enough that 16x16 maps get sampled: 2 rows per column, at least 40."""
    monkeypatch.setattr(calibration, "ROWS_PER_COLUMN", 2)
    monkeypatch.setattr(calibration, "MIN_ROWS", 40)


def test_sample_positions_are_deterministic_sorted_and_distinct():
    a = sample_positions(256, 10, 7, "act", 3, 4)
    b = sample_positions(256, 10, 7, "act", 3, 4)
    assert np.array_equal(a, b)
    assert a.shape == (4, 10)
    for row in a:
        assert np.array_equal(row, np.unique(row)) and row.min() >= 0 and row.max() < 256
    # sample 4 of a batch starting at 3 is sample 1 of a batch starting at 6... per index
    assert np.array_equal(sample_positions(256, 10, 7, "act", 4, 1)[0], a[1])
    assert not np.array_equal(sample_positions(256, 10, 8, "act", 3, 4), a)  # other seed
    assert not np.array_equal(sample_positions(256, 10, 7, "other", 3, 4), a)  # other layer
    full = sample_positions(5, 9, 0, "act", 0, 2)
    assert np.array_equal(full, [[0, 1, 2, 3, 4]] * 2)


@pytest.mark.parametrize("group", [1, 2])
def test_sampled_hessian_is_exactly_that_of_the_sampled_rows(small_cap, group):
    model = _conv_model(group=group)
    data, x = _data(model)
    w = _weight(model)
    stats = collect_layer_stats(model, [w], data, batch_size=5, sample_rows=True, seed=3)
    st = stats[w.key]
    ex, _ = extractor_for(w, w.consumers[0])
    cap = row_cap(ex.in_dim)
    k = cap // len(x)
    relu = np.maximum(x, 0)
    full = activation_rows(w, relu)  # [G, N*256, in]
    positions = np.concatenate([sample_positions(256, k, 3, ex.activation, b0, min(5, 12 - b0))
                                for b0 in range(0, 12, 5)])
    rows = (np.arange(12)[:, None] * 256 + positions).reshape(-1)
    xs = full[:, rows]  # [G, N*k, in]
    expect = np.einsum("gri,grj->gij", xs, xs)
    got = st.group_hessians if group > 1 else st.hessian[None]
    np.testing.assert_allclose(got, expect, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(st.in_sums, xs.sum(axis=(0, 1)), rtol=1e-10, atol=1e-9)
    assert st.count == group * 12 * k == xs.shape[0] * xs.shape[1]
    assert stats.record.rows[w.key] == (group * 12 * k, group * 12 * 256)


def test_row_cap_is_respected_and_small_layers_are_read_whole(small_cap, monkeypatch):
    model = _conv_model()
    data, _ = _data(model)
    w = _weight(model)
    ex, _ = extractor_for(w, w.consumers[0])
    st = collect_layer_stats(model, [w], data, sample_rows=True)[w.key]
    assert ex.in_dim == 36 and row_cap(36) == 72
    assert st.count == (72 // 12) * 12 <= row_cap(ex.in_dim)
    # a cap above the rows there are: every row, the same stats as without sampling
    monkeypatch.setattr(calibration, "MIN_ROWS", 10 ** 6)
    whole = collect_layer_stats(model, [w], data, sample_rows=True)
    plain = collect_layer_stats(model, [w], data)
    assert whole[w.key].count == plain[w.key].count == 12 * 256
    np.testing.assert_array_equal(whole[w.key].hessian, plain[w.key].hessian)
    assert calibration.rows_note(whole.record.rows, "x") is None


def test_same_seed_same_masks_other_seed_other_hessian(small_cap):
    model = _conv_model(cin=8, cout=8)
    data, _ = _data(model, cin=8)
    w = _weight(model)
    w2d = w.layout.to_2d(load(model).read(w.tensor)).astype(np.float64)

    def masks(seed, pattern):
        st = collect_layer_stats(model, [w], data, sample_rows=True, seed=seed,
                                 precision="float32")[w.key]
        new, keep = sparsegpt_prune(w2d, st.hessian, pattern, w2d.size // 2)
        return st.hessian, keep

    h1, k1 = masks(0, "unstructured")
    h2, k2 = masks(0, "unstructured")
    assert np.array_equal(h1, h2) and np.array_equal(k1, k2)
    h3, _ = masks(1, "unstructured")
    assert not np.array_equal(h1, h3)
    _, keep24 = masks(5, "2:4")
    groups = keep24.reshape(keep24.shape[0], -1, 4)
    assert np.all(groups.sum(axis=-1) == 2)  # N:M still exact per group of 4


def test_paired_sampling_reads_the_same_rows_of_both_models(small_cap):
    model = _conv_model()
    data, x = _data(model)
    w = _weight(model)
    paired = collect_layer_stats(model, [w], data, sample_rows=True, reference=model)[w.key]
    # the same model as its own reference: the cross moment is the Hessian, row for row
    np.testing.assert_allclose(paired.cross[0], paired.hessian, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(paired.ref_sums[0], paired.in_sums, rtol=1e-12)


def test_float32_shift_keeps_the_centered_hessian_with_a_large_mean():
    model = _conv_model(cin=4)
    data, x = _data(model, mean=300.0)  # Relu is the identity here; mean >> spread
    w = _weight(model)
    exact = collect_layer_stats(model, [w], data)[w.key]
    f32 = collect_layer_stats(model, [w], data, precision="float32",
                              reference=model)[w.key]

    def centered(st, h):
        mu = st.in_sums / st.count
        return h / st.count - np.outer(mu, mu)

    c64, c32 = centered(exact, exact.hessian), centered(f32, f32.hessian)
    # relative to the centered covariance (about 1 per entry on the diagonal), not to 300^2
    assert np.abs(c32 - c64).max() < 1e-4 * np.abs(np.diag(c64)).max()
    np.testing.assert_allclose(f32.in_sums, exact.in_sums, rtol=1e-9)
    cx = f32.cross[0] / f32.count - np.outer(f32.in_sums, f32.ref_sums[0]) / f32.count ** 2
    assert np.abs(cx - c64).max() < 1e-4 * np.abs(np.diag(c64)).max()


# -- sensitivity trials from a cut ------------------------------------------------------------
def test_trials_after_a_cut_equal_whole_model_trials(monkeypatch):
    """Trials that run only the graph after a cut (fed the dense tensors cached there) give the
    errors the whole-model trials give, for every number of cuts."""
    from pathlib import Path

    from onnxprune.calibration import sensitivity

    root = Path(__file__).resolve().parents[2] / "models"
    handle = load(root / "mobilenetv3_block.onnx")  # residual Adds, SE branches, depthwise
    weights, _ = find_weights(handle)
    x = np.random.default_rng(0).standard_normal((6, 3, 64, 64)).astype(np.float32)
    data = CalibrationSet.from_arrays(handle.model, {"input": x})

    def table():
        return sensitivity.layer_sensitivity(handle, weights, data, "unstructured", (0.5, 0.9),
                                             "magnitude", samples=6, batch_size=4)

    cut = {}
    for cuts in (1, 3, 1000):
        monkeypatch.setattr(sensitivity, "TRIAL_CUTS", cuts)
        cut[cuts] = table()
    monkeypatch.setattr(sensitivity._Downstream, "trial", lambda self, w: None)
    whole = table()
    assert list(whole.errors) == [w.key for w in weights]
    for t in cut.values():
        assert list(t.errors) == list(whole.errors)
        for k in whole.errors:
            np.testing.assert_allclose(t.errors[k], whole.errors[k], rtol=1e-4, atol=1e-9)


def test_sequential_record_has_phases_and_rows_within_the_cap(monkeypatch):
    from pathlib import Path

    import onnxprune
    from onnxprune.passes.sequential import SequentialRecord

    monkeypatch.setattr(calibration, "ROWS_PER_COLUMN", 1)
    monkeypatch.setattr(calibration, "MIN_ROWS", 40)
    model = Path(__file__).resolve().parents[2] / "models" / "mobilenetv3_block.onnx"
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    res = onnxprune.prune(model, pattern="2:4", criterion="sparsegpt",
                          calibration={"input": x}, validate=False)
    (rec,) = [r for r in res.state.records if isinstance(r, SequentialRecord)]
    assert set(rec.phase_seconds) == {"statistics", "solve"}
    assert all(v >= 0 for v in rec.phase_seconds.values())
    weights = {w.key: w for w in find_weights(load(model))[0]}
    sampled = 0
    for key, (used, there) in rec.rows.items():
        w = weights[key]
        ex, _ = extractor_for(w, w.consumers[0])
        assert used <= there
        if used < there:
            sampled += 1
            assert used <= row_cap(ex.in_dim) * ex.groups  # the cap holds per Conv group
    assert sampled
    assert any("rows used/there were" in n for n in res.report.notes)
