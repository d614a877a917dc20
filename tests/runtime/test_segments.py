"""SegmentRunner: tensors of a model served over the calibration batches, each node run at most
once. Every expectation comes from onnxruntime running the whole model with the tensor exposed
as an output (never hard-coded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.runtime import segments
from onnxprune.runtime import session as runtime_session
from onnxprune.calibration.statistics import collect_layer_stats
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import load
from onnxprune.runtime.segments import SegmentRunner
from onnxprune.masking.selection import select
from onnxprune.calibration.sequential import sequential_waves
from onnxprune.ops.weights import find_weights

import builders as B

F = TensorProto.FLOAT


# =============================================================================================
# helpers
# =============================================================================================
def _vi(name, shape=None, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def _expose(model: onnx.ModelProto, names, feed) -> dict:
    """``{name: array}`` from a run of a copy of the whole ``model`` whose outputs are ``names``
    (graph inputs are taken from the feed)."""
    inputs = {i.name for i in model.graph.input}
    inner = [n for n in names if n not in inputs]
    got = {n: feed[n] for n in names if n in inputs}
    if inner:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        del copy.graph.output[:]
        copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in inner)
        got.update(zip(inner, B.run(copy, feed)))
    return got


def _with_weights(model: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name], t.name))
    return copy


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    (t,) = [t for t in model.graph.initializer if t.name == name]
    return t


def _same(got: np.ndarray, want: np.ndarray, what="") -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    # fused vs unfused kernels (a segment's session may not fuse across segments) can
    # reorder float sums: allow float32 rounding at the tensor's own scale
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * max(scale, 1.0), err_msg=what)


def _check(runner: SegmentRunner, model: onnx.ModelProto, names, data, batch_size) -> list:
    """Request ``names`` and compare every batch with a full run of ``model``."""
    got = list(runner.batches(names))
    feeds = list(data.batches(batch_size))
    assert len(got) == len(feeds)
    for b, (outs, feed) in enumerate(zip(got, feeds)):
        assert list(outs) == list(dict.fromkeys(names))
        want = _expose(model, names, feed)
        for n in names:
            _same(outs[n], want[n], f"{n} batch {b}")
    return got


def _ancestors(graph: onnx.GraphProto, names) -> set:
    """Names of the nodes ``names`` depend on (subgraph reads included)."""
    from onnxprune.model.index import names_read as _names_read

    producer = {o: n for n in graph.node for o in n.output}
    seen, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack.extend(producer[t] for t in _names_read(node) if t in producer)
    return seen


def _spy_segments(monkeypatch) -> list:
    """Record (node names, cached input names, outputs) of every segment session built."""
    seen = []
    real = segments._segment_session

    def spy(handle, nodes, cached, graph_inputs, outputs):
        seen.append(([n.name for n in nodes], sorted(cached), list(outputs)))
        return real(handle, nodes, cached, graph_inputs, outputs)

    monkeypatch.setattr(segments, "_segment_session", spy)
    return seen


def _live_now(runner: SegmentRunner) -> set:
    """Tensors produced by a node that ran and read by a node that has not."""
    return {n for n, i in runner.producer.items()
            if runner.done[i] and runner.pending.get(n, 0) > 0}


# =============================================================================================
# models
# =============================================================================================
def _branch_model(seed=0) -> onnx.ModelProto:
    """x[n,3,6,6] -> conv0 -> relu (r) -> {conv1 (1x1), conv2 (3x3)} -> add (s) -> conv3 (c)
    -> + r (residual, keeps r live) -> GAP -> Flatten (f) -> Gemm (y) -> MatMul (z)."""
    def node(op, inputs, out, **attrs):
        return helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs)

    nodes = [
        node("Conv", ["x", "w0", "b0"], "a", pads=[1, 1, 1, 1]),
        node("Relu", ["a"], "r"),
        node("Conv", ["r", "w1", "b1"], "p1"),
        node("Conv", ["r", "w2"], "p2", pads=[1, 1, 1, 1]),
        node("Add", ["p1", "p2"], "s"),
        node("Conv", ["s", "w3", "b3"], "c", pads=[1, 1, 1, 1]),
        node("Add", ["c", "r"], "rs"),
        node("GlobalAveragePool", ["rs"], "g"),
        node("Flatten", ["g"], "f"),
        node("Gemm", ["f", "fc.w", "fc.b"], "y", transB=1),
        node("MatMul", ["y", "mm.w"], "z"),
    ]
    inits = [B.tensor("w0", (4, 3, 3, 3), seed), B.tensor("b0", (4,), seed + 1),
             B.tensor("w1", (4, 4, 1, 1), seed + 2), B.tensor("b1", (4,), seed + 3),
             B.tensor("w2", (4, 4, 3, 3), seed + 4), B.tensor("w3", (4, 4, 3, 3), seed + 5),
             B.tensor("b3", (4,), seed + 6), B.tensor("fc.w", (5, 4), seed + 7),
             B.tensor("fc.b", (5,), seed + 8), B.tensor("mm.w", (5, 3), seed + 9)]
    return B.make_model(nodes, [_vi("x", ["n", 3, 6, 6])], [_vi("z", ["n", 3])], inits,
                        value_info=[_vi("r", ["n", 4, 6, 6]), _vi("s", ["n", 4, 6, 6])])


WAVES = [["x"], ["r"], ["s"], ["f"], ["y"]]  # the input of each layer, in graph order
SEGMENTS = [[], ["n_a", "n_r"], ["n_p1", "n_p2", "n_s"], ["n_c", "n_rs", "n_g", "n_f"], ["n_y"]]


def _branch_data(model, n=10, seed=1) -> CalibrationSet:
    x = np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)
    return CalibrationSet.from_arrays(model, {"x": x})


def _scoped_model(seed=0) -> onnx.ModelProto:
    """x[n,6] -> mm0 -> relu (hr) -> mm1 (p) -> mm2 (p2); an If on sign(sum x) whose branches
    read hr from the outer scope (q); a Loop (2 trips) on q whose body adds the outer p (lz);
    y = lz + p2. hr is read by mm1 and, only through a subgraph, by the If; p by mm2 and the
    Loop body."""
    r = np.random.default_rng(seed)

    def w(name, shape):
        return numpy_helper.from_array(r.standard_normal(shape).astype(np.float32), name)

    then_g = helper.make_graph([helper.make_node("MatMul", ["hr", "Wt"], ["qt"], name="mm_t")],
                               "then", [], [_vi("qt", ["n", 6])], [w("Wt", (6, 6))])
    else_g = helper.make_graph([helper.make_node("MatMul", ["hr", "We"], ["qe0"], name="mm_e"),
                                helper.make_node("Neg", ["qe0"], ["qe"], name="neg_e")],
                               "else", [], [_vi("qe", ["n", 6])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="b_id"),
         helper.make_node("Add", ["v_in", "p"], ["v_out"], name="b_add")],
        "body", [_vi("it", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
                 _vi("v_in", ["n", 6])],
        [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", ["n", 6])])
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"], name="mm0"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "W1"], ["p"], name="mm1"),
        helper.make_node("MatMul", ["p", "W2"], ["p2"], name="mm2"),
        helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["sx", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["q"], then_branch=then_g, else_branch=else_g,
                         name="if"),
        helper.make_node("Loop", ["trip", "", "q"], ["lz"], body=body, name="loop"),
        helper.make_node("Add", ["lz", "p2"], ["y"], name="out"),
    ]
    inits = [w("W0", (6, 6)), w("W1", (6, 6)), w("W2", (6, 6)), w("We", (6, 6)),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(2, np.int64), "trip")]
    return B.make_model(nodes, [_vi("x", ["n", 6])], [_vi("y", ["n", 6])], inits)


def _scoped_data(model) -> CalibrationSet:
    """10 samples; batches of 4 have positive, negative and positive sums (both branches)."""
    r = np.random.default_rng(5)
    x = r.standard_normal((10, 6)).astype(np.float32) * 0.1
    x[4:8] -= 1.0
    x[[0, 1, 2, 3, 8, 9]] += 1.0
    return CalibrationSet.from_arrays(model, {"x": x})


# =============================================================================================
# 1. values, batch count and order
# =============================================================================================
@pytest.mark.parametrize("batch_size", [4, 10, 3])
def test_wave_by_wave_matches_full_runs(batch_size):
    model = _branch_model()
    data = _branch_data(model)
    runner = SegmentRunner(load(model), data, batch_size)
    sizes = [len(f["x"]) for f in data.batches(batch_size)]
    assert sum(sizes) == 10 and len(sizes) == -(-10 // batch_size)  # ragged last batch
    for names in WAVES:
        got = _check(runner, model, names, data, batch_size)
        assert [len(next(iter(g.values()))) for g in got] == sizes
    # a graph output, then several tensors of several depths at once (all from the cache or
    # the last node)
    _check(runner, model, ["z", "y"], data, batch_size)
    runner.close()


def test_several_tensors_in_one_request():
    model = _branch_model()
    data = _branch_data(model)
    runner = SegmentRunner(load(model), data, 4)
    _check(runner, model, ["p1", "r", "x", "p2"], data, 4)
    _check(runner, model, ["rs", "s", "r"], data, 4)
    _check(runner, model, ["z", "f"], data, 4)
    assert runner.done.all()


def test_the_same_request_twice_is_served_again():
    model = _branch_model()
    data = _branch_data(model)
    runner = SegmentRunner(load(model), data, 4)
    first = _check(runner, model, ["s"], data, 4)
    runs = runner.runs
    second = _check(runner, model, ["s"], data, 4)
    assert runner.runs == runs  # nothing ran again: served from the cache
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["s"], b["s"])


def test_fixed_batch_model_drops_the_remainder():
    model = B.conv_gemm_model()  # x[1,8,10,10]: batches of exactly 1
    x = np.random.default_rng(2).standard_normal((3, 8, 10, 10)).astype(np.float32)
    data = CalibrationSet.from_arrays(model, {"x": x})
    runner = SegmentRunner(load(model), data, 8)
    got = _check(runner, model, ["r"], data, 8)
    assert len(got) == 3 and all(g["r"].shape[0] == 1 for g in got)
    _check(runner, model, ["f"], data, 8)


# =============================================================================================
# 2. each node runs at most once, only ancestors of what was asked
# =============================================================================================
def test_each_node_runs_once_and_only_for_what_is_asked(monkeypatch):
    model = _branch_model()
    data = _branch_data(model)
    seen = _spy_segments(monkeypatch)
    runner = SegmentRunner(load(model), data, 4)
    order = [n.name for n in model.graph.node]
    asked = []
    for names, want in zip(WAVES, SEGMENTS):
        before = len(seen)
        _check(runner, model, names, data, 4)
        asked += names
        segs = [s[0] for s in seen[before:]]
        assert segs == ([want] if want else [])
        ran = {n for s, _, _ in seen for n in s}
        assert ran <= _ancestors(model.graph, asked)
        assert [order[i] for i in np.flatnonzero(runner.done)] == \
            [n for n in order if n in ran]
    every = [n for s, _, _ in seen for n in s]
    assert len(every) == len(set(every))  # disjoint segments
    assert not runner.done[order.index("n_z")]  # nothing asked needs the last MatMul
    # one run per batch and segment
    assert runner.runs == 3 * sum(1 for s in SEGMENTS if s)


def test_partial_segments_reuse_the_cache(monkeypatch):
    model = _branch_model()
    data = _branch_data(model)
    seen = _spy_segments(monkeypatch)
    runner = SegmentRunner(load(model), data, 4)
    _check(runner, model, ["r"], data, 4)
    _check(runner, model, ["p1"], data, 4)  # one branch only
    assert seen[-1][0] == ["n_p1"] and seen[-1][1] == ["r"]
    assert set(runner.cache) == {"r", "p1"}  # both still read by nodes to come
    _check(runner, model, ["s"], data, 4)  # the other branch and the Add, fed from the cache
    assert seen[-1][0] == ["n_p2", "n_s"] and seen[-1][1] == ["p1", "r"]
    assert set(runner.cache) == {"r", "s"}
    every = [n for s, _, _ in seen for n in s]
    assert len(every) == len(set(every))
    # asking a tensor of a branch not yet needed runs that branch alone
    _check(runner, model, ["z"], data, 4)
    assert seen[-1][0] == ["n_c", "n_rs", "n_g", "n_f", "n_y", "n_z"]
    assert seen[-1][1] == ["r", "s"]
    assert runner.done.all()


def test_requests_needing_nothing_new_build_no_session(monkeypatch):
    model = _branch_model()
    data = _branch_data(model)
    seen = _spy_segments(monkeypatch)
    runner = SegmentRunner(load(model), data, 4)
    _check(runner, model, ["s"], data, 4)
    n = len(seen)
    _check(runner, model, ["x"], data, 4)
    _check(runner, model, ["r", "s"], data, 4)  # both cached
    assert len(seen) == n


# =============================================================================================
# 3. weights rewritten between requests are used by the nodes that have not run
# =============================================================================================
def test_weights_rewritten_between_waves_are_used():
    model = _branch_model()  # the handle's proto is another copy: load() does not copy
    data = _branch_data(model)
    handle = load(_branch_model())
    runner = SegmentRunner(handle, data, 4)
    r = np.random.default_rng(3)
    changed = {}

    def prune(name):
        t = _init(handle.model, name)
        old = handle.read(t)
        new = np.where(r.random(old.shape) < 0.5, 0, old * 1.5).astype(old.dtype)
        handle.write(t, new)
        changed[name] = new

    layers = [["w0"], ["w1", "w2"], ["w3"], ["fc.w"], ["mm.w"]]
    for names, weights in zip(WAVES, layers):
        expected = _with_weights(model, changed)
        got = _check(runner, model if not changed else expected, names, data, 4)
        if changed:  # the new weights make a difference: the runner did not use the old ones
            old = _expose(model, names, next(data.batches(4)))
            assert not np.allclose(got[0][names[0]], old[names[0]])
        for w in weights:
            prune(w)
    _check(runner, _with_weights(model, changed), ["z"], data, 4)


def test_a_weight_changed_after_its_node_ran_is_not_seen():
    """The documented limit: cached tensors keep the values their (already run) nodes made."""
    model = _branch_model()
    data = _branch_data(model)
    handle = load(_branch_model())
    runner = SegmentRunner(handle, data, 4)
    _check(runner, model, ["r"], data, 4)
    t = _init(handle.model, "w0")
    handle.write(t, handle.read(t) * 2)
    got = _check(runner, model, ["s"], data, 4)  # conv0 ran before the change: the old r
    feed = next(data.batches(4))
    now = _expose(_with_weights(model, {"w0": handle.read(t)}), ["s"], feed)["s"]
    assert not np.allclose(got[0]["s"], now)


# =============================================================================================
# 4. spilling to disk
# =============================================================================================
def test_spilled_runner_gives_the_same_values_and_cleans_up():
    model = _branch_model()
    data = _branch_data(model)
    mem = SegmentRunner(load(model), data, 4)
    disk = SegmentRunner(load(model), data, 4, budget_bytes=0)
    for names in WAVES:
        a, b = list(mem.batches(names)), list(disk.batches(names))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            for n in names:
                np.testing.assert_array_equal(x[n], y[n])
        assert disk.held == 0 and disk.peak == 0
        assert set(disk.cache) == set(mem.cache)
        if names == ["r"]:
            tmp = Path(disk._tmp.name)
            paths = disk.cache["r"]
            assert len(paths) == 3 and all(isinstance(p, Path) for p in paths)
            assert all(p.parent == tmp and p.is_file() for p in paths)
            np.testing.assert_array_equal(np.load(paths[2]), a[2]["r"])
            assert mem.held == sum(v.nbytes for v in mem.cache["r"]) > 0
        if names == ["f"]:  # r and s are no longer read: their files are gone
            assert not any(p.exists() for p in paths)
            assert set(tmp.glob("*.npy")) == set(disk.cache["f"])
    assert tmp.is_dir()
    disk.close()
    mem.close()
    assert not tmp.exists() and disk._tmp is None
    assert disk.cache == {} and mem.cache == {} and mem.held == 0


def test_held_bytes_never_exceed_the_budget():
    model = _branch_model()
    data = _branch_data(model)
    budget = 4 * 4 * 6 * 6 * 4 + 100  # one batch of r (or s) fits, not two
    runner = SegmentRunner(load(model), data, 4, budget_bytes=budget)
    helds = []
    real = runner._store

    def store(value):
        out = real(value)
        helds.append(runner.held)
        return out

    runner._store = store
    for names in WAVES:
        _check(runner, model, names, data, 4)
        held = sum(v.nbytes for vs in runner.cache.values() for v in vs
                   if isinstance(v, np.ndarray))
        assert runner.held == held <= budget
    assert helds and max(helds) <= budget and runner.peak <= budget
    assert runner.peak > 0  # some in memory ...
    assert runner._tmp is not None  # ... some on disk
    runner.close()


# =============================================================================================
# 5. tensors no node will read are let go
# =============================================================================================
def test_cache_holds_exactly_the_live_tensors():
    model = _branch_model()
    data = _branch_data(model)
    runner = SegmentRunner(load(model), data, 4)
    expected = [set(), {"r"}, {"r", "s"}, {"f"}, {"y"}]
    for names, want in zip(WAVES, expected):
        _check(runner, model, names, data, 4)
        assert set(runner.cache) == want
        assert set(runner.cache) == _live_now(runner) | (set(names) & set(runner.producer))
        assert runner.held == sum(v.nbytes for vs in runner.cache.values() for v in vs)
    assert "r" not in runner.cache and "s" not in runner.cache  # read by nothing left


# =============================================================================================
# 6. a tensor that ran and was let go comes from a session from scratch
# =============================================================================================
def test_dropped_tensor_is_recomputed_from_scratch(monkeypatch):
    model = _branch_model()
    data = _branch_data(model)
    seen = _spy_segments(monkeypatch)
    handle = load(_branch_model())
    runner = SegmentRunner(handle, data, 4)
    _check(runner, model, ["f"], data, 4)
    assert "a" not in runner.cache and "r" not in runner.cache
    n, runs = len(seen), runner.runs
    _check(runner, model, ["a"], data, 4)  # conv0's output: only relu read it
    _check(runner, model, ["r", "x"], data, 4)
    assert len(seen) == n and runner.runs == runs + 6
    # a dropped tensor with one not run yet: all from scratch, the pending node not marked run
    _check(runner, model, ["p1", "y"], data, 4)
    assert len(seen) == n and not runner.done[[m.name for m in model.graph.node].index("n_y")]
    _check(runner, model, ["y"], data, 4)
    assert seen[-1][0] == ["n_y"]
    # from scratch uses the weights as they are now
    t = _init(handle.model, "w0")
    handle.write(t, handle.read(t) * -1)
    _check(runner, _with_weights(model, {"w0": handle.read(t)}), ["a"], data, 4)


# =============================================================================================
# 7. subgraphs reading outer-scope tensors
# =============================================================================================
def test_outer_scope_tensors_stay_live_until_the_subgraph_node_runs(monkeypatch):
    model = _scoped_model()
    data = _scoped_data(model)
    feeds = list(data.batches(4))
    conds = [bool(f["x"].sum() > 0) for f in feeds]
    assert True in conds and False in conds  # both branches are taken
    seen = _spy_segments(monkeypatch)
    runner = SegmentRunner(load(model), data, 4)
    _check(runner, model, ["hr"], data, 4)
    _check(runner, model, ["p"], data, 4)
    assert "hr" in runner.cache  # mm1 ran; the If's branches still read it
    _check(runner, model, ["p2"], data, 4)
    assert set(runner.cache) == {"hr", "p", "p2"}  # p: the Loop body reads it
    _check(runner, model, ["q"], data, 4)
    assert seen[-1][0] == ["sum", "gt", "if"] and seen[-1][1] == ["hr"]
    assert "hr" not in runner.cache and "p" in runner.cache
    _check(runner, model, ["lz"], data, 4)
    assert seen[-1][0] == ["loop"] and seen[-1][1] == ["p", "q"]
    assert "p" not in runner.cache
    _check(runner, model, ["y"], data, 4)
    assert runner.done.all()
    every = [n for s, _, _ in seen for n in s]
    assert len(every) == len(set(every))


def test_subgraph_node_in_the_first_segment(monkeypatch):
    model = _scoped_model(seed=1)
    data = _scoped_data(model)
    seen = _spy_segments(monkeypatch)
    runner = SegmentRunner(load(model), data, 4, budget_bytes=0)
    _check(runner, model, ["q", "x"], data, 4)  # the If with its outer-scope producers
    assert seen[-1][0] == ["mm0", "relu", "sum", "gt", "if"]
    assert set(runner.cache) == {"hr", "q"}  # mm1 will read hr
    _check(runner, model, ["y", "lz"], data, 4)
    runner.close()


# =============================================================================================
# 8. the handle's proto is left as it was
# =============================================================================================
@pytest.mark.parametrize("make", [_branch_model, _scoped_model])
def test_proto_is_unchanged_by_segment_sessions(make):
    model = make()
    data = _branch_data(model) if make is _branch_model else _scoped_data(model)
    handle = load(model)
    before = handle.model.SerializeToString()
    graph = handle.model.graph
    parts = [[n.SerializeToString() for n in graph.node],
             [v.SerializeToString() for v in graph.input],
             [v.SerializeToString() for v in graph.output],
             [v.SerializeToString() for v in graph.value_info]]
    runner = SegmentRunner(handle, data, 4)
    last = model.graph.output[0].name
    first = model.graph.node[0].output[0]
    for names in ([first], [last], [first]):  # the third from scratch
        list(runner.batches(names))
        assert handle.model.SerializeToString() == before
    assert [[n.SerializeToString() for n in graph.node],
            [v.SerializeToString() for v in graph.input],
            [v.SerializeToString() for v in graph.output],
            [v.SerializeToString() for v in graph.value_info]] == parts
    assert handle.model.SerializeToString() == model.SerializeToString()


def test_proto_is_restored_when_a_segment_session_fails(monkeypatch):
    model = _branch_model()
    handle = load(model)
    before = handle.model.SerializeToString()

    def fail(_):
        raise RuntimeError("no session")

    monkeypatch.setattr(runtime_session, "open_session", fail)  # segments build through it
    runner = SegmentRunner(handle, _branch_data(model), 4)
    with pytest.raises(RuntimeError, match="no session"):
        list(runner.batches(["s"]))
    assert handle.model.SerializeToString() == before


# =============================================================================================
# 9. graph inputs
# =============================================================================================
def test_graph_inputs_come_from_the_feed(monkeypatch):
    model = _branch_model()
    data = _branch_data(model)
    seen = _spy_segments(monkeypatch)
    runner = SegmentRunner(load(model), data, 4)
    got = list(runner.batches(["x"]))
    feeds = list(data.batches(4))
    assert len(got) == len(feeds) == 3
    for g, f in zip(got, feeds):
        assert list(g) == ["x"]
        np.testing.assert_array_equal(g["x"], f["x"])
    assert seen == [] and runner.runs == 0 and not runner.done.any()
    # with an intermediate tensor, and again once everything ran
    _check(runner, model, ["x", "r"], data, 4)
    _check(runner, model, ["z"], data, 4)
    _check(runner, model, ["x"], data, 4)


# =============================================================================================
# through collect_layer_stats, as layer-by-layer pruning uses it
# =============================================================================================
def test_layer_stats_through_runners_match_fresh_sessions():
    model = _branch_model()
    data = _branch_data(model)
    handle = load(_branch_model())
    reference = load(_branch_model())
    weights, _ = find_weights(handle)
    plans, _ = select(weights, pattern="unstructured", sparsity=0.5, criterion="magnitude")
    waves, outside = sequential_waves(handle.model, plans)
    assert not outside and len(waves) == 5
    runners = [SegmentRunner(handle, data, 4), SegmentRunner(reference, data, 4)]
    for wave in waves:
        ws = [p.weight for p in wave]
        got = collect_layer_stats(handle, ws, data, batch_size=4, reference=reference,
                                  runners=runners)
        want = collect_layer_stats(handle, ws, data, batch_size=4, reference=reference)
        assert set(got) == set(want) == {w.key for w in ws}
        for key in want:
            for attr in ("hessian", "cross", "in_sq_norms", "group_sums", "ref_sums"):
                a, b = getattr(got[key], attr), getattr(want[key], attr)
                if b is None:
                    assert a is None
                else:
                    scale = max(float(np.abs(b).max()), 1.0)
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale)
        for w in ws:  # prune the wave before the next one is asked
            old = handle.read(w.tensor)
            handle.write(w.tensor, np.where(np.abs(old) < np.median(np.abs(old)), 0, old))
    assert all(r.done.sum() == len(model.graph.node) - 1 for r in runners)
    for r in runners:
        r.close()


# =============================================================================================
# models that used to break the runner: weights listed as graph inputs, sequence-typed values
# =============================================================================================
def test_weights_listed_as_graph_inputs():
    r = np.random.default_rng(7)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    inits = [numpy_helper.from_array(r.standard_normal((8, 8)).astype(np.float32), n)
             for n in ("W1", "W2")]
    model = B.make_model(nodes, [_vi("x", ["n", 8]), _vi("W1", [8, 8]), _vi("W2", [8, 8])],
                         [_vi("y", ["n", 8])], inits)
    data = CalibrationSet.from_arrays(model, {"x": r.standard_normal((5, 8)).astype(np.float32)})
    runner = SegmentRunner(load(_with_weights(model, {})), data, 4)
    _check(runner, model, ["r"], data, 4)
    assert not runner.from_scratch and runner.runs == 2  # one segment, two batches


def test_live_sequence_tensor():
    r = np.random.default_rng(8)
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1, name="split"),
             helper.make_node("SequenceAt", ["seq", "i0"], ["s0"], name="at0"),
             helper.make_node("MatMul", ["s0", "W"], ["y0"], name="mm0"),
             helper.make_node("SequenceAt", ["seq", "i1"], ["s1"], name="at1"),
             helper.make_node("MatMul", ["s1", "W"], ["y1"], name="mm1"),
             helper.make_node("Add", ["y0", "y1"], ["y"], name="add")]
    inits = [numpy_helper.from_array(r.standard_normal((4, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([4, 4], np.int64), "split"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.array(1, np.int64), "i1")]
    model = B.make_model(nodes, [_vi("x", ["n", 8])], [_vi("y", ["n", 4])], inits)
    data = CalibrationSet.from_arrays(model, {"x": r.standard_normal((5, 8)).astype(np.float32)})
    runner = SegmentRunner(load(_with_weights(model, {})), data, 4)
    _check(runner, model, ["s0"], data, 4)  # seq stays live: at1 reads it later
    assert runner.from_scratch  # a list cannot be kept: every request runs from the inputs
    _check(runner, model, ["s1"], data, 4)
