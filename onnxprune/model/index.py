"""The graph index: what every module asks of a graph, answered in one place.

Owns the structural questions about an ONNX graph, for the main graph and every subgraph
(``If``/``Loop``/``Scan`` bodies): which node produces a value (:meth:`GraphIndex.producer`),
which nodes read it and at which input (:meth:`GraphIndex.consumers`), which nodes read it
through their subgraphs too (:meth:`GraphIndex.readers`), the stored tensors (initializers and
``Constant`` values, :attr:`Scope.stored`), the outer names a subgraph reads
(:func:`subgraph_reads`, :func:`names_read`), node labels and keys (:func:`node_label`,
:func:`node_key`), attributes with defaults (:func:`attr`) and the opset (:func:`opset`).

An index is built once per model state. :attr:`onnxprune.model.io.ModelHandle.index` caches it
and rebuilds it when the graph changed: editing functions (channel resize, dead-channel folds)
call :meth:`~onnxprune.model.io.ModelHandle.graph_changed`, and a cheap fingerprint (node,
initializer, input and output counts of the main graph) catches additions and removals made
without telling. Writing a tensor's *values* (``ModelHandle.write``) keeps the same
``TensorProto`` object and needs no rebuild. Unlike onnx-graphsurgeon, whose IR owns the
links and keeps them in sync on every edit, the index reads the protobuf in place (weights stay
lazy, external data is never loaded), so the rule is: edit, then ``graph_changed()``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import onnx

ONNX_DOMAINS = ("", "ai.onnx")


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it is not set."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or ``OpType(first output)`` for unnamed nodes (exporters leave many):
    what users see in reports, messages and MAC tables."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def node_key(node: onnx.NodeProto) -> str:
    """A node's name, or its first output for unnamed nodes: the string that identifies a node
    inside maps (channel roles) and prefixes the names of tensors made for it (``<key>_B``).
    Kept apart from :func:`node_label` because those names end up in saved models."""
    return node.name or node.output[0]


def opset(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset version for ``domain`` (the default ONNX domain: ``""``/``ai.onnx``);
    1 when it imports none."""
    domains = ONNX_DOMAINS if domain in ONNX_DOMAINS else (domain,)
    for o in model.opset_import:
        if o.domain in domains:
            return int(o.version)
    return 1


def subgraphs(node: onnx.NodeProto) -> Iterator[Tuple[str, onnx.GraphProto]]:
    """``(attribute label, body)`` for each subgraph ``node`` holds (``then_branch``,
    ``body``, ``graphs[1]``)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


def subgraph_reads(node: onnx.NodeProto) -> List[str]:
    """Names ``node``'s subgraphs (If/Loop/Scan bodies, nested) read from outside themselves,
    in order of first reading, repeats kept."""
    names: List[str] = []
    for _, g in subgraphs(node):
        defined = {i.name for i in g.input} | {t.name for t in g.initializer}
        for n in g.node:
            names.extend(x for x in n.input if x and x not in defined)
            names.extend(x for x in subgraph_reads(n) if x not in defined)
            defined.update(n.output)
        names.extend(o.name for o in g.output if o.name not in defined)
    return names


def names_read(node: onnx.NodeProto) -> Set[str]:
    """Every outer tensor name a node reads: its inputs and its subgraphs' outer reads."""
    return {x for x in node.input if x} | set(subgraph_reads(node))


def constant_tensor(node: onnx.NodeProto) -> Optional[onnx.TensorProto]:
    """The tensor an ONNX ``Constant`` node holds in its ``value`` attribute, else None."""
    if node.op_type != "Constant" or node.domain not in ONNX_DOMAINS or not node.output:
        return None
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            return a.t
    return None


@dataclass
class Scope:
    """The index of one graph (the main graph or one subgraph body).

    ``nodes`` holds one wrapper per node (protobuf hands out a new wrapper per access, so
    ``id()`` of these is what :meth:`position` compares). ``consumers`` lists direct inputs,
    ``readers`` also the nodes whose subgraphs read a name of this scope.
    """

    path: str
    graph: onnx.GraphProto
    parent: Optional["Scope"] = None
    owner: Optional[onnx.NodeProto] = None  # the node holding this body; None for the main graph
    nodes: List[onnx.NodeProto] = field(default_factory=list)
    producers: Dict[str, int] = field(default_factory=dict)  # value -> position of its producer
    consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = field(default_factory=dict)
    readers: Dict[str, List[onnx.NodeProto]] = field(default_factory=dict)
    reads: List[Set[str]] = field(default_factory=list)  # per position: names_read(node)
    stored: Dict[str, onnx.TensorProto] = field(default_factory=dict)
    inputs: List[str] = field(default_factory=list)  # real inputs (not initializers' defaults)
    outputs: List[str] = field(default_factory=list)
    _positions: Dict[int, int] = field(default_factory=dict, repr=False)

    def position(self, node: onnx.NodeProto) -> int:
        """Index of ``node`` (a wrapper from :attr:`nodes`) in graph order."""
        return self._positions[id(node)]

    def producer(self, name: str) -> Optional[onnx.NodeProto]:
        i = self.producers.get(name)
        return None if i is None else self.nodes[i]

    def lookup_stored(self, name: str) -> Optional[onnx.TensorProto]:
        """The stored tensor ``name`` as seen from this scope (its own, else an outer one's),
        unless a value of this scope or a scope in between shadows it."""
        scope: Optional[Scope] = self
        while scope is not None:
            if name in scope.stored:
                return scope.stored[name]
            if name in scope.producers or name in scope.inputs:
                return None
            scope = scope.parent
        return None


