"""Calibrated criteria on integer matrix ops: MatMulInteger / MatMulIntegerToFloat /
QLinearMatMul read an integer activation that quantizes a float tensor; their statistics come
from that float tensor (the quantizer's input), so SparseGPT and Wanda run on them."""

from __future__ import annotations

import copy

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from channel_models import run
from onnxprune.calibration.statistics import collect_layer_stats
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights
from quant_models import dynamic_matmul_integer, ms_matmuls, qlinear_matmul


def correlated(n: int, k: int, seed: int) -> np.ndarray:
    """Rows with strongly unequal, correlated columns (where SparseGPT beats magnitude)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.logspace(0, -1.5, k)[:, None]
    return (rng.standard_normal((n, k)) @ mix * np.logspace(0.5, -0.5, k)).astype(np.float32)


def test_statistics_of_matmul_integer_are_those_of_the_float_input():
    model = dynamic_matmul_integer()  # x [4, 16] -> DQL -> MatMulInteger, twice
    handle = load(model)
    weights, _ = find_weights(handle)
    x = correlated(16, 16, 0)
    data = CalibrationSet.from_arrays(model, {"x": x})
    stats = collect_layer_stats(handle, weights, data, want_hessian=True, batch_size=4)
    assert set(stats) == {w.key for w in weights}  # both layers, none skipped
    first = next(w for w in weights
                 if handle.index.producer(w.consumers[0].node.input[0]).input[0] == "x")
    st = stats[first.key]
    x64 = x.astype(np.float64)
    assert st.count == 16
    np.testing.assert_allclose(st.hessian, x64.T @ x64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st.in_sums, x64.sum(axis=0), rtol=1e-6, atol=1e-6)


def test_matmul_integer_and_qlinear_matmul_weights_are_calibrated():
    for build in (dynamic_matmul_integer, ms_matmuls, qlinear_matmul):
        model = build()
        handle = load(model)
        weights, _ = find_weights(handle)
        data = CalibrationSet.from_arrays(model, {"x": correlated(8, 16, 1)})
        stats = collect_layer_stats(handle, weights, data, want_hessian=True, batch_size=4)
        assert stats.record.skipped == {}, build.__name__
        assert set(stats) == {w.key for w in weights}


def test_qlinear_matmul_reading_another_uses_its_integers_minus_the_zero_point():
    model = qlinear_matmul()  # QuantizeLinear -> QLinearMatMul -> QLinearMatMul -> DQ
    handle = load(model)
    weights, _ = find_weights(handle)
    second = next(w for w in weights if w.consumers[0].node.op_type == "QLinearMatMul"
                  and handle.index.producer(w.consumers[0].node.input[0]).op_type
                  == "QLinearMatMul")
    node = second.consumers[0].node
    a, zp = node.input[0], numpy_helper.to_array(handle.index.stored[node.input[2]])
    probe = copy.deepcopy(model)
    probe.graph.output.append(helper.make_tensor_value_info(a, TensorProto.UINT8, None))
    x = correlated(8, 16, 4)
    ints = np.concatenate([run(probe, {"x": x[i:i + 4]})[1] for i in (0, 4)]).astype(np.float64)
    rows = ints.reshape(-1, ints.shape[-1]) - float(zp)
    data = CalibrationSet.from_arrays(model, {"x": x})
    st = collect_layer_stats(handle, [second], data, want_hessian=True, batch_size=4)[second.key]
    np.testing.assert_allclose(st.hessian, rows.T @ rows, rtol=1e-9)
    np.testing.assert_allclose(st.in_sums, rows.sum(axis=0), rtol=1e-9)


def test_sparsegpt_24_on_dynamic_int8_keeps_the_scheme_and_beats_magnitude(tmp_path):
    model = dynamic_matmul_integer()
    calib, held = correlated(64, 16, 2), correlated(16, 16, 3)
    np.savez(tmp_path / "calib.npz", x=calib)
    dense = run(model, {"x": held[:4]})[0]
    errors = {}
    for criterion in ("magnitude", "sparsegpt"):
        result = onnxprune.prune(model, pattern="2:4", criterion=criterion,
                                 calibration=str(tmp_path / "calib.npz"), calibration_samples=64)
        pruned = result.model
        stored = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
        for node in pruned.graph.node:
            if node.op_type == "MatMulInteger":
                w = stored[node.input[1]]
                assert w.dtype == np.int8  # still quantized
                groups = (w.T.reshape(w.shape[1], -1, 4) == 0).sum(axis=-1)
                assert (groups >= 2).all()  # 2:4 along the reduction axis
        assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]
        out = run(pruned, {"x": held[:4]})[0]
        errors[criterion] = float(((out - dense) ** 2).sum() / (dense ** 2).sum())
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors
