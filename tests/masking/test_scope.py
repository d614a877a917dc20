"""Scope: select_units / allocate_global against a brute-force oracle and exact invariants."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import pytest

from onnxprune.masking.scope import UnitLayer, allocate_global, select_units


# -- a brute-force oracle: sort everything, walk prefixes one unit at a time -------------------

def _layer_cums(layer: UnitLayer) -> np.ndarray:
    """New zeros of each prefix of the layer's own (score, index) order, starting with 0."""
    order = np.lexsort((np.arange(len(layer.unit_scores)), np.asarray(layer.unit_scores, float)))
    return np.r_[0, np.cumsum(np.asarray(layer.unit_counts, dtype=np.int64)[order])], order


def _snapped(layer: UnitLayer):
    cums, _ = _layer_cums(layer)
    total = int(cums[-1])
    hi = min(max(layer.max_new_zeros, 0), total)
    lo = min(max(layer.min_new_zeros, 0), hi)
    lo = int(cums[np.argmax(cums >= lo)])
    hi = int(cums[cums <= hi].max())
    return min(lo, hi), hi


def _layer_prefix(layer: UnitLayer, length: int) -> np.ndarray:
    _, order = _layer_cums(layer)
    mask = np.zeros(len(order), dtype=bool)
    mask[order[:length]] = True
    return mask


def oracle(layers: Sequence[UnitLayer], need: int) -> List[np.ndarray]:
    entries = sorted((float(s), li, ui) for li, l in enumerate(layers)
                     for ui, s in enumerate(np.asarray(l.unit_scores, dtype=np.float64)))
    bounds = [_snapped(l) for l in layers]
    z = [0] * len(layers)
    taken = [0] * len(layers)  # prefix length within each layer
    clipped = lambda: sum(min(max(zi, lo), hi) for zi, (lo, hi) in zip(z, bounds))
    pos = 0
    while clipped() < need and pos < len(entries):
        _, li, ui = entries[pos]
        z[li] += int(layers[li].unit_counts[ui])
        taken[li] += 1
        pos += 1
        # The cut sits on the unit that reached the target; later zero-count ties are not taken.
    masks = []
    for layer, (lo, hi), zi, t in zip(layers, bounds, z, taken):
        cums, _ = _layer_cums(layer)
        if zi < lo:
            t = int(np.argmax(cums >= lo))
        elif zi > hi:
            t = int(np.flatnonzero(cums <= hi).max())
        masks.append(_layer_prefix(layer, t))
    return masks


def _new_zeros(layer: UnitLayer, mask: np.ndarray) -> int:
    return int(np.asarray(layer.unit_counts)[mask].sum())


def _random_layers(rng, n_layers, unit_max=1, tie_levels=None, size_max=60) -> List[UnitLayer]:
    layers = []
    for _ in range(n_layers):
        n = int(rng.integers(1, size_max))
        if tie_levels:
            scores = rng.integers(0, tie_levels, n).astype(np.float32)
        else:
            scores = rng.random(n, dtype=np.float32) * np.float32(10.0 ** rng.integers(-3, 3))
        counts = rng.integers(0, unit_max + 1, n)
        total = int(counts.sum())
        lo = int(rng.integers(0, total + 1)) if rng.random() < 0.3 else 0
        hi = int(rng.integers(0, total + 1)) if rng.random() < 0.5 else total
        layers.append(UnitLayer(scores, counts, lo, hi))
    return layers


# -- select_units -----------------------------------------------------------------------------

def test_select_units_takes_lowest_scores_ties_by_index():
    scores = np.array([0.5, 0.1, 0.3, 0.1, 0.3], dtype=np.float32)
    counts = np.ones(5, dtype=np.int64)
    assert select_units(scores, counts, 3).tolist() == [False, True, True, True, False]


def test_select_units_counts_weigh_units_and_prefix_is_minimal():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    counts = np.array([4, 0, 4, 4])
    # 5 zeros: unit 0 gives 4, the zero-count unit 1 comes next in order, unit 2 reaches 8 >= 5.
    assert select_units(scores, counts, 5).tolist() == [True, True, True, False]
    assert select_units(scores, counts, 4).tolist() == [True, False, False, False]


