"""The :class:`Validate` pass: checker + onnxruntime on the pruned model, its outputs compared
with the original's on validation samples, a verdict per output, and the gates.

Which samples, in order of preference:

1. the user's ``--inputs`` (a ``.npz``/``.npy``/folder; axis 0 = samples; arrays that are no
   model input, such as labels, are ignored and named);
2. calibration samples *held out* from the statistics (``--validation-samples``, 32 by
   default, taken after the samples the calibration used);
3. generated inputs (8 seeded draws from the input signature) — the report then says in words
   that its figures show how far the outputs moved, not the accuracy.

Real samples are served in batches and both models run batch by batch, so memory holds one
batch (and the two sessions). Gates: an output that cannot match (missing, another shape,
inf/nan) always stops the run; ``--max-error`` (relative max error) and ``--min-agreement``
(the worst class-score output's top-1 agreement) stop it when given. A ``broken`` verdict
otherwise is a warning.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from onnxprune.errors import ModelLoadError
from onnxprune.model import io as mio
from onnxprune.model.compose import state_ties
from onnxprune.passes.base import Pass, PassRecord

GENERATED_SAMPLES = 8  # generated inputs compared when no data is given
DEFAULT_BATCH = 8


@dataclass
class ValidateRecord(PassRecord):
    """Whether the pruned model ran (``executed``; False when onnxruntime cannot load the input
    and only onnx.checker held it), the output comparison when one was made, why a gate failed
    (None when all passed or none was set), and warnings for the user (broken verdicts)."""

    executed: bool = True
    comparison: Optional[object] = None  # report.compare.Comparison
    gate_failure: Optional[str] = None
    warnings: List[str] = field(default_factory=list)


def class_axes(index, ranks: Mapping[str, int]) -> Dict[str, Optional[int]]:
    """The class axis of each graph output (by name, with its rank), from the op producing it
    (the registry's ``class_axis``: a Softmax's axis, a linear head's features), looking
    through ops that only copy values (Identity, Cast). An output no such op produces holds
    class scores only when it is ``[batch, classes]`` (rank 2); a detector's ``[1, 84, 8400]``
    Concat or a feature map does not."""
    from onnxprune.ops.registry import entry

    opset = index.opset()
    axes: Dict[str, Optional[int]] = {}
    for name, rank in ranks.items():
        node, seen = index.producer(name), 0
        while node is not None and seen < 16:
            e = entry(node)
            if e is None or not e.copies_values or not node.input:
                break
            node, seen = index.producer(node.input[0]), seen + 1
        e = entry(node) if node is not None else None
        if e is not None and e.class_axis is not None:
            axes[name] = e.class_axis(node, rank, opset)
        else:
            axes[name] = 1 if rank == 2 else None
    return axes


class Validate(Pass):
    """Check the pruned model (checker + onnxruntime) and compare it with the original."""

    name = "validate"
    ensures = frozenset({"validated"})

    def __init__(self, inputs=None, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                 compare: bool = True, max_error: Optional[float] = None, seed: int = 0,
                 min_agreement: Optional[float] = None, thresholds=None,
                 batch_size: int = DEFAULT_BATCH, image_preprocess=None):
        self.inputs = inputs
        self.input_shapes = input_shapes or {}
        self.compare = compare
        self.max_error = max_error
        self.min_agreement = min_agreement
        self.thresholds = thresholds
        self.seed = seed
        self.batch_size = batch_size
        self.image_preprocess = image_preprocess

    def run(self, state):
        from onnxprune.runtime.session import InvalidOutputModel, open_session
        from onnxprune.runtime.validate import check_valid

        try:
            reference = open_session(state.original)
        except InvalidOutputModel as exc:
            if not state.full_check:  # neither strict shape inference nor onnxruntime accept it
                raise ModelLoadError(f"the input model is invalid: onnx.checker's strict shape "
                                     f"inference rejects it and onnxruntime cannot load it "
                                     f"({exc.detail.splitlines()[0]}); fix or re-export it")
            # A sound graph onnxruntime cannot run (custom ops, an opset it lacks): the output
            # can only be held to the checker, and the user is told why.
            mio.check_graph(state.handle, full_check=state.full_check)
            note = (f"onnxruntime cannot load the input model ({exc.detail.splitlines()[0]}); "
                    "the pruned model was checked with onnx.checker only, not run")
            gate = None
            if self.max_error is not None or self.min_agreement is not None:
                flag = "--max-error" if self.max_error is not None else "--min-agreement"
                gate = f"{flag} cannot be measured: onnxruntime cannot run the input model"
            return ValidateRecord(summary=note, notes=[note], executed=False, gate_failure=gate)
        if not self.compare:
            reference = None
            with mio.materialized(state.handle) as candidate:
                check_valid(candidate, full_check=state.full_check)
            return ValidateRecord(summary="valid: checker + onnxruntime")
        batches, kind, note, notes = self._data(state)
        # The original's outputs first, then its session goes before the pruned one opens:
        # one model in onnxruntime at a time (a large model's validation peaks at one copy,
        # not two), as long as the recorded outputs and feeds fit the memory budget.
        recorded, rest = record_outputs(reference, batches, state.memory_budget)
        if rest is None:
            reference = None
        with mio.materialized(state.handle) as candidate:
            check_valid(candidate, full_check=state.full_check, load=False)
            pruned = open_session(candidate)
        comparison = self._compare(state, recorded, rest, reference, pruned, kind, note)
        state.comparison = comparison
        return self._judge(comparison, notes)

    # -- the samples --------------------------------------------------------------------------
    def _data(self, state) -> Tuple[Iterator[Tuple[Dict[str, np.ndarray], int]], str, str,
                                    List[str]]:
        """(batches of (feed, samples), data kind, data note, notes)."""
        from onnxprune.inputs.dataset import load_samples
        from onnxprune.inputs.generate import make_inputs

        model = state.model
        if self.inputs is not None:
            data = load_samples(self.inputs, state.handle, self.image_preprocess)
            where = (f"'{data.source}'" if isinstance(self.inputs, (str, bytes)) or
                     hasattr(self.inputs, "__fspath__") else "the given inputs")
            notes = [f"--inputs: array(s) {', '.join(repr(k) for k in data.ignored)} are no "
                     f"model input and were not fed"] if data.ignored else []
            return (_batched(data, self.batch_size), "inputs",
                    f"{len(data)} samples from {where}", notes)
        if state.validation is not None:
            data = state.validation
            return (_batched(data, self.batch_size), "held-out",
                    f"{len(data)} calibration samples held out from the statistics", [])
        n = GENERATED_SAMPLES

        def generated():
            for i in range(n):
                yield make_inputs(model, self.input_shapes,
                                  seed=self.seed * 1_000_003 + i), 1

        return (generated(), "generated",
                f"{n} generated random inputs: the figures show how far the outputs moved, "
                "not the accuracy; pass --inputs or --calibration data for a real estimate",
                _generated_note(model, self.input_shapes))

    def _compare(self, state, recorded, rest, reference, pruned, kind: str, note: str):
        """Compare the pruned model's outputs with the recorded ones, then (when the budget
        ran out) with the original's on the ``rest`` of the batches, both sessions open."""
        from onnxprune.report.compare import Comparer, Thresholds
        from onnxprune.runtime.session import run_model

        thresholds = Thresholds.parse(self.thresholds)
        comparer = None
        live = ((feed, samples, run_model(reference, feed)) for feed, samples in (rest or ()))
        # a joined model's state output (model/compose.py) is resized with its readers: its
        # channels are the next call's, not comparable with the original's
        states = {out for out, _ in state_ties(state.model)}
        for feed, samples, ref in itertools.chain(recorded, live):
            out = run_model(pruned, feed, candidate=True)
            if states:
                ref = {k: v for k, v in ref.items() if k not in states}
                out = {k: v for k, v in out.items() if k not in states}
            if comparer is None:
                ranks = {k: np.ndim(v) for k, v in ref.items()
                         if not isinstance(v, (list, dict))}
                comparer = Comparer(class_axes(state.handle.index, ranks), thresholds)
            comparer.add(ref, out, samples)
        if comparer is None:
            comparer = Comparer({}, thresholds)
        return comparer.result(kind, note)

    # -- verdict and gates --------------------------------------------------------------------
    def _judge(self, comparison, notes: List[str]) -> ValidateRecord:
        summary = (f"{comparison.verdict} on {comparison.data_brief}; "
                   f"max abs error {comparison.max_abs:.3g}, worst cosine "
                   f"{comparison.worst_cosine:.6f}")
        if comparison.worst_agreement is not None:
            summary += f", worst top-1 agreement {100 * comparison.worst_agreement:.1f}%"
        gate = None
        hard = [o for o in comparison.outputs if o.reason is not None]
        if hard:
            # Outputs that cannot match at all (inf/nan where the original is finite, a missing
            # output or a changed shape): never written, with or without a gate.
            gate = ("pruned model's outputs are broken: " + "; ".join(
                f"output '{o.name}': {o.reason}" for o in hard) +
                "; lower --sparsity, exclude the layers that break (--exclude), or use "
                "calibration data")
        elif self.max_error is not None and not comparison.passed(self.max_error):
            # The caller decides what a failed gate means (prune() writes nothing and raises
            # ValidationFailed after the report is built, so the user sees why).
            gate = (f"pruned model's outputs drift past --max-error {self.max_error:g}: "
                    + "; ".join(comparison.failures(self.max_error)) +
                    f" (measured on {comparison.data_brief}); lower --sparsity or "
                    "use a calibrated criterion")
        elif self.min_agreement is not None:
            gate = _agreement_gate(comparison, self.min_agreement)
        warnings = [f"output '{o.name}' is broken: {o.verdict_reason}, on "
                    f"{comparison.data_brief}"
                    for o in comparison.outputs if o.verdict == "broken" and o.reason is None]
        notes = notes + [f"output '{o.name}' is a {o.kind}, not a numeric tensor: compared by "
                         f"equality ({100 * o.equal:.1f}% equal), not gated by --max-error"
                         for o in comparison.by_equality]
        return ValidateRecord(summary=summary, notes=notes, comparison=comparison,
                              gate_failure=gate, warnings=warnings)


