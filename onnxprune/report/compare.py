"""Comparing a candidate model's outputs with a reference's.

Results are objects that carry the statistics and also answer yes/no
(:meth:`Comparison.passed`, with one tolerance or one per output), as Polygraphy's comparator
does; the report shows them and ``--max-error`` gates on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from onnxprune.inputs.signature import fmt_shape

_EPS = 1e-12  # keeps relative errors finite for all-zero references


@dataclass
class OutputStats:
    """How one output of a candidate model differs from the reference.

    * ``max_abs``: ``max |candidate - reference|``.
    * ``rel_error``: ``max_abs / max |reference|`` — the worst error as a fraction of the
      output's own scale; this is what :meth:`Comparison.passed` gates on (0 if both are all
      zero, ``inf`` if only the reference is).
    * ``mean_rel``: ``mean |candidate - reference| / (mean |reference| + 1e-12)`` — the typical
      error relative to the typical magnitude.
    * ``cosine``: cosine similarity of the flattened outputs (1.0 when both are all zero, 0.0
      when exactly one is).
    * ``top1_agreement``: fraction of positions whose argmax over the class axis agrees, for
      outputs that look like class scores (see :func:`class_axis`), else None. Informative,
      never gated.

    Statistics are computed in float64 over positions where both values are finite; positions
    where both hold the same inf/nan are equal. ``reason`` is set when the output cannot pass
    at all (missing, shape mismatch, a non-finite value where the reference is finite); its
    numeric fields are then ``inf``/``nan``.

    An output that is not a numeric tensor (strings from ``ai.onnx.ml`` nodes, a sequence, a
    map, a sequence of maps such as sklearn-onnx's ZipMap) cannot be measured by these
    statistics: it is compared by equality (``kind`` says what it is, ``equal`` the fraction of
    its elements that are equal), reported, and never gated by a tolerance; its numeric fields
    are ``nan`` and the aggregates over outputs leave it out.
    """

    name: str
    max_abs: float
    mean_rel: float
    cosine: float
    top1_agreement: Optional[float] = None
    rel_error: float = 0.0
    ref_scale: float = 0.0  # max |reference|
    shape: Tuple[int, ...] = ()
    candidate_shape: Optional[Tuple[int, ...]] = None
    reason: Optional[str] = None
    kind: str = "tensor"  # "tensor" (numeric) or what the non-numeric output is
    equal: Optional[float] = None  # non-numeric outputs: fraction of equal elements

    @property
    def numeric(self) -> bool:
        """True for a numeric tensor (the statistics apply); False for one compared by
        equality."""
        return self.kind == "tensor"

    @property
    def ok(self) -> bool:
        """True when the output was comparable (no ``reason``); says nothing about tolerance."""
        return self.reason is None

    def passed(self, max_error: float) -> bool:
        return self.reason is None and (not self.numeric or self.rel_error <= max_error)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape),
            "candidate_shape": None if self.candidate_shape is None else
            list(self.candidate_shape),
            "max_abs": _finite(self.max_abs), "rel_error": _finite(self.rel_error),
            "mean_rel": _finite(self.mean_rel), "cosine": _finite(self.cosine),
            "top1_agreement": _finite(self.top1_agreement),
            "ref_scale": _finite(self.ref_scale), "reason": self.reason,
            "kind": self.kind, "equal": self.equal,
        }


@dataclass
class Comparison:
    """Per-output statistics of a candidate model against a reference, answering yes/no too.

    >>> x = make_inputs(model)                                             # doctest: +SKIP
    >>> cmp = compare(run_model(model, x), run_model(pruned, x))           # doctest: +SKIP
    >>> cmp.passed(0.01), cmp.max_abs, cmp.worst_cosine                    # doctest: +SKIP
    (True, 0.0123, 0.99991)
    """

    outputs: List[OutputStats] = field(default_factory=list)
    extra_outputs: List[str] = field(default_factory=list)  # in candidate only: not compared

    def __getitem__(self, name: str) -> OutputStats:
        for stats in self.outputs:
            if stats.name == name:
                return stats
        raise KeyError(name)

    @property
    def max_abs(self) -> float:
        """Worst absolute error over all outputs (``inf`` if one could not be compared)."""
        return max((s.max_abs for s in self.outputs if s.numeric or not s.ok), default=0.0)

    @property
    def max_rel_error(self) -> float:
        """Worst :attr:`OutputStats.rel_error` over all outputs: the quantity that is gated."""
        return max((s.rel_error for s in self.outputs if s.numeric or not s.ok), default=0.0)

    @property
    def worst_cosine(self) -> float:
        """Lowest cosine over the comparable outputs (nan when none was comparable)."""
        cosines = [s.cosine for s in self.outputs if s.ok and s.numeric]
        if not cosines:
            return float("nan") if any(s.numeric or not s.ok for s in self.outputs) else 1.0
        return min(cosines)

    def passed(self, max_error: Union[float, Mapping[str, float]]) -> bool:
        """True when every output is comparable and its relative max error
        (``max |candidate - reference| / max |reference|``) is at most ``max_error``.

        ``max_error`` is one tolerance for all outputs, or a mapping ``{output name: tolerance}``
        (outputs not in the mapping use its ``"*"`` entry, else are not gated).
        """
        return not self.failures(max_error)

    def failures(self, max_error: Union[float, Mapping[str, float]]) -> List[str]:
        """One line per output that does not pass, saying why (empty when all pass)."""
        lines = []
        for stats in self.outputs:
            tol = tolerance_for(max_error, stats.name)
            if stats.reason is not None:
                lines.append(f"output '{stats.name}': {stats.reason}")
            elif stats.numeric and tol is not None and not stats.rel_error <= tol:
                lines.append(f"output '{stats.name}': relative max error {stats.rel_error:.3g} "
                             f"(max abs {stats.max_abs:.3g} on a scale of "
                             f"{stats.ref_scale:.3g}) exceeds {tol:g}")
        return lines

    @property
    def by_equality(self) -> List[OutputStats]:
        """The comparable outputs that are not numeric tensors (compared by equality only)."""
        return [s for s in self.outputs if s.ok and not s.numeric]

    def to_dict(self) -> dict:
        return {
            "max_abs": _finite(self.max_abs), "max_rel_error": _finite(self.max_rel_error),
            "worst_cosine": _finite(self.worst_cosine),
            "outputs": [s.to_dict() for s in self.outputs],
            "extra_outputs": list(self.extra_outputs),
        }


def tolerance_for(max_error: Union[float, Mapping[str, float]], name: str) -> Optional[float]:
    """The tolerance for output ``name``: ``max_error`` itself, or its entry for ``name`` (else
    its ``"*"`` entry) when it is a mapping; None means the output is not gated."""
    if isinstance(max_error, Mapping):
        value = max_error.get(name, max_error.get("*"))
        return None if value is None else float(value)
    return float(max_error)


def _finite(x: Optional[float]) -> Optional[float]:
    # JSON has no inf/nan; a failed output says why in its ``reason``.
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def class_axis(shape: Sequence[int], dtype: np.dtype) -> Optional[int]:
    """The class axis of an output that looks like class scores, else None.

    Rule: a floating-point output of rank 2 (``[batch, classes]``) or rank 3 (``[batch, seq,
    classes]``: language-model logits, CTC outputs) whose last axis has more than one element;
    the last axis holds the classes. Rank 4+ outputs (NCHW segmentation maps, feature maps) are
    ambiguous and get no top-1 statistic.
    """
    if np.dtype(dtype).kind != "f" or len(shape) not in (2, 3) or shape[-1] < 2:
        return None
    return len(shape) - 1


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
            ) -> Comparison:
    """Compare each reference output with the candidate output of the same name.

    See :class:`OutputStats` for the definitions; an output missing from ``candidate`` or of a
    different shape fails with a reason. Outputs only the candidate has are listed in
    ``extra_outputs`` and not compared.
    """
    stats = [_compare_one(name, ref, candidate.get(name)) for name, ref in reference.items()]
    extra = [k for k in candidate if k not in reference]
    return Comparison(stats, extra)


def _failed(name: str, shape, cand_shape, reason: str, kind: str = "tensor") -> OutputStats:
    inf, nan = float("inf"), float("nan")
    return OutputStats(name, max_abs=inf, mean_rel=inf, cosine=nan, top1_agreement=None,
                       rel_error=inf, ref_scale=nan, shape=tuple(shape),
                       candidate_shape=cand_shape, reason=reason, kind=kind)


def _numeric(value: Any) -> Optional[np.ndarray]:
    """``value`` as a numeric array (bool, integer, float, complex), else None (strings,
    objects, a ragged sequence, maps)."""
    if isinstance(value, dict):
        return None
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):  # a ragged sequence
        return None
    return arr if arr.dtype.kind in "biufc" else None


def kind_of(value: Any) -> str:
    """What an output value is, in words: ``"tensor"`` for a numeric tensor, else e.g.
    ``"string tensor"``, ``"map"``, ``"sequence of maps"``."""
    if isinstance(value, dict):
        return "map"
    if isinstance(value, (list, tuple)):
        inner = {kind_of(v) for v in value}
        if len(inner) == 1:
            sub = inner.pop()
            return "sequence of " + ("tensors" if sub == "tensor" else sub + "s")
        return "sequence"
    arr = np.asarray(value)
    if arr.dtype.kind in "biufc":
        return "tensor"
    if arr.dtype.kind in "US" or (arr.dtype.kind == "O" and arr.size and
                                  all(isinstance(v, (str, bytes)) for v in arr.flat)):
        return "string tensor"
    return "object tensor"


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of two output values of any kind (nan equals nan)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
                and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b)))
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        return False
    if x.dtype.kind in "fc" and y.dtype.kind in "fc":
        return bool(np.array_equal(x, y, equal_nan=True))
    try:
        return bool(np.all(x == y))
    except (TypeError, ValueError):
        return False


def _size(value: Any) -> Tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return (len(value),)
    if isinstance(value, dict):
        return (len(value),)
    return tuple(np.shape(value))


def _compare_by_equality(name: str, ref: Any, cand: Any) -> OutputStats:
    """A non-numeric output: the fraction of elements (tensor elements, sequence items, or
    the whole map) that are equal; not gated. A different kind or size cannot pass."""
    kind, ckind = kind_of(ref), kind_of(cand)
    shape, cshape = _size(ref), _size(cand)
    if ckind != kind:
        return _failed(name, shape, cshape, f"is a {ckind} where the reference has a {kind}",
                       kind)
    if cshape != shape:
        return _failed(name, shape, cshape, f"size {fmt_shape(cshape)} differs from the "
                       f"reference's {fmt_shape(shape)}", kind)
    if isinstance(ref, dict):
        equal = 1.0 if _equal(ref, cand) else 0.0
    elif isinstance(ref, (list, tuple)):
        equal = (float(np.mean([_equal(x, y) for x, y in zip(ref, cand)])) if ref else 1.0)
    else:
        x, y = np.asarray(ref), np.asarray(cand)
        try:
            same = np.asarray(x == y, dtype=bool).reshape(x.shape)
        except (TypeError, ValueError):
            same = np.array([_equal(p, q) for p, q in zip(x.flat, y.flat)], dtype=bool)
        equal = float(same.mean()) if same.size else 1.0
    nan = float("nan")
    return OutputStats(name, max_abs=nan, mean_rel=nan, cosine=nan, rel_error=nan,
                       ref_scale=nan, shape=shape, candidate_shape=cshape, kind=kind,
                       equal=equal)


def _compare_one(name: str, ref: Any, cand: Any) -> OutputStats:
    if cand is None:
        return _failed(name, _size(ref), None, "missing from the candidate's outputs",
                       "tensor" if _numeric(ref) is not None else kind_of(ref))
    ref_arr, cand_arr = _numeric(ref), _numeric(cand)
    if ref_arr is None or cand_arr is None:
        return _compare_by_equality(name, ref, cand)
    ref, cand = ref_arr, cand_arr
    if ref.shape != cand.shape:
        return _failed(name, ref.shape, tuple(cand.shape),
                       f"shape {fmt_shape(cand.shape)} differs from the reference's "
                       f"{fmt_shape(ref.shape)}")
    a = ref.astype(np.float64).ravel()
    b = cand.astype(np.float64).ravel()
    fa, fb = np.isfinite(a), np.isfinite(b)
    same_nonfinite = ~fa & ~fb & ((a == b) | (np.isnan(a) & np.isnan(b)))
    bad = ~(fa & fb) & ~same_nonfinite
    if bad.any():
        return _failed(name, ref.shape, tuple(cand.shape),
                       f"{int(bad.sum())} value(s) are inf/nan in one model but not the other")
    both = fa & fb
    a, b = a[both], b[both]
    diff = np.abs(a - b)
    max_abs = float(diff.max()) if diff.size else 0.0
    ref_scale = float(np.abs(a).max()) if a.size else 0.0
    if ref_scale > 0:
        rel_error = max_abs / ref_scale
    else:
        rel_error = 0.0 if max_abs == 0 else float("inf")
    mean_rel = float(diff.mean() / (np.abs(a).mean() + _EPS)) if diff.size else 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 and nb == 0:
        cosine = 1.0
    elif na == 0 or nb == 0:
        cosine = 0.0
    else:
        cosine = float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))
    top1 = None
    axis = class_axis(ref.shape, ref.dtype)
    if axis is not None and ref.size:
        top1 = float(np.mean(np.argmax(ref, axis=axis) == np.argmax(cand, axis=axis)))
    return OutputStats(name, max_abs=max_abs, mean_rel=mean_rel, cosine=cosine,
                       top1_agreement=top1, rel_error=rel_error, ref_scale=ref_scale,
                       shape=tuple(ref.shape), candidate_shape=tuple(cand.shape))
