"""--damage refit (channels/allocate.py ConsumerFit, calibration/channel_scores.refit_columns):
a group's damage measured with its consumers refit by least squares from the kept channels,
the model's weights left as they were, and the option's plumbing and errors."""

import copy
import re

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import prune
from onnxprune.calibration.channel_scores import refit_columns
from onnxprune.channels.allocate import consumer_fits, measured_damage
from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.select import group_scores
from onnxprune.cli import main
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import load


def _redundant_model():
    """x -> Conv(4, 1x1, bias) -> Relu -> Conv(2, 1x1, bias) -> y, where channel 3 of the first
    conv is 0.1 x channel 0 (weights and bias): after the Relu it is exactly 0.1 x channel 0."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32) + 1.0
    b1 = rng.standard_normal(4).astype(np.float32)
    w1[3], b1[3] = 0.1 * w1[0], 0.1 * b1[0]
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    w2[:, 3] = 2.0  # what channel 3 contributes is not small
    b2 = rng.standard_normal(2).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(model, n=8):
    x = np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)
    return CalibrationSet.from_arrays(model, {"x": x})


def _one_group():
    """The redundant model, its handle and channel graph, its one group's id, scores that take
    channel 3 first then channel 2, the calibration data and its feeds (batches of 8)."""
    model = _redundant_model()
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    (gid,) = list(group_scores(handle, graph))
    data = _data(model)
    return (model, handle, graph, gid, {gid: np.array([4.0, 3.0, 2.0, 1.0])}, data,
            list(data.batches(8)))


def test_refit_columns_recovers_a_dependent_column_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 4))
    x[:, 3] = 0.5 * x[:, 0] - 2.0 * x[:, 1] + 3.0  # affine in the kept columns
    w = rng.standard_normal((5, 4))
    b = rng.standard_normal(5)
    moment, mean = x.T @ x / len(x), x.mean(axis=0)
    new, shift = refit_columns(w, moment, mean, np.array([3]), damp=0.0)
    assert (new[:, 3] == 0).all()
    np.testing.assert_allclose(x @ new.T + b + shift, x @ w.T + b, atol=1e-9)
    # without a bias the raw moment is used: the constant part is lost, nothing else
    new0, none = refit_columns(w, moment, None, np.array([3]), damp=0.0)
    assert none is None and (new0[:, 3] == 0).all()
    resid = x @ w.T - x @ new0.T
    assert np.abs(resid).max() > 0.1  # the constant 3.0 cannot come back without a bias
    # nothing removed: unchanged, no shift
    same, zero = refit_columns(w, moment, mean, np.zeros(0, np.int64))
    np.testing.assert_array_equal(same, w)
    assert (zero == 0).all()


def test_refit_damage_sees_what_the_refit_recovers_and_restores_weights():
    model, handle, graph, gid, scores, data, feeds = _one_group()  # channel 3 first, then 2
    before = {t.name: handle.read(t).copy() for t in handle.model.graph.initializer}
    fits = consumer_fits(handle, graph, scores, data)
    assert [f.weight.name for f in fits[gid]] == ["w2"] and fits[gid][0].bias is not None
    plain = measured_damage(handle, graph, scores, feeds)
    refit = measured_damage(handle, graph, scores, feeds, fits=fits)
    for t in handle.model.graph.initializer:
        np.testing.assert_array_equal(handle.read(t), before[t.name])
    assert [p for p, _ in refit[gid]] == [p for p, _ in plain[gid]] == [0.0, 0.25, 0.5]
    # channel 3 alone (25 %): the output error without refit is large, with the consumer
    # refit it is only the dampening's (channel 3 is 0.1 x channel 0 after the Relu)
    assert plain[gid][1][1] > 0.005
    assert refit[gid][1][1] < 1e-2 * plain[gid][1][1]
    # two channels (50 %): the refit cannot bring channel 2 back, only lower the error
    assert 0 < refit[gid][2][1] < plain[gid][2][1]


def test_damage_option_reaches_the_allocation_note(tmp_path):
    model = _redundant_model()
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    notes = {}
    for damage in ("output", "refit"):
        res = prune(copy.deepcopy(model), pattern="channel", target_macs=0.8, calibration=cal,
                    damage=damage, refit=True, validate=False)
        notes[damage] = [n for r in res.state.records for n in getattr(r, "notes", [])
                         if n.startswith("allocation: damage")]
    assert len(notes["output"]) == len(notes["refit"]) == 1
    assert "consumers refit by least squares (1 groups" in notes["refit"][0]
    assert "refit" not in notes["output"][0]


@pytest.mark.parametrize("args, words", [
    (["--damage", "both"], "--damage"),
])
def test_bad_damage_exits_2(tmp_path, args, words):
    model = tmp_path / "m.onnx"
    model.write_bytes(_redundant_model().SerializeToString())
    res = CliRunner().invoke(main, ["prune", str(model), "--pattern", "channel", "--target-macs",
                                    "0.8", "-o", str(tmp_path / "o.onnx")] + args)
    assert res.exit_code == 2, res.output
    assert words in res.output


def test_damage_api_error():
    from onnxprune.errors import OptionError

    with pytest.raises(OptionError, match="damage must be one of output, refit"):
        prune(_redundant_model(), pattern="channel", target_macs=0.8, damage="both",
              validate=False)


def test_metric_damage_is_the_metric_drop_plus_the_tie_breaker():
    from onnxprune.channels.allocate import METRIC_TIE
    from onnxprune.runtime.evaluate import Metric

    model, handle, graph, gid, scores, data, feeds = _one_group()
    ref = [o for f in feeds for o in _session(model).run(None, dict(f))]
    norm = sum(float((r.astype(np.float64) ** 2).sum()) for r in ref)

    def minus_error(session):  # higher is better: minus the relative output error
        out = [o for f in feeds for o in session.run(None, dict(f))]
        return -sum(float(((o.astype(np.float64) - r) ** 2).sum())
                    for o, r in zip(out, ref)) / norm

    calls = []
    metric = Metric(lambda s: calls.append(1) or minus_error(s), "minus_error", dense=0.0)
    plain = measured_damage(handle, graph, scores, feeds)
    scored = measured_damage(handle, graph, scores, feeds, metric=metric)
    assert len(calls) == 2  # one evaluation per level
    for (p0, e0), (p1, e1) in zip(plain[gid], scored[gid]):
        assert p0 == p1 and e1 == pytest.approx(e0 * (1 + METRIC_TIE), rel=1e-4, abs=1e-12)
    # a metric that does not move: only the tie-breaker is left
    flat = measured_damage(handle, graph, scores, feeds,
                           metric=Metric(lambda s: 1.0, "flat", dense=1.0))
    for (_, e0), (_, e1) in zip(plain[gid], flat[gid]):
        assert e1 == pytest.approx(METRIC_TIE * e0, rel=1e-6, abs=1e-15)


def _session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_metric_damage_through_prune_counts_its_evaluations(tmp_path):
    model = _redundant_model()
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    calls = []

    def metric(session):
        calls.append(1)
        return 1.0

    res = prune(copy.deepcopy(model), pattern="channel", target_macs=0.8, calibration=cal,
                damage="metric", evaluate=metric, validate=False)
    (note,) = [n for r in res.state.records for n in getattr(r, "notes", [])
               if n.startswith("allocation: damage")]
    assert "2 evaluations" in note and "scored by" in note
    assert len(calls) == 1 + 2 + 1  # dense, two trials, the pruned model


@pytest.mark.parametrize("extra, words", [
    ({"damage": "metric"}, "give --eval-script"),
    ({"damage": "refit", "calibration": None}, "--calibration"),
])
def test_damage_needs_its_inputs(tmp_path, extra, words):
    from onnxprune.errors import OptionError

    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.zeros((2, 3, 8, 8), np.float32))
    kw = dict(pattern="channel", target_macs=0.8, calibration=cal, validate=False)
    kw.update(extra)
    with pytest.raises(OptionError, match=words):
        prune(_redundant_model(), **kw)


def test_base_damage_is_the_increase_over_the_base():
    model, handle, graph, gid, scores, data, feeds = _one_group()
    before = {t.name: handle.read(t).copy() for t in handle.model.graph.initializer}
    plain = measured_damage(handle, graph, scores, feeds, levels=(0.25, 0.5))
    # base: channel 3 already removed; the next levels are 1/4 + 1/8 -> still 1 channel (k
    # rounds to 1 or 2) and 1/4 + 1/4 = 2 channels: the increase of 2 removed over 1 removed
    staged = measured_damage(handle, graph, scores, feeds, base={gid: [3]})
    assert staged[gid][0] == (0.0, 0.0) and staged[gid][1] == (0.25, 0.0)
    (p, e), = [pt for pt in staged[gid][2:] if pt[0] == 0.5]
    assert e == pytest.approx(plain[gid][2][1] - plain[gid][1][1], rel=1e-4)
    for t in handle.model.graph.initializer:
        np.testing.assert_array_equal(handle.read(t), before[t.name])


def test_damage_stages_measure_again_and_meet_the_target(tmp_path):
    from onnxprune.report.macs import count_macs

    model = _redundant_model()
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32))
    res = prune(copy.deepcopy(model), pattern="channel", target_macs=0.7, calibration=cal,
                damage_stages=2, validate=False)
    notes = [n for r in res.state.records for n in getattr(r, "notes", [])]
    assert any("damage measured again at 1 intermediate allocation" in n for n in notes)
    assert count_macs(res.model).total / count_macs(model).total <= 0.7
    from onnxprune.errors import OptionError

    for bad in (0, 11, 1.5, True):
        with pytest.raises(OptionError, match="--damage-stages must be a whole number"):
            prune(copy.deepcopy(model), pattern="channel", target_macs=0.7, calibration=cal,
                  damage_stages=bad, validate=False)
    with pytest.raises(OptionError, match="--damage-stages measures"):
        prune(copy.deepcopy(model), pattern="channel", target_macs=0.7, damage_stages=2,
              validate=False)


def _wide_model(width=16):
    """x -> Conv(width, 1x1) -> Relu -> Conv(2, 1x1) -> y: one channel group of ``width``."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w1", (width, 3, 1, 1)), ("b1", (width,)), ("w2", (2, width, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="c1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_group_taken_past_its_measured_levels_is_measured_there():
    """The damage curves are measured at 25 % and 50 %; a target that needs most of a group
    gone makes the allocation measure the fraction it takes (not extrapolate the 25-50 % slope)
    and allocate again, so the chosen width lies within what was measured."""
    model = _wide_model()
    cal = {"x": np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)}
    res = prune(copy.deepcopy(model), pattern="channel", target_macs=0.3, calibration=cal,
                validate=False)
    notes = [n for r in res.state.records for n in getattr(r, "notes", [])
             if "past their measured damage levels" in n]
    assert len(notes) == 1 and "group 0 at " in notes[0]
    levels = [float(p) / 100 for p in re.findall(r"(\d+) %", notes[0])]
    kept = next(t for t in res.model.graph.initializer if t.name == "w1").dims[0]
    removed = (16 - kept) / 16
    assert removed > 0.5 and removed <= max(levels) + 1e-9
