"""Building a :class:`~onnxprune.report.report.Report` from what the passes recorded.

A pruning run's report is folded from ``state.records`` in order: the per-weight results each
pass set (a later pass's result for a weight replaces an earlier one's), the weights left alone,
the channel groups left whole, notes, the output comparison, the sensitivity table and the
time each pass took. The model itself is read only to count MACs. Every "left alone" reason is
put in plain words (:func:`onnxprune.report.reasons.explain`), and a note says when zeros are
stored densely. :func:`layer_macs` fills each
row's MACs from a MAC count; ``inspect`` (:mod:`onnxprune.report.inspect`) and pruning runs use
it alike, and both give the MAC count each weight's density through :func:`note_density`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from onnxprune.ops.weights import Weight
from onnxprune.report.macs import MacCount, count_macs, node_label
from onnxprune.report.reasons import explain
from onnxprune.passes.base import LayerResult, PassRecord, PruneState
from onnxprune.passes.calibrated import SensitivityRecord
from onnxprune.passes.metric import MetricRecord
from onnxprune.passes.structure import ChannelRecord
from onnxprune.passes.validate import ValidateRecord
from onnxprune.passes.weights import FindRecord, SelectRecord
from onnxprune.report.report import ARROW, LayerRow, Report, format_bytes, format_count


def count_macs_or_error(model, input_shapes, densities) -> Union[MacCount, Exception]:
    """The model's MAC count, or the exception that stopped it (MACs are informative; a
    shape-inference gap must not stop a run)."""
    try:
        return count_macs(model, input_shapes, densities)
    except Exception as exc:
        return exc


def layer_macs(weight: Weight, macs: Optional[MacCount]) -> Optional[int]:
    """MACs of the node(s) reading ``weight`` in ``macs`` (None when none of them was counted)."""
    if macs is None:
        return None
    counts = [macs.per_node[node_label(c.node)] for c in weight.consumers
              if node_label(c.node) in macs.per_node]
    return sum(counts) if counts else None


def note_density(densities: Dict[str, float], weight: Weight, density: float) -> None:
    """Record ``weight``'s density (nonzero fraction) for the MAC count of each node reading it;
    a node reading several weights counts with the sparsest."""
    for consumer in weight.consumers:
        label = node_label(consumer.node)
        densities[label] = min(density, densities.get(label, 1.0))


def layer_results(records: Sequence[PassRecord]) -> Dict[str, LayerResult]:
    """Each weight's latest result over ``records``, in the order the weights were found."""
    latest: Dict[str, LayerResult] = {}
    for record in records:
        latest.update(record.layers)
    found = [r for r in records if isinstance(r, FindRecord)]
    order = found[-1].weights if found else list(latest)
    return {key: latest[key] for key in order if key in latest}


def build_report(state: PruneState, options: dict, output: Optional[Path],
                 size_before: Optional[int], size_after: Optional[int],
                 macs_before: Union[MacCount, Exception, None],
                 input_shapes: Optional[Mapping[str, Sequence[int]]]) -> Report:
    """The report of a finished pipeline, from the records of its passes (``state.records``);
    the pruned model is read for its MACs."""
    records = state.records
    layers = layer_results(records)
    weights = {w.key: w for w in state.weights}
    rows: List[LayerRow] = []
    densities: Dict[str, float] = {}
    for key, layer in layers.items():
        after = layer.shape_after or layer.shape
        params_after = int(np.prod(after, dtype=np.int64))
        rows.append(LayerRow(name=layer.name, op_type=layer.op_type, shape=layer.shape,
                             shape_after=after, params=layer.numel, params_after=params_after,
                             nonzeros_before=layer.nonzeros_before,
                             nonzeros_after=layer.nonzeros_after, pattern=layer.pattern,
                             criterion=layer.criterion, channels=layer.channels))
        if key in weights:
            note_density(densities, weights[key], layer.nonzeros_after / max(1, params_after))
    macs_after = count_macs_or_error(state.model, input_shapes, densities)
    notes = [n for r in records for n in r.notes]
    for label, m in (("before", macs_before), ("after", macs_after)):
        if isinstance(m, Exception):
            notes.append(f"MACs {label} not counted: {m}")
    ok_before = None if isinstance(macs_before, Exception) else macs_before
    ok_after = None if isinstance(macs_after, Exception) else macs_after
    for row, key in zip(rows, layers):
        if key in weights:
            row.macs_before = layer_macs(weights[key], ok_before)
            row.macs_after = layer_macs(weights[key], ok_after)
    itemsizes = [weights[k].dtype.itemsize if k in weights else 4 for k in layers]
    note = None if options.get("storage", "dense") != "dense" else \
        dense_zeros_note(rows, size_before, size_after, itemsizes)
    if note:
        notes.append(note)
    validations = [r for r in records if isinstance(r, ValidateRecord)]
    original = state.original
    return Report(
        model=str(original) if isinstance(original, Path) else "<in-memory model>",
        output=str(output) if output else None,
        rows=rows,
        skipped=[(s.name, explain("weight", s.reason)) for r in records for s in r.skipped]
        + [(name, explain("weight", NOT_SELECTED)) for name in not_selected(records, weights)],
        frozen=[(name, explain("group", reason)) for r in records
                if isinstance(r, ChannelRecord) for name, reason in r.frozen],
        macs_before=ok_before.total if ok_before else None,
        macs_after=ok_after.total if ok_after else None,
        sparse_macs_after=ok_after.sparse_total if ok_after else None,
        params_before=sum(r.params for r in rows),
        params_after=sum(r.params_after for r in rows),
        nonzeros_before=sum(r.nonzeros_before for r in rows),
        nonzeros_after=sum(r.nonzeros_after for r in rows),
        file_size_before=size_before,
        file_size_after=size_after,
        comparison=validations[-1].comparison if validations else None,
        warnings=[w for r in validations for w in r.warnings],
        options={k: v for k, v in options.items() if v is not None},
        notes=notes,
        timings={r.name: r.seconds for r in records},
        sections=sections(records, layers),
        metric=next((r.metric for r in records if isinstance(r, MetricRecord)), None),
    )