@pytest.mark.parametrize("need", [0, -3])
def test_select_units_nothing_needed_prunes_nothing(need):
    assert not select_units(np.zeros(4), np.ones(4, dtype=int), need).any()


def test_select_units_unreachable_prunes_everything():
    assert select_units(np.arange(4.0), np.array([1, 0, 1, 1]), 10).all()


def test_select_units_resolves_within_one_bucket_and_in_float64():
    # These differ only below float32's top 16 bits (one bucket) or below float32 precision.
    f32 = np.float32(1.0) + np.arange(64, dtype=np.float32)[::-1] * np.float32(2.0 ** -20)
    mask = select_units(f32, np.ones(64, dtype=np.uint8), 10)
    assert np.flatnonzero(mask).tolist() == list(range(54, 64))
    f64 = 1.0 + np.arange(8)[::-1] * 1e-12
    assert np.flatnonzero(select_units(f64, np.ones(8, int), 3)).tolist() == [5, 6, 7]


def test_select_units_handles_zero_inf_and_wide_ranges():
    scores = np.array([np.inf, 0.0, 1e-40, 3e38, 1e-30, 0.0], dtype=np.float32)
    mask = select_units(scores, np.ones(6, dtype=np.uint8), 4)
    assert np.flatnonzero(mask).tolist() == [1, 2, 4, 5]
    assert select_units(scores, np.ones(6, dtype=np.uint8), 6).all()


@pytest.mark.parametrize("bad", [np.nan, -1.0, -0.0])
def test_select_units_rejects_invalid_scores(bad):
    with pytest.raises(ValueError):
        select_units(np.array([1.0, bad], dtype=np.float32), np.ones(2, dtype=int), 1)


def test_select_units_matches_oracle_on_random_inputs():
    rng = np.random.default_rng(7)
    for trial in range(200):
        layer = _random_layers(rng, 1, unit_max=int(rng.integers(1, 5)),
                               tie_levels=5 if trial % 3 == 0 else None)[0]
        need = int(rng.integers(-1, int(np.sum(layer.unit_counts)) + 3))
        got = select_units(layer.unit_scores, layer.unit_counts, need)
        want = oracle([UnitLayer(layer.unit_scores, layer.unit_counts)], need)[0]
        if need <= 0:
            want = np.zeros_like(want)
        assert np.array_equal(got, want), trial


# -- allocate_global ------------------------------------------------------------------------

def test_global_matches_oracle_on_random_inputs():
    rng = np.random.default_rng(11)
    for trial in range(200):
        layers = _random_layers(rng, int(rng.integers(1, 6)), unit_max=int(rng.integers(1, 4)),
                                tie_levels=4 if trial % 3 == 0 else None)
        need = int(rng.integers(0, sum(int(np.sum(l.unit_counts)) for l in layers) + 3))
        got, want = allocate_global(layers, need), oracle(layers, need)
        for g, w in zip(got, want):
            assert np.array_equal(g, w), trial


def test_global_exact_count_and_bounds_for_unit_size_one():
    rng = np.random.default_rng(3)
    for trial in range(100):
        layers = _random_layers(rng, int(rng.integers(1, 6)))
        reachable = sum(min(l.max_new_zeros, int(np.sum(l.unit_counts))) for l in layers)
        need = int(rng.integers(0, reachable + 1))
        masks = allocate_global(layers, need)
        zeros = [_new_zeros(l, m) for l, m in zip(layers, masks)]
        for layer, z in zip(layers, zeros):
            assert z <= layer.max_new_zeros
            assert z >= min(layer.min_new_zeros, layer.max_new_zeros)
        lower = sum(min(l.min_new_zeros, l.max_new_zeros) for l in layers)
        assert sum(zeros) == max(need, lower), trial


