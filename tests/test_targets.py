"""``--target``: TensorRT 2:4 eligibility per weight (each rule's reason), ``--pattern 2:4
--target tensorrt`` pruning exactly the eligible, worthwhile weights, the MAC fractions, the
inspect table and JSON sections, and the onnxruntime-cpu text."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import OptionError
from onnxprune.masking.patterns import parse_pattern
from onnxprune.model.io import load
from onnxprune.ops.targets import ORT_CPU_NOTE, tensorrt_eligibility, tensorrt_verdict
from onnxprune.ops.weights import find_weights
from onnxprune.passes.weights import satisfies_24
from onnxprune.report.inspect import satisfies_nm
from onnxprune.report.macs import count_macs
from onnxprune.report.targets import ORT_TABLE, TRT_MACS, TRT_TABLE
from tests.builders import conv_gemm_model, make_model, tensor

vi = helper.make_tensor_value_info

#: weight -> (eligible, likely picked) in :func:`deploy_model`
EXPECTED = {
    "big.w": (True, True),        # Conv 64->256, 3x3: K=256, C×9=576
    "dw.w": (False, False),       # depthwise
    "grp.w": (False, False),      # group=2
    "small.w": (True, False),     # Conv 256->18 1x1: K=18
    "odd.w": (False, False),      # Conv 18->32 1x1: C=18 not a multiple of 4
    "fc1.w": (True, False),       # Gemm 32->256: C=32
    "fc2.w": (True, True),        # Gemm 256->256 (transB)
    "deconv.w": (False, False),   # ConvTranspose
}


def deploy_model(dtype=np.float32) -> onnx.ModelProto:
    """x[1,64,8,8] -> big Conv -> depthwise -> grouped -> small 1x1 -> C=18 1x1 -> ConvTranspose
    -> GAP -> Gemm 32->256 -> Gemm 256->256, plus an activation x activation MatMul."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "big.w"], ["a"], pads=[1, 1, 1, 1], name="big"),
        node("Conv", ["a", "dw.w"], ["b"], pads=[1, 1, 1, 1], group=256, name="dw"),
        node("Conv", ["b", "grp.w"], ["c"], group=2, name="grp"),
        node("Conv", ["c", "small.w"], ["d"], name="small"),
        node("Conv", ["d", "odd.w"], ["e"], name="odd"),
        node("ConvTranspose", ["e", "deconv.w"], ["e2"], name="deconv"),
        node("GlobalAveragePool", ["e2"], ["g"], name="gap"),
        node("Flatten", ["g"], ["f"], name="flatten"),
        node("Gemm", ["f", "fc1.w"], ["h"], name="fc1"),
        node("Gemm", ["h", "fc2.w"], ["y"], transB=1, name="fc2"),
        node("Transpose", ["h"], ["ht"], name="t"),
        node("MatMul", ["h", "ht"], ["z"], name="scores"),
    ]
    inits = [tensor("big.w", (256, 64, 3, 3), 1, dtype), tensor("dw.w", (256, 1, 3, 3), 2, dtype),
             tensor("grp.w", (256, 128, 1, 1), 3, dtype), tensor("small.w", (18, 256, 1, 1), 4, dtype),
             tensor("odd.w", (32, 18, 1, 1), 5, dtype), tensor("deconv.w", (32, 32, 2, 2), 6, dtype),
             tensor("fc1.w", (32, 256), 7, dtype), tensor("fc2.w", (256, 256), 8, dtype)]
    return make_model(nodes, [vi("x", elem, [1, 64, 8, 8])],
                      [vi("y", elem, [1, 256]), vi("z", elem, [1, 1])], inits)


@pytest.fixture(scope="module")
def verdicts():
    handle = load(deploy_model())
    weights, skipped = find_weights(handle)
    return {v.name: v for v in tensorrt_eligibility(handle, weights, skipped)}


def test_each_weight_eligible_and_picked_as_the_rules_say(verdicts):
    weights = {k: (v.eligible, v.picked) for k, v in verdicts.items() if v.is_weight}
    assert weights == EXPECTED
    assert [k for k, v in verdicts.items() if not v.is_weight] == ["scores"]


@pytest.mark.parametrize("name, words", [
    ("dw.w", ["TensorRT would not run it sparse", "depthwise convolution (group=256"]),
    ("grp.w", ["TensorRT would not run it sparse", "grouped convolution (group=2)"]),
    ("odd.w", ["C=18 input channels is not a multiple of 4"]),
    ("deconv.w", ["ConvTranspose runs dense"]),
    ("small.w", ["eligible when built with fp16/int8", "unlikely to be picked",
                 "K=18 output channels < 256"]),
    ("fc1.w", ["unlikely to be picked", "C=32 input features < 256"]),
    ("big.w", ["eligible when built with fp16/int8 and likely picked", "K=256",
               "C×kernel=64×9=576"]),
    ("fc2.w", ["likely picked", "K=256, C=256"]),
    ("scores", ["no constant weight operand", "both operands are computed"]),
])
def test_each_rule_says_its_reason(verdicts, name, words):
    reason = verdicts[name].reason
    for w in words:
        assert w in reason, (name, reason)


