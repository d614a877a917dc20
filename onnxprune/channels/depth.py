"""Depth: residual blocks (``Add(x, f(x))``) and removing one exactly.

A *residual block* is an ``Add`` of two same-shaped activations where one input, ``x``, is the
identity path and the other, ``y = f(x)``, is computed by a *branch*: nodes that read only ``x``,
stored tensors or each other, whose outputs nothing outside the branch reads (``y`` only the
``Add``) and that are not graph outputs. Removing the block deletes the branch and replaces the
``Add`` by ``Identity(x)``: the model then computes exactly what it computed with ``f(x) = 0``.

In the allocation (``--depth`` with ``--target-macs``/``--target-speedup`` and calibration
data): each block is one more candidate beside the channel groups, its damage the model's
relative output error on the calibration samples with the block removed alone
(:func:`block_damage`), its saving the cost of the branch's counted nodes
(:mod:`onnxprune.channels.allocate`); the chosen blocks are removed after the channels
(:func:`remove_blocks`, found again by their ``Add`` in the resized model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

import onnx

from onnxprune.model.io import ModelHandle
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.registry import complete_types


@dataclass
class ResidualBlock:
    """``add`` (its node name or first output), the identity input, the branch's output and
    its nodes' first outputs (keys), in graph order."""

    add: str
    identity: str
    branch_output: str
    branch: List[str]


def find_residual_blocks(handle: ModelHandle,
                         input_shapes: Optional[Mapping[str, Sequence[int]]] = None
                         ) -> List[ResidualBlock]:
    """Every residual block of the main graph (see the module doc), in graph order."""
    graph = handle.model.graph
    stored = set(handle.index.stored)
    producer: Dict[str, onnx.NodeProto] = {o: n for n in graph.node for o in n.output if o}
    readers: Dict[str, List[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    shapes = infer_shapes(handle, input_shapes, complete=complete_types).static()
    blocks = []
    for node in graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = node.input
        if a in stored or b in stored or a == b:
            continue
        if shapes.get(a) is None or shapes.get(a) != shapes.get(b):
            continue
        for x, y in ((a, b), (b, a)):
            branch = _branch(x, y, producer, stored)
            if not branch:
                continue
            ids = {id(n) for n in branch}
            inside = all(o not in outputs and all(id(r) in ids or (r is node and o == y)
                                                   for r in readers.get(o, []))
                         for n in branch for o in n.output if o)
            subgraphs = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for n in branch for a in n.attribute)
            if inside and not subgraphs:
                order = [n for n in graph.node if id(n) in ids]
                blocks.append(ResidualBlock(node.name or node.output[0], x, y,
                                            [n.output[0] for n in order]))
                break
    return blocks


def _branch(x, y, producer, stored) -> Optional[List[onnx.NodeProto]]:
    """The nodes ``y`` is computed by from ``x`` and stored tensors, or None (it reads a graph
    input or another activation, or never reads ``x``)."""
    seen: Dict[int, onnx.NodeProto] = {}
    stack, reaches = [y], False
    while stack:
        t = stack.pop()
        if t == x:
            reaches = True
            continue
        if not t or t in stored:
            continue
        p = producer.get(t)
        if p is None:
            return None
        if id(p) in seen:
            continue
        seen[id(p)] = p
        stack.extend(p.input)
    return list(seen.values()) if reaches else None


def remove_block(handle: ModelHandle, block: ResidualBlock) -> None:
    """Delete ``block``'s branch and put ``Identity(identity)`` in place of its ``Add``; stored
    tensors only the branch read are dropped."""
    graph = handle.model.graph
    drop = set(block.branch)  # first outputs of the branch's nodes
    kept = []
    for n in graph.node:
        if n.output and n.output[0] in drop:
            continue
        if (n.name or n.output[0]) == block.add and n.op_type == "Add":
            n = onnx.helper.make_node("Identity", [block.identity], list(n.output),
                                      name=n.name or None)
        kept.append(n)
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    for vi in [vi for vi in graph.value_info if vi.name not in used]:
        graph.value_info.remove(vi)
    handle.graph_changed()


def _copy(handle: ModelHandle) -> ModelHandle:
    import copy

    twin = ModelHandle(model=copy.deepcopy(handle.model), path=handle.path,
                       base_dir=handle.base_dir)
    for tensor, values in handle.rewritten_values():
        twin.write(twin.index.stored[tensor.name], values)
    return twin


def block_damage(handle: ModelHandle, blocks: Sequence[ResidualBlock],
                 feeds: Sequence[Mapping[str, np.ndarray]]) -> List[float]:
    """Per block: the model's relative output error ``sum ||y - y0||^2 / sum ||y0||^2`` over
    ``feeds`` with that block alone removed (the measure channel damage uses). ``handle`` is
    left as it was."""
    from onnxprune.runtime.session import open_session

    def outputs(h):
        session = open_session(h)
        return [np.asarray(o, dtype=np.float64) for f in feeds
                for o in session.run(None, dict(f))]

    ref = outputs(handle)
    norm = sum(float((r ** 2).sum()) for r in ref) or 1.0
    out = []
    for block in blocks:
        twin = _copy(handle)
        remove_block(twin, block)
        err = sum(float(((o - r) ** 2).sum()) for o, r in zip(outputs(twin), ref)) / norm
        out.append(err if np.isfinite(err) else 1e6)
    return out


def remove_blocks(handle: ModelHandle, adds: Sequence[str],
                  input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> List[str]:
    """Remove the residual blocks whose ``Add`` is named in ``adds`` (found again in the model
    as it is now, one at a time, so nested blocks stay consistent); returns the stored tensors
    that went with them."""
    before = set(handle.index.stored)
    for add in adds:
        match = [b for b in find_residual_blocks(handle, input_shapes) if b.add == add]
        if match:
            remove_block(handle, match[0])
    return sorted(before - set(handle.index.stored))
