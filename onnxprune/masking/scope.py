"""Scope: which units to prune, in one weight (local) or across many (global).

A *unit* is what a pattern zeroes at once: an element, a block, a row. This module sees only
1-D arrays of unit scores and unit counts (how many currently non-zero elements each unit holds);
it knows nothing of shapes or patterns (:mod:`onnxprune.masking.patterns` does).

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

Models too big to hold every layer's scores use :func:`global_cut`, the same search in
passes over the layers (each layer loaded on demand, one at a time): a first pass sums the
bucket counts, a second collects only the units of the cut's bucket (or, when that bucket is
crowded, narrows it with a histogram of the next 16 bits, down to one exact value whose ties go
by layer and index), and the caller's last pass masks each layer with :meth:`GlobalCut.mask`.
Memory: one layer, two 65536-entry histograms and a few integers per layer. The result is the
one :func:`allocate_global` gives, bit for bit.

Scores must be non-negative and not NaN (criteria guarantee it; a violation is a ValueError,
i.e. a bug upstream, not a user error).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["SCOPES", "UnitLayer", "select_units", "allocate_global", "global_cut", "GlobalCut"]

#: The scopes a run can prune in: each weight to the target, or one threshold across weights.
SCOPES = ("local", "global")

_N_BUCKETS = 1 << 16
_FIRST_NAN_BUCKET = 0x7F81  # float32 top bits above +inf's 0x7F80: NaN, or a negative sign bit
_UNBOUNDED = 1 << 62
_INF32_BITS = 0x7F800000
_CHUNK = 1 << 22  # bincount converts its input to intp: count big layers in slices of this size


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
    return [_layer_mask(u, cut, i, int(lo[i]), int(hi[i]), int(cut.new_zeros[i]))
            for i, u in enumerate(units)]


Loader = Callable[[int], UnitLayer]
Track = Callable[[Iterable, str, int], Iterable]


class GlobalCut:
    """Where :func:`global_cut` put the threshold; :meth:`mask` gives each layer its share."""

    def __init__(self, cut: "_Cut", lo: np.ndarray, hi: np.ndarray, dtype: np.dtype) -> None:
        self._cut, self._lo, self._hi, self._dtype = cut, lo, hi, dtype

    def mask(self, index: int, layer: UnitLayer) -> np.ndarray:
        """Prune mask over the units of layer ``index`` (the same layer :func:`global_cut` saw).

        >>> layers = [UnitLayer(np.array([3., 1.]), np.ones(2, int)),
        ...           UnitLayer(np.array([2., 4.]), np.ones(2, int))]
        >>> cut = global_cut(layers.__getitem__, 2, 2)
        >>> cut.mask(0, layers[0]), cut.mask(1, layers[1])
        (array([False,  True]), array([ True, False]))
        """
        u = _Units(layer.unit_scores, layer.unit_counts, self._dtype)
        lo, hi = int(self._lo[index]), int(self._hi[index])
        prefix = _prefix(u, self._cut, index)
        z = int(np.sum(u.counts, where=prefix, dtype=np.int64))
        return prefix if lo <= z <= hi else _layer_mask(u, self._cut, index, lo, hi, z)


def global_cut(load: Loader, n_layers: int, zeros_needed: Union[int, Callable[[], int]],
               max_candidates: int = 1 << 22, track: Optional[Track] = None) -> GlobalCut:
    """:func:`allocate_global` for layers too big to hold together: ``load(i)`` returns layer
    ``i`` (the same scores, counts and bounds on every call) and is called for every layer in
    order, two or more times; ``GlobalCut.mask(i, load(i))`` then gives the masks
    ``allocate_global`` would.

    ``zeros_needed`` may be a function, called after the first pass over the layers (so ``load``
    can count what it needs on the way). At most ``max_candidates`` units are collected at
    once; a crowded bucket is narrowed by another pass instead. ``track(items, description,
    total)`` wraps each pass (a progress bar).
    """
    track = track or (lambda items, description, total: items)
    n = int(n_layers)
    lo = np.zeros(n, dtype=np.int64)
    hi = np.zeros(n, dtype=np.int64)
    reached = np.zeros(_N_BUCKETS, dtype=np.int64)  # clipped new zeros at each bucket's end
    held = np.zeros(_N_BUCKETS, dtype=np.int64)  # unclipped: bounds the candidates per bucket
    narrow = True
    for i in track(range(n), "global threshold: histogram", n):
        layer = load(i)
        scores = np.asarray(layer.unit_scores)
        own = scores.dtype in (np.float16, np.float32)
        narrow = narrow and own
        u = _Units(scores, layer.unit_counts, np.dtype(np.float32 if own else np.float64))
        lo[i], hi[i] = _snap_bounds(u, layer)
        cum = u.cum
        reached += np.clip(cum, lo[i], hi[i])
        held += cum
        del layer, scores, u, cum
    need = int(zeros_needed() if callable(zeros_needed) else zeros_needed)
    dtype = np.dtype(np.float32 if narrow else np.float64)
    if need <= lo.sum():
        cut = _Cut(-1, 0.0, 0, 0, np.zeros(n, dtype=np.int64))
    elif need > hi.sum():
        cut = _Cut(1, 0.0, 0, 0, np.zeros(n, dtype=np.int64))
    else:
        bucket = int(np.searchsorted(reached, need))
        crowd = int(held[bucket] - (held[bucket - 1] if bucket else 0))
        search = _BucketSearch(load, n, lo, hi, need, dtype, bucket, track)
        cut = search.run(crowd, int(max_candidates))
    return GlobalCut(cut, lo, hi, dtype)


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
            b, c = self.buckets, self.counts
            hist = _bucket_counts(b, c, self.unit1, self.total == self.size)
            for start in range(_CHUNK, self.size, _CHUNK):
                hist += _bucket_counts(b[start:start + _CHUNK], c[start:start + _CHUNK],
                                       self.unit1, self.total == self.size)
            if self.unit1 and self.total != self.size:
                hist[0] -= self.size - self.total
            cum = np.cumsum(hist, dtype=np.int64)
            if cum[-1] != cum[_FIRST_NAN_BUCKET - 1]:
                raise ValueError("unit scores must be non-negative and not NaN")
            self._cum = cum
        return self._cum


def _bucket_counts(b: np.ndarray, counts: np.ndarray, unit1: bool, all_ones: bool) -> np.ndarray:
    """Histogram of the first ``_CHUNK`` bucket ids, weighted by counts (int64 or exact float)."""
    b, counts = b[:_CHUNK], counts[:_CHUNK]
    if unit1 and all_ones:
        return np.bincount(b, minlength=_N_BUCKETS)
    if unit1:
        # Counts are 0/1: send zero-count units to bucket 0 (the caller takes them back out
        # there); twice as fast as a float-weighted bincount.
        return np.bincount(np.multiply(b, counts, dtype=np.intp), minlength=_N_BUCKETS)
    return np.rint(np.bincount(b, weights=counts, minlength=_N_BUCKETS)).astype(np.int64)


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
    idx, val, cnt = [], [], []
    for u in units:
        at = np.flatnonzero(u.buckets == bucket)
        at = at[u.counts[at] > 0]
        idx.append(at)
        val.append(u.scores[at])
        cnt.append(u.counts[at])
    return _cut_among(idx, val, cnt, before, start, lo, hi, need)


def _cut_among(idx: List[np.ndarray], val: List[np.ndarray], cnt: List[np.ndarray],
               before: np.ndarray, start: int, lo: np.ndarray, hi: np.ndarray,
               need: int) -> _Cut:
    """The cut among candidate units (per layer, in index order) that hold the target: each
    layer's units before them hold ``before`` new zeros, ``start`` clipped in all."""
    n = len(idx)
    lay = np.repeat(np.arange(n, dtype=np.int64), [a.size for a in idx])
    idx, val = np.concatenate(idx), np.concatenate(val)
    cnt = np.concatenate([c.astype(np.int64) for c in cnt])
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


