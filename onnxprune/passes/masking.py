"""Passes that mask weights: :class:`ScoreWeights` and :class:`ApplyMasks`.

Also the pieces other passes share with them: :func:`not_a_weight` (the guard that leaves NaN
tensors and fixed operands alone), :func:`unit_scores_of` (held or recomputed unit scores) and
:func:`local_keep_mask` (one weight's keep mask from its scores, which layer-by-layer pruning
uses too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from onnxprune.calibration.sensitivity import looks_fixed
from onnxprune.errors import OptionError
from onnxprune.masking.criteria import ScoreContext, get_criterion
from onnxprune.masking.scope import UnitLayer, allocate_global, global_cut, select_units
from onnxprune.masking.selection import LayerPlan, nothing_pruned
from onnxprune.ops.weights import Skipped
from onnxprune.passes.base import Pass, PassRecord, PruneState, layer_result, set_layer


@dataclass
class ScoreRecord(PassRecord):
    """How many weights were scored, how many left alone (``skipped`` says why), and whether
    their unit scores were held in memory (else they are recomputed while masking)."""

    scored: int = 0
    left_alone: int = 0
    scores_held: bool = True


@dataclass
class MaskRecord(PassRecord):
    """The scope, the weights masked (``layers``) and the selection's sparsity before/after."""

    scope: str = "local"
    masked: int = 0
    sparsity_before: float = 0.0
    sparsity_after: float = 0.0


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def score_units(state: PruneState, plan: LayerPlan, w2d: np.ndarray) -> np.ndarray:
    """Scores of the weight ``w2d`` folded into its pattern's units (N:M keeps element scores:
    it picks within each group of M from them)."""
    w = plan.weight
    crit = get_criterion(plan.criterion)
    w2d = w2d.astype(_compute_dtype(w2d.dtype), copy=False)
    factor = w.factor(state.handle)
    if factor is not None:  # a quantized weight is ranked on its dequantized values
        w2d = w2d * w.layout.to_2d(factor).astype(w2d.dtype)
    user = state.user_scores.get(w.key)
    if user is not None:
        user = w.layout.to_2d(user)
    stats = state.layer_stats.get(w.key)
    norms = None if stats is None else np.sqrt(stats.in_sq_norms)
    scores = crit.scores(w2d, ScoreContext(w.key, state.seed, norms, user))
    if plan.pattern.implied_sparsity is not None:
        return scores
    return plan.pattern.unit_scores(scores, crit.reduce)


def unit_scores_of(state: PruneState, plan: LayerPlan, w2d: Optional[np.ndarray] = None
                   ) -> np.ndarray:
    """The unit scores :class:`ScoreWeights` gave ``plan``'s weight: held ones, or the same
    computed again from ``w2d`` (its ``W[out, in]`` view, read when not given).

    Criteria are deterministic (random ones are seeded per weight), so a recomputed score
    is bit for bit the held one, provided the weight was not rewritten in between.
    """
    held = state.unit_scores.get(plan.weight.key)
    if held is not None:
        return held
    w = plan.weight
    if w2d is None:
        w2d = w.layout.to_2d(state.handle.read(w.tensor))
    return score_units(state, plan, w2d)


def local_keep_mask(plan: LayerPlan, scores: np.ndarray, nz: np.ndarray, need: int
                    ) -> np.ndarray:
    """Keep mask of one weight (``W[out, in]`` shape) from its unit ``scores``: N:M picks
    within each group; other patterns prune the lowest units until ``need`` new zeros."""
    if plan.pattern.implied_sparsity is not None:
        return plan.pattern.local_mask(scores, nz, 0, get_criterion(plan.criterion).reduce)
    prune = select_units(scores, plan.pattern.unit_counts(nz), need)
    return plan.pattern.expand(prune, nz.shape)


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


def check_user_keys(given: Dict[str, np.ndarray], plans: List[LayerPlan], what: str) -> None:
    """Refuse user ``scores``/``masks`` keyed by a name no selected weight has (a typo would
    otherwise leave the user's arrays unused and prune by magnitude instead)."""
    names = {p.weight.name for p in plans} | {p.weight.key for p in plans}
    unknown = sorted(set(given) - names)
    if unknown:
        some = ", ".join(sorted(p.weight.name for p in plans)[:8])
        raise OptionError(f"{what} given for {unknown[:5]}, which are not selected weights; "
                          f"keys must be the model's weight tensor names (selected: {some}"
                          f"{', …' if len(plans) > 8 else ''})")


