"""Sensitivity trials on large inputs: fewer samples, drawn seeded, and exactly the errors a
measurement on those samples gives (equal to the full measurement when they are all)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxprune.calibration import sensitivity
from onnxprune.calibration.sensitivity import (MIN_TRIAL_SAMPLES, layer_sensitivity,
                                               trial_count, trial_subset)
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights

MODEL = Path(__file__).resolve().parents[2] / "models" / "mobilenetv3_block.onnx"


def _setup(n=10):
    handle = load(MODEL)
    weights, _ = find_weights(handle)
    x = np.random.default_rng(0).standard_normal((n, 3, 64, 64)).astype(np.float32)
    return handle, weights[:6], CalibrationSet.from_arrays(handle.model, {"input": x}), x


def test_trial_count_rule():
    assert trial_count(16, 3 * 64 * 64) == 16  # small inputs: every requested sample
    assert trial_count(16, 3 * 224 * 224) == 16  # exactly the budget
    assert trial_count(16, 3 * 416 * 416) == MIN_TRIAL_SAMPLES == 4  # 4.6 fit: 4
    assert trial_count(16, 3 * 1024 * 1024) == MIN_TRIAL_SAMPLES  # never fewer
    assert trial_count(3, 3 * 1024 * 1024) == 3  # never more than there are
    assert trial_count(16, 1000, trial_elements=8000) == 8
    assert trial_count(16, 10 ** 9, trial_elements=None) == 16


def test_trial_subset_is_seeded_and_in_data_order():
    _, _, data, x = _setup(10)
    budget = 3 * 64 * 64 * 5  # 5 samples' worth
    a = trial_subset(data, 8, seed=3, trial_elements=budget)
    b = trial_subset(data, 8, seed=3, trial_elements=budget)
    c = trial_subset(data, 8, seed=4, trial_elements=budget)
    got = [np.concatenate([f["input"] for f in s.batches(4)]) for s in (a, b, c)]
    assert got[0].shape == (5, 3, 64, 64) and np.array_equal(got[0], got[1])
    assert not np.array_equal(got[0], got[2])
    rows = [int(np.flatnonzero((x == s).reshape(10, -1).all(axis=1))[0]) for s in got[0]]
    assert rows == sorted(rows) and len(set(rows)) == 5  # distinct samples, data order
    # the rows are drawn from all of the data, seeded: numpy's generator picks them
    want = np.sort(np.random.default_rng(3).choice(10, 5, replace=False)).tolist()
    assert rows == want
    # enough room: the first `samples`, as before
    whole = trial_subset(data, 8, seed=3, trial_elements=None)
    assert np.array_equal(np.concatenate([f["input"] for f in whole.batches(4)]), x[:8])


def test_sampled_trials_equal_the_measurement_on_those_samples(monkeypatch):
    handle, weights, data, x = _setup(10)
    budget = 3 * 64 * 64 * 5
    sampled = layer_sensitivity(handle, weights, data, "unstructured", (0.5, 0.9), samples=8,
                                batch_size=4, seed=2, trial_elements=budget)
    assert sampled.samples == 5
    picked = np.sort(np.random.default_rng(2).choice(10, 5, replace=False))
    direct = layer_sensitivity(handle, weights, CalibrationSet.from_arrays(
        handle.model, {"input": x[picked]}), "unstructured", (0.5, 0.9), samples=5,
        batch_size=4, seed=2, trial_elements=None)
    assert list(sampled.errors) == list(direct.errors)
    for k in direct.errors:
        np.testing.assert_array_equal(sampled.errors[k], direct.errors[k])


@pytest.mark.parametrize("minimum", [8, 100])
def test_a_sample_that_covers_everything_gives_the_full_errors(monkeypatch, minimum):
    """With the floor at (or above) the samples there are, the sampled trials use every sample
    and their errors are exactly the full measurement's."""
    handle, weights, data, _ = _setup(8)
    full = layer_sensitivity(handle, weights, data, "unstructured", (0.5, 0.9), samples=8,
                             batch_size=4, trial_elements=None)
    monkeypatch.setattr(sensitivity, "MIN_TRIAL_SAMPLES", minimum)
    covered = layer_sensitivity(handle, weights, data, "unstructured", (0.5, 0.9), samples=8,
                                batch_size=4, trial_elements=1)
    assert covered.samples == full.samples == 8
    for k in full.errors:
        np.testing.assert_array_equal(covered.errors[k], full.errors[k])
    # and a pick of every index, in order, is the data itself
    every = data.pick(range(8))
    for a, b in zip(every.batches(4), data.batches(4)):
        np.testing.assert_array_equal(a["input"], b["input"])


def test_trial_hessians_come_from_the_first_samples_up_to_the_budget(monkeypatch):
    from onnxprune.calibration.sensitivity import statistics_subset

    _, _, data, x = _setup(10)
    assert statistics_subset(data) is data  # small inputs: every sample
    assert statistics_subset(data, elements=None) is data
    assert statistics_subset(data, elements=1) is data  # 64x64 samples are not large
    monkeypatch.setattr(sensitivity, "LARGE_SAMPLE", 100)
    monkeypatch.setattr(sensitivity, "MIN_STATS_SAMPLES", 3)
    part = statistics_subset(data, elements=3 * 64 * 64 * 6)  # 6 samples' worth
    np.testing.assert_array_equal(np.concatenate([f["input"] for f in part.batches(4)]), x[:6])
    assert len(statistics_subset(data, elements=1)) == 3  # never below the floor
