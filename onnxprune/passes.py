"""The pruning pipeline as composable passes over a shared :class:`PruneState`.

A pass is a callable object: ``result = pass_(state)`` updates the state (the model inside
``state.handle`` and what the pass found) and returns a :class:`PassResult` with the model, whether
it changed, and a typed record of what it did. Pipelines are plain lists::

    state = PruneState.from_model("model.onnx")
    for p in [FindWeights(), SelectWeights(pattern="2:4"), ScoreWeights(), ApplyMasks(),
              Validate()]:
        print(p(state).record)

:func:`onnxprune.prune` builds the usual list from its arguments; every pass can also be used
alone in a deployment pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx

from . import io as mio
from .criteria import ScoreContext, get_criterion
from .errors import OptionError, SelectionError
from .scope import UnitLayer, allocate_global, select_units
from .selection import LayerPlan, select
from .sensitivity import looks_fixed
from .weights import Skipped, Weight, find_weights

Track = Callable[[Iterable, str, int], Iterable]


def no_progress(items: Iterable, description: str, total: int) -> Iterable:
    return items


@dataclass
class LayerResult:
    """What masking did to one weight."""

    key: str
    name: str
    op_type: str
    shape: tuple
    numel: int
    nonzeros_before: int
    nonzeros_after: int
    pattern: str
    criterion: str
    shape_after: Optional[tuple] = None  # set when channels were removed
    channels: Optional[tuple] = None  # (output channels before, after)


@dataclass
class PassRecord:
    """What a pass did: a name, a one-line summary, and typed details for the report."""

    name: str
    summary: str
    details: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    record: PassRecord


@dataclass
class PruneState:
    """Everything the passes share: the model being pruned and what earlier passes found."""

    handle: mio.ModelHandle
    original: Union[Path, onnx.ModelProto]  # the untouched input, for validation
    weights: List[Weight] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    plans: List[LayerPlan] = field(default_factory=list)
    unit_scores: Dict[str, np.ndarray] = field(default_factory=dict)
    layer_stats: Dict[str, Any] = field(default_factory=dict)  # calibration statistics per weight
    layers: Dict[str, LayerResult] = field(default_factory=dict)
    records: List[PassRecord] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    frozen: List[tuple] = field(default_factory=list)  # (channel group, why it was left whole)
    calibration: Any = None  # CalibrationSet, when a pass loaded calibration data
    sensitivity: Any = None  # SensitivityTable, when measured
    comparison: Any = None
    gate_failure: Optional[str] = None
    full_check: bool = True  # hold the output to strict shape inference (the input passes it)
    seed: int = 0
    track: Track = no_progress

    @classmethod
    def from_model(cls, model: mio.ModelLike, seed: int = 0, track: Track = no_progress
                   ) -> "PruneState":
        """Load ``model``; an in-memory proto is copied so the caller's object is never changed."""
        if isinstance(model, onnx.ModelProto):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            handle, original = mio.load(copy), model
        else:
            handle = mio.load(model)
            original = handle.path if handle.path is not None else handle.model
        full = mio.check_input(handle)
        return cls(handle=handle, original=original, seed=seed, track=track, full_check=full)

    @property
    def model(self) -> onnx.ModelProto:
        return self.handle.model


class Pass:
    """Base class: subclasses implement :meth:`run` and return ``(modified, summary, details)``."""

    name = "pass"

    def __call__(self, state: PruneState) -> PassResult:
        start = time.perf_counter()
        modified, summary, details = self.run(state)
        record = PassRecord(self.name, summary, details, time.perf_counter() - start)
        state.records.append(record)
        return PassResult(state.model, modified, record)

    def run(self, state: PruneState):  # pragma: no cover - abstract
        raise NotImplementedError


class FindWeights(Pass):
    """Find every prunable weight (initializers, Constant nodes, behind Cast, in subgraphs)."""

    name = "find-weights"

    def run(self, state):
        state.weights, skipped = find_weights(state.handle)
        state.skipped.extend(skipped)
        return False, f"{len(state.weights)} prunable weights, {len(skipped)} skipped", {
            "weights": [w.key for w in state.weights]}


class SelectWeights(Pass):
    """Choose weights and per-weight settings (pattern, sparsity, criterion, bounds)."""

    name = "select"

    def __init__(self, pattern: str = "unstructured", sparsity: Optional[Union[float, int]] = None,
                 criterion: str = "magnitude", op_types=None, include: Optional[str] = None,
                 exclude: Optional[str] = None, config=None, min_sparsity: float = 0.0,
                 max_sparsity: float = 0.98):
        self.kwargs = dict(pattern=pattern, sparsity=sparsity, criterion=criterion,
                           op_types=op_types, include=include, exclude=exclude, config=config,
                           min_sparsity=min_sparsity, max_sparsity=max_sparsity)

    def run(self, state):
        if not state.weights:
            FindWeights()(state)
        state.plans, skipped = select(state.weights, **self.kwargs)
        state.skipped.extend(skipped)
        for plan in state.plans:
            get_criterion(plan.criterion)  # fail early on an unknown criterion name
        return False, f"{len(state.plans)} weights selected", {
            "selected": [p.weight.key for p in state.plans]}


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


