"""onnxruntime sessions: whole models from a proto, path, handle or open session; sessions that
expose intermediate tensors; who is blamed when a run fails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputDataError
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.inputs.generate import make_inputs
from onnxprune.model import io
from onnxprune.runtime.session import (InvalidOutputModel, exposed_batches, open_session,
                                       run_model)

import builders as B

OPSET = [helper.make_opsetid("", 17)]


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_run_model_from_proto_path_session(tmp_path):
    model = B.mlp_listing_weights()
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


def test_exposed_batches_serve_intermediates_and_inputs_without_changing_the_model():
    model = B.mlp_listing_weights()
    handle = io.load(model)
    before = handle.model.SerializeToString()
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    data = CalibrationSet.from_arrays(model, {"x": x})
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    got = list(exposed_batches(handle, ["r", "x"], data, batch_size=2))
    assert [list(g) for g in got] == [["r", "x"]] * 3
    np.testing.assert_array_equal(np.concatenate([g["x"] for g in got]), x)
    np.testing.assert_allclose(np.concatenate([g["r"] for g in got]), np.maximum(x @ w1, 0),
                               rtol=1e-5, atol=1e-5)
    assert handle.model.SerializeToString() == before


def test_exposed_batches_blame_the_calibration_inputs():
    shape = numpy_helper.from_array(np.array([1, 16], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [_vi("x", ["N", 16])], [_vi("y", [1, 16])], [shape]), opset_imports=OPSET)
    data = CalibrationSet.from_arrays(model, {"x": np.ones((4, 16), np.float32)})
    with pytest.raises(InputDataError, match="calibration inputs x:2x16 float32 .* --calibration"):
        list(exposed_batches(io.load(model), ["r"], data, batch_size=2))
