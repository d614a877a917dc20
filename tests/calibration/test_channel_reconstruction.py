"""Channel ranking by reconstruction error (calibration/channel_scores.py,
--channel-criterion reconstruction): E(S) is the least-squares refit residual when the columns S
go, and ranking by it leaves a lower refit error than ranking by weight norm where inputs are
redundant."""

import copy

import numpy as np
import pytest

from channel_models import BUILDERS
from onnxprune.api import prune
from onnxprune.calibration.channel_scores import column_channels, removal_errors
from onnxprune.errors import OptionError
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights


def _refit_error(w, x, kept):
    """min over W' of ||X W^T - X_K W'^T||^2 (least squares)."""
    y = x @ w.T
    sol, *_ = np.linalg.lstsq(x[:, kept], y, rcond=None)
    return float(((x[:, kept] @ sol - y) ** 2).sum())


def test_removal_error_is_the_refit_residual():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    w = rng.standard_normal((5, 6))
    units = [np.array([0]), np.array([2, 3]), np.array([5])]
    e = removal_errors(w, x.T @ x, units, damp=0.0)
    for cols, got in zip(units, e):
        kept = [c for c in range(6) if c not in cols]
        assert got == pytest.approx(_refit_error(w, x, kept), rel=1e-8)


def test_reconstruction_ranking_beats_norm_ranking_on_redundant_inputs():
    """Channels 0-3 carry large weights but are near-copies of one signal; channels 4-7 are
    independent with small weights. Removing 3 channels by norm takes independent ones (their
    output is lost); by reconstruction error it takes the copies (the refit recovers them)."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2000, 1))
    x = np.concatenate([base + 0.01 * rng.standard_normal((2000, 4)),
                        rng.standard_normal((2000, 4))], axis=1)
    w = np.concatenate([2.0 + 0.1 * rng.standard_normal((6, 4)),
                        0.5 * rng.standard_normal((6, 4))], axis=1)
    units = [np.array([c]) for c in range(8)]
    by_norm = np.argsort(np.abs(w).sum(axis=0), kind="stable")[:3]
    by_recon = np.argsort(removal_errors(w, x.T @ x, units), kind="stable")[:3]
    assert set(by_recon.tolist()) <= {0, 1, 2, 3}
    err_norm = _refit_error(w, x, [c for c in range(8) if c not in by_norm])
    err_recon = _refit_error(w, x, [c for c in range(8) if c not in by_recon])
    assert err_recon < 0.01 * err_norm


def test_conv_columns_map_to_input_channels():
    handle = load(BUILDERS["conv_bn_relu"]())
    weights, _ = find_weights(handle)
    conv = [w for w in weights if w.shape == (24, 16, 3, 3)][0]
    cols = column_channels(conv.layout, 1)
    assert np.bincount(cols).tolist() == [9] * 16
    raw = handle.read(conv.tensor)
    for c in (0, 5, 15):  # the columns of channel c are where W[:, c] lands in W[out, in]
        only = np.zeros_like(raw)
        only[:, c] = raw[:, c]
        assert np.flatnonzero(conv.layout.to_2d(only).any(axis=0)).tolist() == \
            np.flatnonzero(cols == c).tolist()
    assert (column_channels(conv.layout, 0) == -1).all()  # the output axis is no column


def test_prune_with_reconstruction_ranking(tmp_path):
    model = BUILDERS["conv_bn_relu"]()
    x = np.random.default_rng(2).standard_normal((16, 3, 16, 16)).astype(np.float32)
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=x)
    common = dict(pattern="channel", sparsity=0.5, refit=True, calibration=cal,
                  validation_samples=4)
    norm = prune(copy.deepcopy(model), **common)
    recon = prune(copy.deepcopy(model), channel_criterion="reconstruction", **common)
    rec = [r for r in recon.state.records if r.__class__.__name__ == "ChannelRecord"][0]
    assert any("ranked by reconstruction error: 2 of 2 groups" in n for n in rec.notes)
    norm_rec = [r for r in norm.state.records if r.__class__.__name__ == "ChannelRecord"][0]
    assert rec.channels_removed == norm_rec.channels_removed  # same widths, other channels
    assert rec.removed != norm_rec.removed
    assert recon.report.options["channel_criterion"] == "reconstruction"


def test_reconstruction_needs_calibration():
    with pytest.raises(OptionError, match="--channel-criterion reconstruction measures on "
                                          "calibration data; give --calibration"):
        prune(BUILDERS["conv_bn_relu"](), pattern="channel", sparsity=0.5,
              channel_criterion="reconstruction")
