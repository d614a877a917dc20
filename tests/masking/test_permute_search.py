"""The N:M channel-permutation search: exact kept saliency, never below the identity, strictly
above it where it must be, optimal on small cases (checked by enumeration), and bounded."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxprune.masking.permute import kept_nm, search_permutation


def partitions(cols):
    """Every split of ``cols`` into groups of 4 (unordered), as column orders."""
    if not cols:
        yield []
        return
    first, rest = cols[0], cols[1:]
    for mates in itertools.combinations(rest, 3):
        left = [c for c in rest if c not in mates]
        for tail in partitions(left):
            yield [first, *mates] + tail


def optimum(x, n=2, m=4):
    return max(kept_nm(x[:, p], n, m) for p in partitions(list(range(x.shape[1]))))


def test_kept_nm_exact():
    x = np.array([[1., 5., 3., 2., 0., 4., 4., 1.]])
    assert kept_nm(x, 2, 4) == 5 + 3 + 4 + 4
    assert kept_nm(x, 1, 4) == 5 + 4
    with pytest.raises(ValueError):
        kept_nm(np.ones((2, 6)), 2, 4)


def test_must_improve_case():
    """Four strong channels in one group: the identity keeps half of them, spreading them two
    per group keeps all of them (the optimum)."""
    x = np.array([[9., 9., 9., 9., 1., 1., 1., 1.],
                  [9., 9., 9., 9., 1., 1., 1., 1.]])
    res = search_permutation(x, 2, 4)
    assert res.kept_before == kept_nm(x, 2, 4) == 4 * 9 + 4 * 1
    assert res.kept_after == 72.0 > res.kept_before
    assert sorted(res.perm.tolist()) == list(range(8))
    assert res.kept_after == kept_nm(x[:, res.perm], 2, 4)
    assert sorted(res.perm[:4] < 4) == [False, False, True, True]  # two strong per group


@pytest.mark.parametrize("seed", range(6))
def test_optimal_on_small_cases(seed):
    x = np.abs(np.random.default_rng(seed).standard_normal((5, 12)))
    res = search_permutation(x, 2, 4, seed=seed)
    assert res.kept_after == pytest.approx(optimum(x), rel=1e-12)
    assert res.kept_after > res.kept_before


@pytest.mark.parametrize("seed", range(4))
def test_random_matrix_strictly_higher_and_exact(seed):
    x = np.abs(np.random.default_rng(seed).standard_normal((64, 64)))
    res = search_permutation(x, 2, 4, seed=seed)
    assert sorted(res.perm.tolist()) == list(range(64))
    assert res.kept_before == pytest.approx(kept_nm(x, 2, 4))
    assert res.kept_after == pytest.approx(kept_nm(x[:, res.perm], 2, 4))
    assert res.kept_after > res.kept_before * 1.01  # a real gain on random weights
    assert res.total == pytest.approx(x.sum())
    # the gain stays below unstructured 50% (which keeps the top half of each row)
    top_half = np.sort(x, axis=1)[:, 32:].sum()
    assert res.kept_after < top_half


def test_never_lowers_and_keeps_identity_when_nothing_helps():
    # equal columns: every order keeps the same, so the identity is kept
    x = np.tile(np.array([[3., 1., 2., 5.]]), (4, 2))
    x = np.repeat(x[:, :1], 8, axis=1)
    res = search_permutation(x, 2, 4)
    assert res.identity and res.kept_after == res.kept_before
    # an already optimal order stays (no strictly better one exists)
    y = np.array([[9., 9., 1., 1., 9., 9., 1., 1.]])
    res = search_permutation(y, 2, 4)
    assert res.identity and res.kept_after == res.kept_before == 36.0
    for seed in range(10):
        z = np.abs(np.random.default_rng(seed).standard_normal((3, 16))) ** 3
        r = search_permutation(z, 2, 4, max_swaps=1, max_escapes=0, seed=seed)
        assert r.kept_after >= r.kept_before
        assert r.kept_after == pytest.approx(kept_nm(z[:, r.perm], 2, 4))


def test_caps_bound_the_search():
    x = np.abs(np.random.default_rng(1).standard_normal((32, 64)))
    capped = search_permutation(x, 2, 4, max_swaps=3, max_escapes=0)
    assert capped.swaps <= 3 and capped.escapes == 0
    assert capped.kept_after >= capped.kept_before
    full = search_permutation(x, 2, 4)
    assert full.kept_after >= capped.kept_after
    assert full.stopped in ("converged", "time cap")
    # the same inputs and seed give the same order (the caps bind, not the clock)
    again = search_permutation(x, 2, 4)
    if full.stopped == again.stopped == "converged":
        np.testing.assert_array_equal(full.perm, again.perm)


def test_large_matrices_search_on_sampled_rows_but_decide_exactly():
    x = np.abs(np.random.default_rng(2).standard_normal((400, 32)))
    res = search_permutation(x, 2, 4, max_work=32 * 32 * 50)
    assert res.sampled_rows == 50
    assert res.kept_after == pytest.approx(kept_nm(x[:, res.perm], 2, 4))
    assert res.kept_after >= res.kept_before


def test_other_n_m_and_bad_shapes():
    x = np.abs(np.random.default_rng(3).standard_normal((16, 32)))
    for n, m in ((1, 4), (4, 8), (1, 2)):
        res = search_permutation(x, n, m)
        assert res.kept_after >= res.kept_before
        assert res.kept_after == pytest.approx(kept_nm(x[:, res.perm], n, m))
    with pytest.raises(ValueError):
        search_permutation(np.ones((2, 6)), 2, 4)
    with pytest.raises(ValueError):
        search_permutation(np.ones((2, 8)), 4, 4)
    one_group = search_permutation(np.ones((2, 4)), 2, 4)
    assert one_group.identity


def test_too_many_channels_keeps_the_order(monkeypatch):
    import onnxprune.masking.permute as P

    monkeypatch.setattr(P, "MAX_CHANNELS", 8)
    x = np.array([[9., 9., 9., 9., 1., 1., 1., 1., 0., 0., 0., 0.]])
    res = P.search_permutation(x, 2, 4)
    assert res.identity and res.stopped == "too large" and res.kept_after == res.kept_before
