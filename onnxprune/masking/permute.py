"""The channel-permutation search for N:M patterns: which order of a weight's input channels lets
the most saliency survive the N:M mask.

An N:M mask keeps the ``n`` largest of every ``m`` consecutive input elements of a row, so which
channels share a group of ``m`` decides what survives. Given a saliency matrix ``S[rows, C]``
(one column per channel, every consumer's rows stacked: all consumers of a channel group see the
same permutation, so the search serves the sum of their saliencies), :func:`search_permutation`
returns an order of the ``C`` columns that keeps more of ``S``, never less than the identity.

The search follows the channel-swap idea of Pool & Yu, *Channel Permutations for N:M Sparsity*
(NeurIPS 2021), the one NVIDIA ASP uses for PyTorch:

1. a greedy start: channels in order of falling total saliency, each put into the group of ``m``
   (with a free slot) where it adds the most kept saliency, ties to the emptiest group (strong
   channels spread out); the identity is kept instead when it is better;
2. steepest-ascent swaps: of all pairs of channels in different groups, swap the pair that raises
   the kept saliency most, until no swap helps;
3. bounded escapes from the local optimum: a seeded random swap, then ascent again, the best
   order seen kept.

Each swap is evaluated exactly and cheaply: with ``s`` removed from its group, the top-``n`` of
the group after adding column ``x`` is ``top_{n-1}(rest) + max(rest_(n), x)`` row by row, so the
gain of every (slot, column) pair is one matrix ``P`` updated in ``2m`` rows after a swap.

The work is bounded: :data:`MAX_SWAPS` swaps, :data:`MAX_ESCAPES` escapes, and a wall-clock cap
(:data:`SEARCH_SECONDS` per search, a safety net that binds only on slow machines; the swap and
escape caps make results reproducible). Matrices whose ``rows x C x C`` work is over
:data:`MAX_WORK` are searched on a seeded sample of their rows; the exact kept saliency of the
full matrix decides between the result and the identity.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

#: Wall-clock cap of one search in seconds (a safety net; the caps below bind first normally).
SEARCH_SECONDS = 3.0
#: Swaps of the steepest ascent, in all, per search.
MAX_SWAPS = 4000
#: Random escapes from a local optimum, per search (each followed by ascent again).
MAX_ESCAPES = 24
#: Random swaps of one escape.
ESCAPE_SWAPS = 2
#: Channels searched at most (the gain matrix is C x C); larger groups keep their order.
MAX_CHANNELS = 2048
#: rows x C x C elementwise operations at most for the gain matrix; past it rows are sampled.
MAX_WORK = 3e8

__all__ = ["PermutationResult", "kept_nm", "search_permutation", "SEARCH_SECONDS", "MAX_SWAPS",
           "MAX_ESCAPES", "MAX_WORK", "MAX_CHANNELS"]


@dataclass
class PermutationResult:
    """``perm[i]`` is the old channel at new position ``i``; kept saliency (sum of the kept
    entries of ``S``) with the identity and with ``perm``, the total, and what the search did."""

    perm: np.ndarray
    kept_before: float
    kept_after: float
    total: float
    swaps: int = 0
    escapes: int = 0
    seconds: float = 0.0
    sampled_rows: Optional[int] = None  # rows the search saw when the matrix was sampled
    stopped: str = "converged"  # converged | swap cap | time cap | too large

    @property
    def identity(self) -> bool:
        return bool(np.array_equal(self.perm, np.arange(len(self.perm))))


def _topn_sum(block: np.ndarray, n: int) -> np.ndarray:
    """Sum of the ``n`` largest along the last axis."""
    m = block.shape[-1]
    return np.partition(block, m - n, axis=-1)[..., m - n:].sum(axis=-1)


def kept_nm(scores: np.ndarray, n: int, m: int) -> float:
    """Saliency an N:M mask keeps of ``scores[rows, C]`` (``C`` a multiple of ``m``; scores
    non-negative): the sum over rows and groups of ``m`` columns of the ``n`` largest."""
    r, c = scores.shape
    if c % m:
        raise ValueError(f"{c} columns is not a multiple of m={m}")
    return float(_topn_sum(scores.reshape(r, c // m, m).astype(np.float64), n).sum())


class _Search:
    """The swap search's state: ``ch[s]`` the column at slot ``s`` (group ``s // m``)."""

    def __init__(self, x: np.ndarray, n: int, m: int, ch: np.ndarray) -> None:
        self.x, self.n, self.m = x, n, m
        self.c = x.shape[1]
        self.ch = ch.copy()
        self.base = np.zeros(self.c)  # per slot: sum_r top_{n-1}(rest of its group)
        self.thr = np.zeros((self.c, x.shape[0]), dtype=x.dtype)  # per slot: rest's n-th largest
        self.p = np.zeros((self.c, self.c))  # [slot, column]: sum_r max(thr_slot, x_column)
        self.kept = np.zeros(self.c // m)  # per group
        group = np.arange(self.c) // m
        self.same = group[:, None] == group[None, :]
        self.group = group
        self.refresh(np.arange(self.c // m))

    def refresh(self, groups: np.ndarray) -> None:
        n, m, x = self.n, self.m, self.x
        slots = (groups[:, None] * m + np.arange(m)).ravel()
        block = x[:, self.ch[slots].reshape(len(groups), m)]  # [R, g, m]
        self.kept[groups] = _topn_sum(block, n).sum(axis=0)
        for i in range(m):
            rest = np.delete(block, i, axis=2)  # [R, g, m-1]
            part = -np.sort(-rest, axis=2)  # descending
            s = groups * m + i
            self.base[s] = part[:, :, :n - 1].sum(axis=(0, 2))
            self.thr[s] = part[:, :, n - 1].T
        self._fill_p(slots)

    def _fill_p(self, slots: np.ndarray) -> None:
        r = self.x.shape[0]
        step = max(1, int(2e7 // max(1, r * self.c)))
        for lo in range(0, len(slots), step):
            part = slots[lo:lo + step]
            self.p[part] = np.maximum(self.thr[part][:, :, None], self.x[None]).sum(axis=1)

    def gains(self) -> np.ndarray:
        """gain[s, t] of swapping the columns at slots s and t (-inf within one group)."""
        q = self.p[:, self.ch]
        q += (self.base - self.kept[self.group])[:, None]
        g = q + q.T
        g[self.same] = -np.inf
        return g

    def best_swap(self, tol: float):
        """The swap (slot, slot) that raises the kept saliency most, or None."""
        g = self.gains()
        s, t = divmod(int(np.argmax(g)), self.c)
        return (s, t) if g[s, t] > tol else None

    def swap(self, pairs) -> None:
        for s, t in pairs:
            self.ch[s], self.ch[t] = self.ch[t], self.ch[s]
        self.refresh(np.unique([x // self.m for pair in pairs for x in pair]))

    def total(self) -> float:
        return float(self.kept.sum())


def _greedy(x: np.ndarray, n: int, m: int) -> np.ndarray:
    """Channels by falling column saliency, each into the open group where it adds the most
    kept saliency (ties: the emptiest group, then the first)."""
    r, c = x.shape
    g = c // m
    top = np.zeros((g, n, r), dtype=np.float64)  # each group's n largest per row, descending
    members = [[] for _ in range(g)]
    count = np.zeros(g, dtype=np.int64)
    for j in np.argsort(-x.sum(axis=0), kind="stable"):
        col = x[:, j].astype(np.float64)
        gain = (np.maximum(top[:, n - 1], col[None]) - top[:, n - 1]).sum(axis=1)
        gain[count >= m] = -np.inf
        best = np.flatnonzero(gain >= gain.max() - 1e-12 * max(1.0, abs(gain.max())))
        k = int(best[np.argmin(count[best])])
        merged = np.concatenate([top[k], col[None]], axis=0)
        top[k] = -np.sort(-merged, axis=0)[:n]
        members[k].append(int(j))
        count[k] += 1
    return np.array([j for grp in members for j in grp], dtype=np.int64)


def search_permutation(scores: np.ndarray, n: int, m: int, seed: int = 0,
                       seconds: float = SEARCH_SECONDS, max_swaps: int = MAX_SWAPS,
                       max_escapes: int = MAX_ESCAPES, max_work: float = MAX_WORK
                       ) -> PermutationResult:
    """An order of the columns of ``scores[rows, C]`` (non-negative saliencies, ``C`` a
    multiple of ``m``) under which an N:M mask keeps at least as much as under the identity,
    and more where the search finds it (see the module docstring)."""
    start = time.perf_counter()
    full = np.abs(np.asarray(scores, dtype=np.float64))
    r, c = full.shape
    if c % m or not 1 <= n < m:
        raise ValueError(f"need 1 <= n < m and columns a multiple of m; got {n}:{m}, {c} columns")
    identity = np.arange(c, dtype=np.int64)
    total = float(full.sum())
    before = kept_nm(full, n, m)
    if c <= m or r == 0:
        return PermutationResult(identity, before, before, total, seconds=0.0)
    if c > MAX_CHANNELS:
        return PermutationResult(identity, before, before, total, stopped="too large")
    rng = np.random.default_rng(seed)
    x, sampled = full, None
    if r * c * c > max_work:
        keep = max(1, int(max_work // (c * c)))
        rows = np.sort(rng.choice(r, size=keep, replace=False))
        x, sampled = full[rows], keep
    x = x.astype(np.float32) if x.shape[0] * c * c > 1e7 else x
    greedy = _greedy(x, n, m)
    startperm = greedy if kept_nm(x[:, greedy], n, m) > kept_nm(x, n, m) else identity
    state = _Search(x, n, m, startperm)
    best_perm, best = state.ch.copy(), state.total()
    swaps = escapes = 0
    stopped = "converged"
    deadline = start + seconds
    while True:
        while True:  # steepest ascent
            if swaps >= max_swaps:
                stopped = "swap cap"
                break
            if time.perf_counter() > deadline:
                stopped = "time cap"
                break
            pair = state.best_swap(1e-9 * max(1.0, state.total()))
            if pair is None:
                break
            state.swap([pair])
            swaps += 1
        if state.total() > best:
            best, best_perm = state.total(), state.ch.copy()
        if stopped != "converged" or escapes >= max_escapes:
            break
        # escape: from the best order seen, ESCAPE_SWAPS random swaps between groups, then
        # ascend again
        if not np.array_equal(state.ch, best_perm):
            state = _Search(x, n, m, best_perm)
        pairs = []
        for _ in range(ESCAPE_SWAPS):
            s = int(rng.integers(c))
            t = int(rng.integers(c - m))
            pairs.append((s, t if t < (s // m) * m else t + m))
        state.swap(pairs)
        escapes += 1
    after = kept_nm(full[:, best_perm], n, m)
    if not after > before:
        best_perm, after = identity, before
    return PermutationResult(best_perm, before, after, total, swaps, escapes,
                             time.perf_counter() - start, sampled, stopped)
