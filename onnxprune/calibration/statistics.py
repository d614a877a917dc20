"""Per-layer activation statistics computed from calibration data.

This module owns **layer statistics** (:func:`collect_layer_stats`), over a
:class:`~onnxprune.inputs.dataset.CalibrationSet` from the input layer: for every prunable
weight, the matrix ``X`` its ``W[out, in]`` view multiplies (one row per sample and output
position, columns in exactly the order of :meth:`Layout.to_2d`'s ``in``), reduced while
streaming to ``in_sq_norms = sum_rows x_j**2`` (Wanda's ``||X_j||^2``), ``hessian = X^T X``
(SparseGPT, least-squares refits) and ``in_sums`` (means, bias correction), all in float64.

How ``X`` is formed from one activation batch, per op (im2col for Conv/ConvTranspose, the
other operand for Gemm/MatMul), is :mod:`onnxprune.calibration.extract`'s; this module runs the
model, streams those row blocks into float64 accumulators and returns the statistics.

Activations are read by adding them as graph outputs of a copy of the model, run in
onnxruntime batch by batch (:func:`onnxprune.runtime.session.exposed_batches`). Layers are
processed in *chunks* so that the activations exposed at once stay under ``budget_bytes`` per
batch (shapes from shape inference at the actual input shapes); weights reading the same activation the same way (Q/K/V projections) share one
accumulator. The :class:`StatsRecord` says how many chunks and model runs it took and the peak
bytes held (exposed activations + im2col block + accumulators).

Weights used inside ``If``/``Loop``/``Scan`` bodies cannot have their activations exposed and
are listed in :attr:`StatsRecord.skipped` with a reason.

Speed (what the calibrated passes ask for): ``sample_rows`` reads a Conv weight's ``X`` at
seeded output positions only, at most :func:`row_cap` rows over the whole calibration set
(``ROWS_PER_COLUMN`` per input column, at least ``MIN_ROWS``), every sum exactly that of the
rows read; ``precision="float32"`` multiplies blocks in float32 after shifting them by fixed
column means, so the rounding is relative to the centered data (:class:`_Accumulator`).
:attr:`StatsRecord.rows` says how many rows each weight used of how many, and
:attr:`StatsRecord.seconds` how long the collection took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from onnxprune.errors import OptionError
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import ModelHandle, load
from onnxprune.model.shapes import infer_shapes
from onnxprune.runtime.session import exposed_batches
from onnxprune.ops.registry import complete_types
from onnxprune.ops.weights import Weight
from onnxprune.calibration.extract import Extractor, extractor_for, sample_positions

__all__ = ["LayerStats", "StatsRecord", "LayerStatsMap", "collect_layer_stats", "row_cap",
           "rows_note"]

#: Activation bytes per batch exposed at once before a new chunk of layers starts.
DEFAULT_BUDGET_BYTES = 1 << 30
#: Bytes of one float64 im2col block (rows are streamed through in blocks of this size).
BLOCK_BYTES = 32 << 20
#: Sampled Conv statistics (``sample_rows=True``): a weight's ``X`` keeps at most
#: ``ROWS_PER_COLUMN`` rows per column of its ``W[out, in]`` view (``in`` = k*k*Cin/g), and
#: never caps below ``MIN_ROWS`` (see :func:`row_cap`). A ``[in, in]`` Hessian estimated from
#: 32 x in well-spread rows is what SparseGPT needs; a 416x416 input gives 64 images x 43 k
#: positions = 2.8 M rows for a stride-2 layer, 100x more than that.
ROWS_PER_COLUMN = 32
MIN_ROWS = 4096

Progress = Callable[[int, int], None]  # (batches done, batches in total over all chunks)


# =============================================================================================
# layer statistics
# =============================================================================================
@dataclass
class LayerStats:
    """What calibration says about the input ``X`` of one weight's ``W[out, in]`` view.

    ``X`` has one row per (sample, output position) and one column per ``in`` entry, in
    :meth:`Layout.to_2d` order. All sums are float64 over every row seen.
    """

    in_sq_norms: np.ndarray  # [in]  sum_rows x_j^2, so ||X_j||_2 = sqrt(in_sq_norms)
    hessian: Optional[np.ndarray]  # [in, in]  X^T X (None when not asked for)
    count: int  # rows of X
    in_sums: np.ndarray  # [in]  sum_rows x_j (means for bias correction)
    group_hessians: Optional[np.ndarray] = None  # [g, in, in] grouped Conv: rows of group i
    group_sums: Optional[np.ndarray] = None  # [g, in]  sum over group i's rows (g = 1 too)
    group_rows: int = 0  # rows of X each group's sums are over
    # Paired with a reference model fed the same inputs (collect_layer_stats(reference=...)):
    # X_ref is the reference model's X, row for row.
    ref_sums: Optional[np.ndarray] = None  # [g, in]  sum over group i's rows of X_ref
    cross: Optional[np.ndarray] = None  # [g, in, in]  X_i^T X_ref_i (with the Hessian)
    # collect_layer_stats(split=True): the same statistics over the even-numbered and the
    # odd-numbered calibration batches (this object holds their sum); a fit part and a
    # held-out part at no extra model run.
    parts: Optional[List["LayerStats"]] = None

    @property
    def in_norms(self) -> np.ndarray:
        """``||X_j||_2`` per input column (what the Wanda criterion takes)."""
        return np.sqrt(self.in_sq_norms)

    @property
    def in_mean(self) -> np.ndarray:
        return self.in_sums / max(self.count, 1)

    @property
    def sparsegpt_hessian(self) -> Optional[np.ndarray]:
        """The Hessian to give :func:`onnxprune.calibration.reconstruct.sparsegpt_prune`: per row group
        (``[g, in, in]``) for a grouped Conv, else ``[in, in]``."""
        return self.group_hessians if self.group_hessians is not None else self.hessian

    @property
    def nbytes(self) -> int:
        arrays = (self.in_sq_norms, self.hessian, self.in_sums, self.group_hessians,
                  self.group_sums, self.ref_sums, self.cross)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class StatsRecord:
    """What :func:`collect_layer_stats` did."""

    chunks: List[List[str]] = field(default_factory=list)  # weight keys per chunk
    model_runs: int = 0  # onnxruntime runs (batches x chunks)
    peak_bytes: int = 0  # exposed activations + im2col block + accumulators, at most
    data_free: bool = False
    skipped: Dict[str, str] = field(default_factory=dict)  # weight key -> why no stats
    # weight key -> (rows of X summed, rows there were): they differ where rows were sampled
    rows: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the collection (model runs + reductions)


class LayerStatsMap(dict):
    """``{weight.key: LayerStats}`` with the run's :class:`StatsRecord` as ``.record``."""

    record: StatsRecord


