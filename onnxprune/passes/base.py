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
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.model import io as mio
from onnxprune.masking.criteria import ScoreContext, get_criterion
from onnxprune.errors import ModelLoadError, OptionError, SelectionError
from onnxprune.masking.scope import UnitLayer, allocate_global, global_cut, select_units
from onnxprune.masking.selection import LayerPlan, select
from onnxprune.calibration.sensitivity import looks_fixed
from onnxprune.model.weights import Skipped, Weight, find_weights

Track = Callable[[Iterable, str, int], Iterable]

#: Bytes of unit scores (and global-scope masks) the passes may hold across weights at once;
#: past it they recompute them weight by weight, so memory stays about one weight's worth.
DEFAULT_MEMORY_BUDGET = 256 << 20


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
    # Unit scores by weight key, held only while all of them fit in memory_budget; a missing
    # key means "recompute from the weight" (see unit_scores_of).
    unit_scores: Dict[str, np.ndarray] = field(default_factory=dict)
    user_scores: Dict[str, np.ndarray] = field(default_factory=dict)  # by key, for rescoring
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
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes held across weights (see the constant)

    @classmethod
    def from_model(cls, model: mio.ModelLike, seed: int = 0, track: Track = no_progress,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> "PruneState":
        """Load ``model``; an in-memory proto is copied so the caller's object is never changed."""
        if isinstance(model, onnx.ModelProto):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            handle, original = mio.load(copy), model
        else:
            handle = mio.load(model)
            original = handle.path if handle.path is not None else handle.model
        full = mio.check_input(handle)
        return cls(handle=handle, original=original, seed=seed, track=track, full_check=full,
                   memory_budget=memory_budget)

    @property
    def model(self) -> onnx.ModelProto:
        return self.handle.model

    def unit_scores_of(self, plan: LayerPlan, w2d: Optional[np.ndarray] = None) -> np.ndarray:
        """The unit scores :class:`ScoreWeights` gave ``plan``'s weight: held ones, or the same
        computed again from ``w2d`` (its ``W[out, in]`` view, read when not given).

        Criteria are deterministic (random ones are seeded per weight), so a recomputed score
        is bit for bit the held one, provided the weight was not rewritten in between.
        """
        held = self.unit_scores.get(plan.weight.key)
        if held is not None:
            return held
        w = plan.weight
        if w2d is None:
            w2d = w.layout.to_2d(self.handle.read(w.tensor))
        return _score_units(self, plan, w2d)


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
        if not state.weights and state.skipped:
            seen = "; ".join(f"{s.name}: {s.reason}" for s in state.skipped[:3])
            raise SelectionError(f"the model has no prunable weights: every weight feeding "
                                 f"Conv/Gemm/MatMul was left alone ({seen})")
        state.plans, skipped = select(state.weights, **self.kwargs)
        state.skipped.extend(skipped)
        for plan in state.plans:
            get_criterion(plan.criterion)  # fail early on an unknown criterion name
        return False, f"{len(state.plans)} weights selected", {
            "selected": [p.weight.key for p in state.plans]}


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _score_units(state: PruneState, plan: LayerPlan, w2d: np.ndarray) -> np.ndarray:
    """Scores of the weight ``w2d`` folded into its pattern's units (N:M keeps element scores:
    it picks within each group of M from them)."""
    w = plan.weight
    crit = get_criterion(plan.criterion)
    w2d = w2d.astype(_compute_dtype(w2d.dtype), copy=False)
    user = state.user_scores.get(w.key)
    if user is not None:
        user = w.layout.to_2d(user)
    stats = state.layer_stats.get(w.key)
    norms = None if stats is None else np.sqrt(stats.in_sq_norms)
    scores = crit.scores(w2d, ScoreContext(w.key, state.seed, norms, user))
    if plan.pattern.implied_sparsity is not None:
        return scores
    return plan.pattern.unit_scores(scores, crit.reduce)


class ScoreWeights(Pass):
    """Score every selected weight with its criterion, folded into its pattern's units.

    The scores stay in ``state.unit_scores`` while they all fit in ``state.memory_budget``;
    past it none are kept and :class:`ApplyMasks` computes them again weight by weight (every
    weight is still scored here, so a bad criterion input fails before anything is masked).

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
        held = 0  # bytes of unit scores kept; None once past the budget (then none are kept)
        scored = 0  # elements scored so far: with `held`, projects what all the scores take
        elements = sum(p.weight.numel for p in state.plans)
        for plan in state.track(state.plans, "scoring", len(state.plans)):
            w = plan.weight
            raw = state.handle.read(w.tensor)
            user = self.user_scores.get(w.name, self.user_scores.get(w.key))
            reason = self._not_a_weight(raw, guarded=user is None)
            if reason is not None:
                state.skipped.append(Skipped(w.name, reason))
                continue
            kept.append(plan)
            if user is not None:
                user = np.asarray(user)
                if tuple(user.shape) != w.shape:
                    raise OptionError(f"scores for '{w.name}' have shape {user.shape}, the weight "
                                      f"has {w.shape}; give scores in the weight's own layout")
                state.user_scores[w.key] = user
            units = _score_units(state, plan, w.layout.to_2d(raw))
            del raw
            scored += w.numel
            if held is not None:
                after = held + units.nbytes
                if max(after, after / scored * elements) <= state.memory_budget:
                    state.unit_scores[w.key] = units
                    held = after
                else:  # they will not all fit: keep none rather than fill the budget first
                    for p in kept:
                        state.unit_scores.pop(p.weight.key, None)
                    held = None
            del units
        dropped = len(state.plans) - len(kept)
        state.plans = kept
        if not kept:
            raise SelectionError("every selected weight was left alone (see the skipped list: "
                                 "NaN values or fixed operands); nothing to prune")
        summary = f"{len(kept)} weights scored" + (
            f", {dropped} left alone (not learned weights)" if dropped else "")
        if held is None:
            summary += (f"; scores over the {state.memory_budget / 2**20:.0f} MiB memory budget "
                        "are recomputed while masking")
        return False, summary, {"scores_held": held is not None}

    def _not_a_weight(self, raw: np.ndarray, guarded: bool) -> Optional[str]:
        return not_a_weight(raw, self.guard_fixed and guarded)


def not_a_weight(raw: np.ndarray, guard_fixed: bool = True) -> Optional[str]:
    """Why a selected tensor must be left alone (NaN/inf values; with ``guard_fixed``, a fixed
    operand such as a ramp or a DFT basis), or None for a learned weight."""
    if not np.isfinite(raw).all():
        return "holds NaN or infinity; fix the model before pruning it"
    if guard_fixed:
        reason = looks_fixed(raw)
        if reason is not None:
            return (f"looks like a fixed operand, not a learned weight: {reason} "
                    "(prune it anyway with --prune-fixed)")
    return None


class ApplyMasks(Pass):
    """Turn unit scores into masks (local or global scope) and zero the pruned weights.

    Weights are masked one at a time: read, mask, write, let go. Global scope first finds its
    one threshold over all of them: in memory from the unit scores :class:`ScoreWeights` held,
    or, when they were over ``state.memory_budget``, in passes that read each weight again
    (:func:`onnxprune.masking.scope.global_cut`; the same masks either way).
    """

    name = "mask"

    def __init__(self, scope: str = "local", masks: Optional[Dict[str, np.ndarray]] = None):
        if scope not in ("local", "global"):
            raise OptionError(f"--scope must be 'local' or 'global', got '{scope}'")
        self.scope = scope
        self.user_masks = masks or {}

    def run(self, state):
        plans = state.plans
        user = {p.weight.key: self._user_mask_array(p) for p in plans}  # shapes checked first
        free = [p for p in plans if user[p.weight.key] is None
                and p.pattern.implied_sparsity is None]
        chosen: Optional[Callable[[int, LayerPlan, np.ndarray, np.ndarray], np.ndarray]] = None
        if self.scope == "global" and free:
            chosen = self._global(free, state)
        index = {p.weight.key: i for i, p in enumerate(free)}
        counts = {}
        for p in state.track(plans, "masking", len(plans)):
            w = p.weight
            raw = state.handle.read(w.tensor)
            w2d = w.layout.to_2d(raw)
            # A fresh array (external data, spill) or a copy made by to_2d is ours to zero in
            # place: no second weight-sized array. Views of protobuf bytes are read-only.
            in_place = w2d.flags.writeable and (w2d.flags.owndata or (
                raw.flags.owndata and raw.flags.writeable))
            del raw
            nz = w2d != 0
            before = int(np.count_nonzero(nz))
            if user[w.key] is not None:
                k = w.layout.to_2d(user[w.key].astype(bool))
            elif chosen is not None and w.key in index:
                k = chosen(index[w.key], p, w2d, nz)
            else:
                need = 0 if p.pattern.implied_sparsity is not None else (
                    int(round(p.sparsity * w.numel)) - (w.numel - before))
                k = self._local(p, state.unit_scores_of(p, w2d), nz, need)
            if not k.all():
                if in_place:
                    np.copyto(w2d, np.zeros((), dtype=w2d.dtype), where=~k)
                    pruned = w2d
                else:
                    pruned = np.where(k, w2d, np.zeros((), dtype=w2d.dtype))
                del k, nz
                state.handle.write(w.tensor, w.layout.from_2d(pruned))
                after = int(np.count_nonzero(pruned))
                del pruned
            else:
                after = before
            del w2d
            state.layers[w.key] = LayerResult(w.key, w.name, w.op_type, w.shape, w.numel, before,
                                              after, p.pattern.spec, p.criterion)
            counts[w.key] = (before, after)
        zeros_before = sum(p.weight.numel - counts[p.weight.key][0] for p in plans)
        zeros_after = sum(p.weight.numel - counts[p.weight.key][1] for p in plans)
        total = sum(p.weight.numel for p in plans)
        return zeros_after != zeros_before, (
            f"{self.scope} masks: sparsity {zeros_before / total:.3f} -> {zeros_after / total:.3f}"
            f" over {len(plans)} weights"), {"scope": self.scope}

    def _user_mask_array(self, plan: LayerPlan) -> Optional[np.ndarray]:
        w = plan.weight
        m = self.user_masks.get(w.name, self.user_masks.get(w.key))
        if m is None:
            return None
        m = np.asarray(m)
        if tuple(m.shape) != w.shape:
            raise OptionError(f"mask for '{w.name}' has shape {m.shape}, the weight has "
                              f"{w.shape}; give masks in the weight's own layout (1 = keep)")
        return m

    @staticmethod
    def _local(plan: LayerPlan, scores: np.ndarray, nz: np.ndarray, need: int) -> np.ndarray:
        if plan.pattern.implied_sparsity is not None:
            return plan.pattern.local_mask(scores, nz, 0, get_criterion(plan.criterion).reduce)
        prune = select_units(scores, plan.pattern.unit_counts(nz), need)
        return plan.pattern.expand(prune, nz.shape)

    @staticmethod
    def _unit_layer(plan: LayerPlan, state: PruneState, w2d: np.ndarray, nz: np.ndarray
                    ) -> Tuple[UnitLayer, int]:
        """The weight's units for the global search, and how many zeros it already has."""
        n = plan.weight.numel
        existing = n - int(np.count_nonzero(nz))
        scores = state.unit_scores_of(plan, w2d)
        if scores.size != n:  # blocks/rows: compare mean magnitudes across layers
            sizes = plan.pattern.unit_counts(np.ones(nz.shape, dtype=bool)).astype(np.float64)
            reduce = get_criterion(plan.criterion).reduce
            scores = scores / (np.sqrt(sizes) if reduce == "l2" else sizes)
        layer = UnitLayer(scores, plan.pattern.unit_counts(nz),
                          max(0, int(np.ceil(plan.min_sparsity * n)) - existing),
                          max(0, int(np.floor(plan.max_sparsity * n)) - existing))
        return layer, existing

    def _global(self, plans: List[LayerPlan], state: PruneState):
        """A function giving each of ``plans`` its keep mask under one global threshold."""
        target = sum(int(round(p.sparsity * p.weight.numel)) for p in plans)
        handle = state.handle
        if all(p.weight.key in state.unit_scores for p in plans):
            layers, existing = [], 0
            for p in plans:
                w2d = p.weight.layout.to_2d(handle.read(p.weight.tensor))
                layer, zeros = self._unit_layer(p, state, w2d, w2d != 0)
                layers.append(layer)
                existing += zeros
            prunes = allocate_global(layers, target - existing)
            del layers
            return lambda i, p, w2d, nz: p.pattern.expand(prunes[i], nz.shape)

        existing = np.zeros(len(plans), dtype=np.int64)

        def load(i: int) -> UnitLayer:
            p = plans[i]
            w2d = p.weight.layout.to_2d(handle.read(p.weight.tensor))
            layer, existing[i] = self._unit_layer(p, state, w2d, w2d != 0)
            return layer

        # Sorting out the cut costs ~150 bytes per candidate unit; the budget caps them.
        cut = global_cut(load, len(plans), lambda: target - int(existing.sum()),
                         max_candidates=max(1 << 16, state.memory_budget // 512),
                         track=state.track)

        def chosen(i: int, p: LayerPlan, w2d: np.ndarray, nz: np.ndarray) -> np.ndarray:
            return p.pattern.expand(cut.mask(i, self._unit_layer(p, state, w2d, nz)[0]),
                                    nz.shape)

        return chosen


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
        from onnxprune.report.compare import compare
        from onnxprune.runtime.session import InvalidOutputModel, open_session, run_model
        from onnxprune.runtime.validate import check_valid

        try:
            reference_session = open_session(state.original)
        except InvalidOutputModel as exc:
            if not state.full_check:  # neither strict shape inference nor onnxruntime accept it
                raise ModelLoadError(f"the input model is invalid: onnx.checker's strict shape "
                                     f"inference rejects it and onnxruntime cannot load it "
                                     f"({exc.detail.splitlines()[0]}); fix or re-export it")
            # A sound graph onnxruntime cannot run (custom ops, an opset it lacks): the output
            # can only be held to the checker, and the user is told why.
            mio.check_graph(state.handle, full_check=state.full_check)
            note = (f"onnxruntime cannot load the input model ({exc.detail.splitlines()[0]}); "
                    "the pruned model was checked with onnx.checker only, not run")
            state.notes.append(note)
            if self.max_error is not None:
                state.gate_failure = ("--max-error cannot be measured: onnxruntime cannot run "
                                      "the input model")
            return False, note, {}
        reference = feeds = None
        if self.compare:
            feeds = self._feeds(state)
            reference = run_model(reference_session, feeds)
        del reference_session  # one model in onnxruntime at a time: big models are big twice
        with mio.materialized(state.handle) as candidate:
            check_valid(candidate, full_check=state.full_check)
            if not self.compare:
                return False, "valid: checker + onnxruntime", {}
            outputs = run_model(candidate, feeds, candidate=True)
        state.comparison = compare(reference, outputs)
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
        from onnxprune.inputs.dataset import load_inputs
        from onnxprune.inputs.generate import make_inputs

        model = state.model
        if self.inputs is None:
            return make_inputs(model, self.input_shapes, seed=self.seed)
        return load_inputs(self.inputs, model, self.input_shapes)  # a file or a dict
