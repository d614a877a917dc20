"""Residual blocks (channels/depth.py): found where the branch reads only the identity input,
and removed exactly: the model then computes what it did with the branch's output at 0."""

import copy

import numpy as np
import onnx

from channel_models import BUILDERS, feeds_for, run
from onnxprune.channels.depth import find_residual_blocks, remove_block
from onnxprune.model.io import load


def _zeroed_branch(model, block):
    """The reference: the Add reads zeros in place of the branch's output."""
    ref = copy.deepcopy(model)
    shape = None
    for vi in onnx.shape_inference.infer_shapes(ref).graph.value_info:
        if vi.name == block.branch_output:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    ref.graph.initializer.append(onnx.numpy_helper.from_array(
        np.zeros(shape, np.float32), "zeros_branch"))
    for n in ref.graph.node:
        if (n.name or n.output[0]) == block.add:
            n.input[list(n.input).index(block.branch_output)] = "zeros_branch"
    return ref


def test_residual_fixture_blocks():
    model = BUILDERS["residual"]()
    blocks = find_residual_blocks(load(copy.deepcopy(model)))
    assert len(blocks) == 2
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    assert [[ops[k] for k in b.branch] for b in blocks] == [
        ["Conv", "BatchNormalization"], ["Conv"]]


def test_removing_a_block_is_exact():
    model = BUILDERS["residual"]()
    feeds = feeds_for(model)
    for i in range(2):
        handle = load(copy.deepcopy(model))
        block = find_residual_blocks(handle)[i]
        remove_block(handle, block)
        onnx.checker.check_model(handle.model, full_check=True)
        assert not any(n.output[0] in block.branch for n in handle.model.graph.node)
        assert sum(n.op_type == "Conv" for n in handle.model.graph.node) == 3
        got = run(handle.model, feeds)
        want = run(_zeroed_branch(model, block), feeds)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_no_block_without_a_residual():
    for name in ("conv_bn_relu", "concat", "se_block"):
        assert find_residual_blocks(load(BUILDERS[name]())) == []
