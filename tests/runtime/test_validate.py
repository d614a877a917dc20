"""Validity checks of a model (onnx.checker + onnxruntime), in memory, as files, with external data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.model import io
from onnxprune.model.external import is_external
from onnxprune.errors import OnnxPruneError
from onnxprune.inputs.generate import make_inputs
from onnxprune.runtime.session import InvalidOutputModel, run_model
from onnxprune.runtime.validate import check_valid

import builders as B

OPSET = [helper.make_opsetid("", 17)]


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


# -- validity -----------------------------------------------------------------------------------
def test_check_valid_accepts_good_models(tmp_path):
    model = B.mlp_listing_weights()
    check_valid(model)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    check_valid(path)
    check_valid(io.load(path))


def test_check_valid_rejects_checker_failure():
    model = B.mlp_listing_weights()
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


def test_external_data_handles(tmp_path):
    model = B.mlp_listing_weights()
    x = make_inputs(model)
    expected = run_model(model, x)["y"]
    path = tmp_path / "mlp.onnx"
    # onnx.save_model moves the data of the proto it is given: save a copy.
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(path),
                    save_as_external_data=True, location="mlp.data", size_threshold=0)
    handle = io.load(path)
    assert all(is_external(t) for t in handle.model.graph.initializer)
    check_valid(handle)
    np.testing.assert_allclose(run_model(handle, x)["y"], expected, rtol=1e-6)
    # A rewritten external weight is only on the handle: validation must see the new values.
    w1 = next(t for t in handle.model.graph.initializer if t.name == "W1")
    handle.write(w1, np.zeros((16, 8), np.float32))
    check_valid(handle)
    assert np.all(run_model(handle, x)["y"] == 0)
