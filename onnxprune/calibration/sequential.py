"""Layer-by-layer calibrated pruning toward the dense model's outputs.

Pruning a layer changes what every layer after it sees. :class:`PruneSequentially` therefore
prunes in *waves*: a wave is every selected weight whose input depends on no selected weight not
yet pruned (the Q/K/V projections of one block, the branches of an Inception module, a ResNet
block's first conv and its downsample), in graph order; each wave's input statistics come from
the model with all earlier waves already pruned.

Each layer's statistics are collected *paired*: the pruned model and the dense original run on
the same calibration inputs, so a layer sees both what it gets now (``X``) and what its dense
self got (``X_ref``). Then, per criterion:

* **reconstructing** (``sparsegpt``): the layer is pruned toward the weights that best reproduce
  the *dense* layer's output from the inputs it gets now
  (:func:`~onnxprune.calibration.reconstruct.asymmetric_target`), so it also absorbs the error of the layers
  before it, not just its own;
* **scoring** (``wanda``, ``magnitude``, ...): masks from scores on the inputs it gets now
  (Wanda's ``|W| * ||X_j||`` with the pruned upstream's norms);

and, where the layer has a stored bias (Conv, Gemm, MatMul + Add; grouped and depthwise Conv
too), the bias is moved so the layer's mean output over the calibration data is the dense one's
(:func:`~onnxprune.calibration.reconstruct.asymmetric_bias`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.model import io as mio
from onnxprune.passes.calibrated import HESSIAN_BUDGET_BYTES, hessian_bytes
from onnxprune.calibration.statistics import LayerStats, collect_layer_stats
from onnxprune.masking.criteria import ScoreContext, get_criterion
from onnxprune.errors import OptionError, SelectionError
from onnxprune.model.index import names_read
from onnxprune.passes.base import ApplyMasks, LayerResult, Pass, PruneState, not_a_weight
from onnxprune.calibration.reconstruct import asymmetric_bias, asymmetric_target, centered_cross, sparsegpt_prune
from onnxprune.runtime.segments import SegmentRunner
from onnxprune.masking.selection import LayerPlan
from onnxprune.model.weights import Skipped, Weight, stored_bias

__all__ = ["PruneSequentially", "sequential_waves"]


def sequential_waves(model: onnx.ModelProto, plans: Sequence
                     ) -> Tuple[List[list], list]:
    """(waves in order, items not in the main graph), for plans or weights.

    An item's wave is the largest number of the given weights on any path from the graph inputs
    to its node's activation: wave 0 reads only unpruned computation, wave ``k`` depends on
    weights of waves below ``k`` only. Nodes with subgraphs count every name their bodies read.
    """
    graph = model.graph
    main = graph.name or "main"
    at_node: Dict[str, List[Tuple[LayerPlan, int]]] = {}
    outside = []
    for plan in plans:
        consumers = _weight(plan).consumers
        if any(c.graph != main for c in consumers) or not consumers:
            outside.append(plan)
            continue
        for c in consumers:
            at_node.setdefault(_node_key(c.node), []).append((plan, c.input_index))
    depth: Dict[str, int] = {}
    level: Dict[str, int] = {}
    for node in graph.node:
        here = at_node.get(_node_key(node), [])
        weight_slots = {index for _, index in here}
        reads = [t for i, t in enumerate(node.input) if i not in weight_slots]
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            reads = sorted(names_read(node))
        d = max((depth.get(t, 0) for t in reads), default=0)
        for plan, _ in here:
            key = _weight(plan).key
            level[key] = max(level.get(key, 0), d)
        for out in node.output:
            depth[out] = d + 1 if here else d
    waves: Dict[int, list] = {}
    for plan in plans:
        if _weight(plan).key in level:
            waves.setdefault(level[_weight(plan).key], []).append(plan)
    return [waves[k] for k in sorted(waves)], outside


def _weight(item) -> Weight:
    return item if isinstance(item, Weight) else item.weight


def _node_key(node: onnx.NodeProto) -> tuple:
    return (node.name, tuple(node.output))


def refit_toward_dense(state: PruneState, batch_size: int = 8, damp: float = 0.01,
                       bias_correction: bool = True) -> List[str]:
    """Refit every weight, wave by wave, after channels were masked (shapes kept, removed rows
    and columns zero): each layer's kept rows are fit on its kept input columns to reproduce
    the *dense* layer's output from the inputs it now gets, and its bias moved to the dense
    mean (least squares on paired statistics, :func:`~onnxprune.calibration.reconstruct.asymmetric_target`
    with ``kept``). Grouped Convs, weights reached through views and weights whose Hessian
    would pass ``HESSIAN_BUDGET_BYTES`` (noted) are left as they are. Returns the names refit."""
    reference = _dense_reference(state)
    if reference is None or state.calibration is None:
        return []
    main = state.model.graph.name or "main"
    weights = [w for w in state.weights if w.graph == main and not w.layout.view
               and w.layout.group == 1]
    for w in [w for w in weights if hessian_bytes(w) > HESSIAN_BUDGET_BYTES]:
        state.notes.append(f"{w.name} not refit: its Hessian would take "
                           f"{hessian_bytes(w) / 2**30:.1f} GiB (over "
                           f"{HESSIAN_BUDGET_BYTES / 2**30:.0f} GiB)")
        weights.remove(w)
    dense_tensors = reference.index.stored
    waves, _ = sequential_waves(state.model, weights)
    refit = []
    with _runners(state, [state.handle, reference], batch_size) as runners:
        for wave in state.track(waves, "refitting layer by layer", len(waves)):
            stats = collect_layer_stats(state.handle, wave, state.calibration, want_hessian=True,
                                        batch_size=batch_size, reference=reference,
                                        runners=runners)
            for w in wave:
                st = stats.get(w.key)
                if st is None or w.name not in dense_tensors:
                    continue
                raw = state.handle.read(w.tensor)
                now = w.layout.to_2d(raw)
                rows, cols = now.any(axis=1), np.flatnonzero(now.any(axis=0))
                if not rows.any() or not cols.size:
                    continue
                dense = w.layout.to_2d(reference.read(dense_tensors[w.name])).astype(np.float64)
                bias = stored_bias(state.handle.index, w) if bias_correction else None
                h, cross = _fit_moments(st, centered=bias is not None)
                new = np.zeros_like(dense)
                new[:, cols] = asymmetric_target(dense, h, cross, damp, kept=cols)
                new[~rows] = 0.0
                state.handle.write(w.tensor, w.layout.from_2d(new.astype(raw.dtype)))
                if bias is not None:
                    bias.shift(state.handle, np.where(rows, _mean_shift(st, dense, new), 0.0))
                refit.append(w.name)
    return refit


@contextmanager
def _runners(state: PruneState, handles, batch_size: int):
    """One :class:`SegmentRunner` per model over the calibration data, closed afterwards (their
    ``runs`` and ``peak`` stay readable)."""
    runners = [SegmentRunner(h, state.calibration, batch_size) for h in handles]
    try:
        yield runners
    finally:
        for runner in runners:
            runner.close()


def _fit_moments(st: LayerStats, centered: bool):
    """(Hessian, cross moment) per row group for a fit toward the reference layer; centered
    when the layer's bias takes the means. The cross moment is None without a reference."""
    h = st.group_hessians if st.group_hessians is not None else st.hessian[None]
    if not centered:
        return h, st.cross
    return (centered_cross(h, st.group_sums, st.group_sums, st.group_rows),
            centered_cross(st.cross, st.group_sums, st.ref_sums, st.group_rows))