def test_dims_and_precision(verdicts):
    big = verdicts["big.w"]
    assert (big.channels, big.outputs, big.reduction, big.precision) == (64, 256, 576,
                                                                         "fp16/int8 build")
    assert (verdicts["grp.w"].channels, verdicts["dw.w"].channels) == (128, 1)


def test_fp16_weights_need_no_build_precision_and_float64_is_not_eligible():
    handle = load(deploy_model(np.float16))
    weights, _ = find_weights(handle)
    big = next(tensorrt_verdict(w) for w in weights if w.name == "big.w")
    assert big.precision == "fp16" and big.picked
    assert big.reason.startswith("eligible and likely picked")
    w64 = tensor("w", (256, 256), 0, np.float64)
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [vi("x", TensorProto.DOUBLE, [1, 256])], [vi("y", TensorProto.DOUBLE, [1, 256])],
                   [w64])
    (weight,), _ = find_weights(load(m))
    v = tensorrt_verdict(weight)
    assert not v.eligible and "float64 weight" in v.reason


def test_batched_matmul_weight_and_ragged_tiles():
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [vi("x", TensorProto.FLOAT, [2, 4, 256])], [vi("y", TensorProto.FLOAT, [2, 4, 256])],
                   [tensor("w", (2, 256, 256))])
    (weight,), _ = find_weights(load(m))
    assert "batched 3-D MatMul weight" in tensorrt_verdict(weight).reason
    # large but K=260 is not a multiple of 8, C=260 not of 16: eligible, not picked
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                   [vi("x", TensorProto.FLOAT, [1, 260])], [vi("y", TensorProto.FLOAT, [1, 260])],
                   [tensor("w", (260, 260))])
    (weight,), _ = find_weights(load(m))
    v = tensorrt_verdict(weight)
    assert v.eligible and not v.picked
    assert "K=260 is not a multiple of 8" in v.reason and "C=260 is not a multiple of 16" in v.reason


