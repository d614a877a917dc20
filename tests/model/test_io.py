"""Loading, external data, atomic saving, refusing to overwrite."""

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import builders as B
from onnxprune.model import io as mio
from onnxprune.model.external import is_external
from onnxprune.errors import ModelLoadError, OutputError
from onnxprune.ops.weights import find_weights


def _save_external(model, path):
    model = onnx.ModelProto.FromString(model.SerializeToString())  # onnx converts in place
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".weights", size_threshold=0)
    return path


def test_external_data_read_write_roundtrip(tmp_path):
    model = B.conv_gemm_model()
    src = _save_external(model, tmp_path / "m.onnx")
    handle = mio.load(src)
    assert handle.has_external_data
    weights = {w.name: w for w in find_weights(handle)[0]}
    w = weights["conv.w"]
    arr = handle.read(w.tensor)
    np.testing.assert_array_equal(arr, numpy_helper.to_array(model.graph.initializer[0]))
    arr2 = arr.copy()
    arr2[0] = 0
    handle.write(w.tensor, arr2)
    out = mio.save(handle, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()
    # external layout kept: tensors still external in the output proto
    reloaded = onnx.load(str(out), load_external_data=False)
    assert all(is_external(t) for t in reloaded.graph.initializer)
    full = onnx.load(str(out))
    np.testing.assert_array_equal(numpy_helper.to_array(full.graph.initializer[0]), arr2)
    np.testing.assert_array_equal(numpy_helper.to_array(full.graph.initializer[2]),
                                  numpy_helper.to_array(model.graph.initializer[2]))
    # the handle still reads from the original files after saving
    np.testing.assert_array_equal(handle.read(weights["fc.w"].tensor),
                                  numpy_helper.to_array(model.graph.initializer[2]))
    x = np.ones((1, 8, 10, 10), np.float32)
    assert np.isfinite(B.run(out, {"x": x})[0]).all()


def test_missing_external_data_file(tmp_path):
    src = _save_external(B.conv_gemm_model(), tmp_path / "m.onnx")
    os.unlink(tmp_path / "m.onnx.weights")
    with pytest.raises(ModelLoadError, match="external data file"):
        mio.load(src)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"this is not onnx at all \x00\xff" * 10, "not a readable ONNX model|no graph"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelLoadError, match=match):
        mio.load(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "t.onnx"
    data = B.conv_gemm_model().SerializeToString()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        mio.load(p)


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        mio.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelLoadError, match="directory"):
        mio.load(tmp_path)


def test_resolve_output_rules(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(B.conv_gemm_model(), str(src))
    assert mio.resolve_output(src, None, False) == tmp_path / "m.pruned.onnx"
    with pytest.raises(OutputError, match="input model reads"):
        mio.resolve_output(src, src, True)
    (tmp_path / "m.pruned.onnx").write_bytes(b"x")
    with pytest.raises(OutputError, match="--force"):
        mio.resolve_output(src, None, False)
    assert mio.resolve_output(src, None, True) == tmp_path / "m.pruned.onnx"
    with pytest.raises(OutputError, match="does not exist"):
        mio.resolve_output(src, tmp_path / "no" / "o.onnx", False)


def test_save_failure_leaves_no_partial_file(tmp_path, monkeypatch):
    handle = mio.load(B.conv_gemm_model())
    target = tmp_path / "o.onnx"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        mio.save(handle, target)
    assert list(tmp_path.iterdir()) == []


# -- every place a tensor can hide external data ------------------------------------------------
def _external_value(location: str, name: str = "v") -> onnx.TensorProto:
    t = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value="4")
    return t