class _Accumulator:
    """Streaming float64 sums for one extractor signature.

    Float32 blocks (``precision="float32"``) are *shifted* before their products: every row
    has a fixed per-column vector ``s`` (the first block's column means, rounded to float32)
    subtracted, so the float32 products ``Y^T Y`` carry rounding relative to the *centered*
    spread of the data, not to its mean (a post-ReLU or post-BN input with a large mean would
    otherwise lose the centered Hessian to cancellation). :meth:`finish` adds the shift back
    exactly in float64: ``X^T X = Y^T Y + s (sum y)^T + (sum y) s^T + r s s^T``.
    """

    def __init__(self, extractor: Extractor, want_hessian: bool, paired: bool = False) -> None:
        g, d = extractor.groups, extractor.in_dim
        self.extractor = extractor
        self.sq = np.zeros((g, d))
        self.sums = np.zeros((g, d))
        self.h = np.zeros((g, d, d)) if want_hessian else None
        self.ref_sums = np.zeros((g, d)) if paired else None
        self.cross = np.zeros((g, d, d)) if paired and want_hessian else None
        self.rows = 0
        self.available = 0  # rows of X there were (sampled: more than ``rows``)
        self.shift: Optional[np.ndarray] = None  # [g, d] float32 (float32 blocks only)
        self.ref_shift: Optional[np.ndarray] = None
        self.shifted_rows = 0  # rows per group summed after the shift

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.sq, self.sums, self.h, self.ref_sums, self.cross)
                   if a is not None)

    def add(self, block: np.ndarray, ref_block: Optional[np.ndarray] = None) -> None:
        """One row block of ``X`` (and, paired, the same rows of the reference's ``X``)."""
        if block.dtype == np.float32 and block.shape[1]:
            if self.shift is None:
                self.shift = block.mean(axis=1, dtype=np.float64).astype(np.float32)
                if ref_block is not None:
                    self.ref_shift = ref_block.mean(axis=1, dtype=np.float64).astype(np.float32)
            block = block - self.shift[:, None, :]
            if ref_block is not None:
                ref_block = ref_block - self.ref_shift[:, None, :]
            self.shifted_rows += block.shape[1]
        if self.ref_sums is not None:
            self.ref_sums += ref_block.sum(axis=1, dtype=np.float64)
            if self.cross is not None:
                self.cross += np.matmul(block.transpose(0, 2, 1), ref_block)
        # Block products may be float32 (precision="float32"); sums across blocks are float64.
        self.sums += block.sum(axis=1, dtype=np.float64)
        if self.h is None:
            self.sq += np.einsum("gri,gri->gi", block, block, dtype=np.float64)
        elif block.shape[0] == 1:
            b = block[0]
            self.h[0] += b.T @ b  # numpy turns a.T @ a into one symmetric rank-k update
        else:
            self.h += np.matmul(block.transpose(0, 2, 1), block)
        self.rows += block.shape[0] * block.shape[1]

    def add_moments(self, sums: np.ndarray, sq: np.ndarray, rows: int,
                    ref_sums: Optional[np.ndarray] = None) -> None:
        """What :meth:`add` gathers without a Hessian, from :meth:`Extractor.moments`."""
        self.sums += sums
        self.sq += sq
        if self.ref_sums is not None:
            self.ref_sums += ref_sums
        self.rows += rows * sums.shape[0]

    def _unshift(self) -> None:
        """Add the float32 blocks' shift back, exactly, in float64 (see the class doc)."""
        if self.shift is None:
            return
        r, s = self.shifted_rows, self.shift.astype(np.float64)
        ys = self.sums.copy()  # sum of shifted rows (moments-path rows carry no shift)
        if self.h is not None:
            self.h += (s[:, :, None] * ys[:, None, :] + ys[:, :, None] * s[:, None, :]
                       + r * s[:, :, None] * s[:, None, :])
        else:
            self.sq += 2 * s * ys + r * s * s
        if self.ref_sums is not None:
            sr = self.ref_shift.astype(np.float64)
            yr = self.ref_sums.copy()
            if self.cross is not None:
                self.cross += (ys[:, :, None] * sr[:, None, :] + s[:, :, None] * yr[:, None, :]
                               + r * s[:, :, None] * sr[:, None, :])
            self.ref_sums += r * sr
        self.sums += r * s
        self.shift = None

    def finish(self) -> LayerStats:
        ex = self.extractor
        self._unshift()
        h, cross = self.h, self.cross
        if h is not None:
            sq = np.einsum("gii->gi", h).sum(axis=0)
            if ex.col_group_of is not None and ex.col_groups > 1:
                same = ex.col_group_of[:, None] == ex.col_group_of[None, :]
                h = h * same[None]
                cross = cross * same[None] if cross is not None else None
        else:
            sq = self.sq.sum(axis=0)
        count = self.rows
        if ex.col_groups > 1:
            count *= ex.col_groups  # each output position is a row once per channel group
        total = h.sum(axis=0) if h is not None else None
        groups = h if (h is not None and h.shape[0] > 1) else None
        return LayerStats(in_sq_norms=sq, hessian=total, count=count,
                          in_sums=self.sums.sum(axis=0), group_hessians=groups,
                          group_sums=self.sums, group_rows=self.rows // self.sums.shape[0],
                          ref_sums=self.ref_sums, cross=cross)