class ScoreWeights(Pass):
    """Score every selected weight with its criterion, folded into its pattern's units.

    The scores stay in ``state.unit_scores`` while they all fit in ``state.memory_budget``;
    past it none are kept and :class:`ApplyMasks` computes them again weight by weight (every
    weight is still scored here, so a bad criterion input fails before anything is masked).

    Weights are read here anyway, so this is also where a selected tensor that is not a learned
    weight leaves the plan, listed in the record's ``skipped`` with the reason: NaN/inf values,
    and (unless ``guard_fixed=False``) fixed operands such as decoding ramps, DFT/DCT bases or
    identity/one-hot matrices, which no sparsity can touch without breaking the model.
    """

    name = "score"
    requires = frozenset({"selection"})
    ensures = frozenset({"scores"})

    def __init__(self, user_scores: Optional[Dict[str, np.ndarray]] = None,
                 guard_fixed: bool = True):
        self.user_scores = user_scores or {}
        self.guard_fixed = guard_fixed

    def run(self, state):
        check_user_keys(self.user_scores, state.plans, "scores")
        record = ScoreRecord()
        kept = []
        held = 0  # bytes of unit scores kept; None once past the budget (then none are kept)
        scored = 0  # elements scored so far: with `held`, projects what all the scores take
        elements = sum(p.weight.numel for p in state.plans)
        for plan in state.track(state.plans, "scoring", len(state.plans)):
            w = plan.weight
            raw = state.handle.read(w.tensor)
            user = self.user_scores.get(w.name, self.user_scores.get(w.key))
            reason = not_a_weight(raw if w.dequant is None else w.values_2d(state.handle, raw),
                                  self.guard_fixed and user is None)
            if reason is not None:
                record.skipped.append(Skipped(w.name, reason))
                continue
            kept.append(plan)
            if user is not None:
                user = np.asarray(user)
                if tuple(user.shape) != w.shape:
                    raise OptionError(f"scores for '{w.name}' have shape {user.shape}, the weight "
                                      f"has {w.shape}; give scores in the weight's own layout")
                state.user_scores[w.key] = user
            units = score_units(state, plan, w.layout.to_2d(raw))
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
            raise nothing_pruned("every selected weight was left alone, nothing to prune",
                                 record.skipped)
        summary = f"{len(kept)} weights scored" + (
            f", {dropped} left alone (not learned weights)" if dropped else "")
        if held is None:
            summary += (f"; scores over the {state.memory_budget / 2**20:.0f} MiB memory budget "
                        "are recomputed while masking")
        record.summary, record.scored, record.left_alone = summary, len(kept), dropped
        record.scores_held = held is not None
        return record


class ApplyMasks(Pass):
    """Turn unit scores into masks (local or global scope) and zero the pruned weights.

    Weights are masked one at a time: read, mask, write, let go. Global scope first finds its
    one threshold over all of them: in memory from the unit scores :class:`ScoreWeights` held,
    or, when they were over ``state.memory_budget``, in passes that read each weight again
    (:func:`onnxprune.masking.scope.global_cut`; the same masks either way).
    """

    name = "mask"
    requires = frozenset({"scores"})
    ensures = frozenset({"masks"})

    def __init__(self, scope: str = "local", masks: Optional[Dict[str, np.ndarray]] = None):
        if scope not in ("local", "global"):
            raise OptionError(f"--scope must be 'local' or 'global', got '{scope}'")
        self.scope = scope
        self.user_masks = masks or {}

    def run(self, state):
        plans = state.plans
        check_user_keys(self.user_masks, plans, "masks")
        record = MaskRecord(scope=self.scope)
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
                k = local_keep_mask(p, unit_scores_of(state, p, w2d), nz, need)
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
            set_layer(state, record, layer_result(w, before, after, p.pattern.spec, p.criterion))
            counts[w.key] = (before, after)
        zeros_before = sum(p.weight.numel - counts[p.weight.key][0] for p in plans)
        zeros_after = sum(p.weight.numel - counts[p.weight.key][1] for p in plans)
        total = sum(p.weight.numel for p in plans)
        record.masked = len(plans)
        record.sparsity_before = zeros_before / total
        record.sparsity_after = zeros_after / total
        record.modified = zeros_after != zeros_before
        record.summary = (f"{self.scope} masks: sparsity {zeros_before / total:.3f} -> "
                          f"{zeros_after / total:.3f} over {len(plans)} weights")
        return record

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
    def _unit_layer(plan: LayerPlan, state: PruneState, w2d: np.ndarray, nz: np.ndarray
                    ) -> Tuple[UnitLayer, int]:
        """The weight's units for the global search, and how many zeros it already has."""
        n = plan.weight.numel
        existing = n - int(np.count_nonzero(nz))
        scores = unit_scores_of(state, plan, w2d)
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
