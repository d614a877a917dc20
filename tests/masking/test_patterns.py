"""Patterns: parsing, unit scoring and the exact shape of the masks each pattern makes."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.errors import PatternError
from onnxprune.masking.patterns import (NM, Blocks, Channel, Unstructured, parse_pattern,
                                pattern_help)


def _weight(shape, seed=0, sparsity=0.0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0
    return w


def _prune(pattern, w, sparsity, reduce="l1"):
    """Keep mask for ``w`` at ``sparsity`` (zeros already there count), magnitude scores."""
    target = int(round(sparsity * w.size))
    nonzero = w != 0
    need = target - (w.size - int(nonzero.sum()))
    return pattern.local_mask(np.abs(w), nonzero, need, reduce), target


# -- parsing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("unstructured", Unstructured()), ("1x1", Unstructured()), (" 4X1 ", Blocks(4, 1)),
    ("1x4", Blocks(1, 4)), ("2x2", Blocks(2, 2)), ("8x1", Blocks(8, 1)), ("2:4", NM(2, 4)),
    ("1:4", NM(1, 4)), ("4:8", NM(4, 8)), ("channel", Channel()),
])
def test_parse_accepts_every_form(spec, expected):
    pattern = parse_pattern(spec)
    assert pattern == expected
    assert parse_pattern(pattern.spec) == pattern  # the canonical text round-trips


@pytest.mark.parametrize("spec", ["", "garbage", "0x4", "4x0", "-1x2", "4:4", "5:4", "0:4",
                                  "-1:4", "2:4:8", "2x", "x4", "4x1x1", "2.5:4", "channels"])
def test_parse_rejects_with_a_helpful_message(spec):
    with pytest.raises(PatternError) as info:
        parse_pattern(spec)
    message = str(info.value)
    assert f"'{spec}'" in message or f"'{spec.strip()}'" in message
    assert pattern_help() in message and "\n" not in message


def test_help_lists_every_kind():
    text = pattern_help()
    for form in ("unstructured", "1x1", "NxM", "4x1", "N:M", "2:4", "channel"):
        assert form in text


def test_implied_sparsity_only_for_nm():
    assert parse_pattern("2:4").implied_sparsity == 0.5
    assert parse_pattern("1:4").implied_sparsity == 0.75
    for spec in ("unstructured", "4x1", "channel"):
        assert parse_pattern(spec).implied_sparsity is None


# -- unstructured -------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.8, 0.98, 1.0])
def test_unstructured_reaches_the_target_exactly(sparsity):
    w = _weight((37, 23))
    keep, target = _prune(Unstructured(), w, sparsity)
    assert int((~keep).sum()) == target
    if 0 < target < w.size:  # the smallest magnitudes went
        assert np.abs(w[~keep]).max() <= np.abs(w[keep]).min()


def test_unstructured_counts_zeros_already_there():
    w = _weight((40, 50), sparsity=0.5)
    keep, target = _prune(Unstructured(), w, 0.8)
    assert int((~keep).sum()) == target == 1600  # 0.8, not 0.5 + 0.8 * 0.5
    assert not keep[w == 0].any()


def test_target_below_existing_sparsity_changes_nothing():
    w = _weight((20, 20), sparsity=0.6)
    for pattern in (Unstructured(), Blocks(4, 1), Channel()):
        keep, _ = _prune(pattern, w, 0.3)
        assert np.array_equal(keep, w != 0)


# -- NxM blocks -------------------------------------------------------------------------------

def _block_view(mask, rows, cols):
    """Each block of a mask with its top-left corner, ragged edge blocks included."""
    r, c = mask.shape
    for i in range(0, r, rows):
        for j in range(0, c, cols):
            yield (i, j), mask[i:i + rows, j:j + cols]


@pytest.mark.parametrize("rows, cols", [(4, 1), (1, 4), (2, 2), (3, 2), (8, 1), (5, 5)])
@pytest.mark.parametrize("shape", [(10, 7), (16, 8), (3, 2), (1, 1)])
@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_blocks_zero_whole_blocks_and_overshoot_less_than_a_block(rows, cols, shape, sparsity):
    w = _weight(shape, seed=rows * 10 + cols, sparsity=0.2)
    keep, target = _prune(Blocks(rows, cols), w, sparsity)
    zeros = int((~keep).sum())
    assert target <= zeros < max(target, w.size - int((w != 0).sum())) + rows * cols
    # Untouched blocks keep exactly their non-zeros; pruned blocks are entirely zero.
    nonzero = w != 0
    for (i, j), block in _block_view(keep, rows, cols):
        orig = nonzero[i:i + rows, j:j + cols]
        assert not block.any() or np.array_equal(block, orig)


def test_blocks_4x1_ties_four_output_rows_per_input_column():
    w = np.ones((8, 3), dtype=np.float32)
    w[4:8, 1] = 0.01  # rows 4..7 of input column 1: one 4x1 block, the weakest
    keep = Blocks(4, 1).local_mask(np.abs(w), w != 0, 4, "l1")
    expected = np.ones_like(keep)
    expected[4:8, 1] = False
    assert np.array_equal(keep, expected)


def test_blocks_ragged_tail_is_scored_on_its_own():
    # 5x3 in 2x2 blocks: the last block row is 1 row tall, the last block column 1 wide.
    scores = np.arange(15, dtype=np.float32).reshape(5, 3)
    units = Blocks(2, 2).unit_scores(scores, "l1")
    want = [0 + 1 + 3 + 4, 2 + 5, 6 + 7 + 9 + 10, 8 + 11, 12 + 13, 14]
    assert units.tolist() == want
    l2 = Blocks(2, 2).unit_scores(scores, "l2")
    assert np.allclose(l2[-2:], [np.hypot(12, 13), 14])
    counts = Blocks(2, 2).unit_counts(scores != 0)
    assert counts.tolist() == [3, 2, 4, 2, 2, 1]
    # The narrow tail block [2, 5] scores 7 < 8 and goes first; [0, 0] was already zero.
    keep = Blocks(2, 2).local_mask(scores, scores != 0, 1, "l1")
    assert np.flatnonzero(~keep).tolist() == [0, 2, 5]


def test_blocks_larger_than_the_weight_are_one_block():
    w = _weight((3, 5))
    keep = Blocks(64, 64).local_mask(np.abs(w), w != 0, 1, "l1")
    assert not keep.any()


# -- N:M ------------------------------------------------------------------------------------

def _groups(mask, m):
    for j in range(0, mask.shape[1], m):
        yield j, mask[:, j:j + m]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 4), (5, 16)])
@pytest.mark.parametrize("cols", [4, 7, 13, 2, 8])
def test_nm_at_most_n_nonzeros_per_group_keeping_the_top_scores(n, m, cols):
    w = _weight((9, cols), seed=cols, sparsity=0.2)
    scores, nonzero = np.abs(w), w != 0
    keep = NM(n, m).local_mask(scores, nonzero, zeros_needed=0, reduce="l1")
    assert not keep[~nonzero].any()
    for j, group in _groups(keep, m):
        width = group.shape[1]
        orig = nonzero[:, j:j + m]
        # At most min(n, width) kept; everything kept if the group already complies.
        assert (group.sum(axis=1) == np.minimum(orig.sum(axis=1), min(n, width))).all()
        s = scores[:, j:j + m]
        for row in range(w.shape[0]):
            kept, dropped = s[row][group[row]], s[row][orig[row] & ~group[row]]
            if kept.size and dropped.size:
                assert kept.min() >= dropped.max()


def test_nm_prunes_existing_zeros_first_and_ties_from_the_left():
    scores = np.array([[5.0, 0.0, 1.0, 1.0, 1.0, 1.0, 9.0, 9.0]], dtype=np.float32)
    nonzero = np.array([[False, True, True, True, True, True, True, True]])
    keep = NM(2, 4).local_mask(scores, nonzero, 0, "l1")
    # Group 1: the already-zero element goes first despite its score 5, then the 0.0.
    # Group 2: the 9s stay and, of the tied 1.0s, the left ones go.
    assert keep.tolist() == [[False, False, True, True, False, False, True, True]]


def _nm_reference(n, m, scores, nonzero):
    """N:M keep mask by plain Python sorting: zeros first, then score, ties from the left."""
    keep = np.zeros(scores.shape, dtype=bool)
    for r in range(scores.shape[0]):
        for j in range(0, scores.shape[1], m):
            cols = range(j, min(j + m, scores.shape[1]))
            order = sorted(cols, key=lambda c: (bool(nonzero[r, c]), scores[r, c], c))
            for c in order[max(len(order) - n, 0):]:
                keep[r, c] = nonzero[r, c]
    return keep


@pytest.mark.parametrize("n, m", [(1, 2), (2, 4), (3, 8), (5, 9), (7, 12)])
def test_nm_matches_a_sorting_reference_on_heavy_ties(n, m):
    rng = np.random.default_rng(m)
    scores = rng.integers(0, 3, (7, 29)).astype(np.float32)
    nonzero = rng.random((7, 29)) < 0.8
    keep = NM(n, m).local_mask(scores, nonzero, 0, "l1")
    assert np.array_equal(keep, _nm_reference(n, m, scores, nonzero))


def test_nm_ignores_zeros_needed_and_units_are_elements():
    w = _weight((4, 8))
    pattern = NM(2, 4)
    a = pattern.local_mask(np.abs(w), w != 0, 0, "l1")
    b = pattern.local_mask(np.abs(w), w != 0, 10 ** 6, "l1")
    assert np.array_equal(a, b) and (~a).sum() == 16
    assert pattern.unit_scores(np.abs(w), "l1").shape == (32,)
    assert np.array_equal(pattern.expand(np.zeros(32, bool), (4, 8)), np.ones((4, 8), bool))


# -- channel ----------------------------------------------------------------------------------

@pytest.mark.parametrize("reduce", ["l1", "l2"])
def test_channel_prunes_whole_rows_lowest_norm_first(reduce):
    w = _weight((12, 9), sparsity=0.1)
    keep, target = _prune(Channel(), w, 0.4, reduce)
    rows = ~keep.any(axis=1)
    assert (keep == (w != 0) & ~rows[:, None]).all()  # pruned rows entirely, others untouched
    norm = np.abs(w).sum(1) if reduce == "l1" else np.sqrt((w.astype(float) ** 2).sum(1))
    assert norm[rows].max() <= norm[~rows].min()
    assert int((~keep).sum()) >= target


def test_channel_l1_and_l2_disagree_where_they_should():
    # Row 0: many small entries (L1 4, L2 2); row 1: one big entry (L1 3, L2 3).
    w = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    by_l1 = Channel().local_mask(np.abs(w), w != 0, 1, "l1")
    by_l2 = Channel().local_mask(np.abs(w), w != 0, 1, "l2")
    assert by_l1[0].all() and not by_l1[1].any()
    assert not by_l2[0].any() and by_l2[1, 0]


@pytest.mark.parametrize("pattern", [Unstructured(), Blocks(4, 1), Blocks(3, 2), Blocks(1, 4),
                                     Channel(), NM(2, 4)])
def test_units_partition_the_weight_in_one_order(pattern):
    """unit_scores, unit_counts and expand agree on which elements form unit u."""
    shape = (10, 7)
    counts = pattern.unit_counts(np.ones(shape, dtype=bool))
    owner = np.full(shape, -1)
    for unit in range(counts.size):
        dropped = ~pattern.expand(np.arange(counts.size) == unit, shape)
        assert (owner[dropped] == -1).all() and dropped.sum() == counts[unit]
        owner[dropped] = unit
    assert (owner >= 0).all()
    for i, j in np.ndindex(*shape):
        one_hot = np.zeros(shape, dtype=np.float32)
        one_hot[i, j] = 1.0
        assert np.flatnonzero(pattern.unit_scores(one_hot, "l1")).tolist() == [owner[i, j]]


def test_bad_reduce_is_a_bug_not_a_user_error():
    with pytest.raises(ValueError):
        Blocks(2, 2).unit_scores(np.ones((2, 2)), "l3")
