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
removed) with the least damage per cost saved, until the cost is at most the budget; then the
steps that still fit under the budget are given back (most damage per cost first), so the last
move's overshoot shrinks to what no single step can fill.

One module (about 840 lines) on purpose: the MAC and measured-latency allocations, depth and
the speed-up check share one greedy over the same per-group cost/damage tables.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.channels.graph import CONSUMER, PRODUCER, ChannelGraph
from onnxprune.channels.select import round_kept
from onnxprune.inputs.signature import resolve_input_shapes
from onnxprune.model.index import node_key
from onnxprune.model.io import ModelHandle
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.registry import complete_types, counted_nodes


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
    gates: Tuple[int, ...] = ()  # --depth: ids of the residual blocks whose branch holds it

    @property
    def groups(self) -> Tuple[int, ...]:
        return tuple(sorted({g for _, axes in self.factors for _, parts in axes
                             for g, _ in parts} | set(self.gates)))

    def fraction(self, kept: Mapping[int, float]) -> float:
        """The node's MAC fraction with group ``g`` keeping ``kept[g]`` of its channels (1 for
        groups not given; a gate at 0, a removed block, takes the node away)."""
        gate = float(np.prod([kept.get(g, 1.0) for g in self.gates])) if self.gates else 1.0
        if not self.factors:
            return gate
        total = 0.0
        for share, axes in self.factors:
            f = 1.0
            for size, parts in axes:
                f *= (size - sum(c for _, c in parts)
                      + sum(kept.get(g, 1.0) * c for g, c in parts)) / size
            total += share * f
        return float(total) * gate


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
    for node, macs in counted_nodes(proto.graph, shapes):
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
                    fixed_cost: float = 0.0,
                    budget_fn: Optional[Callable[[float], float]] = None,
                    curves: Optional[Mapping[int, Sequence[Tuple[float, float]]]] = None,
                    fixed_ladders: Optional[Mapping[int, Sequence[int]]] = None
                    ) -> Allocation:
    """Greedy widths (see the module doc) for the groups in ``scores`` (group id -> unit
    scores) so that ``fixed_cost + model_cost(nodes) <= budget`` (``budget_fn(dense cost)``
    when given: e.g. the dense cost over a speed-up). ``curves``: per group, measured damage
    at fractions removed (:func:`measured_damage`), used instead of the scores' sums.
    ``fixed_ladders``: per group, the counts it may keep (largest first) instead of the rounded
    ones (a residual block: ``[1, 0]``, kept or removed)."""
    curves = dict(curves or {})

    def damage_of(gid: int, k0: int, k1: int) -> float:
        """Damage of group ``gid`` going from ``k0`` to ``k1`` kept channels (k1 < k0 removes,
        k1 > k0 gives back: the value is then what giving back regains, positive)."""
        n = sizes[gid]
        lo, hi = sorted((k0, k1))
        if gid in curves:
            d = curve_at(curves[gid], (n - lo) / n) - curve_at(curves[gid], (n - hi) / n)
        else:
            d = float(sorted_scores[gid][n - hi: n - lo].sum()) / n
        return d * weights.get(gid, 1.0)

    weights = dict(weights or {})
    sizes = {gid: len(s) for gid, s in scores.items()}
    keep = dict(sizes)
    ladders = {gid: list((fixed_ladders or {}).get(gid) or
                         allowed_keeps(n, round_to, min_channels, max_group_sparsity))
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
    if budget_fn is not None:
        budget = budget_fn(before)

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
        damage = damage_of(gid, k0, k1)
        return damage / saving, saving, damage

    cands = {gid: move(gid) for gid in sizes}
    damage_total = 0.0
    while total > budget:
        live = [(c[0], gid) for gid, c in cands.items() if c is not None]
        if not live:
            break
        _, gid = min(live)
        # Any move that reaches the budget ends the search: then the least damage wins.
        final = [(cands[g][2], g) for _, g in live if total - cands[g][1] <= budget]
        if final:
            gid = min(final)[1]
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
    # The last move may overshoot the budget by a whole step of a costly group: give back the
    # steps (most damage per cost first) that still fit under the budget.
    while total <= budget:
        back = []
        for gid in sizes:
            if step[gid] == 0:
                continue
            n, k0, k1 = sizes[gid], ladders[gid][step[gid]], ladders[gid][step[gid] - 1]
            trial = dict(frac)
            trial[gid] = k1 / n
            extra = sum(cost(x, x.macs * x.fraction(trial)) - node_cost[x.key]
                        for x in by_group[gid])
            regain = damage_of(gid, k0, k1)
            if total + extra <= budget:
                back.append((-regain / max(extra, 1e-30), gid, regain))
        if not back:
            break
        _, gid, regain = min(back)
        step[gid] -= 1
        keep[gid] = ladders[gid][step[gid]]
        frac[gid] = keep[gid] / sizes[gid]
        damage_total -= regain
        for x in by_group[gid]:
            node_cost[x.key] = cost(x, x.macs * x.fraction(frac))
        total = fixed_cost + sum(node_cost.values())
    return Allocation(keep, sizes, before, total, budget, total <= budget, damage_total)


def curve_at(curve: Sequence[Tuple[float, float]], p: float) -> float:
    """Damage at fraction removed ``p`` on a measured curve (points ``(p, damage)``, starting
    at ``(0, 0)``): piecewise linear, made non-decreasing, the last segment's slope beyond."""
    xs = np.asarray([c[0] for c in curve], dtype=np.float64)
    ys = np.maximum.accumulate(np.asarray([c[1] for c in curve], dtype=np.float64))
    if p <= xs[-1] or len(xs) < 2:
        return float(np.interp(p, xs, ys))
    slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-12)
    return float(ys[-1] + slope * (p - xs[-1]))


