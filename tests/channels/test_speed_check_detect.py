"""--target-speedup checks its allocation by timing the pruned model and allocates again for a
corrected goal when the measurement misses the target (channels/allocate.py). The timing is
replaced here by fixed answers: what is tested is the correction, not the machine."""

import copy

import pytest

import onnxprune.channels.allocate as alloc_mod
import onnxprune.runtime.latency as lat
from channel_models import BUILDERS
from onnxprune.channels.allocate import allocate_for_target, node_costs
from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.runtime.latency import LatencyTable, predict_seconds


def _table(nodes):
    table = LatencyTable("fake", 1, {"x": [1, 3, 16, 16]}, 1, [1.0, 0.5])
    for n in nodes:
        table.nodes[n.key] = {"op_type": n.op_type, "macs": [n.macs, n.macs // 2],
                              "seconds": [n.macs * 1e-9, n.macs * 0.6e-9]}
    table.model_seconds = [0.001 + sum(e["seconds"][0] for e in table.nodes.values()), 0.0]
    return table


@pytest.mark.parametrize("answers, goals", [
    ([1.3], [1.3]),  # on target at once: one check
    ([1.04, 1.31], [1.3, 1.3 * 1.3 / 1.04]),  # short: a higher goal, then on target
    ([1.6], [1.3]),  # past it: kept (the goal is never lowered below the target)
    # short, then past it by far: bisect back; the lower goal is on target and kept
    ([1.04, 1.6, 1.35], [1.3, 1.3 * 1.3 / 1.04, (1.3 + 1.3 * 1.3 / 1.04) / 2]),
])
def test_goal_corrected_by_measurement(answers, goals, monkeypatch):
    handle = load(copy.deepcopy(BUILDERS["conv_bn_relu"]()))
    graph = build_channel_graph(handle)
    table = _table(node_costs(handle, graph))
    monkeypatch.setattr(lat, "latency_table", lambda *a, **k: (table, True))
    seen = []

    def fake_check(h, g, plan, *a):
        seen.append(plan.predicted_speedup)
        return answers[len(seen) - 1]

    monkeypatch.setattr(alloc_mod, "_check_speedup", fake_check)
    plan = allocate_for_target(handle, graph, target_speedup=1.3, speed_checks=2)
    assert len(seen) == len(answers)
    note = [n for n in plan.notes if n.startswith("speed-up check, the pruned model timed")][0]
    for goal, measured in zip(goals, answers):
        assert f"goal x{goal:.2f} measured x{measured:.2f}" in note
    # each allocation meets its goal as the table predicts it
    for goal, predicted in zip(goals, seen):
        assert predicted >= goal * (1 - 1e-9)
    a = plan.allocation
    kept = {g: a.keep[g] / a.sizes[g] for g in a.keep}
    final = predict_seconds(table, plan.nodes, {}) / predict_seconds(table, plan.nodes, kept)
    assert final == pytest.approx(plan.predicted_speedup)


def test_bisected_goal_that_misses_keeps_the_one_that_met(monkeypatch):
    handle = load(copy.deepcopy(BUILDERS["conv_bn_relu"]()))
    graph = build_channel_graph(handle)
    table = _table(node_costs(handle, graph))
    monkeypatch.setattr(lat, "latency_table", lambda *a, **k: (table, True))
    answers, seen = [1.04, 1.6, 1.2], []

    def fake_check(h, g, plan, *a):
        seen.append(plan)
        return answers[len(seen) - 1]

    monkeypatch.setattr(alloc_mod, "_check_speedup", fake_check)
    plan = allocate_for_target(handle, graph, target_speedup=1.3, speed_checks=2)
    assert len(seen) == 3 and plan is seen[1]  # the plan measured x1.6, not the last one
    note = [n for n in plan.notes if n.startswith("speed-up check, the pruned model timed")][0]
    assert note.endswith(f"final goal x{1.3 * 1.3 / 1.04:.2f}")
