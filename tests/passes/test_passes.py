"""The pass infrastructure: declared prerequisites checked when a pipeline is built, and the
typed record each pass returns (exact counts on small built models)."""

from __future__ import annotations

import numpy as np
import pytest

import builders as B
import onnxprune
from onnxprune.errors import OnnxPruneError, ValidationFailed
from onnxprune.options import PruneOptions
from onnxprune.passes.base import Pipeline, PipelineError, PruneState, check_pipeline
from onnxprune.passes.calibrated import (AllocateBySensitivity, BiasRecord, Calibrate,
                                         CalibrateRecord, CorrectBias, SensitivityRecord)
from onnxprune.passes.masking import ApplyMasks, MaskRecord, ScoreRecord, ScoreWeights
from onnxprune.passes.sequential import PruneSequentially, SequentialRecord
from onnxprune.passes.structure import (ChannelRecord, DeadChannelRecord, PruneChannels,
                                        RemoveDeadChannels)
from onnxprune.passes.validate import Validate, ValidateRecord
from onnxprune.passes.weights import FindRecord, FindWeights, SelectRecord, SelectWeights
from onnxprune.report.reasons import explain


def _batched_model():
    """conv_gemm_model with a dynamic batch, so calibration can run 16 samples at once."""
    m = B.conv_gemm_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    return m


CALIB = {"x": np.random.default_rng(0).standard_normal((16, 8, 10, 10)).astype(np.float32)}


def _records(result):
    return {r.name: r for r in result.state.records}


# -- prerequisites: a programming error when the pipeline is built ------------------------------
@pytest.mark.parametrize("passes, missing", [
    ([FindWeights(), SelectWeights(), PruneSequentially()], "calibration"),
    ([FindWeights(), SelectWeights(), AllocateBySensitivity()], "calibration"),
    ([FindWeights(), SelectWeights(), PruneChannels(refit=True)], "calibration"),
    ([FindWeights(), SelectWeights(), ApplyMasks()], "scores"),
    ([SelectWeights()], "weights"),
    ([FindWeights(), SelectWeights(), Calibrate(collect=False), ScoreWeights(), ApplyMasks(),
      CorrectBias()], "statistics"),
])
def test_missing_prerequisite_fails_when_the_pipeline_is_built(passes, missing):
    with pytest.raises(PipelineError, match=rf"requires \['{missing}'\]"):
        Pipeline(passes)
    with pytest.raises(PipelineError):
        check_pipeline(passes)


def test_pipeline_error_is_a_programming_error_not_a_user_error():
    assert issubclass(PipelineError, RuntimeError)
    assert not issubclass(PipelineError, OnnxPruneError)


def test_complete_pipelines_pass_the_check():
    Pipeline([FindWeights(), SelectWeights(), PruneChannels()])
    Pipeline([FindWeights(), SelectWeights(), Calibrate(), PruneChannels(refit=True)])
    Pipeline([FindWeights(), SelectWeights(), Calibrate(collect=False), PruneSequentially(),
              RemoveDeadChannels(), Validate()])
    Pipeline([FindWeights(), Calibrate(targets="all", collect=False)])


@pytest.mark.parametrize("kw", [
    dict(), dict(pattern="2:4"), dict(pattern="channel"), dict(pattern="channel", refit=True),
    dict(criterion="wanda"), dict(criterion="sparsegpt", allocate="sensitivity"),
    dict(calibration=CALIB, scope="global"), dict(allocate="sensitivity", validate=False),
])
def test_every_option_set_builds_a_checked_pipeline(kw):
    from onnxprune.api import build_passes
    assert len(build_passes(PruneOptions(**kw))) >= 3


def test_a_pass_run_alone_checks_its_prerequisites():
    state = PruneState.from_model(B.conv_gemm_model())
    with pytest.raises(PipelineError, match="'score' requires"):
        ScoreWeights()(state)
    assert state.records == []  # nothing ran


def test_facts_accumulate_as_passes_run():
    state = PruneState.from_model(B.conv_gemm_model())
    Pipeline([FindWeights(), SelectWeights(sparsity=0.5), ScoreWeights(), ApplyMasks()]
             ).run(state)
    assert state.facts == {"weights", "selection", "scores", "masks"}


