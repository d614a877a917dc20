"""Layer-by-layer calibrated pruning toward the dense model's outputs: the algorithms.

The pass that drives them is :class:`onnxprune.passes.sequential.PruneSequentially`; this module
owns the waves (:func:`sequential_waves`), the dense reference model run beside the pruned one
(:func:`load_dense_reference`, :func:`segment_runners`), the fit moments and mean shift of one
layer, and the channel refit (:func:`refit_toward_dense`).

Pruning a layer changes what every layer after it sees. Layer-by-layer pruning therefore
prunes in *waves*: a wave is every selected weight whose input depends on no selected weight not
yet pruned (the Q/K/V projections of one block, the branches of an Inception module, a ResNet
block's first conv and its downsample), in graph order; each wave's input statistics come from
the model with all earlier waves already pruned.

Each layer's statistics are collected *paired*: the pruned model and the dense original run on
the same calibration inputs, so a layer sees both what it gets now (``X``) and what its dense
self got (``X_ref``). Then, per criterion:

* **reconstructing** (``sparsegpt``): the layer is pruned toward the weights that best reproduce
  the *dense* layer's output from the inputs it gets now
  (:func:`~onnxprune.calibration.reconstruct.asymmetric_target`), so it also absorbs the error of the layers
  before it, not just its own;
* **scoring** (``wanda``, ``magnitude``, ...): masks from scores on the inputs it gets now
  (Wanda's ``|W| * ||X_j||`` with the pruned upstream's norms);

and, where the layer has a stored bias (Conv, Gemm, MatMul + Add; grouped and depthwise Conv
too), the bias is moved so the layer's mean output over the calibration data is the dense one's
(:func:`~onnxprune.calibration.reconstruct.asymmetric_bias`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.calibration.hessian import fits_budget, over_budget
from onnxprune.calibration.reconstruct import (asymmetric_bias, asymmetric_target, centered_cross,
                                                heldout_scorer, ridge_path)
from onnxprune.calibration.statistics import LayerStats, collect_layer_stats
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.masking.selection import LayerPlan
from onnxprune.model import io as mio
from onnxprune.model.index import names_read
from onnxprune.ops.weights import Weight, stored_bias
from onnxprune.runtime.segments import SegmentRunner

__all__ = ["REFIT_DAMPS", "RefitChoice", "choose_refit", "fit_moments", "load_dense_reference",
           "mean_shift", "refit_toward_dense", "segment_runners", "sequential_waves"]

#: The refit strengths :func:`choose_refit` tries (ridge ``lam = damp * mean(diag H)`` toward the
#: dense weights), besides keeping the weights as they are.
REFIT_DAMPS = (0.001, 0.01, 0.1, 1.0, 10.0)


def sequential_waves(model: onnx.ModelProto, plans: Sequence
                     ) -> Tuple[List[list], list]:
    """(waves in order, items not in the main graph), for plans or weights.

    An item's wave is the largest number of the given weights on any path from the graph inputs
    to its node's activation: wave 0 reads only unpruned computation, wave ``k`` depends on
    weights of waves below ``k`` only. Nodes with subgraphs count every name their bodies read.
    """
    graph = model.graph
    main = graph.name or "main"
    at_node: Dict[str, List[Tuple[LayerPlan, int]]] = {}
    outside = []
    for plan in plans:
        consumers = _weight(plan).consumers
        if any(c.graph != main for c in consumers) or not consumers:
            outside.append(plan)
            continue
        for c in consumers:
            at_node.setdefault(_node_key(c.node), []).append((plan, c.input_index))
    depth: Dict[str, int] = {}
    level: Dict[str, int] = {}
    for node in graph.node:
        here = at_node.get(_node_key(node), [])
        weight_slots = {index for _, index in here}
        reads = [t for i, t in enumerate(node.input) if i not in weight_slots]
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            reads = sorted(names_read(node))
        d = max((depth.get(t, 0) for t in reads), default=0)
        for plan, _ in here:
            key = _weight(plan).key
            level[key] = max(level.get(key, 0), d)
        for out in node.output:
            depth[out] = d + 1 if here else d
    waves: Dict[int, list] = {}
    for plan in plans:
        if _weight(plan).key in level:
            waves.setdefault(level[_weight(plan).key], []).append(plan)
    return [waves[k] for k in sorted(waves)], outside


def _weight(item) -> Weight:
    return item if isinstance(item, Weight) else item.weight


def _node_key(node: onnx.NodeProto) -> tuple:
    return (node.name, tuple(node.output))


@dataclass
class RefitChoice:
    """What the held-out comparison chose for one weight: ``damp`` (None: the weights are kept
    as they are), whether the bias takes the mean shift, and each candidate's held-out error
    less a constant (``(damp or None, shift) -> error``; lower is better). ``heldout`` is False
    when there was no held-out part (one calibration batch): ``damp`` is then the default."""

    damp: Optional[float]
    shift: bool
    errors: Dict[Tuple[Optional[float], bool], float] = field(default_factory=dict)
    heldout: bool = True

    @property
    def label(self) -> str:
        what = "kept as is" if self.damp is None else f"damp {self.damp:g}"
        return what + (" + bias shift" if self.shift else "")


def choose_refit(st: LayerStats, dense: np.ndarray, now: np.ndarray, cols: np.ndarray,
                 rows: np.ndarray, has_bias: bool, damps: Sequence[float] = REFIT_DAMPS
                 ) -> Optional[RefitChoice]:
    """The refit strength that carries best to calibration data it was not fit on.

    ``st.parts`` (:func:`collect_layer_stats` with ``split=True``) are a fit part and a held-out
    part. Each candidate — :func:`asymmetric_target` on the fit part with each of ``damps``, or
    the weights ``now`` as they are; with a bias, each with and without the mean shift (means
    of the fit part) — is scored by :func:`heldout_error` on the held-out part against the
    ``dense`` layer; the least error wins (ties to the weaker change: kept before refit, larger
    damp before smaller, no shift before shift). None when there is no held-out row.
    ``cols``: kept input columns; ``rows``: kept output rows (mask).
    """
    if not st.parts or len(st.parts) < 2 or min(p.count for p in st.parts) == 0:
        return None
    fit, held = st.parts[0], st.parts[1]
    h_held, c_held = fit_moments(held, centered=False)
    score = heldout_scorer(dense, h_held, c_held, held.group_sums, held.ref_sums,
                           max(held.group_rows, 1), kept=cols)
    order = sorted(damps, reverse=True)
    errors: Dict[Tuple[Optional[float], bool], float] = {}
    best = None
    for shift in ((False, True) if has_bias else (False,)):
        h_fit, c_fit = fit_moments(fit, centered=shift)
        fits = [now[:, cols]] + ridge_path(dense, h_fit, c_fit, order, kept=cols)
        for damp, fitted in zip([None] + order, fits):
            full = np.zeros_like(dense)
            full[:, cols] = fitted
            full[~rows] = 0.0
            delta = np.where(rows, mean_shift(fit, dense, full), 0.0) if shift else None
            errors[(damp, shift)] = score(full[:, cols], delta)
            if best is None or errors[(damp, shift)] < errors[best]:
                best = (damp, shift)
    return RefitChoice(best[0], best[1], errors)


def refit_toward_dense(handle: mio.ModelHandle, reference: mio.ModelHandle,
                       weights: Sequence[Weight], calibration: CalibrationSet,
                       notes: List[str], track=None, batch_size: int = 8, damp: float = 0.01,
                       bias_correction: bool = True, sample_rows: bool = True,
                       seed: int = 0, damps: Sequence[float] = REFIT_DAMPS,
                       choices: Optional[Dict[str, RefitChoice]] = None) -> List[str]:
    """Refit ``weights`` of ``handle``, wave by wave, after channels were masked (shapes kept,
    removed rows and columns zero): each layer's kept rows are fit on its kept input columns to
    reproduce the *dense* layer (in ``reference``) output from the inputs it now gets, and its
    bias moved to the dense mean (least squares on paired statistics,
    :func:`~onnxprune.calibration.reconstruct.asymmetric_target` with ``kept``). Grouped Convs,
    weights reached through views and weights whose Hessian would pass the budget
    (:mod:`onnxprune.calibration.hessian`; appended to ``notes``) are left as they are.
    Conv statistics are read from sampled rows (``sample_rows``, seeded by ``seed``,
    :func:`~onnxprune.calibration.statistics.row_cap`) in shifted float32 products.

    The refit strength is chosen per layer on held-out data (:func:`choose_refit`): the
    statistics are kept apart for the even- and the odd-numbered calibration batches (at least
    4 batches: the batch size shrinks for small sets), every candidate (each of ``damps``, or
    no refit; the bias shift or not) is fit on the even ones and judged on the odd ones, and the
    winner is refit on all of them — a layer whose every refit does worse on the held-out
    batches keeps its weights. With a single batch there is nothing held out: ``damp`` with
    the shift. The choice per weight goes to ``notes`` (and into ``choices`` when given).
    Returns the names whose weights or bias changed."""
    main = handle.model.graph.name or "main"
    weights = [w for w in weights if w.graph == main and not w.layout.view
               and w.layout.group == 1]
    for w in [w for w in weights if not fits_budget(w)]:
        notes.append(f"{w.name} not refit: {over_budget(w)}")
        weights.remove(w)
    dense_tensors = reference.index.stored
    waves, _ = sequential_waves(handle.model, weights)
    refit = []
    thin: List[tuple] = []  # (name, kept inputs, rows): too few rows to refit
    track = track or (lambda items, description, total: items)
    if calibration.fixed_batch is None and len(calibration) > 1:
        batch_size = max(1, min(batch_size, -(-len(calibration) // 4)))
    chosen: Dict[str, RefitChoice] = {} if choices is None else choices
    with segment_runners([handle, reference], calibration, batch_size) as runners:
        for wave in track(waves, "refitting layer by layer", len(waves)):
            stats = collect_layer_stats(handle, wave, calibration, want_hessian=True,
                                        batch_size=batch_size, reference=reference,
                                        runners=runners, precision="float32",
                                        sample_rows=sample_rows, seed=seed, split=True)
            for w in wave:
                st = stats.get(w.key)
                if st is None or w.name not in dense_tensors:
                    continue
                raw = handle.read(w.tensor)
                now = w.layout.to_2d(raw)
                rows, cols = now.any(axis=1), np.flatnonzero(now.any(axis=0))
                if not rows.any() or not cols.size:
                    continue
                if not enough_rows(cols.size, st.count):
                    thin.append((w.name, cols.size, st.count))
                    continue
                dense = w.values_2d(handle, reference.read(dense_tensors[w.name])
                                    ).astype(np.float64)
                bias = stored_bias(handle.index, w) if bias_correction else None
                current = w.values_2d(handle, raw).astype(np.float64)
                choice = choose_refit(st, dense, current, cols, rows, bias is not None, damps)
                if choice is None:
                    choice = RefitChoice(damp, bias is not None, heldout=False)
                chosen[w.name] = choice
                if choice.damp is not None:
                    h, cross = fit_moments(st, centered=choice.shift)
                    new = np.zeros_like(dense)
                    new[:, cols] = asymmetric_target(dense, h, cross, choice.damp, kept=cols)
                    new[~rows] = 0.0
                    handle.write(w.tensor, w.stored_from_2d(handle, new, raw.dtype))
                else:
                    new = np.zeros_like(dense)
                    new[:, cols] = current[:, cols]
                    new[~rows] = 0.0
                if choice.shift:
                    bias.shift(handle, np.where(rows, mean_shift(st, dense, new), 0.0))
                if choice.damp is not None or choice.shift:
                    refit.append(w.name)
    if chosen:
        notes.append(refit_note(chosen))
    if thin:
        worst = max(thin, key=lambda t: t[1] / max(t[2], 1))
        notes.append(f"{len(thin)} weight(s) not refit: fewer calibration rows than kept inputs "
                     f"(e.g. {worst[0]}: {worst[2]} rows for {worst[1]} inputs), so least "
                     "squares would fit those samples rather than the task; they keep their "
                     "values. Give more --calibration samples to refit them")
    return refit


def refit_note(chosen: Dict[str, RefitChoice]) -> str:
    """One report note: how many weights took each refit choice, and each weight's."""
    counts: Dict[str, int] = {}
    for c in chosen.values():
        counts[c.label] = counts.get(c.label, 0) + 1
    summary = ", ".join(f"{label}: {k}" for label, k in sorted(counts.items()))
    heldout = all(c.heldout for c in chosen.values())
    how = ("chosen per weight on held-out calibration batches (fit on the even-numbered, "
           "judged on the odd-numbered, then refit on all)" if heldout else
           "not chosen on held-out data for some weights (a single calibration batch)")
    per = ", ".join(f"{name} {c.label}" for name, c in chosen.items())
    return f"refit strength {how}: {summary}; per weight: {per}"


