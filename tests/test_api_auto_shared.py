"""``--allocate auto`` loads the calibration data (and collects what its Calibrate pass
collects) once, for both prunings, and each pruning is exactly what it is alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import onnxprune.api as api
import onnxprune.passes.calibrated as calibrated
from onnxprune import prune
from onnxprune.passes.calibrated import CalibrateRecord

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, CALIB = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz"


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _same(a, b):
    a, b = _weights(a), _weights(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("criterion", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("kept", ["uniform", "sensitivity"])
def test_shared_calibration_gives_the_weights_of_the_run_alone(monkeypatch, criterion, kept):
    loads = []
    real_load = calibrated.load_calibration

    def load(*args, **kwargs):
        loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(calibrated, "load_calibration", load)
    real_quality = api._quality
    runs = []

    def quality(run):  # force the winner; remember both runs
        runs.append(run)
        value, measure = real_quality(run)
        return (1.0 if run.opts.allocate == kept else 0.0), measure

    monkeypatch.setattr(api, "_quality", quality)
    auto = prune(DIGITS, sparsity=0.6, criterion=criterion, calibration=str(CALIB))
    assert auto.report.options["allocate"] == kept
    assert len(loads) == 1  # loaded once for both prunings
    first, second = runs[1].state, runs[0].state  # _quality(uniform) is asked first
    assert second.calibration is first.calibration and second.validation is first.validation
    shared = [r for r in runs[0].state.records if isinstance(r, CalibrateRecord)]
    assert any("loaded once and shared" in n for n in shared[0].notes)
    monkeypatch.setattr(api, "_quality", real_quality)
    for allocation, run in (("uniform", runs[0]), ("sensitivity", runs[1])):
        alone = prune(DIGITS, sparsity=0.6, criterion=criterion, calibration=str(CALIB),
                      allocate=allocation)
        assert _same(run.state.model, alone.model), allocation
    assert len(loads) == 3