# -- each pass's record has exact counts --------------------------------------------------------
def test_masking_records():
    state = PruneState.from_model(B.conv_gemm_model())
    results = Pipeline([FindWeights(), SelectWeights(sparsity=0.5), ScoreWeights(), ApplyMasks(),
                        Validate()]).run(state)
    find, select, score, mask, valid = [r.record for r in results]
    assert isinstance(find, FindRecord) and find.weights == ["conv.w", "fc.w"]
    assert find.skipped == [] and not find.modified
    assert isinstance(select, SelectRecord) and select.selected == ["conv.w", "fc.w"]
    assert isinstance(score, ScoreRecord)
    assert (score.scored, score.left_alone, score.scores_held) == (2, 0, True)
    assert isinstance(mask, MaskRecord) and mask.modified and mask.scope == "local"
    assert mask.masked == 2
    assert mask.sparsity_before == 0.0 and mask.sparsity_after == (576 + 80) / (1152 + 160)
    assert {k: (v.numel, v.nonzeros_before, v.nonzeros_after) for k, v in mask.layers.items()} \
        == {"conv.w": (1152, 1152, 576), "fc.w": (160, 160, 80)}
    assert isinstance(valid, ValidateRecord) and valid.executed
    assert valid.comparison is state.comparison and valid.gate_failure is None
    assert [r.seconds >= 0 for r in state.records] == [True] * 5


def test_score_record_counts_what_it_left_alone():
    from onnx import TensorProto, helper, numpy_helper
    bad = B.rng(1).standard_normal((8, 8)).astype(np.float32)
    bad[0, 0] = np.nan
    good = B.rng(2).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "bad"], ["a"]),
             helper.make_node("MatMul", ["a", "good"], ["y"])]
    model = B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                         [numpy_helper.from_array(bad, "bad"), numpy_helper.from_array(good, "good")])
    state = PruneState.from_model(model)
    Pipeline([FindWeights(), SelectWeights(sparsity=0.5), ScoreWeights()]).run(state)
    score = state.records[-1]
    assert (score.scored, score.left_alone) == (1, 1)
    assert [s.name for s in score.skipped] == ["bad"] and "NaN" in score.skipped[0].reason
    assert [s.name for s in state.skipped] == ["bad"]


def test_channel_record():
    res = onnxprune.prune(B.conv_gemm_model(), pattern="channel", sparsity=0.25)
    rec = _records(res)["channels"]
    assert isinstance(rec, ChannelRecord) and rec.modified
    assert (rec.channels_removed, rec.groups, rec.groups_pruned, rec.resized) == (4, 2, 1, 2)
    assert list(rec.removed) == ["0"] and len(rec.removed["0"]) == 4
    assert len(rec.frozen) == 1 and "graph output 'y'" in rec.frozen[0][1]
    # the report says the same, in plain words (report/reasons.py)
    assert res.report.frozen == [(n, explain("group", r)) for n, r in rec.frozen]
    conv, fc = rec.layers["conv.w"], rec.layers["fc.w"]
    assert (conv.shape, conv.shape_after, conv.channels) == ((16, 8, 3, 3), (12, 8, 3, 3),
                                                             (16, 12))
    assert (conv.nonzeros_before, conv.nonzeros_after) == (1152, 864)
    assert (fc.shape, fc.shape_after, fc.nonzeros_after) == ((10, 16), (10, 12), 120)
    assert rec.refit == []


def test_dead_channel_record():
    mask = np.ones((16, 8, 3, 3), dtype=bool)
    mask[[1, 5, 9]] = False  # three whole filters
    res = onnxprune.prune(B.conv_gemm_model(), masks={"conv.w": mask}, resize=True,
                          validate=False)
    rec = _records(res)["dead-channels"]
    assert isinstance(rec, DeadChannelRecord) and rec.modified
    assert (rec.channels_removed, rec.resized) == (3, 2)
    assert rec.layers["conv.w"].shape_after == (13, 8, 3, 3)
    assert rec.layers["fc.w"].shape_after == (10, 13)
    # the dead filters still emit relu(bias): folded exactly into the Gemm's bias
    assert [f.split(" (")[0] for f in rec.folded] == ["unit 1", "unit 5", "unit 9"]
    assert all(f.endswith("folded into Gemm 'fc'") for f in rec.folded)
    assert rec.kept_nonzero_const == []
    assert rec.notes == ["dead channels: 3 constant outputs folded exactly into consumer biases",
                         "3 dead channels removed; 2 weights resized"]


def test_calibrated_records():
    res = onnxprune.prune(_batched_model(), sparsity=0.5, calibration=CALIB, scope="global",
                          allocate="uniform", validate=False, resize=False)
    recs = _records(res)
    cal, bias = recs["calibrate"], recs["bias-correction"]
    assert isinstance(cal, CalibrateRecord)
    assert (cal.samples, cal.data_free, cal.with_stats, cal.no_stats) == (16, False, 2, {})
    assert cal.model_runs > 0 and cal.peak_bytes > 0
    assert isinstance(bias, BiasRecord) and bias.corrected == ["conv.w", "fc.w"]
    assert bias.notes == ["biases of 2 layers absorb the mean their pruned weights carried"]


