"""The :class:`EvaluateMetric` pass: the user's own metric on the pruned model, beside the dense
model's, and its gates ``min_metric`` / ``max_metric_drop``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from onnxprune.model import io as mio
from onnxprune.passes.base import Pass, PassRecord
from onnxprune.runtime.evaluate import Metric


@dataclass
class MetricRecord(PassRecord):
    """The metric: ``{"source", "dense", "pruned", "drop"}`` (``drop`` = dense - pruned), and
    why a gate failed (None when both passed or none was set)."""

    metric: Optional[dict] = None
    gate_failure: Optional[str] = None


def metric_passes(dense: float, pruned: float, min_metric: Optional[float],
                  max_metric_drop: Optional[float]) -> bool:
    """Whether ``pruned`` meets the bounds: at least ``min_metric``, at most ``max_metric_drop``
    below ``dense`` (an absolute drop; float rounding of the subtraction forgiven). A non-finite
    ``pruned`` never passes a bound."""
    if not math.isfinite(pruned):
        return min_metric is None and max_metric_drop is None
    if min_metric is not None and pruned < min_metric:
        return False
    if max_metric_drop is not None:
        drop = dense - pruned
        if drop > max_metric_drop and not math.isclose(drop, max_metric_drop, rel_tol=1e-9,
                                                       abs_tol=1e-12):
            return False
    return True


def bounds_text(min_metric: Optional[float], max_metric_drop: Optional[float]) -> str:
    """The bounds in words, e.g. ``"at least 0.9 (--min-metric)"``."""
    parts = []
    if min_metric is not None:
        parts.append(f"at least {min_metric:g} (--min-metric)")
    if max_metric_drop is not None:
        parts.append(f"at most {max_metric_drop:g} below the dense model's (--max-metric-drop)")
    return " and ".join(parts)


class EvaluateMetric(Pass):
    """Run the user's metric on the pruned model (the dense value measured once, first)."""

    name = "evaluate"
    ensures = frozenset({"metric"})

    def __init__(self, metric: Metric, min_metric: Optional[float] = None,
                 max_metric_drop: Optional[float] = None):
        self.metric = metric
        self.min_metric = min_metric
        self.max_metric_drop = max_metric_drop

    def run(self, state):
        m = self.metric
        if m.dense is None:
            m.dense = m.measure(state.original, "dense")
        with mio.materialized(state.handle) as candidate:
            pruned = m.measure(candidate, "pruned", finite=False)
        drop = m.dense - pruned
        summary = f"metric {m.source}: dense {m.dense:.6g}, pruned {pruned:.6g}, drop {drop:.3g}"
        gate = None
        bounded = self.min_metric is not None or self.max_metric_drop is not None
        if bounded and not metric_passes(m.dense, pruned, self.min_metric, self.max_metric_drop):
            gate = (f"pruned model's metric {m.source} is {pruned:.6g} (dense {m.dense:.6g}, "
                    f"drop {drop:.6g}); it must be "
                    f"{bounds_text(self.min_metric, self.max_metric_drop)}: lower --sparsity, "
                    "or use --search to find the highest sparsity that keeps it")
        notes = []
        if not math.isfinite(pruned):
            notes.append(f"--eval-script {m.source} returned {pruned} for the pruned model "
                         "(finite for the dense one): the pruned model is likely broken")
        return MetricRecord(summary=summary, notes=notes, gate_failure=gate,
                            metric={"source": m.source, "dense": m.dense, "pruned": pruned,
                                    "drop": drop})
