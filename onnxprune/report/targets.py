"""The report's ``--target`` part: what the deployment runtime can make of the model.

The rules live in :mod:`onnxprune.ops.targets`; this module turns them into report content, for
``onnxprune inspect MODEL --target T`` and a pruning run with ``--target T`` alike:

* ``tensorrt``: the section ``"target tensorrt: 2:4 eligibility"`` (one row per Conv/Gemm/MatMul
  weight, or node without a constant weight: C, K, C×kernel, precision, eligible, likely
  picked, whether it holds 2:4 zeros now, its MACs and the reason in words), the section
  ``"target tensorrt: MACs"`` (one row: total MACs, and the MACs and fraction eligible, likely
  picked, and in weights that are 2:4 now and eligible — the work that can run sparse), and a
  note saying the same in one sentence; with calibration data, the section
  ``"target tensorrt: 2:4 error vs MAC share (...)"`` of :mod:`onnxprune.passes.target`. MACs are the dense counts of
  :mod:`onnxprune.report.macs` on the model before pruning.
* ``onnxruntime-cpu``: the section ``"target onnxruntime-cpu"`` (which patterns speed it up)
  and :data:`~onnxprune.ops.targets.ORT_CPU_NOTE`; in a pruning run, what the run's pattern
  does there.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from onnxprune.errors import OptionError
from onnxprune.model.io import ModelHandle
from onnxprune.ops.targets import (MIN_SPARSE_SIZE, ORT_CPU_NOTE, TARGETS, SparseVerdict,
                                   tensorrt_eligibility)
from onnxprune.ops.weights import Skipped, Weight
from onnxprune.passes.target import TrimRecord
from onnxprune.passes.weights import SelectRecord
from onnxprune.report.build import layer_macs
from onnxprune.report.macs import MacCount

#: Section titles (keys of ``Report.sections``).
TRT_TABLE = "target tensorrt: 2:4 eligibility"
TRT_MACS = "target tensorrt: MACs"
ORT_TABLE = "target onnxruntime-cpu"
TRT_TRIM = "target tensorrt: 2:4 error vs MAC share (--sparse-error-ratio {ratio:g})"


def check_target(target: Optional[str]) -> None:
    if target is not None and target not in TARGETS:
        raise OptionError(f"--target must be one of {', '.join(TARGETS)}, got '{target}'")


def is_24(weight: Weight, values: np.ndarray) -> bool:
    """True when ``values`` (the weight's stored array) has zeros and at most 2 nonzeros in
    every 4 consecutive ``in`` elements of its ``W[out, in]`` view."""
    from onnxprune.report.inspect import satisfies_nm

    if tuple(values.shape) != weight.layout.stored_shape or np.count_nonzero(values) == values.size:
        return False
    return satisfies_nm(weight.layout.to_2d(values), 2, 4)


def tensorrt_tables(verdicts: Sequence[SparseVerdict], weights: Mapping[str, Weight],
                    macs: Optional[MacCount], sparse_now: Mapping[str, bool]
                    ) -> Dict[str, List[dict]]:
    """The two ``tensorrt`` sections: the per-weight table and the MAC summary.
    ``sparse_now``: weight key -> whether it holds 2:4 zeros (the pruned model's, in a run)."""
    rows, total = [], (macs.total if macs is not None else None)
    sums = {"eligible": 0, "picked": 0, "sparse": 0}
    for v in verdicts:
        if v.is_weight and v.name in weights:
            n = layer_macs(weights[v.name], macs)
        else:
            n = None if macs is None else macs.per_node.get(v.name)
        now = bool(sparse_now.get(v.name, False))
        rows.append({"weight": v.name if v.is_weight else "", "node": ", ".join(v.nodes),
                     "op": v.op_type, "C": v.channels, "K": v.outputs, "C×kernel": v.reduction,
                     "precision": v.precision, "eligible": v.eligible, "likely picked": v.picked,
                     "2:4 now": now, "MACs": n, "reason": v.reason})
        for key, on in (("eligible", v.eligible), ("picked", v.picked),
                        ("sparse", v.eligible and now)):
            if on and n:
                sums[key] += n

    def frac(x: int) -> Optional[float]:
        return round(x / total, 4) if total else None

    summary = {"MACs": total}
    for key, label in (("eligible", "eligible"), ("picked", "likely picked"),
                       ("sparse", "2:4 and eligible (can run sparse)")):
        summary[f"{label} MACs"] = sums[key] if total is not None else None
        summary[f"{label} fraction"] = frac(sums[key])
    return {TRT_TABLE: rows, TRT_MACS: [summary]}


def tensorrt_note(tables: Mapping[str, List[dict]], pruning: bool) -> str:
    """One sentence of the MAC fractions (``pruning``: said of a pruning run's result)."""
    s = tables[TRT_MACS][0]
    rows = tables[TRT_TABLE]
    n_elig = sum(r["eligible"] for r in rows)
    n_pick = sum(r["likely picked"] for r in rows)
    if s["MACs"] is None:
        return (f"target tensorrt: {n_elig} of {len(rows)} Conv/Gemm/MatMul layers eligible for "
                f"2:4 sparse kernels, {n_pick} likely picked (MACs not counted)")

    def pct(key: str) -> str:  # from the MAC counts, not the rounded fraction
        macs = s[key.replace(" fraction", " MACs")]
        return f"{100 * macs / s['MACs']:.1f}%" if s["MACs"] else "n/a"

    head = (f"target tensorrt: {n_elig} of {len(rows)} Conv/Gemm/MatMul layers are eligible for "
            f"2:4 sparse kernels ({pct('eligible fraction')} of the MACs), {n_pick} are large "
            f"enough to be likely picked (K and C×kernel ≥ {MIN_SPARSE_SIZE}: "
            f"{pct('likely picked fraction')} of the MACs)")
    sparse = pct("2:4 and eligible (can run sparse) fraction")
    if pruning:
        return (f"{head}; after pruning, {sparse} of the model's MACs are in 2:4 weights "
                "TensorRT can run sparse (when built with --sparsity=enable and fp16/int8)")
    return f"{head}; {sparse} of the MACs are in weights already 2:4"


def ort_cpu_table() -> List[dict]:
    return [
        {"pattern": "channel", "speeds up onnxruntime-cpu": True,
         "why": "removes whole channels: fewer MACs, smaller dense kernels"},
        {"pattern": "unstructured, NxM blocks, N:M", "speeds up onnxruntime-cpu": False,
         "why": "zeros stored in dense tensors are computed like any other value "
                "(measured 0.90–1.00× latency)"},
    ]


def inspect_target(report, target: Optional[str], handle: ModelHandle, weights: Sequence[Weight],
                   skipped: Sequence[Skipped], macs: Optional[MacCount],
                   now: Mapping[str, bool]) -> None:
    """Add ``target``'s sections and note to an ``inspect`` report (``now``: weight key ->
    whether it holds 2:4 zeros, as inspect found)."""
    check_target(target)
    if target is None:
        return
    if target == "onnxruntime-cpu":
        report.sections[ORT_TABLE] = ort_cpu_table()
        report.notes.append(ORT_CPU_NOTE)
        return
    verdicts = tensorrt_eligibility(handle, weights, skipped)
    by_key = {w.key: w for w in weights}
    tables = tensorrt_tables(verdicts, by_key, macs, now)
    report.sections.update(tables)
    report.notes.append(tensorrt_note(tables, pruning=False))


def add_target(report, target: str, state, macs_before: Union[MacCount, Exception, None]
               ) -> None:
    """Add ``target``'s sections and notes to a pruning run's report (``state``: the finished
    :class:`~onnxprune.passes.base.PruneState`; MACs are the dense model's)."""
    macs = macs_before if isinstance(macs_before, MacCount) else None
    pattern = str(report.options.get("pattern", ""))
    if target == "onnxruntime-cpu":
        report.sections[ORT_TABLE] = ort_cpu_table()
        if pattern == "channel":
            report.notes.append("target onnxruntime-cpu: channel removal is the pattern that "
                                "speeds onnxruntime on CPU up, in proportion to the MACs removed")
        else:
            report.notes.append(f"{ORT_CPU_NOTE}; this run's {pattern} zeros will not speed it "
                                "up")
        return
    selects = [r for r in state.records if isinstance(r, SelectRecord) and r.verdicts]
    if not selects:
        return
    weights = {w.key: w for w in state.weights}
    now: Dict[str, bool] = {}
    for key, weight in weights.items():
        try:
            now[key] = is_24(weight, state.handle.read(weight.tensor))
        except Exception:  # a tensor replaced by a resize: its layout no longer applies
            now[key] = False
    tables = tensorrt_tables(selects[-1].verdicts, weights, macs, now)
    report.sections.update(tables)
    trims = [r for r in state.records if isinstance(r, TrimRecord) and r.table]
    if trims:
        report.sections[TRT_TRIM.format(ratio=trims[-1].ratio)] = trims[-1].table
    report.notes.append(tensorrt_note(tables, pruning=True))
    if not any(now.values()):
        report.notes.append(f"target tensorrt: --pattern {pattern} leaves no weight 2:4, so "
                            "TensorRT runs every layer dense; --pattern 2:4 gives zeros its "
                            "sparse kernels use")


__all__ = ["ORT_TABLE", "TRT_MACS", "TRT_TABLE", "TRT_TRIM", "add_target", "check_target",
           "inspect_target",
           "is_24", "ort_cpu_table", "tensorrt_note", "tensorrt_tables"]
