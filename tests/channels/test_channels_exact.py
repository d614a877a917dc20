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
