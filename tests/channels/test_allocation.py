"""Per-group channel widths for --target-macs / --target-speedup (channels/allocate.py): the MAC
target met exactly on the pruned model, the greedy's order, rounding and limits, and a speed-up
target met on an injected latency table."""

import copy
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from channel_models import BUILDERS, feeds_for, run
from onnxprune.api import prune
from onnxprune.channels.allocate import (NodeCost, allocate_for_target, allocate_widths,
                                         allowed_keeps, counted_macs, node_costs)
from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.cli import main
from onnxprune.errors import OptionError
from onnxprune.model.io import load
from onnxprune.report.macs import count_macs
from onnxprune.runtime.latency import LatencyTable, predict_seconds

YOLO = Path(__file__).resolve().parents[2] / "models" / "yolo_block.onnx"
# Fixtures where every node whose MACs the groups change reads a stored weight: the prediction
# is the count. (attention's weight-free MatMuls shrink too: the count comes out lower.)
EXACT = ["conv_bn_relu", "depthwise", "grouped", "residual", "se_block", "concat",
         "split_slice", "flatten_gemm", "conv_transpose", "transpose_nhwc", "constant_weight"]


def _allocate(model, target, **kw):
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    plan = allocate_for_target(handle, graph, target_macs=target, **kw)
    return handle, graph, plan


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("target", [0.8, 0.5])
def test_mac_target_is_met_and_predicted_exactly(name, target):
    model = BUILDERS[name]()
    handle, graph, plan = _allocate(model, target)
    before = count_macs(model).total
    assert plan.macs_before == before
    resize_channels(handle, graph, plan.removed)
    after = count_macs(handle.model).total
    assert after == pytest.approx(plan.predicted_macs, abs=0.5)
    if plan.allocation.reached:
        assert after / before <= target
    else:  # every group at its narrowest: nothing more could go
        a = plan.allocation
        assert all(allowed_keeps(a.sizes[g], 1, 1, 0.9)[-1] == a.keep[g] for g in a.keep)


def test_mac_target_with_weight_free_matmuls_stays_below():
    model = BUILDERS["attention"]()
    handle, graph, plan = _allocate(model, 0.6)
    resize_channels(handle, graph, plan.removed)
    assert count_macs(handle.model).total <= plan.predicted_macs
    assert count_macs(handle.model).total / count_macs(model).total <= 0.6