#: --damage metric: the weight of the output error added to the metric's drop (a tie-breaker).
METRIC_TIE = 0.01


def measured_damage(handle: ModelHandle, graph: ChannelGraph, scores: Mapping[int, np.ndarray],
                    feeds: Sequence[Mapping[str, np.ndarray]],
                    levels: Union[Sequence[float], Mapping[int, Sequence[float]]] = (0.25, 0.5),
                    fits: Optional[Mapping[int, Sequence["ConsumerFit"]]] = None,
                    metric=None, base: Optional[Mapping[int, Sequence[int]]] = None
                    ) -> Dict[int, List[Tuple[float, float]]]:
    """Per group: ``[(0, 0), (p, error), ...]``, the model's relative output error
    ``sum ||y - y0||^2 / sum ||y0||^2`` over ``feeds`` with the group's lowest-scored fraction
    ``p`` of channels masked (exactly what removing them computes), each level alone
    (``levels``: the same for every group, or per group id).
    ``fits`` (``--damage refit``, :func:`consumer_fits`): per group, its consumers refit by
    least squares from the channels kept in each trial (:func:`~onnxprune.calibration.
    channel_scores.refit_columns`, dense input statistics), so the error is what is left after
    the consumers' refit, as the ``--refit`` model will have it. ``metric`` (the user's
    :class:`~onnxprune.runtime.evaluate.Metric`, its dense value measured): each trial's damage
    is instead the metric's drop ``dense - trial`` (at least 0; a non-finite value counts as
    1e6), plus :data:`METRIC_TIE` x the output error so that trials the metric cannot tell
    apart (a thresholded metric that does not move) still rank by how far the outputs moved.
    ``base`` (group id -> units already removed, the lowest-scored ones: a stage of
    ``--damage-stages``): every trial starts from the model with those masked, a group's levels
    lie past its own base (12.5 % and 25 % of the group further), and the damage is the
    increase over the base's (the curve is 0 up to the base: ``[(0, 0), (p0, 0), ...]``).

    One session serves every trial: the groups' stored tensors that are initializers become
    overridable graph inputs of a copy of the model, and each trial feeds its masked values.
    (A group with a tensor stored as a ``Constant`` node gets a session of its own per trial.)
    The handle is left as it was."""
    from onnxprune.channels.resize import mask_channels
    from onnxprune.ops._channel import ZERO_ON_MASK
    from onnxprune.runtime.session import open_session

    fits = dict(fits or {})
    inits = {t.name for t in handle.model.graph.initializer}
    bias_names = {f.bias.tensor.name for gid in scores for f in fits.get(gid, ())
                  if f.bias is not None}
    touched = sorted({m.tensor for gid in scores for m in graph.groups[gid].members
                      if m.stored and ZERO_ON_MASK.intersection(m.roles) and m.tensor in inits}
                     | (bias_names & inits))
    twin = ModelHandle(model=copy.deepcopy(handle.model), path=handle.path,
                       base_dir=handle.base_dir)
    for tensor, values in handle.rewritten_values():
        twin.write(twin.index.stored[tensor.name], values)
    stored = dict(twin.index.stored)  # before its initializers become inputs
    twin_view = _rebind(graph, stored)
    declared = {i.name for i in twin.model.graph.input}
    for name in touched:
        if name not in declared:
            t = graph.stored[name]
            twin.model.graph.input.append(
                onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    twin.graph_changed()
    base = {g: list(v) for g, v in (base or {}).items() if len(v)}

    def run(session, extra):
        return [np.asarray(o, dtype=np.float64) for f in feeds
                for o in session.run(None, {**dict(f), **extra})]

    if base:
        ref = run(open_session(handle), {})  # the dense outputs
        mask_channels(twin, base, twin_view)  # the session's defaults: the base masked
    shared = open_session(twin)
    if not base:
        ref = run(shared, {})
    norm = sum(float((r ** 2).sum()) for r in ref) or 1.0
    base_err = sum(float(((o - r) ** 2).sum()) for o, r in zip(run(shared, {}), ref)) / norm \
        if base else 0.0
    base_value = None
    if metric is not None:
        base_value = float(metric.dense) if not base else \
            metric.measure(twin, "trial", finite=False)
    curves: Dict[int, List[Tuple[float, float]]] = {}
    for gid, s in scores.items():
        group = graph.groups[gid]
        n = group.size
        order = np.argsort(s, kind="stable")
        names = sorted({m.tensor for m in group.members
                        if m.stored and ZERO_ON_MASK.intersection(m.roles)}
                       | {f.bias.tensor.name for f in fits.get(gid, ()) if f.bias is not None})
        k0 = len(base.get(gid, ()))
        curve = [(0.0, 0.0)] + ([(k0 / n, 0.0)] if k0 else [])
        own = levels.get(gid, ()) if isinstance(levels, Mapping) else levels
        for p in (own if not k0 else (k0 / n + 0.125, k0 / n + 0.25)):
            k = int(round(p * n))
            if k < 1 or k >= n or k / n <= curve[-1][0]:
                continue
            saved = {name: twin.read(stored[name]) for name in names}
            try:
                mask_channels(twin, {gid: sorted(order[:k].tolist())}, twin_view)
                for fit in fits.get(gid, ()):
                    fit.apply(twin, stored, saved, order[:k])
                if all(name in inits for name in names):
                    out = run(shared, {name: twin.read(stored[name]) for name in names})
                else:
                    out = run(open_session(twin), {})
                if metric is not None:
                    value = metric.measure(twin, "trial", finite=False)
            finally:
                for name, values in saved.items():
                    twin.write(stored[name], values)
            err = max(sum(float(((o - r) ** 2).sum()) for o, r in zip(out, ref)) / norm
                      - base_err, 0.0)
            if metric is not None:
                drop = max(base_value - value, 0.0) if np.isfinite(value) else 1e6
                err = drop + METRIC_TIE * err
            curve.append((k / n, err if np.isfinite(err) else 1e6))
        curves[gid] = curve
    return curves


@dataclass
class ConsumerFit:
    """One consumer weight of a group, refit in ``--damage refit`` trials: the weight, per unit
    of the group its ``W[out, in]`` columns, the dense input's ``X^T X / n`` and mean, and its
    stored bias (None: the refit uses the raw moment and moves no bias)."""

    weight: object
    units: List[np.ndarray]
    moment: np.ndarray
    mean: np.ndarray
    bias: object = None

    def apply(self, twin: ModelHandle, stored, saved, removed_units) -> None:
        """Write into ``twin`` (already masked) this consumer refit from the kept columns, the
        dense values taken from ``saved`` (name -> values before the trial)."""
        from onnxprune.calibration.channel_scores import refit_columns

        w = self.weight
        name = w.tensor.name
        dense = self.weight.layout.to_2d(saved[name])
        masked = self.weight.layout.to_2d(twin.read(stored[name]))
        cols = np.concatenate([self.units[u] for u in removed_units]) if len(removed_units) \
            else np.zeros(0, np.int64)
        new, shift = refit_columns(dense, self.moment, None if self.bias is None else self.mean,
                                   cols)
        dead = (masked == 0).all(axis=1) & (dense != 0).any(axis=1)  # rows the mask removed
        new[dead] = 0.0
        twin.write(stored[name], w.layout.from_2d(new).astype(saved[name].dtype))
        if self.bias is not None and shift is not None:
            b = saved[self.bias.tensor.name]
            shift = np.where(dead, 0.0, shift)
            twin.write(stored[self.bias.tensor.name],
                       (b.astype(np.float64) + self.bias.scale * shift.reshape(b.shape))
                       .astype(b.dtype))


def consumer_fits(handle: ModelHandle, graph: ChannelGraph, groups, data, batch_size: int = 8,
                  seed: int = 0) -> Dict[int, List[ConsumerFit]]:
    """Per group in ``groups``: its float consumer weights with their dense input statistics on
    ``data`` (Conv rows sampled as the refit samples them), for ``--damage refit``."""
    from onnxprune.calibration.channel_scores import consumer_units
    from onnxprune.calibration.statistics import collect_layer_stats
    from onnxprune.ops.weights import find_weights, stored_bias

    weights = [w for w in find_weights(handle)[0] if w.factor(handle) is None
               and not w.layout.view]
    wanted = consumer_units(graph, weights, set(groups))
    need = list({w.key: w for parts in wanted.values() for w, _ in parts}.values())
    if not need:
        return {}
    stats = collect_layer_stats(handle, need, data, want_hessian=True, batch_size=batch_size,
                                precision="float32", sample_rows=True, seed=seed)
    out: Dict[int, List[ConsumerFit]] = {}
    for gid, parts in wanted.items():
        for w, units in parts:
            st = stats.get(w.key)
            if st is None or st.hessian is None or w.tensor.name not in graph.stored:
                continue
            n = max(st.count, 1)
            out.setdefault(gid, []).append(ConsumerFit(
                w, units, st.hessian / n, st.in_sums / n, stored_bias(handle.index, w)))
    return out


def _rebind(graph: ChannelGraph, stored: Mapping[str, onnx.TensorProto]) -> ChannelGraph:
    """``graph`` with its stored tensors taken from ``stored`` (those of a copy of the model it
    was built on: same names, other protos)."""
    from dataclasses import replace

    return replace(graph, stored={k: stored.get(k, v) for k, v in graph.stored.items()})


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


def counted_macs(handle: ModelHandle,
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> int:
    """The model's MACs as :func:`onnxprune.report.macs.count_macs` counts them (the same
    registry formulas on the same shape inference), main graph only."""
    resolved = resolve_input_shapes(handle.model, input_shapes, require_all=False)
    shapes = infer_shapes(handle, resolved, keep_value_info=True,
                          complete=complete_types).static()
    return sum(macs for _, macs in counted_nodes(handle.model.graph, shapes))


class TargetPlan:
    """A ``--target-macs``/``--target-speedup`` allocation for one model: ``removed`` (group id
    -> units) to prune, then :meth:`finish` on the pruned model measures what was reached and
    :meth:`summary` / ``notes`` report it."""

    def __init__(self, handle: ModelHandle, allocation: Allocation, removed, nodes, kind: str,
                 target: float, input_shapes, threads, table=None, table_cached=False,
                 table_seconds: float = 0.0):
        self.allocation, self.removed, self.nodes = allocation, removed, nodes
        self.kind, self.target, self.input_shapes, self.threads = kind, target, input_shapes, \
            threads
        self.table, self.table_cached, self.table_seconds = table, table_cached, table_seconds
        self.macs_before = sum(n.macs for n in nodes)
        self.fixed_macs = counted_macs(handle, input_shapes) - self.macs_before
        self.macs_before += self.fixed_macs
        kept = {g: allocation.keep[g] / allocation.sizes[g] for g in allocation.keep}
        self.predicted_macs = self.fixed_macs + model_cost(nodes, kept)
        self.predicted_speedup = None
        if table is not None:
            from onnxprune.runtime.latency import predict_seconds

            dense = predict_seconds(table, nodes, {})
            self.predicted_speedup = dense / max(predict_seconds(table, nodes, kept), 1e-12)
        self.dense = None
        if kind == "speedup":  # the dense model, to time the pruned one against
            self.dense = ModelHandle(model=copy.deepcopy(handle.model), path=handle.path,
                                     base_dir=handle.base_dir)
            for tensor, values in handle.rewritten_values():
                self.dense.write(self.dense.index.stored[tensor.name], values)
        self.macs_after: Optional[int] = None
        self.measured: Optional[Tuple[float, float, float]] = None
        self.notes: List[str] = []
        self.blocks: List[str] = []  # --depth: Add names of the residual blocks to remove

    def finish(self, pruned: ModelHandle) -> None:
        """Count the pruned model's MACs (and with a speed-up target, time it against the
        dense model), and write the notes."""
        self.macs_after = counted_macs(pruned, self.input_shapes)
        ratio = self.macs_after / max(self.macs_before, 1)
        a = self.allocation
        narrowed = sum(1 for g in a.keep if a.keep[g] < a.sizes[g] and g in self.removed)
        if self.kind == "macs":
            head = (f"allocation: target MACs x{self.target:.3f}, reached x{ratio:.3f} "
                    f"(predicted x{self.predicted_macs / max(self.macs_before, 1):.3f})")
        else:
            from onnxprune.runtime.latency import measure_speedup

            resolved = resolve_input_shapes(pruned.model, self.input_shapes, require_all=False)
            self.measured = measure_speedup(self.dense, pruned, resolved, self.threads)
            threads = (f"{self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads
                       else "onnxruntime's default threads")
            head = (f"allocation: target speed-up x{self.target:.2f}, predicted "
                    f"x{self.predicted_speedup:.2f}, measured x{self.measured[2]:.2f} "
                    f"(onnxruntime CPU, {threads}, median of interleaved runs); "
                    f"MACs x{ratio:.3f}")
            widths = ", ".join(f"{w:g}" for w in self.table.widths)
            self.notes.append(
                f"latency table ({len(self.table.nodes)} layers at widths {widths}): "
                + ("read from the cache" if self.table_cached else
                   f"measured in {self.table_seconds:.1f} s, cached for the next run"))
        self.notes.append(f"{head}; {narrowed} of {len(a.keep)} groups narrowed")
        if not a.reached:
            self.notes.append("allocation: the target was not reached: every group is at its "
                              "narrowest allowed width (--min-channels, --round-to, "
                              "--max-group-sparsity)")

    def summary(self, graph: ChannelGraph) -> dict:
        a = self.allocation
        out = {"target": {self.kind: self.target}, "reached": bool(a.reached),
               "macs_before": int(self.macs_before), "macs_after": self.macs_after,
               "macs_ratio": (None if self.macs_after is None
                              else self.macs_after / max(self.macs_before, 1)),
               "predicted_macs_ratio": self.predicted_macs / max(self.macs_before, 1),
               "predicted_speedup": self.predicted_speedup,
               "groups": [{"group": gid, "describe": graph.groups[gid].describe(),
                           "channels": a.sizes[gid], "kept": a.keep[gid]}
                          for gid in sorted(a.keep) if gid < len(graph.groups)]}
        if self.blocks:
            out["blocks_removed"] = list(self.blocks)
        if self.measured is not None:
            out.update(measured_speedup=self.measured[2], dense_seconds=self.measured[0],
                       pruned_seconds=self.measured[1], threads=self.threads,
                       table_cached=self.table_cached)
        return out


def allocate_for_target(handle: ModelHandle, graph: ChannelGraph,
                        target_macs: Optional[float] = None,
                        target_speedup: Optional[float] = None, threads: Optional[int] = None,
                        input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                        criterion: str = "l1", round_to: int = 1, min_channels: int = 1,
                        max_group_sparsity: float = 0.9, channel_scores=None,
                        table=None, calibration=None, damage_samples: int = 8,
                        blocks: Optional[Sequence] = None, speed_checks: int = 2,
                        damage: str = "output", metric=None, damage_stages: int = 1
                        ) -> TargetPlan:
    """Per-group widths for ``target_macs`` (keep this fraction of the model's MACs) or
    ``target_speedup`` (predicted from the latency table, measured with ``threads``; ``table``
    injects one, e.g. in tests) on the groups left prunable in ``graph``. ``blocks``
    (:func:`~onnxprune.channels.depth.find_residual_blocks`; needs ``calibration``): residual
    blocks offered in the same allocation, each kept or removed (``plan.blocks``: the ``Add``
    names of those to remove). ``speed_checks``: with a measured table, times the pruned
    model and allocates again (up to this many times) for a corrected goal when it misses the
    target, or bisects back when a raised goal passes it by more than 10 %; the lowest goal
    measured on target is kept (the notes list each goal and measured speed-up). ``damage``:
    ``output`` (each group's trial masks it alone) or ``refit`` (its consumers refit by least squares in each
    trial, :class:`ConsumerFit`), ``metric`` / ``metric-refit`` (the same trials scored by
    ``metric``, the user's :class:`~onnxprune.runtime.evaluate.Metric`: its drop from the dense
    value). ``damage_stages`` (> 1, with calibration data): the allocation is reached in that
    many steps, the damage measured again after each on the model with what was chosen so far
    masked (``measured_damage(base=...)``), so groups are judged together with the others'
    removal instead of each alone."""
    from onnxprune.channels.select import group_scores

    scores = group_scores(handle, graph, criterion, channel_scores)
    nodes = node_costs(handle, graph, input_shapes)
    curves, damage_note, fits, scored, feeds = None, None, None, None, []
    if calibration is not None and len(calibration) and not getattr(calibration, "data_free",
                                                                     False):
        start = time.perf_counter()
        data = calibration.take(damage_samples)
        feeds = list(data.batches(data.fixed_batch or damage_samples))
        fits = (consumer_fits(handle, graph, scores, data, batch_size=data.fixed_batch or 8)
                if damage in ("refit", "metric-refit") else None)
        scored = metric if damage.startswith("metric") else None
        curves = measured_damage(handle, graph, scores, feeds, fits=fits, metric=scored)
        how = ("" if fits is None else
               f", its consumers refit by least squares ({len(fits)} groups with a consumer "
               "to refit)")
        if scored is not None:
            trials = sum(len(c) - 1 for c in curves.values())
            how += (f"; scored by {scored.source} (its drop from the dense "
                    f"{float(scored.dense):.4g}, ties broken by {METRIC_TIE} x the output "
                    f"error): {trials} evaluations")
        damage_note = (f"allocation: damage measured per group as the output error on "
                       f"{len(data)} calibration samples with 25 % and 50 % of its channels "
                       f"removed{how} ({len(curves)} groups, {time.perf_counter() - start:.1f} s)")
        if blocks:
            nodes, extra = _offer_blocks(handle, graph, blocks, nodes, feeds)
            for bid, curve in extra.items():
                scores[bid], curves[bid] = np.ones(1), curve
    ladders = {bid: [1, 0] for bid in scores if bid >= len(graph.groups)}
    total = counted_macs(handle, input_shapes)
    fixed = total - sum(n.macs for n in nodes)
    common = dict(round_to=round_to, min_channels=min_channels,
                  max_group_sparsity=max_group_sparsity)

    def restage(stage_alloc) -> None:
        """--damage-stages: allocate part of the way, measure the damage again from there."""
        if curves is None or damage_stages <= 1:
            return
        start = time.perf_counter()
        channel = {g: s for g, s in scores.items() if g < len(graph.groups)}
        for k in range(1, damage_stages):
            part = stage_alloc(k / damage_stages)
            base = {g: v for g, v in part.removed(scores).items() if g in channel and v}
            curves.update(measured_damage(handle, graph, channel, feeds, fits=fits,
                                          metric=scored, base=base))
        notes.append(f"allocation: damage measured again at {damage_stages - 1} intermediate "
                     f"allocation(s) on the model with the channels chosen so far masked "
                     f"({time.perf_counter() - start:.1f} s)")

    notes: List[str] = []
    extended: Dict[int, List[float]] = {}

    def within_measured(make) -> Allocation:
        """``make()``'s allocation, where it takes a group past the largest fraction its
        damage was measured at, measured there too and allocated again (up to 3 times): past
        its last point a curve is only extrapolated linearly, which underrates removing most
        of a group (MiniLM: 10 of 12 heads in five layers, output cosine 0.82)."""
        alloc = make()
        for _ in range(3):
            if curves is None:
                break
            far = {gid: (alloc.sizes[gid] - kept) / alloc.sizes[gid]
                   for gid, kept in alloc.keep.items()
                   if gid < len(graph.groups) and gid in curves and alloc.sizes[gid]
                   and (alloc.sizes[gid] - kept) / alloc.sizes[gid] > curves[gid][-1][0] + 1e-9}
            if not far:
                break
            more = measured_damage(handle, graph, {g: scores[g] for g in far}, feeds,
                                   levels={g: (p,) for g, p in far.items()}, fits=fits,
                                   metric=scored)
            for gid, curve in more.items():
                curves[gid] = sorted(set(curves[gid]) | set(curve[1:]))
                extended.setdefault(gid, []).extend(p for p, _ in curve[1:])
            alloc = make()
        return alloc

    def extended_note() -> List[str]:
        if not extended:
            return []
        return [f"allocation: {len(extended)} group(s) taken past their measured damage "
                f"levels were measured there as well and allocated again ("
                + ", ".join(f"group {g} at {', '.join(f'{100 * p:.0f} %' for p in ps)}"
                            for g, ps in sorted(extended.items())[:6])
                + (", ..." if len(extended) > 6 else "") + ")"]

    if target_macs is not None:
        restage(lambda f: allocate_widths(
            scores, nodes, total * (1.0 - (1.0 - target_macs) * f), mac_cost, fixed_cost=fixed,
            curves=curves, fixed_ladders=ladders, **common))
        alloc = within_measured(lambda: allocate_widths(
            scores, nodes, target_macs * total, mac_cost, fixed_cost=fixed, curves=curves,
            fixed_ladders=ladders, **common))
        plan = TargetPlan(handle, alloc, alloc.removed(scores), nodes, "macs", target_macs,
                          input_shapes, threads)
        plan.notes += ([damage_note] if damage_note else []) + notes + extended_note()
        return _with_blocks(plan, graph, blocks)
    from onnxprune.runtime.latency import latency_table

    start, cached, checks = time.perf_counter(), True, (speed_checks if table is None else 0)
    if table is None:
        table, cached = latency_table(
            handle, lambda w: uniform_width(handle, w, round_to, min_channels, input_shapes),
            input_shapes, round_to, min_channels, threads=threads)
    elapsed = time.perf_counter() - start
    restage(lambda f: allocate_widths(
        scores, nodes, 0.0, latency_cost(table), fixed_cost=table.rest_model()[0], **common,
        budget_fn=lambda dense: dense / (1.0 + (target_speedup - 1.0) * f), curves=curves,
        fixed_ladders=ladders))
    goal, tried = target_speedup, []
    short, met, best = None, None, None  # highest goal that missed, lowest that met (+ plan)
    for attempt in range(checks + 1):
        alloc = within_measured(lambda g=goal: allocate_widths(
            scores, nodes, 0.0, latency_cost(table), fixed_cost=table.rest_model()[0],
            **common, budget_fn=lambda dense: dense / g, curves=curves, fixed_ladders=ladders))
        plan = _with_blocks(TargetPlan(handle, alloc, alloc.removed(scores), nodes, "speedup",
                                       target_speedup, input_shapes, threads, table, cached,
                                       elapsed), graph, blocks)
        if not checks:
            break
        # The table predicts; the pruned model is what counts: time it, and where it misses
        # the target allocate again for a higher goal; where a raised goal passes it by far,
        # bisect back between the goal that missed and the one that met it (every removed
        # channel past the target costs accuracy). The lowest goal measured on target wins.
        measured = _check_speedup(handle, graph, plan, input_shapes, threads, round_to)
        tried.append((goal, measured))
        if measured >= target_speedup * 0.98:
            met, best = goal, plan
            if short is None or measured <= target_speedup * 1.1:
                break
        else:
            short = goal
        if attempt == checks:
            break
        if met is not None:
            goal = (short + met) / 2.0
        else:
            goal = min(goal * target_speedup / max(measured, 1e-6), 4.0 * target_speedup)
    if best is not None and best is not plan:
        plan, goal = best, met
    if tried:
        plan.notes.append("speed-up check, the pruned model timed: " + "; ".join(
            f"goal x{g:.2f} measured x{m:.2f}" for g, m in tried) + f"; final goal x{goal:.2f}")
    plan.notes += ([damage_note] if damage_note else []) + notes + extended_note()
    return plan


def _check_speedup(handle: ModelHandle, graph: ChannelGraph, plan: "TargetPlan",
                   input_shapes, threads, round_to: int) -> float:
    """The measured speed-up of ``plan`` applied to a copy of ``handle`` (channels resized,
    blocks removed), dense and pruned timed interleaved with ``threads``."""
    from onnxprune.channels.graph import build_channel_graph
    from onnxprune.channels.depth import _copy, remove_blocks
    from onnxprune.channels.resize import resize_channels
    from onnxprune.runtime.latency import measure_speedup

    twin = _copy(handle)
    twin_graph = build_channel_graph(twin, input_shapes)
    if [(g.size, sorted(g.producers)) for g in twin_graph.groups] != \
            [(g.size, sorted(g.producers)) for g in graph.groups]:
        raise RuntimeError("internal error: the channel graph of a copy of the model differs; "
                           "nothing was written (please report this model)")
    resize_channels(twin, twin_graph, plan.removed)
    if plan.blocks:
        remove_blocks(twin, plan.blocks, input_shapes)
    resolved = resolve_input_shapes(twin.model, input_shapes, require_all=False)
    return measure_speedup(handle, twin, resolved, threads)[2]


def _offer_blocks(handle: ModelHandle, graph: ChannelGraph, blocks: Sequence, nodes, feeds):
    """``nodes`` with each block's branch nodes gated by the block's id (``len(graph.groups)
    + i``), and per block id its measured damage curve ``[(0, 0), (1, error)]``."""
    from dataclasses import replace

    from onnxprune.channels.depth import block_damage

    by_output = {n.output[0]: node_key(n) for n in handle.model.graph.node if n.output}
    gates: Dict[str, List[int]] = {}
    for i, b in enumerate(blocks):
        for out in b.branch:
            gates.setdefault(by_output.get(out, ""), []).append(len(graph.groups) + i)
    damage = block_damage(handle, blocks, feeds)
    nodes = [replace(n, gates=tuple(gates[n.key])) if n.key in gates else n for n in nodes]
    return nodes, {len(graph.groups) + i: [(0.0, 0.0), (1.0, d)] for i, d in enumerate(damage)}


def _with_blocks(plan: "TargetPlan", graph: ChannelGraph, blocks) -> "TargetPlan":
    """Split the residual blocks the allocation removed out of the channel removals."""
    n = len(graph.groups)
    plan.blocks = [blocks[gid - n].add for gid in sorted(plan.removed)
                   if gid >= n and plan.removed[gid]]
    plan.removed = {gid: v for gid, v in plan.removed.items() if gid < n}
    if blocks:
        plan.notes.append(f"depth: {len(plan.blocks)} of {len(blocks)} residual blocks removed "
                          "(damage: the output error with the block alone removed)"
                          + (f": {', '.join(plan.blocks[:5])}" if plan.blocks else ""))
    return plan


def latency_cost(table) -> CostFn:
    """Seconds of a node at some MACs from a latency table, with its share of the rest that
    scales with it (:meth:`~onnxprune.runtime.latency.LatencyTable.rest_model`; 0 for nodes
    the table lacks: their time is in the table's rest)."""
    scale = 1.0 + table.rest_model()[1]

    def cost(node: NodeCost, macs: float) -> float:
        s = table.seconds(node.key, macs)
        return 0.0 if s is None else s * scale
    return cost
