"""The per-layer onnxruntime timing table (runtime/latency.py): its structure, the cache (a
second call opens no session), the key, interpolation and prediction. No timing is asserted."""

import copy
import json

import numpy as np
import pytest

from channel_models import BUILDERS
from onnxprune.channels.allocate import node_costs, uniform_width
from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.model.index import node_key
from onnxprune.runtime import latency as lat
from onnxprune.runtime.latency import LatencyTable, latency_table, predict_seconds


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latency"


def _table(handle, **kw):
    widths = kw.pop("widths", (1.0, 0.5))
    return latency_table(handle, lambda w: uniform_width(handle, w), widths=widths, threads=1,
                         repeats=2, warmup=1, **kw)


def test_table_structure(cache):
    model = BUILDERS["conv_bn_relu"]()
    handle = load(copy.deepcopy(model))
    table, cached = _table(handle, widths=(1.0, 0.75, 0.5))
    assert not cached
    convs = [node_key(n) for n in model.graph.node if n.op_type == "Conv"]
    assert list(table.nodes) == convs
    assert table.widths == [1.0, 0.75, 0.5] and table.threads == 1
    assert table.input_shapes == {"x": [1, 3, 16, 16]}
    nodes = {n.key: n for n in node_costs(handle, build_channel_graph(handle))}
    for key, entry in table.nodes.items():
        assert entry["op_type"] == "Conv" and len(entry["seconds"]) == 3
        assert all(s > 0 for s in entry["seconds"])
        assert entry["macs"][0] == nodes[key].macs  # dense width first
        assert entry["macs"] == sorted(entry["macs"], reverse=True)
    # conv 1 reads group 0 (16 -> 12 -> 8) and writes group 2 (24 -> 18 -> 12)
    assert table.nodes[convs[1]]["macs"] == [nodes[convs[1]].macs * f for f in
                                             (1, 0.75 * 0.75, 0.25)]
    assert len(table.model_seconds) == 3 and all(s > 0 for s in table.model_seconds)
    # the model is untouched by the measurement
    assert handle.model.SerializeToString() == model.SerializeToString()
    assert [p.name for p in cache.iterdir()] == [f"{table.key}.json"]


def test_second_call_reads_the_cache(cache, monkeypatch):
    handle = load(BUILDERS["residual"]())
    first, cached = _table(handle)
    assert not cached

    def refuse(*a, **k):
        raise AssertionError("a session was opened")

    monkeypatch.setattr(lat, "ort_session", refuse)
    again, cached = latency_table(handle, refuse, widths=(1.0, 0.5), threads=1)
    assert cached and again.to_dict() == first.to_dict()
    # another thread count, input shape or model is another entry (so it would measure)
    with pytest.raises(AssertionError, match="session was opened|refuse"):
        latency_table(handle, refuse, widths=(1.0, 0.5), threads=2)


def test_damaged_cache_entry_is_measured_again(cache):
    handle = load(BUILDERS["conv_bn_relu"]())
    table, _ = _table(handle)
    (cache / f"{table.key}.json").write_text("{not json")
    again, cached = _table(handle)
    assert not cached and json.loads((cache / f"{table.key}.json").read_text())["key"] == \
        table.key


def test_key_follows_content_threads_and_shapes():
    a = load(BUILDERS["conv_bn_relu"]())
    b = load(BUILDERS["residual"]())
    shapes = {"x": [1, 3, 16, 16]}
    k = lat.table_key(a, 1, shapes, 1, 1, (1.0, 0.5))
    assert k == lat.table_key(load(BUILDERS["conv_bn_relu"]()), 1, shapes, 1, 1, (1.0, 0.5))
    assert len({k, lat.table_key(b, 1, shapes, 1, 1, (1.0, 0.5)),
                lat.table_key(a, 2, shapes, 1, 1, (1.0, 0.5)),
                lat.table_key(a, 1, {"x": [2, 3, 16, 16]}, 1, 1, (1.0, 0.5)),
                lat.table_key(a, 1, shapes, 8, 1, (1.0, 0.5))}) == 5


