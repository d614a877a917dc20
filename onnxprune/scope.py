"""Scope: which units to prune, in one weight (local) or across many (global).

A *unit* is what a pattern zeroes at once: an element, a block, a row. This module sees only
1-D arrays of unit scores and unit counts (how many currently non-zero elements each unit holds);
it knows nothing of shapes or patterns (:mod:`onnxprune.patterns` does).

One rule serves both scopes: order every unit by ``(score, layer, unit index)`` and prune the
shortest prefix of that order whose counts reach the new zeros needed. Globally each layer's share
is then clipped to its ``[min_new_zeros, max_new_zeros]`` bounds, and the cut is placed where the
*clipped* total first reaches the target, so bounds cost no extra zeros elsewhere.

Speed without sorting (a 25M-weight model must prune at the pace of one ``np.partition``):
non-negative float32 values order like their uint32 bit patterns, so the top 16 bits are a
monotone bucket id. One ``np.bincount`` per layer gives exact new-zero counts at every bucket
edge; a search over the summed (clipped) bucket counts finds the one bucket that holds the cut;
only the units in that bucket are sorted. Layers are never concatenated, and each layer costs
O(size) time plus a 65536-entry histogram.

Scores must be non-negative and not NaN (criteria guarantee it; a violation is a ValueError,
i.e. a bug upstream, not a user error).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import List, NamedTuple, Sequence, Tuple

import numpy as np

__all__ = ["UnitLayer", "select_units", "allocate_global"]

_N_BUCKETS = 1 << 16
_FIRST_NAN_BUCKET = 0x7F81  # float32 top bits above +inf's 0x7F80: NaN, or a negative sign bit
_UNBOUNDED = 1 << 62


@dataclass
class UnitLayer:
    """One weight's units for :func:`allocate_global`; bounds are counts of *new* zeros."""

    unit_scores: np.ndarray
    unit_counts: np.ndarray
    min_new_zeros: int = 0
    max_new_zeros: int = _UNBOUNDED


def select_units(unit_scores: np.ndarray, unit_counts: np.ndarray,
                 zeros_needed: int) -> np.ndarray:
    """Prune mask over units: the shortest lowest-score-first prefix reaching ``zeros_needed``.

    Ties are broken by unit index (lower first). If all units together hold fewer new zeros than
    needed, every unit is pruned.

    >>> select_units(np.array([3., 1., 2., 1.]), np.array([1, 1, 1, 1]), 2)
    array([False,  True, False,  True])
    """
    if int(zeros_needed) <= 0:
        return np.zeros(np.asarray(unit_scores).size, dtype=bool)
    return allocate_global([UnitLayer(unit_scores, unit_counts)], zeros_needed)[0]


def allocate_global(layers: Sequence[UnitLayer], zeros_needed: int) -> List[np.ndarray]:
    """Per-layer prune masks from one threshold on unit score across all ``layers``.

    Each layer prunes its units below the threshold, clipped so its new zeros stay within
    ``[min_new_zeros, max_new_zeros]`` (the max wins when they conflict). The new zeros total at
    least ``zeros_needed`` — exactly that many when every unit holds at most one element and the
    target is reachable. Ties at the threshold go by layer order, then unit index. When the
    target is out of reach within the max bounds, every layer prunes up to its bound.
    """
    need = int(zeros_needed)
    dtype = _common_dtype(layers)
    units = [_Units(layer.unit_scores, layer.unit_counts, dtype) for layer in layers]
    bounds = [_snap_bounds(u, layer) for u, layer in zip(units, layers)]
    lo = np.array([b[0] for b in bounds], dtype=np.int64)
    hi = np.array([b[1] for b in bounds], dtype=np.int64)
    cut = _find_cut(units, lo, hi, need)
    masks = []
    for i, u in enumerate(units):
        z = int(cut.new_zeros[i])
        if z < lo[i]:
            masks.append(_prefix(u, _find_cut([u], *_free(u), int(lo[i])), 0))
        elif z > hi[i]:
            masks.append(_longest_prefix_within(u, int(hi[i])))
        else:
            masks.append(_prefix(u, cut, i))
    return masks


# -- internals --------------------------------------------------------------------------------

