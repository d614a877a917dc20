"""Finding the highest sparsity that keeps the outputs within an error budget.

``prune(..., search=True, max_error=0.05)`` bisects the overall target: each probe prunes a
fresh copy of the model with every other option unchanged (pattern, criterion, calibration,
allocation) and measures the same relative error the ``max_error`` gate uses, on the
validation inputs. The probes go into the report, so the user sees the error curve.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Tuple

from onnxprune.errors import OptionError


def search_sparsity(run: Callable[[float], float], max_error: float, high: float,
                    steps: int = 7, track=None) -> Tuple[float, List[dict]]:
    """Bisect ``[0, high]`` for the largest sparsity whose ``run(sparsity)`` error stays
    within ``max_error``; returns it (0.0 when even the smallest probe fails) and the probes.

    The error of pruning is taken as non-decreasing in sparsity (true of magnitude masks and
    nearly so of calibrated ones); the answer is always a probed, passing value.
    """
    probes: List[dict] = []

    def probe(s: float) -> bool:
        err = run(s)
        probes.append({"sparsity": round(s, 4), "rel_error": err, "passed": err <= max_error})
        return err <= max_error

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


def probe_runner(model, options, prune_fn) -> Callable[[float], float]:
    """``sparsity -> relative max error`` of pruning ``model`` with ``options`` at it."""
    if options.pattern and ":" in options.pattern:
        raise OptionError(f"pattern {options.pattern} fixes its sparsity; --search needs an "
                          "unstructured, block or channel pattern")

    def run(sparsity: float) -> float:
        # allocation as resolved under search: the final run repeats it (see api.prune)
        probe = replace(options, sparsity=sparsity, validate=True,
                        max_error=None, search=False, allocate=options.allocation)
        result = prune_fn(model, probe)
        if result.report.comparison is None:
            raise OptionError("--search needs outputs to compare, but onnxruntime cannot run "
                              "this model (see the notes of a run without --search)")
        return float(result.report.comparison.max_rel_error)

    return run
