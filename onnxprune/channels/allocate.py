"""Per-group channel widths that meet a MAC or latency target with the least damage.

Instead of one sparsity for every channel group, :func:`allocate_widths` chooses how many
channels each group keeps so that a cost over the model's counted nodes (MACs, or predicted
onnxruntime seconds from :mod:`onnxprune.runtime.latency`) falls to a budget, removing first
what hurts least per unit of cost saved.

Cost model (:func:`node_costs`): each node with a MAC formula (Conv, Gemm, MatMul, ...) whose
stored weight has axes in channel groups does work proportional to that weight's element count
(``MACs = numel(W) x output positions`` for every such op), so with group ``g`` keeping a
fraction ``f_g`` of its channels the node's MACs are ``MACs x prod(f_g)`` over the weight's
grouped axes — exact for those nodes. Nodes whose work the groups do not change through a
stored weight (weight-free MatMul, pooling) count as fixed: if channel removal shrinks them
too, the real MACs only come out lower than predicted.

Damage (:func:`allocate_widths`): a group's units ranked by their importance score (the channel
criterion's normalized scores, mean 1 per group, lowest removed first); removing units costs
the sum of their scores divided by the group's size (the share of the group removed, weighted
by importance), times the group's sensitivity weight (1, or a measured output error).

Greedy: every group starts whole; each step takes the move (one group down to its next allowed
width: multiples of ``round_to``, at least ``min_channels``, at most ``max_group_sparsity``
removed) with the least damage per cost saved, until the cost is at most the budget. The last
step overshoots the budget by at most one move.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from onnxprune.channels.graph import CONSUMER, PRODUCER, ChannelGraph
from onnxprune.channels.select import round_kept
from onnxprune.inputs.signature import resolve_input_shapes
from onnxprune.model.index import node_key
from onnxprune.model.io import ModelHandle
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.registry import complete_types, field_of


#: One grouped axis of a weight: (axis size, ((group id, indices of the axis in the group), ...)).
AxisSpec = Tuple[int, Tuple[Tuple[int, int], ...]]


@dataclass
class NodeCost:
    """One counted node: its key (:func:`node_key`), op type, dense MACs, and the channel groups
    its work scales with: ``factors`` is a list of ``(share, axes)``, one per stored weight,
    ``share`` the weight's part of the node's weight elements (shares sum to 1) and ``axes``
    its grouped axes (:data:`AxisSpec`; an axis may hold channels of several groups, e.g. a conv
    whose output a ``Split`` divides). With group ``g`` keeping a fraction ``f_g``, an axis keeps
    ``(size - sum(count) + sum(f_g x count)) / size`` and the node's MAC fraction is
    ``sum(share x prod(axis fractions))``."""

    key: str
    op_type: str
    macs: int
    factors: List[Tuple[float, Tuple[AxisSpec, ...]]] = field(default_factory=list)

    @property
    def groups(self) -> Tuple[int, ...]:
        return tuple(sorted({g for _, axes in self.factors for _, parts in axes
                             for g, _ in parts}))

    def fraction(self, kept: Mapping[int, float]) -> float:
        """The node's MAC fraction with group ``g`` keeping ``kept[g]`` of its channels (1 for
        groups not given)."""
        if not self.factors:
            return 1.0
        total = 0.0
        for share, axes in self.factors:
            f = 1.0
            for size, parts in axes:
                f *= (size - sum(c for _, c in parts)
                      + sum(kept.get(g, 1.0) * c for g, c in parts)) / size
            total += share * f
        return float(total)


def node_costs(handle: ModelHandle, graph: ChannelGraph,
               input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> List[NodeCost]:
    """Every main-graph node with a MAC formula, its dense MACs on the resolved input shapes
    and the prunable groups its weights' axes hold channels of."""
    proto = handle.model
    resolved = resolve_input_shapes(proto, input_shapes, require_all=False)
    shapes = infer_shapes(handle, resolved, keep_value_info=True,
                          complete=complete_types).static()
    dim_groups: Dict[Tuple[str, int], Dict[int, int]] = {}
    for g in graph.groups:
        if not g.prunable:
            continue
        for m in g.members:
            if m.stored:
                parts = dim_groups.setdefault((m.tensor, m.axis), {})
                parts[g.id] = parts.get(g.id, 0) + int(m.index_map.size)
    # node key -> stored tensor -> axis -> {group id: indices}
    per_node: Dict[str, Dict[str, Dict[int, Dict[int, int]]]] = {}
    for (tensor, axis), roles in graph.roles.items():
        parts = dim_groups.get((tensor, axis))
        if not parts:
            continue
        for role, key, _ in roles:
            if role in (PRODUCER, CONSUMER):
                per_node.setdefault(key, {}).setdefault(tensor, {})[axis] = parts
    out: List[NodeCost] = []
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        formula = field_of(node, "macs")
        if formula is None:
            continue
        macs = formula(node, shapes)
        if not macs:
            continue
        key = node_key(node)
        weights = per_node.get(key, {})
        dims = {t: tuple(int(d) for d in graph.stored[t].dims) for t in weights}
        sizes = {t: float(np.prod(dims[t])) for t in weights}
        total = sum(sizes.values()) or 1.0
        factors = [(sizes[t] / total, tuple((dims[t][a], tuple(sorted(axes[a].items())))
                                            for a in sorted(axes)))
                   for t, axes in sorted(weights.items())]
        out.append(NodeCost(key, node.op_type, int(macs), factors))
    return out


