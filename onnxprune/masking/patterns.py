"""Sparsity patterns: what gets zeroed together, on the logical view ``W[out, in]``.

A :class:`Pattern` cuts a 2-D weight into *units* (an element, an NxM block, a row), folds
element scores into one score per unit, and expands a per-unit prune decision back into an
element mask. Which units to prune is :mod:`onnxprune.masking.scope`'s job; N:M, whose sparsity is
fixed by the pattern itself, decides per group in :meth:`NM.local_mask`.

Each pattern kind registers a parser with :func:`register_pattern`; :func:`parse_pattern` tries
them in turn and :func:`pattern_help` lists their forms, so the CLI help never drifts.

>>> p = parse_pattern("2x1")
>>> w = np.array([[1., 2.], [3., 4.], [5., 6.]])
>>> p.local_mask(np.abs(w), w != 0, zeros_needed=2, reduce="l1").astype(int)
array([[0, 1],
       [0, 1],
       [1, 1]])
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from onnxprune.errors import PatternError
from onnxprune.masking.scope import select_units

__all__ = ["Pattern", "Unstructured", "Blocks", "NM", "Channel", "parse_pattern",
           "pattern_help", "register_pattern"]

Shape2D = Tuple[int, int]
_REDUCES = ("l1", "l2")


class Pattern(ABC):
    """How one weight's elements group into units that are pruned together.

    Units come in a fixed order (row-major over blocks) shared by :meth:`unit_scores`,
    :meth:`unit_counts` and :meth:`expand`; scope breaks score ties by that order.
    """

    spec: str  # canonical text, e.g. "unstructured", "4x1", "2:4", "channel"
    implied_sparsity: Optional[float] = None  # set by patterns that fix the sparsity (N:M)

    @abstractmethod
    def unit_scores(self, scores2d: np.ndarray, reduce: str) -> np.ndarray:
        """One score per unit: ``"l1"`` sums element scores, ``"l2"`` takes the root of squares."""

    @abstractmethod
    def unit_counts(self, nonzero2d: np.ndarray) -> np.ndarray:
        """Number of currently non-zero elements in each unit."""

    @abstractmethod
    def expand(self, unit_prune: np.ndarray, shape2d: Shape2D) -> np.ndarray:
        """Per-unit prune flags (True = pruned) -> element KEEP mask of ``shape2d``."""

    def local_mask(self, scores2d: np.ndarray, nonzero2d: np.ndarray, zeros_needed: int,
                   reduce: str) -> np.ndarray:
        """KEEP mask for one weight: the lowest-scored units go until ``zeros_needed`` new zeros.

        The mask is True exactly where the weight stays non-zero (``& nonzero2d``), so its
        False count is the number of zeros after pruning.
        """
        prune = select_units(self.unit_scores(scores2d, reduce), self.unit_counts(nonzero2d),
                             zeros_needed)
        return self.expand(prune, scores2d.shape) & nonzero2d

    def __str__(self) -> str:
        return self.spec


# -- registry -----------------------------------------------------------------------------

Parser = Callable[[re.Match], "Pattern"]
_PARSERS: List[Tuple[re.Pattern, str, Parser]] = []


def register_pattern(regex: str, form: str) -> Callable[[Parser], Parser]:
    """Decorator: ``parser(match)`` builds a Pattern for specs fully matching ``regex``.

    ``form`` is the one-line description shown in :func:`pattern_help`.
    """

    def deco(parser: Parser) -> Parser:
        _PARSERS.append((re.compile(regex), form, parser))
        return parser

    return deco


def parse_pattern(spec: str) -> Pattern:
    """The Pattern for ``spec`` (case and surrounding spaces ignored); PatternError if invalid."""
    text = str(spec).strip().lower()
    for regex, _, parser in _PARSERS:
        match = regex.fullmatch(text)
        if match:
            return parser(match)
    raise PatternError(f"unknown pattern '{spec}'; {pattern_help()}")


def pattern_help() -> str:
    """One line listing the accepted pattern forms."""
    return "valid patterns: " + "; ".join(form for _, form, _ in _PARSERS)


def _bad(spec: str, why: str) -> PatternError:
    return PatternError(f"invalid pattern '{spec}': {why}; {pattern_help()}")


# -- reductions shared by block-like patterns ------------------------------------------------

def _check_reduce(reduce: str) -> None:
    if reduce not in _REDUCES:
        raise ValueError(f"reduce must be one of {_REDUCES}, got {reduce!r}")


def _block_sums(values: np.ndarray, rows: int, cols: int, dtype) -> np.ndarray:
    """Sums over ``rows x cols`` blocks; ragged edge blocks are smaller, never dropped."""
    r, c = values.shape
    out = values
    if rows > 1 and r:
        # Rows by reshape (reduceat along axis 0 is several times slower), the ragged tail apart.
        full = r - r % rows
        out = values[:full].reshape(full // rows, rows, c).sum(axis=1, dtype=dtype)
        if full < r:
            tail = values[full:].sum(axis=0, dtype=dtype, keepdims=True)
            out = np.concatenate([out, tail])
    if cols > 1 and c:
        out = np.add.reduceat(out, np.arange(0, c, cols), axis=1, dtype=dtype)
    return out.astype(dtype, copy=False)


def _reduce_blocks(scores2d: np.ndarray, rows: int, cols: int, reduce: str) -> np.ndarray:
    # Float64 sums: a channel's L1 over 100k+ elements would lose ties and order in float32.
    _check_reduce(reduce)
    if reduce == "l1":
        return _block_sums(scores2d, rows, cols, np.float64).reshape(-1)
    squares = np.square(scores2d, dtype=np.float64)
    return np.sqrt(_block_sums(squares, rows, cols, np.float64)).reshape(-1)


# -- the patterns ---------------------------------------------------------------------------

class _Elementwise(Pattern):
    """Patterns whose units are single elements, in row-major order."""

    def unit_scores(self, scores2d: np.ndarray, reduce: str) -> np.ndarray:
        _check_reduce(reduce)
        return np.ascontiguousarray(scores2d).reshape(-1)  # a view: no copy of big layers

    def unit_counts(self, nonzero2d: np.ndarray) -> np.ndarray:
        counts = np.ascontiguousarray(nonzero2d).reshape(-1)
        return counts.view(np.uint8) if counts.dtype == bool else counts

    def expand(self, unit_prune: np.ndarray, shape2d: Shape2D) -> np.ndarray:
        return ~np.asarray(unit_prune, dtype=bool).reshape(shape2d)


@dataclass(frozen=True)
class Unstructured(_Elementwise):
    """Any element on its own (``unstructured`` or ``1x1``)."""

    @property
    def spec(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class Blocks(Pattern):
    """``rows`` consecutive output rows x ``cols`` consecutive input columns zeroed together."""

    rows: int
    cols: int

    @property
    def spec(self) -> str:
        return f"{self.rows}x{self.cols}"

    def unit_scores(self, scores2d: np.ndarray, reduce: str) -> np.ndarray:
        return _reduce_blocks(scores2d, self.rows, self.cols, reduce)

    def unit_counts(self, nonzero2d: np.ndarray) -> np.ndarray:
        return _block_sums(nonzero2d, self.rows, self.cols, np.int64).reshape(-1)

    def expand(self, unit_prune: np.ndarray, shape2d: Shape2D) -> np.ndarray:
        r, c = shape2d
        keep = ~np.asarray(unit_prune, dtype=bool).reshape(-(-r // self.rows), -(-c // self.cols))
        # min(): a block taller or wider than the weight is one block, cut to the weight's size.
        keep = np.repeat(keep, min(self.rows, r), axis=0)[:r]
        return np.repeat(keep, min(self.cols, c), axis=1)[:, :c]


@dataclass(frozen=True)
class Channel(Pattern):
    """Whole output channels (rows of ``W[out, in]``), for physical removal later."""

    @property
    def spec(self) -> str:
        return "channel"

    def unit_scores(self, scores2d: np.ndarray, reduce: str) -> np.ndarray:
        return _reduce_blocks(scores2d, 1, max(scores2d.shape[1], 1), reduce)

    def unit_counts(self, nonzero2d: np.ndarray) -> np.ndarray:
        return np.count_nonzero(nonzero2d, axis=1).astype(np.int64)

    def expand(self, unit_prune: np.ndarray, shape2d: Shape2D) -> np.ndarray:
        keep = ~np.asarray(unit_prune, dtype=bool).reshape(-1, 1)
        return np.broadcast_to(keep, shape2d).copy()


@dataclass(frozen=True)
class NM(_Elementwise):
    """At most ``n`` non-zeros in every ``m`` consecutive input elements of a row.

    This is the layout sparse tensor-core kernels read, so the sparsity is the pattern's own
    (``1 - n/m``); a ragged tail group of ``r < m`` elements keeps at most ``min(n, r)``. Units
    are single elements; :meth:`local_mask` ignores ``zeros_needed`` and keeps the top ``n``
    scores of each group, pruning already-zero elements first and ties from the left.
    """

    n: int
    m: int

    @property
    def spec(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def implied_sparsity(self) -> float:  # type: ignore[override]
        return 1.0 - self.n / self.m

    def local_mask(self, scores2d: np.ndarray, nonzero2d: np.ndarray, zeros_needed: int,
                   reduce: str) -> np.ndarray:
        _check_reduce(reduce)
        r, c = scores2d.shape
        groups = -(-c // self.m)
        dtype = np.float64 if scores2d.dtype == np.float64 else np.float32
        # Rank key: score for non-zeros, -1 below any score for zeros, -2 for the padding that
        # fills a ragged tail, so padding is "pruned" first and the tail keeps min(n, r) reals.
        key = np.full((r, groups * self.m), -2.0, dtype=dtype)
        key[:, :c] = np.where(nonzero2d, scores2d, dtype(-1.0))
        keep = _group_ranks(key.reshape(r, groups, self.m)) >= self.m - self.n
        return keep.reshape(r, groups * self.m)[:, :c] & nonzero2d


def _group_ranks(keys: np.ndarray) -> np.ndarray:
    """Each element's position in its group's ascending (key, index) order, along the last axis."""
    m = keys.shape[-1]
    if m > 8:
        order = np.argsort(keys, axis=-1, kind="stable")
        ranks = np.empty(keys.shape, dtype=np.int64)
        np.put_along_axis(ranks, order, np.arange(m), axis=-1)
        return ranks
    # Small groups: m*(m-1) vectorized comparisons beat a per-group sort several times over.
    ranks = np.zeros(keys.shape, dtype=np.int8)
    for i in range(m):
        rank_i, key_i = ranks[..., i], keys[..., i]
        for j in range(m):
            if j != i:  # an equal key to the left comes first
                rank_i += keys[..., j] <= key_i if j < i else keys[..., j] < key_i
    return ranks


# -- parsers (tried in registration order) ----------------------------------------------------

@register_pattern(r"unstructured", "unstructured (or 1x1): any element")
def _parse_unstructured(match: re.Match) -> Pattern:
    return Unstructured()


@register_pattern(r"(-?\d+)x(-?\d+)",
                  "NxM: blocks of N output rows x M input columns, e.g. 4x1, 1x4, 2x2")
def _parse_blocks(match: re.Match) -> Pattern:
    rows, cols = int(match[1]), int(match[2])
    if rows < 1 or cols < 1:
        raise _bad(match[0], "block sizes must be at least 1")
    return Unstructured() if rows == cols == 1 else Blocks(rows, cols)


@register_pattern(r"(-?\d+):(-?\d+)",
                  "N:M: at most N non-zeros in every M input elements, e.g. 2:4, 1:4, 4:8")
def _parse_nm(match: re.Match) -> Pattern:
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m:
        raise _bad(match[0], "N:M needs 1 <= N < M")
    return NM(n, m)


@register_pattern(r"channel", "channel: whole output channels")
def _parse_channel(match: re.Match) -> Pattern:
    return Channel()
