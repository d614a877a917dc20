"""Property tests: masks from every pattern, criterion and dtype keep their invariants exactly.

Shapes 1..40 x 1..40, fp16/fp32/fp64, zeros already present, heavy score ties, any target.
The only exceptions allowed are OnnxPruneError subclasses (user errors), and none is expected.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from onnxprune.masking.criteria import ScoreContext, get_criterion
from onnxprune.masking.patterns import NM, Blocks, Channel, Pattern, parse_pattern
from onnxprune.masking.scope import UnitLayer, allocate_global

SETTINGS = settings(max_examples=400, deadline=None)

shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
dtypes = st.sampled_from([np.float16, np.float32, np.float64])
criteria = st.sampled_from(["magnitude", "l2", "random"])
nm_specs = st.integers(2, 12).flatmap(  # m > 8 takes the argsort path
    lambda m: st.integers(1, m - 1).map(lambda n: f"{n}:{m}"))
block_specs = st.builds(lambda r, c: f"{r}x{c}", st.integers(1, 6), st.integers(1, 6))
specs = st.one_of(st.just("unstructured"), st.just("channel"), block_specs, nm_specs)


@st.composite
def weights(draw, shape=shapes):
    """A weight with some zeros already, and sometimes only a few distinct magnitudes (ties)."""
    rows, cols = draw(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    w = rng.standard_normal((rows, cols)) * 10.0 ** draw(st.integers(-6, 3))
    if draw(st.booleans()):
        w = np.round(w * 2) / 2  # few distinct values: lots of exact ties
    w[rng.random((rows, cols)) < draw(st.sampled_from([0.0, 0.3, 0.9]))] = 0.0
    return w.astype(draw(dtypes))  # fp16 underflows tiny values to zero, which is fine


def unit_ids(pattern: Pattern, shape) -> np.ndarray:
    """Which unit each element belongs to, computed independently of the pattern's code."""
    rows, cols = shape
    i, j = np.indices(shape)
    if isinstance(pattern, Blocks):
        return (i // pattern.rows) * -(-cols // pattern.cols) + j // pattern.cols
    if isinstance(pattern, Channel):
        return i
    return i * cols + j


def _target(size: int, sparsity: float) -> int:
    return int(round(sparsity * size))


@SETTINGS
@given(w=weights(), spec=specs, criterion=criteria, sparsity=st.floats(0.0, 1.0),
       seed=st.integers(0, 3))
def test_local_masks_keep_their_invariants(w, spec, criterion, sparsity, seed):
    pattern, crit = parse_pattern(spec), get_criterion(criterion)
    scores = crit.scores(w, ScoreContext("layer", seed=seed))
    nonzero = w != 0
    existing = w.size - int(nonzero.sum())
    target = _target(w.size, sparsity)
    keep = pattern.local_mask(scores, nonzero, target - existing, crit.reduce)

    assert keep.shape == w.shape and keep.dtype == bool
    assert not keep[~nonzero].any()  # the keep mask is "non-zero after pruning"
    zeros = w.size - int(keep.sum())

    if isinstance(pattern, NM):
        _check_nm(pattern, scores, nonzero, keep)
        return
    if target <= existing:
        assert np.array_equal(keep, nonzero)
        return

    ids = unit_ids(pattern, w.shape).ravel()
    n_units = int(ids.max()) + 1
    unit_size = np.bincount(ids, minlength=n_units)
    counts = np.bincount(ids, weights=nonzero.ravel(), minlength=n_units).astype(int)
    kept = np.bincount(ids, weights=keep.ravel(), minlength=n_units).astype(int)
    assert ((kept == 0) | (kept == counts)).all()  # each unit wholly pruned or untouched
    assert target <= zeros < target + unit_size.max()
    if unit_size.max() == 1:
        assert zeros == target

    # One threshold: every pruned unit scores at most every kept one.
    units = pattern.unit_scores(scores, crit.reduce)
    ref = np.bincount(ids, weights=scores.ravel().astype(np.float64) ** (
        2 if crit.reduce == "l2" else 1), minlength=n_units)
    ref = np.sqrt(ref) if crit.reduce == "l2" else ref
    assert np.allclose(units, ref, rtol=1e-6, atol=0)
    pruned = (kept == 0) & (counts > 0)
    if pruned.any() and (kept > 0).any():
        assert units[pruned].max() <= units[kept > 0].min()


def _check_nm(pattern: NM, scores, nonzero, keep) -> None:
    n, m = pattern.n, pattern.m
    for j in range(0, keep.shape[1], m):
        group, orig, s = keep[:, j:j + m], nonzero[:, j:j + m], scores[:, j:j + m]
        width = group.shape[1]
        assert (group.sum(1) == np.minimum(orig.sum(1), min(n, width))).all()
        for r in range(keep.shape[0]):
            dropped = s[r][orig[r] & ~group[r]]
            if dropped.size and group[r].any():
                assert s[r][group[r]].min() >= dropped.max()  # top-n by score stay


@SETTINGS
@given(layers=st.lists(weights(), min_size=1, max_size=4), spec=st.one_of(
    st.just("unstructured"), st.just("channel"), block_specs), criterion=criteria,
    sparsity=st.floats(0.0, 1.0), max_sparsity=st.sampled_from([0.98, 0.5, 1.0]),
    use_min=st.booleans())
def test_global_masks_keep_their_invariants(layers, spec, criterion, sparsity, max_sparsity,
                                            use_min):
    pattern, crit = parse_pattern(spec), get_criterion(criterion)
    unit1 = spec == "unstructured"
    units, bounds = [], []
    for k, w in enumerate(layers):
        nonzero = w != 0
        existing = w.size - int(nonzero.sum())
        hi = max(int(max_sparsity * w.size) - existing, 0)
        lo = max(int(0.1 * w.size) - existing, 0) if use_min and unit1 else 0
        scores = crit.scores(w, ScoreContext(f"layer{k}"))
        units.append(UnitLayer(pattern.unit_scores(scores, crit.reduce),
                               pattern.unit_counts(nonzero), lo, hi))
        bounds.append((lo, hi))
    size = sum(w.size for w in layers)
    existing = sum(w.size - int(np.count_nonzero(w)) for w in layers)
    need = _target(size, sparsity) - existing
    masks = allocate_global(units, need)

    new = [int(u.unit_counts[m].sum()) for u, m in zip(units, masks)]
    for z, (lo, hi) in zip(new, bounds):
        assert z <= hi
        assert z >= lo or not unit1
    reachable = sum(_most_within(u, hi) for u, (_, hi) in zip(units, bounds))
    floor = sum(lo for lo, _ in bounds)
    goal = max(min(need, reachable), floor)
    if unit1:
        assert sum(new) == goal
    else:
        biggest = max(int(u.unit_counts.max(initial=0)) for u in units)
        assert goal <= sum(new) < goal + max(biggest, 1)

    # Each layer prunes a lowest-first prefix of its own units, whatever its bounds did.
    live = [(u.unit_scores[m & (u.unit_counts > 0)], u.unit_scores[~m & (u.unit_counts > 0)])
            for u, m in zip(units, masks)]
    for pruned, kept in live:
        assert not (pruned.size and kept.size) or pruned.max() <= kept.min()
    # And one threshold across the layers that no bound held back or pushed on.
    free = [i for i, (z, (lo, hi)) in enumerate(zip(new, bounds))
            if (z > lo or lo == 0) and z < _most_within(units[i], hi)]
    pruned = np.concatenate([live[i][0] for i in free] or [[]])
    kept = np.concatenate([live[i][1] for i in free] or [[]])
    if pruned.size and kept.size:
        assert pruned.max() <= kept.min()


def _most_within(layer: UnitLayer, cap: int) -> int:
    """The most new zeros a lowest-first prefix of one layer reaches without passing ``cap``."""
    order = np.lexsort((np.arange(layer.unit_scores.size), layer.unit_scores))
    cums = np.r_[0, np.cumsum(np.asarray(layer.unit_counts, dtype=np.int64)[order])]
    return int(cums[cums <= cap].max())