def test_global_one_threshold_except_where_bounds_intervene():
    rng = np.random.default_rng(5)
    layers = [UnitLayer(rng.random(n, dtype=np.float32) * scale, np.ones(n, dtype=np.uint8))
              for n, scale in [(50, 1.0), (80, 0.1), (30, 10.0), (64, 0.5)]]
    masks = allocate_global(layers, 100)
    pruned = np.concatenate([l.unit_scores[m] for l, m in zip(layers, masks)])
    kept = np.concatenate([l.unit_scores[~m] for l, m in zip(layers, masks)])
    assert pruned.size == 100 and pruned.max() <= kept.min()

    # Cap the low-scoring layer: it stops at its bound, the others take over the remainder.
    layers[1].max_new_zeros = 20
    masks = allocate_global(layers, 100)
    assert masks[1].sum() == 20 and sum(m.sum() for m in masks) == 100
    free = [0, 2, 3]
    pruned = np.concatenate([layers[i].unit_scores[masks[i]] for i in free])
    kept = np.concatenate([layers[i].unit_scores[~masks[i]] for i in free])
    assert pruned.max() <= kept.min()
    assert layers[1].unit_scores[masks[1]].max() <= layers[1].unit_scores[~masks[1]].min()


def test_global_min_bound_prunes_more_and_max_wins_conflicts():
    ones = lambda n: np.ones(n, dtype=np.uint8)
    cheap = UnitLayer(np.zeros(10, dtype=np.float32), ones(10))
    dear = UnitLayer(np.full(10, 5.0, dtype=np.float32), ones(10), min_new_zeros=4)
    masks = allocate_global([cheap, dear], 6)
    assert (masks[0].sum(), masks[1].sum()) == (2, 4)
    dear.max_new_zeros = 3  # conflicts with min 4: max wins
    masks = allocate_global([cheap, dear], 6)
    assert (masks[0].sum(), masks[1].sum()) == (3, 3)


def test_global_unreachable_target_prunes_up_to_the_bounds():
    layers = [UnitLayer(np.arange(10, dtype=np.float32), np.ones(10, dtype=np.uint8), 0, 9),
              UnitLayer(np.arange(5, dtype=np.float32), np.ones(5, dtype=np.uint8), 0, 4)]
    masks = allocate_global(layers, 15)
    assert [m.sum() for m in masks] == [9, 4]
    assert masks[0].tolist() == [True] * 9 + [False]


def test_global_ties_break_by_layer_then_index():
    layers = [UnitLayer(np.ones(4, dtype=np.float32), np.ones(4, dtype=np.uint8))
              for _ in range(3)]
    masks = allocate_global(layers, 6)
    assert [m.tolist() for m in masks] == [[True] * 4, [True, True, False, False], [False] * 4]
    assert all(np.array_equal(a, b) for a, b in zip(masks, allocate_global(layers, 6)))


def test_global_block_units_overshoot_less_than_one_unit_and_snap_bounds():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    blocks = UnitLayer(scores, np.array([4, 4, 4, 4]), 0, 10)  # max 10 -> 8 reachable
    masks = allocate_global([blocks], 11)
    assert masks[0].tolist() == [True, True, False, False]
    masks = allocate_global([UnitLayer(scores, np.array([4, 4, 4, 4]))], 5)
    assert masks[0].tolist() == [True, True, False, False]


def test_global_mixes_float32_and_float64_layers_exactly():
    a = UnitLayer(np.array([1.0, 3.0], dtype=np.float32), np.ones(2, dtype=np.uint8))
    b = UnitLayer(np.array([1.0 + 1e-12, 2.0]), np.ones(2, dtype=np.uint8))
    masks = allocate_global([a, b], 2)
    assert masks[0].tolist() == [True, False] and masks[1].tolist() == [True, False]
    masks = allocate_global([b, a], 1)
    assert masks[0].tolist() == [False, False] and masks[1].tolist() == [True, False]


def test_global_with_empty_and_all_zero_layers():
    empty = UnitLayer(np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8))
    dead = UnitLayer(np.zeros(3, dtype=np.float32), np.zeros(3, dtype=np.uint8))
    live = UnitLayer(np.arange(3, dtype=np.float32), np.ones(3, dtype=np.uint8))
    masks = allocate_global([empty, dead, live], 2)
    assert masks[0].size == 0
    assert masks[2].tolist() == [True, True, False]
    assert allocate_global([], 5) == []


def test_global_block_bounds_conflict_max_wins():
    # Blocks of 4: min 3 snaps up to 4, max 3 snaps down to 0; the max wins, nothing is pruned.
    layer = UnitLayer(np.array([1.0, 2.0, 3.0]), np.array([4, 4, 4]), 3, 3)
    assert not allocate_global([layer], 0)[0].any()
    assert not allocate_global([layer], 12)[0].any()
