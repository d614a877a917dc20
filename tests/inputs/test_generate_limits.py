"""Generated inputs refuse a declared shape too large to generate (a mistake or a hostile
file) with a message naming the input and what to pass, instead of exhausting memory."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune import prune
from onnxprune.errors import InputDataError
from onnxprune.inputs.generate import make_inputs


def _model(dims):
    values = np.random.default_rng(0).standard_normal(dims[-1] * 2).astype(np.float32)
    w = helper.make_tensor("w", TensorProto.FLOAT, [dims[-1], 2], values.tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims[:-1]) + [2])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_huge_declared_input_is_refused_with_what_to_do():
    model = _model([200000, 200000, 4])
    with pytest.raises(InputDataError, match=r"input 'x' would take .* GiB.*--input-shape x:"):
        make_inputs(model)
    with pytest.raises(InputDataError, match="would take"):
        prune(model, sparsity=0.5)
    # dims left open by the model: refused when bound that large, generated when not
    open_dims = _model(["a", "b", 4])
    with pytest.raises(InputDataError, match="would take"):
        prune(open_dims, sparsity=0.5, input_shapes={"x": [200000, 200000, 4]})
    out = prune(open_dims, sparsity=0.5, input_shapes={"x": [2, 3, 4]})
    assert out.report.nonzeros_after == 4


def test_ordinary_inputs_are_generated():
    x = make_inputs(_model([1, 3, 4]))["x"]
    assert x.shape == (1, 3, 4) and x.dtype == np.float32
