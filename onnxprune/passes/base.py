"""Pass infrastructure: :class:`Pass`, the shared :class:`PruneState`, typed records, pipelines.

Modelled on onnx-ir's passes. A pass is a callable object: ``result = pass_(state)`` updates the
state (the model inside ``state.handle`` and the facts it establishes) and returns a
:class:`PassResult` with the model, whether it changed, and the pass's typed record (a
:class:`PassRecord` subclass: counts, layers, what was left alone and why, notes, time).
Records are appended to ``state.records``; the report is built from them
(:mod:`onnxprune.report.build`).

Each pass class declares the facts it ``requires`` and ``ensures`` (names such as
``"weights"``, ``"selection"``, ``"scores"``, ``"masks"``, ``"calibration"``, ``"statistics"``,
``"sensitivity"``). A pipeline is a plain list of passes; :func:`check_pipeline` (and
:class:`Pipeline`) refuse, when the list is built, one whose pass needs a fact no earlier pass
ensures: that is a :class:`PipelineError`, a programming error, never a user's mistake::

    state = PruneState.from_model("model.onnx")
    for p in Pipeline([FindWeights(), SelectWeights(pattern="2:4"), ScoreWeights(),
                       ApplyMasks(), Validate()]):
        print(p(state).record)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import (TYPE_CHECKING, Callable, Dict, FrozenSet, Iterable, Iterator, List,
                    Optional, Sequence, Set, Union)

import numpy as np
import onnx

from onnxprune.model import io as mio
from onnxprune.masking.selection import LayerPlan
from onnxprune.ops.weights import Skipped, Weight

if TYPE_CHECKING:  # typed state fields only; the passes that fill them import these for real
    from onnxprune.calibration.sensitivity import SensitivityTable
    from onnxprune.calibration.statistics import LayerStats
    from onnxprune.inputs.dataset import CalibrationSet
    from onnxprune.report.compare import Comparison

log = logging.getLogger(__name__)

Track = Callable[[Iterable, str, int], Iterable]

#: Bytes of unit scores (and global-scope masks) the passes may hold across weights at once;
#: past it they recompute them weight by weight, so memory stays about one weight's worth.
DEFAULT_MEMORY_BUDGET = 256 << 20


def no_progress(items: Iterable, description: str, total: int) -> Iterable:
    return items


class PipelineError(RuntimeError):
    """A pass runs without a fact an earlier pass must establish: a bug in the code that built
    the pipeline, not a user's mistake (so not an :class:`~onnxprune.errors.OnnxPruneError`)."""


@dataclass
class LayerResult:
    """What pruning did to one weight (as the pass that recorded it left it)."""

    key: str
    name: str
    op_type: str
    shape: tuple
    numel: int
    nonzeros_before: int
    nonzeros_after: int
    pattern: str
    criterion: str
    shape_after: Optional[tuple] = None  # set when channels were removed
    channels: Optional[tuple] = None  # (output channels before, after)


@dataclass
class PassRecord:
    """What a pass did. Every pass kind has its own subclass with typed fields; these are the
    fields all share: the pass name, a one-line summary, whether the model changed, notes for
    the report, weights left alone (with why), the per-weight results the pass set, and the
    seconds it took (set by :meth:`Pass.__call__`)."""

    name: str = ""
    summary: str = ""
    modified: bool = False
    notes: List[str] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)
    layers: Dict[str, LayerResult] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    record: PassRecord


