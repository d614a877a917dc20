"""Bitmask storage (model/bitmask.py): nonzero values + 1 bit per element, expanded by standard
ops that onnxruntime folds into the dense weight at session start; read back dense by load."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import DEFAULT_MODEL, main
from onnxprune.errors import ModelLoadError
from onnxprune.model import io as mio
from onnxprune.model.bitmask import META_KEY, PREFIX, bitmask_bytes, decode
from onnxprune.model.io import ModelHandle


def _model(w: np.ndarray, opset: int = 17, name: str = "W", extra=()) -> onnx.ModelProto:
    tt = helper.np_dtype_to_tensor_dtype(w.dtype)
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", tt, list(w.shape))],
        [numpy_helper.from_array(w, name), *extra])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _sparse(shape, zeros: float, dtype=np.float32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 5 + 1).astype(dtype)
    w[rng.random(shape) < zeros] = 0
    return w


def _run(path, folded_to=None):
    so = ort.SessionOptions()
    if folded_to is not None:
        so.optimized_model_filepath = str(folded_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {})


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.int32,
                                   np.int64])
def test_onnxruntime_folds_the_chain_into_the_same_tensor(tmp_path, dtype):
    w = _sparse((37, 11), 0.7, dtype)  # 407 elements: the last mask byte is padded
    out, decisions = tmp_path / "m.onnx", []
    mio.save(ModelHandle(model=_model(w)), out, storage="bitmask", decisions=decisions)
    (d,) = decisions
    assert d.stored == "bitmask" and d.nonzeros == np.count_nonzero(w)
    assert d.stored_bytes == bitmask_bytes(w.size, d.nonzeros, w.dtype.itemsize)
    stored = onnx.load(str(out))
    onnx.checker.check_model(stored, full_check=True)
    assert not any(t.name == "W" for t in stored.graph.initializer)
    (y,) = _run(out, tmp_path / "opt.onnx")
    assert y.dtype == w.dtype and y.tobytes() == w.tobytes()
    # folded at session start: no node of the chain is left to run per call
    assert not [n for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_load_restores_the_dense_initializer_and_removes_the_chain(tmp_path):
    w = _sparse((64, 32), 0.8)
    out = tmp_path / "m.onnx"
    mio.save(ModelHandle(model=_model(w)), out, storage="bitmask")
    handle = mio.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in handle.model.graph.initializer}
    assert set(inits) == {"W"} and inits["W"].tobytes() == w.tobytes()
    assert [n.op_type for n in handle.model.graph.node] == ["Identity"]
    assert not any(p.key == META_KEY for p in handle.model.metadata_props)


def test_file_size_follows_values_plus_bits(tmp_path):
    w = _sparse((512, 512), 0.8)
    dense, packed = tmp_path / "d.onnx", tmp_path / "b.onnx"
    mio.save(ModelHandle(model=_model(w)), dense)
    mio.save(ModelHandle(model=_model(w)), packed, storage="bitmask")
    expected = (np.count_nonzero(w) + 1) * 4 + w.size // 8
    assert abs(packed.stat().st_size - expected) < 4096  # protobuf framing and the nodes
    assert packed.stat().st_size < 0.25 * dense.stat().st_size


def test_what_stays_dense_says_why(tmp_path):
    few = _sparse((16, 16), 0.2)
    old = _model(_sparse((16, 16), 0.9), opset=10)
    for model, reason in ((_model(few), "under the 50% threshold"),
                          (old, "opset 10: bitmask storage needs opset 11")):
        decisions = []
        mio.save(ModelHandle(model=model), tmp_path / "x.onnx", force=True, storage="bitmask",
                 decisions=decisions)
        assert decisions[0].stored == "dense" and reason in decisions[0].reason
        assert not any(n.name.startswith(PREFIX)
                       for n in onnx.load(str(tmp_path / "x.onnx")).graph.node)


def test_names_already_in_the_model_are_not_reused(tmp_path):
    taken = numpy_helper.from_array(np.ones(3, np.float32), "W__values")
    w = _sparse((8, 8), 0.9)
    model = _model(w, extra=[taken])
    model.graph.output.append(helper.make_tensor_value_info("W__values", TensorProto.FLOAT, [3]))
    out = tmp_path / "m.onnx"
    mio.save(ModelHandle(model=model), out, storage="bitmask")
    y, values = _run(out)
    assert y.tobytes() == w.tobytes() and values.tolist() == [1, 1, 1]
    back = {t.name: numpy_helper.to_array(t) for t in mio.load(out).model.graph.initializer}
    assert back["W"].tobytes() == w.tobytes() and back["W__values"].tolist() == [1, 1, 1]


def test_a_tampered_chain_is_a_clear_load_error(tmp_path):
    out = tmp_path / "m.onnx"
    mio.save(ModelHandle(model=_model(_sparse((8, 8), 0.9))), out, storage="bitmask")
    model = onnx.load(str(out))
    for t in model.graph.initializer:
        if t.name == "W__values":
            t.CopyFrom(numpy_helper.from_array(np.zeros(2, np.float32), "W__values"))
    with pytest.raises(ModelLoadError, match="values for .* mask bits; the file is corrupt"):
        decode(model, "m.onnx")


def test_cli_bitmask_output_equals_dense_storage_and_prunes_again(tmp_path):
    dense, packed, again = tmp_path / "d.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    runner = CliRunner()
    for path, extra in ((dense, []), (packed, ["--storage", "bitmask"])):
        res = runner.invoke(main, [str(DEFAULT_MODEL), "--sparsity", "0.9", "--no-resize",
                                   "-o", str(path), "-q", *extra])
        assert res.exit_code == 0, res.output
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            .run(None, {"input": x})[0] for p in (dense, packed)]
    assert outs[0].tobytes() == outs[1].tobytes()
    assert packed.stat().st_size < 0.3 * dense.stat().st_size
    res = runner.invoke(main, [str(packed), "--sparsity", "0.95", "--no-resize", "-o",
                               str(again), "-q"])
    assert res.exit_code == 0, res.output
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(again)).graph.initializer}
    assert "head.0.weight" in inits and not any(k.endswith("__bits") for k in inits)


def test_constant_node_weights_are_stored_too(tmp_path):
    # paddle2onnx and others keep weights in Constant nodes, not initializers
    w = _sparse((32, 16), 0.8)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "c")),
         helper.make_node("Identity", ["W"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, decisions = tmp_path / "m.onnx", []
    mio.save(ModelHandle(model=model), out, storage="bitmask", decisions=decisions)
    assert [(d.name, d.stored) for d in decisions] == [("W", "bitmask")]
    stored = onnx.load(str(out))
    onnx.checker.check_model(stored, full_check=True)
    assert "Constant" not in [n.op_type for n in stored.graph.node]
    assert _run(out)[0].tobytes() == w.tobytes()
    back = mio.load(out).model
    assert [n.op_type for n in back.graph.node] == ["Identity"]
    assert numpy_helper.to_array(back.graph.initializer[0]).tobytes() == w.tobytes()
