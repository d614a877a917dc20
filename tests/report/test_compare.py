"""Comparing a candidate's outputs with a reference's: statistics, verdicts, tolerances."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from onnxprune.report.compare import class_axis, compare


def test_compare_identical():
    ref = {"logits": np.arange(12, dtype=np.float32).reshape(3, 4) - 5}
    cmp = compare(ref, {k: v.copy() for k, v in ref.items()})
    s = cmp["logits"]
    assert (s.max_abs, s.rel_error, s.mean_rel, s.cosine, s.top1_agreement) == (0, 0, 0, 1, 1)
    assert cmp.max_abs == 0 and cmp.worst_cosine == 1 and cmp.passed(0.0)


def test_compare_known_difference():
    ref = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    cand = ref + np.array([[0, 0, 0.5], [0, 0, -1]], dtype=np.float32)
    cmp = compare({"y": ref}, {"y": cand})
    s = cmp["y"]
    assert s.max_abs == 1.0
    assert s.ref_scale == 6.0
    assert s.rel_error == pytest.approx(1 / 6)
    assert s.mean_rel == pytest.approx((1.5 / 6) / (21 / 6))
    a, b = ref.ravel().astype(np.float64), cand.ravel().astype(np.float64)
    assert s.cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert s.top1_agreement == 0.5  # row 1: argmax 2 -> 1
    assert cmp.passed(0.17) and not cmp.passed(0.16)
    assert cmp.failures(0.1) == ["output 'y': relative max error 0.167 (max abs 1 on a scale "
                                 "of 6) exceeds 0.1"]
    assert cmp.passed({"y": 0.2}) and not cmp.passed({"*": 0.1}) and cmp.passed({"z": 0.0})


def test_compare_shape_mismatch_missing_and_extra():
    ref = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
    cand = {"a": np.ones((2, 2), np.float32), "c": np.ones(1, np.float32)}
    cmp = compare(ref, cand)
    assert "differs from the reference's 2x3" in cmp["a"].reason
    assert cmp["a"].candidate_shape == (2, 2)
    assert "missing" in cmp["b"].reason
    assert cmp.extra_outputs == ["c"]
    assert not cmp.passed(1e9)
    assert math.isinf(cmp.max_abs) and math.isnan(cmp.worst_cosine)
    d = cmp.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["outputs"][0]["max_abs"] is None and d["outputs"][0]["reason"]


def test_compare_nonfinite():
    ref = np.array([1.0, np.inf, 3.0], np.float32)
    same = compare({"y": ref}, {"y": ref.copy()})
    assert same.passed(0.0) and same["y"].max_abs == 0
    bad = compare({"y": ref}, {"y": np.array([np.nan, np.inf, 3.0], np.float32)})
    assert bad["y"].reason == "1 value(s) are inf/nan in one model but not the other"


def test_compare_zero_reference():
    zeros = np.zeros((2, 2), np.float32)
    assert compare({"y": zeros}, {"y": zeros})["y"].cosine == 1.0
    s = compare({"y": zeros}, {"y": zeros + 1})["y"]
    assert s.cosine == 0.0 and math.isinf(s.rel_error) and s.max_abs == 1.0


@pytest.mark.parametrize("shape, dtype, axis", [
    ((4, 10), np.float32, 1), ((1, 7, 100), np.float16, 2), ((4, 1), np.float32, None),
    ((1, 3, 8, 8), np.float32, None), ((4, 10), np.int64, None), ((10,), np.float32, None),
])
def test_class_axis_rule(shape, dtype, axis):
    assert class_axis(shape, np.dtype(dtype)) == axis
    out = compare({"y": np.ones(shape, dtype)}, {"y": np.ones(shape, dtype)})["y"]
    assert (out.top1_agreement is None) == (axis is None)


def test_a_background_class_is_not_counted_as_agreement():
    """A CTC recognizer's blanks (or a segmentation's background): at 80 % of the positions the
    reference's top class is 0; a candidate that outputs only blanks agrees at 80 % of all
    positions but at none of the others — its agreement is 0 and the verdict says why."""
    rng = np.random.default_rng(0)
    b, t, c = 4, 25, 6
    top = np.where(rng.random((b, t)) < 0.8, 0, rng.integers(1, c, (b, t)))
    ref = rng.standard_normal((b, t, c)).astype(np.float32)
    ref[np.arange(b)[:, None], np.arange(t), top] += 10
    blanks = np.zeros_like(ref)
    blanks[..., 0] = 1
    s = compare({"y": ref}, {"y": blanks}, samples=b)["y"]
    overall = float((top == 0).mean())
    assert s.background[0] == 0 and s.background[1] == pytest.approx(overall)
    assert s.background[3] == pytest.approx(overall) and s.top1_agreement == 0.0
    assert s.verdict == "broken" and "not class 0" in s.verdict_reason
    # a candidate right on the characters and wrong on half the blanks
    cand = ref.copy()
    flip = (top == 0) & (rng.random((b, t)) < 0.5)
    cand[flip, 0] -= 20
    s = compare({"y": ref}, {"y": cand}, samples=b)["y"]
    kept = int((top != 0).sum())
    assert s.top1_agreement == pytest.approx(kept / (kept + int(flip.sum())))
    # one position per sample (a classifier): agreement over the samples, skew or not
    cls = compare({"y": ref[:, 0]}, {"y": blanks[:, 0]}, samples=b)["y"]
    assert cls.background is None
    assert cls.top1_agreement == pytest.approx(float((top[:, 0] == 0).mean()))
