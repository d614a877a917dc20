"""Input shapes and generation, user input files, validity checks, running and comparing."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.model import io
from onnxprune.errors import InputDataError, OnnxPruneError, OptionError
from onnxprune.runtime.validate import (InvalidOutputModel, check_valid, class_axis, compare,
                                input_signature, load_inputs, make_inputs, open_session,
                                parse_input_shapes, resolve_input_shapes, run_model)

OPSET = [helper.make_opsetid("", 17)]


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _w(name, shape, seed=0):
    return numpy_helper.from_array(
        np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _mlp():
    """y = relu(x @ W1) @ W2 with a dynamic batch; W1 also listed as a graph input, the way
    old exporters list every weight."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [_vi("x", ["N", 16]), _vi("W1", [16, 8])],
                              [_vi("y", ["N", 4])], [_w("W1", (16, 8)), _w("W2", (8, 4), 1)])
    return helper.make_model(graph, opset_imports=OPSET)


def _multi_input():
    """Inputs of every kind make_inputs handles; the graph only needs to be valid."""
    inputs = [_vi("image", ["N", 3, "H", "W"]),
              _vi("nhwc", ["N", "H2", "W2", 3], TensorProto.FLOAT16),
              _vi("input_ids", ["N", "seq"], TensorProto.INT64),
              _vi("attention_mask", ["N", "seq"], TensorProto.INT64),
              _vi("token_type_ids", ["N", "seq"], TensorProto.INT32),
              _vi("flag", [None], TensorProto.BOOL),
              _vi("fixed", [2, 5])]
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in inputs]
    outputs = [helper.make_tensor_value_info(i.name + "_out", i.type.tensor_type.elem_type, None)
               for i in inputs]
    return helper.make_model(helper.make_graph(nodes, "multi", inputs, outputs),
                             opset_imports=OPSET)


# -- --input-shape ------------------------------------------------------------------------------
def test_parse_input_shapes_forms():
    assert parse_input_shapes(["x:1x3x224x224", "ids:1,128", "input:0:2x5"]) == {
        "x": (1, 3, 224, 224), "ids": (1, 128), "input:0": (2, 5)}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize("bad", ["x", "x:", ":1x3", "x:1xa", "x:0x3", "x:1x-2", "x:1x"])
def test_parse_input_shapes_rejects_bad_text(bad):
    with pytest.raises(OptionError, match="input:1x3x224x224"):
        parse_input_shapes([bad])


def test_parse_input_shapes_rejects_duplicates():
    with pytest.raises(OptionError, match="twice"):
        parse_input_shapes(["x:1x2", "x:1x3"])


# -- signature and shapes -----------------------------------------------------------------------
def test_signature_skips_initializers_listed_as_inputs():
    specs = input_signature(_mlp())
    assert [s.name for s in specs] == ["x"]
    assert specs[0].dims == ("N", 16) and specs[0].declared == "[N, 16]"


def test_default_shapes():
    shapes = resolve_input_shapes(_multi_input())
    assert shapes == {"image": (1, 3, 224, 224), "nhwc": (1, 224, 224, 3),
                      "input_ids": (1, 16), "attention_mask": (1, 16),
                      "token_type_ids": (1, 16), "flag": (1,), "fixed": (2, 5)}
    assert resolve_input_shapes(_multi_input(), batch=4)["image"] == (4, 3, 224, 224)
    assert resolve_input_shapes(_multi_input(), batch=4)["fixed"] == (2, 5)  # static stays


def test_override_binds_shared_symbols():
    shapes = resolve_input_shapes(_multi_input(), {"input_ids": (2, 128)})
    # 'N' and 'seq' are fixed by the override for every input that uses them.
    assert shapes["attention_mask"] == (2, 128)
    assert shapes["image"] == (2, 3, 224, 224)


def test_override_errors():
    model = _multi_input()
    with pytest.raises(OptionError, match="its inputs are: image, nhwc, input_ids"):
        resolve_input_shapes(model, {"pixels": (1, 3, 8, 8)})
    with pytest.raises(OptionError, match="rank 4"):
        resolve_input_shapes(model, {"image": (1, 3, 8)})
    with pytest.raises(OptionError, match="fixed to 3"):
        resolve_input_shapes(model, {"image": (1, 4, 8, 8)})
    with pytest.raises(OptionError, match="must agree"):
        resolve_input_shapes(model, {"input_ids": (1, 8), "attention_mask": (1, 9)})


