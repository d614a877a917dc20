"""The Python entry points: :func:`prune` and :func:`inspect`.

``prune`` builds the usual pass list from its arguments, runs it, writes the output atomically
(when ``output`` is given) and returns a :class:`PruneResult` with the pruned ``ModelProto`` and
its :class:`~onnxprune.report.report.Report`. Every CLI option is an argument here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import onnx

from onnxprune.errors import OptionError, ValidationFailed
from onnxprune.masking.criteria import get_criterion
from onnxprune.model import io as mio
from onnxprune.options import PruneOptions
from onnxprune.passes.base import Pass, Pipeline, PruneState, Track, no_progress
from onnxprune.passes.calibrated import AllocateBySensitivity, Calibrate, CorrectBias
from onnxprune.passes.masking import ApplyMasks, ScoreWeights
from onnxprune.passes.sequential import PruneSequentially
from onnxprune.passes.structure import PruneChannels, RemoveDeadChannels
from onnxprune.passes.validate import Validate
from onnxprune.passes.weights import FindWeights, SelectWeights
from onnxprune.report.build import build_report, count_macs_or_error
from onnxprune.report.report import Report
from onnxprune.search import probe_runner, search_sparsity


@dataclass
class PruneResult:
    """The pruned model, its report, and where it was written (None when not saved)."""

    model: onnx.ModelProto
    report: Report
    output: Optional[Path]
    state: PruneState


def build_passes(options: PruneOptions) -> Pipeline:
    """The pipeline for these options (what :func:`prune` runs), checked as it is built: a pass
    whose prerequisite no earlier pass ensures is a :class:`~onnxprune.passes.base.PipelineError`."""
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
        passes.append(Validate(inputs=o.inputs, input_shapes=o.input_shapes,
                               max_error=o.max_error, seed=o.seed))
    return Pipeline(passes)


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
            handle = mio.load(model)
            mio.resolve_output(handle.path, output, force, reads=mio.input_files(handle))
        high = 0.95 if opts.sparsity is None else float(opts.sparsity)
        run = probe_runner(model, opts, lambda m, o: _run(m, o, None, False, no_progress))
        best, probes = search_sparsity(run, opts.max_error, high, track=track)
        # the final run prunes exactly as the probes did (auto allocation resolved under search)
        opts = replace(opts, sparsity=best, search=False, allocate=opts.allocation)
    result = _run(model, opts, output, force, track)
    result.report.flag_noop()
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
                                 external=mio.needs_external(state.handle),
                                 reads=mio.input_files(state.handle))
    size_before = state.handle.file_size()
    pipeline = build_passes(opts)
    macs_before = count_macs_or_error(state.model, opts.input_shapes, None)
    pipeline.run(state)
    size_after = None
    if out is not None and state.gate_failure is None:
        mio.save(state.handle, out, force=force)
        size_after = mio.size_on_disk(out, state.model)
    report = build_report(state, opts.summary(), out, size_before, size_after, macs_before,
                          opts.input_shapes)
    if state.gate_failure is not None:
        error = ValidationFailed(state.gate_failure + " (nothing written)")
        error.report = report
        raise error
    return PruneResult(state.model, report, out, state)


def inspect(model: mio.ModelLike, input_shapes: Optional[Dict[str, Sequence[int]]] = None
            ) -> Report:
    """Sparsity, params and MACs of ``model`` per prunable weight, without changing it."""
    from onnxprune.report.inspect import inspect_model

    return inspect_model(model, input_shapes)