def _hiding_model(where: str, location: str) -> onnx.ModelProto:
    """A MatMul model plus one tensor with external data at ``location``, hidden ``where``."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(B.rng(0).standard_normal((4, 4)).astype(np.float32), "W")
    shp = numpy_helper.from_array(np.array([1, 4], np.int64), "shp")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"])]
    inits, funcs = [w, shp], []
    fill = helper.make_node("ConstantOfShape", ["shp"], ["c"], value=_external_value(location))
    if where == "ConstantOfShape.value":
        nodes.append(fill)
    elif where == "If body":
        body = helper.make_graph([fill], "b", [], [helper.make_tensor_value_info(
            "c", TensorProto.FLOAT, [1, 4])])
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["c"], then_branch=body, else_branch=body))
    elif where == "function":
        fill = helper.make_node("ConstantOfShape", ["s"], ["o"], value=_external_value(location))
        funcs.append(helper.make_function("custom", "F", ["s"], ["o"], [fill],
                                          [helper.make_opsetid("", 17)]))
        nodes.append(helper.make_node("F", ["shp"], ["c"], domain="custom"))
    nodes.append(helper.make_node("Add", ["y0", "c"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              inits)
    if where == "sparse initializer":
        graph.node.pop()
        graph.node[0].output[0] = "y"
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            _external_value(location, "sv"),
            numpy_helper.from_array(np.array([0], np.int64), "si"), [4]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("custom", 1)],
                             functions=funcs)


HIDING = ["ConstantOfShape.value", "If body", "function", "sparse initializer"]


@pytest.mark.parametrize("where", HIDING)
@pytest.mark.parametrize("location,why", [
    ("../secret.bin", "outside the model's folder"), ("ABSOLUTE", "outside the model's folder"),
    ("a\0b", "NUL byte"), ("x" * 5000, "too long"), ("y/" * 3000, "too long"),
    ("z" * 300, "too long")])
def test_external_data_is_checked_wherever_a_tensor_hides(tmp_path, where, location, why):
    (tmp_path / "sub").mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)
    if location == "ABSOLUTE":
        location = str(secret)
    path = tmp_path / "sub" / "m.onnx"
    path.write_bytes(_hiding_model(where, location).SerializeToString())
    with pytest.raises(ModelLoadError, match=why):
        mio.load(path)


def test_a_hidden_escape_is_one_error_line_exit_2_and_nothing_written(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "m.onnx"
    path.write_bytes(_hiding_model("ConstantOfShape.value", "../../etc/passwd").SerializeToString())
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(path), "-o", str(out), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and "outside the model's folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_external_data_inside_the_folder_in_an_attribute_still_loads(tmp_path):
    (tmp_path / "data.bin").write_bytes(np.zeros(1, np.float32).tobytes())
    path = tmp_path / "m.onnx"
    path.write_bytes(_hiding_model("ConstantOfShape.value", "data.bin").SerializeToString())
    handle = mio.load(path)
    assert handle.has_external_data


def test_dropping_an_unused_initializer_keeps_rewritten_external_ones(tmp_path):
    """Resizing drops initializers no node reads any more (a replaced head-count constant) in
    place: the other initializers stay the same objects, so a rewritten external tensor's new
    values (kept in the spill, keyed by its object) are still the ones saved."""
    from onnxprune.channels.resize import _drop_unused

    model = B.conv_gemm_model()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(4, dtype=np.int64),
                                                           "unused_shape"))
    src = _save_external(model, tmp_path / "m.onnx")
    handle = mio.load(src)
    fc = handle.index.stored["fc.w"]
    handle.write(fc, np.zeros((10, 12), np.float32))  # resized: 16 -> 12 input channels
    _drop_unused(handle.model.graph, {"unused_shape"})
    names = [t.name for t in handle.model.graph.initializer]
    assert "unused_shape" not in names and len(names) == 4
    tensor = next(t for t in handle.model.graph.initializer if t.name == "fc.w")
    assert handle.is_rewritten(tensor)
    out = mio.save(handle, tmp_path / "out.onnx")
    saved = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert saved["fc.w"].shape == (10, 12) and not saved["fc.w"].any()
