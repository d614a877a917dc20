"""Criteria: registry, exact score values, dtypes, determinism and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.masking.criteria import ScoreContext, criterion_names, get_criterion
from onnxprune.errors import OptionError


try:  # bfloat16 as onnx reads it (ml_dtypes ships with onnx >= 1.16)
    import ml_dtypes
    BFLOAT16 = [(ml_dtypes.bfloat16, np.float32)]
except ImportError:  # pragma: no cover
    BFLOAT16 = []


def _w(shape=(6, 5), dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_registry_names_and_attributes():
    assert criterion_names() == ["l2", "magnitude", "random", "scores", "sparsegpt", "wanda"]
    reduces = {n: get_criterion(n).reduce for n in criterion_names()}
    assert reduces == {"l2": "l2", "magnitude": "l1", "random": "l1", "scores": "l1",
                       "sparsegpt": "l1", "wanda": "l1"}
    assert [n for n in criterion_names() if get_criterion(n).needs_activations] == [
        "sparsegpt", "wanda"]
    assert [n for n in criterion_names() if get_criterion(n).reconstructs] == ["sparsegpt"]


def test_unknown_criterion_lists_the_valid_ones():
    with pytest.raises(OptionError, match="unknown criterion 'sparsegtp'.*magnitude.*wanda"):
        get_criterion("sparsegtp")


@pytest.mark.parametrize("dtype, score_dtype", [
    (np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64), *BFLOAT16])
@pytest.mark.parametrize("name", ["magnitude", "l2"])
def test_magnitude_is_abs_in_float32_or_float64(name, dtype, score_dtype):
    w = _w(dtype=dtype)
    w[0, 0] = -0.0
    s = get_criterion(name).scores(w, ScoreContext("w"))
    assert s.dtype == score_dtype and s.shape == w.shape and s.flags.c_contiguous
    assert np.array_equal(s, np.abs(w.astype(score_dtype)))
    assert not np.signbit(s).any()  # +0.0 only: scope buckets by bit pattern


def test_magnitude_of_a_transposed_view_is_contiguous():
    w = _w((5, 7)).T
    s = get_criterion("magnitude").scores(w, ScoreContext("w"))
    assert s.flags.c_contiguous and np.array_equal(s, np.abs(w))


def test_random_is_deterministic_per_seed_and_key():
    crit, w = get_criterion("random"), _w((20, 30))
    a = crit.scores(w, ScoreContext("conv1.weight", seed=3))
    assert np.array_equal(a, crit.scores(w.copy(), ScoreContext("conv1.weight", seed=3)))
    assert not np.array_equal(a, crit.scores(w, ScoreContext("conv2.weight", seed=3)))
    assert not np.array_equal(a, crit.scores(w, ScoreContext("conv1.weight", seed=4)))
    assert a.dtype == np.float32 and (a >= 0).all() and (a < 1).all()
    assert crit.scores(w.astype(np.float64), ScoreContext("k")).dtype == np.float64


def test_random_rejects_a_negative_seed():
    with pytest.raises(OptionError, match="seed"):
        get_criterion("random").scores(_w(), ScoreContext("w", seed=-1))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_wanda_is_magnitude_times_input_norms(dtype):
    w = _w((4, 6), dtype=dtype)
    norms = np.array([0.0, 1.0, 2.5, 0.1, 10.0, 3.0])
    s = get_criterion("wanda").scores(w, ScoreContext("fc", in_norms=norms))
    score_dtype = np.float64 if dtype == np.float64 else np.float32
    want = np.abs(w.astype(score_dtype)) * norms.astype(score_dtype)[None, :]
    assert s.dtype == score_dtype and np.array_equal(s, want)


def test_wanda_without_or_with_wrong_norms_names_the_weight():
    crit = get_criterion("wanda")
    with pytest.raises(OptionError, match="'fc.w'.*calibration"):
        crit.scores(_w(), ScoreContext("fc.w"))
    with pytest.raises(OptionError, match="'fc.w'.*4 entries.*5 input columns"):
        crit.scores(_w(), ScoreContext("fc.w", in_norms=np.ones(4)))
    with pytest.raises(OptionError, match="'fc.w'.*NaN"):
        crit.scores(_w(), ScoreContext("fc.w", in_norms=np.array([1, 1, np.nan, 1, 1])))


def test_user_scores_are_returned_validated_and_not_aliased():
    user = np.arange(30, dtype=np.float64).reshape(6, 5)
    user[0, 0] = -0.0
    s = get_criterion("scores").scores(_w(), ScoreContext("w", user_scores=user))
    assert np.array_equal(s, user) and s is not user and not np.signbit(s).any()
    assert s.dtype == np.float64
    s_int = get_criterion("scores").scores(_w(), ScoreContext("w", user_scores=user.astype(int)))
    assert s_int.dtype == np.float32


@pytest.mark.parametrize("user, match", [
    (np.ones((5, 6)), r"'blk.3.w'.*shape \(5, 6\).*\(6, 5\)"),
    (np.full((6, 5), np.inf), "'blk.3.w'.*NaN or infinity"),
    (-np.ones((6, 5)), "'blk.3.w'.*non-negative"),
    (np.full((6, 5), "x"), "'blk.3.w'.*numbers"),
    (None, "'blk.3.w'.*none were given"),
])
def test_bad_user_scores_name_the_weight(user, match):
    with pytest.raises(OptionError, match=match):
        get_criterion("scores").scores(_w(), ScoreContext("blk.3.w", user_scores=user))
