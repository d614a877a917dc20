"""The Python entry points: :func:`prune` and :func:`inspect`.

``prune`` builds the usual pass list from its arguments, runs it, writes the output atomically
(when ``output`` is given) and returns a :class:`PruneResult` with the pruned ``ModelProto`` and
its :class:`~onnxprune.report.report.Report`. Every CLI option is an argument here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import onnx

from onnxprune.errors import OptionError, ValidationFailed
from onnxprune.inputs.signature import bind_input_shapes
from onnxprune.masking.criteria import get_criterion
from onnxprune.model import io as mio
from onnxprune.options import PruneOptions
from onnxprune.passes.base import Pass, Pipeline, PruneState, Track, no_progress, verify_layers
from onnxprune.passes.calibrated import AllocateBySensitivity, Calibrate, CorrectBias
from onnxprune.passes.fold import FoldScalars
from onnxprune.passes.masking import ApplyMasks, ScoreWeights
from onnxprune.passes.metric import EvaluateMetric
from onnxprune.passes.permute import PermuteChannels
from onnxprune.passes.sequential import PruneSequentially
from onnxprune.passes.structure import PruneChannels, RemoveDeadChannels
from onnxprune.passes.target import SkipCostlySparse
from onnxprune.passes.validate import Validate
from onnxprune.passes.weights import FindWeights, SelectWeights
from onnxprune.model.output import check_output
from onnxprune.model.sparse import StorageDecision, rows as storage_rows, summary as storage_summary
from onnxprune.plan import RecordPlan, plan_of, predicted_latency, summary_rows, write_plan
from onnxprune.report.build import build_report, count_macs_or_error
from onnxprune.report.report import Report
from onnxprune.runtime.session import session_threads
from onnxprune.search import criteria_text, probe_runner, search_sparsity


@dataclass
class PruneResult:
    """The pruned model, its report, and where it was written (None when not saved)."""

    model: onnx.ModelProto
    report: Report
    output: Optional[Path]
    state: PruneState
    #: models pruned together (``with_models``): each pruned model, in the order given (the
    #: first is ``model`` cut out of the joined one), and where each was written
    parts: List[onnx.ModelProto] = field(default_factory=list)
    outputs: List[Path] = field(default_factory=list)


def build_passes(options: PruneOptions) -> Pipeline:
    """The pipeline for these options (what :func:`prune` runs), checked as it is built: a pass
    whose prerequisite no earlier pass ensures is a :class:`~onnxprune.passes.base.PipelineError`."""
    o = options
    passes: List[Pass] = [
        FindWeights(),
        SelectWeights(pattern=o.pattern, sparsity=o.sparsity, criterion=o.criterion,
                      op_types=o.op_types, include=o.include, exclude=o.exclude, config=o.config,
                      min_sparsity=o.min_sparsity, max_sparsity=o.max_sparsity,
                      target=o.target),
    ]
    reconstructs = get_criterion(o.criterion).reconstructs
    if o.needs_calibration:
        # Layer by layer, statistics are collected per wave as pruning goes; up front only
        # what sensitivity allocation and channel refits measure on the dense model.
        # (a reconstructing criterion's sensitivity collects its Hessians in bounded chunks).
        # A channel refit collects its own, layer by layer, too.
        collect = not (o.sequential or o.channel_removal) or (
            o.allocation == "sensitivity" and not reconstructs) or (
            o.channel_removal and o.criterion == "wanda")  # heads/channels by |W| * ||X||
        # Real calibration data and nothing else to validate on: hold some out for validation.
        hold_out = o.validation_samples if (o.validate and o.inputs is None) else 0
        passes.append(Calibrate(o.calibration, o.calibration_samples, o.image_preprocess,
                                o.input_shapes, seed=o.seed, collect=collect,
                                hold_out=hold_out))
    if o.target == "tensorrt" and o.calibration is not None and o.sparse_error_ratio:
        passes.append(SkipCostlySparse(o.sparse_error_ratio, input_shapes=o.input_shapes))
    if o.allocation == "sensitivity":
        passes.append(AllocateBySensitivity())
    if o.permute and not o.channel_removal:  # before any N:M mask is chosen
        passes.append(PermuteChannels(input_shapes=o.input_shapes))
    if o.channel_removal:
        passes.append(PruneChannels(sparsity=o.sparsity, criterion=o.criterion,
                                    round_to=o.round_to, min_channels=o.min_channels,
                                    scope=o.scope, max_group_sparsity=o.max_group_sparsity,
                                    input_shapes=o.input_shapes, refit=o.refit,
                                    target_macs=o.target_macs, target_speedup=o.target_speedup,
                                    threads=o.threads, bn_reestimate=o.bn_reestimate,
                                    channel_criterion=o.channel_criterion, depth=o.depth,
                                    damage=o.damage, metric=o.eval_script,
                                    damage_stages=o.damage_stages,
                                    prune_stream=o.prune_stream))
        if o.save_plan is not None or o.dry_run:
            passes.append(RecordPlan(o.input_shapes))
    else:
        if o.sequential:
            passes.append(PruneSequentially(bias_correction=o.bias_correction,
                                            guard_fixed=o.guard_fixed))
        else:
            passes += [ScoreWeights(user_scores=o.scores, guard_fixed=o.guard_fixed),
                       ApplyMasks(scope=o.scope, masks=o.masks)]
            if o.needs_calibration and o.bias_correction:
                passes.append(CorrectBias())
        if o.save_plan is not None or o.dry_run:  # the masks, before dead channels go
            passes.append(RecordPlan(o.input_shapes))
        if o.resize is not False:
            passes.append(RemoveDeadChannels(input_shapes=o.input_shapes,
                                             keep_layouts=o.resize is None))
    if o.fold_scalars:  # exact graph folds, after pruning, before validation
        passes.append(FoldScalars())
    if o.validate:
        passes.append(Validate(inputs=o.inputs, input_shapes=o.input_shapes,
                               max_error=o.max_error, min_agreement=o.min_agreement,
                               thresholds=o.verdict, seed=o.seed,
                               image_preprocess=o.image_preprocess))
    if o.eval_script is not None:
        passes.append(EvaluateMetric(o.eval_script, o.min_metric, o.max_metric_drop))
    return Pipeline(passes)


def prune(model: mio.ModelLike, pattern: str = "unstructured",
          sparsity: Optional[Union[float, int]] = None, criterion: str = "magnitude",
          scope: str = "local", *, output: Union[str, os.PathLike, None] = None,
          force: bool = False, track: Track = no_progress,
          evaluate: Optional[Callable[[Any], float]] = None, **options) -> PruneResult:
    """Prune ``model`` (a path or ``onnx.ModelProto``, never modified) and return the result.

    The options are the fields of :class:`PruneOptions` (pattern, sparsity, criterion, scope,
    selection, structure, calibration, validation). ``output``: write the result there
    atomically (``force`` to overwrite an existing file); None keeps it in memory.
    ``track(items, description, total)`` wraps long loops (the CLI passes a progress bar).
    ``evaluate``: your own metric, ``evaluate(session) -> float`` on an
    ``onnxruntime.InferenceSession`` of a model (higher is better; it loads its own data); the
    same as ``eval_script=``, which also takes ``"file.py:function"``. It is measured on the
    dense model first, then on the pruned one (``report.metric``); ``min_metric`` and
    ``max_metric_drop`` gate on it, and ``search`` can bisect for them.

    >>> result = prune("model.onnx", pattern="2:4", output="model.24.onnx")  # doctest: +SKIP
    >>> result.report.nonzeros_after / result.report.params_after            # doctest: +SKIP
    """
    if evaluate is not None:
        if options.get("eval_script") is not None:
            raise OptionError("give evaluate= or eval_script=, not both (they are one option)")
        options["eval_script"] = evaluate
    try:
        opts = PruneOptions(pattern=pattern, sparsity=sparsity, criterion=criterion, scope=scope,
                            **options)
    except TypeError as exc:  # an unknown keyword: say which names exist
        raise OptionError(f"{exc}; options are {', '.join(f.name for f in fields(PruneOptions))}"
                          ) from None
    if opts.with_models:
        from onnxprune.joint import prune_joint

        return prune_joint(model, opts, output, force, track, _prune)
    return _prune(model, opts, output, force, track)


def _prune(model: mio.ModelLike, opts: PruneOptions, output, force: bool, track: Track
           ) -> PruneResult:
    """:func:`prune` with its options built."""
    if opts.dry_run:  # --dry-run: everything but writing the model
        output = None
    if (opts.search or opts.eval_script is not None) and output is not None:
        # fail on a bad output path before the user's metric and minutes of probing
        handle = mio.load(model)
        mio.resolve_output(handle.path, output, force, reads=mio.input_files(handle))
    if opts.eval_script is not None:
        _measure_dense(model, opts.eval_script)
    probes = None
    if opts.search:
        high = 0.95 if opts.sparsity is None else float(opts.sparsity)
        run = probe_runner(model, opts, lambda m, o: _run(  # probes write no plan
            m, replace(o, save_plan=None, dry_run=False), None, False, no_progress))
        best, probes = search_sparsity(run, high, track=track)
        # the final run prunes exactly as the probes did (auto allocation resolved under search)
        opts = replace(opts, sparsity=best, search=False, allocate=opts.allocation)
    result = _run(model, opts, output, force, track)
    result.report.flag_noop()
    if probes is not None:
        result.report.options["search"] = True  # the final run repeats the best probe
        names = {"metric": "metric", "rel_error": "relative max error",
                 "agreement": "top-1 agreement"}
        measured = ", ".join(names.get(k, k) for k in probes[0] if k in names)
        result.report.sections[f"sparsity search ({measured} per probe)"] = probes
        result.report.notes.append(f"search: highest sparsity with {criteria_text(opts)} is "
                                   f"{opts.sparsity:.4f}")
    return result


def _measure_dense(model: mio.ModelLike, metric) -> None:
    """The user's metric of the dense model, measured once before any pruning (a broken script
    fails here, at once); the probes and the final run compare with it."""
    source = model if isinstance(model, onnx.ModelProto) else mio.load(model)
    metric.dense = metric.measure(source, "dense")


def _run(model: mio.ModelLike, opts: PruneOptions, output, force: bool, track: Track
         ) -> PruneResult:
    """One pruning with fixed options: load, passes, save, report. ``--allocate auto`` that
    would spread sparsity by sensitivity prunes twice and keeps what wins on validation."""
    if opts.allocate == "auto" and opts.allocation == "sensitivity":
        return _auto_allocation(model, opts, output, force, track)
    return _finish(_execute(model, opts, output, force, track), output, force)


@dataclass
class _Run:
    """A finished pipeline before anything is written: its state and what the report needs."""

    state: PruneState
    opts: PruneOptions
    out: Optional[Path]
    size_before: Optional[int]
    macs_before: object
    seconds: float = 0.0


def _execute(model: mio.ModelLike, opts: PruneOptions, output, force: bool, track: Track,
             shared: Optional[PruneState] = None) -> _Run:
    """Load and run the pipeline (the output path is checked first; nothing is written).
    ``shared``: a state whose calibration to reuse instead of loading it again (auto)."""
    start = time.perf_counter()
    state = PruneState.from_model(model, seed=opts.seed, track=track,
                                  memory_budget=opts.memory_budget)
    out = None
    if output is not None:
        out = mio.resolve_output(state.handle.path, output, force,
                                 external=mio.needs_external(state.handle),
                                 reads=mio.input_files(state.handle))
    if opts.save_plan is not None:
        check_output(opts.save_plan, force, mio.input_files(state.handle), "plan",
                     avoid=[out] if out is not None else [])
    size_before = state.handle.file_size()
    opts = replace(opts, input_shapes=bind_input_shapes(state.model, opts.input_shapes))
    pipeline = build_passes(opts)
    if shared is not None:
        pipeline.passes = [_SharedCalibration(p, shared) if isinstance(p, Calibrate) else p
                           for p in pipeline.passes]
    macs_before = count_macs_or_error(state.model, opts.input_shapes, None)
    with session_threads(opts.threads):
        pipeline.run(state)
    verify_layers(state)
    return _Run(state, opts, out, size_before, macs_before, time.perf_counter() - start)


def _finish(run: _Run, output, force: bool, notes: Sequence[str] = (),
            sections: Optional[Dict[str, list]] = None) -> PruneResult:
    """Save (unless a gate failed), build the report, raise :class:`ValidationFailed` for a
    failed gate."""
    state, out = run.state, run.out
    size_after = None
    stored: List[StorageDecision] = []
    if out is not None and state.gate_failure is None:
        sparse = {} if run.opts.storage == "dense" else dict(storage=run.opts.storage,
                                                               decisions=stored)
        mio.save(state.handle, out, force=force, **sparse)
        size_after = mio.size_on_disk(out, state.model)
    report = build_report(state, run.opts.summary(), out, run.size_before, size_after,
                          run.macs_before, run.opts.input_shapes)
    report.notes.extend(notes)
    plan = plan_of(state, run.opts)
    if stored:  # --storage sparse: what went sparse
        report.notes.append(storage_summary(stored, run.opts.storage, size_after))
        report.sections[f"storage (--storage {run.opts.storage})"] = storage_rows(stored)
    if plan is not None and state.gate_failure is None:
        if run.opts.save_plan is not None:
            write_plan(plan, run.opts.save_plan, force)
            report.notes.append(f"plan written to {run.opts.save_plan}")
        if run.opts.dry_run:
            report.sections["plan (dry run: no model written)"] = summary_rows(plan)
            report.notes.append("dry run: no model written; params and MACs after are what "
                                "the pruned model would have")
            report.notes.append(predicted_latency(report.macs_before, report.macs_after,
                                                  str(run.opts.pattern)))
    report.sections.update(sections or {})
    if run.opts.target is not None:
        from onnxprune.report.targets import add_target
        add_target(report, run.opts.target, state, run.macs_before)
    if state.gate_failure is not None:
        error = ValidationFailed(state.gate_failure + " (nothing written)")
        error.report = report
        raise error
    return PruneResult(state.model, report, out, state)


def _quality(run: "_Run") -> Tuple[Optional[float], str]:
    """One number for how close a pruning stays (higher is better) and its name, for choosing
    between two prunings: the user's metric when given, else on real validation samples the
    worst top-1 agreement of class-score outputs, else the worst cosine."""
    from onnxprune.passes.metric import MetricRecord

    for record in run.state.records:
        if isinstance(record, MetricRecord) and record.metric is not None:
            value = record.metric["pruned"]
            return (value if value == value else None), f"metric {record.metric['source']}"
    comparison = run.state.comparison
    if comparison is None or not comparison.accuracy_estimate:
        return None, "validation"
    if comparison.worst_agreement is not None:
        return comparison.worst_agreement, "worst top-1 agreement"
    cosine = comparison.worst_cosine
    return (None if cosine != cosine else cosine), "worst cosine"  # nan: nothing comparable


def _auto_allocation(model, opts: PruneOptions, output, force: bool, track: Track
                     ) -> PruneResult:
    """``--allocate auto`` with calibration data: prune with sensitivity allocation and with
    uniform sparsity, and keep sensitivity only when it beats uniform on the held-out
    validation samples; the report says which won, by how much, and what the comparison
    cost."""
    spread = _execute(model, replace(opts, allocate="sensitivity"), output, force, track)
    uniform = _execute(model, replace(opts, allocate="uniform"), output, force, track,
                       spread.state)  # the calibration data and statistics loaded once
    (q_uni, measure), (q_sen, _) = _quality(uniform), _quality(spread)
    sen, uni = (_fmt(q, measure) if q is not None else "n/a" for q in (q_sen, q_uni))
    where = (uniform.state.comparison.data_note if uniform.state.comparison is not None
             else "no validation")
    if measure.startswith("metric"):
        where = "the data of --eval-script"
    cost = (f"the choice took two prunings: {spread.seconds:.1f} s with sensitivity, "
            f"{uniform.seconds:.1f} s uniform")
    if q_uni is None or q_sen is None:
        chosen, why = uniform, (f"--allocate auto kept uniform sparsity: no real validation "
                                f"samples to show that sensitivity allocation is better "
                                f"({where}); {cost}")
    elif q_sen > q_uni:
        chosen, why = spread, (f"--allocate auto chose sensitivity allocation: {measure} "
                               f"{sen} vs {uni} with uniform sparsity on "
                               f"{where}; {cost}")
    else:
        chosen, why = uniform, (f"--allocate auto fell back to uniform sparsity: sensitivity "
                                f"allocation did not beat it on {where} ({measure} "
                                f"{sen} vs {uni} uniform); {cost}")
    table = [{"allocation": name, measure: q, "seconds": round(run.seconds, 2),
              "chosen": run is chosen}
             for name, q, run in (("uniform", q_uni, uniform), ("sensitivity", q_sen, spread))]
    return _finish(chosen, output, force, notes=[why],
                   sections={"--allocate auto: uniform vs sensitivity on validation": table})


class _SharedCalibration(Pass):
    """``--allocate auto``'s second pruning: the :class:`Calibrate` pass of the first one
    reused (the same samples, held-out samples and dense-model statistics; both prunings are
    the same up to there), instead of loading and collecting again. Its record is the first
    run's, with a note."""

    name = "calibrate"

    def __init__(self, calibrate: Calibrate, shared: PruneState):
        self.requires, self.ensures, self.shared = calibrate.requires, calibrate.ensures, shared
        self.calibrate = calibrate

    def run(self, state):
        from onnxprune.passes.calibrated import CalibrateRecord

        shared = self.shared
        if self.calibrate.collect and "statistics" not in shared.facts:
            return self.calibrate.run(state)  # statistics the first run did not collect
        state.calibration, state.validation = shared.calibration, shared.validation
        if self.calibrate.collect:
            state.layer_stats.update(shared.layer_stats)
        first = next(r for r in shared.records if isinstance(r, CalibrateRecord))
        record = replace(first, phase_seconds={k: 0.0 for k in first.phase_seconds},
                         notes=list(first.notes) + [
            "calibration data loaded once and shared by --allocate auto's two prunings"])
        return record


def _fmt(x: float, measure: str) -> str:
    return f"{100 * x:.1f}%" if measure.endswith("agreement") else f"{x:.6g}"


def inspect(model: mio.ModelLike, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
            target: Optional[str] = None, with_models: Sequence = (),
            links: Sequence[str] = ()) -> Report:
    """Sparsity, params and MACs of ``model`` per prunable weight, without changing it;
    ``target`` (``"tensorrt"``, ``"onnxruntime-cpu"``) adds what that runtime can use.
    ``with_models``/``links``: the models run together, inspected joined as ``prune`` prunes
    them (what channel pruning can reach across their links)."""
    from onnxprune.report.inspect import inspect_model

    if links and not with_models:
        raise OptionError("--link names what one model hands to another: give the other "
                          "model with --with MODEL")
    if with_models:
        from onnxprune.joint import join_files, load_runs

        handles, runs = load_runs(model, with_models)
        joint = join_files(runs, handles, links)
        report = inspect_model(joint.model, bind_input_shapes(joint.model, input_shapes),
                               target=target)
        report.notes.append("inspected together: " + "; ".join(joint.describe()))
        return report
    return inspect_model(model, bind_input_shapes(model, input_shapes), target=target)