class ScoreWeights(Pass):
    """Score every selected weight with its criterion, folded into its pattern's units.

    Weights are read here anyway, so this is also where a selected tensor that is not a learned
    weight leaves the plan, listed in ``state.skipped`` with the reason: NaN/inf values, and
    (unless ``guard_fixed=False``) fixed operands such as decoding ramps, DFT/DCT bases or
    identity/one-hot matrices, which no sparsity can touch without breaking the model.
    """

    name = "score"

    def __init__(self, user_scores: Optional[Dict[str, np.ndarray]] = None,
                 guard_fixed: bool = True):
        self.user_scores = user_scores or {}
        self.guard_fixed = guard_fixed

    def run(self, state):
        unknown = set(self.user_scores) - {p.weight.name for p in state.plans} - {
            p.weight.key for p in state.plans}
        if unknown:
            raise OptionError(f"scores given for {sorted(unknown)[:5]}, which are not selected "
                              "weights; names must match the model's weight tensor names")
        kept = []
        for plan in state.track(state.plans, "scoring", len(state.plans)):
            w = plan.weight
            crit = get_criterion(plan.criterion)
            raw = state.handle.read(w.tensor)
            user = self.user_scores.get(w.name, self.user_scores.get(w.key))
            reason = self._not_a_weight(raw, guarded=user is None)
            if reason is not None:
                state.skipped.append(Skipped(w.name, reason))
                continue
            kept.append(plan)
            w2d = plan.weight.layout.to_2d(raw)
            w2d = w2d.astype(_compute_dtype(w2d.dtype), copy=False)
            if user is not None:
                user = np.asarray(user)
                if tuple(user.shape) != w.shape:
                    raise OptionError(f"scores for '{w.name}' have shape {user.shape}, the weight "
                                      f"has {w.shape}; give scores in the weight's own layout")
                user = w.layout.to_2d(user)
            stats = state.layer_stats.get(w.key)
            norms = None if stats is None else np.sqrt(stats.in_sq_norms)
            ctx = ScoreContext(w.key, state.seed, norms, user)
            scores = crit.scores(w2d, ctx)
            # N:M picks within each group of M from element scores; other patterns fold them
            # into units (elements, blocks, rows) once, here.
            state.unit_scores[w.key] = (scores if plan.pattern.implied_sparsity is not None
                                        else plan.pattern.unit_scores(scores, crit.reduce))
        dropped = len(state.plans) - len(kept)
        state.plans = kept
        if not kept:
            raise SelectionError("every selected weight was left alone (see the skipped list: "
                                 "NaN values or fixed operands); nothing to prune")
        return False, f"{len(kept)} weights scored" + (
            f", {dropped} left alone (not learned weights)" if dropped else ""), {}

    def _not_a_weight(self, raw: np.ndarray, guarded: bool) -> Optional[str]:
        if not np.isfinite(raw).all():
            return "holds NaN or infinity; fix the model before pruning it"
        if self.guard_fixed and guarded:
            reason = looks_fixed(raw)
            if reason is not None:
                return (f"looks like a fixed operand, not a learned weight: {reason} "
                        "(prune it anyway with --prune-fixed)")
        return None