class _Units:
    """One layer's units prepared for the search: scores, counts, bucket ids, bucket histogram."""

    def __init__(self, scores: np.ndarray, counts: np.ndarray, dtype: np.dtype) -> None:
        self.scores = np.ascontiguousarray(np.asarray(scores).reshape(-1), dtype=dtype)
        c = np.asarray(counts).reshape(-1)
        if c.dtype == bool:
            c = c.view(np.uint8)
        if c.shape != self.scores.shape:
            raise ValueError(f"unit_counts has {c.size} entries, unit_scores {self.scores.size}")
        if c.dtype.kind not in "iu":
            raise ValueError(f"unit_counts must be integers, got {c.dtype}")
        if c.size and c.dtype.kind == "i" and c.min() < 0:
            raise ValueError("unit_counts must be non-negative")
        self.counts = c
        self.size = c.size
        # Unit size 1 (unstructured) lets every new-zero count be reached exactly, and lets the
        # histogram skip float weights (see `cum`).
        self.unit1 = self.size == 0 or int(c.max()) <= 1
        self.total = int(np.count_nonzero(c)) if self.unit1 else int(c.sum(dtype=np.int64))
        self._buckets = None
        self._cum = None

    @property
    def buckets(self) -> np.ndarray:
        """Top 16 bits of each score as float32: a bucket id that never breaks the order."""
        if self._buckets is None:
            s = self.scores
            if s.dtype != np.float32:
                with np.errstate(over="ignore"):  # float64 -> float32 rounding is monotone
                    s = s.astype(np.float32)
            if sys.byteorder == "little":
                self._buckets = s.view(np.uint16)[1::2]  # a strided view, no pass over data
            else:
                self._buckets = (s.view(np.uint32) >> 16).astype(np.uint16)
        return self._buckets

    @property
    def cum(self) -> np.ndarray:
        """``cum[b]``: new zeros held by units in buckets ``<= b`` (int64, 65536 entries)."""
        if self._cum is None:
            b = self.buckets
            if self.unit1 and self.total == self.size:
                hist = np.bincount(b, minlength=_N_BUCKETS)
            elif self.unit1:
                # Counts are 0/1: send zero-count units to bucket 0 and take them back out there;
                # twice as fast as a float-weighted bincount.
                hist = np.bincount(np.multiply(b, self.counts, dtype=np.intp),
                                   minlength=_N_BUCKETS)
                hist[0] -= self.size - self.total
            else:
                hist = np.rint(np.bincount(b, weights=self.counts, minlength=_N_BUCKETS))
            cum = np.cumsum(hist, dtype=np.int64)
            if cum[-1] != cum[_FIRST_NAN_BUCKET - 1]:
                raise ValueError("unit scores must be non-negative and not NaN")
            self._cum = cum
        return self._cum


class _Cut(NamedTuple):
    """Where the shortest prefix ends: ``side`` -1 = before every unit, +1 = after every unit,
    0 = at the unit ``(value, layer, index)``; ``new_zeros`` per layer at the cut, unclipped."""

    side: int
    value: float
    layer: int
    index: int
    new_zeros: np.ndarray


def _common_dtype(layers: Sequence[UnitLayer]) -> np.dtype:
    # Compare every layer in one dtype so the threshold means the same thing everywhere.
    narrow = all(np.asarray(l.unit_scores).dtype in (np.float16, np.float32) for l in layers)
    return np.dtype(np.float32 if narrow else np.float64)


def _free(u: _Units) -> Tuple[np.ndarray, np.ndarray]:
    """Bounds that never clip: one layer on its own."""
    return np.zeros(1, dtype=np.int64), np.array([u.total], dtype=np.int64)


def _snap_bounds(u: _Units, layer: UnitLayer) -> Tuple[int, int]:
    """Bounds clamped to ``[0, total]``, then moved to counts some prefix really reaches."""
    hi = min(max(int(layer.max_new_zeros), 0), u.total)
    lo = min(max(int(layer.min_new_zeros), 0), hi)
    if not u.unit1:  # a block moves several zeros at once: not every count is reachable
        if lo > 0:
            lo = int(_find_cut([u], *_free(u), lo).new_zeros[0])
        if hi < u.total:
            cut = _find_cut([u], *_free(u), hi + 1)
            hi = int(cut.new_zeros[0]) - int(u.counts[cut.index])
        lo = min(lo, hi)
    return lo, hi


