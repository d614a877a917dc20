"""The graph index: what every module asks of a graph, answered in one place.

Attributes with defaults, node labels, and (as the index grows) producers, consumers, stored
tensors, subgraph outer reads and the opset, built once per model state.
"""

from __future__ import annotations

from typing import Any

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
