"""The channel dependency graph: which channels of which tensors must be removed together.

A *dim* is one axis of one tensor, ``(tensor name, axis)``; stored tensors (initializers and
``Constant`` values) have dims too, which is how weights, biases, BN parameters and per-channel
constants get sliced. Per-op rules (the ``channels`` field of each op's registry entry, applied
by :mod:`.rules`) tie dims of a node's inputs and outputs:

* ``tie(a, b)`` — the two axes are the same channels, index for index (Relu, BN, residual Add).
  These are joined by a union-find over dims (level 1), cheap however large the axis.
* ``tie_map(a, ia, b, ib)`` — index ``ia[k]`` of ``a`` is index ``ib[k]`` of ``b`` (Concat/Split
  offsets, Flatten's ``c -> c*H*W + k`` block, heads, grouped-conv positions). Level-1 classes
  touched by such ties are split into one atom per index and joined by connected components
  (level 2).

A *unit* is one connected set of (dim, index) positions: removing it removes every one of those
positions, which keeps every node's inputs and outputs consistent. Units that touch the same dims
the same number of times form a :class:`ChannelGroup` (e.g. the 64 output channels of a conv and
everything they flow into); channel ``i`` of a group is unit ``i``.

Anything a rule cannot map is *frozen*, never guessed: ops without a rule, axes a rule leaves
untied, graph inputs/outputs, tensors read inside subgraphs, sizes shape inference could not fix.
A group is prunable when it is not frozen and at least one weight produces its channels.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.model.index import node_key
from onnxprune.model.io import ModelHandle
from onnxprune.model.shapes import Shape, infer_shapes
# Roles a stored tensor's axis plays in a group, defined beside the rules that assign them.
from onnxprune.ops._channel import CONSUMER, PRODUCER, ZERO_ON_MASK
from onnxprune.ops.quant import zero_value
from onnxprune.ops.registry import copies_values, field_of, shape_only
from onnxprune.ops.weights import FLOAT_TYPES
from onnxprune.ops.shapevec import complete_shapes
from onnxprune.channels.rules import apply_rules
from onnxprune.channels.zeros import check_zeros



#: Ops of a small constant computation the builder evaluates (:meth:`Builder._fold`), and the
#: largest tensor it reads or gives.
_FOLD_OPS = frozenset({"Constant", "ConstantOfShape", "Mul", "Add", "Sub", "Div", "Neg", "Abs",
                       "Equal", "Where", "Not", "And", "Or", "Greater", "Less", "Max", "Min",
                       "Concat", "Cast", "Identity", "Unsqueeze", "Squeeze", "Gather", "Slice",
                       "Range", "Reshape"})
_FOLD_SIZE = 64
#: The longest axis split into per-position atoms (the largest vocabularies are ~2**18).
_ATOM_LIMIT = 1 << 24


@dataclass
class Member:
    """One dim of a group: channel ``i`` of the group is ``index_map[i]`` (one or more indices)."""

    tensor: str
    axis: int
    index_map: np.ndarray  # int64 [group size, count]
    stored: bool  # a stored tensor (sliced on resize) rather than an activation
    roles: Tuple[str, ...] = ()

    def indices(self, units: Sequence[int]) -> np.ndarray:
        return np.sort(self.index_map[np.asarray(units, dtype=np.int64)].ravel())


@dataclass
class ChannelGroup:
    """Channels that are removed together; ``size`` units, each one channel of every member."""

    id: int
    size: int
    members: List[Member]
    producers: List[str]  # stored weights whose out-channels are in the group
    consumers: List[str]  # stored weights whose input channels are in the group
    frozen: Optional[str] = None  # why it cannot be pruned, None when it can
    #: set when a statistic over every channel reads the group (an RMSNorm's mean of squares:
    #: a transformer's residual stream), which its removal keeps exact: what reads it
    stream: Optional[str] = None

    @property
    def prunable(self) -> bool:
        return self.frozen is None

    def describe(self) -> str:
        names = self.producers or [m.tensor for m in self.members]
        head = ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        return f"group {self.id} [{self.size} ch: {head}]"


@dataclass
class ChannelGraph:
    """All channel groups of a model, plus what resize needs to rewrite attributes and shapes."""

    groups: List[ChannelGroup]
    rewrites: List[Tuple[onnx.NodeProto, Callable]]  # (node, fn(node, ResizeContext))
    stored: Dict[str, onnx.TensorProto]
    shapes: Dict[str, Shape]
    roles: Dict[Tuple[str, int], List[Tuple[str, str, int]]]  # (stored, axis) -> (role, node, input)
    # integer stored tensors whose masked entries are written as their zero point, not 0
    zero_values: Dict[str, np.ndarray] = field(default_factory=dict)
    # small vectors computed from constants only (Builder.const_value), by value name
    folded: Dict[str, np.ndarray] = field(default_factory=dict)

    def frozen(self) -> List[Tuple[str, str]]:
        return [(g.describe(), g.frozen) for g in self.groups if g.frozen]

    def prunable(self) -> List[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def freeze_rate(self) -> float:
        """Fraction of groups with a producer weight that are frozen (a quality signal)."""
        with_producer = [g for g in self.groups if g.producers]
        if not with_producer:
            return 0.0
        return sum(1 for g in with_producer if g.frozen) / len(with_producer)

    def group_of(self, key: Union[int, str]) -> ChannelGroup:
        if isinstance(key, int):
            return self.groups[key]
        matches = [g for g in self.groups if key in g.producers]
        if len(matches) != 1:
            raise KeyError(f"weight '{key}' produces channels of {len(matches)} groups; "
                           "give channel scores per group id instead")
        return matches[0]


# -- building -------------------------------------------------------------------------------
class _DSU:
    def __init__(self) -> None:
        self.parent: List[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected-component label (smallest member) of each of ``n`` atoms joined by edges u-v."""
    p = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return p
    while True:
        pu, pv = p[u], p[v]
        if np.array_equal(pu, pv):
            return p
        lo, hi = np.minimum(pu, pv), np.maximum(pu, pv)
        np.minimum.at(p, hi, lo)  # hook each root under the smaller root it touches
        while True:  # pointer jumping to roots
            pp = p[p]
            if np.array_equal(pp, p):
                break
            p = pp