def test_input_without_shape_needs_override():
    node = helper.make_node("Relu", ["x"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [_vi("y", None)]), opset_imports=OPSET)
    with pytest.raises(OptionError, match="--input-shape x:"):
        make_inputs(model)
    assert make_inputs(model, {"x": (2, 3)})["x"].shape == (2, 3)
    assert resolve_input_shapes(model, require_all=False) == {}


# -- make_inputs ------------------------------------------------------------------------------
def test_make_inputs_dtypes_and_values():
    inputs = make_inputs(_multi_input())
    assert {k: (v.shape, v.dtype) for k, v in inputs.items()} == {
        "image": ((1, 3, 224, 224), np.float32), "nhwc": ((1, 224, 224, 3), np.float16),
        "input_ids": ((1, 16), np.int64), "attention_mask": ((1, 16), np.int64),
        "token_type_ids": ((1, 16), np.int32), "flag": ((1,), np.bool_),
        "fixed": ((2, 5), np.float32)}
    ids = inputs["input_ids"]
    assert ids.min() >= 0 and ids.max() <= 9
    assert (inputs["attention_mask"] == 1).all()
    assert (inputs["token_type_ids"] == 0).all()
    assert abs(float(inputs["image"].mean())) < 0.01 and 0.95 < inputs["image"].std() < 1.05


def test_make_inputs_scalars_are_arrays():
    nodes = [helper.make_node("Identity", ["t"], ["t_out"]),
             helper.make_node("Identity", ["b"], ["b_out"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [_vi("t", []), _vi("b", [], TensorProto.BOOL)],
        [_vi("t_out", []), _vi("b_out", [], TensorProto.BOOL)]), opset_imports=OPSET)
    inputs = make_inputs(model)
    assert all(isinstance(v, np.ndarray) and v.shape == () for v in inputs.values())
    assert run_model(model, inputs)["b_out"] == inputs["b"]


def test_make_inputs_is_seeded():
    a, b = make_inputs(_mlp(), seed=3), make_inputs(_mlp(), seed=3)
    c = make_inputs(_mlp(), seed=4)
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])
    assert make_inputs(_mlp(), batch=5)["x"].shape == (5, 16)
    assert make_inputs(_mlp(), {"x": (7, 16)})["x"].shape == (7, 16)


def test_make_inputs_runs_through_onnxruntime():
    model = _multi_input()
    inputs = make_inputs(model)
    outputs = run_model(model, inputs)
    for name, arr in inputs.items():
        assert np.array_equal(outputs[name + "_out"], arr)


# -- load_inputs ------------------------------------------------------------------------------
def test_load_inputs_casts_float64(tmp_path):
    path = tmp_path / "in.npz"
    x = np.random.default_rng(0).standard_normal((3, 16))
    np.savez(path, x=x)
    loaded = load_inputs(path, _mlp())
    assert loaded["x"].dtype == np.float32 and np.allclose(loaded["x"], x)


def test_load_inputs_single_npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 16), np.float32))
    assert load_inputs(path, _mlp())["x"].shape == (2, 16)


@pytest.mark.parametrize("arrays, match", [
    ({}, r"no array for input\(s\) 'x' \[N, 16\] float"),
    ({"x": np.ones((1, 16), np.float32), "y": np.ones(3)}, "'y' that are not model inputs"),
    ({"x": np.ones((16,), np.float32)}, r"rank 1\); the model expects \[N, 16\]"),
    ({"x": np.ones((1, 15), np.float32)}, r"dim 1 must be 16"),
    ({"x": np.ones((1, 16), np.int64)}, "is int64; the model expects float"),
])
def test_load_inputs_errors(tmp_path, arrays, match):
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputDataError, match=match):
        load_inputs(path, _mlp())


def test_load_inputs_checks_requested_shape_and_symbols(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.ones((2, 16), np.float32))
    with pytest.raises(InputDataError, match="--input-shape asks for 3x16"):
        load_inputs(path, _mlp(), {"x": (3, 16)})
    model = _multi_input()
    arrays = make_inputs(model)
    arrays["attention_mask"] = np.ones((1, 17), np.int64)
    np.savez(path, **arrays)
    with pytest.raises(InputDataError, match="dim 'seq' is 16 in input 'input_ids' but 17"):
        load_inputs(path, model)