@contextmanager
def segment_runners(handles: Sequence[mio.ModelHandle], calibration: CalibrationSet,
                    batch_size: int):
    """One :class:`SegmentRunner` per model over the calibration data, closed afterwards (their
    ``runs`` and ``peak`` stay readable)."""
    runners = [SegmentRunner(h, calibration, batch_size) for h in handles]
    try:
        yield runners
    finally:
        for runner in runners:
            runner.close()


def enough_rows(inputs: int, rows: int) -> bool:
    """Whether ``rows`` rows of calibration activations can refit a layer on ``inputs`` kept
    inputs: at least one row per input. With fewer the least squares is underdetermined and fits
    the calibration samples instead of the task — measured: MiniLM channel 25 % + refit from 32
    sentences (320 rows for the FFN's 1152 kept inputs) moved those weights by 50-130 % of their
    norm and dropped paraphrase retrieval from 0.94 (no refit) to 0.22 (dense 0.95); dksplit's
    split accuracy fell from 0.915 to 0.825. Such layers keep their values."""
    return rows >= inputs


def fit_moments(st: LayerStats, centered: bool):
    """(Hessian, cross moment) per row group for a fit toward the reference layer; centered
    when the layer's bias takes the means. The cross moment is None without a reference."""
    h = st.group_hessians if st.group_hessians is not None else st.hessian[None]
    if not centered:
        return h, st.cross
    return (centered_cross(h, st.group_sums, st.group_sums, st.group_rows),
            centered_cross(st.cross, st.group_sums, st.ref_sums, st.group_rows))


def mean_shift(st: LayerStats, w_ref: np.ndarray, w_new: np.ndarray) -> np.ndarray:
    """What the bias takes so the layer's mean output is the reference's (per output row)."""
    rows = max(st.group_rows, 1)
    return asymmetric_bias(w_ref, w_new, st.group_sums / rows, st.ref_sums / rows)


def load_dense_reference(original: Union[Path, onnx.ModelProto], model: onnx.ModelProto
                         ) -> Optional[mio.ModelHandle]:
    """The untouched input model ``original``, to run beside ``model`` (the one being pruned);
    None when the graph changed since, so the two no longer line up."""
    if isinstance(original, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(original)
        ref = mio.load(copy)
    else:
        ref = mio.load(Path(original))
    now = {t.name: tuple(t.dims) for t in mio.iter_tensors(model.graph)}
    then = {t.name: tuple(t.dims) for t in mio.iter_tensors(ref.model.graph)}
    if now != then or len(model.graph.node) != len(ref.model.graph.node):
        return None
    return ref
