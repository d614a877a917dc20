"""The Hessian memory budget: how many bytes of ``[in, in]`` Hessians calibrated pruning holds.

Reconstructing criteria (SparseGPT) and the channel refit need each layer's ``XᵀX``; VGG's
25088-input fc6 alone would take 5 GB. Every place that collects Hessians asks this module
whether a weight fits (:func:`fits_budget`), splits weights into chunks that fit together
(:func:`hessian_chunks`), and words the note for one that does not (:func:`over_budget`).
The budget is read at call time, so a test may lower :data:`HESSIAN_BUDGET_BYTES`.
"""

from __future__ import annotations

from typing import List, Sequence

#: Bytes of dense-model Hessians calibrated pruning holds at once.
HESSIAN_BUDGET_BYTES = 1 << 30


def hessian_bytes(weight) -> int:
    """Bytes of one float64 ``[in, in]`` Hessian of ``weight`` (plus one per group of a grouped
    Conv)."""
    cols = weight.layout.shape2d[1]
    return (1 + (weight.layout.group if weight.layout.group > 1 else 0)) * cols * cols * 8


def fits_budget(weight) -> bool:
    """True when ``weight``'s Hessian fits in :data:`HESSIAN_BUDGET_BYTES`."""
    return hessian_bytes(weight) <= HESSIAN_BUDGET_BYTES


def over_budget(weight) -> str:
    """``'its Hessian would take X GiB (over Y GiB)'`` for a weight that does not fit."""
    return (f"its Hessian would take {hessian_bytes(weight) / 2**30:.1f} GiB (over "
            f"{HESSIAN_BUDGET_BYTES / 2**30:.0f} GiB)")


def hessian_chunks(weights: Sequence) -> List[list]:
    """Consecutive groups of weights whose Hessians fit in the budget together (a weight
    larger than that alone)."""
    chunks: List[list] = [[]]
    used = 0
    for w in weights:
        size = hessian_bytes(w)
        if chunks[-1] and used + size > HESSIAN_BUDGET_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(w)
        used += size
    return chunks
