"""Comparing a candidate model's outputs with a reference's, over many samples, with a verdict.

Each output is measured by what fits it (:func:`metric_of`):

* **class scores** (a classifier's ``[batch, classes]``, an LM's ``[batch, positions, vocab]``,
  a Softmax output): agreement of the argmax over the class axis, per sample and per position,
  and top-5 agreement (the reference's class among the candidate's five best); cosine and
  relative error are shown too;
* **dense** float tensors (features, boxes, maps): cosine similarity and relative error;
* **exact** integer, bool, string outputs and sequences/maps: the fraction of equal elements;
* **scalar** outputs (one value per sample or fewer): the relative difference of the values —
  a cosine of single numbers means nothing, so none is given.

Statistics stream: :class:`Comparer` takes one batch of outputs at a time, so validation holds
one batch in memory whatever the number of samples. :class:`Thresholds` turn the fitting
measure into a verdict per output — ``ok``, ``degraded`` or ``broken`` — with documented,
overridable defaults; on generated inputs an ``ok`` is reported as ``unverified`` (the outputs
moved little on random inputs, which says nothing of accuracy on real data: a recognizer can
agree 99 % on noise and read no character right). Results are objects that also answer yes/no (:meth:`Comparison.passed`
for ``--max-error``, :attr:`Comparison.worst_agreement` for ``--min-agreement``), as
Polygraphy's comparator does.

One module (about 690 lines) on purpose: every measure, its streaming accumulation and its
verdict are read together (a measure without its verdict rule would be half a definition).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from onnxprune.errors import OptionError
from onnxprune.inputs.signature import fmt_shape

_EPS = 1e-12  # keeps relative errors finite for all-zero references
# Worst last. ``unverified``: within the ``ok`` thresholds, but on generated inputs, which
# cannot show accuracy (a model can stay close on noise and fail on real data).
VERDICTS = ("ok", "unverified", "degraded", "broken")


@dataclass(frozen=True)
class Thresholds:
    """When an output is ``ok``, ``degraded`` or ``broken``: ``(ok at or past, degraded at or
    past)`` per measure; past the second it is broken.

    * ``agreement``: top-1 agreement of class scores (higher is better): 0.99 / 0.90;
    * ``cosine``: cosine similarity of dense tensors (higher is better): 0.99 / 0.90;
    * ``equal``: fraction of equal elements of exact outputs (higher is better): 0.99 / 0.90;
    * ``scalar``: relative difference of scalar outputs (lower is better): 0.01 / 0.10.

    An output that cannot match at all (missing, another shape, inf/nan where the reference is
    finite) is broken whatever the thresholds. CLI: ``--verdict agreement=0.98/0.8,cosine=...``.
    """

    agreement: Tuple[float, float] = (0.99, 0.90)
    cosine: Tuple[float, float] = (0.99, 0.90)
    equal: Tuple[float, float] = (0.99, 0.90)
    scalar: Tuple[float, float] = (0.01, 0.10)

    @classmethod
    def parse(cls, spec: Union[None, str, Mapping[str, Any], "Thresholds"]) -> "Thresholds":
        """From ``"agreement=0.98/0.8,cosine=0.995/0.95"``, a mapping of the same, or None
        (the defaults). Raises :class:`OptionError` naming a bad piece."""
        if spec is None or isinstance(spec, Thresholds):
            return spec or cls()
        items = spec.items() if isinstance(spec, Mapping) else [
            piece.split("=", 1) if "=" in piece else (piece, None)
            for piece in str(spec).replace(" ", "").split(",") if piece]
        values = asdict(cls())
        for key, value in items:
            if key not in values:
                raise OptionError(f"--verdict: unknown measure '{key}'; measures are "
                                  f"{', '.join(values)} (e.g. agreement=0.99/0.9)")
            try:
                pair = (tuple(float(v) for v in value.split("/")) if isinstance(value, str)
                        else tuple(float(v) for v in value))
            except (TypeError, ValueError, AttributeError):
                pair = ()
            lower = key == "scalar"
            if (len(pair) != 2 or not all(0 <= v <= (math.inf if lower else 1) for v in pair)
                    or (pair[0] > pair[1] if lower else pair[0] < pair[1])):
                order = "ok <= degraded" if lower else "ok >= degraded, both in [0, 1]"
                raise OptionError(f"--verdict: '{key}' needs two numbers OK/DEGRADED ({order}), "
                                  f"got {value!r}")
            values[key] = pair
        return cls(**values)

    def describe(self, measure: str) -> str:
        """The thresholds of ``measure`` in words, e.g. ``ok >= 99%, degraded >= 90%``."""
        ok, degraded = getattr(self, measure)
        if measure == "scalar":
            return f"ok <= {ok:g}, degraded <= {degraded:g}"
        return f"ok >= {100 * ok:g}%, degraded >= {100 * degraded:g}%"

    def judge(self, measure: str, value: Optional[float]) -> str:
        """The verdict of ``value`` on ``measure`` (a field name)."""
        ok, degraded = getattr(self, measure)
        if value is None or math.isnan(value):
            return "broken"
        if measure == "scalar":
            return "ok" if value <= ok else "degraded" if value <= degraded else "broken"
        return "ok" if value >= ok else "degraded" if value >= degraded else "broken"


# The measure each metric's verdict reads, and the OutputStats field holding it.
_VERDICT_MEASURE = {"class scores": ("agreement", "top1_agreement"),
                    "dense": ("cosine", "cosine"), "exact": ("equal", "equal"),
                    "scalar": ("scalar", "rel_error")}


def _verdict_measure(metric: str, generated: bool) -> Tuple[str, str]:
    """The measure a verdict reads: on generated inputs class scores are judged by cosine, since
    random inputs give near-tied scores whose argmax flips under the slightest change (a digits
    CNN 10 % pruned: top-1 agreement 75 % on noise at cosine 0.9998, 100 % on real digits)."""
    if generated and metric == "class scores":
        return _VERDICT_MEASURE["dense"]
    return _VERDICT_MEASURE[metric]


@dataclass
class OutputStats:
    """How one output of a candidate model differs from the reference, over ``samples``.

    * ``metric``: ``"class scores"``, ``"dense"``, ``"exact"`` or ``"scalar"`` (see the module).
    * ``max_abs``: ``max |candidate - reference|``.
    * ``rel_error``: ``max_abs / max |reference|`` — the worst error as a fraction of the
      output's own scale; what ``--max-error`` gates on (0 if both are all zero, ``inf`` if only
      the reference is). For scalars, the worst ``|candidate - reference| / |reference|``.
    * ``mean_rel``: ``mean |candidate - reference| / (mean |reference| + 1e-12)``.
    * ``cosine``: cosine similarity of the flattened outputs (1.0 when both are all zero, 0.0
      when exactly one is); None for scalar and exact outputs.
    * ``top1_agreement`` / ``top5_agreement``: class scores only — the fraction of
      ``positions`` (samples × sequence positions) whose argmax agrees / whose reference argmax
      is among the candidate's five best (None with five classes or fewer).
    * ``equal``: exact outputs — the fraction of equal elements (sequence items, maps).
    * ``verdict`` (``ok``/``degraded``/``broken``) and ``verdict_reason``, from
      :class:`Thresholds`.

    Statistics are computed in float64 over positions where both values are finite; positions
    where both hold the same inf/nan are equal. ``reason`` is set when the output cannot pass
    at all (missing, shape mismatch, a non-finite value where the reference is finite); its
    numeric fields are then ``inf``/``nan`` and its verdict ``broken``.
    """

    name: str
    max_abs: float
    mean_rel: float
    cosine: Optional[float]
    top1_agreement: Optional[float] = None
    rel_error: float = 0.0
    ref_scale: float = 0.0  # max |reference|
    shape: Tuple[int, ...] = ()
    candidate_shape: Optional[Tuple[int, ...]] = None
    reason: Optional[str] = None
    kind: str = "tensor"  # "tensor" (numeric) or what the non-numeric output is
    equal: Optional[float] = None  # exact outputs: fraction of equal elements
    metric: str = "dense"
    top5_agreement: Optional[float] = None
    samples: int = 0
    positions: int = 0  # argmax positions (class scores) or elements compared
    verdict: str = "ok"
    verdict_reason: str = ""
    #: per-position class scores dominated by one class (CTC blank, background):
    #: ``(class, its share of the reference's positions, top1_agreement counted where either
    #: argmax is another class — what top1_agreement then holds —, agreement over all)``
    background: Optional[Tuple[int, float, float, float]] = None

    @property
    def numeric(self) -> bool:
        """True for a numeric tensor (errors apply); False for one compared by equality only."""
        return self.kind == "tensor"

    @property
    def ok(self) -> bool:
        """True when the output was comparable (no ``reason``); says nothing about tolerance."""
        return self.reason is None

    @property
    def gated(self) -> bool:
        """Whether ``--max-error`` measures this output (float tensors; not exact outputs)."""
        return self.numeric and self.metric != "exact"

    def passed(self, max_error: float) -> bool:
        return self.reason is None and (not self.gated or self.rel_error <= max_error)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape),
            "candidate_shape": None if self.candidate_shape is None else
            list(self.candidate_shape),
            "metric": self.metric, "samples": self.samples, "positions": self.positions,
            "max_abs": _finite(self.max_abs), "rel_error": _finite(self.rel_error),
            "mean_rel": _finite(self.mean_rel), "cosine": _finite(self.cosine),
            "top1_agreement": _finite(self.top1_agreement),
            "top5_agreement": _finite(self.top5_agreement),
            "ref_scale": _finite(self.ref_scale), "reason": self.reason,
            "kind": self.kind, "equal": self.equal,
            "verdict": self.verdict, "verdict_reason": self.verdict_reason,
            "background": None if self.background is None else {
                "class": self.background[0], "share": self.background[1],
                "top1_agreement_all_positions": self.background[3]},
        }


@dataclass
class Comparison:
    """Per-output statistics of a candidate model against a reference, answering yes/no too.

    ``samples`` counts the samples compared; ``data`` says what they were (``"inputs"``: the
    user's ``--inputs``; ``"held-out"``: calibration samples kept out of the statistics;
    ``"generated"``: random inputs from the signature — not an accuracy estimate) and
    ``data_note`` says it in words.

    >>> x = make_inputs(model)                                             # doctest: +SKIP
    >>> cmp = compare(run_model(model, x), run_model(pruned, x))           # doctest: +SKIP
    >>> cmp.passed(0.01), cmp.max_abs, cmp.worst_cosine, cmp.verdict        # doctest: +SKIP
    (True, 0.0123, 0.99991, 'ok')
    """

    outputs: List[OutputStats] = field(default_factory=list)
    extra_outputs: List[str] = field(default_factory=list)  # in candidate only: not compared
    samples: int = 0
    data: str = "given"
    data_note: str = ""
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __getitem__(self, name: str) -> OutputStats:
        for stats in self.outputs:
            if stats.name == name:
                return stats
        raise KeyError(name)

    @property
    def data_brief(self) -> str:
        """The samples in a few words (``data_note`` up to its explanation)."""
        return self.data_note.split(":")[0]

    @property
    def accuracy_estimate(self) -> bool:
        """Whether the figures speak for the model on real data (False for generated inputs)."""
        return self.data != "generated"

    @property
    def verdict(self) -> str:
        """The worst output verdict (``ok`` when there is no output)."""
        return max((s.verdict for s in self.outputs), key=VERDICTS.index, default="ok")

    def threshold_lines(self) -> List[str]:
        """The thresholds of the measures the outputs were judged by, one line each."""
        generated = self.data == "generated"
        measures = dict.fromkeys(_verdict_measure(s.metric, generated)[0] for s in self.outputs
                                 if s.reason is None)
        return [f"{_MEASURE_WORDS[m]}: {self.thresholds.describe(m)}" for m in measures]

    @property
    def max_abs(self) -> float:
        """Worst absolute error over the gated outputs (``inf`` if one could not be compared)."""
        return max((s.max_abs for s in self.outputs if s.gated or not s.ok), default=0.0)

    @property
    def max_rel_error(self) -> float:
        """Worst :attr:`OutputStats.rel_error` over the gated outputs: what ``--max-error``
        gates."""
        return max((s.rel_error for s in self.outputs if s.gated or not s.ok), default=0.0)

    @property
    def worst_cosine(self) -> float:
        """Lowest cosine over the comparable outputs that have one (nan when an output could
        not be compared and none has a cosine; 1.0 when no output has one)."""
        cosines = [s.cosine for s in self.outputs if s.ok and s.cosine is not None]
        if not cosines:
            return float("nan") if any(not s.ok for s in self.outputs) else 1.0
        return min(cosines)

    @property
    def worst_agreement(self) -> Optional[float]:
        """Lowest top-1 agreement over the class-score outputs (0.0 when one of them could not
        be compared); None when no output holds class scores — what ``--min-agreement`` gates."""
        values = [s.top1_agreement if s.ok else 0.0 for s in self.outputs
                  if s.metric == "class scores"]
        return min(values) if values else None

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
            elif stats.gated and tol is not None and not stats.rel_error <= tol:
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
            "samples": self.samples, "data": self.data, "data_note": self.data_note,
            "accuracy_estimate": self.accuracy_estimate, "verdict": self.verdict,
            "thresholds": {k: list(v) for k, v in asdict(self.thresholds).items()},
            "max_abs": _finite(self.max_abs), "max_rel_error": _finite(self.max_rel_error),
            "worst_cosine": _finite(self.worst_cosine),
            "worst_agreement": _finite(self.worst_agreement),
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
    """The class axis of an output that looks like class scores by its shape alone, else None.

    Rule: a floating-point output of rank 2 (``[batch, classes]``) or rank 3 (``[batch, seq,
    classes]``: language-model logits, CTC outputs) whose last axis has more than one element.
    Used when no model is at hand; :func:`onnxprune.passes.validate.class_axes` decides from
    the op that produces each output instead (a Softmax's axis, a linear head's features; a
    detector's ``[1, 84, 8400]`` Concat is not class scores, whatever its rank).
    """
    if np.dtype(dtype).kind != "f" or len(shape) not in (2, 3) or shape[-1] < 2:
        return None
    return len(shape) - 1


def metric_of(value: Any, axis: Optional[int], samples: int) -> str:
    """The measure that fits an output value (see the module): ``axis`` is its class axis
    (None: not class scores), ``samples`` the samples in the batch that produced it."""
    arr = _numeric(value)
    if arr is None or arr.dtype.kind in "biu":
        return "exact"
    if arr.size <= max(samples, 1):
        return "scalar"
    if axis is not None and -arr.ndim <= axis < arr.ndim and arr.shape[axis] > 1:
        return "class scores"
    return "dense"


class _Stream:
    """Running sums for one output over batches."""

    def __init__(self, name: str, axis: Optional[int]) -> None:
        self.name, self.axis = name, axis
        self.failed: Optional[OutputStats] = None
        self.metric = self.kind = None
        self.shape: Tuple[int, ...] = ()
        self.samples = self.positions = 0
        self.max_abs = self.ref_scale = self.worst_rel = 0.0
        self.sum_diff = self.sum_ref = self.dot = self.na = self.nb = 0.0
        self.top1 = self.top5 = 0
        # per class: reference argmax count, and positions where both models' argmax is it
        self.ref_counts: Optional[np.ndarray] = None
        self.per_position = False
        self.both_counts: Optional[np.ndarray] = None
        self.equal = self.elements = 0
        self.five = True

    def add(self, ref: Any, cand: Any, samples: int) -> None:
        if self.failed is not None:
            return
        if self.metric is None:
            self.metric = metric_of(ref, self.axis, samples)
            self.kind = "tensor" if _numeric(ref) is not None else kind_of(ref)
            self.shape = _size(ref)
        self.samples += samples
        failure = self._mismatch(ref, cand)
        if failure is None:
            if self.metric == "exact":
                self._add_equal(ref, cand)
            else:
                failure = self._add_numeric(np.asarray(ref), np.asarray(cand), samples)
        if failure is not None:
            self.failed = _failed(self.name, _size(ref), _size(cand) if cand is not None
                                  else None, failure, self.kind, self.metric)

    def _mismatch(self, ref: Any, cand: Any) -> Optional[str]:
        if cand is None:
            return "missing from the candidate's outputs"
        rkind, ckind = kind_of(ref), kind_of(cand)
        if rkind != ckind:
            return f"is a {ckind} where the reference has a {rkind}"
        if _size(ref) != _size(cand):
            word = "shape" if rkind == "tensor" else "size"
            return (f"{word} {fmt_shape(_size(cand))} differs from the reference's "
                    f"{fmt_shape(_size(ref))}")
        return None

    def _add_equal(self, ref: Any, cand: Any) -> None:
        if isinstance(ref, dict):
            same, n = int(_equal(ref, cand)), 1
        elif isinstance(ref, (list, tuple)):
            same, n = sum(_equal(x, y) for x, y in zip(ref, cand)), len(ref)
        else:
            x, y = np.asarray(ref), np.asarray(cand)
            try:
                eq = np.asarray(x == y, dtype=bool).reshape(x.shape)
            except (TypeError, ValueError):
                eq = np.array([_equal(p, q) for p, q in zip(x.flat, y.flat)], dtype=bool)
            if x.dtype.kind in "fc":
                eq |= np.isnan(x) & np.isnan(y)
            same, n = int(eq.sum()), int(eq.size)
            if x.dtype.kind in "biu":  # integers: the size of the worst difference, for the record
                diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
                if diff.size:
                    self.max_abs = max(self.max_abs, float(diff.max()))
                    self.ref_scale = max(self.ref_scale, float(np.abs(x).max()))
        self.equal += same
        self.elements += n

    def _add_numeric(self, ref: np.ndarray, cand: np.ndarray, samples: int) -> Optional[str]:
        """Accumulate one batch; the reason it cannot be compared (a value inf/nan in one model
        but not the other) instead, with nothing accumulated."""
        a = ref.astype(np.float64)
        b = cand.astype(np.float64)
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        both = finite_a & finite_b
        same_nonfinite = ~finite_a & ~finite_b & ((a == b) | (np.isnan(a) & np.isnan(b)))
        bad = int((~both & ~same_nonfinite).sum())
        if bad:
            return f"{bad} value(s) are inf/nan in one model but not the other"
        fa, fb = a[both], b[both]
        diff = np.abs(fa - fb)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.ref_scale = max(self.ref_scale, float(np.abs(fa).max()))
        self.sum_diff += float(diff.sum())
        self.sum_ref += float(np.abs(fa).sum())
        self.elements += int(diff.size)
        if self.metric == "scalar":
            rel = diff / np.maximum(np.abs(fa), _EPS)
            rel[(diff == 0)] = 0.0
            if rel.size:
                self.worst_rel = max(self.worst_rel, float(rel.max()))
            return None
        self.dot += float(np.dot(fa, fb))
        self.na += float(np.dot(fa, fa))
        self.nb += float(np.dot(fb, fb))
        if self.metric == "class scores" and ref.size:
            axis = self.axis % ref.ndim
            top_ref = np.argmax(ref, axis=axis)
            same = top_ref == np.argmax(cand, axis=axis)
            self.top1 += int(same.sum())
            self.positions += int(top_ref.size)
            classes = ref.shape[axis]
            self.per_position = ref.ndim >= 3  # [batch, positions..., classes] and the like
            if self.ref_counts is None:
                self.ref_counts = np.zeros(classes, np.int64)
                self.both_counts = np.zeros(classes, np.int64)
            self.ref_counts += np.bincount(top_ref.ravel(), minlength=classes)
            self.both_counts += np.bincount(top_ref[same].ravel(), minlength=classes)
            if classes > 5:
                best5 = np.argpartition(-cand, 4, axis=axis).take(range(5), axis=axis)
                self.top5 += int((best5 == np.expand_dims(top_ref, axis)).any(axis=axis).sum())
            else:
                self.five = False
        return None

    def result(self, thresholds: Thresholds, generated: bool = False) -> OutputStats:
        if self.failed is not None:
            stats = self.failed
            stats.samples = self.samples
            stats.verdict, stats.verdict_reason = "broken", stats.reason
            return stats
        nan = float("nan")
        metric = self.metric or "dense"
        if metric == "exact":
            equal = self.equal / self.elements if self.elements else 1.0
            numeric = self.kind == "tensor"
            stats = OutputStats(self.name, max_abs=self.max_abs if numeric else nan,
                                mean_rel=nan, cosine=None, rel_error=nan,
                                ref_scale=self.ref_scale if numeric else nan, shape=self.shape,
                                candidate_shape=self.shape, kind=self.kind, equal=equal,
                                metric=metric, samples=self.samples, positions=self.elements)
        else:
            if self.ref_scale > 0:
                rel_error = self.max_abs / self.ref_scale
            else:
                rel_error = 0.0 if self.max_abs == 0 else float("inf")
            if metric == "scalar":
                rel_error = self.worst_rel
            mean_rel = self.sum_diff / (self.sum_ref + _EPS) if self.elements else 0.0
            cosine = None
            if metric != "scalar":
                na, nb = math.sqrt(self.na), math.sqrt(self.nb)
                cosine = (1.0 if na == 0 and nb == 0 else 0.0 if na == 0 or nb == 0
                          else float(np.clip(self.dot / (na * nb), -1.0, 1.0)))
            top1 = top5 = None
            background = None
            if metric == "class scores" and self.positions:
                top1 = self.top1 / self.positions
                top5 = self.top5 / self.positions if self.five else None
                background = self._background(top1)
                if background is not None:
                    top1 = background[2]
            stats = OutputStats(self.name, max_abs=self.max_abs, mean_rel=mean_rel,
                                cosine=cosine, top1_agreement=top1, rel_error=rel_error,
                                ref_scale=self.ref_scale, shape=self.shape,
                                candidate_shape=self.shape, metric=metric,
                                top5_agreement=top5, samples=self.samples,
                                positions=self.positions if top1 is not None else self.elements)
            stats.background = background
        _judge(stats, thresholds, generated)
        return stats

    def _background(self, overall: float) -> Optional[Tuple[int, float, float, float]]:
        """For per-position class scores (a CTC recognizer's blanks, a segmentation's
        background) where one class is the reference's argmax at half the positions or more:
        ``(class, its share, agreement where either model's argmax is another class, overall
        agreement)``. Agreement over every position would count the easy class (a recognizer
        that outputs only blanks agrees wherever the reference has one); None otherwise."""
        if self.ref_counts is None or not self.per_position:
            return None  # one position per sample: a classifier's agreement is the measure
        c = int(np.argmax(self.ref_counts))
        share = float(self.ref_counts[c]) / self.positions
        rest = self.positions - int(self.both_counts[c])
        if share < 0.5 or rest <= 0:
            return None
        return c, share, (self.top1 - int(self.both_counts[c])) / rest, overall


_MEASURE_WORDS = {"agreement": "top-1 agreement", "cosine": "cosine",
                  "equal": "equal elements", "scalar": "relative difference"}


def _judge(stats: OutputStats, thresholds: Thresholds, generated: bool = False) -> None:
    measure, attr = _verdict_measure(stats.metric, generated)
    value = getattr(stats, attr)
    stats.verdict = thresholds.judge(measure, value)
    if value is None:
        shown = "n/a"
    else:
        shown = f"{value:.3g}" if measure == "scalar" else f"{100 * value:.1f}%"
    stats.verdict_reason = f"{_MEASURE_WORDS[measure]} {shown} ({thresholds.describe(measure)})"
    if measure == "agreement" and stats.background is not None:
        c, share, _, overall = stats.background
        stats.verdict_reason += (f", counted where either model's top class is not class {c} "
                                 f"({100 * share:.0f}% of the reference's positions; over "
                                 f"every position {100 * overall:.1f}%)")


class Comparer:
    """Compare a candidate's outputs with a reference's batch by batch (one batch in memory).

    ``axes`` maps an output name to its class axis (None: not class scores); without it the
    shape rule :func:`class_axis` decides.
    """

    def __init__(self, axes: Optional[Mapping[str, Optional[int]]] = None,
                 thresholds: Optional[Thresholds] = None) -> None:
        self.axes = axes
        self.thresholds = thresholds or Thresholds()
        self.streams: Dict[str, _Stream] = {}
        self.extra: List[str] = []
        self.samples = 0

    def add(self, reference: Mapping[str, Any], candidate: Mapping[str, Any],
            samples: int = 1) -> None:
        """One batch: outputs by name from both models on the same ``samples`` samples."""
        self.samples += samples
        for name, ref in reference.items():
            stream = self.streams.get(name)
            if stream is None:
                stream = self.streams[name] = _Stream(name, self._axis(name, ref))
            stream.add(ref, candidate.get(name), samples)
        self.extra += [k for k in candidate if k not in reference and k not in self.extra]

    def _axis(self, name: str, ref: Any) -> Optional[int]:
        if self.axes is not None:
            return self.axes.get(name)
        arr = _numeric(ref)
        return None if arr is None else class_axis(arr.shape, arr.dtype)

    def result(self, data: str = "given", data_note: str = "") -> Comparison:
        generated = data == "generated"
        outputs = [s.result(self.thresholds, generated) for s in self.streams.values()]
        if generated:
            for stats in outputs:
                if stats.verdict == "ok":
                    stats.verdict = "unverified"
                    stats.verdict_reason += ("; on generated inputs, which cannot show accuracy: "
                                             "pass --inputs or --calibration data")
        return Comparison(outputs, list(self.extra), self.samples, data, data_note,
                          self.thresholds)


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
            axes: Optional[Mapping[str, Optional[int]]] = None,
            thresholds: Optional[Thresholds] = None, samples: int = 1) -> Comparison:
    """Compare each reference output with the candidate output of the same name (one batch).

    See :class:`OutputStats` for the definitions; an output missing from ``candidate`` or of a
    different shape fails with a reason. Outputs only the candidate has are listed in
    ``extra_outputs`` and not compared.
    """
    comparer = Comparer(axes, thresholds)
    comparer.add(reference, candidate, samples)
    return comparer.result()


def _failed(name: str, shape, cand_shape, reason: str, kind: str = "tensor",
            metric: str = "dense") -> OutputStats:
    inf, nan = float("inf"), float("nan")
    return OutputStats(name, max_abs=inf, mean_rel=inf, cosine=nan, top1_agreement=None,
                       rel_error=inf, ref_scale=nan, shape=tuple(shape),
                       candidate_shape=cand_shape, reason=reason, kind=kind, metric=metric,
                       verdict="broken", verdict_reason=reason)


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
    if isinstance(value, (list, tuple, dict)):
        return (len(value),)
    return tuple(np.shape(value))
