"""Passes that change the model's structure: channel pruning and dead-channel removal.

They wrap :mod:`onnxprune.channels` (dependency graph, selection, masking, resizing) and keep
the pipeline's per-weight records current: shapes and channel counts before and after, groups
left whole and why, dead-channel constants folded or kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from onnxprune.channels.dead import remove_dead_channels
from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.channels.select import select_channels
from onnxprune.errors import OptionError
from onnxprune.inputs.signature import fmt_shape
from onnxprune.ops.weights import Skipped
from onnxprune.passes.base import LayerResult, Pass, PassRecord, PruneState, set_layer

#: Our criterion names -> the norm the channel scorer sums over coupled tensors.
_CHANNEL_NORMS = {"magnitude": "l1", "l1": "l1", "l2": "l2", "wanda": "wanda"}


@dataclass
class ChannelRecord(PassRecord):
    """Channels removed per group id, the groups (with a producer) and how many of them lost
    channels, the groups left whole (``frozen``: description, why), the weights resized
    (``layers``) and, with a refit, the weight names refit."""

    removed: Dict[str, List[int]] = field(default_factory=dict)
    channels_removed: int = 0
    groups: int = 0
    groups_pruned: int = 0
    frozen: List[Tuple[str, str]] = field(default_factory=list)
    resized: int = 0
    refit: List[str] = field(default_factory=list)
    allocation: Optional[dict] = None  # --target-macs/--target-speedup: see channels.allocate
    bn_reestimated: List[str] = field(default_factory=list)  # --bn-reestimate: BN nodes changed
    blocks_removed: List[str] = field(default_factory=list)  # --depth: Add names of the blocks


@dataclass
class DeadChannelRecord(PassRecord):
    """Dead channels removed, the weights resized (``layers``), and their constant outputs
    folded exactly into consumer biases or kept because folding would not be exact."""

    channels_removed: int = 0
    resized: int = 0
    folded: List[str] = field(default_factory=list)
    kept_nonzero_const: List[str] = field(default_factory=list)


def _unresizable(state: PruneState) -> Optional[str]:
    """Why channels must not be resized in this model at all, or None."""
    if not state.full_check:
        # Resizing rewrites shapes; with a graph strict shape inference rejects, the shapes it
        # would rely on are not to be trusted.
        return ("the input model fails onnx.checker's strict shape inference, so channel "
                "shapes cannot be trusted; channels were not resized")
    return None


def _snapshot(state: PruneState) -> Dict[str, tuple]:
    """Per weight key: (shape, nonzeros, output channels) before a structural change."""
    snap = {}
    for w in state.weights:
        layer = state.layers.get(w.key)
        nonzeros = layer.nonzeros_after if layer is not None else int(
            np.count_nonzero(state.handle.read(w.tensor)))
        snap[w.key] = (w.shape, nonzeros, None if w.layout.view else w.shape[w.layout.out_axis])
    return snap


def _record_shapes(state: PruneState, record: PassRecord, before: Dict[str, tuple],
                   pattern: str, criterion: str) -> int:
    """A new result in ``state.layers`` and ``record`` for every weight whose shape changed;
    returns how many did."""
    changed = 0
    for w in state.weights:
        shape0, nonzeros0, out0 = before[w.key]
        if w.shape == shape0:
            continue
        changed += 1
        nonzeros = int(np.count_nonzero(state.handle.read(w.tensor)))
        out1 = w.shape[w.layout.out_axis] if out0 is not None else None
        layer = state.layers.get(w.key)
        if layer is None:
            layer = LayerResult(w.key, w.name, w.op_type, shape0, int(np.prod(shape0)), nonzeros0,
                                nonzeros, pattern, criterion)
        set_layer(state, record, replace(layer, nonzeros_after=nonzeros, shape_after=w.shape,
                                         channels=(out0, out1) if out0 is not None else None))
    return changed


class PruneChannels(Pass):
    """Remove whole channels: groups of coupled channels ranked by a norm summed over every
    tensor they touch, the weakest ``sparsity`` of each group (local) or overall (global)
    removed from every coupled tensor. Groups whose producers the selection left out stay whole.
    """

    name = "channels"
    requires = frozenset({"selection"})
    ensures = frozenset({"masks", "channels"})

    def __init__(self, sparsity: Optional[float] = None, criterion: str = "magnitude",
                 round_to: int = 1, min_channels: int = 1, scope: str = "local",
                 max_group_sparsity: float = 0.9, channel_scores: Optional[Dict] = None,
                 input_shapes: Optional[Dict[str, Sequence[int]]] = None, refit: bool = False,
                 target_macs: Optional[float] = None, target_speedup: Optional[float] = None,
                 threads: Optional[int] = None, bn_reestimate: str = "none",
                 channel_criterion: str = "norm", depth: bool = False,
                 damage: str = "output", metric=None, damage_stages: int = 1,
                 prune_stream: bool = False):
        if criterion not in _CHANNEL_NORMS and channel_scores is None:
            raise OptionError(f"criterion '{criterion}' does not rank channels; use "
                              f"{', '.join(sorted(_CHANNEL_NORMS))} with --pattern channel")
        if round_to < 1 or min_channels < 1:
            raise OptionError("--round-to and --min-channels must be at least 1")
        self.sparsity = 0.5 if sparsity is None else sparsity
        self.kwargs = dict(criterion=_CHANNEL_NORMS.get(criterion, "l1"), round_to=round_to,
                           min_channels=min_channels, scope=scope,
                           max_group_sparsity=max_group_sparsity, channel_scores=channel_scores)
        self.criterion = criterion
        self.input_shapes = input_shapes
        self.refit = refit
        self.target = (target_macs, target_speedup, threads)
        self.bn_reestimate, self.channel_criterion = bn_reestimate, channel_criterion
        self.depth, self.damage, self.metric = depth, damage, metric
        self.damage_stages = damage_stages
        self.prune_stream = prune_stream
        if refit or bn_reestimate != "none" or channel_criterion == "reconstruction":
            # the refit fits layers to the dense model on calibration data (and the
            # reconstruction ranking and BN re-estimation measure on it)
            self.requires = frozenset({"selection", "calibration"})

    def run(self, state):
        reason = _unresizable(state)
        if reason is not None:
            raise OptionError(f"--pattern channel: {reason}; use a masking pattern or fix the "
                              "model's shapes")
        record = ChannelRecord()
        before = _snapshot(state)
        graph = build_channel_graph(state.handle, self.input_shapes)
        selected = {p.weight.name for p in state.plans}
        not_finite = {w.name for w in state.weights
                      if not np.isfinite(state.handle.read(w.tensor)).all()}
        for name in sorted(not_finite):
            record.skipped.append(Skipped(name, "holds NaN or infinity; its channels are left "
                                               "whole"))
        for group in graph.groups:
            if group.frozen is not None:
                continue
            left_out = [p for p in group.producers if state.plans and p not in selected]
            bad = [t for t in group.producers + group.consumers if t in not_finite]
            if bad:
                group.frozen = f"{bad[0]} holds NaN or infinity"
            elif left_out:
                group.frozen = (f"producer {left_out[0]} is not selected (--op-types/"
                                "--include/--exclude/config)")
            elif group.stream is not None and not self.prune_stream:
                group.frozen = (f"a residual stream ({group.stream} normalizes over it): kept "
                                "whole unless --prune-stream (its few large channels carry "
                                "much of the signal)")
        if self.channel_criterion == "reconstruction" and state.calibration is not None:
            from onnxprune.calibration.channel_scores import reconstruction_scores

            scores, note = reconstruction_scores(state.handle, graph, state.weights,
                                                 state.calibration, seed=state.seed)
            self.kwargs["channel_scores"] = {**scores, **(self.kwargs["channel_scores"] or {})}
            record.notes.append(note)
        allocation = None
        if self.target[0] is not None or self.target[1] is not None:
            from onnxprune.channels.allocate import allocate_for_target
            from onnxprune.channels.depth import find_residual_blocks

            blocks = (find_residual_blocks(state.handle, self.input_shapes)
                      if self.depth and state.calibration is not None else None)
            allocation = allocate_for_target(
                state.handle, graph, *self.target, input_shapes=self.input_shapes,
                **{k: self.kwargs[k] for k in ("criterion", "round_to", "min_channels",
                                               "max_group_sparsity", "channel_scores")},
                calibration=state.calibration, blocks=blocks, damage=self.damage,
                metric=self.metric, damage_stages=self.damage_stages)
            removed = allocation.removed
        else:
            norms = {k: np.sqrt(s.in_sq_norms) for k, s in state.layer_stats.items()
                     if getattr(s, "in_sq_norms", None) is not None}  # wanda: ||X_c||
            removed = select_channels(state.handle, graph, self.sparsity, in_norms=norms,
                                      **self.kwargs)
        mask_channels(state.handle, removed, graph)
        if self.refit:
            from onnxprune.passes.sequential import refit_channels

            cut = {m.tensor for gid, units in removed.items() if len(units)
                   for m in graph.groups[gid].members if m.stored}
            record.refit = refit_channels(state, record, cut=cut)
            record.notes.append(f"least-squares refit of {len(record.refit)} weights (and their "
                                "biases), layer by layer, to the dense model's outputs on the "
                                "calibration data; it fits that data's distribution (MiniLM "
                                "refit on templated sentences kept them and lost other text), so "
                                "check the result on data like your deployment's (--inputs, "
                                "--eval-script)")
        if self.bn_reestimate != "none" and state.calibration is not None:
            from onnxprune.calibration.batchnorm import reestimate_batchnorm
            from onnxprune.passes.sequential import dense_reference

            reference = dense_reference(state, record.notes) if \
                self.bn_reestimate == "match" else None
            record.bn_reestimated, notes = reestimate_batchnorm(
                state.handle, graph.roles, state.calibration, self.bn_reestimate, reference)
            record.notes.extend(notes)
        resized = resize_channels(state.handle, graph, removed)
        # A tensor left alone as a weight because something else reads it (a tied embedding
        # table read by Gather) may still lose channels its whole group loses: say so, naming
        # those readers (the channel rules make them follow the same channels).
        for skip in state.skipped:
            shapes = resized.get(skip.name)
            if skip.readers and shapes and shapes[0] != shapes[1]:
                record.notes.append(
                    f"'{skip.name}' (not pruned as a weight: also read by "
                    f"{', '.join(skip.readers)}) lost the channels of its group: "
                    f"{fmt_shape(shapes[0])} -> {fmt_shape(shapes[1])}; those readers see the "
                    "same channels removed")
        changed = _record_shapes(state, record, before, "channel", self.criterion)
        if allocation is not None and allocation.blocks:
            changed += _remove_blocks(state, record, allocation.blocks, self.input_shapes)
        frozen = [(g.describe(), g.frozen) for g in graph.groups if g.frozen and g.producers]
        with_producer = sum(1 for g in graph.groups if g.producers)
        n_removed = sum(len(v) for v in removed.values())
        pruned = sum(1 for v in removed.values() if v)
        summary = (f"{n_removed} channels removed from {pruned} of {with_producer} groups "
                   f"({len(frozen)} frozen); {changed} weights resized")
        record.notes.append(f"channel pruning: {summary}")
        record.summary, record.modified, record.frozen = summary, n_removed > 0, frozen
        record.removed = {str(k): list(v) for k, v in removed.items() if v}
        record.channels_removed, record.groups, record.groups_pruned = (n_removed,
                                                                        with_producer, pruned)
        record.resized = changed
        if allocation is not None:
            allocation.finish(state.handle)
            record.allocation = allocation.summary(graph)
            record.notes.extend(allocation.notes)
        return record


def _remove_blocks(state: PruneState, record: "ChannelRecord", adds, input_shapes) -> int:
    """``--depth``: remove the residual blocks the allocation chose (after the channels); their
    weights leave the model (a result with every dimension 0) and ``state.weights``. Returns
    how many weights went."""
    from onnxprune.channels.depth import remove_blocks

    gone = set(remove_blocks(state.handle, adds, input_shapes))
    record.blocks_removed = list(adds)
    for w in [w for w in state.weights if w.name in gone]:
        layer = state.layers.get(w.key)
        nonzeros = layer.nonzeros_after if layer is not None else int(
            np.count_nonzero(state.handle.read(w.tensor)))
        shape = layer.shape if layer is not None else w.shape
        base = layer or LayerResult(w.key, w.name, w.op_type, shape, int(np.prod(shape)),
                                    nonzeros, nonzeros, "channel", "")
        set_layer(state, record, replace(base, nonzeros_after=0,
                                         shape_after=tuple(0 for _ in shape)))
    went = sum(1 for w in state.weights if w.name in gone)
    state.weights = [w for w in state.weights if w.name not in gone]
    record.notes.append(f"depth: {len(adds)} residual blocks removed (each Add now "
                        f"Identity of its identity input), {len(gone)} stored tensors with them")
    return went


class RemoveDeadChannels(Pass):
    """After any masking: remove channels no one reads or whose filters are all zero, exactly.

    A dead channel that still emits a constant (bias, BN shift) is folded into its consumers'
    biases where that is exact, otherwise kept; both are listed in the notes.
    """

    name = "dead-channels"
    requires = frozenset({"weights"})

    def __init__(self, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                 keep_layouts: bool = True):
        self.input_shapes = input_shapes
        self.keep_layouts = keep_layouts

    def run(self, state):
        reason = _unresizable(state)
        if reason is not None:
            return DeadChannelRecord(summary=reason, notes=[f"dead channels: {reason}"])
        structured = sorted({p.pattern.spec for p in state.plans if p.pattern.spec not in
                             ("unstructured", "channel")})
        if self.keep_layouts and structured:
            # Removing one input channel shifts every N:M group / block after it, and the
            # pruned model would no longer have the layout sparse kernels read.
            note = (f"dead channels left in place: removing them would misalign the "
                    f"{', '.join(structured)} layout (resize=True / --resize removes them anyway)")
            return DeadChannelRecord(summary=note, notes=[note])
        before = _snapshot(state)
        record = DeadChannelRecord()
        dead = remove_dead_channels(state.handle, self.input_shapes)
        changed = _record_shapes(state, record, before, "", "")
        n = dead.channels_removed
        if dead.folded:
            record.notes.append(f"dead channels: {len(dead.folded)} constant outputs folded "
                                "exactly into consumer biases")
        if dead.kept_nonzero_const:
            record.notes.append(f"dead channels kept because their constant output cannot be "
                                f"folded exactly: {', '.join(dead.kept_nonzero_const[:5])}"
                                + (" …" if len(dead.kept_nonzero_const) > 5 else ""))
        summary = f"{n} dead channels removed; {changed} weights resized"
        if n:
            record.notes.append(summary)
        record.summary, record.modified = summary, n > 0
        record.channels_removed, record.resized = n, changed
        record.folded, record.kept_nonzero_const = list(dead.folded), list(dead.kept_nonzero_const)
        return record
