"""Calibrated pruning through onnxprune.prune and the CLI, on the trained digits CNN and its real
calibration split (models/): invariants after weight updates, and error versus magnitude."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import OptionError

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"


def outputs(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def data():
    x = np.load(CALIB)["input"]
    return x, outputs(onnx.load(str(MODEL)), x)


def rel_error(model, data):
    x, ref = data
    return float(np.linalg.norm(outputs(model, x) - ref) / np.linalg.norm(ref))


def weights(result):
    return {w.name: w.layout.to_2d(result.state.handle.read(w.tensor))
            for w in result.state.weights}


def test_sparsegpt_exact_counts_and_lower_error_than_magnitude(data):
    kw = dict(sparsity=0.5, validate=False, resize=False, exclude="Conv_39")
    gpt = onnxprune.prune(MODEL, criterion="sparsegpt", calibration=CALIB, allocate="uniform",
                          **kw)
    mag = onnxprune.prune(MODEL, **kw)
    for row in gpt.report.rows:
        assert row.params - row.nonzeros_after == round(0.5 * row.params), row.name
    assert rel_error(gpt.model, data) < 0.5 * rel_error(mag.model, data)


@pytest.mark.parametrize("pattern", ["2:4", "4x1"])
def test_sparsegpt_keeps_pattern_invariants_after_updates(pattern):
    res = onnxprune.prune(MODEL, pattern=pattern, sparsity=None if pattern == "2:4" else 0.5,
                          criterion="sparsegpt", calibration=CALIB, validate=False)
    pruned = {r.name for r in res.report.rows}
    if pattern == "2:4":  # the 1-channel first conv cannot carry 2:4 as kernels read it
        assert "Conv_39" in " ".join(n for n, _ in res.report.skipped)
    for name, w2d in weights(res).items():
        if name not in pruned:
            continue
        nz = w2d != 0
        if pattern == "2:4":
            cols = nz.shape[1] - nz.shape[1] % 4
            assert (nz[:, :cols].reshape(nz.shape[0], -1, 4).sum(axis=2) <= 2).all(), name
        else:
            rows = nz.shape[0] - nz.shape[0] % 4
            blocks = nz[:rows].reshape(rows // 4, 4, -1)
            assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all(), name


def test_wanda_without_data_says_data_free():
    res = onnxprune.prune(MODEL, sparsity=0.5, criterion="wanda", validate=False)
    assert any("data-free in effect" in n for n in res.report.notes)


def test_channel_refit_beats_plain_removal(data):
    kw = dict(pattern="channel", sparsity=0.3, validate=False)
    plain = onnxprune.prune(MODEL, **kw)
    refit = onnxprune.prune(MODEL, refit=True, calibration=CALIB, **kw)
    assert [r.shape_after for r in plain.report.rows] == [r.shape_after for r in refit.report.rows]
    assert rel_error(refit.model, data) < 0.5 * rel_error(plain.model, data)
    assert any("refit" in n for n in refit.report.notes)


def test_sensitivity_allocation_reaches_target_with_less_error(data):
    kw = dict(sparsity=0.7, validate=False, resize=False)
    uniform = onnxprune.prune(MODEL, **kw)
    alloc = onnxprune.prune(MODEL, allocate="sensitivity", calibration=CALIB, **kw)
    rep = alloc.report
    zeros = rep.params_before - rep.nonzeros_after
    assert abs(zeros - 0.7 * rep.params_before) <= len(rep.rows)  # rounding per layer
    assert len({round(r.sparsity_after, 2) for r in rep.rows}) > 1  # not uniform
    assert rel_error(alloc.model, data) < rel_error(uniform.model, data)
    (title, rows), = rep.sections.items()
    assert "sensitivity" in title and {r["weight"] for r in rows} == {r.name for r in rep.rows}


@pytest.mark.parametrize("kw, want", [
    (dict(calibration=CALIB), "sensitivity"),
    (dict(calibration=CALIB, criterion="sparsegpt", pattern="4x1"), "sensitivity"),
    (dict(), "uniform"),  # no data: nothing to measure with
    (dict(criterion="wanda"), "uniform"),  # generated inputs are not data
    (dict(calibration=CALIB, pattern="2:4"), "uniform"),  # N:M fixes every layer's sparsity
    (dict(calibration=CALIB, pattern="channel"), "uniform"),
    (dict(calibration=CALIB, scope="global"), "uniform"),  # one threshold already spreads it
    (dict(calibration=CALIB, search=True, max_error=0.1), "uniform"),
    (dict(calibration=CALIB, allocate="uniform"), "uniform"),
    (dict(allocate="sensitivity"), "sensitivity"),
])
def test_auto_allocation_resolves(kw, want):
    from onnxprune.api import PruneOptions, build_passes
    from onnxprune.passes.calibrated import AllocateBySensitivity
    opts = PruneOptions(**kw)
    assert opts.allocation == want
    assert any(isinstance(p, AllocateBySensitivity) for p in build_passes(opts)) == \
        (want == "sensitivity")


def test_sensitivity_allocation_spreads_the_target_where_it_hurts_least(data):
    # (what --allocate auto keeps only when it wins on held-out samples: test_auto_allocation)
    kw = dict(sparsity=0.7, validate=False, resize=False, calibration=CALIB, criterion="wanda")
    auto = onnxprune.prune(MODEL, allocate="sensitivity", **kw)
    uniform = onnxprune.prune(MODEL, allocate="uniform", **kw)
    rep = auto.report
    assert rep.options["allocate"] == "sensitivity"
    assert abs((rep.params_before - rep.nonzeros_after) - 0.7 * rep.params_before) <= \
        len(rep.rows)
    assert len({round(r.sparsity_after, 2) for r in rep.rows}) > 1
    assert all(r.params - r.nonzeros_after == round(0.7 * r.params) for r in uniform.report.rows)
    assert rel_error(auto.model, data) < rel_error(uniform.model, data)


def test_option_conflicts_are_user_errors():
    with pytest.raises(OptionError, match="--pattern channel"):
        onnxprune.prune(MODEL, refit=True)
    with pytest.raises(OptionError, match="layer by layer"):
        onnxprune.prune(MODEL, criterion="sparsegpt", scope="global")
    with pytest.raises(OptionError, match="options are"):
        onnxprune.prune(MODEL, sparsity_typo=0.5)


def test_cli_calibrated_run(tmp_path):
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, [str(MODEL), "--criterion", "sparsegpt", "--calibration",
                                    str(CALIB), "--calibration-samples", "64", "-o", str(out),
                                    "--pattern", "2:4", "-q"])
    assert res.exit_code == 0, res.output
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    w = pruned["head.0.weight"]  # Gemm transB=1: [out, in]
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(axis=2) <= 2).all()
    res = CliRunner().invoke(main, [str(MODEL), "--refit", "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "--pattern channel" in res.output


def test_search_finds_highest_passing_sparsity():
    inputs = {"input": np.load(CALIB)["input"][:64]}
    res = onnxprune.prune(MODEL, search=True, max_error=0.1, inputs=inputs)
    (title, probes), = res.report.sections.items()
    passing = [p["sparsity"] for p in probes if p["passed"]]
    failing = [p["sparsity"] for p in probes if not p["passed"]]
    assert res.report.comparison.max_rel_error <= 0.1
    assert passing and max(passing) < min(f for f in failing if f > max(passing))
    assert round(res.report.options["sparsity"], 4) == max(passing)
    with pytest.raises(OptionError, match="--max-error"):
        onnxprune.prune(MODEL, search=True)


def test_bias_correction_restores_the_mean_output_exactly():
    from onnx import TensorProto, helper
    import builders as B
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1),
             helper.make_node("MatMul", ["h", "W2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["y"])]
    model = B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
                         [B.tensor("W", (16, 32), 1), B.tensor("b", (16,), 2),
                          B.tensor("W2", (16, 8), 3), B.tensor("b2", (8,), 4)])
    x = (rng.standard_normal((128, 32)) + 3.0).astype(np.float32)  # inputs with a large mean
    kw = dict(sparsity=0.5, validate=False, resize=False, calibration={"x": x})
    run = lambda m: B.run(m, {"x": x})[0]
    plain = onnxprune.prune(model, bias_correction=False, **kw)
    fixed = onnxprune.prune(model, **kw)
    assert fixed.report.nonzeros_after == plain.report.nonzeros_after  # same masks
    dense_mean = run(model).mean(axis=0)
    # the first layer's mean is exact; the second sees h's mean unchanged, so y's is exact too
    np.testing.assert_allclose(run(fixed.model).mean(axis=0), dense_mean, atol=1e-3)
    assert np.abs(run(plain.model).mean(axis=0) - dense_mean).max() > 0.1
    assert any("mean outputs stay the dense model's" in n for n in fixed.report.notes)


def test_search_with_calibration_ends_as_its_probes_ran():
    # Probes run with uniform allocation (auto resolves so under search); the final run must
    # prune the same way, or its error could differ from the probe that passed.
    res = onnxprune.prune(MODEL, criterion="wanda", calibration=CALIB, search=True,
                          max_error=0.3, validate=True)
    assert res.report.options["allocate"] == "uniform"
    assert res.state.sensitivity is None
    probes = next(v for k, v in res.report.sections.items() if k.startswith("sparsity search"))
    passed = [p for p in probes if p["passed"]]
    best = max(p["sparsity"] for p in passed)
    (probed,) = [p["rel_error"] for p in passed if p["sparsity"] == best]
    assert res.report.comparison.max_rel_error == pytest.approx(probed, rel=1e-6)


def test_channel_refit_leaves_a_weight_outside_the_selection_as_it_was():
    """--exclude keeps a weight as it was, as the report says: the refit, which fits layers
    toward the dense model, refits only selected weights and those that lost channels."""
    res = onnxprune.prune(MODEL, pattern="channel", sparsity=0.3, refit=True,
                          calibration=CALIB, validate=False, exclude="Conv_39")
    dense = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(MODEL)).graph.initializer}
    pruned = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    first = next(n for n in dense if "Conv_39" in n)
    assert any(first in name for name, _ in res.report.skipped)
    np.testing.assert_array_equal(pruned[first], dense[first])
    refit = next(r.refit for r in res.state.records if getattr(r, "refit", None))
    assert first not in refit and refit  # the others were refit
