"""Channel ranking by reconstruction error (``--channel-criterion reconstruction``).

A norm ranking keeps the channels with the largest weights; but after removal the refit
(:func:`~onnxprune.calibration.sequential.refit_toward_dense`) re-solves each consumer from the
channels kept, so what a channel costs is what the refit *cannot* recover without it. For a
consumer ``W[out, in]`` with input statistics ``H = X^T X`` (centered, dampened as the refit
does) removing the columns ``S`` of one channel and refitting the rest by least squares leaves
the output error

    E(S) = tr( W_S (H^-1)_SS^-1 W_S^T )            (group Optimal Brain Surgeon, ThiNet-style)

which is exactly the refit's residual when that one channel goes. A unit's importance is E over
every consumer of its group that has statistics (each consumer normalised to mean 1 over the
group's units, as the norm ranking normalises its tensors); groups without such a consumer keep
the norm ranking. Statistics come from the dense model on the calibration data, Conv rows
sampled as for the refit.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from onnxprune.calibration.hessian import fits_budget
from onnxprune.calibration.statistics import collect_layer_stats
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import ModelHandle
from onnxprune.ops._channel import CONSUMER

#: Dampening added to H's diagonal, as a fraction of its mean (the refit's default).
DAMP = 0.01


def column_channels(layout, axis: int) -> np.ndarray:
    """For each ``in`` column of ``layout``'s ``W[out, in]`` view, its index along the raw
    tensor's ``axis`` (-1 where that axis is not an input axis)."""
    shape = layout.stored_shape if layout.view else layout.shape
    ramp = np.arange(shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    w2d = layout.to_2d(np.broadcast_to(ramp, shape).copy())
    rows = w2d.reshape(w2d.shape[0], -1)
    return rows[0] if (rows == rows[:1]).all() else np.full(rows.shape[1], -1)


def consumer_units(graph, weights: Sequence, groups=None) -> Dict[int, List[tuple]]:
    """Prunable group id -> ``[(weight, units), ...]``: each float, ungrouped consumer weight of
    the group within the Hessian budget, and per unit of the group the ``W[out, in]`` columns
    it feeds (``groups``: only these ids)."""
    by_name = {w.name: w for w in weights}
    wanted: Dict[int, List[tuple]] = {}
    for g in graph.prunable():
        if groups is not None and g.id not in groups:
            continue
        for m in g.members:
            w = by_name.get(m.tensor)
            if (w is None or not m.stored or CONSUMER not in m.roles or w.layout.group != 1
                    or not fits_budget(w)):
                continue
            cols = column_channels(w.layout, m.axis)
            if (cols < 0).all():
                continue
            units = [np.flatnonzero(np.isin(cols, m.index_map[u])) for u in range(g.size)]
            wanted.setdefault(g.id, []).append((w, units))
    return wanted


def refit_columns(w2d: np.ndarray, moment: np.ndarray, mean: Optional[np.ndarray],
                  removed: np.ndarray, damp: float = DAMP
                  ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The least-squares refit of ``w2d`` (``W[out, in]``, dense values) when the columns
    ``removed`` go: ``(W', bias shift)`` with ``W'_R = 0`` and ``W'_K = W_K + W_R C_RK C_KK^-1``
    (``C`` the input covariance ``moment/n - mean mean^T`` when ``mean`` is given, the bias
    then taking ``W_R mean_R - (W'_K - W_K) mean_K``; else the raw second moment ``moment`` and
    no shift). ``moment`` is ``X^T X / n``; ``C_KK`` is dampened by ``damp`` x its mean
    diagonal, as the refit does."""
    w = np.asarray(w2d, dtype=np.float64)
    n_in = w.shape[1]
    r = np.zeros(n_in, bool)
    r[np.asarray(removed, dtype=np.int64)] = True
    k = ~r
    c = np.asarray(moment, dtype=np.float64)
    if mean is not None:
        c = c - np.outer(mean, mean)
    ckk = c[np.ix_(k, k)]
    lam = damp * max(float(np.mean(np.diag(ckk))) if k.any() else 0.0, 1e-12)
    out = w.copy()
    out[:, r] = 0.0
    if not k.any() or not r.any():
        return out, (None if mean is None else np.zeros(w.shape[0]))
    gain = np.linalg.solve(ckk + lam * np.eye(int(k.sum())), c[np.ix_(k, r)]).T  # [R, K]
    delta = w[:, r] @ gain
    out[:, k] += delta
    shift = None
    if mean is not None:
        shift = w[:, r] @ mean[r] - delta @ mean[k]
    return out, shift


def removal_errors(w2d: np.ndarray, hessian: np.ndarray, units: Sequence[np.ndarray],
                   damp: float = DAMP) -> np.ndarray:
    """``E(S)`` (module doc) for each column set ``S`` in ``units``: the least-squares output
    error of ``w2d`` when those columns go and the others are refit on ``hessian``."""
    h = np.asarray(hessian, dtype=np.float64)
    lam = damp * max(float(np.mean(np.diag(h))), 1e-12)
    hinv = np.linalg.inv(h + lam * np.eye(len(h)))
    w = np.asarray(w2d, dtype=np.float64)
    out = np.zeros(len(units))
    for i, cols in enumerate(units):
        if not len(cols):
            continue
        ws = w[:, cols]
        m = np.linalg.inv(hinv[np.ix_(cols, cols)])
        out[i] = float(np.sum((ws @ m) * ws))
    return out


def reconstruction_scores(handle: ModelHandle, graph, weights: Sequence, data: CalibrationSet,
                          batch_size: int = 8, seed: int = 0
                          ) -> Tuple[Dict[int, np.ndarray], str]:
    """Prunable group id -> its units' reconstruction importance (mean 1), for the groups with
    at least one consumer weight measured; and a note for the report."""
    start = time.perf_counter()
    wanted = consumer_units(graph, weights)
    need = list({w.key: w for parts in wanted.values() for w, _ in parts}.values())
    stats = collect_layer_stats(handle, need, data, want_hessian=True, batch_size=batch_size,
                                precision="float32", sample_rows=True, seed=seed) if need else {}
    scores: Dict[int, np.ndarray] = {}
    for gid, parts in wanted.items():
        per = []
        for w, units in parts:
            st = stats.get(w.key)
            if st is None or st.hessian is None:
                continue
            n = max(st.count, 1)
            mean = st.in_sums / n
            h = st.hessian / n - np.outer(mean, mean)  # centered: the bias takes the means
            e = removal_errors(w.layout.to_2d(handle.read(w.tensor)), h, units)
            if e.mean() > 0:
                per.append(e / e.mean())
        if per:
            scores[gid] = np.mean(per, axis=0)
    note = (f"channels ranked by reconstruction error: {len(scores)} of "
            f"{len(graph.prunable())} groups from {len(need)} consumers' statistics on "
            f"{len(data)} calibration samples ({time.perf_counter() - start:.1f} s); the others "
            "by weight norm")
    return scores, note