class ApplyMasks(Pass):
    """Turn unit scores into masks (local or global scope) and zero the pruned weights."""

    name = "mask"

    def __init__(self, scope: str = "local", masks: Optional[Dict[str, np.ndarray]] = None):
        if scope not in ("local", "global"):
            raise OptionError(f"--scope must be 'local' or 'global', got '{scope}'")
        self.scope = scope
        self.user_masks = masks or {}

    def run(self, state):
        plans = state.plans
        reads = {}
        nonzero = {}
        counts = {}
        for plan in plans:
            w = plan.weight
            w2d = w.layout.to_2d(state.handle.read(w.tensor))
            reads[w.key] = w2d
            nonzero[w.key] = w2d != 0
        keep: Dict[str, np.ndarray] = {}
        user = {p.weight.key: self._user_mask(p) for p in plans}
        auto = [p for p in plans if user[p.weight.key] is None]
        for p in plans:
            if user[p.weight.key] is not None:
                keep[p.weight.key] = user[p.weight.key]
        fixed = [p for p in auto if p.pattern.implied_sparsity is not None]
        free = [p for p in auto if p.pattern.implied_sparsity is None]
        for p in fixed:  # N:M: every group keeps its top N; scope does not apply
            keep[p.weight.key] = self._local(p, state, nonzero, 0)
        if self.scope == "local":
            for p in free:
                existing = p.weight.numel - int(np.count_nonzero(nonzero[p.weight.key]))
                need = int(round(p.sparsity * p.weight.numel)) - existing
                keep[p.weight.key] = self._local(p, state, nonzero, need)
        elif free:
            keep.update(self._global(free, state, nonzero))
        for p in state.track(plans, "masking", len(plans)):
            w = p.weight
            w2d = reads[w.key]
            before = int(np.count_nonzero(nonzero[w.key]))
            k = keep[w.key]
            if not k.all():
                pruned = np.where(k, w2d, np.zeros((), dtype=w2d.dtype))
                state.handle.write(w.tensor, w.layout.from_2d(pruned))
                after = int(np.count_nonzero(pruned))
            else:
                after = before
            state.layers[w.key] = LayerResult(w.key, w.name, w.op_type, w.shape, w.numel, before,
                                              after, p.pattern.spec, p.criterion)
            counts[w.key] = (before, after)
        zeros_before = sum(w.numel - b for w, (b, _) in
                           ((p.weight, counts[p.weight.key]) for p in plans))
        zeros_after = sum(p.weight.numel - counts[p.weight.key][1] for p in plans)
        total = sum(p.weight.numel for p in plans)
        return zeros_after != zeros_before, (
            f"{self.scope} masks: sparsity {zeros_before / total:.3f} -> {zeros_after / total:.3f}"
            f" over {len(plans)} weights"), {"scope": self.scope}

    def _user_mask(self, plan: LayerPlan) -> Optional[np.ndarray]:
        w = plan.weight
        m = self.user_masks.get(w.name, self.user_masks.get(w.key))
        if m is None:
            return None
        m = np.asarray(m)
        if tuple(m.shape) != w.shape:
            raise OptionError(f"mask for '{w.name}' has shape {m.shape}, the weight has "
                              f"{w.shape}; give masks in the weight's own layout (1 = keep)")
        return w.layout.to_2d(m.astype(bool))

    @staticmethod
    def _local(plan, state, nonzero, need):
        scores = state.unit_scores[plan.weight.key]
        nz = nonzero[plan.weight.key]
        if plan.pattern.implied_sparsity is not None:
            return plan.pattern.local_mask(scores, nz, 0, get_criterion(plan.criterion).reduce)
        prune = select_units(scores, plan.pattern.unit_counts(nz), need)
        return plan.pattern.expand(prune, nz.shape)

    @staticmethod
    def _global(plans, state, nonzero):
        layers = []
        total_target = 0
        total_existing = 0
        for p in plans:
            nz = nonzero[p.weight.key]
            n = p.weight.numel
            existing = n - int(np.count_nonzero(nz))
            counts = p.pattern.unit_counts(nz)
            scores = state.unit_scores[p.weight.key]
            if scores.size != n:  # blocks/rows: compare mean magnitudes across layers
                sizes = p.pattern.unit_counts(np.ones(nz.shape, dtype=bool)).astype(np.float64)
                reduce = get_criterion(p.criterion).reduce
                scores = scores / (np.sqrt(sizes) if reduce == "l2" else sizes)
            layers.append(UnitLayer(scores, counts,
                                    max(0, int(np.ceil(p.min_sparsity * n)) - existing),
                                    max(0, int(np.floor(p.max_sparsity * n)) - existing)))
            total_target += int(round(p.sparsity * n))
            total_existing += existing
        prunes = allocate_global(layers, total_target - total_existing)
        return {p.weight.key: p.pattern.expand(pr, nonzero[p.weight.key].shape)
                for p, pr in zip(plans, prunes)}


class Validate(Pass):
    """Check the pruned model (checker + onnxruntime) and compare it with the original."""

    name = "validate"

    def __init__(self, inputs=None, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                 compare: bool = True, max_error: Optional[float] = None, seed: int = 0):
        self.inputs = inputs
        self.input_shapes = input_shapes or {}
        self.compare = compare
        self.max_error = max_error
        self.seed = seed

    def run(self, state):
        from . import validate as v

        with mio.materialized(state.handle) as candidate:
            v.check_valid(candidate, full_check=state.full_check)
            if not self.compare:
                return False, "valid: checker + onnxruntime", {}
            original = state.original
            feeds = self._feeds(state)
            reference = v.run_model(original, feeds)
            outputs = v.run_model(candidate, feeds, candidate=True)
        state.comparison = v.compare(reference, outputs)
        summary = (f"valid; max abs error {state.comparison.max_abs:.3g}, worst cosine "
                   f"{state.comparison.worst_cosine:.6f}")
        if self.max_error is not None and not state.comparison.passed(self.max_error):
            # The caller decides what a failed gate means (prune() writes nothing and raises
            # ValidationFailed after the report is built, so the user sees why).
            state.gate_failure = (f"pruned model's outputs drift past --max-error "
                                  f"{self.max_error}: {summary}; lower --sparsity or use a "
                                  "calibrated criterion")
        return False, summary, {"comparison": state.comparison.to_dict()}

    def _feeds(self, state):
        from . import validate as v

        model = state.model
        if self.inputs is None:
            return v.make_inputs(model, self.input_shapes, seed=self.seed)
        if isinstance(self.inputs, dict):
            return self.inputs
        return v.load_inputs(self.inputs, model, self.input_shapes)