@pytest.mark.parametrize("name", ["residual", "split_slice", "concat"])
def test_allocated_removal_masked_equals_resized(name):
    model = BUILDERS[name]()
    masked, graph, plan = _allocate(model, 0.5)
    mask_channels(masked, plan.removed, graph)
    resized = load(copy.deepcopy(masked.model))
    resize_channels(resized, build_channel_graph(resized), plan.removed)
    feeds = feeds_for(model)
    for a, b in zip(run(masked.model, feeds), run(resized.model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("round_to, slack", [(8, 0.015), (1, 0.003)])
def test_yolo_block_target_is_met_closely(round_to, slack):
    for target in (0.8, 0.6, 0.4):
        res = prune(str(YOLO), pattern="channel", target_macs=target, round_to=round_to,
                    validate=False)
        before = count_macs(str(YOLO)).total
        after = count_macs(res.model).total
        assert target - slack < after / before <= target
        alloc = [r for r in res.state.records if getattr(r, "allocation", None)][0].allocation
        assert alloc["macs_after"] == after and alloc["macs_before"] == before
        assert alloc["reached"] and alloc["target"] == {"macs": target}
        for g in alloc["groups"]:  # multiples of --round-to, or the whole group
            assert g["kept"] == g["channels"] or g["kept"] % round_to == 0


def test_report_lists_widths_and_target():
    res = prune(BUILDERS["conv_bn_relu"](), pattern="channel", target_macs=0.5, validate=False)
    section = res.report.sections["channel allocation (macs target)"]
    assert {r["group"] for r in section} == {0, 2}
    assert all(set(r) == {"group", "describe", "channels", "kept"} for r in section)
    assert any("allocation: target MACs x0.500, reached x" in n for n in res.report.notes)
    assert res.report.to_dict()["options"]["target_macs"] == 0.5
    assert "sparsity" not in res.report.to_dict()["options"]


def _nodes():
    # two groups feeding equal-cost nodes; group 1's channels matter less
    return [NodeCost("a", "Conv", 1000, [(1.0, ((16, ((0, 16),)),))]),
            NodeCost("b", "Conv", 1000, [(1.0, ((16, ((1, 16),)),))])]


def test_greedy_takes_the_least_damage_per_cost_first():
    scores = {0: np.linspace(1.0, 2.0, 16), 1: np.linspace(0.1, 0.2, 16)}
    a = allocate_widths(scores, _nodes(), budget=1800)
    assert a.keep == {0: 16, 1: 12} and a.reached  # 4 of group 1: 2000 -> 1750
    assert a.cost_after == 1750 and a.cost_before == 2000


def test_rounding_min_channels_and_cap():
    scores = {0: np.ones(16), 1: np.ones(16)}
    a = allocate_widths(scores, _nodes(), budget=0, round_to=4, min_channels=6,
                        max_group_sparsity=0.9)
    assert not a.reached and a.keep == {0: 8, 1: 8}  # 6 rounds up to 8
    assert allowed_keeps(16, 4, 6) == [16, 12, 8]
    assert allowed_keeps(10, 1, 1, 0.5) == [10, 9, 8, 7, 6, 5]
    assert allowed_keeps(8, 8, 1) == [8]  # a group no bigger than round_to stays whole
    removed = a.removed(scores)
    assert {g: len(v) for g, v in removed.items()} == {0: 8, 1: 8}


def test_removed_are_the_lowest_scores():
    scores = {0: np.array([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 7.0, 8.0])}
    nodes = [NodeCost("a", "Conv", 80, [(1.0, ((8, ((0, 8),)),))])]
    a = allocate_widths(scores, nodes, budget=50)
    assert a.keep == {0: 5} and a.removed(scores) == {0: [1, 3, 4]}


def test_bilinear_node_fraction():
    n = NodeCost("c", "Conv", 100, [(1.0, ((8, ((0, 8),)), (4, ((1, 2),))))])
    assert n.fraction({0: 0.5, 1: 0.5}) == pytest.approx(0.5 * 0.75)
    assert n.groups == (0, 1)


def test_node_costs_cover_every_counted_node():
    model = BUILDERS["conv_bn_relu"]()
    handle = load(copy.deepcopy(model))
    nodes = node_costs(handle, build_channel_graph(handle))
    assert sum(n.macs for n in nodes) == count_macs(model).total == counted_macs(handle)
    assert [n.groups for n in nodes] == [(0,), (0, 2), (2,)]


def _fake_table(nodes, rest=0.002):
    table = LatencyTable("fake", 1, {"x": [1, 3, 16, 16]}, 1, [1.0, 0.5])
    for i, n in enumerate(nodes):
        per_mac = 1e-9 * (1 + i)  # later layers slower per MAC
        table.nodes[n.key] = {"op_type": n.op_type, "macs": [n.macs, n.macs // 2],
                              "seconds": [n.macs * per_mac, n.macs * per_mac * 0.7]}
    table.model_seconds = [rest + sum(e["seconds"][0] for e in table.nodes.values()), 0.0]
    return table


@pytest.mark.parametrize("speedup", [1.2, 1.6])
def test_speedup_target_met_on_injected_table(speedup, monkeypatch):
    import onnxprune.runtime.latency as lat

    def no_sessions(*a, **k):
        raise AssertionError("a session was opened")

    monkeypatch.setattr(lat, "ort_session", no_sessions)
    model = BUILDERS["conv_bn_relu"]()
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    table = _fake_table(node_costs(handle, graph))
    plan = allocate_for_target(handle, graph, target_speedup=speedup, table=table)
    a = plan.allocation
    kept = {g: a.keep[g] / a.sizes[g] for g in a.keep}
    dense = predict_seconds(table, plan.nodes, {})
    assert dense == pytest.approx(table.model_seconds[0])
    predicted = predict_seconds(table, plan.nodes, kept)
    assert a.reached and predicted == pytest.approx(a.cost_after)
    assert dense / predicted >= speedup and plan.predicted_speedup == pytest.approx(
        dense / predicted)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("args, words", [
    (["--target-macs", "0.5", "--target-speedup", "1.5"], "not both"),
    (["--target-macs", "0"], "(0, 1]"),
    (["--target-macs", "1.5"], "--target-macs"),
    (["--target-speedup", "0.5"], "--target-speedup"),
    (["--target-macs", "0.5", "--sparsity", "0.3"], "drop --sparsity"),
    (["--target-macs", "0.5", "--scope", "global"], "drop --scope global"),
    (["--target-macs", "0.5", "--pattern", "2:4"], "--pattern channel"),
    (["--target-macs", "0.5", "--no-resize"], "--pattern channel"),
])
def test_bad_targets_exit_2(tmp_path, args, words):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(BUILDERS["conv_bn_relu"](), str(path))
    if "--pattern" not in args:
        args = ["--pattern", "channel"] + args
    res = invoke(path, *args, "-o", tmp_path / "out.onnx")
    assert res.exit_code == 2, res.output
    assert words in res.output and "error:" in res.output
    assert not (tmp_path / "out.onnx").exists()


def test_options_api_errors():
    with pytest.raises(OptionError, match="not both"):
        prune(BUILDERS["conv_bn_relu"](), pattern="channel", target_macs=0.5,
              target_speedup=2.0)


def test_speedup_run_reports_predicted_and_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path))
    model = BUILDERS["conv_bn_relu"]()
    notes = []
    for _ in range(2):
        res = prune(model, pattern="channel", target_speedup=1.2, threads=1, validate=False)
        alloc = [r for r in res.state.records if getattr(r, "allocation", None)][0].allocation
        assert alloc["target"] == {"speedup": 1.2} and alloc["threads"] == 1
        assert alloc["predicted_speedup"] >= 1.2 or not alloc["reached"]
        assert alloc["measured_speedup"] == pytest.approx(
            alloc["dense_seconds"] / alloc["pruned_seconds"])
        assert alloc["macs_after"] == count_macs(res.model).total
        notes.append([n for n in res.report.notes if n.startswith(("allocation", "latency"))])
    assert "measured in" in notes[0][0] and notes[1][0].endswith("read from the cache")
    assert "allocation: target speed-up x1.20, predicted x" in notes[1][1]
    assert "measured x" in notes[1][1] and "1 thread," in notes[1][1]
    assert len(list((tmp_path / "latency").iterdir())) == 1


def test_curve_at():
    from onnxprune.channels.allocate import curve_at

    curve = [(0.0, 0.0), (0.25, 0.1), (0.5, 0.05)]  # noise: made non-decreasing
    assert curve_at(curve, 0.125) == pytest.approx(0.05)
    assert curve_at(curve, 0.5) == pytest.approx(0.1)
    assert curve_at([(0.0, 0.0), (0.25, 0.1), (0.5, 0.3)], 0.75) == pytest.approx(0.5)


def test_measured_damage_restores_weights_and_drives_the_allocation():
    from onnxprune.channels.allocate import measured_damage
    from onnxprune.channels.select import group_scores
    from onnxprune.inputs.dataset import CalibrationSet

    model = BUILDERS["conv_bn_relu"]()
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    scores = group_scores(handle, graph)
    data = CalibrationSet.from_arrays(model, {"x": np.random.default_rng(0).standard_normal(
        (4, 3, 16, 16)).astype(np.float32)})
    feeds = list(data.batches(4))
    before = {t.name: handle.read(t).copy() for t in handle.model.graph.initializer}
    curves = measured_damage(handle, graph, scores, feeds)
    for t in handle.model.graph.initializer:
        np.testing.assert_array_equal(handle.read(t), before[t.name])
    assert set(curves) == {0, 2}
    assert [p for p, _ in curves[0]] == [0.0, 0.25, 0.5]
    assert [p for p, _ in curves[2]] == [0.0, 6 / 24, 0.5]
    assert all(e > 0 for c in curves.values() for _, e in c[1:])
    # each point is the error of the model with those channels masked, run on its own
    twin = load(copy.deepcopy(model))
    twin_graph = build_channel_graph(twin)
    mask_channels(twin, {2: sorted(np.argsort(scores[2], kind="stable")[:12].tolist())},
                  twin_graph)
    ref = [o for f in feeds for o in run(model, f)]
    out = [o for f in feeds for o in run(twin.model, f)]
    err = sum(((o - r).astype(np.float64) ** 2).sum() for o, r in zip(out, ref)) / sum(
        (r.astype(np.float64) ** 2).sum() for r in ref)
    assert curves[2][2][1] == pytest.approx(err, rel=1e-4)
    # the plan uses them (and says so), and still meets the target exactly
    plan = allocate_for_target(handle, graph, target_macs=0.5, calibration=data)
    assert plan.notes and "4 calibration samples" in plan.notes[0]
    resize_channels(handle, graph, plan.removed)
    assert count_macs(handle.model).total / count_macs(model).total <= 0.5
    assert count_macs(handle.model).total == pytest.approx(plan.predicted_macs, abs=0.5)


def test_report_target_row():
    res = prune(BUILDERS["conv_bn_relu"](), pattern="channel", target_macs=0.5, validate=False)
    (row,) = res.report.sections["channel allocation target"]
    assert row["target"] == "macs" and row["value"] == 0.5 and row["reached"] is True
    assert row["macs_ratio"] == row["predicted_macs_ratio"] <= 0.5
    assert "measured_speedup" not in row
    import json
    json.dumps(res.report.to_dict())
