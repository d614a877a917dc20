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
from typing import Dict, List, Sequence, Tuple

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
    by_name = {w.name: w for w in weights}
    wanted: Dict[int, List[tuple]] = {}
    for g in graph.prunable():
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
