"""Passes that find and choose the weights to prune: :class:`FindWeights`, :class:`SelectWeights`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from onnxprune.errors import SelectionError
from onnxprune.masking.criteria import get_criterion
from onnxprune.masking.selection import select
from onnxprune.ops.weights import find_weights
from onnxprune.passes.base import Pass, PassRecord


@dataclass
class FindRecord(PassRecord):
    """The prunable weights found (keys, in graph order); ``skipped`` holds the rest."""

    weights: List[str] = field(default_factory=list)


@dataclass
class SelectRecord(PassRecord):
    """The weight keys selected for pruning; ``skipped`` holds those the selection left out."""

    selected: List[str] = field(default_factory=list)


class FindWeights(Pass):
    """Find every prunable weight (initializers, Constant nodes, behind Cast, in subgraphs)."""

    name = "find-weights"
    ensures = frozenset({"weights"})

    def run(self, state):
        state.weights, skipped = find_weights(state.handle)
        return FindRecord(summary=f"{len(state.weights)} prunable weights, {len(skipped)} skipped",
                          skipped=list(skipped), weights=[w.key for w in state.weights])


class SelectWeights(Pass):
    """Choose weights and per-weight settings (pattern, sparsity, criterion, bounds)."""

    name = "select"
    requires = frozenset({"weights"})
    ensures = frozenset({"selection"})

    def __init__(self, pattern: str = "unstructured", sparsity: Optional[Union[float, int]] = None,
                 criterion: str = "magnitude", op_types=None, include: Optional[str] = None,
                 exclude: Optional[str] = None, config=None, min_sparsity: float = 0.0,
                 max_sparsity: float = 0.98):
        self.kwargs = dict(pattern=pattern, sparsity=sparsity, criterion=criterion,
                           op_types=op_types, include=include, exclude=exclude, config=config,
                           min_sparsity=min_sparsity, max_sparsity=max_sparsity)

    def run(self, state):
        if not state.weights and state.skipped:
            seen = "; ".join(f"{s.name}: {s.reason}" for s in state.skipped[:3])
            raise SelectionError(f"the model has no prunable weights: every weight feeding "
                                 f"Conv/Gemm/MatMul was left alone ({seen})")
        state.plans, skipped = select(state.weights, **self.kwargs)
        for plan in state.plans:
            get_criterion(plan.criterion)  # fail early on an unknown criterion name
        return SelectRecord(summary=f"{len(state.plans)} weights selected", skipped=list(skipped),
                            selected=[p.weight.key for p in state.plans])
