"""Registry entries of the layout family (ops/shape.py), one test per op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from channel_models import IMG, G, feeds_for, run, assert_close, masked_and_resized


def _check(model, producer, size, units, shapes_want):
    """The producer's group has ``size`` units whose next-conv columns are ``units``; pruning
    half of it keeps the function of the masked model and gives exactly ``shapes_want`` (keys:
    "first"/"last" for the first and last Conv weights)."""
    convs = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    shapes_want = {convs[0] if k == "first" else convs[-1]: v for k, v in shapes_want.items()}
    graph = build_channel_graph(load(model))
    group = next(x for x in graph.groups if producer in x.producers)
    assert group.size == size and group.frozen is None
    consumer = next(m for m in group.members if m.tensor == group.consumers[0])
    assert consumer.index_map.tolist() == units
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert len(removed[group.id]) == size // 2
    for name, want in shapes_want.items():
        assert shapes[name] == want
    return resized


@pytest.mark.parametrize("op,mode", [("DepthToSpace", "DCR"), ("DepthToSpace", "CRD"),
                                     ("SpaceToDepth", None)])
def test_depth_to_space_and_space_to_depth_move_channel_blocks(op, mode):
    g = G(31)
    if op == "DepthToSpace":
        # 16 channels -> 4 channels of 2x2 blocks: output channel c reads 4 input channels.
        y = g.op(op, [g.conv("x", 3, 16)], blocksize=2, mode=mode)
        model = g.model(IMG, [g.conv(y, 4, 8, k=1)])
        if mode == "DCR":
            blocks = [[c, 4 + c, 8 + c, 12 + c] for c in range(4)]
        else:
            blocks = [[4 * c, 4 * c + 1, 4 * c + 2, 4 * c + 3] for c in range(4)]
        _check(model, "w1", 4, [[c] for c in range(4)],
               {"first": ((16, 3, 3, 3), (8, 3, 3, 3)), "last": ((8, 4, 1, 1), (8, 2, 1, 1))})
        graph = build_channel_graph(load(model))
        group = next(x for x in graph.groups if "w1" in x.producers)
        assert next(m for m in group.members if m.tensor == "w1").index_map.tolist() == blocks
    else:
        # 4 channels -> 16: input channel c becomes output channels k*4 + c.
        y = g.op(op, [g.conv("x", 3, 4)], blocksize=2)
        model = g.model(IMG, [g.conv(y, 16, 8, k=1)])
        _check(model, "w1", 4, [[c, 4 + c, 8 + c, 12 + c] for c in range(4)],
               {"first": ((4, 3, 3, 3), (2, 3, 3, 3)), "last": ((8, 16, 1, 1), (8, 8, 1, 1))})


def test_expand_ties_kept_axes_and_rewrites_the_shape():
    # A per-channel gate [1, 16, 1, 1] expanded to the feature map's shape, then multiplied.
    g = G(32)
    y = g.conv("x", 3, 16)
    gate = g.op("Sigmoid", [g.op("GlobalAveragePool", [y])])
    shape = g.c(np.array([1, 16, 16, 16], np.int64))
    z = g.op("Mul", [y, g.op("Expand", [gate, shape])])
    model = g.model(IMG, [g.conv(z, 16, 8, k=1)])
    resized = _check(model, "w1", 16, [[c] for c in range(16)],
                     {"first": ((16, 3, 3, 3), (8, 3, 3, 3)), "last": ((8, 16, 1, 1), (8, 8, 1, 1))})
    expand = next(n for n in resized.graph.node if n.op_type == "Expand")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in resized.graph.initializer}
    assert inits[expand.input[1]].tolist() == [1, 8, 16, 16]


def test_tile_channel_copies_go_with_their_source():
    # 8 channels tiled twice: channel c feeds next-conv columns c and 8 + c; repeats unchanged.
    g = G(33)
    y = g.op("Relu", [g.conv("x", 3, 8)])
    y = g.op("Tile", [y, g.c(np.array([1, 2, 1, 1], np.int64))])
    model = g.model(IMG, [g.conv(y, 16, 8, k=1)])
    resized = _check(model, "w1", 8, [[c, 8 + c] for c in range(8)],
                     {"first": ((8, 3, 3, 3), (4, 3, 3, 3)), "last": ((8, 16, 1, 1), (8, 8, 1, 1))})
    tile = next(n for n in resized.graph.node if n.op_type == "Tile")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in resized.graph.initializer}
    assert inits[tile.input[1]].tolist() == [1, 2, 1, 1]
