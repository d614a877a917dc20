"""SparseGPT sweep, least-squares refit and bias correction on W[out, in]."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.errors import OptionError, PatternError
from onnxprune.masking.patterns import parse_pattern
from onnxprune.calibration.reconstruct import (asymmetric_bias, asymmetric_target, centered_cross,
                                               sparsegpt_prune)


def _layer(rows=64, cols=160, n=1200, seed=0, mean=0.0):
    """A random layer with strongly correlated inputs (where OBS updates pay off)."""
    r = np.random.default_rng(seed)
    mix = r.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    x = r.standard_normal((n, cols)) @ mix + mean
    w = r.standard_normal((rows, cols)).astype(np.float32)
    return x, w


def _rel_err(x, w, w_new, cols=None):
    ref = x @ w.astype(np.float64).T
    xs = x if cols is None else x[:, cols]
    return np.linalg.norm(ref - xs @ w_new.astype(np.float64).T) / np.linalg.norm(ref)


@pytest.mark.parametrize("spec", ["unstructured", "2:4", "4x1", "1:4", "2x2"])
def test_sparsegpt_beats_masking_alone_and_keeps_the_pattern(spec):
    x, w = _layer()
    h = x.T @ x
    zeros = w.size // 2 if spec != "1:4" else None
    new, keep = sparsegpt_prune(w, h, spec, zeros, blocksize=64)
    assert new.dtype == w.dtype and keep.shape == w.shape
    assert np.all(new[~keep] == 0)  # pruned entries exactly zero after all the updates
    assert _rel_err(x, w, new) < 0.95 * _rel_err(x, w, w * keep)
    pattern = parse_pattern(spec)
    if spec in ("2:4", "1:4"):
        n = pattern.n
        assert (keep.reshape(w.shape[0], -1, 4).sum(-1) == n).all()
        assert ((new != 0).reshape(w.shape[0], -1, 4).sum(-1) <= n).all()
    elif spec in ("4x1", "2x2"):
        blocks = keep.reshape(w.shape[0] // pattern.rows, pattern.rows,
                              w.shape[1] // pattern.cols, pattern.cols)
        uniform = blocks.all(axis=(1, 3)) | (~blocks).all(axis=(1, 3))
        assert uniform.all()
        assert (~keep).sum() == zeros  # a multiple of the block size: exact
    else:
        assert (~keep).sum() == zeros


def test_unstructured_zero_count_is_exact_for_any_target():
    x, w = _layer(rows=24, cols=100, n=400)
    h = x.T @ x
    for zeros in (0, 1, 777, 1199, 2399, 2400):
        new, keep = sparsegpt_prune(w, h, "unstructured", zeros, blocksize=32)
        assert (~keep).sum() == zeros and np.all(new[~keep] == 0)


def test_ragged_blocks_and_nm_tail():
    x, w = _layer(rows=10, cols=37, n=300)
    h = x.T @ x
    new, keep = sparsegpt_prune(w, h, "4x2", 180, blocksize=8)
    assert abs((~keep).sum() - 180) < 8  # whole units only: within one unit of the target
    assert np.all(new[~keep] == 0)
    new, keep = sparsegpt_prune(w, h, "2:4", None, blocksize=8)
    assert keep[:, 36:].sum(axis=1).max() <= 1  # the 1-column tail keeps min(2, 1)
    assert (keep[:, :36].reshape(10, 9, 4).sum(-1) == 2).all()


def test_fp16_and_float64_dtypes_are_kept():
    x, w = _layer(rows=16, cols=32, n=200)
    for dtype in (np.float16, np.float64):
        new, keep = sparsegpt_prune(w.astype(dtype), x.T @ x, "2:4", None)
        assert new.dtype == dtype and np.all(new[~keep] == 0)


def test_dead_inputs_go_first_and_move_nothing():
    x, w = _layer(rows=16, cols=64, n=400)
    dead = np.arange(0, 64, 8)
    x[:, dead] = 0.0
    h = x.T @ x
    new, keep = sparsegpt_prune(w, h, "unstructured", dead.size * 16, blocksize=16)
    assert np.isfinite(new).all()
    assert not keep[:, dead].any() and keep.sum() == w.size - dead.size * 16
    np.testing.assert_allclose(_rel_err(x, w, new), 0.0, atol=1e-6)  # free zeros
    # with more zeros needed, dead inputs are still taken before any live weight
    new2, keep2 = sparsegpt_prune(w, h, "unstructured", w.size // 2)
    assert not keep2[:, dead].any()
    # all inputs dead: falls back to a valid mask without NaN
    new3, keep3 = sparsegpt_prune(w, np.zeros((64, 64)), "unstructured", 100)
    assert (~keep3).sum() == 100 and np.isfinite(new3).all()


def test_per_group_hessians_act_on_their_rows():
    # Two row groups with different inputs: with N:M (a per-row choice), one [2, in, in] call
    # equals two separate calls.
    x1, w1 = _layer(rows=8, cols=48, n=300, seed=1)
    x2, w2 = _layer(rows=8, cols=48, n=300, seed=2)
    h = np.stack([x1.T @ x1, x2.T @ x2])
    joint, keep = sparsegpt_prune(np.concatenate([w1, w2]), h, "2:4", None)
    a, ka = sparsegpt_prune(w1, h[0], "2:4", None)
    b, kb = sparsegpt_prune(w2, h[1], "2:4", None)
    np.testing.assert_allclose(joint, np.concatenate([a, b]), rtol=1e-5, atol=1e-6)
    assert (keep == np.concatenate([ka, kb])).all()


def test_sparsegpt_rejects_what_it_cannot_do():
    x, w = _layer(rows=8, cols=16, n=50)
    with pytest.raises(PatternError, match="channel"):
        sparsegpt_prune(w, x.T @ x, "channel", 16)
    with pytest.raises(OptionError, match="zeros"):
        sparsegpt_prune(w, x.T @ x, "unstructured", None)
    with pytest.raises(ValueError, match="input columns"):
        sparsegpt_prune(w, np.eye(15), "2:4", None)


# -- refit of a consumer whose input channels were removed (asymmetric_target with kept) --------
# With X_ref = X (cross = H) the asymmetric target on the kept columns is the least-squares
# refit the channel-pruning refit (calibration.sequential.refit_toward_dense) writes.
def test_refit_is_exact_when_nothing_is_removed_and_beats_slicing():
    x, w = _layer(rows=32, cols=48, n=500)
    h = x.T @ x
    full = asymmetric_target(w, h, h, 1e-6, kept=np.arange(48))
    np.testing.assert_allclose(full, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x @ full.T, x @ w.T.astype(np.float64), rtol=1e-9, atol=1e-9)
    kept = np.sort(np.random.default_rng(5).choice(48, 30, replace=False))
    new = asymmetric_target(w, h, h, 1e-6, kept=kept)
    assert new.shape == (32, 30)
    assert _rel_err(x, w, new, kept) < 0.8 * _rel_err(x, w, w[:, kept], kept)
    # the normal equations hold: X_k^T (X W^T - X_k W'^T) = 0 up to the tiny damping
    resid = x @ w.astype(np.float64).T - x[:, kept] @ new.T
    grad = x[:, kept].T @ resid
    assert np.abs(grad).max() < 1e-3 * np.abs(x[:, kept].T @ (x @ w.T)).max()


def test_refit_leaves_weights_of_silent_inputs_alone():
    x, w = _layer(rows=8, cols=20, n=200)
    x[:, 3] = 0.0
    h = x.T @ x
    new = asymmetric_target(w, h, h, 1e-6, kept=np.arange(20))
    np.testing.assert_allclose(new[:, 3], w[:, 3], rtol=1e-12, atol=0)


def test_refit_with_bias_shift_from_centered_moments():
    x, w = _layer(rows=16, cols=40, n=800, mean=1.5)
    kept = np.arange(0, 40, 2)
    h, sums, n = x.T @ x, x.sum(0), len(x)
    mean = x.mean(axis=0)
    plain = asymmetric_target(w, h, h, 1e-6, kept=kept)
    centered = asymmetric_target(w, centered_cross(h, sums, sums, n),
                                 centered_cross(h, sums, sums, n), 1e-6, kept=kept)
    full = np.zeros(w.shape)  # the refit written back in place: removed columns zero
    full[:, kept] = centered
    shift = asymmetric_bias(w, full, mean, mean)
    ref = x @ w.T.astype(np.float64)
    err_plain = np.linalg.norm(ref - x[:, kept] @ plain.T)
    err_bias = np.linalg.norm(ref - (x[:, kept] @ centered.T + shift))
    assert err_bias < err_plain
    # the shifted output keeps the dense mean exactly
    np.testing.assert_allclose((x[:, kept] @ centered.T + shift).mean(0), ref.mean(0), atol=1e-8)


def test_sequential_sparsegpt_keeps_a_trained_model_accurate():
    # The trained digits CNN (models/README.md), pruned layer after layer with statistics taken
    # from the already-pruned upstream: SparseGPT must hold accuracy where masking does not.
    from pathlib import Path

    import onnxruntime as ort

    from onnxprune.calibration.statistics import collect_layer_stats
    from onnxprune.inputs.dataset import load_calibration
    from onnxprune.model.io import load
    from onnxprune.ops.weights import find_weights

    models = Path(__file__).resolve().parents[2] / "models"
    if not (models / "digits_cnn.onnx").exists():
        pytest.skip("models/digits_cnn.onnx not present")
    test = np.load(models / "digits_test.npz")

    def accuracy(handle):
        sess = ort.InferenceSession(handle.model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        return (sess.run(None, {"input": test["input"]})[0].argmax(1) == test["labels"]).mean()

    results = {}
    for method in ("mask", "sparsegpt"):
        handle = load(models / "digits_cnn.onnx")
        weights, _ = find_weights(handle)
        data = load_calibration(models / "digits_calib.npz", handle.model, samples=128)
        for w in weights[1:]:  # the first conv (9 inputs per filter) stays dense
            w2d = w.layout.to_2d(handle.read(w.tensor))
            zeros = int(0.7 * w2d.size)
            stats = collect_layer_stats(handle, [w], data, batch_size=64)[w.key]
            new, keep = sparsegpt_prune(w2d, stats.sparsegpt_hessian, "unstructured", zeros)
            assert (~keep).sum() == zeros
            handle.write(w.tensor, w.layout.from_2d(new if method == "sparsegpt" else w2d * keep))
        results[method] = accuracy(handle)
    assert results["sparsegpt"] > 0.95  # dense: 0.9937
    assert results["sparsegpt"] > results["mask"] + 0.1


def test_refit_needs_a_row_per_kept_input(tmp_path):
    from onnxprune.calibration.sequential import enough_rows

    assert enough_rows(100, 100) and not enough_rows(100, 99)
    # digits' Gemm 64->64 after 25 % channel removal refits from 4 samples' rows: 4 rows for 48
    # inputs: left as masked, said in a note; with 64 samples it is refit.
    import onnxprune

    from pathlib import Path

    models = Path(__file__).resolve().parents[2] / "models"
    model, calib = str(models / "digits_cnn.onnx"), str(models / "digits_calib.npz")
    few = onnxprune.prune(model, pattern="channel", sparsity=0.25, refit=True,
                          calibration=calib, calibration_samples=8, validation_samples=4)
    note = [n for n in few.report.notes if "not refit: fewer calibration rows" in n]
    assert note and "Give more --calibration samples" in note[0]
    many = onnxprune.prune(model, pattern="channel", sparsity=0.25, refit=True,
                           calibration=calib, calibration_samples=256)
    assert not [n for n in many.report.notes if "fewer calibration rows" in n]
    # the refit says what it fits, and what to check
    assert any("fits that data's distribution" in n and "--inputs" in n
               for n in many.report.notes)
