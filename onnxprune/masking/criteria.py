"""Pruning criteria: an importance score for every element of a weight's ``W[out, in]`` view.

A :class:`Criterion` turns a 2-D weight into same-shape, non-negative scores (low = prune
first) and says how element scores fold into block and row scores (``reduce``). Criteria are
registered by name with :func:`register_criterion`; the CLI's ``--criterion`` choices come from
:func:`criterion_names`.

Scores are float32 for fp16/bf16/fp32 weights and float64 for float64 weights, computed in one
pass where possible (25M-element models are pruned at ``np.partition`` speed), and always
C-contiguous with ``+0.0`` for zero so :mod:`onnxprune.masking.scope` can bucket their bit patterns.

>>> w = np.array([[1.0, -3.0], [0.5, 2.0]], dtype=np.float16)
>>> get_criterion("magnitude").scores(w, ScoreContext("fc.weight"))
array([[1. , 3. ],
       [0.5, 2. ]], dtype=float32)
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Type

import numpy as np

from onnxprune.errors import OptionError

__all__ = ["ScoreContext", "Criterion", "get_criterion", "criterion_names",
           "register_criterion"]


@dataclass
class ScoreContext:
    """What a criterion may know about the weight besides its values."""

    weight_key: str
    seed: int = 0
    in_norms: Optional[np.ndarray] = None  # ||X_j||_2 per input column, from calibration
    user_scores: Optional[np.ndarray] = None  # already in the 2-D logical view


class Criterion(ABC):
    """Element importance for one weight; subclasses set ``name`` and ``reduce``."""

    name: str
    reduce: str = "l1"  # how element scores fold into block/row scores: "l1" or "l2"
    needs_activations: bool = False
    #: True for criteria that choose masks *and* update the kept weights in a pass of their
    #: own (SparseGPT): the pipeline runs that pass instead of score + mask.
    reconstructs: bool = False

    @abstractmethod
    def scores(self, w2d: np.ndarray, ctx: ScoreContext) -> np.ndarray:
        """Non-negative scores of ``w2d``'s shape (float32, or float64 for float64 weights)."""

    def __repr__(self) -> str:
        return f"<criterion {self.name}>"


_CRITERIA: Dict[str, Criterion] = {}


def register_criterion(cls: Type[Criterion]) -> Type[Criterion]:
    """Class decorator: make the criterion available under ``cls.name``."""
    _CRITERIA[cls.name] = cls()
    return cls


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``; OptionError listing the valid ones otherwise."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise OptionError(f"unknown criterion '{name}'; valid criteria: "
                          f"{', '.join(criterion_names())}") from None


def criterion_names() -> List[str]:
    return sorted(_CRITERIA)


def _score_dtype(w: np.ndarray) -> type:
    return np.float64 if w.dtype == np.float64 else np.float32


def _magnitude(w2d: np.ndarray) -> np.ndarray:
    # One pass: the cast to float32 happens inside abs (fp16/bf16 never get a float32 copy first).
    return np.abs(w2d, dtype=_score_dtype(w2d), order="C")


@register_criterion
class Magnitude(Criterion):
    """``|w|``; blocks and rows score by the sum (L1)."""

    name = "magnitude"

    def scores(self, w2d: np.ndarray, ctx: ScoreContext) -> np.ndarray:
        return _magnitude(w2d)


@register_criterion
class L2(Criterion):
    """``|w|``; blocks and rows score by the root of the sum of squares (L2 norm)."""

    name = "l2"
    reduce = "l2"

    def scores(self, w2d: np.ndarray, ctx: ScoreContext) -> np.ndarray:
        return _magnitude(w2d)


@register_criterion
class Random(Criterion):
    """Uniform random scores, a baseline.

    Seeded from ``(seed, crc32(weight_key))`` rather than one stream for the model, so a weight's
    scores do not depend on which other weights were selected or in what order.
    """

    name = "random"

    def scores(self, w2d: np.ndarray, ctx: ScoreContext) -> np.ndarray:
        if int(ctx.seed) < 0:
            raise OptionError(f"seed must be a non-negative integer, got {ctx.seed}")
        entropy = [int(ctx.seed), zlib.crc32(ctx.weight_key.encode("utf-8"))]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        return rng.random(w2d.shape, dtype=_score_dtype(w2d))


@register_criterion
class Wanda(Criterion):
    """``|w_ij| * ||X_j||_2`` (Sun et al., 2023): weights on loud inputs matter more."""

    name = "wanda"
    needs_activations = True

    def scores(self, w2d: np.ndarray, ctx: ScoreContext) -> np.ndarray:
        cols = w2d.shape[1]
        if ctx.in_norms is None:
            raise OptionError(f"criterion 'wanda' needs calibration data (input norms) for "
                              f"weight '{ctx.weight_key}'; pass --calibration")
        norms = np.asarray(ctx.in_norms).reshape(-1)
        if norms.size != cols:
            raise OptionError(f"input norms for weight '{ctx.weight_key}' have {norms.size} "
                              f"entries, its W[out, in] view has {cols} input columns")
        _check_values(norms, f"input norms for weight '{ctx.weight_key}'")
        out = _magnitude(w2d)
        out *= norms.astype(out.dtype, copy=False)[None, :]  # in place: no second full array
        return out


@register_criterion
class SparseGPT(Criterion):
    """OBS saliency ``w² / [H⁻¹]ⱼⱼ²`` with updates of the kept weights (Frantar & Alistarh,
    2023); masks and updates are made together, layer by layer toward the dense model, by
    :class:`onnxprune.passes.sequential.PruneSequentially`."""

    name = "sparsegpt"
    needs_activations = True
    reconstructs = True

    def scores(self, w2d: np.ndarray, ctx: ScoreContext) -> np.ndarray:
        raise OptionError("criterion 'sparsegpt' chooses masks inside its own pass (it updates "
                          "weights as it goes); use onnxprune.prune(..., criterion='sparsegpt') "
                          "or the PruneSequentially pass")


@register_criterion
class UserScores(Criterion):
    """Scores the user supplies per weight, already in the ``W[out, in]`` view."""

    name = "scores"

    def scores(self, w2d: np.ndarray, ctx: ScoreContext) -> np.ndarray:
        if ctx.user_scores is None:
            raise OptionError(f"criterion 'scores' needs user scores for weight "
                              f"'{ctx.weight_key}', and none were given")
        user = np.asarray(ctx.user_scores)
        if user.shape != w2d.shape:
            raise OptionError(f"user scores for weight '{ctx.weight_key}' have shape "
                              f"{user.shape}, its W[out, in] view is {w2d.shape}")
        if user.dtype.kind not in "biuf":
            raise OptionError(f"user scores for weight '{ctx.weight_key}' must be numbers, "
                              f"got dtype {user.dtype}")
        _check_values(user, f"user scores for weight '{ctx.weight_key}'")
        # abs() turns any -0.0 into +0.0 (scope buckets by bit pattern) and makes a copy the
        # caller's array can't alias.
        return np.abs(user, dtype=np.float64 if user.dtype == np.float64 else np.float32,
                      order="C")


def _check_values(values: np.ndarray, what: str) -> None:
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise OptionError(f"{what} contain NaN or infinity")
    if values.size and values.min() < 0:
        raise OptionError(f"{what} must be non-negative (found {values.min()})")