class GraphIndex:
    """Producers, consumers, readers and stored tensors of a model's graphs, by scope.

    The methods without a ``scope`` argument answer for the main graph, which is what most
    passes edit. Build it with ``GraphIndex(model)``, or take ``handle.index`` (cached per
    model state).
    """

    def __init__(self, model: Union[onnx.ModelProto, onnx.GraphProto]) -> None:
        if isinstance(model, onnx.ModelProto):
            self.model: Optional[onnx.ModelProto] = model
            graph = model.graph
        else:
            self.model, graph = None, model
        self.scopes: Dict[str, Scope] = {}
        self.main = self._build(graph, graph.name or "main", None, None)
        self._fingerprint = _fingerprint(graph)

    def _build(self, graph: onnx.GraphProto, path: str, parent: Optional[Scope],
               owner: Optional[onnx.NodeProto]) -> Scope:
        scope = Scope(path, graph, parent, owner)
        self.scopes[path] = scope
        inits = {t.name for t in graph.initializer}
        scope.inputs = [i.name for i in graph.input if i.name not in inits]
        scope.outputs = [o.name for o in graph.output]
        scope.stored = {t.name: t for t in graph.initializer}
        consumers: Dict[str, List[Tuple[onnx.NodeProto, int]]] = defaultdict(list)
        readers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        scope.nodes = list(graph.node)
        for i, node in enumerate(scope.nodes):
            scope._positions[id(node)] = i
            tensor = constant_tensor(node)
            if tensor is not None:
                scope.stored[node.output[0]] = tensor
            for k, name in enumerate(node.input):
                if name:
                    consumers[name].append((node, k))
            reads = names_read(node)
            scope.reads.append(reads)
            for name in sorted(reads):
                readers[name].append(node)
            for out in node.output:
                if out:
                    scope.producers[out] = i
            for label, body in subgraphs(node):
                self._build(body, f"{path}/{node.name or node.op_type}.{label}", scope, node)
        scope.consumers = dict(consumers)
        scope.readers = dict(readers)
        return scope

    # -- staleness ---------------------------------------------------------------------------
    def current(self, model: onnx.ModelProto) -> bool:
        """Whether this index still describes ``model`` (same proto, same counts)."""
        return model is self.model and _fingerprint(model.graph) == self._fingerprint

    # -- main-graph questions ------------------------------------------------------------------
    @property
    def graph(self) -> onnx.GraphProto:
        return self.main.graph

    @property
    def nodes(self) -> List[onnx.NodeProto]:
        return self.main.nodes

    @property
    def stored(self) -> Dict[str, onnx.TensorProto]:
        """Main-graph stored tensors by the name nodes read them under."""
        return self.main.stored

    def producer(self, name: str) -> Optional[onnx.NodeProto]:
        """The main-graph node whose output ``name`` is, None for inputs/stored/unknown."""
        return self.main.producer(name)

    def producer_position(self, name: str) -> Optional[int]:
        return self.main.producers.get(name)

    def consumers(self, name: str) -> List[Tuple[onnx.NodeProto, int]]:
        """``(node, input index)`` of every main-graph node that takes ``name`` as an input."""
        return self.main.consumers.get(name, [])

    def consumer_nodes(self, name: str) -> List[onnx.NodeProto]:
        """Main-graph nodes taking ``name`` as a direct input, each once, in graph order."""
        return list({id(n): n for n, _ in self.consumers(name)}.values())

    def readers(self, name: str) -> List[onnx.NodeProto]:
        """Main-graph nodes reading ``name`` directly or inside their subgraphs."""
        return self.main.readers.get(name, [])

    def reads(self, node: onnx.NodeProto) -> Set[str]:
        """:func:`names_read` of a main-graph node (a wrapper from :attr:`nodes`)."""
        return self.main.reads[self.main.position(node)]

    def position(self, node: onnx.NodeProto) -> int:
        return self.main.position(node)

    def find(self, key: str) -> Optional[onnx.NodeProto]:
        """The main-graph node with :func:`node_key` ``key`` (the last one if repeated)."""
        found = None
        for node in self.main.nodes:
            if node_key(node) == key:
                found = node
        return found

    def by_key(self) -> Dict[str, onnx.NodeProto]:
        """Main-graph nodes by :func:`node_key` (a repeated key keeps the last node)."""
        return {node_key(n): n for n in self.main.nodes}

    def read_anywhere(self, name: str) -> int:
        """How many nodes, in every scope, take ``name`` as a direct input."""
        return sum(len({id(n) for n, _ in s.consumers.get(name, [])})
                   for s in self.scopes.values())

    def opset(self, domain: str = "") -> int:
        return opset(self.model, domain) if self.model is not None else 1


def _fingerprint(graph: onnx.GraphProto) -> Tuple[int, ...]:
    return (len(graph.node), len(graph.initializer), len(graph.input), len(graph.output))
