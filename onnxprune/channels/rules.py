"""Applying the channel rules: every main-graph node's rule is run over the builder, and graph
boundaries and subgraph reads are frozen.

Each op's rule is the ``channels`` field of its registry entry (:mod:`onnxprune.ops.registry`),
written in its family file (:mod:`onnxprune.ops.conv`, :mod:`onnxprune.ops.shape`, ...) against
:class:`onnxprune.ops._channel.NodeCtx`. An op without a rule freezes every tensor it touches.
Each entry may also carry a ``const`` function used by dead-channel detection (see
:mod:`.dead`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.model.compose import STATE_SUFFIXES, state_ties
from onnxprune.model.index import node_key, subgraph_reads
from onnxprune.ops._channel import NodeCtx, set_attr
from onnxprune.ops.registry import field_of

if TYPE_CHECKING:  # the builder calls apply_rules: a runtime import would be a cycle
    from onnxprune.channels.graph import Builder

__all__ = ["apply_rules", "new_initializer", "set_attr"]


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 1


def apply_rules(builder: "Builder") -> None:
    """Run every main-graph node's rule, freezing graph boundaries and subgraph reads."""
    graph = builder.graph
    opset = _opset(builder.handle.model)
    init_names = {t.name for t in graph.initializer}
    inputs = [vi.name for vi in graph.input if vi.name not in init_names]
    outputs = [vi.name for vi in graph.output]
    for name in inputs:
        builder.freeze(name, None, f"graph input '{name}' keeps its shape"
                                   f"{_state_note(name, outputs, True)}")
    # A joined model's state (model/compose.py): the output the caller feeds back keeps the
    # channels of the tensor its input reads, on every axis, instead of its shape.
    ties = dict(state_ties(builder.handle.model))
    for name in outputs:
        if name in ties:
            rank = len(builder.shape(name) or ())
            if rank and rank == len(builder.shape(ties[name]) or ()):
                for j in range(rank):
                    builder.tie((name, j), (ties[name], j), "a state fed back")
                continue
        builder.freeze(name, None, f"graph output '{name}' keeps its shape"
                                   f"{_state_note(name, inputs, False)}")
    for node in graph.node:
        for name in subgraph_reads(node):
            builder.freeze(name, None, f"'{name}' is read inside a subgraph of "
                                       f"{node.op_type} '{node.name}'")
    for node in graph.node:
        rule = field_of(node, "channels")
        if rule is None:
            label = f"{node.domain + ':' if node.domain else ''}{node.op_type}"
            for name in list(node.input) + list(node.output):
                if name:
                    builder.freeze(name, None, f"no channel rule for {label} "
                                               f"'{node_key(node)}'")
            continue
        ctx = NodeCtx(builder, node, opset)
        rule(ctx)
        ctx.finish()


def _state_note(name: str, others, is_input: bool) -> str:
    """Why a boundary that carries a state keeps its width, in the user's words: an input fed
    back from an output of the same name + ``_out`` (a recurrent decoder's hidden state, passed
    in and out at every step), or an output named as the input of another model (``memory_out``
    of an encoder, read by its decoder as ``memory``). Empty when neither applies."""
    if is_input:
        back = next((o for o in others if o in {name + s for s in STATE_SUFFIXES}), None)
        return "" if back is None else (f" (a state the caller feeds back from output '{back}' "
                                        "at every step, at this width)")
    stem = next((name[:-len(s)] for s in STATE_SUFFIXES if name.endswith(s) and
                 len(name) > len(s)), None)
    if stem is None:
        return ""
    if stem in others:
        return f" (a state fed back as input '{stem}' at the next step, at this width)"
    return (f" (named as a state handed on; another model, or the next call, reads it as "
            f"'{stem}' at this width)")


def new_initializer(handle_graph: onnx.GraphProto, base: str, values: np.ndarray) -> str:
    names = {t.name for t in handle_graph.initializer} | {o for n in handle_graph.node
                                                          for o in n.output}
    name, k = f"{base}_pruned", 1
    while name in names:
        name, k = f"{base}_pruned{k}", k + 1
    handle_graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(values), name))
    return name
