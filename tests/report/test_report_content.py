"""What a report says: tool and schema version, the options as used (defaults resolved),
per-layer MACs before/after in pruning runs, the output's real file size (external data
included), every "left alone" reason in plain words, and the note on densely stored zeros."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import builders as B
import onnxprune
from onnxprune.report.build import NOT_SELECTED, dense_zeros_note
from onnxprune.report.macs import count_macs
from onnxprune.report.reasons import OUTCOME, explain, meaning
from onnxprune.report.report import SCHEMA_VERSION, LayerRow, Report


@pytest.fixture(scope="module")
def digits(models_dir):
    return models_dir / "digits_cnn.onnx"


# -- tool and schema version ---------------------------------------------------------------------
def test_to_dict_names_the_tool_and_schema_version():
    d = Report(model="m.onnx").to_dict()
    assert d["tool"] == {"name": "onnxprune", "version": onnxprune.__version__}
    assert d["schema_version"] == SCHEMA_VERSION == 1
    assert list(d)[:2] == ["tool", "schema_version"]


# -- options as used ------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, sparsity, used", [
    ("unstructured", None, 0.5), ("4x1", None, 0.5), ("2:4", None, 0.5), ("1:4", None, 0.75),
    ("channel", None, 0.5), ("unstructured", 0.7, 0.7), ("4x1", 0.8, 0.8),
])
def test_report_options_show_the_sparsity_used(digits, pattern, sparsity, used):
    result = onnxprune.prune(digits, pattern=pattern, sparsity=sparsity, validate=False)
    assert result.report.options["sparsity"] == used
    assert result.report.to_dict()["options"]["sparsity"] == used
    assert result.report.options["pattern"] == pattern


def test_default_sparsity_is_the_one_applied(digits):
    result = onnxprune.prune(digits, validate=False, resize=False)
    # every weight is pruned to the sparsity the report says was used
    for row in result.report.rows:
        assert row.sparsity_after == pytest.approx(result.report.options["sparsity"], abs=0.01)


def test_search_reports_the_sparsity_it_found(digits):
    result = onnxprune.prune(digits, max_error=0.3, search=True)
    found = result.report.options["sparsity"]
    assert 0 < found <= 0.95
    assert f"is {found:.4f}" in result.report.notes[-1]


# -- per-layer MACs in pruning runs --------------------------------------------------------------
def test_prune_report_rows_carry_macs_before_and_after(digits):
    result = onnxprune.prune(digits, pattern="channel", sparsity=0.5)
    rows = result.report.rows
    assert all(r.macs_before is not None and r.macs_after is not None for r in rows)
    # every MAC-counted node of this CNN reads one prunable weight: rows add up to the totals
    assert sum(r.macs_before for r in rows) == count_macs(digits).total == result.report.macs_before
    assert sum(r.macs_after for r in rows) == count_macs(result.model).total \
        == result.report.macs_after
    shrunk = [r for r in rows if r.shape_after != r.shape]
    assert shrunk and all(r.macs_after < r.macs_before for r in shrunk)
    d = result.report.to_dict()["rows"]
    assert [r["macs_before"] for r in d] == [r.macs_before for r in rows]


def test_masked_run_keeps_dense_macs_per_row(digits):
    result = onnxprune.prune(digits, pattern="4x1", sparsity=0.8, resize=False, validate=False)
    assert all(r.macs_after == r.macs_before and r.macs_before > 0 for r in result.report.rows)
    assert result.report.sparse_macs_after < result.report.macs_after


# -- file sizes, external data included ------------------------------------------------------------
@pytest.mark.parametrize("same_folder", [False, True])
def test_output_file_size_includes_external_data(tmp_path, digits, same_folder):
    model = onnx.load(digits)
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.data", size_threshold=0)
    src_data = src.parent / "model.data"
    assert src_data.stat().st_size > src.stat().st_size
    out = (src.parent if same_folder else tmp_path / "out") / "pruned.onnx"
    out.parent.mkdir(exist_ok=True)
    result = onnxprune.prune(src, output=out, validate=False)
    written = [out, out.with_name("pruned.onnx.data")]
    assert sorted(p for p in out.parent.iterdir() if p.name.startswith("pruned")) == written
    # the output's own data file, not the input's (same folder: model.data is not counted)
    assert result.report.file_size_after == sum(p.stat().st_size for p in written) \
        > out.stat().st_size
    assert result.report.file_size_before == src.stat().st_size + src_data.stat().st_size


def test_inline_output_file_size_is_the_file(tmp_path, digits):
    out = tmp_path / "pruned.onnx"
    (tmp_path / "pruned.onnx.data").write_bytes(b"stale")  # not the model's: not counted
    result = onnxprune.prune(digits, output=out, force=True, validate=False)
    assert result.report.file_size_after == out.stat().st_size


# -- reasons in plain words --------------------------------------------------------------------------
def test_explain_says_what_a_frozen_reason_means():
    text = explain("group", "Softmax 'sm' does not map axis 1 of 'c'")
    assert text.startswith("Softmax 'sm' does not map axis 1 of 'c': ")
    assert "removing channels would change what the Softmax computes" in text
    assert text.endswith("; this group keeps all its channels")


@pytest.mark.parametrize("kind, reason, means", [
    ("group", "graph output 'y' keeps its shape", "change the output's shape"),
    ("group", "no channel rule for com.x:Fancy 'f'", "does not know how this op passes channels"),
    ("group", "Reshape 'r': reshape merges/splits it with a channel axis",
     "merges or splits these channels"),
    ("group", "Shape 's': its size on axis 1 is read by Shape", "reads this tensor's size"),
    ("weight", "INT8 weight (quantized or integer); only float weights are pruned",
     "quantization stays valid"),
    ("weight", "skipped by config rule 0", "--config"),
])
def test_explain_known_reasons(kind, reason, means):
    text = explain(kind, reason)
    assert text.startswith(reason) and means in text and text.endswith(OUTCOME[kind])


def test_explain_unknown_reason_still_says_the_outcome():
    assert meaning("group", "something new") == ""
    assert explain("group", "something new") == "something new; " + OUTCOME["group"]
    assert explain("weight", "odd.") == "odd; " + OUTCOME["weight"]


def test_explain_does_not_repeat_an_outcome_the_reason_states():
    reason = ("2:4 needs input channels in multiples of 4 per kernel position; this Conv has 1, "
              "so it stays dense")
    assert explain("weight", reason) == reason
    nan = explain("weight", "holds NaN or infinity; its channels are left whole")
    assert nan == ("holds NaN or infinity; its channels are left whole (the values are not "
                   "finite, so their importance cannot be measured)")
    with pytest.raises(ValueError, match="kind"):
        explain("layer", "x")


def _softmax_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "c1.w"], ["c"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Softmax", ["c"], ["s"], axis=1, name="sm"),
             helper.make_node("Conv", ["s", "c2.w"], ["y"], name="c2")]
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [1, 8, 10, 10])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])],
                        [B.tensor("c1.w", (16, 8, 3, 3)), B.tensor("c2.w", (4, 16, 1, 1), 1)])


def test_channel_report_explains_every_frozen_group():
    report = onnxprune.prune(_softmax_model(), pattern="channel").report
    frozen = dict(report.frozen)
    assert frozen["group 0 [16 ch: c1.w]"] == (
        "Softmax 'sm' does not map axis 1 of 'c': the Softmax mixes or reads values across this "
        "axis, so removing channels would change what the Softmax computes; this group keeps "
        "all its channels")
    assert frozen["group 2 [4 ch: c2.w]"].startswith("graph output 'y' keeps its shape: ")
    d = report.to_dict()["frozen"]
    assert all(f["reason"].endswith(OUTCOME["group"]) for f in d)


def test_skipped_weights_are_explained_in_prune_and_inspect(digits):
    report = onnxprune.prune(digits, pattern="2:4", validate=False).report
    assert report.skipped == [("onnx::Conv_39", "2:4 needs input channels in multiples of 4 per "
                               "kernel position; this Conv has 1, so it stays dense")]
    # an integer weight it cannot prune (nonzero zero point): inspect and prune say the same
    w = helper.make_tensor("Wq", TensorProto.INT8, [8, 4], np.arange(32).tolist())
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("MatMul", ["y", "V"], ["z"])]
    model = B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                         [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
                         [w, helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                          helper.make_tensor("zp", TensorProto.INT8, [], [3]),
                          B.tensor("V", (4, 3))])
    pruned = dict(onnxprune.prune(model, validate=False).report.skipped)
    inspected = dict(onnxprune.inspect(model).skipped)
    assert pruned["Wq"] == inspected["Wq"] == explain(
        "weight", "INT8 weight: its zero point is not 0 (asymmetric quantization): a pruned "
                  "entry is written as 0, which would not dequantize to 0")
    assert inspected["Wq"].endswith("; this weight is kept as it was (not pruned)")


@pytest.mark.parametrize("kwargs, left_out", [
    (dict(exclude="head"), ["head.0.weight", "head.2.weight"]),
    (dict(op_types="Gemm"), ["onnx::Conv_39", "onnx::Conv_42", "onnx::Conv_45"]),
    (dict(include="Conv_42"), ["onnx::Conv_39", "onnx::Conv_45", "head.0.weight",
                               "head.2.weight"]),
    (dict(), []),
])
def test_weights_the_options_left_out_are_listed(digits, kwargs, left_out):
    report = onnxprune.prune(digits, validate=False, resize=False, **kwargs).report
    assert report.skipped == [(name, explain("weight", NOT_SELECTED)) for name in left_out]
    if left_out:
        assert report.skipped[0][1] == ("not selected: left out by --op-types, --include or "
                                        "--exclude; this weight is kept as it was (not pruned)")
    # every weight the model holds is either a row or listed with its reason
    assert {r.name for r in report.rows} | {n for n, _ in report.skipped} == {
        "onnx::Conv_39", "onnx::Conv_42", "onnx::Conv_45", "head.0.weight", "head.2.weight"}


def test_channel_group_with_an_unselected_producer_is_explained(digits):
    report = onnxprune.prune(digits, pattern="channel", op_types="Gemm", validate=False).report
    frozen = dict(report.frozen)
    assert frozen["group 0 [16 ch: onnx::Conv_39]"] == (
        "producer onnx::Conv_39 is not selected (--op-types/--include/--exclude/config): a weight "
        "that produces these channels is outside your selection, and removing channels would "
        "change that weight too; this group keeps all its channels")


# -- zeros stored densely ------------------------------------------------------------------------------
def _row(params, params_after, nz_before, nz_after):
    return LayerRow("w", "MatMul", (params,), (params_after,), params, params_after, nz_before,
                    nz_after)


def test_dense_zeros_note_only_when_new_zeros_are_stored():
    assert dense_zeros_note([_row(100, 100, 100, 100)], 1000, 1000) is None
    # channel removal: the rows that are left hold no new zeros
    assert dense_zeros_note([_row(100, 50, 100, 50)], 1000, 600) is None
    # zeros that were there before are not news
    assert dense_zeros_note([_row(100, 100, 60, 60)], 1000, 1000) is None
    note = dense_zeros_note([_row(100, 100, 90, 40), _row(10, 10, 10, 5)], 2048, 2048)
    assert note == ("zeros are stored densely: the 55 weights set to zero still take their full "
                    "space in the file (file 2.0 KiB → 2.0 KiB); the file shrinks only when "
                    "compressed (e.g. zip/gzip, which packs the runs of zeros) or with --pattern "
                    "channel, which removes whole channels, or with --storage bitmask or sparse "
                    "(about 237 B / 0 B smaller)")
    # 60 % zeros: 40 values + 1 padding value x 4 B + 13 B of bits = 177 B of 400: bitmask
    # pays, sparse's 12 B per nonzero does not; under 50 % zeros neither does
    assert dense_zeros_note([_row(100, 100, 100, 60)], None, None).endswith(
        "(which save nothing here: a weight needs over 1/2 zeros for bitmask, 2/3 for "
        "sparse's int64 indices)")
    assert "(file" not in dense_zeros_note([_row(100, 100, 90, 40)], None, None)
    # 90% zeros: 1000 float32 -> 100 nonzeros x (4 B value + 8 B index) = 2800 B saved by
    # sparse; bitmask: 101 values x 4 B + 125 B of bits = 529 B, 3471 B saved
    assert dense_zeros_note([_row(1000, 1000, 1000, 100)], None, None, [4]).endswith(
        "--storage bitmask or sparse (about 3.4 KiB / 2.7 KiB smaller)")


def test_masked_run_notes_dense_zeros_and_channel_run_does_not(tmp_path, digits):
    masked = onnxprune.prune(digits, pattern="4x1", sparsity=0.8, resize=False, validate=False,
                             output=tmp_path / "m.onnx").report
    assert masked.file_size_after == pytest.approx(masked.file_size_before, rel=0.02)
    notes = [n for n in masked.notes if n.startswith("zeros are stored densely")]
    assert len(notes) == 1 and "--pattern channel" in notes[0] and "gzip" in notes[0]
    channel = onnxprune.prune(digits, pattern="channel", validate=False,
                              output=tmp_path / "c.onnx").report
    assert channel.file_size_after < channel.file_size_before
    assert not any(n.startswith("zeros are stored densely") for n in channel.notes)
