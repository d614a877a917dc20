"""Validation runs the original model first and closes its session before the pruned one
opens (one model in onnxruntime at a time), as long as the recorded outputs fit the memory
budget; past it, the rest is compared with both sessions open. Either way the figures are the
same."""

from __future__ import annotations

import numpy as np

from onnxprune import prune
from onnxprune.passes.validate import record_outputs
from onnxprune.runtime.session import open_session
from tests.builders import conv_gemm_model


class Counting:
    """A session stand-in that counts its runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def get_outputs(self):
        return self.session.get_outputs()

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, names, feed):
        self.runs += 1
        return self.session.run(names, feed)


def feeds(n: int):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield {"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)}, 1


def test_record_outputs_stops_at_the_budget_and_leaves_the_rest():
    model = conv_gemm_model()
    session = Counting(open_session(model))
    recorded, rest = record_outputs(session, feeds(6), budget=1 << 30)
    assert rest is None and len(recorded) == 6 and session.runs == 6
    one = sum(v.nbytes for v in list(recorded[0][0].values()) + list(recorded[0][2].values()))
    session = Counting(open_session(model))
    recorded, rest = record_outputs(session, feeds(6), budget=2 * one + 1)
    assert len(recorded) == 3 and session.runs == 3  # the third batch passes the budget
    assert len(list(rest)) == 3  # not run yet, handed on


def test_validation_figures_do_not_depend_on_the_budget():
    model = conv_gemm_model()
    results = [prune(model, pattern="unstructured", sparsity=0.6, memory_budget=budget)
               for budget in (1 << 30, 1)]  # all recorded / both sessions open from batch 2
    a, b = (r.report.comparison for r in results)
    assert a.max_abs == b.max_abs and a.worst_cosine == b.worst_cosine
    assert [o.cosine for o in a.outputs] == [o.cosine for o in b.outputs]
    assert a.samples == b.samples > 1
