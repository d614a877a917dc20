"""Finding the highest sparsity that keeps the user's bounds.

``prune(..., search=True, max_error=0.05)`` bisects the overall target: each probe prunes a
fresh copy of the model with every other option unchanged (pattern, criterion, calibration,
allocation) and measures what the bounds need: the relative max error the ``max_error`` gate
uses and the top-1 agreement ``min_agreement`` uses (on the validation samples), and, with ``eval_script``, the user's own metric of the probe's
model (``min_metric``: at least this; ``max_metric_drop``: at most this below the dense model's,
whose value is measured once, before the search). A probe passes when every bound given holds.
The probes go into the report, so the user sees the curve.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Tuple

from onnxprune.errors import OptionError
from onnxprune.passes.metric import bounds_text, metric_passes

#: ``sparsity -> (what the probe measured, by column; whether it kept every bound)``.
Probe = Callable[[float], Tuple[Dict[str, float], bool]]


def search_sparsity(run: Probe, high: float, steps: int = 7, track=None
                    ) -> Tuple[float, List[dict]]:
    """Bisect ``[0, high]`` for the largest sparsity whose probe ``run(sparsity)`` passes;
    returns it (0.0 when even the smallest probe fails) and the probes, each
    ``{"sparsity", <measured columns>, "passed"}`` in the order they ran.

    Pruning is taken to hurt more as sparsity grows (true of magnitude masks and nearly so of
    calibrated ones); the answer is always a probed, passing value.
    """
    probes: List[dict] = []

    def probe(s: float) -> bool:
        measured, passed = run(s)
        probes.append({"sparsity": round(s, 4), **measured, "passed": bool(passed)})
        return bool(passed)

    if probe(high):
        return high, probes
    lo, hi, best = 0.0, high, 0.0
    for _ in (track or (lambda items, d, t: items))(range(steps), "searching sparsity", steps):
        mid = (lo + hi) / 2
        if probe(mid):
            lo = best = mid
        else:
            hi = mid
    return best, probes


def criteria_text(options) -> str:
    """The bounds a search keeps, in words (for the report's note)."""
    parts = []
    if options.max_error is not None:
        parts.append(f"outputs within --max-error {options.max_error:g}")
    if options.min_agreement is not None:
        parts.append(f"top-1 agreement at least --min-agreement {options.min_agreement:g}")
    if options.min_metric is not None or options.max_metric_drop is not None:
        parts.append(f"metric {options.eval_script.source} "
                     f"{bounds_text(options.min_metric, options.max_metric_drop)}")
    return " and ".join(parts)


def probe_runner(model, options, prune_fn) -> Probe:
    """``sparsity -> (measured, passed)`` of pruning ``model`` with ``options`` at it: the
    relative max error (when the outputs were compared) and the metric (with ``eval_script``),
    passing when every bound of ``options`` holds."""
    if options.pattern and ":" in options.pattern:
        raise OptionError(f"pattern {options.pattern} fixes its sparsity; --search needs an "
                          "unstructured, block or channel pattern")

    def run(sparsity: float) -> Tuple[Dict[str, float], bool]:
        # allocation as resolved under search: the final run repeats it (see api.prune); the
        # gates are off so a failing probe returns its report instead of raising
        probe = replace(options, sparsity=sparsity, validate=True, max_error=None,
                        min_agreement=None, min_metric=None, max_metric_drop=None, search=False,
                        allocate=options.allocation)
        report = prune_fn(model, probe).report
        measured: Dict[str, float] = {}
        passed = True
        if report.metric is not None:
            measured["metric"] = report.metric["pruned"]
            passed = metric_passes(report.metric["dense"], report.metric["pruned"],
                                   options.min_metric, options.max_metric_drop)
        if report.comparison is not None:
            measured["rel_error"] = float(report.comparison.max_rel_error)
        if options.max_error is not None:
            if report.comparison is None:
                raise OptionError("--search --max-error needs outputs to compare, but "
                                  "onnxruntime cannot run this model (see the notes of a run "
                                  "without --search)")
            passed = passed and measured["rel_error"] <= options.max_error
        if options.min_agreement is not None:
            worst = None if report.comparison is None else report.comparison.worst_agreement
            if worst is None:
                raise OptionError("--search --min-agreement needs an output holding class "
                                  "scores, compared with onnxruntime; use --max-error instead")
            measured["agreement"] = float(worst)
            passed = passed and worst >= options.min_agreement
        return measured, passed

    return run