def test_quantized_weight_is_named_with_onnxprunes_reason():
    q = numpy_helper.from_array(np.ones((256, 256), np.int8), "wq")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    # a nonzero zero point: onnxprune leaves the weight alone (a zero point of 0 is pruned)
    zp = numpy_helper.from_array(np.array(1, np.int8), "zp")
    m = make_model([helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"]),
                    helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [vi("x", TensorProto.FLOAT, [1, 256])], [vi("y", TensorProto.FLOAT, [1, 256])],
                   [q, s, zp])
    handle = load(m)
    weights, skipped = find_weights(handle)
    (v,) = tensorrt_eligibility(handle, weights, skipped)
    assert not v.is_weight and "onnxprune leaves its constant 'wq' alone" in v.reason


def test_satisfies_24():
    assert [satisfies_24(parse_pattern(p)) for p in ("2:4", "1:4", "1:2", "2:8", "3:4", "4:8",
                                                     "unstructured", "4x1")] == \
        [True, True, True, True, False, False, False, False]


# -- pruning with --target tensorrt ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned_24():
    model = deploy_model()
    return model, onnxprune.prune(model, pattern="2:4", target="tensorrt", validate=False)


def test_24_target_prunes_exactly_the_picked_weights(pruned_24):
    model, result = pruned_24
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    handle = load(result.model)
    weights = {w.name: w for w in find_weights(handle)[0]}
    for name, (eligible, picked) in EXPECTED.items():
        if picked:  # exactly 2 nonzeros in every 4 consecutive input channels
            w2d = weights[name].layout.to_2d(after[name])
            assert (np.count_nonzero(w2d.reshape(w2d.shape[0], -1, 4), axis=2) == 2).all(), name
            assert np.count_nonzero(after[name]) == after[name].size // 2
        else:  # left dense: no value zeroed (--permute, on with tensorrt, may reorder
            # channels the picked weights share with it: the same values, reordered)
            assert np.array_equal(np.sort(after[name], axis=None),
                                  np.sort(before[name], axis=None)), name
    assert np.count_nonzero(after["big.w"]) == 256 * 64 * 9 // 2


def test_24_target_reports_dense_layers_with_reason(pruned_24):
    _, result = pruned_24
    skipped = dict(result.report.skipped)
    dense = {n for n, (_, picked) in EXPECTED.items() if not picked}
    assert dense <= set(skipped)
    assert {r.name for r in result.report.rows} == {"big.w", "fc2.w"}
    assert skipped["dw.w"].startswith("TensorRT would not run it sparse: depthwise convolution")
    assert skipped["small.w"].startswith(
        "TensorRT would not run it sparse (too small to pay): K=18 output channels < 256")
    assert all("stays dense (--target tensorrt)" in skipped[n] for n in dense)


def test_24_target_reports_sparse_mac_fraction(pruned_24):
    model, result = pruned_24
    macs = count_macs(model)
    sparse = macs.per_node["big"] + macs.per_node["fc2"]
    (summary,) = result.report.sections[TRT_MACS]
    assert summary["MACs"] == macs.total
    assert summary["2:4 and eligible (can run sparse) MACs"] == sparse
    assert summary["2:4 and eligible (can run sparse) fraction"] == round(sparse / macs.total, 4)
    eligible = sum(macs.per_node[n] for n in ("big", "small", "fc1", "fc2"))
    assert summary["eligible MACs"] == eligible
    assert summary["likely picked MACs"] == sparse
    rows = {r["weight"] or r["node"]: r for r in result.report.sections[TRT_TABLE]}
    assert rows["big.w"]["2:4 now"] and not rows["small.w"]["2:4 now"]
    assert rows["big.w"]["MACs"] == macs.per_node["big"]
    pct = f"{100 * sparse / macs.total:.1f}%"
    assert any(f"after pruning, {pct} of the model's MACs are in 2:4 weights" in n
               for n in result.report.notes)
    assert result.report.options["target"] == "tensorrt"


def test_without_target_every_weight_is_pruned():
    result = onnxprune.prune(deploy_model(), pattern="2:4", validate=False)
    # all but the two whose C per group is not a multiple of 4 (depthwise, C=18)
    assert {r.name for r in result.report.rows} == set(EXPECTED) - {"dw.w", "odd.w"}
    assert TRT_TABLE not in result.report.sections


def test_unstructured_with_tensorrt_target_prunes_all_and_says_it_runs_dense():
    result = onnxprune.prune(deploy_model(), pattern="unstructured", sparsity=0.5,
                             target="tensorrt", validate=False)
    assert len(result.report.rows) == len(EXPECTED)
    assert any("leaves no weight 2:4, so TensorRT runs every layer dense" in n
               for n in result.report.notes)


def test_onnxruntime_cpu_target_says_only_channel_removal_pays():
    result = onnxprune.prune(deploy_model(), pattern="2:4", target="onnxruntime-cpu",
                             validate=False)
    assert len(result.report.rows) == len(EXPECTED) - 2  # no filtering for this target
    assert any(n.startswith(ORT_CPU_NOTE) and "2:4 zeros will not speed it up" in n
               for n in result.report.notes)
    rows = result.report.sections[ORT_TABLE]
    assert [(r["pattern"], r["speeds up onnxruntime-cpu"]) for r in rows] == [
        ("channel", True), ("unstructured, NxM blocks, N:M", False)]


def test_bad_target_is_an_option_error():
    with pytest.raises(OptionError, match="target must be one of tensorrt, onnxruntime-cpu"):
        onnxprune.prune(deploy_model(), pattern="2:4", target="tflite")
    with pytest.raises(OptionError, match="--target must be one of"):
        onnxprune.inspect(deploy_model(), target="tflite")


# -- inspect ------------------------------------------------------------------------------------

def test_inspect_table_and_fraction_and_already_24(tmp_path):
    model = deploy_model()
    pruned = onnxprune.prune(model, pattern="2:4", target="tensorrt", validate=False).model
    report = onnxprune.inspect(pruned, target="tensorrt")
    rows = {r["weight"] or r["node"]: r for r in report.sections[TRT_TABLE]}
    assert {k for k, r in rows.items() if r["2:4 now"]} == {"big.w", "fc2.w"}
    assert {k for k, r in rows.items() if r["eligible"]} == {k for k, v in EXPECTED.items()
                                                           if v[0]}
    macs = count_macs(model)
    (summary,) = report.sections[TRT_MACS]
    assert summary["2:4 and eligible (can run sparse) MACs"] == \
        macs.per_node["big"] + macs.per_node["fc2"]
    assert summary["eligible fraction"] == round(
        sum(macs.per_node[n] for n in ("big", "small", "fc1", "fc2")) / macs.total, 4)
    dense = onnxprune.inspect(model)
    assert TRT_TABLE not in dense.sections and "target" not in dense.options


def test_inspect_cli_prints_table_and_writes_json_sections(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(deploy_model(), str(path))
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["inspect", str(path), "--target", "tensorrt", "--report",
                                    str(out)])
    assert res.exit_code == 0, res.output
    assert TRT_TABLE in res.output and "likely picked" in res.output
    assert "target tensorrt: 4 of 9 Conv/Gemm/MatMul layers are eligible" in res.output
    data = json.loads(out.read_text())
    assert {r["weight"] for r in data["sections"][TRT_TABLE]} >= set(EXPECTED)
    assert data["sections"][TRT_MACS][0]["likely picked MACs"] > 0
    jsonschema = pytest.importorskip("jsonschema")
    from importlib import resources

    schema = json.loads(resources.files("onnxprune.report").joinpath("report.schema.json")
                        .read_text("utf-8"))
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data)) == []


