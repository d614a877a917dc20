"""The :class:`PermuteChannels` pass: reorder channels before an N:M mask so more saliency
survives it, with the dense model computing the same function.

For each channel group the channel graph can change (:mod:`onnxprune.channels.graph`: not frozen,
so never one that reaches a graph output), the N:M weights that read the group's channels as
their input channels are stacked into one saliency matrix, :mod:`onnxprune.masking.permute`
searches an order of the channels for it, and :mod:`onnxprune.channels.permute` applies that
order to every tensor tied to the group (the producers' output rows, biases, BN parameters,
every consumer's input columns, Concat offsets ...). The masking passes that follow see the
permuted weights.

Saliency is ``|w|``, or with calibration data ``|w| * ||X_j||`` (the input column norms of the
dense model; the Wanda saliency), collected here when no earlier pass did. A group is permuted
only when the exact kept saliency of all its N:M weights rises; the record holds, per weight
and overall, the fraction of saliency an N:M mask keeps before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.permute import (column_permutation, permutation_moves, permute_array,
                                       permute_channels)
from onnxprune.masking.patterns import NM
from onnxprune.masking.permute import MAX_CHANNELS, search_permutation
from onnxprune.passes.base import Pass, PassRecord, PruneState

#: Title of the report table of kept saliency per weight.
SECTION = "channel permutation: N:M kept saliency per weight (fraction of the weight's total)"


@dataclass
class PermuteRecord(PassRecord):
    """Groups permuted and searched, the groups left in order (``left``: description, why),
    per N:M weight key the kept saliency fraction (identity, permuted), overall the same, and
    the report table (``sections``)."""

    groups_permuted: int = 0
    groups_searched: int = 0
    left: List[Tuple[str, str]] = field(default_factory=list)
    kept: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    kept_before: float = 0.0
    kept_after: float = 0.0
    saliency: str = "magnitude"
    sections: Dict[str, List[dict]] = field(default_factory=dict)
    # group id -> (the group's producers, its size, the unit order applied): what a plan
    # records so that `onnxprune apply` reorders the same channels before its masks
    orders: Dict[int, Tuple[List[str], int, List[int]]] = field(default_factory=dict)


def kept_fraction_parts(s2d: np.ndarray, n: int, m: int) -> Tuple[float, float]:
    """(kept, total) saliency of ``s2d[out, in]`` under N:M (a ragged tail keeps min(n, r))."""
    r, c = s2d.shape
    pad = (-c) % m
    if pad:
        s2d = np.concatenate([s2d, np.zeros((r, pad), s2d.dtype)], axis=1)
    blocks = s2d.reshape(r, -1, m).astype(np.float64)
    kept = np.partition(blocks, m - n, axis=-1)[..., m - n:].sum()
    return float(kept), float(blocks.sum())


def _channel_columns(layout) -> Optional[np.ndarray]:
    """For each ``W[out, in]`` column, the input channel (index on ``in_axis``) it reads, when
    the columns are whole runs of all channels with the channel innermost; else None."""
    if layout.view:
        return None
    shape = layout.shape
    cin = shape[layout.in_axis]
    ids = np.zeros(shape, dtype=np.int64)
    sl = [None] * len(shape)
    sl[layout.in_axis] = slice(None)
    ids = ids + np.arange(cin)[tuple(sl)]
    cols = layout.to_2d(ids)[0]
    if cols.size % cin or not (cols.reshape(-1, cin) == np.arange(cin)).all():
        return None
    return cols


class PermuteChannels(Pass):
    """Permute the input channels of N:M weights (through their producers and every tied
    tensor) so more saliency survives the mask; see the module docstring."""

    name = "permute"
    requires = frozenset({"selection"})
    ensures = frozenset({"permutation"})

    def __init__(self, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                 seconds: Optional[float] = None):
        self.input_shapes = input_shapes
        self.seconds = seconds

    def run(self, state):
        record = PermuteRecord()
        plans = {p.weight.key: p for p in state.plans if isinstance(p.pattern, NM)}
        if not plans:
            record.summary = "no N:M weights selected: nothing to permute"
            record.notes.append(f"--permute: {record.summary}")
            return record
        handle = state.handle
        graph = build_channel_graph(handle, self.input_shapes)
        by_name = {p.weight.name: p for p in plans.values() if p.weight.key == p.weight.name}
        norms = self._norms(state, list(plans.values()), record)
        sal: Dict[str, np.ndarray] = {}  # weight key -> saliency in the stored layout

        def saliency(plan) -> np.ndarray:
            w = plan.weight
            if w.key not in sal:
                s2d = np.abs(w.layout.to_2d(handle.read(w.tensor)).astype(np.float64))
                if w.key in norms:
                    s2d = s2d * norms[w.key][None, :]
                sal[w.key] = w.layout.from_2d(s2d)
            return sal[w.key]

        perms: Dict[int, np.ndarray] = {}
        for group in graph.groups:
            touched = [by_name[m.tensor] for m in group.members
                       if m.stored and m.tensor in by_name]
            reads = [p for p in touched if any(m.tensor == p.weight.name and
                                               m.axis == p.weight.layout.in_axis
                                               for m in group.members)]
            if group.frozen is not None or not reads:
                if group.frozen is not None and reads:
                    record.left.append((group.describe(), group.frozen))
                continue
            patterns = {(p.pattern.n, p.pattern.m) for p in touched}
            if len(patterns) > 1:
                record.left.append((group.describe(), "its weights have different N:M "
                                    "patterns"))
                continue
            n, m = patterns.pop()
            columns, why = self._matrix(group, touched, saliency, m)
            if columns is None:
                record.left.append((group.describe(), why))
                continue
            record.groups_searched += 1
            seed = state.seed + group.id
            kwargs = {} if self.seconds is None else {"seconds": self.seconds}
            result = search_permutation(columns, n, m, seed=seed, **kwargs)
            if result.stopped == "too large":
                record.left.append((group.describe(), f"{group.size} channels: over the "
                                    f"search limit of {MAX_CHANNELS}"))
                continue
            if result.identity:
                continue
            # Exact check over every N:M weight the group touches (rows of producers move
            # too, columns of consumers the search could not read): the gain must be real.
            moves = permutation_moves(graph, {group.id: result.perm})
            before = after = 0.0
            for plan in {p.weight.key: p for p in touched}.values():
                w = plan.weight
                s = saliency(plan)
                moved = permute_array(s, moves.get(w.name, []))
                before += kept_fraction_parts(w.layout.to_2d(s), n, m)[0]
                after += kept_fraction_parts(w.layout.to_2d(moved), n, m)[0]
            if after > before:
                perms[group.id] = result.perm
        if perms:
            record.orders = {g: (list(graph.groups[g].producers), graph.groups[g].size,
                                 [int(i) for i in perm]) for g, perm in perms.items()}
            before_kept = {k: self._kept(saliency(p), p) for k, p in plans.items()}
            moves = permutation_moves(graph, perms)
            permute_channels(handle, graph, perms)
            for w in state.weights:
                tensor_moves = moves.get(w.name)
                if tensor_moves and w.key in sal:
                    sal[w.key] = permute_array(sal[w.key], tensor_moves)
                if tensor_moves and w.key in state.layer_stats:
                    cols = column_permutation(w.layout, tensor_moves)
                    state.layer_stats[w.key] = _permute_stats(state.layer_stats[w.key], cols)
            # Layer-by-layer pruning fits toward the dense model: the permuted one, whose layers
            # line up with the model being pruned (it computes the same function).
            state.dense_edits.append(_replay(graph, perms, self.input_shapes))
        else:
            before_kept = None
        self._report(record, plans, saliency, before_kept, len(perms))
        return record

    def _norms(self, state: PruneState, plans, record: PermuteRecord) -> Dict[str, np.ndarray]:
        """Input column norms of the N:M weights on the calibration data, when there is any:
        from statistics an earlier pass collected, else collected here on the dense model."""
        if state.calibration is None:
            return {}
        have = {p.weight.key: state.layer_stats[p.weight.key].in_norms for p in plans
                if p.weight.key in state.layer_stats}
        missing = [p.weight for p in plans if p.weight.key not in have]
        if missing:
            from onnxprune.calibration.statistics import collect_layer_stats

            stats = collect_layer_stats(state.handle, missing, state.calibration,
                                        want_hessian=False)
            have.update({k: s.in_norms for k, s in stats.items()})
        record.saliency = "|w| * input norm (calibration data)"
        return have

    @staticmethod
    def _matrix(group, touched, saliency, m: int):
        """The stacked saliency ``[rows, group size]`` of the N:M weights reading the group's
        channels as their input channels (one column per unit), or (None, why)."""
        parts = []
        for plan in touched:
            w = plan.weight
            member = next((mb for mb in group.members if mb.tensor == w.name
                           and mb.axis == w.layout.in_axis), None)
            if member is None or member.index_map.shape[1] != 1:
                continue  # a producer here, or channels spread over several columns
            cols = _channel_columns(w.layout)
            pos = member.index_map[:, 0]
            off = int(pos[0]) if len(pos) else 0
            if cols is None or not np.array_equal(pos, off + np.arange(len(pos))) or off % m:
                continue
            s2d = w.layout.to_2d(saliency(plan))
            cin = w.shape[w.layout.in_axis]
            blocks = s2d.reshape(s2d.shape[0], -1, cin)[:, :, off:off + len(pos)]
            parts.append(blocks.reshape(-1, len(pos)))
        if not parts:
            return None, "no N:M weight reads these channels as its input channels"
        if group.size % m:
            return None, f"{group.size} channels is not a multiple of {m}"
        return np.concatenate(parts, axis=0), ""

    @staticmethod
    def _kept(s: np.ndarray, plan) -> Tuple[float, float]:
        return kept_fraction_parts(plan.weight.layout.to_2d(s), plan.pattern.n, plan.pattern.m)

    def _report(self, record: PermuteRecord, plans, saliency, before_kept, permuted: int) -> None:
        rows = []
        kb = ka = tot = 0.0
        for key, plan in plans.items():
            after, total = self._kept(saliency(plan), plan)
            before = after if before_kept is None else before_kept[key][0]
            frac_b, frac_a = before / total if total else 1.0, after / total if total else 1.0
            record.kept[key] = (frac_b, frac_a)
            kb, ka, tot = kb + before, ka + after, tot + total
            rows.append({"weight": key, "kept_identity": round(frac_b, 6),
                         "kept_permuted": round(frac_a, 6), "gain": round(frac_a - frac_b, 6)})
        record.kept_before = kb / tot if tot else 1.0
        record.kept_after = ka / tot if tot else 1.0
        record.groups_permuted = permuted
        record.modified = permuted > 0
        record.sections = {SECTION: rows}
        record.summary = (f"{permuted} of {record.groups_searched} channel groups searched were "
                          f"permuted; N:M keeps {100 * record.kept_before:.2f}% -> "
                          f"{100 * record.kept_after:.2f}% of the saliency ({record.saliency})")
        record.notes.append(f"channel permutation: {record.summary}")
        if record.left:
            record.notes.append(f"channel permutation: {len(record.left)} channel groups read "
                                "by N:M weights left in order, e.g. "
                                f"{record.left[0][0]}: {record.left[0][1]}")


def _replay(graph, perms, input_shapes):
    """The permutation as an edit of another load of the same model (the dense reference)."""
    shape = [(g.size, sorted(g.producers)) for g in graph.groups]

    def replay(handle) -> None:
        again = build_channel_graph(handle, input_shapes)
        if [(g.size, sorted(g.producers)) for g in again.groups] != shape:
            raise RuntimeError("internal error: the dense model's channel groups differ from the "
                               "pruned model's; nothing was written (please report this model)")
        permute_channels(handle, again, perms)

    return replay


def _permute_stats(stats, cols: np.ndarray):
    """Calibration statistics of a weight whose ``W[out, in]`` columns moved (``cols[j]``: the
    old column now at ``j``)."""
    def perm(a, axes):
        if a is None:
            return None
        for ax in axes:
            a = np.take(a, cols, axis=ax)
        return a

    return replace(stats, in_sq_norms=perm(stats.in_sq_norms, [0]),
                   in_sums=perm(stats.in_sums, [0]), hessian=perm(stats.hessian, [0, 1]),
                   group_hessians=perm(stats.group_hessians, [1, 2]),
                   group_sums=perm(stats.group_sums, [1]), ref_sums=perm(stats.ref_sums, [1]),
                   cross=perm(stats.cross, [1, 2]))