#: why a weight the options left out of the selection was not pruned
NOT_SELECTED = "not selected: left out by --op-types, --include or --exclude"


def not_selected(records: Sequence[PassRecord], weights: Mapping[str, Weight]) -> List[str]:
    """Names of the weights found but neither selected, nor reported (a row or a skip reason):
    those the selection options left out."""
    found = [r for r in records if isinstance(r, FindRecord)]
    selects = [r for r in records if isinstance(r, SelectRecord)]
    if not found or not selects:
        return []
    selected = set(selects[-1].selected)
    reported = {s.name for r in records for s in r.skipped}
    reported.update(key for r in records for key in r.layers)
    names = []
    for key in found[-1].weights:
        weight = weights.get(key)
        if weight is not None and key not in selected and key not in reported \
                and weight.name not in reported:
            names.append(weight.name)
    return names


def dense_zeros_note(rows: Sequence[LayerRow], size_before: Optional[int],
                     size_after: Optional[int], itemsizes: Optional[Sequence[int]] = None
                     ) -> Optional[str]:
    """A note when pruning left zeros stored in full (a masked pattern without resizing): the
    nonzeros dropped, the file did not shrink by as much, and what would shrink it (with
    ``itemsizes``, one per row, the bytes ``--storage sparse`` would save, from the nonzeros)."""
    new_zeros = sum((r.params_after - r.nonzeros_after) - (r.params - r.nonzeros_before)
                    for r in rows)
    if new_zeros <= 0:
        return None
    sizes = ""
    if size_before is not None and size_after is not None:
        sizes = f" (file {format_bytes(size_before)} {ARROW} {format_bytes(size_after)})"
    return (f"zeros are stored densely: the {format_count(new_zeros)} weights set to zero still "
            f"take their full space in the file{sizes}; the file shrinks only when compressed "
            "(e.g. zip/gzip, which packs the runs of zeros) or with --pattern channel, which "
            f"removes whole channels, or with --storage bitmask or sparse"
            f"{_sparse_saving(rows, itemsizes)}")


def _sparse_saving(rows: Sequence[LayerRow], itemsizes: Optional[Sequence[int]]) -> str:
    """`` (about N / M smaller)``: what ``--storage bitmask`` / ``sparse`` would save, from
    each row's nonzeros."""
    from onnxprune.model.sparse import estimated_saving

    sizes = list(itemsizes) if itemsizes is not None else [4] * len(rows)
    counts = [(r.params_after, r.nonzeros_after, s) for r, s in zip(rows, sizes)]
    bitmask, sparse = estimated_saving(counts, form="bitmask"), estimated_saving(counts)
    if bitmask <= 0 and sparse <= 0:
        return (" (which save nothing here: a weight needs over 1/2 zeros for bitmask, 2/3 for "
                "sparse's int64 indices)")
    return f" (about {format_bytes(bitmask)} / {format_bytes(sparse)} smaller)"


def sections(records: Sequence[PassRecord], layers: Mapping[str, LayerResult]
             ) -> Dict[str, List[dict]]:
    """Extra report tables: the sensitivity table when one was measured, the channel widths
    a --target-macs/--target-speedup allocation chose, and the tables a record carries as
    ``sections`` (title -> rows; e.g. channel permutation's kept saliency)."""
    carried = {k: v for r in records for k, v in (getattr(r, "sections", None) or {}).items()}
    out: Dict[str, List[dict]] = {}
    for r in records:
        if isinstance(r, ChannelRecord) and r.allocation:
            a = r.allocation
            kind, target = next(iter(a["target"].items()))
            out["channel allocation target"] = [dict(
                {"target": kind, "value": target, "reached": a["reached"],
                 "macs_ratio": a["macs_ratio"], "predicted_macs_ratio": a["predicted_macs_ratio"]},
                **{k: a[k] for k in ("predicted_speedup", "measured_speedup", "threads")
                   if a.get(k) is not None})]
            out[f"channel allocation ({kind} target)"] = [
                {k: g[k] for k in ("group", "describe", "channels", "kept")} for g in a["groups"]]
    return {**out, **carried, **_sensitivity_section(records, layers)}


def _sensitivity_section(records, layers):
    tables = [r.table for r in records if isinstance(r, SensitivityRecord) and r.table is not None]
    if not tables:
        return {}
    table = tables[-1]
    rows = []
    for key, errors in table.errors.items():
        row = {"weight": key, "params": table.numel.get(key)}
        row.update({f"err@{s:g}": float(e) for s, e in zip(table.sparsities, errors)})
        if key in layers:
            layer = layers[key]
            row["sparsity"] = round(1 - layer.nonzeros_after / max(1, layer.numel), 4)
        rows.append(row)
    return {f"sensitivity ({table.metric}, {table.samples} samples)": rows}


__all__ = ["NOT_SELECTED", "build_report", "count_macs_or_error", "dense_zeros_note",
           "not_selected", "layer_macs", "layer_results", "note_density",
           "sections"]