def test_inspect_cli_onnxruntime_cpu_and_bad_target(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(deploy_model(), str(path))
    res = CliRunner().invoke(main, ["inspect", str(path), "--target", "onnxruntime-cpu"])
    assert res.exit_code == 0, res.output
    assert "only removing channels (--pattern channel)" in " ".join(res.output.split())
    res = CliRunner().invoke(main, ["inspect", str(path), "--target", "tflite"])
    assert res.exit_code == 2 and "tflite" in res.output


def test_prune_cli_24_target(tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(deploy_model(), str(path))
    res = CliRunner().invoke(main, [str(path), "--pattern", "2:4", "--target", "tensorrt",
                                    "-o", str(out), "--no-validate"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "TensorRT would not run it sparse: grouped convolution (group=2)" in text
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert satisfies_nm(pruned["fc2.w"], 2, 4)  # [out, in] as stored with transB=1
    assert np.count_nonzero(pruned["fc1.w"]) == pruned["fc1.w"].size


def test_24_target_with_no_picked_layer_is_a_clear_error(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_gemm_model(), str(path))  # Conv 8->16 and Gemm 16->10: eligible, too small
    res = CliRunner().invoke(main, [str(path), "--pattern", "2:4", "--target", "tensorrt",
                                    "-o", str(tmp_path / "p.onnx")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert text.startswith("error: --target tensorrt: no selected weight is one TensorRT would "
                           "run 2:4 sparse (2 of 2 eligible, none large enough")
    assert not (tmp_path / "p.onnx").exists()


# -- with calibration: error out of proportion to MAC share -------------------------------------

def _calibration():
    return {"x": np.random.default_rng(0).standard_normal((40, 64, 8, 8)).astype(np.float32)}


def test_calibrated_24_target_leaves_costly_small_layer_dense():
    model = deploy_model()
    result = onnxprune.prune(model, pattern="2:4", target="tensorrt", calibration=_calibration())
    skipped = dict(result.report.skipped)
    # fc2 holds 0.7% of the picked MACs but a far larger share of the 2:4 output error
    assert skipped["fc2.w"].startswith("TensorRT could run it sparse, but its measured 2:4 error "
                                       "is out of proportion to the MACs it saves (")
    assert "for 0.7% of the MACs, above --sparse-error-ratio 4); stays dense" in skipped["fc2.w"]
    (title,) = [t for t in result.report.sections if "error vs MAC share" in t]
    rows = {r["weight"]: r for r in result.report.sections[title]}
    assert rows["big.w"]["stays 2:4"] and not rows["fc2.w"]["stays 2:4"]
    assert rows["fc2.w"]["error share"] > 4 * rows["fc2.w"]["MAC share"]
    assert abs(rows["big.w"]["MAC share"] + rows["fc2.w"]["MAC share"] - 1) < 1e-3
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(after["fc2.w"], before["fc2.w"])
    assert np.count_nonzero(after["big.w"]) == after["big.w"].size // 2


def test_sparse_error_ratio_zero_prunes_every_picked_layer_and_bad_ratio_is_refused():
    result = onnxprune.prune(deploy_model(), pattern="2:4", target="tensorrt",
                             calibration=_calibration(), sparse_error_ratio=0)
    assert {r.name for r in result.report.rows} == {"big.w", "fc2.w"}
    assert not any("error vs MAC share" in t for t in result.report.sections)
    with pytest.raises(OptionError, match="--sparse-error-ratio must be 0 \\(off\\) or at least 1"):
        onnxprune.prune(deploy_model(), pattern="2:4", target="tensorrt", sparse_error_ratio=0.5)


def test_24_target_with_no_eligible_layer_says_so():
    m = make_model([helper.make_node("Conv", ["x", "w"], ["y"], group=2, name="g")],
                   [vi("x", TensorProto.FLOAT, [1, 16, 4, 4])],
                   [vi("y", TensorProto.FLOAT, [1, 16, 4, 4])], [tensor("w", (16, 8, 1, 1))])
    with pytest.raises(onnxprune.OnnxPruneError,
                       match=r"no selected weight is one TensorRT would run 2:4 sparse \(none of "
                             r"the 1 is eligible\); nothing to prune"):
        onnxprune.prune(m, pattern="2:4", target="tensorrt", validate=False)
