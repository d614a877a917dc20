"""``--allocate auto`` never makes things worse: sensitivity allocation is kept only when it
beats uniform sparsity on the held-out validation samples; otherwise uniform, said so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxprune.api as api
from onnxprune import prune

MODELS = Path(__file__).resolve().parents[1] / "models"
DIGITS, CALIB = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz"
SECTION = "--allocate auto: uniform vs sensitivity on validation"


def _weights(model):
    from onnx import numpy_helper
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_auto_keeps_the_allocation_that_wins_on_held_out_samples():
    auto = prune(DIGITS, sparsity=0.8, calibration=str(CALIB))
    rows = auto.report.sections[SECTION]
    by = {r["allocation"]: r for r in rows}
    key = "worst top-1 agreement"
    winner = "sensitivity" if by["sensitivity"][key] > by["uniform"][key] else "uniform"
    assert by[winner]["chosen"] and not by[{"uniform": "sensitivity",
                                             "sensitivity": "uniform"}[winner]]["chosen"]
    assert auto.report.options["allocate"] == winner
    # the kept model is exactly what the explicit allocation gives, and so are its figures
    explicit = prune(DIGITS, sparsity=0.8, calibration=str(CALIB), allocate=winner)
    a, b = _weights(auto.model), _weights(explicit.model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert auto.report.comparison.worst_agreement == by[winner][key]
    assert any(n.startswith("--allocate auto") and "two prunings" in n
               for n in auto.report.notes)


def test_auto_falls_back_to_uniform_when_sensitivity_does_not_beat_it(monkeypatch):
    real = api._execute

    def execute(model, opts, *args):
        run = real(model, opts, *args)
        run.state.comparison.outputs[0].top1_agreement = (
            0.5 if opts.allocate == "sensitivity" else 0.9)
        return run

    monkeypatch.setattr(api, "_execute", execute)
    res = prune(DIGITS, sparsity=0.5, calibration=str(CALIB))
    assert res.report.options["allocate"] == "uniform"
    assert any("fell back to uniform" in n and "50.0% vs 90.0%" in n for n in res.report.notes)


def test_auto_without_validation_keeps_uniform():
    res = prune(DIGITS, sparsity=0.5, calibration=str(CALIB), validate=False)
    assert res.report.options["allocate"] == "uniform"
    assert any("kept uniform sparsity" in n for n in res.report.notes)


@pytest.mark.parametrize("allocate", ["uniform", "sensitivity"])
def test_an_explicit_allocation_prunes_once(allocate):
    res = prune(DIGITS, sparsity=0.5, calibration=str(CALIB), allocate=allocate)
    assert SECTION not in res.report.sections and res.report.options["allocate"] == allocate
