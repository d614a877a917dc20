"""Passes that use calibration data: loading it, bias correction, sensitivity.

A few hundred real inputs run through onnxruntime keep far more accuracy than data-free
magnitude pruning. :class:`Calibrate` loads them (or generates inputs, and says the run was
data-free in effect) and collects per-layer input statistics on the dense model;
:class:`AllocateBySensitivity` measures each layer's output error at several sparsities and
spreads a global target where it hurts least; :class:`CorrectBias` moves the mean pruned weights
carried into biases for global-scope runs. Layer-by-layer pruning (Wanda, SparseGPT) and the
channel refit live in :mod:`onnxprune.passes.sequential` (algorithms in
:mod:`onnxprune.calibration.sequential`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.model import io as mio
from onnxprune.calibration.statistics import collect_layer_stats, rows_note
from onnxprune.calibration.hessian import fits_budget, hessian_chunks
from onnxprune.inputs.dataset import CalibrationSet, generated_calibration, load_calibration
from onnxprune.runtime.session import fit_batch
from onnxprune.inputs.images import ImagePreprocess
from onnxprune.calibration.sensitivity import (SensitivityTable, allocate, layer_sensitivity,
                                               statistics_subset)
from onnxprune.errors import OptionError
from onnxprune.masking.criteria import get_criterion
from onnxprune.passes.base import Pass, PassRecord, PruneState
from onnxprune.ops.weights import find_weights, stored_bias

CalibrationSource = Union[str, "os.PathLike", Mapping[str, np.ndarray], CalibrationSet, None]


@dataclass
class CalibrateRecord(PassRecord):
    """Samples loaded (``data_free``: generated from the signature), the weights that got
    statistics, the model runs and peak bytes it took, and the weights left without (why)."""

    samples: int = 0
    data_free: bool = False
    with_stats: int = 0
    model_runs: int = 0
    peak_bytes: int = 0
    no_stats: Dict[str, str] = field(default_factory=dict)
    phase_seconds: Dict[str, float] = field(default_factory=dict)  # "statistics"
    rows: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # key -> (used, there were)


@dataclass
class BiasRecord(PassRecord):
    """The weight names whose bias absorbed the mean their pruned weights carried."""

    corrected: List[str] = field(default_factory=list)


@dataclass
class SensitivityRecord(PassRecord):
    """The measured table, the overall target, and the sparsity given to each weight key."""

    table: Optional[SensitivityTable] = None
    target: float = 0.0
    allocation: Dict[str, float] = field(default_factory=dict)
    # seconds: "statistics" (Hessians on the dense model), "solve" (trial masks), "trials"
    phase_seconds: Dict[str, float] = field(default_factory=dict)
    rows: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # key -> (used, there were)


def distinct_samples(data: CalibrationSet, limit: int, batch_size: int
                     ) -> Tuple[CalibrationSet, int]:
    """``data`` without the samples that repeat an earlier one exactly (every input the same),
    read a batch at a time until ``limit`` distinct ones are found (the rest, not read, as it
    is), and how many went."""
    if data.data_free or len(data) < 2:
        return data, 0
    seen, keep, index = set(), [], 0
    for batch in data.batches(batch_size):
        rows = {k: v for k, v in batch.items() if np.ndim(v)}  # scalars: one value for all
        if not rows or len(keep) >= limit:
            break
        for i in range(len(next(iter(rows.values())))):
            key = hashlib.sha1()
            for name in sorted(rows):
                row = np.ascontiguousarray(rows[name][i])
                key.update(name.encode() + str(row.dtype).encode() + str(row.shape).encode())
                key.update(row.tobytes())
            digest = key.digest()
            if digest not in seen:
                seen.add(digest)
                keep.append(index)
            index += 1
    keep += range(index, len(data))  # not read: past the limit, or a fixed batch's remainder
    dropped = len(data) - len(keep)
    return (data if not dropped else data.pick(keep)), dropped


def _progress(state: PruneState, description: str, total: int):
    """A ``progress(done, total)`` callback driving the state's tracker (rich bar in the CLI)."""
    ticks = iter(state.track(range(total), description, total))

    def step(done: int, _total: int) -> None:
        next(ticks, None)

    return step


