"""Exactness: the resized model equals the masked-but-not-resized model, for every rule case."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.channels.dead import remove_dead_channels
from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.channels.select import select_channels
from onnxprune.model.io import load
from channel_models import BUILDERS, assert_close, feeds_for, masked_and_resized, run

RUNNABLE = sorted(n for n in BUILDERS if n != "unknown_op")
PRUNABLE_ELSEWHERE = {"unknown_op"}


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("sparsity,round_to", [(0.3, 1), (0.5, 1), (0.3, 8), (0.5, 8)])
def test_resized_equals_masked(name, sparsity, round_to):
    model = BUILDERS[name]()
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=sparsity,
                                                          round_to=round_to)
    onnx.checker.check_model(resized, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(resized, feeds), run(masked, feeds))
    if round_to == 1:
        assert sum(len(v) for v in removed.values()) > 0, "nothing was pruned"
        assert any(after != before for before, after in shapes.values())
    # Graph outputs never change shape.
    for a, b in zip(run(resized, feeds), run(model, feeds)):
        assert a.shape == b.shape


@pytest.mark.parametrize("name", ["conv_bn_relu", "residual", "attention", "concat"])
def test_global_scope_and_api(name):
    """onnxprune.prune(pattern="channel") removes exactly what the selection masks."""
    model = BUILDERS[name]()
    result = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.4,
                             scope="global", criterion="l2")
    onnx.checker.check_model(result.model, full_check=True)
    ref = load(copy.deepcopy(model))
    graph = build_channel_graph(ref)
    removed = select_channels(ref, graph, 0.4, scope="global", criterion="l2")
    mask_channels(ref, removed, graph)
    feeds = feeds_for(model)
    assert_close(run(result.model, feeds), run(ref.model, feeds))
    assert sum(1 for v in removed.values() if v) >= 1
    # the report's per-weight shapes are the ones resizing the masked reference gives
    shapes = resize_channels(ref, build_channel_graph(ref), removed)
    rows = {r.name: r for r in result.report.rows}
    changed = {t for t, (before, after) in shapes.items() if before != after and t in rows}
    assert changed
    assert {n for n, r in rows.items() if r.shape_after != r.shape} == changed
    for n in changed:
        assert (tuple(rows[n].shape), tuple(rows[n].shape_after)) == tuple(map(tuple, shapes[n]))


def zero_random_rows(model, fraction=0.4, seed=0):
    """Zero random output rows of every Conv/Gemm/MatMul weight (as unstructured pruning can)."""
    from onnxprune.ops.weights import find_weights
    handle = load(copy.deepcopy(model))
    rng = np.random.default_rng(seed)
    weights, _ = find_weights(handle)
    for w in weights:
        arr = handle.read(w.tensor).copy()
        n = arr.shape[w.layout.out_axis]
        rows = rng.choice(n, size=max(1, int(n * fraction)), replace=False)
        sl = [slice(None)] * arr.ndim
        sl[w.layout.out_axis] = rows
        arr[tuple(sl)] = 0
        handle.write(w.tensor, arr)
    return handle.model


@pytest.mark.parametrize("name", RUNNABLE)
def test_dead_channels_exact(name):
    model = zero_random_rows(BUILDERS[name]())
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(handle.model, feeds), run(model, feeds))
    assert isinstance(rec.folded, list) and isinstance(rec.kept_nonzero_const, list)


def test_dead_channels_fold_through_1x1_and_gemm():
    """Zero filters with a nonzero bias feeding a 1x1 conv / Gemm are folded and removed."""
    model = zero_random_rows(BUILDERS["flatten_gemm"](), fraction=0.5, seed=3)
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    assert rec.folded, rec
    assert rec.channels_removed > 0
    feeds = feeds_for(model)
    assert_close(run(handle.model, feeds), run(model, feeds))


def test_dead_channels_kept_before_padded_conv():
    """A zero filter whose bias reaches a zero-padded 3x3 conv cannot be removed exactly."""
    model = BUILDERS["conv_bn_relu"]()
    handle = load(copy.deepcopy(model))
    w = handle.model.graph.initializer[0]
    arr = handle.read(w).copy()
    arr[[1, 5]] = 0
    handle.write(w, arr)
    zeroed = copy.deepcopy(handle.model)
    rec = remove_dead_channels(handle)
    assert any("not exact" in k for k in rec.kept_nonzero_const)
    assert_close(run(handle.model, feeds_for(zeroed)), run(zeroed, feeds_for(zeroed)))


def test_dead_unread_columns_removed():
    """Input channels no consumer reads are removed even though their producer is alive."""
    model = BUILDERS["conv_bn_relu"]()
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    group = graph.groups[0]
    cons = [m for m in group.members if "consumer" in m.roles][0]
    t = graph.stored[cons.tensor]
    arr = handle.read(t).copy()
    arr[:, [2, 3, 7]] = 0
    handle.write(t, arr)
    zeroed = copy.deepcopy(handle.model)
    rec = remove_dead_channels(handle)
    assert rec.removed.get(0) == [2, 3, 7]
    assert_close(run(handle.model, feeds_for(zeroed)), run(zeroed, feeds_for(zeroed)))


def _shared_bias_model():
    """x -> Conv a (3x3, valid; filter 1 zero, bias 1 nonzero) -> Relu -> two 1x1 Convs that
    share one bias initializer (optimizers merge equal initializers) -> Add -> y."""
    from onnx import TensorProto, helper

    import builders as B

    wa = B.rng(1).standard_normal((6, 3, 3, 3)).astype(np.float32)
    wa[1] = 0
    ba = B.rng(2).standard_normal(6).astype(np.float32)
    ba[1] = 0.7  # relu(0.7) = 0.7 reaches both 1x1 convs as a constant
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w1", "shared"], ["c1"]),
             helper.make_node("Conv", ["x2", "w2", "shared"], ["c2"]),
             helper.make_node("Add", ["c1", "c2"], ["y"])]
    inits = [onnx.numpy_helper.from_array(wa, "wa"), onnx.numpy_helper.from_array(ba, "ba"),
             B.tensor("w1", (4, 6, 1, 1), 3), B.tensor("w2", (4, 5, 1, 1), 4),
             B.tensor("shared", (4,), 5)]
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                                helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 5, 6, 6])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                        inits)


def test_a_constant_is_never_folded_into_a_bias_another_layer_shares():
    model = _shared_bias_model()
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    assert any("shared by 2 nodes" in k for k in rec.kept_nonzero_const), rec
    assert not rec.folded
    feeds = feeds_for(model)
    assert_close(run(handle.model, feeds), run(model, feeds))


def test_a_bias_behind_a_cast_keeps_the_channel_and_the_run_succeeds(models_dir, tmp_path):
    # The bundled fp16 block keeps its fp32 biases behind Cast nodes: not stored, not editable.
    src = models_dir / "mobilenetv3_block_fp16.onnx"
    result = onnxprune.prune(str(src), sparsity=0.9, output=tmp_path / "o.onnx")
    notes = " ".join(result.report.notes)
    assert "not a stored tensor" in notes
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.onnx")), full_check=True)


def test_a_fold_into_an_explicit_empty_bias_fills_it_in_place():
    # Conv's bias given as "" (an explicit empty optional input) must not grow a 4th input.
    from onnx import TensorProto, helper

    import builders as B

    wa = B.rng(1).standard_normal((6, 3, 3, 3)).astype(np.float32)
    wa[1] = 0
    ba = B.rng(2).standard_normal(6).astype(np.float32)
    ba[1] = 0.7
    nodes = [helper.make_node("Conv", ["x", "wa", "ba"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w1", ""], ["y"])]
    model = B.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [onnx.numpy_helper.from_array(wa, "wa"), onnx.numpy_helper.from_array(ba, "ba"),
         B.tensor("w1", (4, 6, 1, 1), 3)])
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    assert rec.folded and rec.channels_removed == 1
    consumer = [n for n in handle.model.graph.node if n.output[0] == "y"][0]
    assert len(consumer.input) == 3 and consumer.input[2]
    onnx.checker.check_model(handle.model, full_check=True)
    feeds = feeds_for(model)
    assert_close(run(handle.model, feeds), run(model, feeds))


def test_channel_refit_on_a_c2f_detector_block_keeps_split_sizes_consistent(models_dir, tmp_path):
    # YOLOv8-style C2f (Split -> bottlenecks -> Concat): the refit's part-graph sessions used to
    # leave the resize editing detached node copies, so Split sizes kept their old values and the
    # output was invalid (onnx.checker: "Mismatch between the sum of 'split'").
    src = models_dir / "yolo_block.onnx"
    calib = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    out = tmp_path / "o.onnx"
    result = onnxprune.prune(str(src), pattern="channel", sparsity=0.25, refit=True,
                             calibration={"images": calib}, output=out)
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    stored.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                   for n in model.graph.node if n.op_type == "Constant"})
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert splits
    for node in splits:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        assert int(stored[node.input[1]].sum()) == dims[node.input[0]][axis], node.name
    assert result.report.to_dict()["params_after"] < result.report.to_dict()["params_before"]
    feeds = {"images": calib[:1]}
    assert np.isfinite(run(model, feeds)[0]).all()