@dataclass
class PruneState:
    """Everything the passes share: the model being pruned and the facts earlier passes found.

    Facts are typed fields; ``facts`` names the ones established so far (what passes
    ``ensures``). What each pass *did* lives in ``records``; ``notes``, ``skipped`` and
    ``gate_failure`` are read from them.
    """

    handle: mio.ModelHandle
    original: Union[Path, onnx.ModelProto]  # the untouched input, for validation
    # Exact rewrites earlier passes made to the dense model (a channel permutation: the same
    # function, weights in another order), replayed on the untouched input wherever it runs
    # beside the model being pruned (layer-by-layer pruning's dense reference).
    dense_edits: List[Callable[[mio.ModelHandle], None]] = field(default_factory=list)
    weights: List[Weight] = field(default_factory=list)
    plans: List[LayerPlan] = field(default_factory=list)
    # Unit scores by weight key, held only while all of them fit in memory_budget; a missing
    # key means "recompute from the weight" (see passes.masking.unit_scores_of).
    unit_scores: Dict[str, np.ndarray] = field(default_factory=dict)
    user_scores: Dict[str, np.ndarray] = field(default_factory=dict)  # by key, for rescoring
    layer_stats: Dict[str, "LayerStats"] = field(default_factory=dict)  # per weight key
    layers: Dict[str, LayerResult] = field(default_factory=dict)  # latest result per weight
    calibration: Optional["CalibrationSet"] = None
    validation: Optional["CalibrationSet"] = None  # calibration samples held out for validation
    sensitivity: Optional["SensitivityTable"] = None
    comparison: Optional["Comparison"] = None
    records: List[PassRecord] = field(default_factory=list)
    facts: Set[str] = field(default_factory=set)
    full_check: bool = True  # hold the output to strict shape inference (the input passes it)
    seed: int = 0
    track: Track = no_progress
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes held across weights (see the constant)

    @classmethod
    def from_model(cls, model: mio.ModelLike, seed: int = 0, track: Track = no_progress,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET) -> "PruneState":
        """Load ``model``; an in-memory proto is copied so the caller's object is never changed."""
        if isinstance(model, onnx.ModelProto):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            handle, original = mio.load(copy), model
        else:
            handle = mio.load(model)
            original = handle.path if handle.path is not None else handle.model
        full = mio.check_input(handle)
        return cls(handle=handle, original=original, seed=seed, track=track, full_check=full,
                   memory_budget=memory_budget)

    @property
    def model(self) -> onnx.ModelProto:
        return self.handle.model

    @property
    def notes(self) -> List[str]:
        return [n for r in self.records for n in r.notes]

    @property
    def skipped(self) -> List[Skipped]:
        return [s for r in self.records for s in r.skipped]

    @property
    def gate_failure(self) -> Optional[str]:
        """Why the ``max_error`` gate failed (a validation record says), or None."""
        for r in self.records:
            failure = getattr(r, "gate_failure", None)
            if failure is not None:
                return failure
        return None


class Pass:
    """Base class: subclasses set ``name``, ``requires``, ``ensures`` and implement
    :meth:`run`, which returns the pass's record (the base fills in name and time).

    ``requires``/``ensures`` are class-level; a pass whose needs depend on how it was
    configured (a channel pass that refits needs calibration) sets them on the instance.
    """

    name = "pass"
    requires: FrozenSet[str] = frozenset()
    ensures: FrozenSet[str] = frozenset()

    def __call__(self, state: PruneState) -> PassResult:
        missing = set(self.requires) - state.facts
        if missing:
            raise PipelineError(f"pass '{self.name}' requires {sorted(missing)}, which no earlier "
                                "pass on this state ensured")
        log.debug("pass %s: start", self.name)
        start = time.perf_counter()
        record = self.run(state)
        record.name = self.name
        record.seconds = time.perf_counter() - start
        log.info("pass %s: %.2fs%s", self.name, record.seconds,
                 f" ({record.summary})" if record.summary else "")
        state.records.append(record)
        state.facts.update(self.ensures)
        return PassResult(state.model, record.modified, record)

    def run(self, state: PruneState) -> PassRecord:  # pragma: no cover - abstract
        raise NotImplementedError