def _mean_shift(st: LayerStats, w_ref: np.ndarray, w_new: np.ndarray) -> np.ndarray:
    """What the bias takes so the layer's mean output is the reference's (per output row)."""
    rows = max(st.group_rows, 1)
    return asymmetric_bias(w_ref, w_new, st.group_sums / rows, st.ref_sums / rows)


class PruneSequentially(Pass):
    """Prune the selected weights wave by wave on calibration data (see the module doc).

    ``bias_correction``: move each stored bias so the layer's mean output stays the dense one's.
    ``guard_fixed``: leave fixed operands (ramps, DFT bases) alone, as :class:`ScoreWeights`
    does. ``damp``/``blocksize``: SparseGPT's dampening (fraction of the mean Hessian diagonal)
    and column block. Needs ``state.calibration`` (the :class:`~onnxprune.passes.calibrated.Calibrate`
    pass loads it).
    """

    name = "sequential"

    def __init__(self, bias_correction: bool = True, guard_fixed: bool = True,
                 damp: float = 0.01, blocksize: int = 128, batch_size: int = 8):
        self.bias_correction, self.guard_fixed = bias_correction, guard_fixed
        self.damp, self.blocksize, self.batch_size = damp, blocksize, batch_size

    def run(self, state: PruneState):
        if state.calibration is None:
            raise OptionError("layer-by-layer pruning needs calibration data: run Calibrate "
                              "first (CLI: --calibration data.npz)")
        for plan in state.plans:
            if plan.pattern.spec == "channel":
                raise OptionError("layer-by-layer pruning does not choose channels; use "
                                  "--pattern channel with --refit for calibrated channel pruning")
        plans = self._screen(state)
        waves, outside = sequential_waves(state.model, plans)
        for plan in outside:
            self._leave(state, plan, "it is used inside a subgraph, whose inputs cannot be "
                                     "exposed; not pruned")
        reference = _dense_reference(state)
        stored = state.handle.index
        corrected = []
        handles = [state.handle] + ([reference] if reference is not None else [])
        with _runners(state, handles, self.batch_size) as runners:
            for wave in state.track(waves, "pruning layer by layer", len(waves)):
                corrected += self._wave(state, wave, reference, runners, stored)
        runs = sum(r.runs for r in runners)
        cached = max(r.peak for r in runners)
        done = sum(1 for p in plans if p.weight.key in state.layers)
        if not done:
            raise SelectionError("no selected weight could be pruned layer by layer (see the "
                                 "skipped list)")
        summary = (f"{done} weights pruned in {len(waves)} waves on their upstream-pruned "
                   f"inputs ({runs} segment runs, {cached / 2**20:.0f} MiB of activations held)")
        if corrected:
            state.notes.append(f"biases of {len(corrected)} layers moved so their mean outputs "
                               "stay the dense model's")
        return True, summary, {"waves": [[p.weight.key for p in w] for w in waves],
                               "model_runs": runs, "bias_corrected": corrected,
                               "activation_bytes": cached}

    def _wave(self, state: PruneState, wave: List[LayerPlan], reference, runners, stored
              ) -> List[str]:
        """Prune one wave on its paired statistics; the names whose bias was corrected.

        A reconstructing criterion needs ``[in, in]`` Hessians; a layer whose Hessian alone
        would pass ``HESSIAN_BUDGET_BYTES`` (VGG's 25088-input fc6: 5 GB) is pruned with Wanda
        scores instead, and the notes say so: memory stays bounded."""
        big = {p.weight.key for p in wave if get_criterion(p.criterion).reconstructs
               and hessian_bytes(p.weight) > HESSIAN_BUDGET_BYTES}
        for plan in wave:
            if plan.weight.key in big:
                state.notes.append(
                    f"{plan.weight.name}: its Hessian would take "
                    f"{hessian_bytes(plan.weight) / 2**30:.1f} GiB (over "
                    f"{HESSIAN_BUDGET_BYTES / 2**30:.0f} GiB), so it was pruned with wanda "
                    f"scores instead of {plan.criterion}")
                plan.criterion = "wanda"
        stats, skipped = {}, {}
        for hessian in (True, False):
            part = [p.weight for p in wave
                    if get_criterion(p.criterion).reconstructs == hessian]
            if part:
                got = collect_layer_stats(state.handle, part, state.calibration,
                                          want_hessian=hessian, batch_size=self.batch_size,
                                          reference=reference, runners=runners)
                stats.update(got)
                skipped.update(got.record.skipped)
        corrected = []
        for plan in wave:
            st = stats.get(plan.weight.key)
            if st is None:
                why = skipped.get(plan.weight.key, "no statistics")
                self._leave(state, plan, f"its input activation could not be collected "
                                         f"({why}); not pruned")
                continue
            if self._prune(state, plan, st, stored):
                corrected.append(plan.weight.name)
        return corrected

    def _screen(self, state: PruneState) -> List[LayerPlan]:
        kept = []
        for plan in state.plans:
            reason = not_a_weight(state.handle.read(plan.weight.tensor), self.guard_fixed)
            if reason is None:
                kept.append(plan)
            else:
                state.skipped.append(Skipped(plan.weight.name, reason))
        if not kept:
            raise SelectionError("every selected weight was left alone (see the skipped list: "
                                 "NaN values or fixed operands); nothing to prune")
        state.plans = kept
        return kept

    @staticmethod
    def _leave(state: PruneState, plan: LayerPlan, reason: str) -> None:
        state.skipped.append(Skipped(plan.weight.name, reason))
        state.plans = [p for p in state.plans if p is not plan]

    def _prune(self, state: PruneState, plan: LayerPlan, st: LayerStats, stored) -> bool:
        """Prune one weight on its statistics; True when its bias was corrected."""
        w = plan.weight
        crit = get_criterion(plan.criterion)
        raw = state.handle.read(w.tensor)
        w2d = w.layout.to_2d(raw).astype(np.float64)
        nz = w2d != 0
        before = int(np.count_nonzero(nz))
        bias = stored_bias(stored, w) if self.bias_correction else None
        if crit.reconstructs:
            if st.cross is None:  # no reference: SparseGPT's own objective, X_ref = X
                bias = None
            h, cross = _fit_moments(st, centered=bias is not None)
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
            keep = ApplyMasks._local(plan, scores, nz, need)  # noqa: SLF001
            new = np.where(keep, w2d, 0.0)
        pruned = new.astype(raw.dtype)  # sparsegpt_prune leaves exact zeros where ~keep
        state.handle.write(w.tensor, w.layout.from_2d(pruned))
        after = int(np.count_nonzero(pruned))
        state.layers[w.key] = LayerResult(w.key, w.name, w.op_type, w.shape, w.numel, before,
                                          after, plan.pattern.spec, plan.criterion)
        if bias is None or st.ref_sums is None:
            return False
        bias.shift(state.handle, _mean_shift(st, w2d, new))
        return True


def _dense_reference(state: PruneState) -> Optional[mio.ModelHandle]:
    """The untouched input model, to run beside the one being pruned; None (with a note) when
    an earlier pass changed the graph so the two no longer line up."""
    if isinstance(state.original, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(state.original)
        ref = mio.load(copy)
    else:
        ref = mio.load(Path(state.original))
    now = {t.name: tuple(t.dims) for t in mio.iter_tensors(state.model.graph)}
    then = {t.name: tuple(t.dims) for t in mio.iter_tensors(ref.model.graph)}
    if now != then or len(state.model.graph.node) != len(ref.model.graph.node):
        state.notes.append("the graph changed before layer-by-layer pruning: layers were fit to "
                           "their own outputs, not the input model's, and biases not corrected")
        return None
    return ref