def test_load_inputs_int_casts_only_when_values_fit(tmp_path):
    model = _multi_input()
    arrays = make_inputs(model)
    arrays["token_type_ids"] = arrays["token_type_ids"].astype(np.int64)
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    assert load_inputs(path, model)["token_type_ids"].dtype == np.int32
    arrays["token_type_ids"][0, 0] = 2 ** 40
    np.savez(path, **arrays)
    with pytest.raises(InputDataError, match="do not fit int32"):
        load_inputs(path, model)


def test_load_inputs_missing_file(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        load_inputs(tmp_path / "nope.npz", _mlp())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not numpy")
    with pytest.raises(InputDataError, match="not a readable"):
        load_inputs(bad, _mlp())


# -- validity and running -----------------------------------------------------------------------
def test_check_valid_accepts_good_models(tmp_path):
    model = _mlp()
    check_valid(model)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    check_valid(path)
    check_valid(io.load(path))


def test_check_valid_rejects_checker_failure():
    model = _mlp()
    model.graph.node[0].input[1] = "undefined_tensor"
    with pytest.raises(InvalidOutputModel) as info:
        check_valid(model)
    assert info.value.stage == "onnx.checker"
    assert "undefined_tensor" in str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert not isinstance(info.value, OnnxPruneError)


def test_check_valid_full_check_is_strict_shape_inference():
    # Relu's output declared with the wrong rank: only strict shape inference notices.
    node = helper.make_node("Relu", ["x"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [_vi("x", [2, 3])], [_vi("y", [2, 3, 4])]), opset_imports=OPSET)
    with pytest.raises(InvalidOutputModel, match="onnx.checker"):
        check_valid(model)
    check_valid(model, full_check=False)


def test_check_valid_rejects_what_onnxruntime_cannot_load():
    # The checker does not look inside custom domains; onnxruntime has no kernel for it.
    node = helper.make_node("Mystery", ["x"], ["y"], domain="example.custom")
    model = helper.make_model(
        helper.make_graph([node], "g", [_vi("x", [2])], [_vi("y", [2])]),
        opset_imports=OPSET + [helper.make_opsetid("example.custom", 1)])
    with pytest.raises(InvalidOutputModel) as info:
        check_valid(model)
    assert info.value.stage == "onnxruntime"


def test_run_model_from_proto_path_session(tmp_path):
    model = _mlp()
    x = make_inputs(model, batch=2)
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    w2 = numpy_helper.to_array(model.graph.initializer[1])
    expected = np.maximum(x["x"] @ w1, 0) @ w2
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    for source in (model, path, io.load(path), open_session(model)):
        out = run_model(source, x)
        assert list(out) == ["y"]
        np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-5)


def test_external_data_handles(tmp_path):
    model = _mlp()
    x = make_inputs(model)
    expected = run_model(model, x)["y"]
    path = tmp_path / "mlp.onnx"
    # onnx.save_model moves the data of the proto it is given: save a copy.
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(path),
                    save_as_external_data=True, location="mlp.data", size_threshold=0)
    handle = io.load(path)
    assert all(io.is_external(t) for t in handle.model.graph.initializer)
    check_valid(handle)
    np.testing.assert_allclose(run_model(handle, x)["y"], expected, rtol=1e-6)
    # A rewritten external weight is only on the handle: validation must see the new values.
    w1 = next(t for t in handle.model.graph.initializer if t.name == "W1")
    handle.write(w1, np.zeros((16, 8), np.float32))
    check_valid(handle)
    assert np.all(run_model(handle, x)["y"] == 0)


# -- compare ------------------------------------------------------------------------------------
def test_compare_identical():
    ref = {"logits": np.arange(12, dtype=np.float32).reshape(3, 4) - 5}
    cmp = compare(ref, {k: v.copy() for k, v in ref.items()})
    s = cmp["logits"]
    assert (s.max_abs, s.rel_error, s.mean_rel, s.cosine, s.top1_agreement) == (0, 0, 0, 1, 1)
    assert cmp.max_abs == 0 and cmp.worst_cosine == 1 and cmp.passed(0.0)