def check_pipeline(passes: Sequence[Pass], given: Iterable[str] = ()) -> None:
    """Raise :class:`PipelineError` when a pass requires a fact that neither ``given`` nor an
    earlier pass ensures (e.g. a calibrated pass with no :class:`Calibrate` before it)."""
    known = set(given)
    for i, p in enumerate(passes):
        missing = set(p.requires) - known
        if missing:
            before = ", ".join(q.name for q in passes[:i]) or "nothing"
            raise PipelineError(f"pass '{p.name}' (#{i}) requires {sorted(missing)}, but the "
                                f"passes before it ({before}) do not ensure it")
        known.update(p.ensures)


class Pipeline:
    """A list of passes, checked when built (:func:`check_pipeline`); iterate it or :meth:`run`
    it on a state."""

    def __init__(self, passes: Sequence[Pass], given: Iterable[str] = ()):
        self.passes: List[Pass] = list(passes)
        check_pipeline(self.passes, given)

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __getitem__(self, index: int) -> Pass:
        return self.passes[index]

    def run(self, state: PruneState) -> List[PassResult]:
        log.info("pipeline: %s", " → ".join(p.name for p in self.passes))
        start = time.perf_counter()
        results = [p(state) for p in self.passes]
        log.info("pipeline done in %.2fs", time.perf_counter() - start)
        return results


def layer_result(weight: Weight, before: int, after: int, pattern: str, criterion: str
                 ) -> LayerResult:
    """A :class:`LayerResult` of a masked weight (shape unchanged)."""
    return LayerResult(weight.key, weight.name, weight.op_type, weight.shape, weight.numel,
                       before, after, pattern, criterion)


def set_layer(state: PruneState, record: PassRecord, layer: LayerResult) -> None:
    """Make ``layer`` the weight's latest result in the state and in ``record``."""
    state.layers[layer.key] = layer
    record.layers[layer.key] = layer


def verify_layers(state: PruneState) -> None:
    """Check every weight's recorded result against the model as it now is: the weights are
    found again from the graph (not through the objects the passes held) and their stored
    nonzeros counted. A difference means a write went somewhere the model does not read (it
    happened: a piece session once swapped the graph's nodes for copies, and every later write
    of a weight stored in a ``Constant`` node went to a detached copy — the "pruned" model came
    out dense, its report saying 50 %). An internal error then, so that nothing is written;
    never a silently wrong model. Pruning only ever zeroes or removes, so a model holding
    *fewer* nonzeros or another shape than recorded means a later pass (dead channels) changed
    the weight without its record keeping up: the record is brought up to date from the model,
    so that the report describes the file written."""
    from dataclasses import replace

    from onnxprune.ops.weights import find_weights

    if not state.layers:
        return
    found = {w.key: w for w in find_weights(state.handle)[0]}
    for key, layer in list(state.layers.items()):
        w = found.get(key)
        if w is None or layer.nonzeros_after == layer.nonzeros_before:
            continue  # removed with its channels, or not changed: nothing to compare
        values = state.handle.read(w.tensor)
        held = int(np.count_nonzero(values))
        if held > layer.nonzeros_after:  # pruning only zeroes: more means a write was lost
            raise RuntimeError(
                f"internal error: weight '{layer.name}' should hold {layer.nonzeros_after} "
                f"nonzeros after pruning, but the model holds {held}; nothing was written. "
                "Please report this with the model.")
        if held < layer.nonzeros_after or \
                tuple(values.shape) != tuple(layer.shape_after or layer.shape):
            fixed = replace(layer, nonzeros_after=held, shape_after=tuple(values.shape))
            state.layers[key] = fixed
            for record in state.records:
                if key in record.layers:
                    record.layers[key] = fixed

__all__ = ["DEFAULT_MEMORY_BUDGET", "LayerResult", "Pass", "PassRecord", "PassResult",
           "Pipeline", "PipelineError", "PruneState", "Track", "check_pipeline", "layer_result",
           "no_progress", "set_layer", "verify_layers"]
