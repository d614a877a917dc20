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
    with pytest.raises(OutputError, match="is the input"):
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
