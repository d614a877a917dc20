"""Graph boundaries that carry a state (onnxprune/channels/rules.py): the freeze reason says why
the width is fixed in the user's words: a state fed back from an output of the same name +
``_out`` at every step, or an output named as another model's input (an encoder's
``memory_out``, its decoder's ``memory``)."""

from __future__ import annotations

import numpy as np

from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from channel_models import G


def _step_model():
    """A decoder step: hidden [1, 16] in, hidden_out [1, 16] and memory_out [1, 16] out."""
    g = G(3)
    h = g.op("Tanh", [g.op("Add", [g.op("MatMul", ["x", g.w([8, 16])]),
                                   g.op("MatMul", ["hidden", g.w([16, 16])])])])
    hidden_out = g.op("Identity", [h])
    memory = g.op("MatMul", [g.op("Relu", [g.op("MatMul", ["x", g.w([8, 12])])]), g.w([12, 16])])
    model = g.model([("x", [1, 8]), ("hidden", [1, 16])], [hidden_out, memory])
    model.graph.output[0].name = "hidden_out"
    model.graph.output[1].name = "memory_out"
    for n in model.graph.node:
        n.output[:] = ["hidden_out" if o == hidden_out else "memory_out" if o == memory else o
                       for o in n.output]
    return model


def test_state_boundaries_say_why_their_width_is_fixed():
    graph = build_channel_graph(load(_step_model()), None)
    state = sorted(g.frozen for g in graph.groups if g.size == 16 and g.frozen and
                   any(m.tensor in ("hidden", "hidden_out") for m in g.members))
    assert state == [
        "graph input 'hidden' keeps its shape (a state the caller feeds back from output "
        "'hidden_out' at every step, at this width)",
        "graph output 'hidden_out' keeps its shape (a state fed back as input 'hidden' at the "
        "next step, at this width)"]
    memory = [g.frozen for g in graph.groups if g.frozen and
              any(m.tensor == "memory_out" for m in g.members)]
    assert memory == ["graph output 'memory_out' keeps its shape (named as a state handed on; "
                      "another model, or the next call, reads it as 'memory' at this width)"]
    # the hidden 12 between the two memory matmuls is not at the boundary: prunable
    assert [g.prunable for g in graph.groups if g.size == 12] == [True]


def test_plain_boundaries_keep_the_short_reason():
    g = G(4)
    y = g.op("MatMul", [g.op("Relu", [g.op("MatMul", ["x", g.w([8, 12])])]), g.w([12, 4])])
    graph = build_channel_graph(load(g.model([("x", [1, 8])], [y])), None)
    out = [grp.frozen for grp in graph.groups if grp.size == 4]
    assert out == [f"graph output '{y}' keeps its shape"]
    assert np.all([grp.prunable for grp in graph.groups if grp.size == 12])
