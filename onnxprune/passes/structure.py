"""Passes that change the model's structure: channel pruning and dead-channel removal.

They wrap :mod:`onnxprune.channels` (dependency graph, selection, masking, resizing) and keep
the pipeline's per-weight records current: shapes and channel counts before and after, groups
left whole and why, dead-channel constants folded or kept.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from onnxprune.channels.dead import remove_dead_channels
from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.channels.select import select_channels
from onnxprune.errors import OptionError
from onnxprune.passes.base import LayerResult, Pass, PruneState
from onnxprune.model.weights import Skipped

#: Our criterion names -> the norm the channel scorer sums over coupled tensors.
_CHANNEL_NORMS = {"magnitude": "l1", "l1": "l1", "l2": "l2"}


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


def _record_shapes(state: PruneState, before: Dict[str, tuple], pattern: str,
                   criterion: str) -> int:
    """Update ``state.layers`` for every weight whose shape changed; returns how many did."""
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
            state.layers[w.key] = layer
        layer.nonzeros_after = nonzeros
        layer.shape_after = w.shape
        layer.channels = (out0, out1) if out0 is not None else None
    return changed


class PruneChannels(Pass):
    """Remove whole channels: groups of coupled channels ranked by a norm summed over every
    tensor they touch, the weakest ``sparsity`` of each group (local) or overall (global)
    removed from every coupled tensor. Groups whose producers the selection left out stay whole.
    """

    name = "channels"

    def __init__(self, sparsity: Optional[float] = None, criterion: str = "magnitude",
                 round_to: int = 1, min_channels: int = 1, scope: str = "local",
                 max_group_sparsity: float = 0.9, channel_scores: Optional[Dict] = None,
                 input_shapes: Optional[Dict[str, Sequence[int]]] = None, refit: bool = False):
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

    def run(self, state):
        reason = _unresizable(state)
        if reason is not None:
            raise OptionError(f"--pattern channel: {reason}; use a masking pattern or fix the "
                              "model's shapes")
        before = _snapshot(state)
        graph = build_channel_graph(state.handle, self.input_shapes)
        selected = {p.weight.name for p in state.plans}
        not_finite = {w.name for w in state.weights
                      if not np.isfinite(state.handle.read(w.tensor)).all()}
        for name in sorted(not_finite):
            state.skipped.append(Skipped(name, "holds NaN or infinity; its channels are left "
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
        removed = select_channels(state.handle, graph, self.sparsity, **self.kwargs)
        if self.refit and state.calibration is None:
            raise OptionError("refit needs calibration data (Calibrate first; CLI: --refit "
                              "--calibration data.npz)")
        mask_channels(state.handle, removed, graph)
        if self.refit:
            from onnxprune.calibration.sequential import refit_toward_dense

            refit = refit_toward_dense(state)
            state.notes.append(f"least-squares refit of {len(refit)} weights (and their "
                               "biases), layer by layer, to the dense model's outputs")
        resize_channels(state.handle, graph, removed)
        changed = _record_shapes(state, before, "channel", self.criterion)
        frozen = [(g.describe(), g.frozen) for g in graph.groups if g.frozen and g.producers]
        state.frozen.extend(frozen)
        with_producer = sum(1 for g in graph.groups if g.producers)
        n_removed = sum(len(v) for v in removed.values())
        summary = (f"{n_removed} channels removed from {sum(1 for v in removed.values() if v)} "
                   f"of {with_producer} groups ({len(frozen)} frozen); {changed} weights resized")
        state.notes.append(f"channel pruning: {summary}")
        return n_removed > 0, summary, {"removed": {str(k): v for k, v in removed.items() if v}}


class RemoveDeadChannels(Pass):
    """After any masking: remove channels no one reads or whose filters are all zero, exactly.

    A dead channel that still emits a constant (bias, BN shift) is folded into its consumers'
    biases where that is exact, otherwise kept; both are listed in the notes.
    """

    name = "dead-channels"

    def __init__(self, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                 keep_layouts: bool = True):
        self.input_shapes = input_shapes
        self.keep_layouts = keep_layouts

    def run(self, state):
        reason = _unresizable(state)
        if reason is not None:
            state.notes.append(f"dead channels: {reason}")
            return False, reason, {}
        structured = sorted({p.pattern.spec for p in state.plans if p.pattern.spec not in
                             ("unstructured", "channel")})
        if self.keep_layouts and structured:
            # Removing one input channel shifts every N:M group / block after it, and the
            # pruned model would no longer have the layout sparse kernels read.
            note = (f"dead channels left in place: removing them would misalign the "
                    f"{', '.join(structured)} layout (resize=True / --resize removes them anyway)")
            state.notes.append(note)
            return False, note, {}
        before = _snapshot(state)
        record = remove_dead_channels(state.handle, self.input_shapes)
        changed = _record_shapes(state, before, "", "")
        n = record.channels_removed
        if record.folded:
            state.notes.append(f"dead channels: {len(record.folded)} constant outputs folded "
                               "exactly into consumer biases")
        if record.kept_nonzero_const:
            state.notes.append(f"dead channels kept because their constant output cannot be "
                               f"folded exactly: {', '.join(record.kept_nonzero_const[:5])}"
                               + (" …" if len(record.kept_nonzero_const) > 5 else ""))
        summary = f"{n} dead channels removed; {changed} weights resized"
        if n:
            state.notes.append(summary)
        return n > 0, summary, {"folded": record.folded,
                                "kept_nonzero_const": record.kept_nonzero_const}
