"""The graph index: what every module asks of a graph, answered in one place.

Attributes with defaults, node labels, and (as the index grows) producers, consumers, stored
tensors, subgraph outer reads and the opset, built once per model state.
"""

from __future__ import annotations

from typing import Any, List, Set

import onnx


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it is not set."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or ``OpType(first output)`` for unnamed nodes (exporters leave many)."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def subgraph_reads(node: onnx.NodeProto) -> List[str]:
    """Names ``node``'s subgraphs (If/Loop/Scan bodies, nested) read from outside themselves,
    in order of first reading, repeats kept."""
    names: List[str] = []
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else (
            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else [])
        for g in graphs:
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
