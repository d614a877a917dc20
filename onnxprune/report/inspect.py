"""``onnxprune inspect MODEL``: what a model holds before anything is pruned.

Builds a :class:`~onnxprune.report.report.Report` whose rows are the prunable weights with before ==
after, so the same renderer and JSON serve both ``inspect`` and a pruning run. Each row's
``pattern`` lists the sparsity patterns the weight already satisfies on its logical
``W[out, in]`` view (``2:4``: at most 2 nonzeros in every 4 consecutive ``in`` elements; ``4x1``:
zeros come in whole blocks of 4 output rows × 1 input column, and there are some), so a user
sees whether a model was pruned before and for which kernels. Per-row MACs come from
:func:`onnxprune.report.build.layer_macs`, as in a pruning run's report.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import numpy as np

from onnxprune.errors import OnnxPruneError
from onnxprune.model.io import ModelLike, load
from onnxprune.report.macs import count_macs
from onnxprune.report.build import layer_macs, note_density
from onnxprune.report.reasons import explain
from onnxprune.report.report import LayerRow, Report
from onnxprune.report.targets import check_target, inspect_target
from onnxprune.inputs.signature import input_signature
from onnxprune.ops.weights import find_weights


def inspect_model(model: ModelLike,
                  input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                  target: Optional[str] = None) -> Report:
    """A :class:`Report` describing the model's prunable weights, params, sparsity and MACs.

    ``input_shapes`` fixes dynamic input dims for the MAC count (as ``--input-shape``). If MACs
    cannot be counted (an input without a declared shape, say) the report says so in ``notes``
    rather than failing. ``target`` (``--target``) adds what that runtime can use
    (:mod:`onnxprune.report.targets`: TensorRT's 2:4 eligibility table and MAC fractions).
    """
    check_target(target)
    handle = load(model)
    weights, skipped = find_weights(handle)
    notes: List[str] = []
    macs = None
    densities = {}
    rows: List[LayerRow] = []
    now = {}  # weight key -> holds 2:4 zeros
    for weight in weights:
        values = handle.read(weight.tensor)
        nonzeros = int(np.count_nonzero(values))
        w2d = weight.layout.to_2d(values)
        patterns = [name for name, check in (("2:4", lambda w: satisfies_nm(w, 2, 4)),
                                             ("4x1", lambda w: satisfies_blocks(w, 4, 1)))
                    if check(w2d)]
        note_density(densities, weight, nonzeros / max(weight.numel, 1))
        now[weight.key] = "2:4" in patterns and nonzeros < weight.numel
        note = []
        if len(weight.consumers) > 1:
            note.append(f"shared by {len(weight.consumers)} nodes")
        if weight.consumers[0].via:
            note.append("via " + "→".join(weight.consumers[0].via))
        if weight.location == "constant":
            note.append("Constant node")
        rows.append(LayerRow(name=weight.key, op_type=weight.op_type, shape=weight.shape,
                             shape_after=weight.shape, params=weight.numel,
                             params_after=weight.numel, nonzeros_before=nonzeros,
                             nonzeros_after=nonzeros, pattern=",".join(patterns),
                             note=", ".join(note)))

    try:
        macs = count_macs(handle, input_shapes, densities=densities)
    except OnnxPruneError as exc:
        notes.append(f"MACs not counted: {exc}")
    if macs is not None:
        notes.extend(macs.notes)
        if macs.unknown:
            shown = ", ".join(macs.unknown[:5]) + (" …" if len(macs.unknown) > 5 else "")
            notes.append(f"MACs of {len(macs.unknown)} node(s) not counted (shapes unknown or "
                         f"inside If/Loop/Scan bodies): {shown}")
        for row, weight in zip(rows, weights):
            row.macs_before = row.macs_after = layer_macs(weight, macs)

    params = sum(r.params for r in rows)
    nonzeros = sum(r.nonzeros_before for r in rows)
    inputs = []
    for spec in input_signature(handle):
        used = None if macs is None else macs.input_shapes.get(spec.name)
        inputs.append({"name": spec.name, "dtype": str(spec.dtype), "declared": spec.declared,
                       "shape used": None if used is None else list(used)})
    report = Report(
        model=str(handle.path) if handle.path is not None else "<in-memory model>",
        output=None, rows=rows, skipped=[(s.name, explain("weight", s.reason)) for s in skipped],
        macs_before=None if macs is None else macs.total,
        macs_after=None if macs is None else macs.total,
        sparse_macs_after=None if macs is None else macs.sparse_total,
        params_before=params, params_after=params, nonzeros_before=nonzeros,
        nonzeros_after=nonzeros, file_size_before=handle.file_size(),
        options={"input_shapes": {k: list(v) for k, v in (input_shapes or {}).items()}},
        notes=notes, sections={"inputs": inputs})
    _channel_summary(report, handle, input_shapes, weights)
    if target is not None:
        report.options["target"] = target
        inspect_target(report, target, handle, weights, skipped, macs, now)
    return report


def _channel_summary(report: Report, handle, input_shapes, weights) -> None:
    """What ``--pattern channel`` could remove: the channel groups a weight produces, those
    left whole (``report.frozen``, with why) and the share of the weights' params in groups it
    can prune — a note."""
    from onnxprune.channels.graph import build_channel_graph

    try:
        graph = build_channel_graph(handle, input_shapes)
    except OnnxPruneError as exc:
        report.notes.append(f"channel groups not built: {exc}")
        return
    groups = [g for g in graph.groups if g.producers]
    if not groups:
        return
    report.frozen = [(g.describe(), explain("group", g.frozen)) for g in groups if g.frozen]
    reach = {n for g in groups if g.prunable for n in g.producers + g.consumers}
    size = {w.name: w.numel for w in weights}
    total = sum(size.values())
    share = sum(v for n, v in size.items() if n in reach) / total if total else 0.0
    streams = sum(1 for g in groups if g.prunable and g.stream)
    report.notes.append(
        f"channel pruning (--pattern channel): {len(groups) - len(report.frozen)} of "
        f"{len(groups)} channel groups can lose channels" + (
            f" ({streams} of them residual streams, kept whole unless --prune-stream)"
            if streams else "") + f", in weights holding {100 * share:.0f}% of the params; "
        "the frozen ones keep theirs, and say why")


def satisfies_nm(w2d: np.ndarray, n: int, m: int) -> bool:
    """True when every ``m`` consecutive elements of each row hold at most ``n`` nonzeros (a
    ragged tail counts as a group padded with zeros)."""
    rows, cols = w2d.shape
    pad = (-cols) % m
    nz = w2d != 0
    if pad:
        nz = np.concatenate([nz, np.zeros((rows, pad), dtype=bool)], axis=1)
    return bool((nz.reshape(rows, -1, m).sum(axis=2) <= n).all())


def satisfies_blocks(w2d: np.ndarray, block_rows: int, block_cols: int) -> bool:
    """True when the weight has zeros and every ``block_rows × block_cols`` block is either all
    zero or free of zeros (ragged edge blocks are checked as the smaller blocks they are)."""
    zero = w2d == 0
    if not zero.any():
        return False
    rows, cols = zero.shape
    # Full blocks, then the ragged bottom/right edges as smaller blocks of their own.
    full_r, full_c = rows - rows % block_rows, cols - cols % block_cols
    parts = [(slice(0, full_r), slice(0, full_c), block_rows, block_cols),
             (slice(full_r, rows), slice(0, full_c), rows - full_r, block_cols),
             (slice(0, full_r), slice(full_c, cols), block_rows, cols - full_c),
             (slice(full_r, rows), slice(full_c, cols), rows - full_r, cols - full_c)]
    for rs, cs, br, bc in parts:
        part = zero[rs, cs]
        if part.size == 0:
            continue
        pr, pc = part.shape
        blocks = part.reshape(pr // br, br, pc // bc, bc)
        counts = blocks.sum(axis=(1, 3))
        if ((counts != 0) & (counts != br * bc)).any():
            return False
    return True
