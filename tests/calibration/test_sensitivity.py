"""Per-layer sensitivity, sparsity allocation and the fixed-operand guard."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.inputs.dataset import CalibrationSet, generated_calibration
from onnxprune.masking.criteria import ScoreContext, get_criterion
from onnxprune.errors import OptionError
from onnxprune.model.io import load
from onnxprune.masking.patterns import parse_pattern
from onnxprune.calibration.sensitivity import SensitivityTable, allocate, layer_sensitivity, looks_fixed
from onnxprune.ops.weights import find_weights

from builders import if_subgraph_model

F = TensorProto.FLOAT


def _mlp(constant_w2=False, seed=0):
    """x[N,16] -> MatMul W1[16,32] -> Relu -> MatMul W2[32,8] (W2 optionally a Constant)."""
    r = np.random.default_rng(seed)
    w1 = r.standard_normal((16, 32)).astype(np.float32)
    w2 = r.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "W1")]
    if constant_w2:
        nodes.insert(0, helper.make_node("Constant", [], ["W2"],
                                         value=numpy_helper.from_array(w2, "W2")))
    else:
        inits.append(numpy_helper.from_array(w2, "W2"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F, ["N", 16])],
                              [helper.make_tensor_value_info("y", F, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"W1": w1, "W2": w2}


@pytest.mark.parametrize("constant_w2", [False, True])
def test_sensitivity_matches_a_direct_measurement(constant_w2):
    model, raw = _mlp(constant_w2)
    handle = load(model)
    weights, _ = find_weights(handle)
    x = np.random.default_rng(1).standard_normal((12, 16)).astype(np.float32)
    data = CalibrationSet.from_arrays(model, {"x": x})
    table = layer_sensitivity(handle, weights, data, "unstructured", samples=12, batch_size=5)
    assert table.sparsities == (0.3, 0.5, 0.7, 0.9) and table.samples == 12
    assert set(table.errors) == {"W1", "W2"}
    for errs in table.errors.values():
        assert errs.shape == (4,) and (errs >= 0).all() and (np.diff(errs) > -1e-3).all()
        assert errs[-1] > errs[0]

    # W2 at 0.5, measured by hand: mask from the pattern, model rebuilt with the pruned W2.
    w2 = raw["W2"]
    w2d = weights[1].layout.to_2d(w2)
    scores = get_criterion("magnitude").scores(w2d, ScoreContext("W2"))
    keep = parse_pattern("unstructured").local_mask(scores, w2d != 0, w2d.size // 2, "l1")
    pruned = weights[1].layout.from_2d(np.where(keep, w2d, 0))
    h = np.maximum(x @ raw["W1"], 0)
    ref, got = h @ w2, h @ pruned
    expect = ((got - ref) ** 2).sum() / (ref ** 2).sum()
    np.testing.assert_allclose(table.errors["W2"][1], expect, rtol=1e-4)
    # the handle's model is untouched (no inputs added, Constant still there)
    assert [i.name for i in handle.model.graph.input] == ["x"]
    assert sum(n.op_type == "Constant" for n in handle.model.graph.node) == int(constant_w2)


def test_implied_sparsity_pattern_and_existing_zeros():
    model, raw = _mlp()
    w1 = raw["W1"].copy()
    w1[:, :16] = 0  # already half sparse
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    handle = load(model)
    weights, _ = find_weights(handle)
    data = generated_calibration(model, n=4, shapes={"x": (1, 16)})
    table = layer_sensitivity(handle, weights, data, "2:4")
    assert table.sparsities == (0.5,) and table.pattern == "2:4"
    assert table.existing["W1"] == pytest.approx(0.5)
    table2 = layer_sensitivity(handle, weights, data, "unstructured", sparsities=(0.3, 0.5))
    assert table2.errors["W1"][0] == 0 and table2.errors["W1"][1] == 0  # zeros already there


def test_subgraph_weights_are_not_measured():
    model = if_subgraph_model()
    handle = load(model)
    weights, _ = find_weights(handle)
    cond = np.array(False)
    data = CalibrationSet.from_arrays(model, {"x": np.ones((2, 8), np.float32), "cond": cond})
    table = layer_sensitivity(handle, weights, data, "unstructured", sparsities=(0.5,))
    assert {"W_outer"} == set(table.errors)  # the main-graph weight read inside the branch
    assert table.skipped and all("subgraph" in why for why in table.skipped.values())


# -- allocation -------------------------------------------------------------------------------
def _table(errors, sparsities=(0.3, 0.5, 0.7, 0.9), existing=None):
    return SensitivityTable(pattern="unstructured", criterion="magnitude",
                            sparsities=tuple(sparsities),
                            errors={k: np.asarray(v, float) for k, v in errors.items()},
                            existing=dict(existing or {}))


def test_allocate_hits_the_target_and_spares_the_sensitive_layer():
    table = _table({"cheap": [0.001, 0.003, 0.01, 0.05], "dear": [0.02, 0.08, 0.3, 1.0]})
    counts = {"cheap": 1000, "dear": 3000}
    out = allocate(table, 0.5, counts)
    zeros = sum(out[k] * counts[k] for k in counts)
    assert zeros == pytest.approx(0.5 * 4000)
    assert out["cheap"] > out["dear"]
    bounded = allocate(table, 0.5, counts, max_sparsity=0.6)
    assert max(bounded.values()) <= 0.6 + 1e-12
    with pytest.raises(OptionError, match="out of reach"):
        allocate(table, 0.7, counts, max_sparsity=0.6)
    with pytest.raises(OptionError, match="no sensitivity"):
        allocate(table, 0.5, {"other": 10})


def test_allocate_is_optimal_against_brute_force_on_the_grid():
    r = np.random.default_rng(0)
    grid = (0.25, 0.5, 0.75)
    # convex curves (increasing increments) so the grid optimum is comparable
    errors = {f"l{i}": np.cumsum(np.sort(r.random(3)) * r.uniform(0.1, 2)) for i in range(4)}
    counts = {k: int(r.integers(100, 1000)) for k in errors}
    table = _table(errors, grid)
    total = sum(counts.values())
    for target in (0.25, 0.5, 0.6):
        out = allocate(table, target, counts, max_sparsity=0.75)
        cost = sum(np.interp(out[k], (0,) + grid, np.concatenate([[0], errors[k]]))
                   for k in errors)
        best = min(sum(np.interp(c[i], (0,) + grid, np.concatenate([[0], errors[k]]))
                       for i, k in enumerate(errors))
                   for c in itertools.product((0.0,) + grid, repeat=4)
                   if sum(c[i] * counts[k] for i, k in enumerate(errors)) >= target * total)
        assert cost <= best + 1e-9


def test_allocate_existing_sparsity_and_discrete_patterns():
    table = _table({"a": [0.0, 0.0, 0.2, 0.5], "b": [0.1, 0.2, 0.3, 0.6]}, existing={"a": 0.6})
    out = allocate(table, 0.3, {"a": 100, "b": 100})
    assert out["a"] >= 0.6 and out["b"] == pytest.approx(0.0)
    nm = SensitivityTable("2:4", "magnitude", (0.5,),
                          errors={"a": np.array([0.3]), "b": np.array([0.01]),
                                  "c": np.array([0.05])})
    picked = allocate(nm, 0.3, {"a": 100, "b": 100, "c": 100})
    assert picked == {"a": 0.0, "b": 0.5, "c": 0.5}


def test_fragile_layers():
    ordinary = {f"ok{i}": [0.01 * (i + 1), 0.02 * (i + 1), 0.05, 0.2] for i in range(5)}
    table = _table({**ordinary, "basis": [0.9, 1.2, 1.5, 2.0], "ramp": [0.03, 0.09, 0.15, 0.6]})
    table.numel = {**{k: 10000 for k in ordinary}, "basis": 4096, "ramp": 16}
    fragile = table.fragile()
    assert set(fragile) == {"basis", "ramp"}
    assert "exceeds" in fragile["basis"] and "per pruned parameter" in fragile["ramp"]
    assert table.to_dict()["errors"]["basis"][0] == pytest.approx(0.9)


def test_a_fixed_ramp_is_fragile_in_a_real_model():
    # yolo_block's DFL decoding conv has a fixed 0..15 ramp as its weight (models/README.md).
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "models" / "yolo_block.onnx"
    if not path.exists():
        pytest.skip("models/yolo_block.onnx not present")
    handle = load(path)
    weights, _ = find_weights(handle)
    chosen = [w for w in weights if w.key == "detect.dfl.conv.weight"] + weights[:6]
    data = generated_calibration(handle.model, n=2)
    table = layer_sensitivity(handle, chosen, data, "unstructured", sparsities=(0.3,))
    assert "detect.dfl.conv.weight" in table.fragile()
    assert looks_fixed(handle.read(chosen[0].tensor)) is not None


# -- data-free guard --------------------------------------------------------------------------
def _stft(n_fft=128):
    k = np.arange(n_fft // 2 + 1)[:, None]
    t = np.arange(n_fft)[None]
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.concatenate([np.cos(2 * np.pi * k * t / n_fft) * win,
                           np.sin(2 * np.pi * k * t / n_fft) * win])[:, None, :]


def _dct(n=32):
    m = np.cos(np.pi * (2 * np.arange(n)[None] + 1) * np.arange(n)[:, None] / (2 * n))
    m[0] *= np.sqrt(0.5)
    return m


_R = np.random.default_rng(0)


@pytest.mark.parametrize("name,w,fixed", [
    ("conv", _R.standard_normal((64, 32, 3, 3)) * 0.05, False),
    ("fc", _R.standard_normal((256, 512)) * 0.02, False),
    ("pruned fc", _R.standard_normal((128, 128)) * (_R.random((128, 128)) > 0.7), False),
    ("tiny", _R.standard_normal((4, 3, 1, 1)), False),
    ("fp16 fc", (_R.standard_normal((64, 64)) * 0.1).astype(np.float16), False),
    ("constant", np.full((8, 8), 0.25), True),
    ("ramp", np.arange(24, dtype=np.float32).reshape(1, 24), True),
    ("identity", np.eye(16), True),
    ("scaled permutation", np.eye(16)[_R.permutation(16)] * 0.5, True),
    ("linspace grid", np.linspace(0, 1, 40)[None].repeat(2, 0) * np.array([[0.3], [0.7]]), True),
    ("smoothing", np.tile(np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16.0, (8, 1, 1, 1)), True),
    ("dct", _dct(), True),
    ("dct transposed", _dct().T.copy(), True),
    ("stft conv1d", _stft(), True),
])
def test_looks_fixed(name, w, fixed):
    reason = looks_fixed(w)
    assert (reason is not None) == fixed, (name, reason)
