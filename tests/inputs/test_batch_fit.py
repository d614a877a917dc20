"""A model whose inputs leave the batch axis open but whose graph fixes batch 1 inside (a Reshape
to a constant shape, as some exporters write): calibration finds that out and runs one sample at a
time, instead of failing on its first batch of 8."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune import prune
from onnxprune.errors import InputDataError
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.runtime.session import fit_batch
from onnxprune.model.io import load
from tests.builders import make_model, tensor


def batch_one_inside(dims_after=(1, 1, 12)) -> onnx.ModelProto:
    """x [N, 16] @ W1 [16, 12] -> Reshape to a constant [1, 1, 12] -> @ W2 [12, 8]: runs only at N=1."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], list(dims_after))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["s"]),
             helper.make_node("MatMul", ["s", "w2"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 8])],
                      [tensor("w1", [16, 12], seed=1), tensor("w2", [12, 8], seed=2), shape])


def arrays(n: int, seed: int = 0) -> dict:
    return {"x": np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)}


def test_fit_batch_limits_to_one_sample_and_slices_keep_it():
    model = batch_one_inside()
    data = CalibrationSet.from_arrays(model, arrays(12))
    assert data.fixed_batch is None
    note = fit_batch(load(model), data, 8)
    assert data.batch_limit == 1 and data.fixed_batch == 1
    assert "runs on one" in note and "Reshape" in note
    feeds = list(data.batches(8))
    assert len(feeds) == 12 and all(f["x"].shape == (1, 16) for f in feeds)
    held = data.slice(4, 10)
    assert held.fixed_batch == 1 and len(list(held.batches(8))) == 6


def test_fit_batch_leaves_a_model_that_runs_batched_alone():
    model = batch_one_inside(dims_after=(-1, 1, 12))  # -1: any batch
    data = CalibrationSet.from_arrays(model, arrays(12))
    assert fit_batch(load(model), data, 8) is None
    assert data.batch_limit is None
    assert [f["x"].shape[0] for f in data.batches(8)] == [8, 4]


def test_fit_batch_raises_when_one_sample_fails_too():
    model = batch_one_inside(dims_after=(2, 1, 12))  # needs exactly 2 samples: batch 1 fails too
    data = CalibrationSet.from_arrays(model, arrays(12))
    with pytest.raises(InputDataError, match="calibration inputs"):
        fit_batch(load(model), data, 8)


def test_calibrated_prune_runs_one_sample_at_a_time(tmp_path):
    model = batch_one_inside()
    source = tmp_path / "calib.npz"
    np.savez(source, **arrays(24))
    result = prune(model, pattern="2:4", criterion="sparsegpt", calibration=str(source),
                   calibration_samples=16)
    assert any("runs on one" in n and "Reshape" in n for n in result.report.notes)
    w1 = next(t for t in result.model.graph.initializer if t.name == "w1")
    values = onnx.numpy_helper.to_array(w1)
    # 2:4 along the input axis (axis 0 of a MatMul's right operand): exactly 2 of every 4 are zero
    groups = (values.T.reshape(12, 4, 4) == 0).sum(axis=-1)
    assert (groups == 2).all()