class _BucketSearch:
    """The passes of :func:`global_cut` after the first: find the cut inside one bucket.

    The bucket's units are narrowed to a range ``[klo, khi]`` of exact keys (the bit patterns of
    the scores in the common dtype, which order like the scores) until they are few enough to
    collect and sort, or the range is one value, whose tied units go by (layer, index).
    """

    def __init__(self, load: Loader, n: int, lo: np.ndarray, hi: np.ndarray, need: int,
                 dtype: np.dtype, bucket: int, track: Track) -> None:
        self.load, self.n, self.lo, self.hi, self.need = load, n, lo, hi, need
        self.dtype, self.bucket, self.track = dtype, bucket, track
        self.key_dtype = np.dtype(np.uint32 if dtype == np.float32 else np.uint64)
        if dtype == np.float32:
            self.klo, self.khi = bucket << 16, (bucket << 16) | 0xFFFF
        else:  # float64 keys of the float32 bucket's neighbours: a range holding the bucket
            self.klo = _key64((bucket << 16) - 1) if bucket else 0
            self.khi = _key64(min((bucket + 1) << 16, _INF32_BITS))

    def run(self, crowd: int, max_candidates: int) -> _Cut:
        while True:
            if self.klo == self.khi:
                return self._ties()
            if crowd <= max_candidates:
                return self._collect()
            crowd = self._narrow()

    def _layers(self, description: str, indices: Optional[Sequence[int]] = None):
        """(index, units, new zeros of the units before the range, positions in the range) of
        every layer, or of ``indices``."""
        if indices is None:
            indices = self.track(range(self.n), description, self.n)
        for i in indices:
            layer = self.load(i)
            u = _Units(layer.unit_scores, layer.unit_counts, self.dtype)
            del layer
            b = u.buckets
            below = b < self.bucket
            before = int(np.count_nonzero(u.counts[below]) if u.unit1 else
                         u.counts[below].sum(dtype=np.int64))
            del below
            at = np.flatnonzero(b == self.bucket)
            keys = u.scores[at].view(self.key_dtype)
            cnt = u.counts[at]
            before += int(cnt[keys < self.klo].sum(dtype=np.int64))
            at = at[(keys >= self.klo) & (keys <= self.khi) & (cnt > 0)]
            del b, keys, cnt
            yield i, u, before, at
            del u, at  # before the next layer loads: one layer in memory at a time

    def _start(self, before: np.ndarray) -> int:
        return int(np.clip(before, self.lo, self.hi).sum())

    def _collect(self) -> _Cut:
        before = np.zeros(self.n, dtype=np.int64)
        idx, val, cnt = [], [], []
        for i, u, before[i], at in self._layers("global threshold: cut"):
            idx.append(at)
            val.append(u.scores[at])
            cnt.append(u.counts[at])
            del u, at
        return _cut_among(idx, val, cnt, before, self._start(before), self.lo, self.hi,
                          self.need)

    def _narrow(self) -> int:
        """One histogram pass over the next 16 bits of the range; returns the new crowd."""
        shift = max(0, (self.khi - self.klo).bit_length() - 16)
        size = ((self.khi - self.klo) >> shift) + 1
        reached = np.zeros(size, dtype=np.int64)
        held = np.zeros(size, dtype=np.int64)
        before = np.zeros(self.n, dtype=np.int64)
        for i, u, before[i], at in self._layers("global threshold: narrowing"):
            sub = (u.scores[at].view(self.key_dtype).astype(np.uint64) - np.uint64(self.klo)
                   ) >> np.uint64(shift)
            hist = np.rint(np.bincount(sub.astype(np.intp), weights=u.counts[at],
                                       minlength=size)).astype(np.int64)
            reached += np.clip(before[i] + np.cumsum(hist), self.lo[i], self.hi[i])
            held += hist
            del u, at, sub
        j = int(np.searchsorted(reached, self.need))
        self.klo, self.khi = (self.klo + (j << shift),
                              min(self.khi, self.klo + ((j + 1) << shift) - 1))
        return int(held[j])

    def _ties(self) -> _Cut:
        """Every candidate has the same score: take them by layer, then index."""
        before = np.zeros(self.n, dtype=np.int64)
        tied = np.zeros(self.n, dtype=np.int64)
        for i, u, before[i], at in self._layers("global threshold: ties"):
            tied[i] = int(u.counts[at].sum(dtype=np.int64))
            del u, at
        total = self._start(before)
        value = np.array(self.klo, dtype=self.key_dtype).view(self.dtype)[()]
        for i in range(self.n):
            lo, hi = self.lo[i], self.hi[i]
            base = int(np.clip(before[i], lo, hi))
            if total + int(np.clip(before[i] + tied[i], lo, hi)) - base < self.need:
                total += int(np.clip(before[i] + tied[i], lo, hi)) - base
                continue
            (_, u, _, at), = self._layers("", [i])
            gains = np.clip(before[i] + np.cumsum(u.counts[at], dtype=np.int64), lo, hi) - base
            p = int(np.searchsorted(total + gains, self.need))
            return _Cut(0, value, i, int(at[p]), np.zeros(self.n, dtype=np.int64))
        raise AssertionError("the target lies inside this value's ties")  # pragma: no cover


def _key64(bits32: int) -> int:
    """The float64 bit pattern of the float32 with bit pattern ``bits32``."""
    value = np.array(bits32, dtype=np.uint32).view(np.float32).astype(np.float64)
    return int(value.view(np.uint64))


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


def _layer_mask(u: _Units, cut: _Cut, layer: int, lo: int, hi: int, z: int) -> np.ndarray:
    """One layer's share of the cut, where ``z`` is what the cut gives it: clipped to its
    bounds by a cut of its own when ``z`` falls outside them."""
    if z < lo:
        return _prefix(u, _find_cut([u], *_free(u), lo), 0)
    if z > hi:
        return _longest_prefix_within(u, hi)
    return _prefix(u, cut, layer)


def _longest_prefix_within(u: _Units, cap: int) -> np.ndarray:
    """The longest prefix of one layer's order whose new zeros stay ``<= cap``."""
    if cap >= u.total:
        return np.ones(u.size, dtype=bool)
    return _prefix(u, _find_cut([u], *_free(u), cap + 1), 0, strict=True)