def _fake():
    t = LatencyTable("k", 1, {}, 1, [1.0, 0.5, 0.25])
    t.nodes = {"a": {"op_type": "Conv", "macs": [100, 50, 25], "seconds": [10.0, 6.0, 4.0]},
               "b": {"op_type": "Conv", "macs": [40, 20, 10], "seconds": [2.0, 3.0, 1.0]}}
    t.model_seconds = [15.0, 0.0, 0.0]
    return t


def test_interpolation():
    t = _fake()
    assert t.seconds("a", 100) == 10.0 and t.seconds("a", 50) == 6.0
    assert t.seconds("a", 75) == pytest.approx(8.0)
    assert t.seconds("a", 12.5) == pytest.approx(2.0)  # through (0, 0)
    assert t.seconds("a", 0) == 0.0
    assert t.seconds("a", 200) == pytest.approx(20.0)  # beyond dense: proportional
    # noise made b's half width slower than dense: made non-decreasing
    assert t.seconds("b", 20) == 3.0 and t.seconds("b", 40) == 3.0
    assert t.seconds("c", 10) is None
    assert t.dense_seconds == 15.0 and t.rest == pytest.approx(15.0 - 10.0 - 3.0)


def test_prediction_sums_tabled_nodes_and_rest():
    from onnxprune.channels.allocate import NodeCost

    t = _fake()
    nodes = [NodeCost("a", "Conv", 100, [(1.0, ((8, ((0, 8),)),))]),
             NodeCost("b", "Conv", 40, [(1.0, ((8, ((1, 8),)),))]),
             NodeCost("c", "Conv", 999, [])]  # not tabled: inside the rest
    assert predict_seconds(t, nodes, {}) == pytest.approx(15.0)
    assert predict_seconds(t, nodes, {0: 0.5, 1: 0.25}) == pytest.approx(2.0 + 6.0 + 1.0)


def test_roundtrip_dict():
    t = _fake()
    assert LatencyTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_measure_speedup_returns_times():
    handle = load(BUILDERS["conv_bn_relu"]())
    half = uniform_width(handle, 0.5)
    dense, pruned, ratio = lat.measure_speedup(handle, half, {"x": [1, 3, 16, 16]}, threads=1,
                                               repeats=2, warmup=1)
    assert dense > 0 and pruned > 0 and ratio == pytest.approx(dense / pruned)
    assert [np.prod(t.dims) for t in half.model.graph.initializer if len(t.dims) == 4] != \
        [np.prod(t.dims) for t in handle.model.graph.initializer if len(t.dims) == 4]


def test_rest_scales_with_the_tabled_nodes():
    """The model timed at each width: the rest (model - tabled nodes) is fit as fixed + scale x
    nodes, and the prediction of a narrower allocation shrinks the rest with the nodes."""
    from onnxprune.channels.allocate import NodeCost

    t = LatencyTable("k", 1, {"x": [1]}, 1, [1.0, 0.5, 0.25])
    t.nodes = {"a": {"op_type": "Conv", "macs": [100, 50, 25], "seconds": [10.0, 6.0, 3.0]},
               "b": {"op_type": "Conv", "macs": [40, 20, 10], "seconds": [2.0, 1.0, 0.5]}}
    # rest = 1 + 0.5 x nodes at every width
    t.model_seconds = [n + 1.0 + 0.5 * n for n in (12.0, 7.0, 3.5)]
    fixed, scale = t.rest_model()
    assert fixed == pytest.approx(1.0) and scale == pytest.approx(0.5)
    nodes = [NodeCost("a", "Conv", 100, [(1.0, ((8, ((0, 8),)),))]),
             NodeCost("b", "Conv", 40, [(1.0, ((8, ((1, 8),)),))])]
    assert predict_seconds(t, nodes, {}) == pytest.approx(t.model_seconds[0])
    assert predict_seconds(t, nodes, {0: 0.5, 1: 0.5}) == pytest.approx(t.model_seconds[1])
    # a rest that does not grow with the nodes stays fixed (never a negative scale)
    t.model_seconds = [n + 4.0 - 0.01 * n for n in (12.0, 7.0, 3.5)]
    fixed, scale = t.rest_model()
    assert scale == 0.0 and fixed == pytest.approx(np.mean([4.0 - 0.01 * n
                                                            for n in (12.0, 7.0, 3.5)]))
