"""Passes that find and choose the weights to prune: :class:`FindWeights`, :class:`SelectWeights`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from onnxprune.errors import SelectionError
from onnxprune.masking.criteria import get_criterion
from onnxprune.masking.patterns import NM, parse_pattern
from onnxprune.masking.selection import select
from onnxprune.ops.targets import SparseVerdict, tensorrt_eligibility
from onnxprune.ops.weights import Skipped, find_weights
from onnxprune.passes.base import Pass, PassRecord


@dataclass
class FindRecord(PassRecord):
    """The prunable weights found (keys, in graph order); ``skipped`` holds the rest."""

    weights: List[str] = field(default_factory=list)


@dataclass
class SelectRecord(PassRecord):
    """The weight keys selected for pruning; ``skipped`` holds those the selection left out."""

    selected: List[str] = field(default_factory=list)
    #: ``--target``: the runtime named, and with ``tensorrt`` each weight's 2:4 verdict
    target: Optional[str] = None
    verdicts: List[SparseVerdict] = field(default_factory=list)


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
                 max_sparsity: float = 0.98, target: Optional[str] = None):
        self.kwargs = dict(pattern=pattern, sparsity=sparsity, criterion=criterion,
                           op_types=op_types, include=include, exclude=exclude, config=config,
                           min_sparsity=min_sparsity, max_sparsity=max_sparsity)
        self.target = target

    def run(self, state):
        if not state.weights and state.skipped:
            seen = "; ".join(f"{s.name}: {s.reason}" for s in state.skipped[:3])
            raise SelectionError(f"the model has no prunable weights: every weight feeding "
                                 f"Conv/Gemm/MatMul was left alone ({seen})")
        state.plans, skipped = select(state.weights, **self.kwargs)
        for plan in state.plans:
            get_criterion(plan.criterion)  # fail early on an unknown criterion name
        verdicts = []
        if self.target == "tensorrt":  # 2:4 only where TensorRT would run it sparse
            verdicts = tensorrt_eligibility(state.handle, state.weights, state.skipped)
            had = len(state.plans)
            state.plans, dense = _sparse_where_picked(state.plans, verdicts)
            if had and not state.plans:
                n_elig = sum(v.eligible for v in verdicts if v.is_weight)
                n_all = sum(v.is_weight for v in verdicts)
                why = (f"{n_elig} of {n_all} eligible, none large enough to be likely picked: "
                       "K and C×kernel ≥ 256") if n_elig else f"none of the {n_all} is eligible"
                raise SelectionError(
                    f"--target tensorrt: no selected weight is one TensorRT would run 2:4 sparse "
                    f"({why}); nothing to prune. See `onnxprune inspect MODEL --target "
                    "tensorrt`, or drop --target to prune them anyway")
            skipped = _say_tensorrt(skipped, verdicts, self.kwargs["pattern"]) + dense
        return SelectRecord(summary=f"{len(state.plans)} weights selected", skipped=list(skipped),
                            selected=[p.weight.key for p in state.plans], target=self.target,
                            verdicts=verdicts)


def satisfies_24(pattern) -> bool:
    """True when every mask of ``pattern`` holds at most 2 nonzeros in each 4 consecutive
    ``in`` elements (2:4, 1:4, 1:2, 2:8, ...): the zeros TensorRT's sparse kernels use."""
    if not isinstance(pattern, NM):
        return False
    if pattern.m % 4 == 0:
        return pattern.n <= 2
    return 4 % pattern.m == 0 and pattern.n * (4 // pattern.m) <= 2


def _say_tensorrt(skipped, verdicts: List[SparseVerdict], pattern: str) -> List[Skipped]:
    """``--target tensorrt`` with a 2:4-shaped pattern: a weight the selection left out that
    TensorRT would not run sparse anyway is reported with TensorRT's reason (the selection's
    own follows in brackets unless it says the same)."""
    if pattern == "channel" or not satisfies_24(parse_pattern(pattern)):
        return list(skipped)
    names = {}
    for v in verdicts:
        if v.is_weight and not v.picked:
            names[v.name] = v
    out = []
    for s in skipped:
        v = names.get(s.name)
        if v is not None:  # the selection's N:M channel-fit reason is TensorRT's C % 4 rule
            also = "" if "needs input channels in multiples" in s.reason else f"; also: {s.reason}"
            s = Skipped(s.name, f"{v.dense_reason}; stays dense (--target tensorrt{also})",
                        s.readers)
        out.append(s)
    return out


def _sparse_where_picked(plans, verdicts: List[SparseVerdict]):
    """``--target tensorrt``: keep the plans of a 2:4-shaped pattern only for the weights
    TensorRT can run sparse and likely picks; the others stay dense, each skipped with its
    verdict's reason. Plans of other patterns are kept as they are."""
    by_key = {v.name: v for v in verdicts if v.is_weight}
    kept, dense = [], []
    for plan in plans:
        verdict = by_key.get(plan.weight.key)
        if satisfies_24(plan.pattern) and verdict is not None and not verdict.picked:
            dense.append(Skipped(plan.weight.name,
                                 f"{verdict.dense_reason}; stays dense (--target tensorrt)"))
        else:
            kept.append(plan)
    return kept, dense
