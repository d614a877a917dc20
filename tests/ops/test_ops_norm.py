"""Registry entries of the normalization family (ops/norm.py), one test per op."""

from __future__ import annotations

import onnx
import pytest

from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from channel_models import IMG, G, feeds_for, run, assert_close, masked_and_resized


@pytest.mark.parametrize("opset,per_group_params", [(21, False), (18, True)])
def test_group_normalization_prunes_whole_groups(opset, per_group_params):
    # 16 channels in 4 groups of 4: a unit is a whole group; num_groups follows.
    g = G(30)
    y = g.conv("x", 3, 16)
    n = 4 if per_group_params else 16
    y = g.op("GroupNormalization", [y, g.w([n], positive=True), g.w([n], 0.1)], num_groups=4,
             epsilon=1e-5)
    model = g.model(IMG, [g.conv(g.op("Relu", [y]), 16, 8, k=1)], opset=opset)
    # ONNX's shape inference types nothing after GroupNormalization: declare the output.
    model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info(
        model.graph.output[0].name, onnx.TensorProto.FLOAT, [1, 8, 16, 16]))
    graph = build_channel_graph(load(model))
    group = next(x for x in graph.groups if "w1" in x.producers)
    assert group.size == 4 and group.frozen is None
    w1 = next(m for m in group.members if m.tensor == "w1")
    assert w1.index_map.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                     [12, 13, 14, 15]]
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    if opset >= 21:  # opset 18's per-group form is deprecated: the checker refuses it
        onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    assert len(removed[group.id]) == 2
    norm, last = model.graph.node[1], model.graph.node[3]
    assert shapes["w1"] == ((16, 3, 3, 3), (8, 3, 3, 3))
    assert shapes[norm.input[1]] == ((n,), (n // 2,))  # scale: per channel or per group
    assert shapes[norm.input[2]] == ((n,), (n // 2,))
    assert shapes[last.input[1]] == ((8, 16, 1, 1), (8, 8, 1, 1))
    gn = next(x for x in resized.graph.node if x.op_type == "GroupNormalization")
    assert [a.i for a in gn.attribute if a.name == "num_groups"] == [2]
