"""--permute end to end: the permuted dense model computes the original function, the kept
saliency the report gives is what the N:M mask really keeps, N:M stays exact, calibrated runs
fit toward the permuted dense model and carry their statistics along."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune.calibration.statistics import collect_layer_stats
from onnxprune.cli import main
from onnxprune.errors import OptionError
from onnxprune.model.io import load
from onnxprune.passes.permute import SECTION, PermuteRecord
from channel_models import G, IMG, assert_close, feeds_for, run


def model():
    """Conv->BN->Relu->Conv, a Concat into a Conv, a residual Add and a Gemm chain; every
    channel count a multiple of 4."""
    g = G(11)
    a = g.op("Relu", [g.bn(g.conv("x", 3, 16), 16)])
    b = g.op("Relu", [g.conv(a, 16, 16)])
    c = g.op("Relu", [g.conv(a, 16, 8, k=1)])
    d = g.conv(g.op("Concat", [b, c], axis=1), 24, 16)
    res = g.op("Relu", [g.op("Add", [d, a])])
    p = g.op("Flatten", [g.op("GlobalAveragePool", [res])])
    h = g.op("Relu", [g.op("Gemm", [p, g.w([32, 16]), g.w([32], 0.1)], transB=1)])
    return g.model(IMG, [g.op("Gemm", [h, g.w([32, 10]), g.w([10], 0.1)])])


def dense_of(result, original):
    """The input model with the run's dense edits (the permutation) replayed."""
    handle = load(copy.deepcopy(original) if isinstance(original, onnx.ModelProto)
                  else str(original))
    for replay in result.state.dense_edits:
        replay(handle)
    return handle.model


def record_of(result):
    return next(r for r in result.state.records if isinstance(r, PermuteRecord))


def kept_actual(result, original):
    """Per N:M weight: sum |pruned w| / sum |dense w| (a permutation keeps a weight's values)."""
    dense = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    out = {}
    for w in result.state.weights:
        pruned = result.state.handle.read(w.tensor)
        out[w.key] = float(np.abs(pruned).sum() / np.abs(dense[w.name]).sum())
    return out


def check_nm(result, n=2, m=4):
    for w in result.state.weights:
        w2d = w.layout.to_2d(result.state.handle.read(w.tensor))
        if w2d.shape[1] % m:
            continue
        nz = (w2d != 0).reshape(w2d.shape[0], -1, m).sum(axis=-1)
        assert (nz == n).all(), w.key  # dense random weights: exactly n kept per group


def test_permute_raises_kept_magnitude_and_reports_it_exactly():
    m = model()
    plain = onnxprune.prune(copy.deepcopy(m), pattern="2:4")
    perm = onnxprune.prune(copy.deepcopy(m), pattern="2:4", permute=True)
    rec = record_of(perm)
    assert rec.groups_permuted >= 2 and rec.modified
    assert rec.kept_after > rec.kept_before
    assert rec.saliency == "magnitude"
    rows = {r["weight"]: r for r in perm.report.sections[SECTION]}
    actual_perm, actual_plain = kept_actual(perm, m), kept_actual(plain, m)
    for key, (before, after) in rec.kept.items():
        # what the report says is what the mask kept, with and without the permutation
        assert after == pytest.approx(actual_perm[key], rel=1e-6)
        assert before == pytest.approx(actual_plain[key], rel=1e-6)
        assert rows[key]["gain"] == pytest.approx(after - before, abs=2e-6)
    total = {w.key: float(np.abs(onnx.numpy_helper.to_array(
        next(t for t in m.graph.initializer if t.name == w.name))).sum())
        for w in perm.state.weights}
    kept_p = sum(actual_perm[k] * total[k] for k in rec.kept) / sum(total[k] for k in rec.kept)
    assert rec.kept_after == pytest.approx(kept_p, rel=1e-6)
    check_nm(perm)
    check_nm(plain)
    assert any("channel permutation:" in n for n in perm.report.notes)
    assert perm.report.options.get("permute") is True
    # the permuted dense model computes the original function
    feeds = feeds_for(m, seed=4)
    assert len(perm.state.dense_edits) == 1
    assert_close(run(dense_of(perm, m), feeds), run(m, feeds))
    assert plain.state.dense_edits == []


def test_no_permute_is_the_default_and_changes_nothing():
    m = model()
    a = onnxprune.prune(copy.deepcopy(m), pattern="2:4")
    b = onnxprune.prune(copy.deepcopy(m), pattern="2:4", permute=False)
    assert not any(isinstance(r, PermuteRecord) for r in a.state.records)
    for x, y in zip(a.model.graph.initializer, b.model.graph.initializer):
        assert x == y