class Calibrate(Pass):
    """Load calibration inputs and collect input statistics of the weights on the dense model.

    ``source``: an .npz (one array per input, first axis = samples), a folder of .npy/.npz
    files or of images (with ``image_preprocess``), a dict of arrays, or a
    :class:`~onnxprune.inputs.dataset.CalibrationSet`. None generates ``min(samples, 32)`` inputs
    from the model's signature: the run still works, but the statistics say nothing about real
    data, and the notes say so. ``hessian`` also accumulates ``XᵀX`` (SparseGPT, refit);
    ``targets`` "selected" collects for the selected weights, "all" for every weight (refit
    needs the consumers of removed channels, whatever the selection).
    """

    name = "calibrate"

    def __init__(self, source: CalibrationSource = None, samples: int = 128,
                 image_preprocess: Optional[ImagePreprocess] = None,
                 input_shapes: Optional[Dict[str, Sequence[int]]] = None, hessian: bool = False,
                 targets: str = "selected", batch_size: int = 8, seed: int = 0,
                 collect: bool = True, hold_out: int = 0):
        if samples < 1:
            raise OptionError(f"--calibration-samples must be at least 1, got {samples}")
        self.source, self.samples, self.pre = source, samples, image_preprocess
        self.input_shapes, self.hessian, self.targets = input_shapes, hessian, targets
        self.batch_size, self.seed, self.collect = batch_size, seed, collect
        self.hold_out = hold_out
        self.batch_note: Optional[str] = None  # set by load(): the model runs only at batch 1
        self.duplicates = 0  # set by load(): samples dropped as repeats of earlier ones
        self.requires = frozenset({"selection" if targets == "selected" else "weights"})
        self.ensures = frozenset({"calibration", "statistics"} if collect else {"calibration"})

    def load(self, state: PruneState) -> CalibrationSet:
        """The calibration samples; with ``hold_out``, the samples after them (up to
        ``hold_out``, at most half the source) go to ``state.validation``, never into the
        statistics."""
        if self.source is None:
            return generated_calibration(state.model, min(self.samples, 32), self.seed,
                                         self.input_shapes)
        if isinstance(self.source, CalibrationSet):
            data = self.source
        elif isinstance(self.source, Mapping):
            data = CalibrationSet.from_arrays(state.model, self.source)
        else:
            data = load_calibration(self.source, state.handle, None, self.pre)
        data = data.slice(0, len(data))  # a copy: fit_batch may limit its batch size
        self.batch_note = fit_batch(state.handle, data, self.batch_size)
        data, self.duplicates = distinct_samples(data, self.samples + self.hold_out,
                                                 self.batch_size)
        total = len(data)
        held = min(self.hold_out, total // 2)
        used = min(self.samples, total - held)
        if held:
            state.validation = data.slice(used, used + held)
        return data if used == total else data.take(used)

    def run(self, state):
        data = self.load(state)
        state.calibration = data
        record = CalibrateRecord(samples=len(data), data_free=data.data_free)
        if state.validation is not None:
            record.notes.append(f"{len(state.validation)} calibration samples held out for "
                                f"validation (not used for statistics)")
        if self.batch_note:
            record.notes.append(self.batch_note)
        if self.duplicates:
            record.notes.append(
                f"{self.duplicates} calibration samples dropped as repeats of earlier ones: a "
                "repeat weighs its sample twice in the statistics, and held out it would "
                "validate on what was fit; the others are used once each")
        if data.data_free:
            record.notes.append("no calibration data given: statistics come from generated "
                                "inputs, so the calibrated criterion was data-free in effect")
        if not self.collect:
            record.summary = f"{len(data)} calibration samples ({data!r})"
            return record
        weights = ([p.weight for p in state.plans] if self.targets == "selected"
                   else list(state.weights))
        stats = collect_layer_stats(state.handle, weights, data, want_hessian=self.hessian,
                                    batch_size=self.batch_size,
                                    progress=_progress(state, "calibrating",
                                                       data.num_batches(self.batch_size)),
                                    precision="float32" if self.hessian else "float64",
                                    sample_rows=self.hessian, seed=self.seed)
        state.layer_stats.update(stats)
        collected = stats.record
        for key, reason in collected.skipped.items():
            record.notes.append(f"no statistics for {key}: {reason}")
        record.no_stats = dict(collected.skipped)
        record.with_stats, record.model_runs = len(stats), collected.model_runs
        record.peak_bytes = collected.peak_bytes
        record.phase_seconds = {"statistics": collected.seconds}
        record.rows = dict(collected.rows)
        note = rows_note(collected.rows, "calibration")
        if note:
            record.notes.append(note)
        record.summary = (f"{len(data)} samples, statistics for {len(stats)} weights in "
                          f"{collected.model_runs} runs, peak "
                          f"{collected.peak_bytes / 2**20:.0f} MiB"
                          + (" (generated inputs)" if data.data_free else ""))
        return record


class CorrectBias(Pass):
    """Move what pruning takes from a layer's mean output into its bias.

    Zeroing weights removes ``(W_old - W_new) x`` from ``y = W x + b``; on average over the
    calibration data that is ``(W_old - W_new) E[x]``, which the bias absorbs exactly. Inputs
    with large means (after BN shifts, HardSwish, ReLU) make this the difference between a
    working and a broken model at 50 %. Applies to Conv (group 1), Gemm and ``X @ W`` MatMul
    weights whose bias is stored (Conv/Gemm input C, or an ``Add`` of a ``[out]`` constant right
    after a MatMul); other layers are left as they are.
    """

    name = "bias-correction"
    requires = frozenset({"masks", "statistics"})

    def run(self, state):
        if not state.layer_stats:
            return BiasRecord(summary="no calibration statistics: nothing to correct")
        original = mio.load(state.original if isinstance(state.original, onnx.ModelProto)
                            else Path(state.original))
        before = {w.key: w for w in find_weights(original)[0]}
        corrected = []
        for plan in state.plans:
            w = plan.weight
            stats = state.layer_stats.get(w.key)
            bias = stored_bias(state.handle.index, w)
            old = before.get(w.key)
            if stats is None or bias is None or old is None or w.layout.group != 1 \
                    or old.shape != w.shape:
                continue
            w_old = old.layout.to_2d(original.read(old.tensor)).astype(np.float64)
            w_new = w.layout.to_2d(state.handle.read(w.tensor)).astype(np.float64)
            bias.shift(state.handle, (w_old - w_new) @ stats.in_mean)
            corrected.append(w.name)
        summary = f"biases of {len(corrected)} layers absorb the mean their pruned weights carried"
        return BiasRecord(summary=summary, modified=bool(corrected),
                          notes=[summary] if corrected else [], corrected=corrected)


class AllocateBySensitivity(Pass):
    """Measure each selected weight's effect on the model output at several sparsities (on the
    calibration data), then give each weight the sparsity that reaches the overall target with
    the least total error, instead of one uniform value. The table goes into the report."""

    name = "sensitivity"
    requires = frozenset({"selection", "calibration"})
    ensures = frozenset({"sensitivity"})

    def __init__(self, sparsities: Sequence[float] = (0.3, 0.5, 0.7, 0.9), samples: int = 16):
        self.sparsities, self.samples = tuple(sparsities), samples

    def run(self, state):
        plans = [p for p in state.plans if p.pattern.implied_sparsity is None]
        if not plans:
            return SensitivityRecord(summary="nothing to allocate (N:M sparsity is fixed)")
        specs = {p.pattern.spec for p in plans}
        phases: Dict[str, float] = {"statistics": 0.0}
        rows: Dict[str, Tuple[int, int]] = {}
        table = self._measure(state, plans, phases, rows)
        # A weight whose input could not be collected (an LSTM's R reads the hidden state, no
        # graph tensor) has no measure for an activation-based criterion: it keeps its sparsity.
        plans = [p for p in plans if p.weight.key in table.numel]
        counts = {p.weight.key: p.weight.numel for p in plans}
        total = sum(counts.values())
        target = sum(p.sparsity * p.weight.numel for p in plans) / total
        levels = allocate(table, target, counts, min(p.min_sparsity for p in plans),
                          max(p.max_sparsity for p in plans))
        for p in plans:
            if p.weight.key in levels:
                p.sparsity = float(levels[p.weight.key])
        state.sensitivity = table
        record = SensitivityRecord(
            summary=(f"per-layer sparsities allocated for an overall {target:.3f} from "
                     f"{len(self.sparsities)} measured levels"),
            table=table, target=target, allocation={k: float(v) for k, v in levels.items()},
            phase_seconds={**phases, "solve": table.solve_seconds, "trials": table.trial_seconds},
            rows=rows)
        note = rows_note(rows, "sensitivity")
        if note:
            record.notes.append(note)
        record.notes.append("sensitivity: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in record.phase_seconds.items()))
        if table.samples < min(self.samples, len(state.calibration)):
            record.notes.append(f"sensitivity trials on {table.samples} calibration samples "
                                f"drawn at random (seeded; large inputs)")
        if len(specs) > 1:
            record.notes.append("sensitivity measured with the first selected weight's pattern "
                                f"({plans[0].pattern.spec}) for all")
        for key, reason in table.fragile().items():
            record.notes.append(f"sensitive layer {key}: {reason}")
        return record

    def _measure(self, state: PruneState, plans, phases: Dict[str, float],
                 rows: Dict[str, Tuple[int, int]]) -> SensitivityTable:
        """The sensitivity table of ``plans`` with their (first plan's) criterion. A
        reconstructing criterion prunes each trial layer with its Hessian: those are collected
        here, for as many weights at a time as fit in the Hessian budget
        (:mod:`onnxprune.calibration.hessian`)."""
        criterion = plans[0].criterion
        progress = _progress(state, "sensitivity", len(plans) * len(self.sparsities))
        weights = [p.weight for p in plans]
        held = state.layer_stats
        collect = get_criterion(criterion).reconstructs and not all(
            held.get(w.key) is not None and held[w.key].hessian is not None for w in weights)
        jobs = [(criterion, weights, False)]  # (criterion, weights, collect their stats)
        if collect:
            fits = [w for w in weights if fits_budget(w)]
            big = [w for w in weights if not fits_budget(w)]
            jobs = [(criterion, chunk, True) for chunk in hessian_chunks(fits) if chunk]
            if big:  # too large for a Hessian: measured (and later pruned) with wanda scores
                jobs.append(("wanda", big, True))
        table = None
        # large inputs: the trial Hessians from fewer samples (sensitivity.statistics_subset)
        sample = statistics_subset(state.calibration) if collect else state.calibration
        for crit, chunk, fresh in jobs:
            stats = collect_layer_stats(state.handle, chunk, sample,
                                        want_hessian=crit == criterion, precision="float32",
                                        sample_rows=True, seed=state.seed) if fresh else held
            if fresh:
                phases["statistics"] += stats.record.seconds
                rows.update(stats.record.rows)
            if get_criterion(crit).needs_activations:
                chunk = [w for w in chunk if stats.get(w.key) is not None]
            part = layer_sensitivity(state.handle, chunk, state.calibration, plans[0].pattern,
                                     self.sparsities, crit, samples=self.samples,
                                     seed=state.seed, stats=stats or None, progress=progress)
            table = part if table is None else table.merge(part)
            del stats
        return table

