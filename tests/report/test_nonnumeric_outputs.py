"""Validation on graph outputs that are not numeric tensors (strings from ai.onnx.ml nodes,
sequences, maps, sequences of maps such as sklearn-onnx's ZipMap): compared by equality,
noted in the report, never gated and never a crash."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import prune
from onnxprune.cli import main
from onnxprune.report.compare import compare
from onnxprune.runtime.session import run_model

vi = helper.make_tensor_value_info


def _model(extra_nodes, extra_outputs, ml=False, consts=()):
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")] + [
        numpy_helper.from_array(np.array(v, np.int64), n) for n, v in consts]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")] + extra_nodes
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 16])],
                              [vi("y", TensorProto.FLOAT, [2, 8])] + extra_outputs,
                              inits)
    opsets = [helper.make_opsetid("", 17)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", 3))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _string_cast():
    return _model([helper.make_node("Cast", ["y"], ["s"], to=TensorProto.STRING)],
                  [vi("s", TensorProto.STRING, [2, 8])])


def _label_encoder():
    return _model([helper.make_node("ArgMax", ["y"], ["am"], axis=1, keepdims=0),
                   helper.make_node("LabelEncoder", ["am"], ["label"], domain="ai.onnx.ml",
                                    keys_int64s=list(range(8)),
                                    values_strings=[f"class {i}" for i in range(8)])],
                  [vi("label", TensorProto.STRING, [2])], ml=True)


def _zipmap():
    seq_of_maps = helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    return _model([helper.make_node("ZipMap", ["y"], ["zm"], domain="ai.onnx.ml",
                                    classlabels_int64s=list(range(8)))],
                  [helper.make_value_info("zm", seq_of_maps)], ml=True)


def _ragged_sequence():
    return _model([helper.make_node("Slice", ["y", "s0", "e1", "ax"], ["part"]),
                   helper.make_node("SequenceConstruct", ["y", "part"], ["seq"])],
                  [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
                  consts=(("s0", [0]), ("e1", [1]), ("ax", [0])))


MODELS = {"string": (_string_cast, "s", "string tensor"),
          "label": (_label_encoder, "label", "string tensor"),
          "zipmap": (_zipmap, "zm", "sequence of maps"),
          "ragged": (_ragged_sequence, "seq", "sequence of tensors")}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_onnxruntime_runs_the_hostile_model(case):
    make, name, _ = MODELS[case]
    out = run_model(make(), {"x": np.ones((2, 16), np.float32)})
    assert name in out  # the class is real: onnxruntime gives these outputs


@pytest.mark.parametrize("case", sorted(MODELS))
def test_prune_compares_non_numeric_outputs_by_equality(case, tmp_path):
    make, name, kind = MODELS[case]
    result = prune(make(), sparsity=0.5, max_error=10.0)
    cmp = result.report.comparison
    stats = cmp[name]
    assert stats.ok and not stats.numeric and stats.kind == kind
    assert 0.0 <= stats.equal <= 1.0
    assert cmp["y"].numeric and cmp.max_abs == cmp["y"].max_abs  # aggregates: numeric only
    assert cmp.passed(10.0)
    assert any(f"output '{name}' is a {kind}, not a numeric tensor: compared by equality"
               in note for note in result.report.notes)
    json.dumps(result.report.to_dict(), allow_nan=False)  # the JSON report still serializes


@pytest.mark.parametrize("case", sorted(MODELS))
def test_sensitivity_allocation_measures_only_float_tensors(case):
    # the per-layer output error sums float tensor outputs; the others are left out
    make, name, _ = MODELS[case]
    result = prune(make(), sparsity=0.5, allocate="sensitivity")
    assert result.report.comparison[name].ok


@pytest.mark.parametrize("case", sorted(MODELS))
def test_cli_never_crashes_on_non_numeric_outputs(case, tmp_path):
    make, name, _ = MODELS[case]
    src = tmp_path / "m.onnx"
    onnx.save(make(), str(src))
    res = CliRunner().invoke(main, [str(src), "-o", str(tmp_path / "o.onnx"), "--sparsity",
                                    "0.5", "--max-error", "10"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "compared by equality" in " ".join(res.output.split()) and (tmp_path / "o.onnx").exists()


def test_compare_by_equality_units():
    strings = np.array([["a", "b"], ["c", "d"]], dtype=object)
    cmp = compare({"s": strings}, {"s": np.array([["a", "x"], ["c", "d"]], dtype=object)})
    assert cmp["s"].kind == "string tensor" and cmp["s"].equal == 0.75 and cmp.passed(0.0)
    maps = [{0: 0.5, 1: 0.5}, {0: 1.0, 1: 0.0}]
    cmp = compare({"m": maps}, {"m": [{0: 0.5, 1: 0.5}, {0: 0.9, 1: 0.1}]})
    assert cmp["m"].kind == "sequence of maps" and cmp["m"].equal == 0.5
    assert cmp.max_abs == 0.0 and cmp.worst_cosine == 1.0  # no numeric output to aggregate
    # a different kind or length cannot pass
    cmp = compare({"m": maps}, {"m": maps[:1]})
    assert not cmp.passed(1.0) and "size" in cmp["m"].reason
    cmp = compare({"s": strings}, {"s": np.zeros((2, 2), np.float32)})
    assert not cmp["s"].ok and "where the reference has a string tensor" in cmp["s"].reason
    cmp = compare({"s": strings}, {})
    assert cmp["s"].reason == "missing from the candidate's outputs"
    # numeric sequences of equal shapes keep the numeric statistics
    seq = [np.ones(3, np.float32), np.zeros(3, np.float32)]
    assert compare({"q": seq}, {"q": seq})["q"].numeric