def test_compare_known_difference():
    ref = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    cand = ref + np.array([[0, 0, 0.5], [0, 0, -1]], dtype=np.float32)
    cmp = compare({"y": ref}, {"y": cand})
    s = cmp["y"]
    assert s.max_abs == 1.0
    assert s.ref_scale == 6.0
    assert s.rel_error == pytest.approx(1 / 6)
    assert s.mean_rel == pytest.approx((1.5 / 6) / (21 / 6))
    a, b = ref.ravel().astype(np.float64), cand.ravel().astype(np.float64)
    assert s.cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert s.top1_agreement == 0.5  # row 1: argmax 2 -> 1
    assert cmp.passed(0.17) and not cmp.passed(0.16)
    assert cmp.failures(0.1) == ["output 'y': relative max error 0.167 (max abs 1 on a scale "
                                 "of 6) exceeds 0.1"]
    assert cmp.passed({"y": 0.2}) and not cmp.passed({"*": 0.1}) and cmp.passed({"z": 0.0})


def test_compare_shape_mismatch_missing_and_extra():
    ref = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
    cand = {"a": np.ones((2, 2), np.float32), "c": np.ones(1, np.float32)}
    cmp = compare(ref, cand)
    assert "differs from the reference's 2x3" in cmp["a"].reason
    assert cmp["a"].candidate_shape == (2, 2)
    assert "missing" in cmp["b"].reason
    assert cmp.extra_outputs == ["c"]
    assert not cmp.passed(1e9)
    assert math.isinf(cmp.max_abs) and math.isnan(cmp.worst_cosine)
    d = cmp.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["outputs"][0]["max_abs"] is None and d["outputs"][0]["reason"]


def test_compare_nonfinite():
    ref = np.array([1.0, np.inf, 3.0], np.float32)
    same = compare({"y": ref}, {"y": ref.copy()})
    assert same.passed(0.0) and same["y"].max_abs == 0
    bad = compare({"y": ref}, {"y": np.array([np.nan, np.inf, 3.0], np.float32)})
    assert bad["y"].reason == "1 value(s) are inf/nan in one model but not the other"


def test_compare_zero_reference():
    zeros = np.zeros((2, 2), np.float32)
    assert compare({"y": zeros}, {"y": zeros})["y"].cosine == 1.0
    s = compare({"y": zeros}, {"y": zeros + 1})["y"]
    assert s.cosine == 0.0 and math.isinf(s.rel_error) and s.max_abs == 1.0


@pytest.mark.parametrize("shape, dtype, axis", [
    ((4, 10), np.float32, 1), ((1, 7, 100), np.float16, 2), ((4, 1), np.float32, None),
    ((1, 3, 8, 8), np.float32, None), ((4, 10), np.int64, None), ((10,), np.float32, None),
])
def test_class_axis_rule(shape, dtype, axis):
    assert class_axis(shape, np.dtype(dtype)) == axis
    out = compare({"y": np.ones(shape, dtype)}, {"y": np.ones(shape, dtype)})["y"]
    assert (out.top1_agreement is None) == (axis is None)


def test_anonymous_dim_names_are_not_shared():
    # paddle2onnx writes "?" for every dynamic dim: they must not be tied together.
    node = helper.make_node("Relu", ["x"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [_vi("x", ["?", 3, "?", "?"])], [_vi("y", None)]), opset_imports=OPSET)
    assert input_signature(model)[0].dims == (None, 3, None, None)
    assert resolve_input_shapes(model, {"x": (1, 3, 48, 320)}) == {"x": (1, 3, 48, 320)}
    assert resolve_input_shapes(model) == {"x": (1, 3, 224, 224)}


def test_run_failure_blames_inputs_for_reference_and_us_for_candidate():
    # A Reshape to a fixed [1, 16] only runs with batch 1.
    shape = numpy_helper.from_array(np.array([1, 16], np.int64), "shape")
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [_vi("x", ["N", 16])], [_vi("y", [1, 16])], [shape]), opset_imports=OPSET)
    x = make_inputs(model, batch=2)
    with pytest.raises(InputDataError, match="inputs x:2x16 float32 .* --input-shape"):
        run_model(model, x)
    with pytest.raises(InvalidOutputModel):
        run_model(model, x, candidate=True)
    assert run_model(model, make_inputs(model))["y"].shape == (1, 16)
