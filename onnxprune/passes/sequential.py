"""The :class:`PruneSequentially` pass (layer-by-layer calibrated pruning) and the channel refit
driver :func:`refit_channels`.

The algorithms (waves, paired statistics, fit moments, the dense reference run beside the
pruned model) live in :mod:`onnxprune.calibration.sequential`; this module turns them into a
pass over the :class:`~onnxprune.passes.base.PruneState` and records what they did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from onnxprune.calibration.hessian import fits_budget, over_budget
from onnxprune.calibration.reconstruct import asymmetric_target, sparsegpt_prune
from onnxprune.calibration.sequential import (fit_moments, load_dense_reference, mean_shift,
                                              refit_toward_dense, segment_runners,
                                              sequential_waves)
from onnxprune.calibration.statistics import LayerStats, collect_layer_stats, rows_note
from onnxprune.errors import OptionError
from onnxprune.masking.criteria import ScoreContext, get_criterion
from onnxprune.masking.selection import LayerPlan, nothing_pruned
from onnxprune.model import io as mio
from onnxprune.ops.weights import Skipped, stored_bias
from onnxprune.passes.base import Pass, PassRecord, PruneState, layer_result, set_layer
from onnxprune.passes.masking import local_keep_mask, not_a_weight


@dataclass
class SequentialRecord(PassRecord):
    """The waves (weight keys per wave, in order), the segment runs and activation bytes they
    took, the weight names whose bias was moved to the dense mean, seconds per phase
    (``statistics``: running the model and reducing activations; ``solve``: masks and
    updates) and, per weight key, the rows of ``X`` its statistics used of those there were
    (Conv rows are sampled, :func:`~onnxprune.calibration.statistics.row_cap`)."""

    waves: List[List[str]] = field(default_factory=list)
    model_runs: int = 0
    activation_bytes: int = 0
    bias_corrected: List[str] = field(default_factory=list)
    phase_seconds: Dict[str, float] = field(default_factory=dict)
    rows: Dict[str, Tuple[int, int]] = field(default_factory=dict)


def dense_reference(state: PruneState, notes: List[str]) -> Optional[mio.ModelHandle]:
    """The untouched input model, to run beside the one being pruned; None (with a note) when
    an earlier pass changed the graph so the two no longer line up."""
    reference = load_dense_reference(state.original, state.model)
    for replay in state.dense_edits if reference is not None else ():
        replay(reference)
    if reference is None:
        notes.append("the graph changed before layer-by-layer pruning: layers were fit to "
                     "their own outputs, not the input model's, and biases not corrected")
    return reference


def refit_channels(state: PruneState, record: PassRecord, batch_size: int = 8,
                   cut: Sequence[str] = ()) -> List[str]:
    """Refit every selected weight, and every weight that lost channels (``cut``), toward the
    dense model after channels were masked
    (:func:`~onnxprune.calibration.sequential.refit_toward_dense`); notes go to ``record``.
    Any other weight the selection leaves out (``--exclude``, ``--op-types``, a config rule)
    keeps its values, as the report says. Returns the names refit."""
    reference = dense_reference(state, record.notes)
    if reference is None or state.calibration is None:
        return []
    keep, lost = {p.weight.key for p in state.plans}, set(cut)
    weights = [w for w in state.weights if w.key in keep or w.name in lost] \
        if state.plans else state.weights
    return refit_toward_dense(state.handle, reference, weights, state.calibration,
                              record.notes, track=state.track, batch_size=batch_size,
                              seed=state.seed)


class PruneSequentially(Pass):
    """Prune the selected weights wave by wave on calibration data (see the module doc).

    ``bias_correction``: move each stored bias so the layer's mean output stays the dense one's.
    ``guard_fixed``: leave fixed operands (ramps, DFT bases) alone, as :class:`ScoreWeights`
    does. ``damp``/``blocksize``: SparseGPT's dampening (fraction of the mean Hessian diagonal)
    and column block. Needs ``state.calibration`` (the :class:`~onnxprune.passes.calibrated.Calibrate`
    pass loads it).
    """

    name = "sequential"
    requires = frozenset({"selection", "calibration"})
    ensures = frozenset({"masks"})

    def __init__(self, bias_correction: bool = True, guard_fixed: bool = True,
                 damp: float = 0.01, blocksize: int = 128, batch_size: int = 8,
                 sample_rows: bool = True):
        self.bias_correction, self.guard_fixed = bias_correction, guard_fixed
        self.damp, self.blocksize, self.batch_size = damp, blocksize, batch_size
        self.sample_rows = sample_rows

    def run(self, state: PruneState):
        for plan in state.plans:
            if plan.pattern.spec == "channel":
                raise OptionError("layer-by-layer pruning does not choose channels; use "
                                  "--pattern channel with --refit for calibrated channel pruning")
        record = SequentialRecord(phase_seconds={"statistics": 0.0, "solve": 0.0})
        plans = self._screen(state, record)
        waves, outside = sequential_waves(state.model, plans)
        for plan in outside:
            self._leave(state, record, plan, "it is used inside a subgraph, whose inputs cannot be "
                                     "exposed; not pruned")
        reference = dense_reference(state, record.notes)
        stored = state.handle.index
        corrected = []
        handles = [state.handle] + ([reference] if reference is not None else [])
        with segment_runners(handles, state.calibration, self.batch_size) as runners:
            for wave in state.track(waves, "pruning layer by layer", len(waves)):
                corrected += self._wave(state, record, wave, reference, runners, stored)
        runs = sum(r.runs for r in runners)
        cached = max(r.peak for r in runners)
        done = sum(1 for p in plans if p.weight.key in state.layers)
        if not done:
            raise nothing_pruned("no selected weight could be pruned layer by layer",
                                 record.skipped)
        summary = (f"{done} weights pruned in {len(waves)} waves on their upstream-pruned "
                   f"inputs ({runs} segment runs, {cached / 2**20:.0f} MiB of activations held)")
        if corrected:
            record.notes.append(f"biases of {len(corrected)} layers moved so their mean outputs "
                                "stay the dense model's")
        note = rows_note(record.rows, "layer by layer")
        if note:
            record.notes.append(note)
        record.notes.append("layer by layer: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in record.phase_seconds.items()))
        record.summary, record.modified = summary, True
        record.waves = [[p.weight.key for p in w] for w in waves]
        record.model_runs, record.bias_corrected, record.activation_bytes = (runs, corrected,
                                                                             cached)
        return record

    def _wave(self, state: PruneState, record: "SequentialRecord", wave: List[LayerPlan],
              reference, runners, stored) -> List[str]:
        """Prune one wave on its paired statistics; the names whose bias was corrected.

        A reconstructing criterion needs ``[in, in]`` Hessians; a layer whose Hessian alone
        would pass the Hessian budget (VGG's 25088-input fc6: 5 GB) is pruned with Wanda
        scores instead, and the notes say so: memory stays bounded."""
        big = {p.weight.key for p in wave if get_criterion(p.criterion).reconstructs
               and not fits_budget(p.weight)}
        for plan in wave:
            if plan.weight.key in big:
                record.notes.append(f"{plan.weight.name}: {over_budget(plan.weight)}, so it was "
                                    f"pruned with wanda scores instead of {plan.criterion}")
                plan.criterion = "wanda"
        stats, skipped = {}, {}
        for hessian in (True, False):
            part = [p.weight for p in wave
                    if get_criterion(p.criterion).reconstructs == hessian]
            if part:
                # Float32 block products are safe here: the accumulator shifts every row by
                # its first block's means before multiplying (statistics._Accumulator).
                got = collect_layer_stats(state.handle, part, state.calibration,
                                          want_hessian=hessian, batch_size=self.batch_size,
                                          reference=reference, runners=runners,
                                          precision="float32", sample_rows=self.sample_rows,
                                          seed=state.seed)
                stats.update(got)
                skipped.update(got.record.skipped)
                record.rows.update(got.record.rows)
                record.phase_seconds["statistics"] += got.record.seconds
        corrected = []
        t0 = time.perf_counter()
        for plan in wave:
            st = stats.get(plan.weight.key)
            if st is None:
                why = skipped.get(plan.weight.key, "no statistics")
                self._leave(state, record, plan, f"its input activation could not be collected "
                                         f"({why}); not pruned")
                continue
            if self._prune(state, record, plan, st, stored):
                corrected.append(plan.weight.name)
        record.phase_seconds["solve"] += time.perf_counter() - t0
        return corrected

    def _screen(self, state: PruneState, record: "SequentialRecord") -> List[LayerPlan]:
        kept = []
        for plan in state.plans:
            reason = not_a_weight(plan.weight.values_2d(state.handle), self.guard_fixed)
            if reason is None:
                kept.append(plan)
            else:
                record.skipped.append(Skipped(plan.weight.name, reason))
        if not kept:
            raise nothing_pruned("every selected weight was left alone, nothing to prune",
                                 record.skipped)
        state.plans = kept
        return kept

    @staticmethod
    def _leave(state: PruneState, record: "SequentialRecord", plan: LayerPlan, reason: str
               ) -> None:
        record.skipped.append(Skipped(plan.weight.name, reason))
        state.plans = [p for p in state.plans if p is not plan]

    def _prune(self, state: PruneState, record: "SequentialRecord", plan: LayerPlan,
               st: LayerStats, stored) -> bool:
        """Prune one weight on its statistics; True when its bias was corrected."""
        w = plan.weight
        crit = get_criterion(plan.criterion)
        raw = state.handle.read(w.tensor)
        w2d = w.values_2d(state.handle, raw).astype(np.float64)
        nz = w2d != 0
        before = int(np.count_nonzero(nz))
        bias = stored_bias(stored, w) if self.bias_correction else None
        if crit.reconstructs:
            if st.cross is None:  # no reference: SparseGPT's own objective, X_ref = X
                bias = None
            h, cross = fit_moments(st, centered=bias is not None)
            cross = h if cross is None else cross
            target = asymmetric_target(w2d, h, cross, self.damp)
            new, _ = sparsegpt_prune(target, h, plan.pattern,
                                     int(round(plan.sparsity * w.numel)), damp=self.damp,
                                     blocksize=self.blocksize)
        else:
            scores = crit.scores(w2d, ScoreContext(w.key, state.seed, st.in_norms))
            if plan.pattern.implied_sparsity is None:
                scores = plan.pattern.unit_scores(scores, crit.reduce)
                need = int(round(plan.sparsity * w.numel)) - (w.numel - before)
            else:
                need = 0
            keep = local_keep_mask(plan, scores, nz, need)
            new = np.where(keep, w2d, 0.0)
        # sparsegpt_prune leaves exact zeros where ~keep (an integer weight: back to its scale)
        pruned = w.stored_from_2d(state.handle, new, raw.dtype)
        state.handle.write(w.tensor, pruned)
        after = int(np.count_nonzero(pruned))
        set_layer(state, record, layer_result(w, before, after, plan.pattern.spec,
                                              plan.criterion))
        if bias is None or st.ref_sums is None:
            return False
        bias.shift(state.handle, mean_shift(st, w2d, new))
        return True