def _agreement_gate(comparison, min_agreement: float) -> Optional[str]:
    """Why ``--min-agreement`` fails (None when it holds)."""
    worst = comparison.worst_agreement
    if worst is None:
        return ("--min-agreement cannot be measured: no output holds class scores (outputs: "
                + ", ".join(f"'{o.name}' {o.metric}" for o in comparison.outputs) +
                "); use --max-error instead")
    if worst >= min_agreement:
        return None
    name = min((o for o in comparison.outputs if o.metric == "class scores"),
               key=lambda o: o.top1_agreement if o.ok else 0.0).name
    return (f"pruned model's top-1 agreement with the original is {100 * worst:.1f}% on output "
            f"'{name}' ({comparison.data_brief}), below --min-agreement "
            f"{min_agreement:g}; lower --sparsity or use calibration data")


def record_outputs(reference, batches, budget: int):
    """``(recorded, rest)``: ``(feed, samples, outputs)`` of the original model per batch while
    the feeds and outputs held stay within ``budget`` bytes; ``rest`` is the iterator of the
    batches not run yet (None when every batch was recorded)."""
    from onnxprune.runtime.session import run_model

    recorded, held = [], 0
    batches = iter(batches)
    for feed, samples in batches:
        out = run_model(reference, feed)
        recorded.append((feed, samples, out))
        held += sum(_nbytes(v) for v in list(feed.values()) + list(out.values()))
        if held > budget:
            return recorded, batches
    return recorded, None


def _nbytes(value) -> int:
    return int(value.nbytes) if isinstance(value, np.ndarray) else 64  # sequences/maps: small


def _batched(data, batch_size: int) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
    """(feed, samples in it) per batch of ``data``."""
    one = len(data) == 1  # a single sample (or a feed given whole): no sample axis to count
    for feed in data.batches(batch_size):
        sized = [np.shape(v)[0] for v in feed.values() if np.ndim(v)]
        yield feed, (min(sized) if sized and not one else 1)


def _generated_note(model, shapes) -> List[str]:
    """What was generated for token-id / mask / position / past inputs (none for plain ones)."""
    from onnxprune.inputs.generate import generated_notes

    lines = generated_notes(model, shapes)
    return ["generated inputs: " + "; ".join(lines)] if lines else []
