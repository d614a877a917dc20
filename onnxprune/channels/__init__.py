"""Structural (channel) pruning: the channel dependency graph, channel selection, dead-channel
propagation and physical resizing.

>>> from onnxprune.model.io import load
>>> from onnxprune.channels import build_channel_graph, prune_channels
>>> handle = load("model.onnx")                                     # doctest: +SKIP
>>> graph = build_channel_graph(handle)                             # doctest: +SKIP
>>> [(g.describe(), g.frozen) for g in graph.groups]                # doctest: +SKIP
>>> record = prune_channels(handle, sparsity=0.3, round_to=8)       # doctest: +SKIP

Modules: :mod:`.graph` (dims, union-find, groups), :mod:`.rules` (applies each op's registry rule),
:mod:`.prune` (scores and selection), :mod:`.resize` (mask and resize), :mod:`.dead` (dead
channels and exact constant folding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from onnxprune.model.io import ModelHandle
from onnxprune.channels.graph import ChannelGraph, ChannelGroup, Member, build_channel_graph
from onnxprune.channels.select import kept_count, select_channels, unit_scores
from onnxprune.channels.resize import mask_channels, resize_channels

__all__ = ["ChannelGraph", "ChannelGroup", "ChannelRecord", "Member", "build_channel_graph",
           "prune_channels", "remove_dead_channels", "mask_channels", "resize_channels",
           "select_channels", "unit_scores", "kept_count"]


@dataclass
class ChannelRecord:
    """What a channel pass did, for the report."""

    groups_total: int  # groups with at least one producer weight
    groups_pruned: int
    removed: Dict[int, List[int]]  # group id -> removed unit indices
    per_weight: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]  # stored tensor -> shapes
    frozen: List[Tuple[str, str]]  # (group, reason)
    folded: List[str] = field(default_factory=list)
    kept_nonzero_const: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def channels_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())


def _record(graph: ChannelGraph, removed, per_weight, notes) -> ChannelRecord:
    with_producer = [g for g in graph.groups if g.producers]
    notes = list(notes) + [f"{sum(1 for g in with_producer if g.frozen)} of "
                           f"{len(with_producer)} channel groups frozen "
                           f"({graph.freeze_rate():.0%})"]
    return ChannelRecord(len(with_producer), sum(1 for v in removed.values() if v),
                         {k: list(v) for k, v in removed.items() if v}, per_weight,
                         [(d, r) for d, r in graph.frozen()
                          if graph.groups[int(d.split()[1])].producers], notes=notes)


def prune_channels(handle: ModelHandle, sparsity: float, criterion: str = "l1",
                   round_to: int = 1, min_channels: int = 1, scope: str = "local",
                   max_group_sparsity: float = 0.9, channel_scores: Optional[Dict] = None,
                   input_shapes: Optional[Dict] = None) -> ChannelRecord:
    """Remove ``sparsity`` of the channels of every prunable group (local) or overall (global).

    Mutates ``handle.model``: the chosen channels are masked (see :func:`mask_channels`) and
    then physically removed from every coupled tensor. ``channel_scores`` maps a group id or a
    producer weight name to per-channel importances that replace the weight-norm criterion.
    """
    graph = build_channel_graph(handle, input_shapes)
    removed = select_channels(handle, graph, sparsity, criterion, round_to, min_channels, scope,
                              max_group_sparsity, channel_scores)
    mask_channels(handle, removed, graph)
    per_weight = resize_channels(handle, graph, removed)
    notes = [f"criterion {criterion}: per-tensor-normalized norms of producer rows and "
             f"consumer slices; scope {scope}; round_to {round_to}"]
    return _record(graph, removed, per_weight, notes)


def remove_dead_channels(handle: ModelHandle, input_shapes: Optional[Dict] = None
                         ) -> ChannelRecord:
    """Remove channels left dead by any masking, exactly (see :mod:`.dead` for the rule)."""
    from onnxprune.channels.dead import apply_folds, find_dead

    folded: List[str] = []
    for _ in range(3):  # a fold zeroes the consumer slices; the next pass sees those unread
        graph = build_channel_graph(handle, input_shapes)
        found = find_dead(handle, graph)
        folds = [f for _, _, fs, _ in found for f in fs]
        if not folds:
            break
        folded += apply_folds(handle, graph, folds)
    removed = {g.id: units for g, units, _, _ in found if units}
    kept = [k for _, _, _, ks in found for k in ks]
    per_weight = resize_channels(handle, graph, removed)
    rec = _record(graph, removed, per_weight, ["dead channels: all-zero producer rows or "
                                               "all-zero consumer slices"])
    rec.folded, rec.kept_nonzero_const = folded, kept
    return rec