class Builder:
    """Collects ties, roles, freezes and rewrites while rules run over the graph in order."""

    def __init__(self, handle: ModelHandle, input_shapes=None) -> None:
        self.handle = handle
        self.graph = handle.model.graph
        self.index = handle.index
        inferred = infer_shapes(handle, input_shapes, upgrade=False, complete=complete_shapes)
        self.shapes: Dict[str, Shape] = dict(inferred.shapes)
        self.types: Dict[str, int] = dict(inferred.types)
        self.stored: Dict[str, onnx.TensorProto] = dict(self.index.stored)
        # value -> [(node, input index)]; rules read it with .get
        self.consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = self.index.main.consumers
        for name, t in self.stored.items():
            self.shapes[name] = tuple(int(d) for d in t.dims)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.dsu = _DSU()
        self.dim_id: Dict[Tuple[str, int], int] = {}
        self.dim_size: List[Optional[int]] = []
        self.map_ties: List[Tuple[int, np.ndarray, int, np.ndarray]] = []
        self.frozen_keys: Dict[Tuple[str, Optional[int]], str] = {}
        self.roles: Dict[Tuple[str, int], List[Tuple[str, str, int]]] = defaultdict(list)
        self.rewrites: List[Tuple[onnx.NodeProto, Callable]] = []
        # (tensor, axis, why, stream): reduced over; exact only where removed channels hold 0
        # (zeros.py); stream: a normalization (RMSNorm), kept whole unless --prune-stream
        self.need_zero: List[Tuple[str, int, str, bool]] = []
        self.zero_values: Dict[str, np.ndarray] = {}  # see ChannelGraph.zero_values
        self._zero_cache: Dict[str, Optional[np.ndarray]] = {}
        self._const_cache: Dict[str, Optional[np.ndarray]] = {}
        self._folded: Dict[str, np.ndarray] = {}  # what _fold computed, by value name
        self.linked: Dict[int, bool] = {}  # level-1 root -> reaches a weight (for Reshape carriers)

    # -- shapes and constants -------------------------------------------------------------
    def shape(self, name: str) -> Optional[Shape]:
        return self.shapes.get(name)

    def size(self, name: str, axis: int) -> Optional[int]:
        s = self.shape(name)
        if s is None or axis >= len(s):
            return None
        return s[axis] if isinstance(s[axis], int) else None

    def stored_source(self, name: str, axis: int) -> Optional[Tuple[str, int]]:
        """The stored tensor and axis a constant input comes from, through Cast/Identity/
        Transpose/Reshape-like ops; None when it is computed otherwise (or is an activation)."""
        seen = 0
        while name not in self.stored:
            node = self.index.producer(name)
            if node is None or seen > 16 or node.domain not in ("", "ai.onnx"):
                return None
            # The op's registry entry says which input axis this one is (Cast/Identity,
            # Transpose, Reshape-like ops), or None.
            source = field_of(node, "axis_source")
            axis = None if source is None else source(node, axis, self.shape)
            if axis is None:
                return None
            name = node.input[0]
            seen += 1
        return name, axis

    def is_const(self, name: str) -> bool:
        """True for stored tensors and values computed from stored tensors only."""
        seen = set()
        stack = [name]
        while stack:
            n = stack.pop()
            if n in self.stored or n in seen or not n:
                continue
            seen.add(n)
            node = self.index.producer(n)
            if node is None or shape_only(node):
                return False
            stack.extend(node.input)
        return True

    def const_value(self, name: str) -> Optional[np.ndarray]:
        """Values of a small constant input (shape vectors, axes, split sizes), else None."""
        if name in self._const_cache:
            return self._const_cache[name]
        value = None
        src = name
        while src not in self.stored:
            node = self.index.producer(src)
            if node is None or not copies_values(node):
                break
            src = node.input[0]
        if src in self.stored:
            value = self.handle.read(self.stored[src])
        else:
            value = self._fold(name)
        self._const_cache[name] = value
        return value

    def _fold(self, name: str) -> Optional[np.ndarray]:
        """A small integer/bool vector computed from small stored tensors only (torch's
        ``expand(-1, 2, -1)`` target, ``Where(Equal(v, -1), 1s, v)``), evaluated once with
        onnx's reference evaluator; None for anything else."""
        nodes, leaves, stack = {}, set(), [name]
        while stack:
            n = stack.pop()
            if not n or n in leaves or n in nodes:
                continue
            if n in self.stored:
                if int(np.prod(self.stored[n].dims)) > _FOLD_SIZE:
                    return None
                leaves.add(n)
                continue
            node = self.index.producer(n)
            if node is None or node.domain not in ("", "ai.onnx") or \
                    node.op_type not in _FOLD_OPS or len(nodes) >= 32 or \
                    not self._small_output(node):
                return None
            for o in node.output:
                nodes[o] = node
            stack.extend(node.input)
        order = {id(n): i for i, n in enumerate(self.graph.node)}
        chain = sorted({id(n): n for n in nodes.values()}.values(), key=lambda n: order.get(
            id(n), -1))
        try:
            from onnx.reference import ReferenceEvaluator

            graph = onnx.helper.make_graph(
                chain, "fold", [], [onnx.helper.make_tensor_value_info(name, 0, None)],
                [onnx.numpy_helper.from_array(self.handle.read(self.stored[t]), t)
                 for t in sorted(leaves)])
            model = onnx.helper.make_model(graph, opset_imports=list(
                self.handle.model.opset_import))
            value = np.asarray(ReferenceEvaluator(model).run(None, {})[0])
        except Exception:  # anything the evaluator cannot run stays computed (frozen)
            return None
        if value.size > _FOLD_SIZE or value.dtype.kind not in "iub":
            return None
        self._folded[name] = value
        return value

    def _small_output(self, node: onnx.NodeProto) -> bool:
        """Whether an op that makes a tensor from a size (``ConstantOfShape``, ``Range``) makes a
        small one, by its stored inputs; other folded ops only combine small inputs. A hostile
        file's ``ConstantOfShape([10**9])`` is never evaluated."""
        if node.op_type not in ("ConstantOfShape", "Range"):
            return True
        vals = [self.handle.read(self.stored[i]) if i in self.stored else None
                for i in node.input]
        if any(v is None or v.size > _FOLD_SIZE for v in vals):
            return False
        if node.op_type == "ConstantOfShape":
            return bool(np.all(vals[0] >= 0)) and int(np.prod(vals[0])) <= _FOLD_SIZE ** 2
        if len(vals) != 3 or any(v.size != 1 for v in vals) or float(vals[2]) == 0:
            return False
        count = np.ceil((float(vals[1]) - float(vals[0])) / float(vals[2]))
        return bool(np.isfinite(count)) and count <= _FOLD_SIZE ** 2

    # -- dims --------------------------------------------------------------------------------
    def dim(self, name: str, axis: int, size: Optional[int] = None) -> int:
        key = (name, axis)
        d = self.dim_id.get(key)
        known = self.size(name, axis)
        if d is None:
            d = self.dsu.add()
            self.dim_id[key] = d
            self.dim_size.append(known if known is not None else size)
        elif self.dim_size[d] is None and size is not None:
            self.dim_size[d] = size
        return d

    def freeze(self, name: str, axis: Optional[int], reason: str) -> None:
        self.frozen_keys.setdefault((name, axis), reason)

    def tie(self, a: Tuple[str, int], b: Tuple[str, int], why: str = "") -> bool:
        sa, sb = self.size(*a), self.size(*b)
        if sa is not None and sb is not None and sa != sb:
            reason = f"{why or 'tie'}: sizes differ ({a[0]}[{a[1]}]={sa}, {b[0]}[{b[1]}]={sb})"
            self.freeze(*a, reason)
            self.freeze(*b, reason)
            return False
        size = sa if sa is not None else sb
        da, db = self.dim(*a, size), self.dim(*b, size)
        ra, rb = self.dsu.find(da), self.dsu.find(db)
        linked = self.linked.get(ra, False) or self.linked.get(rb, False)
        self.dsu.union(da, db)
        self.linked[self.dsu.find(da)] = linked
        return True

    def tie_map(self, a: Tuple[str, int], ia, b: Tuple[str, int], ib, size_a: int,
                size_b: int) -> None:
        da, db = self.dim(*a, size_a), self.dim(*b, size_b)
        ia = np.asarray(ia, dtype=np.int64).ravel()
        ib = np.asarray(ib, dtype=np.int64).ravel()
        assert ia.shape == ib.shape
        self.map_ties.append((da, ia, db, ib))
        linked = self.is_linked(a) or self.is_linked(b)
        self.linked[self.dsu.find(da)] = linked
        self.linked[self.dsu.find(db)] = linked

    def is_linked(self, key: Tuple[str, int]) -> bool:
        d = self.dim_id.get(key)
        return d is not None and self.linked.get(self.dsu.find(d), False)

    def role(self, name: str, axis: int, role: str, node: onnx.NodeProto, index: int) -> bool:
        """Record that a constant input's axis plays ``role``; False (and frozen) if the constant
        is computed in-graph in a way resize cannot slice."""
        src = self.stored_source(name, axis)
        if src is None:
            if role in ZERO_ON_MASK:
                self.freeze(name, axis, f"{node.op_type} '{node.name}': {role} '{name}' is "
                                        "computed in-graph, not a stored tensor")
                return False
            return True
        if role in ZERO_ON_MASK:
            # An integer tensor is masked by writing the value its readers dequantize to 0 (a
            # table's zero point; weights get roles only with zero point 0, their rules check).
            value = self.zero_value(src[0])
            if value is not None and np.any(value != 0):
                self.zero_values[src[0]] = value
        self.roles[src].append((role, node_key(node), index))
        d = self.dim(*src)
        self.linked[self.dsu.find(d)] = True
        return True

    def zero_value(self, name: str) -> Optional[np.ndarray]:
        """The value that reads as 0 in the stored integer tensor ``name`` (a quantized table's
        zero point: :func:`onnxprune.ops.quant.zero_value`); None for float tensors or when
        there is none."""
        if name not in self.stored or self.stored[name].data_type in FLOAT_TYPES:
            return None
        if name not in self._zero_cache:
            self._zero_cache[name] = zero_value(self.index, name, self.const_value)
        return self._zero_cache[name]

    def sink(self, name: str, axis: int, node: onnx.NodeProto, index: int) -> None:
        """A weight-free op reduces over this activation axis (x @ y between activations): a
        channel's value matters there even though no consumer weight reads it."""
        self.roles[(name, axis)].append(("sink", node_key(node), index))

    # -- finishing ---------------------------------------------------------------------------
    def finish(self) -> ChannelGraph:
        n_dims = len(self.dim_size)
        root = np.array([self.dsu.find(i) for i in range(n_dims)], dtype=np.int64)
        keys = {d: k for k, d in self.dim_id.items()}
        class_dims: Dict[int, List[int]] = defaultdict(list)
        for d in range(n_dims):
            class_dims[int(root[d])].append(d)
        class_size: Dict[int, Optional[int]] = {}
        class_frozen: Dict[int, str] = {}
        for c, dims in class_dims.items():
            sizes = {self.dim_size[d] for d in dims if self.dim_size[d] is not None}
            class_size[c] = sizes.pop() if len(sizes) == 1 else None
            if len(sizes) > 0:
                class_frozen[c] = "inconsistent sizes across tied tensors"
        by_name: Dict[str, List[int]] = defaultdict(list)
        for (name, axis), d in self.dim_id.items():
            by_name[name].append(d)
        for (name, axis), reason in self.frozen_keys.items():
            targets = by_name.get(name, []) if axis is None else (
                [self.dim_id[(name, axis)]] if (name, axis) in self.dim_id else [])
            for d in targets:
                class_frozen.setdefault(int(root[d]), reason)

        # Level 2: atoms for classes with index maps.
        atomized = sorted({int(root[da]) for da, _, _, _ in self.map_ties}
                          | {int(root[db]) for _, _, db, _ in self.map_ties})
        # An axis longer than any channel axis (a hostile ConstantOfShape([10**9])) is not split
        # into atoms: frozen, and every class an index map ties to it too (kept whole with it).
        huge = {c for c in atomized if (class_size[c] or 0) > _ATOM_LIMIT}
        map_ties = self.map_ties
        if huge:
            for c in huge:
                class_frozen.setdefault(c, f"an axis of {class_size[c]} positions, longer than "
                                           "any channel axis")
            for da, _, db, _ in map_ties:
                a, b = int(root[da]), int(root[db])
                if a in huge or b in huge:
                    for c in (a, b):
                        class_frozen.setdefault(c, "tied by index to an axis of more than "
                                                   f"{_ATOM_LIMIT} positions")
            map_ties = [t for t in map_ties if int(root[t[0]]) not in huge and
                        int(root[t[2]]) not in huge]
            atomized = [c for c in atomized if c not in huge]
        base: Dict[int, int] = {}
        total = 0
        for c in atomized:
            if class_size[c] is None:
                class_frozen.setdefault(c, "channel count unknown (shape inference)")
                class_size[c] = max(int(ia.max()) + 1 for da, ia, db, ib in map_ties
                                    if root[da] == c) if any(root[da] == c for da, *_ in
                                                             map_ties) else 1
            base[c] = total
            total += int(class_size[c])
        us, vs = [], []
        for da, ia, db, ib in map_ties:
            us.append(base[int(root[da])] + ia)
            vs.append(base[int(root[db])] + ib)
        u = np.concatenate(us) if us else np.zeros(0, np.int64)
        v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
        label = _components(total, u, v)

        # Units grouped by signature (class, count) -> group.
        raw_groups: List[Tuple[List[int], Dict[int, np.ndarray]]] = []  # classes, maps
        for c in class_dims:
            if c in base or class_size[c] is None or class_size[c] > _ATOM_LIMIT:
                continue  # no units for an axis longer than any channel axis (left whole)
            n = int(class_size[c])
            raw_groups.append(([c], {c: np.arange(n, dtype=np.int64)[:, None]}))
        if total:
            atom_class = np.empty(total, dtype=np.int64)
            atom_index = np.empty(total, dtype=np.int64)
            for c in atomized:
                n = int(class_size[c])
                atom_class[base[c]:base[c] + n] = c
                atom_index[base[c]:base[c] + n] = np.arange(n)
            order = np.lexsort((atom_index, atom_class, label))
            lab_sorted = label[order]
            starts = np.flatnonzero(np.r_[True, lab_sorted[1:] != lab_sorted[:-1]])
            ends = np.r_[starts[1:], total]
            sig_units: Dict[tuple, List[Tuple[int, int]]] = defaultdict(list)
            cls_sorted, idx_sorted = atom_class[order], atom_index[order]
            for s, e in zip(starts.tolist(), ends.tolist()):
                cl = cls_sorted[s:e]
                uniq, counts = np.unique(cl, return_counts=True)
                sig = tuple(zip(uniq.tolist(), counts.tolist()))
                sig_units[sig].append((s, e))
            for sig, spans in sig_units.items():
                maps: Dict[int, List[np.ndarray]] = {c: [] for c, _ in sig}
                for s, e in spans:
                    cl, ix = cls_sorted[s:e], idx_sorted[s:e]
                    for c, _ in sig:
                        maps[c].append(ix[cl == c])
                first = sig[0][0]
                arrs = {c: np.stack(m) for c, m in maps.items()}
                perm = np.argsort(arrs[first][:, 0], kind="stable")
                raw_groups.append(([c for c, _ in sig], {c: a[perm] for c, a in arrs.items()}))

        raw_groups.sort(key=lambda g: min(g[0]))  # graph order: class roots are first dim ids
        groups: List[ChannelGroup] = []
        for classes, maps in raw_groups:
            members: List[Member] = []
            producers: List[str] = []
            consumers: List[str] = []
            has_role = False
            for c in classes:
                for d in class_dims[c]:
                    name, axis = keys[d]
                    roles = tuple(r for r, _, _ in self.roles.get((name, axis), []))
                    has_role = has_role or bool(roles)
                    members.append(Member(name, axis, maps[c], name in self.stored, roles))
                    if PRODUCER in roles and name not in producers:
                        producers.append(name)
                    if CONSUMER in roles and name not in consumers:
                        consumers.append(name)
            if not has_role:
                continue  # spatial/batch axes and shape plumbing: nothing to prune
            size = int(next(iter(maps.values())).shape[0])
            frozen = next((class_frozen[c] for c in classes if c in class_frozen), None)
            if frozen is None and not producers:
                frozen = "no weight produces these channels (graph input or weight-free source)"
            if frozen is None and size == 1:
                frozen = ("a single unit: every channel is coupled to every other (or only one "
                          "channel); nothing can be removed")
            groups.append(ChannelGroup(len(groups), size, members, producers, consumers, frozen))
        check_zeros(self, groups)
        return ChannelGraph(groups, self.rewrites, self.stored, self.shapes, dict(self.roles),
                            dict(self.zero_values), dict(self._folded))


def build_channel_graph(handle: ModelHandle, input_shapes: Optional[Dict] = None) -> ChannelGraph:
    """Run every node's channel rule and return the groups (frozen ones with their reason)."""

    builder = Builder(handle, input_shapes)
    apply_rules(builder)
    return builder.finish()
