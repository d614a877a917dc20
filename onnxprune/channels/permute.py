"""Permuting the channels of channel groups so the dense model computes the same function.

A permutation of a group's units is the same gather :func:`onnxprune.channels.resize` does when
it deletes channels, with every index kept and put in a new order: for ``perm`` (new unit ``i``
is old unit ``perm[i]``), every stored member of the group (producer rows, biases, BN
parameters, additive constants, every consumer's input slices, Concat'ed and Flatten'ed
positions through the member's index map) gets ``new[..., map[i], ...] = old[..., map[perm[i]],
...]``. Activations follow by themselves; no attribute or shape constant changes (the resize
rewrites depend only on how many channels go, and none do). Only groups the channel graph can
change are permuted (not frozen: never one that reaches a graph output, a graph input, a
subgraph or an op without a channel rule).

:func:`column_permutation` says where each ``W[out, in]`` column of a weight went, for whoever
holds per-column data (calibration statistics).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

from onnxprune.channels.graph import ChannelGraph
from onnxprune.model.io import ModelHandle

Perms = Dict[int, np.ndarray]

__all__ = ["permute_channels", "permute_array", "permutation_moves", "column_permutation",
           "Perms"]


Moves = List[Tuple[int, np.ndarray, np.ndarray]]


def permutation_moves(graph: ChannelGraph, perms: Perms) -> Dict[str, Moves]:
    """stored tensor -> [(axis, destination indices, source indices)] over all groups."""
    moves: Dict[str, Moves] = defaultdict(list)
    for gid, perm in perms.items():
        group = graph.groups[gid]
        perm = np.asarray(perm, dtype=np.int64)
        if group.frozen is not None:
            raise ValueError(f"{group.describe()} is frozen ({group.frozen}); it cannot be "
                             "permuted")
        if sorted(perm.tolist()) != list(range(group.size)):
            raise ValueError(f"not a permutation of {group.size} units: {perm[:8]}")
        for m in group.members:
            if m.stored:
                moves[m.tensor].append((m.axis, m.index_map.ravel(),
                                        m.index_map[perm].ravel()))
    return moves


def permute_array(arr: np.ndarray, moves) -> np.ndarray:
    """``arr`` with each (axis, dst, src) move applied in turn (index sets on one axis are
    disjoint across groups, so the order does not matter)."""
    out = np.array(arr, copy=True)
    for axis, dst, src in moves:
        taken = np.take(out, src, axis=axis)
        sl = [slice(None)] * out.ndim
        sl[axis] = dst
        out[tuple(sl)] = taken
    return out


def permute_channels(handle: ModelHandle, graph: ChannelGraph, perms: Perms) -> List[str]:
    """Apply ``perms`` (group id -> unit order) to every stored tensor the groups touch; returns
    the stored tensors rewritten. Identity permutations are skipped."""
    perms = {g: p for g, p in perms.items()
             if not np.array_equal(np.asarray(p), np.arange(len(p)))}
    changed = []
    for name, moves in permutation_moves(graph, perms).items():
        tensor = graph.stored[name]
        handle.write(tensor, permute_array(handle.read(tensor), moves))
        changed.append(name)
    return changed


def column_permutation(layout, moves) -> np.ndarray:
    """For a weight with ``layout`` whose stored tensor gets ``moves``: ``cols[j]`` is the old
    ``W[out, in]`` column now at column ``j`` (rows are ignored: only input-side moves matter to
    per-column data)."""
    rows, cols = layout.shape2d
    ids = np.broadcast_to(np.arange(cols, dtype=np.int64), (rows, cols))
    raw = layout.from_2d(ids)
    return layout.to_2d(permute_array(raw, moves))[0].copy()
