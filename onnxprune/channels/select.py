"""Choosing which channels to remove: per-unit scores and local/global selection.

Score of unit ``u`` of a group (criterion ``l1`` or ``l2``): for every weight in the group — the
producers' output rows *and* the consumers' input slices — the L1 (or L2) norm of the slices that
belong to ``u``, divided by that tensor's mean over the group's units; the unit's score is the
mean of these over the tensors. Dividing by the per-tensor mean makes every tensor count equally
(a 3x3x512 consumer would otherwise drown a 1x1x64 producer) and puts all groups on one scale
(mean 1), which is what lets ``scope="global"`` use one threshold. Biases and BN parameters are
not scored: they say little about a channel once its weights are known.

With ``in_norms`` (criterion ``wanda``: each weight's per-input-column activation norm
``||X_c||`` from calibration data, keyed by weight name) a consumer's slice of unit ``u`` counts
as ``sum |W[:, c]| * ||X_c||`` over its columns ``c`` (Wanda's ``|W| * ||X||``): a head whose
output-projection inputs carry little signal scores low whatever its weights. Producers, and
consumers whose columns are not one channel each (Conv kernel positions), stay unweighted.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union

import numpy as np

from onnxprune.errors import OptionError
from onnxprune.model.io import ModelHandle
from onnxprune.channels.graph import CONSUMER, PRODUCER, ChannelGraph, ChannelGroup
from onnxprune.ops.quant import stored_scale
from onnxprune.ops.weights import FLOAT_TYPES, find_weights

CRITERIA = ("l1", "l2", "wanda")


def unit_scores(handle: ModelHandle, graph: ChannelGraph, group: ChannelGroup,
                criterion: str = "l1", cache: Optional[Dict] = None,
                in_norms: Optional[Dict[str, np.ndarray]] = None) -> np.ndarray:
    """Normalized importance of each unit of ``group`` (mean 1 over units when nonzero)."""
    cache = {} if cache is None else cache
    wanda = criterion == "wanda"
    criterion = "l1" if wanda else criterion
    per_tensor: List[np.ndarray] = []
    for m in group.members:
        if not m.stored or not ({PRODUCER, CONSUMER} & set(m.roles)):
            continue
        key = (m.tensor, m.axis, criterion)
        if key not in cache:
            arr = _dequantized(handle, graph, m.tensor, cache)
            rows = np.moveaxis(arr, m.axis, 0).reshape(arr.shape[m.axis], -1)
            cache[key] = (np.abs(rows).sum(1) if criterion == "l1" else (rows ** 2).sum(1))
        per_channel = cache[key]
        norms = (in_norms or {}).get(m.tensor) if wanda and CONSUMER in m.roles else None
        if norms is not None and len(norms) == len(per_channel):
            per_channel = per_channel * np.asarray(norms, np.float64)
        v = per_channel[m.index_map].sum(axis=1)
        if criterion == "l2":
            v = np.sqrt(v)
        mean = v.mean()
        per_tensor.append(v / mean if mean > 0 else v)
    if not per_tensor:
        return np.zeros(group.size)
    return np.mean(per_tensor, axis=0)


def _dequantized(handle: ModelHandle, graph: ChannelGraph, name: str, cache: Dict
                 ) -> np.ndarray:
    """A stored tensor's values as its readers see them: an integer weight times its
    dequantization (:meth:`onnxprune.ops.weights.Weight.factor`: Cast + Mul scales and
    DequantizeLinear / QOperator scales alike; another integer tensor read by one such op, by
    its scale), so per-channel scales weigh the channels as the model does; float tensors as
    stored."""
    tensor = graph.stored[name]
    arr = np.asarray(handle.read(tensor), dtype=np.float64)
    if tensor.data_type in FLOAT_TYPES:
        return arr
    if "weights" not in cache:  # found once per selection, only for models with such weights
        cache["weights"] = {w.name: w for w in find_weights(handle)[0]
                            if w.dequant is not None or w.scale is not None}
    w = cache["weights"].get(name)
    if w is not None:
        factor = w.factor(handle)
        return arr if factor is None or factor.shape != arr.shape else arr * factor
    scale = stored_scale(handle.index, name, lambda n: handle.read(
        graph.stored[n]) if n in graph.stored else None)
    return arr if scale is None else arr * scale


def _user_scores(graph: ChannelGraph, key: Union[int, str], values) -> tuple:
    group = graph.group_of(key)
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == group.size:
        return group.id, values
    for m in group.members:
        if m.tensor == key and values.size == m.index_map.max() + 1:
            return group.id, values[m.index_map].sum(axis=1)
    raise OptionError(f"channel scores for '{key}' have {values.size} values; group "
                      f"{group.id} has {group.size} channels")


def group_scores(handle: ModelHandle, graph: ChannelGraph, criterion: str = "l1",
                 channel_scores: Optional[Dict] = None,
                 in_norms: Optional[Dict[str, np.ndarray]] = None) -> Dict[int, np.ndarray]:
    """Prunable group id -> its units' scores (the user's where given), mean 1 when nonzero."""
    user = dict(_user_scores(graph, k, v) for k, v in (channel_scores or {}).items())
    cache: Dict = {}
    scores: Dict[int, np.ndarray] = {}
    for g in graph.prunable():
        if g.id in user:
            s = user[g.id]
            scores[g.id] = s / s.mean() if s.mean() > 0 else s
        else:
            scores[g.id] = unit_scores(handle, graph, g, criterion, cache, in_norms)
    return scores


def kept_count(n: int, sparsity: float, round_to: int = 1, min_channels: int = 1) -> int:
    """Channels a group of ``n`` keeps: ``n - floor(s*n)``, at least ``min_channels`` (and 1),
    then rounded to the nearest multiple of ``round_to`` (never below ``round_to``); a group
    smaller than or equal to ``round_to`` keeps all its channels (it cannot hold a full
    multiple, and rounding it to 0 would delete it)."""
    keep = n - int(np.floor(sparsity * n + 1e-9))
    return round_kept(n, keep, round_to, min_channels)


def round_kept(n: int, keep: int, round_to: int, min_channels: int) -> int:
    keep = max(keep, min_channels, 1)
    if round_to > 1:
        if n <= round_to:
            return n
        keep = max(round_to, int(np.floor(keep / round_to + 0.5)) * round_to)
        while keep < min(min_channels, n):
            keep += round_to
    return min(keep, n)


def select_channels(handle: ModelHandle, graph: ChannelGraph, sparsity: float,
                    criterion: str = "l1", round_to: int = 1, min_channels: int = 1,
                    scope: str = "local", max_group_sparsity: float = 0.9,
                    channel_scores: Optional[Dict] = None,
                    in_norms: Optional[Dict[str, np.ndarray]] = None) -> Dict[int, List[int]]:
    """Group id -> sorted unit indices to remove (lowest scores first)."""
    if not 0 <= sparsity < 1:
        raise OptionError(f"channel sparsity must be in [0, 1), got {sparsity}")
    if criterion not in CRITERIA:
        raise OptionError(f"unknown channel criterion '{criterion}'; choose one of "
                          f"{', '.join(CRITERIA)}")
    if scope not in ("local", "global"):
        raise OptionError(f"scope must be 'local' or 'global', got '{scope}'")
    if round_to < 1 or min_channels < 0:
        raise OptionError("round_to must be >= 1 and min_channels >= 0")
    if criterion == "wanda" and not in_norms:
        raise OptionError("the wanda channel criterion needs calibration data (activation "
                          "norms); give --calibration")
    scores = group_scores(handle, graph, criterion, channel_scores, in_norms)
    removed: Dict[int, List[int]] = {}
    if scope == "local":
        for gid, s in scores.items():
            n = len(s)
            keep = kept_count(n, sparsity, round_to, min_channels)
            order = np.argsort(s, kind="stable")
            removed[gid] = sorted(order[: n - keep].tolist())
        return removed
    # Global: one threshold on normalized scores, each group capped at max_group_sparsity.
    total = sum(len(s) for s in scores.values())
    target = int(np.floor(sparsity * total + 1e-9))
    entries = sorted((float(v), gid, u) for gid, s in scores.items() for u, v in enumerate(s))
    count = {gid: 0 for gid in scores}
    cap = {gid: min(int(np.floor(max_group_sparsity * len(s))), len(s) - max(min_channels, 1))
           for gid, s in scores.items()}
    taken = 0
    for _, gid, _u in entries:
        if taken >= target:
            break
        if count[gid] < cap[gid]:
            count[gid] += 1
            taken += 1
    for gid, s in scores.items():
        n = len(s)
        keep = round_kept(n, n - count[gid], round_to, min_channels) if count[gid] else n
        order = np.argsort(s, kind="stable")
        removed[gid] = sorted(order[: n - keep].tolist())
    return removed
