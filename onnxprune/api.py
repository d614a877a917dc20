"""The Python entry points: :func:`prune` and :func:`inspect`.

``prune`` builds the usual pass list from its arguments, runs it, writes the output atomically
(when ``output`` is given) and returns a :class:`PruneResult` with the pruned ``ModelProto`` and
its :class:`~onnxprune.report.Report`. Every CLI option is an argument here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx

from . import io as mio
from .errors import OptionError, ValidationFailed
from .passes import (ApplyMasks, FindWeights, Pass, PruneState, ScoreWeights, SelectWeights,
                     Track, Validate, no_progress)
from .report import LayerRow, Report
from .structure import PruneChannels, RemoveDeadChannels


@dataclass
class PruneResult:
    """The pruned model, its report, and where it was written (None when not saved)."""

    model: onnx.ModelProto
    report: Report
    output: Optional[Path]
    state: PruneState


def build_passes(*, pattern: str = "unstructured", sparsity=None, criterion: str = "magnitude",
                 scope: str = "local", op_types=None, include=None, exclude=None, config=None,
                 min_sparsity: float = 0.0, max_sparsity: float = 0.98, scores=None, masks=None,
                 validate: bool = True, compare: bool = True, inputs=None, input_shapes=None,
                 max_error: Optional[float] = None, seed: int = 0,
                 guard_fixed: bool = True, resize: Optional[bool] = None, round_to: int = 1,
                 min_channels: int = 1, max_group_sparsity: float = 0.9) -> List[Pass]:
    """The default pipeline for these options (what :func:`prune` runs)."""
    passes: List[Pass] = [
        FindWeights(),
        SelectWeights(pattern=pattern, sparsity=sparsity, criterion=criterion, op_types=op_types,
                      include=include, exclude=exclude, config=config,
                      min_sparsity=min_sparsity, max_sparsity=max_sparsity),
    ]
    if pattern == "channel" and resize is not False and masks is None and config is None:
        passes.append(PruneChannels(sparsity=sparsity, criterion=criterion, round_to=round_to,
                                    min_channels=min_channels, scope=scope,
                                    max_group_sparsity=max_group_sparsity,
                                    input_shapes=input_shapes))
    else:
        passes += [ScoreWeights(user_scores=scores, guard_fixed=guard_fixed),
                   ApplyMasks(scope=scope, masks=masks)]
        if resize is not False:
            passes.append(RemoveDeadChannels(input_shapes=input_shapes,
                                             keep_layouts=resize is None))
    if validate:
        passes.append(Validate(inputs=inputs, input_shapes=input_shapes, compare=compare,
                               max_error=max_error, seed=seed))
    return passes


def prune(model: mio.ModelLike, pattern: str = "unstructured",
          sparsity: Optional[Union[float, int]] = None, criterion: str = "magnitude",
          scope: str = "local", *, op_types: Union[str, Sequence[str], None] = None,
          include: Optional[str] = None, exclude: Optional[str] = None, config=None,
          min_sparsity: float = 0.0, max_sparsity: float = 0.98,
          scores: Optional[Dict[str, np.ndarray]] = None,
          masks: Optional[Dict[str, np.ndarray]] = None,
          output: Union[str, os.PathLike, None] = None, force: bool = False,
          validate: bool = True, compare: bool = True, inputs=None,
          input_shapes: Optional[Dict[str, Sequence[int]]] = None,
          max_error: Optional[float] = None, seed: int = 0, guard_fixed: bool = True,
          resize: Optional[bool] = None, round_to: int = 1, min_channels: int = 1,
          max_group_sparsity: float = 0.9, track: Track = no_progress) -> PruneResult:
    """Prune ``model`` (a path or ``onnx.ModelProto``, never modified) and return the result.

    ``pattern``: ``unstructured``/``1x1``, blocks ``NxM`` (``4x1`` = 4 output channels × 1 input
    element), ``N:M`` (``2:4``) or ``channel``. ``sparsity``: fraction of zeros in the selected
    weights counting zeros already there (default 0.5; implied by N:M), or an int zero count.
    ``criterion``: ``magnitude``, ``l2``, ``random`` (seeded by ``seed``), ``scores`` (with
    ``scores={weight_name: array}``); ``masks={weight_name: bool array}`` applies given masks.
    ``scope``: ``local`` (each weight reaches the target) or ``global`` (one threshold, bounded
    per weight by ``min_sparsity``/``max_sparsity``). Selection: ``op_types``, ``include`` /
    ``exclude`` regexes on weight or node names, ``config`` rules (file or list/dict).
    Validation (default on): checker + onnxruntime, then original vs pruned outputs on
    ``inputs`` (a .npz path or dict) or on inputs generated from the model's signature
    (``input_shapes`` fixes dynamic dims); ``max_error`` turns the comparison into a gate.
    ``output``: write the result there atomically (``force`` to overwrite).
    ``resize`` (default None = auto): physically remove channels — with ``pattern="channel"``
    the chosen channels (``round_to`` keeps kept counts at multiples, ``min_channels`` per group,
    ``max_group_sparsity`` caps a group under global scope), with any other pattern the
    channels its masks leave dead (auto skips that for block and N:M patterns, whose layout
    removing a channel would shift; ``True`` forces it); exact, and groups the tool cannot map are left whole and
    listed in ``report.frozen``. ``guard_fixed``: leave alone constant operands that are not learned weights (decoding
    ramps, DFT bases, identity matrices), listed in ``report.skipped``.

    >>> result = prune("model.onnx", pattern="2:4", output="model.24.onnx")  # doctest: +SKIP
    >>> result.report.nonzeros_after / result.report.params_after            # doctest: +SKIP
    """
    if criterion == "scores" and not scores:
        raise OptionError("criterion 'scores' needs scores={weight_name: array} (CLI: --scores "
                          "FILE.npz)")
    if scores and criterion != "scores":
        criterion = "scores"
    state = PruneState.from_model(model, seed=seed, track=track)
    out = None
    if output is not None:
        out = mio.resolve_output(state.handle.path, output, force)
    size_before = state.handle.file_size()
    macs_before = _macs(state.model, input_shapes, None)
    passes = build_passes(pattern=pattern, sparsity=sparsity, criterion=criterion, scope=scope,
                          op_types=op_types, include=include, exclude=exclude, config=config,
                          min_sparsity=min_sparsity, max_sparsity=max_sparsity, scores=scores,
                          masks=masks, validate=validate, compare=compare, inputs=inputs,
                          input_shapes=input_shapes, max_error=max_error, seed=seed,
                          guard_fixed=guard_fixed, resize=resize, round_to=round_to,
                          min_channels=min_channels, max_group_sparsity=max_group_sparsity)
    for p in passes:
        p(state)
    size_after = None
    if out is not None and state.gate_failure is None:
        mio.save(state.handle, out)
        size_after = mio.size_on_disk(out, state.model)
    options = dict(pattern=pattern, sparsity=sparsity, criterion=criterion, scope=scope,
                   resize=resize, round_to=round_to if pattern == "channel" else None,
                   op_types=op_types, include=include, exclude=exclude, seed=seed,
                   min_sparsity=min_sparsity, max_sparsity=max_sparsity, max_error=max_error)
    report = build_report(state, options, out, size_before, size_after, macs_before,
                          input_shapes)
    if state.gate_failure is not None:
        error = ValidationFailed(state.gate_failure + " (nothing written)")
        error.report = report
        raise error
    return PruneResult(state.model, report, out, state)


def _macs(model: onnx.ModelProto, input_shapes, densities):
    from .macs import count_macs

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
        sections={},
    )


def inspect(model: mio.ModelLike, input_shapes: Optional[Dict[str, Sequence[int]]] = None
            ) -> Report:
    """Sparsity, params and MACs of ``model`` per prunable weight, without changing it."""
    from .inspect import inspect_model

    return inspect_model(model, input_shapes)
