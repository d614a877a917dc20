"""The :class:`Validate` pass: checker + onnxruntime on the pruned model, outputs compared with
the original's, and the ``max_error`` gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from onnxprune.errors import ModelLoadError
from onnxprune.model import io as mio
from onnxprune.passes.base import Pass, PassRecord


@dataclass
class ValidateRecord(PassRecord):
    """Whether the pruned model ran (``executed``; False when onnxruntime cannot load the input
    and only onnx.checker held it), the output comparison when one was made, and why the
    ``max_error`` gate failed (None when it passed or was not set)."""

    executed: bool = True
    comparison: Optional[object] = None  # report.compare.Comparison
    gate_failure: Optional[str] = None


class Validate(Pass):
    """Check the pruned model (checker + onnxruntime) and compare it with the original."""

    name = "validate"
    ensures = frozenset({"validated"})

    def __init__(self, inputs=None, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
                 compare: bool = True, max_error: Optional[float] = None, seed: int = 0):
        self.inputs = inputs
        self.input_shapes = input_shapes or {}
        self.compare = compare
        self.max_error = max_error
        self.seed = seed

    def run(self, state):
        from onnxprune.report.compare import compare
        from onnxprune.runtime.session import InvalidOutputModel, open_session, run_model
        from onnxprune.runtime.validate import check_valid

        try:
            reference_session = open_session(state.original)
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
            if self.max_error is not None:
                gate = ("--max-error cannot be measured: onnxruntime cannot run the input model")
            return ValidateRecord(summary=note, notes=[note], executed=False, gate_failure=gate)
        reference = feeds = None
        if self.compare:
            feeds = self._feeds(state)
            reference = run_model(reference_session, feeds)
        del reference_session  # one model in onnxruntime at a time: big models are big twice
        with mio.materialized(state.handle) as candidate:
            check_valid(candidate, full_check=state.full_check)
            if not self.compare:
                return ValidateRecord(summary="valid: checker + onnxruntime")
            outputs = run_model(candidate, feeds, candidate=True)
        state.comparison = comparison = compare(reference, outputs)
        summary = (f"valid; max abs error {comparison.max_abs:.3g}, worst cosine "
                   f"{comparison.worst_cosine:.6f}")
        gate = None
        broken = [o for o in comparison.outputs if o.reason is not None]
        if broken:
            # Outputs that cannot match at all (inf/nan where the original is finite, a missing
            # output or a changed shape): never written, with or without --max-error.
            gate = ("pruned model's outputs are broken: " + "; ".join(
                f"output '{o.name}': {o.reason}" for o in broken) +
                "; lower --sparsity, exclude the layers that break (--exclude), or use "
                "calibration data")
        elif self.max_error is not None and not comparison.passed(self.max_error):
            # The caller decides what a failed gate means (prune() writes nothing and raises
            # ValidationFailed after the report is built, so the user sees why).
            gate = (f"pruned model's outputs drift past --max-error {self.max_error}: {summary}; "
                    "lower --sparsity or use a calibrated criterion")
        notes = [f"output '{o.name}' is a {o.kind}, not a numeric tensor: compared by equality "
                 f"({100 * o.equal:.1f}% equal), not gated by --max-error"
                 for o in comparison.by_equality]
        return ValidateRecord(summary=summary, notes=notes, comparison=comparison,
                              gate_failure=gate)

    def _feeds(self, state):
        from onnxprune.inputs.dataset import load_inputs
        from onnxprune.inputs.generate import make_inputs

        model = state.model
        if self.inputs is None:
            return make_inputs(model, self.input_shapes, seed=self.seed)
        return load_inputs(self.inputs, model, self.input_shapes)  # a file or a dict
