"""The Python entry points: :func:`prune` and :func:`inspect`.

``prune`` builds the usual pass list from its arguments, runs it, writes the output atomically
(when ``output`` is given) and returns a :class:`PruneResult` with the pruned ``ModelProto`` and
its :class:`~onnxprune.report.report.Report`. Every CLI option is an argument here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnx

from onnxprune.model import io as mio
from onnxprune.errors import OptionError, ValidationFailed
from onnxprune.passes.base import (DEFAULT_MEMORY_BUDGET, ApplyMasks, FindWeights, Pass, PruneState,
                     ScoreWeights, SelectWeights, Track, Validate, no_progress)
from onnxprune.passes.calibrated import AllocateBySensitivity, Calibrate, CorrectBias
from onnxprune.calibration.sequential import PruneSequentially
from onnxprune.calibration.statistics import ImagePreprocess
from onnxprune.masking.criteria import get_criterion
from onnxprune.masking.patterns import parse_pattern
from onnxprune.report.report import LayerRow, Report
from onnxprune.search import probe_runner, search_sparsity
from onnxprune.passes.structure import PruneChannels, RemoveDeadChannels


@dataclass
class PruneResult:
    """The pruned model, its report, and where it was written (None when not saved)."""

    model: onnx.ModelProto
    report: Report
    output: Optional[Path]
    state: PruneState


@dataclass
class PruneOptions:
    """Every option of a run; the CLI's flags map one to one onto these fields.

    Pattern and target: ``pattern`` is ``unstructured``/``1x1``, blocks ``NxM`` (``4x1`` = 4
    output channels × 1 input element), ``N:M`` (``2:4``) or ``channel``; ``sparsity`` the
    fraction of zeros in the selected weights counting zeros already there (default 0.5;
    implied by N:M; for ``channel`` the fraction of channels removed), or an int zero count.
    ``scope``: ``local`` (each weight reaches the target) or ``global`` (one threshold, each
    weight kept within ``min_sparsity``..``max_sparsity``).

    Criterion: ``magnitude``, ``l2``, ``random`` (seeded by ``seed``), ``scores`` (with
    ``scores={weight_name: array}``), ``wanda`` and ``sparsegpt`` (calibrated); ``masks=
    {weight_name: bool array}`` applies given keep-masks as they are.

    Selection: ``op_types``, ``include``/``exclude`` regexes on weight or node names, ``config``
    rules (a JSON/YAML file or an already-loaded list/dict). ``guard_fixed`` leaves alone
    constant operands that are not learned weights (ramps, DFT bases, identity matrices).

    Structure: ``resize`` (None = auto) removes channels physically — with ``channel`` the
    chosen ones (``round_to`` keeps counts at multiples, ``min_channels`` per group,
    ``max_group_sparsity`` caps groups under global scope), with other patterns those the masks
    leave dead (auto skips that for blocks and N:M, whose layout it would shift).

    Calibration: ``calibration`` (an .npz, a folder of .npy/.npz or images, a dict of arrays, or
    a CalibrationSet), ``calibration_samples``, ``image_preprocess``; ``refit`` refits the
    consumers of removed channels by least squares; ``allocate="sensitivity"`` spreads the
    target over layers by measured output error instead of uniformly (``"auto"``, the default,
    does so whenever calibration data is given for a pattern with a free sparsity, local scope
    and no search; ``"uniform"`` never); ``bias_correction``
    (on whenever calibration data is given) moves the mean that pruned weights carried into
    the layer's bias.

    Validation: onnx checker + onnxruntime, then original vs pruned outputs on ``inputs`` (an
    .npz path or dict) or inputs generated from the signature (``input_shapes`` fixes dynamic
    dims); ``max_error`` gates on the relative max error. ``search`` bisects for the highest
    sparsity (up to ``sparsity``, default 0.95) whose error stays within ``max_error``.
    ``memory_budget``: bytes of scores held across weights; past it scoring streams (two passes
    over the weights, memory bounded by the largest weight, for models of any size).
    """

    pattern: str = "unstructured"
    sparsity: Optional[Union[float, int]] = None
    criterion: str = "magnitude"
    scope: str = "local"
    op_types: Union[str, Sequence[str], None] = None
    include: Optional[str] = None
    exclude: Optional[str] = None
    config: Any = None
    min_sparsity: float = 0.0
    max_sparsity: float = 0.98
    scores: Optional[Dict[str, np.ndarray]] = None
    masks: Optional[Dict[str, np.ndarray]] = None
    guard_fixed: bool = True
    resize: Optional[bool] = None
    round_to: int = 1
    min_channels: int = 1
    max_group_sparsity: float = 0.9
    calibration: Any = None
    calibration_samples: int = 128
    image_preprocess: Optional[ImagePreprocess] = None
    refit: bool = False
    bias_correction: bool = True
    allocate: str = "auto"
    validate: bool = True
    compare: bool = True
    inputs: Any = None
    input_shapes: Optional[Dict[str, Sequence[int]]] = None
    max_error: Optional[float] = None
    search: bool = False
    seed: int = 0
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def __post_init__(self):
        if self.search and self.max_error is None:
            raise OptionError("--search looks for the highest sparsity within --max-error; "
                              "give --max-error")
        if self.scores and self.criterion == "magnitude":
            self.criterion = "scores"
        if self.criterion == "scores" and not self.scores:
            raise OptionError("criterion 'scores' needs scores={weight_name: array} (CLI: "
                              "--scores FILE.npz)")
        if self.allocate not in ("auto", "uniform", "sensitivity"):
            raise OptionError(f"allocate must be 'auto', 'uniform' or 'sensitivity', got "
                              f"'{self.allocate}'")
        if self.allocate == "sensitivity" and self.pattern == "channel":
            raise OptionError("--allocate sensitivity spreads a weight sparsity over layers; "
                              "channel pruning ranks channels per group (use --scope global to "
                              "let groups differ)")
        if self.refit and self.pattern != "channel":
            raise OptionError("--refit refits the consumers of removed channels; it needs "
                              "--pattern channel")
        crit = get_criterion(self.criterion)
        if crit.reconstructs and self.scope == "global":
            raise OptionError(f"criterion '{self.criterion}' prunes layer by layer; use "
                              "--scope local, or --allocate sensitivity to spread a target")

    @property
    def channel_removal(self) -> bool:
        return (self.pattern == "channel" and self.resize is not False and self.masks is None
                and self.config is None)

    @property
    def allocation(self) -> str:
        """The allocation this run uses: ``"auto"`` resolved. Sensitivity when real calibration
        data is given and the sparsity is free to spread (a free-sparsity pattern, local scope,
        no config rules, masks, scores or search), else uniform."""
        if self.allocate != "auto":
            return self.allocate
        free = self.pattern != "channel" and parse_pattern(self.pattern).implied_sparsity is None
        spread = (self.calibration is not None and free and self.scope == "local"
                  and not self.search and self.config is None and self.masks is None
                  and self.scores is None)
        return "sensitivity" if spread else "uniform"

    @property
    def sequential(self) -> bool:
        """Prune layer by layer on calibration data (:class:`PruneSequentially`): whenever
        calibration is used with local scope and masks the pipeline chooses itself."""
        return (self.needs_calibration and self.scope == "local" and self.pattern != "channel"
                and self.masks is None and self.scores is None)

    @property
    def needs_calibration(self) -> bool:
        return (get_criterion(self.criterion).needs_activations or self.refit
                or self.allocation == "sensitivity" or self.calibration is not None)

    def summary(self) -> dict:
        """The options worth showing in a report (what differs from nothing)."""
        keep = ("pattern", "sparsity", "criterion", "scope", "op_types", "include", "exclude",
                "min_sparsity", "max_sparsity", "resize", "seed", "max_error",
                "calibration_samples", "search")
        out = {k: getattr(self, k) for k in keep if getattr(self, k) is not None}
        out["allocate"] = self.allocation
        if self.pattern == "channel":
            out.update(round_to=self.round_to, min_channels=self.min_channels, refit=self.refit)
        if isinstance(self.calibration, (str, os.PathLike)):
            out["calibration"] = str(self.calibration)
        return out


def build_passes(options: PruneOptions) -> List[Pass]:
    """The pipeline for these options (what :func:`prune` runs)."""
    o = options
    passes: List[Pass] = [
        FindWeights(),
        SelectWeights(pattern=o.pattern, sparsity=o.sparsity, criterion=o.criterion,
                      op_types=o.op_types, include=o.include, exclude=o.exclude, config=o.config,
                      min_sparsity=o.min_sparsity, max_sparsity=o.max_sparsity),
    ]
    reconstructs = get_criterion(o.criterion).reconstructs
    if o.needs_calibration:
        # Layer by layer, statistics are collected per wave as pruning goes; up front only
        # what sensitivity allocation and channel refits measure on the dense model.
        # (a reconstructing criterion's sensitivity collects its Hessians in bounded chunks).
        # A channel refit collects its own, layer by layer, too.
        collect = not (o.sequential or o.channel_removal) or (
            o.allocation == "sensitivity" and not reconstructs)
        passes.append(Calibrate(o.calibration, o.calibration_samples, o.image_preprocess,
                                o.input_shapes, seed=o.seed, collect=collect))
    if o.allocation == "sensitivity":
        passes.append(AllocateBySensitivity())
    if o.channel_removal:
        passes.append(PruneChannels(sparsity=o.sparsity, criterion=o.criterion,
                                    round_to=o.round_to, min_channels=o.min_channels,
                                    scope=o.scope, max_group_sparsity=o.max_group_sparsity,
                                    input_shapes=o.input_shapes, refit=o.refit))
    else:
        if o.sequential:
            passes.append(PruneSequentially(bias_correction=o.bias_correction,
                                            guard_fixed=o.guard_fixed))
        else:
            passes += [ScoreWeights(user_scores=o.scores, guard_fixed=o.guard_fixed),
                       ApplyMasks(scope=o.scope, masks=o.masks)]
            if o.needs_calibration and o.bias_correction:
                passes.append(CorrectBias())
        if o.resize is not False:
            passes.append(RemoveDeadChannels(input_shapes=o.input_shapes,
                                             keep_layouts=o.resize is None))
    if o.validate:
        passes.append(Validate(inputs=o.inputs, input_shapes=o.input_shapes, compare=o.compare,
                               max_error=o.max_error, seed=o.seed))
    return passes


def prune(model: mio.ModelLike, pattern: str = "unstructured",
          sparsity: Optional[Union[float, int]] = None, criterion: str = "magnitude",
          scope: str = "local", *, output: Union[str, os.PathLike, None] = None,
          force: bool = False, track: Track = no_progress, **options) -> PruneResult:
    """Prune ``model`` (a path or ``onnx.ModelProto``, never modified) and return the result.

    The options are the fields of :class:`PruneOptions` (pattern, sparsity, criterion, scope,
    selection, structure, calibration, validation). ``output``: write the result there
    atomically (``force`` to overwrite an existing file); None keeps it in memory.
    ``track(items, description, total)`` wraps long loops (the CLI passes a progress bar).

    >>> result = prune("model.onnx", pattern="2:4", output="model.24.onnx")  # doctest: +SKIP
    >>> result.report.nonzeros_after / result.report.params_after            # doctest: +SKIP
    """
    try:
        opts = PruneOptions(pattern=pattern, sparsity=sparsity, criterion=criterion, scope=scope,
                            **options)
    except TypeError as exc:  # an unknown keyword: say which names exist
        raise OptionError(f"{exc}; options are {', '.join(f.name for f in fields(PruneOptions))}"
                          ) from None
    probes = None
    if opts.search:
        if output is not None:  # fail on a bad output path before minutes of probing
            mio.resolve_output(mio.load(model).path if not isinstance(
                model, onnx.ModelProto) else None, output, force)
        high = 0.95 if opts.sparsity is None else float(opts.sparsity)
        run = probe_runner(model, opts, lambda m, o: _run(m, o, None, False, no_progress))
        best, probes = search_sparsity(run, opts.max_error, high, track=track)
        # the final run prunes exactly as the probes did (auto allocation resolved under search)
        opts = replace(opts, sparsity=best, search=False, allocate=opts.allocation)
    result = _run(model, opts, output, force, track)
    if probes is not None:
        result.report.sections["sparsity search (relative max error per probe)"] = probes
        result.report.notes.append(f"search: highest sparsity within --max-error "
                                   f"{opts.max_error:g} is {opts.sparsity:.4f}")
    return result


def _run(model: mio.ModelLike, opts: PruneOptions, output, force: bool, track: Track
         ) -> PruneResult:
    """One pipeline run with fixed options: load, passes, save, report."""
    state = PruneState.from_model(model, seed=opts.seed, track=track,
                                  memory_budget=opts.memory_budget)
    out = None
    if output is not None:
        out = mio.resolve_output(state.handle.path, output, force,
                                 external=mio.needs_external(state.handle))
    size_before = state.handle.file_size()
    macs_before = _macs(state.model, opts.input_shapes, None)
    for p in build_passes(opts):
        p(state)
    size_after = None
    if out is not None and state.gate_failure is None:
        mio.save(state.handle, out)
        size_after = mio.size_on_disk(out, state.model)
    report = build_report(state, opts.summary(), out, size_before, size_after, macs_before,
                          opts.input_shapes)
    if state.gate_failure is not None:
        error = ValidationFailed(state.gate_failure + " (nothing written)")
        error.report = report
        raise error
    return PruneResult(state.model, report, out, state)


def _macs(model: onnx.ModelProto, input_shapes, densities):
    from onnxprune.ops.macs import count_macs

    try:
        return count_macs(model, input_shapes, densities)
    except Exception as exc:  # MACs are informative; a shape-inference gap must not stop a run
        return exc


def build_report(state: PruneState, options: dict, output: Optional[Path],
                 size_before: Optional[int], size_after: Optional[int], macs_before,
                 input_shapes) -> Report:
    """The report of a finished pipeline, from the state and the records of its passes."""
    rows = []
    densities: Dict[str, float] = {}
    for w in state.weights:
        layer = state.layers.get(w.key)
        if layer is None:
            continue
        after = layer.shape_after or layer.shape
        params_after = int(np.prod(after, dtype=np.int64))
        rows.append(LayerRow(name=w.name, op_type=w.op_type, shape=layer.shape,
                             shape_after=after, params=layer.numel, params_after=params_after,
                             nonzeros_before=layer.nonzeros_before,
                             nonzeros_after=layer.nonzeros_after, pattern=layer.pattern,
                             criterion=layer.criterion, channels=layer.channels))
        for c in w.consumers:
            densities[c.node_name] = layer.nonzeros_after / max(1, params_after)
    macs_after = _macs(state.model, input_shapes, densities)
    notes = list(state.notes)
    for label, m in (("before", macs_before), ("after", macs_after)):
        if isinstance(m, Exception):
            notes.append(f"MACs {label} not counted: {m}")
    ok_before = None if isinstance(macs_before, Exception) else macs_before
    ok_after = None if isinstance(macs_after, Exception) else macs_after
    return Report(
        model=str(state.original) if isinstance(state.original, Path) else "<in-memory model>",
        output=str(output) if output else None,
        rows=rows,
        skipped=[(s.name, s.reason) for s in state.skipped],
        frozen=list(state.frozen),
        macs_before=ok_before.total if ok_before else None,
        macs_after=ok_after.total if ok_after else None,
        sparse_macs_after=ok_after.sparse_total if ok_after else None,
        params_before=sum(r.params for r in rows),
        params_after=sum(r.params_after for r in rows),
        nonzeros_before=sum(r.nonzeros_before for r in rows),
        nonzeros_after=sum(r.nonzeros_after for r in rows),
        file_size_before=size_before,
        file_size_after=size_after,
        comparison=state.comparison,
        options={k: v for k, v in options.items() if v is not None},
        notes=notes,
        timings={r.name: r.seconds for r in state.records},
        sections=_sections(state),
    )


def _sections(state: PruneState) -> Dict[str, List[dict]]:
    """Extra report tables: the sensitivity table when one was measured."""
    table = state.sensitivity
    if table is None:
        return {}
    rows = []
    for key, errors in table.errors.items():
        row = {"weight": key, "params": table.numel.get(key)}
        row.update({f"err@{s:g}": float(e) for s, e in zip(table.sparsities, errors)})
        if key in state.layers:
            layer = state.layers[key]
            row["sparsity"] = round(1 - layer.nonzeros_after / max(1, layer.numel), 4)
        rows.append(row)
    return {f"sensitivity ({table.metric}, {table.samples} samples)": rows}


def inspect(model: mio.ModelLike, input_shapes: Optional[Dict[str, Sequence[int]]] = None
            ) -> Report:
    """Sparsity, params and MACs of ``model`` per prunable weight, without changing it."""
    from onnxprune.report.inspect import inspect_model

    return inspect_model(model, input_shapes)