def test_graph_output_group_never_permuted():
    m = model()
    perm = onnxprune.prune(copy.deepcopy(m), pattern="2:4", permute=True)
    # the last Gemm's output rows (the graph output's channels) keep their order
    last = m.graph.initializer[-2]
    got = onnx.numpy_helper.to_array(next(t for t in perm.model.graph.initializer
                                          if t.name == last.name))
    want = onnx.numpy_helper.to_array(last)
    assert got.shape == want.shape == (32, 10)
    for j in range(10):  # each output column keeps its own values: columns never moved
        kept = got[:, j] != 0
        assert kept.sum() == 16
        assert set(got[kept, j].tolist()) <= set(want[:, j].tolist())
    bias = next(t for t in perm.model.graph.initializer if t.name == m.graph.initializer[-1].name)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(bias),
                                  onnx.numpy_helper.to_array(m.graph.initializer[-1]))


def test_calibrated_runs_fit_toward_the_permuted_dense_model():
    m = model()
    res = onnxprune.prune(copy.deepcopy(m), pattern="2:4", permute=True, criterion="wanda")
    rec = record_of(res)
    assert rec.saliency.startswith("|w| * input norm")
    assert rec.groups_permuted >= 1 and rec.kept_after > rec.kept_before
    assert not any("graph changed before layer-by-layer" in n for n in res.report.notes)
    check_nm(res)
    # the reference layer-by-layer pruning ran beside the model is the permuted dense model
    from onnxprune.passes.sequential import dense_reference

    ref = dense_reference(res.state, [])
    want = {t.name: onnx.numpy_helper.to_array(t) for t in dense_of(res, m).graph.initializer}
    orig = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    moved = [n for n in want if not np.array_equal(want[n], orig[n])]
    assert moved
    for name in want:
        np.testing.assert_array_equal(ref.read(ref.index.stored[name]), want[name])


def test_statistics_follow_the_permutation():
    m = model()
    res = onnxprune.prune(copy.deepcopy(m), pattern="2:4", permute=True, criterion="wanda",
                          scope="global")
    assert record_of(res).groups_permuted >= 1
    dense = load(dense_of(res, m))
    fresh = collect_layer_stats(dense, res.state.weights, res.state.calibration,
                                want_hessian=False)
    moved = 0
    for key, st in res.state.layer_stats.items():
        np.testing.assert_allclose(st.in_sq_norms, fresh[key].in_sq_norms, rtol=1e-5)
        moved += not np.allclose(st.in_sq_norms, collect_layer_stats(
            load(copy.deepcopy(m)), [w for w in res.state.weights if w.key == key],
            res.state.calibration, want_hessian=False)[key].in_sq_norms, rtol=1e-5)
    assert moved >= 1


def test_option_errors():
    with pytest.raises(OptionError, match="--permute reorders channels for N:M"):
        onnxprune.prune(model(), pattern="unstructured", permute=True)
    with pytest.raises(OptionError, match="--permute cannot be used with --masks"):
        onnxprune.prune(model(), pattern="2:4", permute=True, masks={"w1": np.ones(1)})


def test_cli_flags(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(model(), str(path))
    runner = CliRunner()
    bad = runner.invoke(main, [str(path), "--pattern", "4x1", "--permute"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1].startswith("error: --permute reorders channels")
    ok = runner.invoke(main, [str(path), "--pattern", "2:4", "--permute", "-o",
                              str(tmp_path / "p.onnx")])
    assert ok.exit_code == 0, ok.output
    assert "channel permutation:" in ok.output
    off = runner.invoke(main, [str(path), "--pattern", "2:4", "--no-permute", "-o",
                               str(tmp_path / "q.onnx")])
    assert off.exit_code == 0, off.output
    assert "channel permutation:" not in off.output


@pytest.mark.parametrize("name", ["mobilenetv3_block_fp16", "yolo_block", "transformer_mlp"])
def test_fixture_models_permuted_dense_equals_original(name):
    """Exporter output: depthwise + SE + residual (weights fp16 behind Cast), C2f Split/Concat +
    SPPF + Resize, attention heads + LayerNorm + residual stream."""
    import onnxruntime as ort
    from pathlib import Path

    from onnxprune.inputs.generate import make_inputs

    path = Path(__file__).resolve().parents[2] / "models" / f"{name}.onnx"
    res = onnxprune.prune(str(path), pattern="2:4", permute=True, validate=False)
    rec = record_of(res)
    assert rec.groups_permuted >= 2 and rec.kept_after > rec.kept_before
    feeds = make_inputs(str(path), None, seed=3)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def outputs(model):
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)

    for got, want in zip(outputs(dense_of(res, path)), outputs(path)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want).max()))