def test_generated_calibration_record_says_data_free():
    res = onnxprune.prune(_batched_model(), sparsity=0.5, criterion="wanda", allocate="uniform",
                          validate=False, resize=False)
    cal = _records(res)["calibrate"]
    assert (cal.samples, cal.data_free) == (32, True)
    assert "data-free in effect" in cal.notes[0] and cal.notes[0] in res.report.notes


def test_sequential_and_sensitivity_records():
    res = onnxprune.prune(_batched_model(), sparsity=0.5, calibration=CALIB, criterion="wanda",
                          allocate="sensitivity", validate=False)
    recs = _records(res)
    sens, seq = recs["sensitivity"], recs["sequential"]
    assert isinstance(sens, SensitivityRecord) and sens.table is res.state.sensitivity
    assert sens.target == 0.5 and set(sens.allocation) == {"conv.w", "fc.w"}
    assert isinstance(seq, SequentialRecord)
    assert seq.waves == [["conv.w"], ["fc.w"]] and seq.bias_corrected == ["conv.w", "fc.w"]
    for key, level in sens.allocation.items():
        layer = seq.layers[key]
        assert layer.numel - layer.nonzeros_after == round(level * layer.numel)


def test_validate_record_holds_the_gate_failure():
    state = PruneState.from_model(B.conv_gemm_model())
    Pipeline([FindWeights(), SelectWeights(sparsity=0.9), ScoreWeights(), ApplyMasks(),
              Validate(max_error=1e-9)]).run(state)
    rec = state.records[-1]
    assert rec.executed and rec.comparison is not None
    assert rec.gate_failure.startswith("pruned model's outputs drift past --max-error 1e-09")
    assert state.gate_failure == rec.gate_failure
    with pytest.raises(ValidationFailed, match="drift past") as info:
        onnxprune.prune(B.conv_gemm_model(), sparsity=0.9, max_error=1e-9)
    assert info.value.report.comparison is not None and info.value.report.output is None


# -- one way to build reports: per-layer MACs from inspect and prune agree ------------------------
def test_per_layer_macs_agree_between_inspect_and_prune():
    model = B.conv_gemm_model()
    seen = {r.name: r.macs_before for r in onnxprune.inspect(model).rows}
    assert seen == {"conv.w": 16 * 100 * 8 * 9, "fc.w": 160}
    masked = onnxprune.prune(model, sparsity=0.5, resize=False).report
    # masking leaves every layer's dense MACs as they were: the same numbers inspect gives
    assert {r.name: (r.macs_before, r.macs_after) for r in masked.rows} == {
        k: (v, v) for k, v in seen.items()}
    channels = onnxprune.prune(model, pattern="channel", sparsity=0.25).report
    assert {r.name: r.macs_before for r in channels.rows} == seen
    assert {r.name: r.macs_after for r in channels.rows} == {"conv.w": 12 * 100 * 8 * 9,
                                                             "fc.w": 120}
    assert channels.to_dict()["rows"][0]["macs_after"] == 12 * 100 * 8 * 9


def test_outputs_broken_by_pruning_are_never_written(tmp_path):
    # x [1, 4] (positive) @ W [4, 3] (positive) -> Log: finite. A keep-mask that empties
    # column 0 makes that output log(0) = -inf; the model must not be written, even without
    # --max-error.
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).uniform(0.1, 1.0, (4, 3)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Log", ["m"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w, "W")]), opset_imports=[helper.make_opsetid("", 17)])
    keep = np.ones_like(w, bool)
    keep[:, 0] = False
    out = tmp_path / "out.onnx"
    feeds = {"x": np.ones((1, 4), np.float32)}
    with pytest.raises(ValidationFailed, match="output 'y'.*inf/nan"):
        onnxprune.prune(model, masks={"W": keep}, inputs=feeds, output=out)
    assert not out.exists()
    # The same mask on a column the output never turns non-finite for passes.
    keep = np.ones_like(w, bool)
    keep[0, :] = False
    result = onnxprune.prune(model, masks={"W": keep}, inputs=feeds, output=out)
    assert out.exists() and result.report is not None


@pytest.mark.parametrize("what", ["masks", "scores"])
def test_user_arrays_keyed_by_no_weight_are_an_error_naming_the_key(what):
    model = B.conv_gemm_model()
    name = model.graph.initializer[0].name
    shape = tuple(model.graph.initializer[0].dims)
    arrays = {name: np.ones(shape, bool if what == "masks" else np.float32),
              "typo_weight": np.ones(shape, bool if what == "masks" else np.float32)}
    with pytest.raises(OnnxPruneError, match=f"{what} given for \\['typo_weight'\\]"):
        onnxprune.prune(model, **{what: arrays})