def row_cap(in_dim: int) -> int:
    """Most rows of ``X`` a sampled Conv weight with ``in_dim`` input columns reads over the
    whole calibration set (``max(MIN_ROWS, ROWS_PER_COLUMN * in_dim)``). Each sample gives
    ``max(1, cap // samples)`` of its output positions, so the total stays within the cap
    (``samples`` rows where there are more samples than the cap)."""
    return max(MIN_ROWS, ROWS_PER_COLUMN * int(in_dim))


def rows_note(rows: Mapping[str, Tuple[int, int]], what: str) -> Optional[str]:
    """One report note naming, per weight whose rows were sampled, the rows used of those
    there were; None when no weight was sampled."""
    sampled = {k: v for k, v in rows.items() if v[0] < v[1]}
    if not sampled:
        return None
    per = ", ".join(f"{k} {u}/{t}" for k, (u, t) in sampled.items())
    return (f"{what}: Conv Hessians from sampled positions (at most max({MIN_ROWS}, "
            f"{ROWS_PER_COLUMN} x inputs) rows per layer, per group for grouped Convs), rows "
            f"used/there were: {per}")


def collect_layer_stats(handle, weights: Sequence[Weight], data: CalibrationSet,
                        want_hessian: bool = True, batch_size: int = 8,
                        progress: Optional[Progress] = None,
                        budget_bytes: int = DEFAULT_BUDGET_BYTES,
                        precision: str = "float64", reference=None,
                        runners: Optional[Sequence] = None, sample_rows: bool = False,
                        seed: int = 0, split: bool = False) -> LayerStatsMap:
    """``{weight.key: LayerStats}`` from running ``data`` through the model as it is now.

    The model is read from ``handle`` in its current state (weights already pruned upstream
    count), so calling this layer group by layer group gives SparseGPT's sequential inputs.
    Weights whose activation cannot be reached (used only inside subgraphs) are left out and
    listed in ``result.record.skipped``. ``progress(done, total)`` is called after each batch.

    Activations exposed in one pass stay under ``budget_bytes`` per batch (estimated by shape
    inference at the first batch's shapes); more layers mean more passes over the data, never
    more memory. ``result.record`` says how many chunks and runs it took and the peak bytes.

    ``precision="float32"`` computes each im2col block's ``X_b^T X_b`` in float32 (about 2x
    faster for wide Conv inputs, ~1e-6 relative error per block) while the sums across blocks
    stay float64; the default does everything in float64.

    ``reference`` (a model with the same graph, e.g. the dense original) is run on the same
    inputs alongside: each weight's stats then also hold the reference's sums and, with the
    Hessian, the cross moment ``X^T X_ref`` — what a layer needs to reproduce the reference's
    outputs from the inputs it now gets (:func:`onnxprune.calibration.reconstruct.asymmetric_target`).

    ``runners`` (one per model: ``handle``'s, then the reference's) serve the activations
    instead of a session per chunk: :class:`onnxprune.runtime.segments.SegmentRunner` runs only the
    nodes not run before (layer-by-layer pruning).

    ``sample_rows``: a Conv weight whose summed rows would pass :func:`row_cap` reads only
    ``cap // len(data)`` output positions of each sample
    (:func:`onnxprune.calibration.extract.sample_positions`, seeded by ``seed``, the same rows
    in both models when paired); every sum (Hessian, means, norms, cross moment) is then
    exactly that of the sampled rows, and ``count`` says how many. Gemm/MatMul, ConvTranspose
    and the Hessian-free moments path (Wanda) always read every row.
    ``result.record.rows`` gives each weight's (rows used, rows there were).

    ``split``: also keep the statistics of the even-numbered batches and of the odd-numbered
    ones apart, in each result's :attr:`LayerStats.parts` (the result is their sum): a fit part
    and a held-out part from the same model runs.
    """
    started = time.perf_counter()
    if precision not in ("float64", "float32"):
        raise OptionError(f"precision must be 'float64' or 'float32', got {precision!r}")
    block_dtype = np.dtype(precision)
    handle = load(handle)
    ref = load(reference) if reference is not None else None
    record = StatsRecord(data_free=data.data_free)
    main = handle.model.graph.name or "main"
    graph_inputs = {i.name for i in handle.model.graph.input}
    constants = {t.name for t in handle.model.graph.initializer} | {
        o for n in handle.model.graph.node if n.op_type == "Constant" for o in n.output}

    def stored_value(name: str) -> Optional[np.ndarray]:
        tensor = handle.index.stored.get(name)
        return None if tensor is None else handle.read(tensor)

    # One accumulator per distinct (activation, extraction) pair; weights map onto them.
    extractors: Dict[tuple, Extractor] = {}
    weight_sigs: Dict[str, List[tuple]] = {}
    for weight in weights:
        sigs = []
        for consumer in weight.consumers:
            if consumer.graph != main:
                record.skipped[weight.key] = (f"read by '{consumer.node_name}' inside a subgraph "
                                              f"({consumer.graph}); its input cannot be exposed")
                sigs = []
                break
            ex, why = extractor_for(weight, consumer, handle.index.producer, stored_value)
            if ex is None:
                record.skipped[weight.key] = why
                sigs = []
                break
            if ex.activation in constants:
                record.skipped[weight.key] = (f"its input '{ex.activation}' is a constant, not "
                                              "an activation")
                sigs = []
                break
            extractors.setdefault(ex.signature, ex)
            sigs.append(ex.signature)
        if sigs:
            weight_sigs[weight.key] = sigs

    result = LayerStatsMap()
    result.record = record
    if not weight_sigs:
        return result

    first = next(data.batches(batch_size))
    act_names = list(dict.fromkeys(ex.activation for ex in extractors.values()))
    sizes, types = _infer_activations(handle, act_names, first)
    del first
    if ref is not None:  # both models' activations are held at once
        sizes = {n: 2 * b for n, b in sizes.items()}
    chunks = _chunk(list(weight_sigs.items()), extractors, sizes, graph_inputs, budget_bytes)
    record.chunks = [keys for keys, _ in chunks]

    total = data.num_batches(batch_size) * len(chunks)
    n_samples = max(len(data), 1)
    done = 0
    accumulators: Dict[tuple, List[_Accumulator]] = {}
    n_parts = 2 if split else 1
    held = 0  # bytes of accumulators alive
    finished: Dict[tuple, LayerStats] = {}
    rows: Dict[tuple, Tuple[int, int]] = {}
    for keys, sigs in chunks:
        accs = {s: accumulators.setdefault(s, [_Accumulator(extractors[s], want_hessian,
                                                            paired=ref is not None)
                                               for _ in range(n_parts)])
                for s in sigs}
        held = sum(a.nbytes for parts in accumulators.values() for a in parts) + \
            sum(st.nbytes for st in finished.values())
        names = list(dict.fromkeys(extractors[s].activation for s in sigs))
        models = [handle] if ref is None else [handle, ref]
        if runners is not None:
            sources = [runner.batches(names) for runner in runners[:len(models)]]
        else:
            sources = [exposed_batches(h, names, data, batch_size, types) for h in models]
        for b, outs in enumerate(zip(*sources)):
            batch_bytes = sum(v.nbytes for got in outs for v in got.values())
            block_peak = 0
            for s, part_accs in accs.items():
                acc = part_accs[b % n_parts]
                ex = extractors[s]
                quick = None if want_hessian else [ex.moments(got[ex.activation])
                                                   for got in outs]
                if quick is not None and all(m is not None for m in quick):
                    acc.add_moments(*quick[0], *([quick[1][0]] if len(quick) > 1 else []))
                    acc.available = acc.rows
                    continue
                x = outs[0][ex.activation]
                positions = None
                per_sample = ex.positions(np.shape(x)) if sample_rows else 0
                k = max(1, row_cap(ex.in_dim) // n_samples)
                if per_sample:
                    acc.available += ex.groups * per_sample * np.shape(x)[0]
                    if per_sample > k:
                        positions = sample_positions(per_sample, k, seed, ex.activation,
                                                     b * batch_size, np.shape(x)[0])
                before = acc.rows
                streams = [ex.blocks(got[ex.activation], BLOCK_BYTES, block_dtype, positions)
                           for got in outs]
                for blocks in zip(*streams):  # the same rows of both models, block by block
                    block_peak = max(block_peak, sum(blk.nbytes for blk in blocks))
                    acc.add(*blocks)
                if not per_sample:
                    acc.available += acc.rows - before
            record.peak_bytes = max(record.peak_bytes, held + batch_bytes + block_peak)
            record.model_runs += len(models)
            done += 1
            if progress is not None:
                progress(done, max(total, done))
            del outs
        del sources
        for s in sigs:
            part_accs = accumulators.pop(s)
            rows[s] = (sum(a.rows for a in part_accs),
                       sum(max(a.available, a.rows) for a in part_accs))
            parts = [a.finish() for a in part_accs]
            finished[s] = parts[0] if not split else _combine(parts)
            if split:
                finished[s].parts = parts
        for key in keys:  # every signature of these keys is finished (this or an earlier chunk)
            result[key] = _combine([finished[s] for s in weight_sigs[key]])
            if split and len(weight_sigs[key]) > 1:
                result[key].parts = [_combine([finished[s].parts[i] for s in weight_sigs[key]])
                                     for i in range(n_parts)]
            record.rows[key] = (sum(rows[s][0] for s in weight_sigs[key]),
                                sum(rows[s][1] for s in weight_sigs[key]))
    record.seconds = time.perf_counter() - started
    return result


def _combine(parts: List[LayerStats]) -> LayerStats:
    """Stats of a weight read by several nodes: the rows of all of them stacked."""
    if len(parts) == 1:
        return parts[0]

    def add(attr):
        values = [getattr(p, attr) for p in parts]
        return None if any(v is None for v in values) else sum(values[1:], values[0].copy())

    return LayerStats(in_sq_norms=add("in_sq_norms"), hessian=add("hessian"),
                      count=sum(p.count for p in parts), in_sums=add("in_sums"),
                      group_hessians=add("group_hessians"), group_sums=add("group_sums"),
                      group_rows=sum(p.group_rows for p in parts),
                      ref_sums=add("ref_sums"), cross=add("cross"))


def _chunk(items: List[Tuple[str, List[tuple]]], extractors: Mapping[tuple, Extractor],
           sizes: Mapping[str, int], graph_inputs, budget: int
           ) -> List[Tuple[List[str], List[tuple]]]:
    """Group weights (graph order) so each chunk exposes at most ``budget`` bytes per batch.

    Each accumulator is computed in exactly one chunk: a weight whose activation was already
    assigned (a K projection after its Q) joins the current chunk at no cost.
    """
    chunks: List[Tuple[List[str], List[tuple]]] = []
    keys: List[str] = []
    sigs: List[tuple] = []
    names: set = set()
    assigned: set = set()
    used = 0
    for key, wsigs in items:
        todo = [s for s in dict.fromkeys(wsigs) if s not in assigned]
        new = {extractors[s].activation for s in todo} - names - set(graph_inputs)
        cost = sum(sizes.get(n, 0) for n in new)
        if keys and todo and used + cost > budget:
            chunks.append((keys, sigs))
            keys, sigs, names, used = [], [], set(), 0
            new = {extractors[s].activation for s in todo} - set(graph_inputs)
            cost = sum(sizes.get(n, 0) for n in new)
        keys.append(key)
        sigs.extend(todo)
        assigned.update(todo)
        names |= new
        used += cost
    if keys:
        chunks.append((keys, sigs))
    return chunks


def _infer_activations(handle: ModelHandle, names: Sequence[str],
                       feed: Mapping[str, np.ndarray]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(bytes for one batch, ONNX element type) of each named activation, from one shape
    inference (:mod:`onnxprune.model.shapes`) at ``feed``'s concrete shapes.

    An activation whose size stays unknown is taken to be as large as the largest known one;
    one whose type stays unknown is exposed untyped (onnxruntime fills the type in).
    """
    inferred = infer_shapes(handle, {n: np.shape(v) for n, v in feed.items()}, upgrade=False,
                            complete=complete_types)
    types = {n: inferred.types[n] for n in names if inferred.types.get(n)}
    known = {n: inferred.nbytes(n) for n in types}
    known = {n: b for n, b in known.items() if b is not None}
    fallback = max(list(known.values()) + [1])
    return {n: known.get(n, fallback) for n in names}, types


