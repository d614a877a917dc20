"""BatchNormalization re-estimated after channel removal (calibration/batchnorm.py,
--bn-reestimate): ``data`` sets the running statistics to the pruned model's measured input
statistics; ``match`` moves scale and shift so each channel's output mean and std equal the
dense model's on the calibration data."""

import copy

import numpy as np
import onnx
import pytest

from channel_models import BUILDERS, run
from onnxprune.api import prune
from onnxprune.calibration.batchnorm import reestimate_batchnorm, running_stat_norms
from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels
from onnxprune.channels.select import select_channels
from onnxprune.errors import OptionError
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import load


def _data(model, n=12, seed=3):
    x = np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)
    return x, CalibrationSet.from_arrays(model, {"x": x})


def _masked(model):
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    mask_channels(handle, select_channels(handle, graph, 0.5), graph)
    return handle, graph


def _moments(model, names, x):
    """Per-channel mean and variance of each tensor in ``names`` over all of ``x``."""
    m = copy.deepcopy(model)
    for n in names:
        m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                                                 None))
    k = len(model.graph.output)
    outs = [run(m, {"x": x[i:i + 1]})[k:] for i in range(len(x))]
    res = []
    for j in range(len(names)):
        a = np.concatenate([o[j] for o in outs]).astype(np.float64)
        a = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
        res.append((a.mean(axis=1), a.var(axis=1)))
    return res


def test_norms_found_from_channel_roles():
    handle = load(BUILDERS["conv_bn_relu"]())
    norms = running_stat_norms(handle, build_channel_graph(handle).roles)
    assert [n.op_type for n, _ in norms] == ["BatchNormalization"] * 2
    for node, names in norms:
        assert [names[k] for k in ("scale", "bias", "mean", "var")] == list(node.input[1:5])


def test_data_mode_running_stats_equal_measured_input_statistics():
    model = BUILDERS["conv_bn_relu"]()
    handle, graph = _masked(model)
    x, data = _data(model)
    changed, notes = reestimate_batchnorm(handle, graph.roles, data, "data", batch_size=5)
    assert len(changed) == 2 and "BN re-estimation (data)" in notes[0]
    norms = running_stat_norms(handle, graph.roles)
    measured = _moments(handle.model, [n.input[0] for n, _ in norms], x)
    dense = load(model)
    for (node, names), (mu, var) in zip(norms, measured):
        mean = handle.read(handle.index.stored[names["mean"]])
        running_var = handle.read(handle.index.stored[names["var"]])
        live = var > 0
        assert live.any() and not live.all()  # masked channels carry nothing
        np.testing.assert_allclose(mean[live], mu[live], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(running_var[live], var[live], rtol=1e-4, atol=1e-6)
        # masked channels keep their parameters
        old = dense.read(dense.index.stored[names["mean"]])
        np.testing.assert_array_equal(mean[~live], old[~live])


def test_match_mode_output_moments_equal_dense():
    model = BUILDERS["conv_bn_relu"]()
    handle, graph = _masked(model)
    # Damage the surviving channels too, as removal does to a consumer's input
    first = handle.index.stored[handle.model.graph.node[0].input[1]]
    w = handle.read(first)
    handle.write(first, w * np.float32(1.7) + np.float32(0.05) * (w != 0))  # masked stay 0
    x, data = _data(model)
    reference = load(copy.deepcopy(model))
    changed, _ = reestimate_batchnorm(handle, graph.roles, data, "match", reference=reference)
    assert len(changed) == 2
    outs = [n.output[0] for n, _ in running_stat_norms(handle, graph.roles)]
    ins = [n.input[0] for n, _ in running_stat_norms(handle, graph.roles)]
    pruned = _moments(handle.model, outs + ins, x)
    dense = _moments(model, outs, x)
    for (mu_p, var_p), (mu_d, var_d), (_, var_in) in zip(pruned[:2], dense, pruned[2:]):
        live = var_in > 0
        np.testing.assert_allclose(mu_p[live], mu_d[live], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var_p[live], var_d[live], rtol=1e-3, atol=1e-6)


def test_match_mode_is_a_no_op_on_the_dense_model():
    model = BUILDERS["conv_bn_relu"]()
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    x, data = _data(model)
    reestimate_batchnorm(handle, graph.roles, data, "match", reference=load(model))
    np.testing.assert_allclose(run(handle.model, {"x": x[:1]})[0], run(model, {"x": x[:1]})[0],
                               rtol=1e-4, atol=1e-5)


def test_prune_with_bn_reestimate(tmp_path):
    model = BUILDERS["conv_bn_relu"]()
    x, _ = _data(model, n=16)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=x)
    res = prune(model, pattern="channel", sparsity=0.5, refit=True, calibration=cal,
                bn_reestimate="match", validation_samples=4)
    rec = [r for r in res.state.records if r.__class__.__name__ == "ChannelRecord"][0]
    assert len(rec.bn_reestimated) == 2 and rec.channels_removed > 0
    # the channels really left the model (the resize after the BN step found its nodes)
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    dims = {t.name: list(t.dims) for t in res.model.graph.initializer}
    assert dims[convs[0].input[1]][0] < 16
    assert any("BN re-estimation (match)" in n for n in rec.notes)
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.options["bn_reestimate"] == "match"


@pytest.mark.parametrize("kw, msg", [
    (dict(pattern="channel", sparsity=0.5, bn_reestimate="match"),
     "--bn-reestimate measures on calibration data; give --calibration"),
    (dict(pattern="2:4", bn_reestimate="data", calibration="x.npz"),
     "--bn-reestimate works after channel removal; it needs --pattern channel"),
    (dict(pattern="channel", sparsity=0.5, bn_reestimate="mean"),
     "bn_reestimate must be one of none, data, match, got 'mean'"),
])
def test_bn_reestimate_option_errors(kw, msg):
    with pytest.raises(OptionError, match=msg):
        prune(BUILDERS["conv_bn_relu"](), **kw)
