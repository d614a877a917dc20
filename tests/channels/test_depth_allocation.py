"""--depth: residual blocks compete with channel widths in the --target-macs/--target-speedup
allocation (channels/allocate.py, channels/depth.py); a removed block's Add becomes the identity
path exactly."""

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from channel_models import BUILDERS, run
from onnxprune.api import prune
from onnxprune.channels.allocate import NodeCost
from onnxprune.channels.depth import block_damage, find_residual_blocks
from onnxprune.errors import OptionError
from onnxprune.model.io import load


def _weak_second_block():
    """The residual fixture with its second block's branch (a 1x1 Conv) scaled to almost
    nothing: removing it costs almost no output error and saves its MACs (65536 of 798720)."""
    model = BUILDERS["residual"]()
    block = find_residual_blocks(load(copy.deepcopy(model)))[1]
    conv = [n for n in model.graph.node if n.output[0] == block.branch[0]][0]
    for init in model.graph.initializer:
        if init.name in conv.input[1:]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1e-4),
                                                  init.name))
    return model, block


def _zeroed(model, block):
    ref = copy.deepcopy(model)
    for n in ref.graph.node:
        if (n.name or n.output[0]) == block.add:
            other = [i for i in n.input if i != block.branch_output][0]
            n.op_type, n.input[:] = "Identity", [other]
    return ref


def test_gate_takes_the_node_away():
    node = NodeCost("k", "Conv", 100, [(1.0, ((8, ((0, 8),)),))], gates=(5,))
    assert node.groups == (0, 5)
    assert node.fraction({0: 0.5}) == 0.5 and node.fraction({0: 0.5, 5: 0.0}) == 0.0
    assert NodeCost("j", "MatMul", 10, [], gates=(5,)).fraction({5: 0.0}) == 0.0


def test_block_damage_is_the_relative_output_error():
    model, block = _weak_second_block()
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    blocks = find_residual_blocks(load(copy.deepcopy(model)))
    dmg = block_damage(load(copy.deepcopy(model)), blocks, [{"x": x}])
    y0 = run(model, {"x": x})[0].astype(np.float64)
    for b, d in zip(blocks, dmg):
        y = run(_zeroed(model, b), {"x": x})[0]
        assert d == pytest.approx(((y - y0) ** 2).sum() / (y0 ** 2).sum(), rel=1e-4)
    assert dmg[1] < 1e-6 < dmg[0]


def test_depth_removes_the_cheapest_block_exactly(tmp_path):
    model, block = _weak_second_block()
    x = np.random.default_rng(1).standard_normal((12, 3, 16, 16)).astype(np.float32)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=x)
    res = prune(copy.deepcopy(model), pattern="channel", target_macs=0.92, calibration=cal,
                depth=True, validation_samples=4)
    rec = [r for r in res.state.records if r.__class__.__name__ == "ChannelRecord"][0]
    assert rec.blocks_removed == [block.add] and rec.channels_removed == 0
    assert rec.allocation["blocks_removed"] == [block.add]
    assert rec.allocation["macs_ratio"] == pytest.approx(1 - 65536 / 798720)
    assert any(n.startswith("depth: 1 of 2 residual blocks removed") for n in rec.notes)
    onnx.checker.check_model(res.model, full_check=True)
    assert sum(n.op_type == "Conv" for n in res.model.graph.node) == 3
    want = _zeroed(model, block)
    for i in range(3):
        np.testing.assert_array_equal(run(res.model, {"x": x[i:i + 1]})[0],
                                      run(want, {"x": x[i:i + 1]})[0])
    # the removed weight's row says it is gone
    gone = [r.name for r in res.report.rows if r.params_after == 0]
    assert len(gone) == 1 and res.report.options["depth"] is True


def test_without_depth_no_block_goes(tmp_path):
    model, _ = _weak_second_block()
    x = np.random.default_rng(1).standard_normal((12, 3, 16, 16)).astype(np.float32)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=x)
    res = prune(copy.deepcopy(model), pattern="channel", target_macs=0.92, calibration=cal,
                validation_samples=4)
    assert sum(n.op_type == "Add" for n in res.model.graph.node) == \
        sum(n.op_type == "Add" for n in model.graph.node)


def test_depth_needs_a_target_and_calibration():
    with pytest.raises(OptionError, match="--depth removes residual blocks inside a channel "
                                          "allocation"):
        prune(BUILDERS["residual"](), pattern="channel", sparsity=0.5, depth=True,
              calibration="x.npz")
