"""BatchNormalization statistics after channel removal, re-estimated from calibration data.

After channels are removed (and consumers refit), a normalization with running statistics
(BatchNormalization: the inputs the channel rules give the ``stat`` role) still normalizes with
the training statistics of the *dense* model's input, which the pruned input no longer has. Two
ways to put that right, each from the calibration data, BN by BN in graph order on the model as
corrected so far (a :class:`~onnxprune.runtime.segments.SegmentRunner` runs each node once):

- ``data`` (adaptive BN, as in EagleEye): the running mean and variance become the pruned
  model's measured per-channel mean and variance of the BN's input (over samples and positions).
- ``match``: the BN's scale and shift are moved so that its output has, per channel, the same
  mean and standard deviation on the calibration data as the dense model's BN output (paired run
  of the dense model); the running statistics are left alone. Exact in the first two moments,
  whatever the epsilon, and a no-op where the input did not change.

Channels that carry nothing (measured variance 0: removed channels still masked, constants)
keep their parameters. A BN whose parameter tensors something else also reads is left alone
(the edit would change the other reader) and named in the notes.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.index import attr, node_key
from onnxprune.model.io import ModelHandle
from onnxprune.ops._channel import BIAS, SCALE, STAT

MODES = ("none", "data", "match")


def running_stat_norms(handle: ModelHandle, roles: Mapping[Tuple[str, int], Sequence[tuple]]
                       ) -> List[Tuple[object, Dict[str, str]]]:
    """The normalizations with running statistics, in graph order: (node, {"scale", "bias",
    "mean", "var": stored tensor name}) from the roles the channel rules gave their inputs
    (``roles``: a channel graph's ``(stored, axis) -> [(role, node key, input index)]``; the two
    ``stat`` inputs in input order: mean, then variance)."""
    per_node: Dict[str, Dict[int, Tuple[str, str]]] = {}
    for (name, axis), entries in roles.items():
        for role, key, index in entries:
            if role in (SCALE, BIAS, STAT) and axis == 0:
                per_node.setdefault(key, {})[index] = (role, name)
    out = []
    for node in handle.model.graph.node:
        slots = per_node.get(node_key(node))
        if not slots:
            continue
        stats = [slots[i][1] for i in sorted(slots) if slots[i][0] == STAT]
        scale = [slots[i][1] for i in sorted(slots) if slots[i][0] == SCALE]
        bias = [slots[i][1] for i in sorted(slots) if slots[i][0] == BIAS]
        if len(stats) == 2 and len(scale) == 1 and len(bias) == 1:
            out.append((node, {"scale": scale[0], "bias": bias[0], "mean": stats[0],
                               "var": stats[1]}))
    return out


def _moments(runner, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) mean and variance of ``name`` over every batch, sample and
    position (float64 sums)."""
    total = sq = None
    count = 0
    for batch in runner.batches([name]):
        x = np.asarray(batch[name], dtype=np.float64)
        x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
        s, q = x.sum(axis=1), (x * x).sum(axis=1)
        total = s if total is None else total + s
        sq = q if sq is None else sq + q
        count += x.shape[1]
    mean = total / max(count, 1)
    return mean, np.maximum(sq / max(count, 1) - mean * mean, 0.0)


def reestimate_batchnorm(handle: ModelHandle, roles: Mapping[Tuple[str, int], Sequence[tuple]], calibration: CalibrationSet,
                         mode: str = "match", reference: Optional[ModelHandle] = None,
                         batch_size: int = 8) -> Tuple[List[str], List[str]]:
    """Re-estimate every running-statistics normalization of ``handle`` (``mode`` ``data`` or
    ``match``, see the module doc; ``match`` needs ``reference``, the dense model with the same
    graph and shapes). Returns (node labels changed, notes)."""
    from onnxprune.calibration.sequential import segment_runners

    if mode not in MODES:
        raise ValueError(f"unknown BN re-estimation mode {mode!r}")
    if mode == "none":
        return [], []
    if mode == "match" and reference is None:
        return [], ["BN re-estimation: no dense model to match (the graph changed); skipped"]
    norms = running_stat_norms(handle, roles)
    index = handle.index
    changed, shared = [], []
    handles = [handle] + ([reference] if mode == "match" else [])
    with segment_runners(handles, calibration, batch_size) as runners:
        for node, names in norms:
            label = node.name or node.output[0]
            if any(len(index.readers(t)) != 1 for t in names.values()):
                shared.append(label)
                continue
            x = node.input[0]
            mu_p, var_p = _moments(runners[0], x)
            live = var_p > 0
            if not live.any():
                continue
            stored = {k: index.stored[v] for k, v in names.items()}
            mean = np.asarray(handle.read(stored["mean"]), dtype=np.float64)
            var = np.asarray(handle.read(stored["var"]), dtype=np.float64)
            if mode == "data":
                dtype = handle.read(stored["mean"]).dtype
                handle.write(stored["mean"], np.where(live, mu_p, mean).astype(dtype))
                handle.write(stored["var"], np.where(live, var_p, var).astype(dtype))
            else:
                mu_d, var_d = _moments(runners[1], x)
                eps = float(attr(node, "epsilon", 1e-5))
                raw_scale = handle.read(stored["scale"])
                gamma = np.asarray(raw_scale, dtype=np.float64)
                beta = np.asarray(handle.read(stored["bias"]), dtype=np.float64)
                s = np.sqrt(var + eps)
                ratio = np.sqrt(var_d) / np.sqrt(np.where(live, var_p, 1.0))
                new_gamma = np.where(live, gamma * ratio, gamma)
                new_beta = np.where(live, beta + gamma * (mu_d - mean) / s
                                    - new_gamma * (mu_p - mean) / s, beta)
                handle.write(stored["scale"], new_gamma.astype(raw_scale.dtype))
                handle.write(stored["bias"], new_beta.astype(raw_scale.dtype))
            changed.append(label)
    notes = []
    if changed:
        what = ("running mean and variance set to the pruned model's measured input statistics"
                if mode == "data" else "scale and shift moved so each channel's output mean and "
                "standard deviation match the dense model's")
        notes.append(f"BN re-estimation ({mode}) on {len(calibration)} calibration samples: "
                     f"{len(changed)} of {len(norms)} BatchNormalizations, {what}")
    if shared:
        notes.append(f"BN re-estimation: {len(shared)} left alone because another node reads "
                     f"their parameters: {', '.join(shared[:5])}" + (" …" if len(shared) > 5
                                                                    else ""))
    return changed, notes