def _find_cut(units: Sequence[_Units], lo: np.ndarray, hi: np.ndarray, need: int) -> _Cut:
    """The shortest prefix of the global unit order whose clipped new zeros reach ``need``."""
    n = len(units)
    if need <= lo.sum():
        return _Cut(-1, 0.0, 0, 0, np.zeros(n, dtype=np.int64))
    if need > hi.sum():
        return _Cut(1, 0.0, 0, 0, np.array([u.total for u in units], dtype=np.int64))

    # Clipped total at each bucket's end; it never decreases, so a binary search finds the bucket.
    reached = np.zeros(_N_BUCKETS, dtype=np.int64)
    for u, a, b in zip(units, lo, hi):
        reached += np.clip(u.cum, a, b)
    bucket = int(np.searchsorted(reached, need))
    before = np.array([u.cum[bucket - 1] if bucket else 0 for u in units], dtype=np.int64)
    start = int(reached[bucket - 1]) if bucket else int(lo.sum())

    # Only the units inside that bucket get sorted. Zero-count units never move the total, so
    # the cut always lands on a unit that holds zeros; the rest need not be candidates.
    idx, val, cnt, lay = [], [], [], []
    for i, u in enumerate(units):
        at = np.flatnonzero(u.buckets == bucket)
        at = at[u.counts[at] > 0]
        idx.append(at)
        val.append(u.scores[at])
        cnt.append(u.counts[at].astype(np.int64))
        lay.append(np.full(at.size, i, dtype=np.int64))
    idx, val, cnt, lay = (np.concatenate(a) for a in (idx, val, cnt, lay))
    if np.isnan(val).any():
        raise ValueError("unit scores must not be NaN")
    order = np.argsort(val, kind="stable")  # gathered in (layer, index) order: ties stay so
    idx, val, cnt, lay = idx[order], val[order], cnt[order], lay[order]

    # What a candidate adds to the total is the change in its own layer's clipped count, so
    # run a cumulative count per layer (grouped by a stable sort on layer, then put back).
    by_layer = np.argsort(lay, kind="stable")
    g_lay, g_cnt = lay[by_layer], cnt[by_layer]
    run = np.cumsum(g_cnt)
    starts = np.flatnonzero(np.r_[True, g_lay[1:] != g_lay[:-1]])
    sizes = np.diff(np.r_[starts, g_lay.size])
    z_after = before[g_lay] + run - np.repeat(run[starts] - g_cnt[starts], sizes)
    a, b = lo[g_lay], hi[g_lay]
    gain = np.empty_like(g_cnt)
    gain[by_layer] = np.clip(z_after, a, b) - np.clip(z_after - g_cnt, a, b)
    p = int(np.searchsorted(start + np.cumsum(gain), need))
    taken = np.bincount(lay[: p + 1], weights=cnt[: p + 1], minlength=n)
    new_zeros = before + np.rint(taken).astype(np.int64)
    return _Cut(0, val[p], int(lay[p]), int(idx[p]), new_zeros)


def _prefix(u: _Units, cut: _Cut, layer: int, strict: bool = False) -> np.ndarray:
    """Units of ``layer`` at or before the cut (strictly before when ``strict``)."""
    if cut.side < 0:
        return np.zeros(u.size, dtype=bool)
    if cut.side > 0:
        return np.ones(u.size, dtype=bool)
    s, v = u.scores, cut.value
    if layer != cut.layer:  # equal scores: earlier layers come first
        return s <= v if layer < cut.layer else s < v
    mask = s < v
    end = cut.index + (0 if strict else 1)
    mask[:end] |= s[:end] == v
    return mask


def _longest_prefix_within(u: _Units, cap: int) -> np.ndarray:
    """The longest prefix of one layer's order whose new zeros stay ``<= cap``."""
    if cap >= u.total:
        return np.ones(u.size, dtype=bool)
    return _prefix(u, _find_cut([u], *_free(u), cap + 1), 0, strict=True)
