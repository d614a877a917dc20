"""Sparse storage (model/sparse.py, io.save(storage=...)): what onnxruntime and onnx.checker
accept, which tensors go sparse and why, and outputs identical to the dense-stored model's."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as B
from onnxprune.api import prune
from onnxprune.model import io as mio
from onnxprune.model.sparse import (MIN_ZEROS, decide, estimated_saving, index_type, sparsify,
                                    to_sparse)

DIGITS = mio.Path(__file__).resolve().parents[2] / "onnxprune" / "data" / "digits_cnn.onnx"


def _session(model):
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _sparse_add_model(values: np.ndarray, index_dtype, two_d: bool = False):
    """y = x + W with W a sparse initializer (indices of ``index_dtype``), and its dense twin."""
    elem = helper.np_dtype_to_tensor_dtype(values.dtype)
    flat = values.reshape(-1)
    nz = np.flatnonzero(flat)
    idx = (np.stack(np.unravel_index(nz, values.shape), 1) if two_d else nz).astype(index_dtype)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(flat[nz], "W"),
                                   numpy_helper.from_array(idx, "W_idx"), list(values.shape))
    io_ = ([helper.make_tensor_value_info("x", elem, list(values.shape))],
           [helper.make_tensor_value_info("y", elem, list(values.shape))])
    node = helper.make_node("Add", ["x", "W"], ["y"])
    sparse = helper.make_model(helper.make_graph([node], "g", *io_),
                               opset_imports=[helper.make_opsetid("", 17)])
    sparse.graph.sparse_initializer.append(sp)
    dense = helper.make_model(helper.make_graph([node], "g", *io_,
                                                [numpy_helper.from_array(values, "W")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    return sparse, dense


def _values(dtype, shape=(6, 10), seed=0):
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(shape) * 10).astype(dtype)
    v[rng.random(shape) < 0.8] = 0
    return v


# -- what onnxruntime and onnx.checker accept (the facts the module docstring states) --------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.int32,
                                   np.int64])
@pytest.mark.parametrize("index", [np.int8, np.int16, np.int32, np.int64])
@pytest.mark.parametrize("two_d", [False, True])
def test_onnxruntime_densifies_sparse_initializers_exactly(dtype, index, two_d):
    values = _values(dtype)
    sparse, dense = _sparse_add_model(values, index, two_d)
    x = _values(dtype, seed=1)
    a = _session(sparse).run(None, {"x": x})[0]
    b = _session(dense).run(None, {"x": x})[0]
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("index", [np.uint8, np.uint16, np.uint32])
def test_onnxruntime_refuses_unsigned_indices(index):
    sparse, _ = _sparse_add_model(_values(np.float32), index)
    with pytest.raises(Exception, match="int8, int16, int32 or int64"):
        _session(sparse)


def test_onnx_checker_accepts_only_int64_indices_and_not_the_strict_check():
    ok, _ = _sparse_add_model(_values(np.float32), np.int64)
    onnx.checker.check_model(ok)
    with pytest.raises(onnx.checker.ValidationError, match="INT64"):
        onnx.checker.check_model(_sparse_add_model(_values(np.float32), np.int32)[0])
    with pytest.raises(Exception):  # strict shape inference types it as a sparse tensor
        onnx.checker.check_model(ok, full_check=True)


# -- the decision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("numel, expected", [(1, "int8"), (128, "int8"), (129, "int16"),
                                             (32768, "int16"), (32769, "int32"),
                                             (2**31, "int32"), (2**31 + 1, "int64")])
def test_compact_index_type_is_the_smallest_signed_type(numel, expected):
    assert index_type(numel, compact=True).name == expected
    assert index_type(numel, compact=False).name == "int64"


def _tensor(zeros: int, numel: int = 1000, dtype=np.float32):
    v = np.arange(1, numel + 1).astype(dtype)
    v[:zeros] = 0
    return numpy_helper.from_array(v, "w"), v


@pytest.mark.parametrize("zeros, compact, stored", [
    (400, True, "dense"),    # under the 50% threshold
    (600, False, "dense"),   # 400 x (4 + 8) = 4800 B >= 4000 B dense
    (700, False, "sparse"),  # 300 x 12 = 3600 B < 4000 B
    (500, True, "sparse"),   # int16 indices: 500 x 6 = 3000 B
])
def test_decide_by_threshold_and_size(zeros, compact, stored):
    t, v = _tensor(zeros)
    d = decide(t, v, "sparse-compact" if compact else "sparse")
    assert d.stored == stored
    assert d.nonzeros == 1000 - zeros and d.dense_bytes == 4000
    if stored == "sparse":
        assert d.stored_bytes == (1000 - zeros) * (4 + (2 if compact else 8))
    else:
        assert d.stored_bytes == 4000 and d.reason


def test_estimated_saving_counts_only_what_goes_sparse():
    assert MIN_ZEROS == 0.5
    # 90% zeros: 1000 - 100 x 12 = 2800 saved; 60% zeros: would grow, counts 0
    assert estimated_saving([(1000, 100, 4), (1000, 400, 4)]) == 2800
    assert estimated_saving([(1000, 400, 4)], compact=True) == 4000 - 400 * 6
    assert estimated_saving([(1000, 400, 4)], form="bitmask") == 4000 - 401 * 4 - 125


def test_to_sparse_round_trips():
    v = _values(np.float32, (3, 4, 5))
    sp = to_sparse(v, "w", compact=True)
    assert sp.indices.data_type == TensorProto.INT8 and list(sp.dims) == [3, 4, 5]
    dense = np.zeros(v.size, np.float32)
    dense[numpy_helper.to_array(sp.indices)] = numpy_helper.to_array(sp.values)
    assert (dense.reshape(v.shape) == v).all()


# -- saving ---------------------------------------------------------------------------------------

def _pruned(sparsity=0.9):
    return prune(B.conv_gemm_model(), sparsity=sparsity, validate=False).state.handle


@pytest.mark.parametrize("storage", ["sparse", "sparse-compact"])
def test_save_sparse_gives_the_dense_outputs_bit_for_bit(tmp_path, storage):
    handle = _pruned()
    dense_path = mio.save(handle, tmp_path / "dense.onnx")
    decisions = []
    sparse_path = mio.save(handle, tmp_path / "sparse.onnx", storage=storage,
                           decisions=decisions)
    saved = onnx.load(str(sparse_path))
    sparse_names = {sp.values.name for sp in saved.graph.sparse_initializer}
    assert sparse_names == {"conv.w", "fc.w"}  # the biases have no zeros
    assert {d.name for d in decisions if d.stored == "sparse"} == sparse_names
    assert not {t.name for t in saved.graph.initializer} & sparse_names
    assert handle.model.graph.initializer and not handle.model.graph.sparse_initializer
    x = np.random.default_rng(3).standard_normal((1, 8, 10, 10)).astype(np.float32)
    a = _session(sparse_path).run(None, {"x": x})[0]
    b = _session(dense_path).run(None, {"x": x})[0]
    assert a.tobytes() == b.tobytes()
    assert sparse_path.stat().st_size < dense_path.stat().st_size
    if storage == "sparse":  # int64 indices: valid for onnx.checker too
        onnx.checker.check_model(saved)


def test_graph_input_initializers_and_low_sparsity_stay_dense():
    model = B.conv_gemm_model()
    model.graph.input.append(helper.make_tensor_value_info("fc.w", TensorProto.FLOAT, [10, 16]))
    handle = prune(model, sparsity=0.9, validate=False).state.handle
    decisions = {d.name: d for d in sparsify(handle.model, handle.read)}
    assert decisions["fc.w"].stored == "dense"
    assert "graph input" in decisions["fc.w"].reason
    assert decisions["conv.w"].stored == "sparse"
    assert "under the 50% threshold" in decisions["conv.b"].reason


def test_external_data_model_is_written_dense_with_the_reason(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(B.conv_gemm_model(), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    handle = mio.load(src)
    decisions = []
    out = mio.save(handle, tmp_path / "out.onnx", storage="sparse", decisions=decisions)
    assert not onnx.load(str(out), load_external_data=False).graph.sparse_initializer
    assert decisions[0].stored == "dense" and "external data" in decisions[0].reason


def test_prune_with_storage_sparse_reports_and_matches_dense(tmp_path):
    dense = prune(DIGITS, sparsity=0.9, output=tmp_path / "d.onnx")
    sparse = prune(DIGITS, sparsity=0.9, output=tmp_path / "s.onnx", storage="sparse")
    assert any(n.startswith("--storage sparse: ") for n in sparse.report.notes)
    assert not any(n.startswith("zeros are stored densely") for n in sparse.report.notes)
    assert any("--storage bitmask or sparse (about" in n for n in dense.report.notes)
    assert sparse.report.options["storage"] == "sparse"
    assert sparse.report.file_size_after < 0.5 * dense.report.file_size_after
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    name = _session(tmp_path / "d.onnx").get_inputs()[0].name
    a = _session(tmp_path / "d.onnx").run(None, {name: x})[0]
    b = _session(tmp_path / "s.onnx").run(None, {name: x})[0]
    assert a.tobytes() == b.tobytes()


# -- loading a sparse-stored model ------------------------------------------------------------------

def test_load_reads_sparse_initializers_as_dense(tmp_path):
    handle = _pruned()
    expected = {t.name: numpy_helper.to_array(t) for t in handle.model.graph.initializer}
    path = mio.save(handle, tmp_path / "s.onnx", storage="sparse-compact")
    given = onnx.load(str(path))
    loaded = mio.load(given)
    assert len(given.graph.sparse_initializer) == 2  # the caller's proto is left as it was
    for source in (loaded, mio.load(path)):
        assert not source.model.graph.sparse_initializer
        got = {t.name: numpy_helper.to_array(t) for t in source.model.graph.initializer}
        assert got.keys() == expected.keys()
        assert all(got[k].tobytes() == expected[k].tobytes() for k in got)
    # so inspect and a second pruning see the weights and their zeros
    from onnxprune.api import inspect

    report = inspect(path)
    assert report.nonzeros_after == sum(int(np.count_nonzero(expected[k]))
                                        for k in ("conv.w", "fc.w"))


@pytest.mark.parametrize("indices", [np.array([0, 99], np.int64), np.array([-1, 1], np.int64),
                                     np.array([0], np.int64)])
def test_load_refuses_sparse_indices_outside_the_shape(tmp_path, indices):
    sparse, _ = _sparse_add_model(np.zeros((6, 10), np.float32), np.int64)
    sp = sparse.graph.sparse_initializer[0]
    sp.values.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), "W"))
    sp.indices.CopyFrom(numpy_helper.from_array(indices, "W_idx"))
    path = tmp_path / "bad.onnx"
    onnx.save(sparse, str(path))
    with pytest.raises(mio.ModelLoadError, match="indices that do not fit"):
        mio.load(path)


def test_storage_option_is_checked():
    from onnxprune.errors import OptionError

    with pytest.raises(OptionError, match="storage must be one of dense, sparse, sparse-compact, bitmask"):
        prune(B.conv_gemm_model(), storage="zip")


def test_summary_and_rows_say_what_went_sparse_and_why_not():
    from onnxprune.model.sparse import rows, summary

    decisions = [decide(*_tensor(900), "sparse"), decide(*_tensor(100), "sparse"),
                 decide(*_tensor(600), "sparse")]
    assert [d.stored for d in decisions] == ["sparse", "dense", "dense"]
    saved = 4000 - 100 * 12
    assert summary(decisions, "sparse", 10000) == (
        "--storage sparse: 1 of 3 initializers written as sparse_initializers (int64 "
        f"indices): {saved / 2**20:.2f} MiB smaller, {10000 / (10000 + saved):.2f}x of the dense "
        "file; kept dense: 1 under 50% zeros; 1 not smaller stored sparse")
    table = rows(decisions)
    assert table[0] == {"tensor": "w", "zeros": 0.9, "stored": "sparse", "dense bytes": 4000,
                        "stored bytes": 1200, "why dense": ""}
    assert table[2]["why dense"].startswith("sparse form (4800 B: values + int64 indices)")
