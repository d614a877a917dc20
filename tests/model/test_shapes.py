"""The one weight-free shape inference (onnxprune.model.shapes): shapes equal what onnxruntime
produces, opset upgrade for value propagation, symbolic dims, declared shapes, no weights read."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import make_model
from onnxprune.model.io import load
from onnxprune.model.shapes import DATA_PROP_OPSET, infer_shapes, upgrade_opset

vi = helper.make_tensor_value_info


def _net(opset: int = 17, batch=2) -> onnx.ModelProto:
    """Conv(stride 2) -> Relu -> MaxPool -> Reshape to [batch, -1] through Shape/Slice/Concat
    (shape values computed in-graph) -> MatMul -> Softmax, plus an int64 side value."""
    r = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one"], ["s0"]),
        helper.make_node("Concat", ["s0", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["p", "target"], ["f"]),
        helper.make_node("MatMul", ["f", "fw"], ["m"]),
        helper.make_node("Softmax", ["m"], ["y"], axis=1),
    ]
    inits = [numpy_helper.from_array(r.standard_normal((4, 3, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(r.standard_normal(4).astype(np.float32), "cb"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(r.standard_normal((16, 5)).astype(np.float32), "fw")]
    return make_model(nodes, [vi("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                      [vi("y", TensorProto.FLOAT, [batch, 5])], inits, opset=opset)


def _ort_shapes(model: onnx.ModelProto, feed) -> dict:
    """Every node output's shape and element type as onnxruntime computes them."""
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    names = [o for n in model.graph.node for o in n.output]
    del exposed.graph.output[:]
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return {n: np.asarray(v) for n, v in zip(names, sess.run(names, feed))}


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_shapes_and_types_equal_onnxruntime(opset):
    model = _net(opset)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = _ort_shapes(model, {"x": x})
    got = infer_shapes(model)
    static = got.static()
    for name, value in want.items():
        assert static[name] == value.shape, name
        assert got.types[name] == helper.np_dtype_to_tensor_dtype(value.dtype), name
        assert got.nbytes(name) == value.nbytes, name
    # Initializers come with their stored dims and type, inputs as declared.
    assert static["cw"] == (4, 3, 3, 3) and got.types["fw"] == TensorProto.FLOAT
    assert static["x"] == (2, 3, 8, 8)


def test_value_propagation_needs_a_recent_opset():
    old = _net(11)
    # onnx alone cannot follow Shape -> Slice -> Concat -> Reshape at opset 11 ...
    raw = onnx.shape_inference.infer_shapes(old, data_prop=True)
    f = [v for v in raw.graph.value_info if v.name == "f"]
    assert not f or [d.dim_value for d in f[0].type.tensor_type.shape.dim] != [2, 16]
    # ... the upgraded copy can, and the caller's proto stays at its own opset.
    before = old.SerializeToString()
    assert infer_shapes(old).static()["f"] == (2, 16)
    assert old.SerializeToString() == before
    up = upgrade_opset(old)
    assert up is not old and up.opset_import[0].version == DATA_PROP_OPSET
    assert old.opset_import[0].version == 11
    recent = _net(DATA_PROP_OPSET)
    assert upgrade_opset(recent) is recent


def test_symbolic_dims_stay_named_until_fixed():
    model = _net(batch="N")
    got = infer_shapes(model)
    assert got.get("x") == ("N", 3, 8, 8)
    assert got.get("c") == ("N", 4, 4, 4)
    assert got.get("m")[1] == 5 and got.get("m")[0] in ("N", None)
    assert "c" not in got.static() and got.nbytes("c") is None
    fixed = infer_shapes(model, {"x": [3, 3, 8, 8]})
    assert fixed.static()["c"] == (3, 4, 4, 4)
    assert fixed.static()["y"] == (3, 5)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # untouched


def test_declared_shapes_are_kept_only_when_asked():
    # A custom op inference knows nothing about, whose output the exporter declared.
    nodes = [helper.make_node("Foo", ["x"], ["z"], domain="custom"),
             helper.make_node("Relu", ["z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, [2, 3])],
                              [vi("y", TensorProto.FLOAT, None)],
                              value_info=[vi("z", TensorProto.FLOAT, [2, 7])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("custom", 1)])
    kept = infer_shapes(model, keep_value_info=True)
    assert kept.static()["z"] == (2, 7) and kept.static()["y"] == (2, 7)
    dropped = infer_shapes(model)
    assert "z" not in dropped.static() and "y" not in dropped.static()


def test_weights_are_never_read(tmp_path):
    # A big weight whose external file does not exist: inference needs its dims only.
    model = _net()
    cw = model.graph.initializer[0]
    cw.ClearField("raw_data")
    cw.ClearField("float_data")
    cw.data_location = TensorProto.EXTERNAL
    cw.external_data.add(key="location", value="missing.bin")
    got = infer_shapes(model)
    assert got.static()["c"] == (2, 4, 4, 4) and got.static()["cw"] == (4, 3, 3, 3)
    # Through a handle the same; small external shape operands are read from its folder.
    path = tmp_path / "m.onnx"
    onnx.save_model(_net(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.bin", size_threshold=0)
    handle = load(path)
    assert handle.model.graph.initializer[2].data_location == TensorProto.EXTERNAL  # "zero"
    assert infer_shapes(handle).static() == infer_shapes(_net()).static()
    assert infer_shapes(handle).static()["f"] == (2, 16)
    # The bare proto has no folder to read "zero"/"one"/"minus1" from: Reshape stays unknown.
    assert "f" not in infer_shapes(handle.model).static()