def allowed_keeps(n: int, round_to: int = 1, min_channels: int = 1,
                  max_group_sparsity: float = 0.9) -> List[int]:
    """Channel counts a group of ``n`` may keep, largest first (``n`` itself first): the counts
    :func:`~onnxprune.channels.select.round_kept` yields, at most ``max_group_sparsity`` of the
    group removed."""
    lowest = n - int(np.floor(max_group_sparsity * n + 1e-9))
    keeps = {n}
    for k in range(1, n):
        r = round_kept(n, k, round_to, min_channels)
        if r >= lowest and r <= n:
            keeps.add(r)
    return sorted(keeps, reverse=True)


#: cost of a node at some MACs: ``fn(node, macs) -> cost`` (MACs themselves, or seconds).
CostFn = Callable[[NodeCost, float], float]


def mac_cost(node: NodeCost, macs: float) -> float:
    return float(macs)


@dataclass
class Allocation:
    """The widths chosen: ``keep`` group id -> channels kept; ``cost_before``/``cost_after`` in
    the cost function's unit; ``reached`` whether the budget was met."""

    keep: Dict[int, int]
    sizes: Dict[int, int]
    cost_before: float
    cost_after: float
    budget: float
    reached: bool
    damage: float = 0.0

    def removed(self, scores: Mapping[int, np.ndarray]) -> Dict[int, List[int]]:
        """Group id -> sorted units to remove: each group's lowest-scored units."""
        out = {}
        for gid, s in scores.items():
            order = np.argsort(s, kind="stable")
            out[gid] = sorted(order[: self.sizes[gid] - self.keep[gid]].tolist())
        return out


def model_cost(nodes: Sequence[NodeCost], kept: Mapping[int, float],
               cost: CostFn = mac_cost) -> float:
    """Total cost of ``nodes`` with group ``g`` keeping the fraction ``kept[g]``."""
    return float(sum(cost(n, n.macs * n.fraction(kept)) for n in nodes))


def allocate_widths(scores: Mapping[int, np.ndarray], nodes: Sequence[NodeCost],
                    budget: float, cost: CostFn = mac_cost, round_to: int = 1,
                    min_channels: int = 1, max_group_sparsity: float = 0.9,
                    weights: Optional[Mapping[int, float]] = None,
                    fixed_cost: float = 0.0) -> Allocation:
    """Greedy widths (see the module doc) for the groups in ``scores`` (group id -> unit
    scores) so that ``fixed_cost + model_cost(nodes) <= budget``."""
    weights = dict(weights or {})
    sizes = {gid: len(s) for gid, s in scores.items()}
    keep = dict(sizes)
    ladders = {gid: allowed_keeps(n, round_to, min_channels, max_group_sparsity)
               for gid, n in sizes.items()}
    step = {gid: 0 for gid in sizes}  # position on the ladder
    sorted_scores = {gid: np.sort(np.asarray(s, dtype=np.float64)) for gid, s in scores.items()}
    by_group: Dict[int, List[NodeCost]] = {gid: [] for gid in sizes}
    for n in nodes:
        for g in n.groups:
            if g in by_group:
                by_group[g].append(n)
    frac = {gid: 1.0 for gid in sizes}
    node_cost = {n.key: cost(n, n.macs * n.fraction(frac)) for n in nodes}
    total = fixed_cost + sum(node_cost.values())
    before = total

    def move(gid: int) -> Optional[Tuple[float, float, float]]:
        """(ratio, saving, damage) of taking group ``gid`` one step down, or None."""
        ladder = ladders[gid]
        if step[gid] + 1 >= len(ladder) or not by_group[gid]:
            return None
        n, k0, k1 = sizes[gid], ladder[step[gid]], ladder[step[gid] + 1]
        trial = dict(frac)
        trial[gid] = k1 / n
        saving = sum(node_cost[x.key] - cost(x, x.macs * x.fraction(trial)) for x in by_group[gid])
        if saving <= 0:
            return None
        damage = float(sorted_scores[gid][n - k0: n - k1].sum()) / n * weights.get(gid, 1.0)
        return damage / saving, saving, damage

    cands = {gid: move(gid) for gid in sizes}
    damage_total = 0.0
    while total > budget:
        live = [(c[0], gid) for gid, c in cands.items() if c is not None]
        if not live:
            break
        _, gid = min(live)
        step[gid] += 1
        keep[gid] = ladders[gid][step[gid]]
        frac[gid] = keep[gid] / sizes[gid]
        damage_total += cands[gid][2]
        touched = set()
        for x in by_group[gid]:
            node_cost[x.key] = cost(x, x.macs * x.fraction(frac))
            touched.update(x.groups)
        total = fixed_cost + sum(node_cost.values())
        for g in touched | {gid}:
            if g in cands:
                cands[g] = move(g)
    return Allocation(keep, sizes, before, total, budget, total <= budget, damage_total)


def uniform_width(handle: ModelHandle, width: float, round_to: int = 1, min_channels: int = 1,
                  input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> ModelHandle:
    """A copy of ``handle`` with every prunable group keeping ``width`` of its channels (rounded
    as pruning rounds them; which channels is irrelevant here: the copy is for timing)."""
    from onnxprune.channels.graph import build_channel_graph
    from onnxprune.channels.resize import resize_channels

    twin = ModelHandle(model=copy.deepcopy(handle.model), path=handle.path,
                       base_dir=handle.base_dir)
    for tensor, values in handle.rewritten_values():
        twin.write(twin.index.stored[tensor.name], values)
    graph = build_channel_graph(twin, input_shapes)
    removed = {}
    for g in graph.prunable():
        keep = round_kept(g.size, int(np.ceil(width * g.size - 1e-9)), round_to, min_channels)
        removed[g.id] = list(range(g.size - keep))
    resize_channels(twin, graph, removed)
    return twin
