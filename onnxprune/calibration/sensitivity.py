"""Sensitivity: how much each layer's pruning hurts the model, and what to do about it.

This module owns:

* :func:`layer_sensitivity` — prune one layer at a time at several sparsities and measure the
  *whole model's* output error on a few calibration batches (a :class:`SensitivityTable`). The
  model output is measured, not the layer's own output: a layer whose error is large but gets
  squashed downstream (or small but amplified) is ranked by what the user sees. The error is
  the relative squared error ``sum ||Y - Y_dense||^2 / sum ||Y_dense||^2`` per float output,
  averaged over outputs: squared errors of independent perturbations add, which is what
  :func:`allocate` assumes.
* :func:`allocate` — per-layer sparsities that reach a global target with the least total
  error (greedy on marginal error per pruned parameter, over each layer's lower convex hull).
* :func:`looks_fixed` — a data-free guard for constant operands that are not learned weights
  (integer ramps, identity/permutation/one-hot, DCT/DFT/STFT bases, repeated filters): zeroing
  any of them breaks the model at any sparsity. :meth:`SensitivityTable.fragile` is the
  data-driven counterpart.

The measured weights are *overridable initializers* (also listed as graph inputs): a trial
feeds the pruned array for one weight and no session is rebuilt per trial. Trials run only the
part of the graph after the layer (:class:`_Downstream`): the dense model is run once, piece by
piece (:class:`~onnxprune.runtime.segments.SegmentRunner`), the weights are taken in graph
order and cut into at most :data:`TRIAL_CUTS` groups, and each group's trials run a session of
the nodes not yet run at its first weight, fed the tensors cached at that cut. Outputs computed
before the cut do not depend on the weight: their error is zero. Where a value cannot be cached
(a sequence), every trial runs the whole model instead. The table records the seconds spent
choosing masks (``solve_seconds``) and running trials (``trial_seconds``).

On large inputs the trials cost what running the model does, per weight and level: they use
fewer samples (:func:`trial_subset`: at most :data:`TRIAL_ELEMENTS` input elements, 4 of
416x416 images, drawn seeded from all calibration samples), and a reconstructing criterion's
trial Hessians come from the first :func:`statistics_subset` samples.

One module (about 650 lines) on purpose: measuring a layer's sensitivity, the trials' samples
and cuts, and allocating from the measured table share one table type and one trial loop;
split, each half would import the other's internals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.calibration.statistics import LayerStats
from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.masking.criteria import Criterion, ScoreContext, get_criterion
from onnxprune.errors import OptionError
from onnxprune.model.io import ModelHandle, load
from onnxprune.masking.patterns import Pattern, parse_pattern
from onnxprune.calibration.reconstruct import sparsegpt_factor, sparsegpt_prune
from onnxprune.runtime.segments import SegmentRunner
from onnxprune.runtime.session import open_session, part_session, run_calibration
from onnxprune.ops.weights import Weight
from onnxprune.ops.quant import stored_values

__all__ = ["SensitivityTable", "layer_sensitivity", "allocate", "looks_fixed", "trial_count",
           "trial_subset", "statistics_subset"]

DEFAULT_SPARSITIES = (0.3, 0.5, 0.7, 0.9)
_EPS = 1e-30
#: Trials run the graph from a cut before the layer; the weights (in graph order) share at most
#: this many cuts, i.e. this many sessions (a session per weight costs more to build than the
#: few nodes between neighbouring weights cost to run).
TRIAL_CUTS = 8
#: Trials on large inputs use fewer samples: at most this many input elements over the trial
#: samples (16 ImageNet-sized images; a 416x416 RGB image is 4.6 of them), never fewer than
#: :data:`MIN_TRIAL_SAMPLES`. Below it every requested sample is used.
TRIAL_ELEMENTS = 16 * 3 * 224 * 224
MIN_TRIAL_SAMPLES = 4
#: The Hessians a reconstructing criterion's trials prune with come, where each sample is larger
#: than an ImageNet image (3x224x224), from the first calibration samples holding at most this
#: many input elements (18 at 416x416), never fewer than :data:`MIN_STATS_SAMPLES`: Conv rows
#: are sampled to a few thousand per layer anyway
#: (:func:`~onnxprune.calibration.statistics.row_cap`), which 18 large images give many times
#: over; the pruning itself still uses every sample.
STATS_ELEMENTS = 4 * TRIAL_ELEMENTS
LARGE_SAMPLE = 3 * 224 * 224
MIN_STATS_SAMPLES = 16


@dataclass
class SensitivityTable:
    """Model output error with one layer pruned at a time.

    ``errors[key][i]`` is the relative squared output error with only that weight pruned to
    ``sparsities[i]`` (fraction of zeros, existing zeros counted). ``existing[key]`` is the
    weight's sparsity before pruning.
    """

    pattern: str
    criterion: str
    sparsities: Tuple[float, ...]
    errors: Dict[str, np.ndarray] = field(default_factory=dict)
    existing: Dict[str, float] = field(default_factory=dict)
    numel: Dict[str, int] = field(default_factory=dict)  # elements per weight
    samples: int = 0
    seconds: float = 0.0
    skipped: Dict[str, str] = field(default_factory=dict)  # weight key -> why not measured
    metric: str = "relative squared error of the model outputs, mean over float outputs"
    solve_seconds: float = 0.0  # choosing masks (SparseGPT solves, scores) for the trials
    trial_seconds: float = 0.0  # running the pruned trials (downstream of each layer)

    def fragile(self, threshold: float = 0.25, ratio: float = 200.0) -> Dict[str, str]:
        """Weights to leave out, with the reason: candidates are fixed operands (bases, ramps,
        anchors) and tiny layers everything depends on (a first conv with 9 inputs per filter).

        Flagged when the error at the *lowest* measured sparsity exceeds ``threshold`` (0.25 is
        half the output's norm), or when that error *per newly pruned parameter* exceeds
        ``ratio`` times the median over all measured weights (a 16-element decoding ramp does
        little harm in absolute terms on a big output, but thousands of times more per
        parameter than a learned layer).
        """
        out: Dict[str, str] = {}
        s0 = self.sparsities[0] if self.sparsities else 0.0
        per_param = {}
        for k, e in self.errors.items():
            pruned = (s0 - self.existing.get(k, 0.0)) * self.numel.get(k, 0)
            if e.size and pruned >= 1:
                per_param[k] = float(e[0]) / pruned
        median = float(np.median(list(per_param.values()))) if per_param else 0.0
        for k, e in self.errors.items():
            if e.size and e[0] > threshold:
                out[k] = (f"output error {e[0]:.3g} at sparsity {s0:g} already exceeds "
                          f"{threshold:g}")
            elif median > 0 and per_param.get(k, 0.0) > ratio * median:
                out[k] = (f"output error per pruned parameter at sparsity {s0:g} is "
                          f"{per_param[k] / median:.0f}x the median layer's")
        return out

    def merge(self, other: "SensitivityTable") -> "SensitivityTable":
        """This table with ``other``'s weights added (same pattern and levels; a different
        criterion is named beside this one's)."""
        if (other.pattern, other.sparsities) != (self.pattern, self.sparsities):
            raise ValueError("sensitivity tables measured differently cannot be merged")
        if other.criterion != self.criterion and other.criterion not in self.criterion:
            self.criterion = f"{self.criterion} ({other.criterion} for some weights)"
        for name in ("errors", "existing", "numel", "skipped"):
            getattr(self, name).update(getattr(other, name))
        self.seconds += other.seconds
        self.solve_seconds += other.solve_seconds
        self.trial_seconds += other.trial_seconds
        return self

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "criterion": self.criterion,
                "sparsities": list(self.sparsities), "samples": self.samples,
                "metric": self.metric, "seconds": round(self.seconds, 3),
                "errors": {k: [float(x) for x in v] for k, v in self.errors.items()},
                "existing": dict(self.existing), "numel": dict(self.numel),
                "skipped": dict(self.skipped)}


# -- measuring --------------------------------------------------------------------------------
def layer_sensitivity(handle, weights: Sequence[Weight], data: CalibrationSet,
                      pattern_spec: Union[str, Pattern],
                      sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                      criterion: Union[str, Criterion] = "magnitude",
                      samples: int = 16, batch_size: int = 8, seed: int = 0,
                      stats: Optional[Mapping[str, LayerStats]] = None,
                      progress: Optional[Callable[[int, int], None]] = None,
                      trial_elements: Optional[int] = TRIAL_ELEMENTS) -> SensitivityTable:
    """Prune each weight alone at each sparsity; measure the model's output error.

    ``data`` is cut to its first ``samples`` samples, or, where those hold more than
    ``trial_elements`` input elements (large images), to fewer drawn from all of ``data``
    (:func:`trial_subset`; None: never). A pattern with an implied sparsity (N:M)
    is measured at that sparsity only. ``criterion`` scores the elements (a registered name or
    a :class:`Criterion`); activation-aware ones take ``in_norms`` from ``stats``; a
    reconstructing one (SparseGPT) prunes and updates the layer with its Hessian from ``stats``. Weights
    inside subgraphs are not measured (listed in ``table.skipped``). ``progress(done, total)``
    is called after each trial.
    """
    handle = load(handle)
    started = time.perf_counter()
    pattern = pattern_spec if isinstance(pattern_spec, Pattern) else parse_pattern(pattern_spec)
    crit = criterion if isinstance(criterion, Criterion) else get_criterion(criterion)
    if pattern.implied_sparsity is not None:
        grid = (float(pattern.implied_sparsity),)
    else:
        grid = tuple(sorted(float(s) for s in sparsities))
        if not grid or grid[0] <= 0 or grid[-1] > 1:
            raise OptionError(f"sensitivity sparsities must be in (0, 1], got {list(sparsities)}")
    table = SensitivityTable(pattern=pattern.spec, criterion=crit.name, sparsities=grid)
    subset = trial_subset(data, samples, seed, trial_elements)
    table.samples = len(subset)

    main = handle.model.graph.name or "main"
    measured = []
    for w in weights:
        if w.graph != main:
            table.skipped[w.key] = f"stored in subgraph {w.graph}; it cannot be fed from outside"
        else:
            measured.append(w)
    if not measured:
        table.seconds = time.perf_counter() - started
        return table

    copy = _overridable_copy(handle, measured)
    session = open_session(copy)
    out_names = [o.name for o in session.get_outputs()]
    batches = list(subset.batches(batch_size))
    references = [run_calibration(session, out_names, feed) for feed in batches]
    # Only float tensors measure an error; strings, sequences and maps (ai.onnx.ml outputs,
    # ZipMap's sequence of maps) are left out of the sum.
    float_outputs = [i for i, ref in enumerate(references[0])
                     if isinstance(ref, np.ndarray) and ref.dtype.kind == "f"]
    if not float_outputs:
        raise OptionError("the model has no float outputs; its output error cannot be measured")
    ref_energy = [sum(float(np.sum(np.square(r[i], dtype=np.float64))) for r in references)
                  for i in float_outputs]

    total = len(measured) * len(grid)
    done = 0
    energy = np.asarray(ref_energy) + _EPS
    downstream = _Downstream(copy, subset, batch_size, out_names, measured)
    errors_of: Dict[str, np.ndarray] = {}
    for w in downstream.order:
        t0 = time.perf_counter()
        raw = handle.read(w.tensor)
        w2d = w.layout.to_2d(raw)
        nonzero = w2d != 0
        table.existing[w.key] = 1.0 - float(np.count_nonzero(nonzero)) / max(nonzero.size, 1)
        table.numel[w.key] = int(w2d.size)
        st = stats.get(w.key) if stats else None
        hessian = st.sparsegpt_hessian if st is not None else None
        if crit.reconstructs and hessian is None:
            raise OptionError(f"criterion '{crit.name}' is measured by pruning each layer with "
                              f"it, which needs the layer's Hessian: none for {w.key}")
        scores = None if crit.reconstructs else crit.scores(
            w2d, ScoreContext(w.key, seed=seed, in_norms=st.in_norms if st else None))
        factor = sparsegpt_factor(hessian) if crit.reconstructs else None  # once per layer
        table.solve_seconds += time.perf_counter() - t0
        trial = downstream.trial(w)
        errors = []
        for s in grid:
            t0 = time.perf_counter()
            zeros = int(round(s * w2d.size))
            if crit.reconstructs:  # the layer as the criterion leaves it: masked and updated
                new, _ = sparsegpt_prune(w2d, hessian, pattern, zeros, factor=factor)
                pruned = w.layout.from_2d(stored_values(new, raw.dtype))
            else:
                new_zeros = max(0, zeros - (w2d.size - int(np.count_nonzero(nonzero))))
                keep = pattern.local_mask(scores, nonzero, new_zeros, crit.reduce)
                pruned = w.layout.from_2d(np.where(keep, w2d, 0).astype(raw.dtype))
            t1 = time.perf_counter()
            table.solve_seconds += t1 - t0
            diff = np.zeros(len(float_outputs))
            for b, (feed, ref) in enumerate(zip(batches, references)):
                got = trial(b, feed, pruned) if trial is not None else dict(zip(
                    out_names, session.run(out_names, {**feed, w.name: pruned})))
                for j, i in enumerate(float_outputs):
                    if out_names[i] not in got:  # computed before the cut: unchanged
                        continue
                    delta = got[out_names[i]].astype(np.float64) - ref[i]
                    diff[j] += float(np.sum(np.square(delta)))
            table.trial_seconds += time.perf_counter() - t1
            errors.append(float(np.mean(diff / energy)))
            done += 1
            if progress is not None:
                progress(done, total)
        errors_of[w.key] = np.asarray(errors)
    downstream.close()
    for w in measured:  # the table in the order the weights were given
        table.errors[w.key] = errors_of[w.key]
    table.seconds = time.perf_counter() - started
    return table


def trial_count(samples: int, per_sample: int,
                trial_elements: Optional[int] = TRIAL_ELEMENTS) -> int:
    """How many of ``samples`` samples (``per_sample`` input elements each) the trials use:
    all while they hold at most ``trial_elements`` elements, else as many as fit, at least
    :data:`MIN_TRIAL_SAMPLES`."""
    if trial_elements is None or samples * per_sample <= trial_elements:
        return samples
    return min(samples, max(MIN_TRIAL_SAMPLES, trial_elements // max(per_sample, 1)))


def _per_sample(data: CalibrationSet) -> int:
    """Input elements of one sample (from the first one)."""
    one = next(data.batches(1), {})
    arrays = [np.asarray(v) for v in one.values() if np.ndim(v) > 0]
    return sum(a.size for a in arrays) // max(arrays[0].shape[0], 1) if arrays else 0


def statistics_subset(data: CalibrationSet,
                      elements: Optional[int] = STATS_ELEMENTS) -> CalibrationSet:
    """The calibration samples the trials' Hessians come from: all of them, or, where each is
    larger than an ImageNet image, the first ones holding at most ``elements`` input elements,
    at least :data:`MIN_STATS_SAMPLES` (all with None)."""
    if elements is None or len(data) == 0:
        return data
    per = _per_sample(data)
    if per <= LARGE_SAMPLE or len(data) * per <= elements:
        return data
    return data.take(max(MIN_STATS_SAMPLES, elements // max(per, 1)))


def trial_subset(data: CalibrationSet, samples: int, seed: int = 0,
                 trial_elements: Optional[int] = TRIAL_ELEMENTS) -> CalibrationSet:
    """The samples sensitivity trials run on: the first ``samples`` of ``data``, or, when
    :func:`trial_count` says fewer, that many drawn from all of ``data`` without replacement,
    seeded by ``seed``, in data order."""
    first = data.take(samples)
    n = len(first)
    if n == 0 or trial_elements is None:
        return first
    k = trial_count(n, _per_sample(first), trial_elements)
    if k >= n:
        return first
    pick = np.sort(np.random.default_rng(seed).choice(len(data), size=k, replace=False))
    return data.pick(pick.tolist())


class _Downstream:
    """Trials that run only the graph after a cut before the weight (see the module doc).

    ``order`` is the measured weights in graph order (of their first consumer);
    :meth:`trial` (called in that order) returns ``run(batch, feed, pruned) -> {output: array}``
    with the outputs computed after the cut, or None where trials must run the whole model.
    """

    def __init__(self, handle: ModelHandle, data: CalibrationSet, batch_size: int,
                 out_names: Sequence[str], weights: Sequence[Weight]):
        self.handle, self.out_names = handle, list(out_names)
        self.runner: Optional[SegmentRunner] = SegmentRunner(handle, data, batch_size)
        reads = self.runner.reads
        first = {}
        for w in weights:
            first[w.key] = next((i for i, names in enumerate(reads) if w.name in names),
                                len(reads))
        self.order = sorted(weights, key=lambda w: first[w.key])
        self.first = first
        # cut points: the first weight of each of at most TRIAL_CUTS equal groups
        n = len(self.order)
        per = max(1, -(-n // TRIAL_CUTS))
        self.cut_of = {w.key: self.order[(k // per) * per].key for k, w in enumerate(self.order)}
        self.inputs = {vi.name: vi for vi in handle.model.graph.input}
        self.names = {w.name for w in weights}
        self.current: Optional[tuple] = None  # (cut weight key, session, cached, graph inputs, outputs)

    def trial(self, w: Weight):
        if self.runner is None:
            return None
        cut = self.cut_of[w.key]
        if self.current is None or self.current[0] != cut:
            self.current = None
            self.current = self._prepare(cut)
            if self.current is None:
                self.close()
                return None
        _, session, cached, graph_in, outputs = self.current
        runner = self.runner

        def run(b: int, feed: Mapping[str, np.ndarray], pruned: np.ndarray):
            inputs = {n: feed[n] for n in graph_in}
            inputs.update({n: runner._get(n, b) for n in cached})
            inputs[w.name] = pruned
            return dict(zip(outputs, run_calibration(session, outputs, inputs, feed)))
        return run

    def _prepare(self, cut_key: str):
        runner = self.runner
        start = self.first[cut_key]
        graph = self.handle.model.graph
        if start >= len(graph.node):
            return None
        need = [n for n in runner.reads[start] if n in runner.producer]
        for _ in runner.batches(need):  # run the dense model up to the cut, keep what is live
            pass
        if runner.from_scratch:
            return None
        rest = np.flatnonzero(~runner.done)
        produced = {o for i in rest for o in graph.node[i].output if o}
        read = set().union(*(runner.reads[i] for i in rest)) if len(rest) else set()
        cached = sorted(n for n in read if n in runner.cache and n not in produced)
        if any(n in runner.producer and not runner.done[runner.producer[n]] and
               n not in produced for n in read):
            return None
        graph_in = [n for n in self.inputs if n in read and n in runner.graph_inputs]
        outputs = [o for o in self.out_names if o in produced]
        values = [self.inputs[n] for n in graph_in]
        values += [onnx.helper.make_tensor_value_info(
            n, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(runner._get(n, 0)).dtype), None)
            for n in cached]
        values += [self.inputs[n] for n in sorted(self.names & read) if n in self.inputs]
        session = part_session(self.handle, [graph.node[i] for i in rest],
                               [onnx.ValueInfoProto(name=o) for o in outputs], values)
        return cut_key, session, cached, graph_in, outputs

    def close(self) -> None:
        self.current = None
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def _overridable_copy(handle: ModelHandle, weights: Sequence[Weight]) -> ModelHandle:
    """A copy of the model in which each weight is an initializer that is also a graph input,
    so a session can be fed a replacement for it. Constant-node weights become initializers;
    rewritten external tensors are inlined with their current values."""
    model = onnx.ModelProto()
    model.CopyFrom(handle.model)
    graph = model.graph
    names = {w.name for w in weights}
    # Tensors the handle rewrote in memory: the copy must carry their current values.
    updates = {t.name: arr for t, arr in handle.rewritten_values()}
    for init in graph.initializer:
        if init.name in updates:
            init.CopyFrom(numpy_helper.from_array(updates[init.name], init.name))
    kept_nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names:
            value = next(a.t for a in node.attribute if a.name == "value")
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            if tensor.name in updates:
                tensor = numpy_helper.from_array(updates[tensor.name], tensor.name)
            graph.initializer.append(tensor)
        else:
            kept_nodes.append(node)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    listed = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name in names and init.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)))
    if model.ir_version < 4:
        model.ir_version = 4  # overridable initializers need IR 4
    return ModelHandle(model=model, path=handle.path, base_dir=handle.base_dir)


# -- allocating -------------------------------------------------------------------------------
def allocate(table: SensitivityTable, target_sparsity: float, param_counts: Mapping[str, int],
             min_sparsity: float = 0.0, max_sparsity: float = 0.98) -> Dict[str, float]:
    """Per-weight sparsities with ``sum s_i n_i = target * sum n_i`` and least summed error.

    Each weight's error curve is the table's points, piecewise linear from its existing
    sparsity (error 0), extended past the last measured sparsity along its last slope up to
    ``max_sparsity``. Over each curve's lower convex hull, segments are taken cheapest error
    per pruned parameter first across all weights; the last one is cut to hit the target
    exactly. With an N:M table (one implied sparsity) a weight is either left as it is or
    pruned to that sparsity, whole weights are taken in the same order, and the total may
    overshoot by less than one weight.
    """
    if not 0 <= target_sparsity <= 1:
        raise OptionError(f"target sparsity must be in [0, 1], got {target_sparsity}")
    if not 0 <= min_sparsity <= max_sparsity <= 1:
        raise OptionError(f"need 0 <= min_sparsity <= max_sparsity <= 1, got "
                          f"{min_sparsity}, {max_sparsity}")
    missing = [k for k in param_counts if k not in table.errors]
    if missing:
        raise OptionError(f"no sensitivity measured for {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}; measure them or leave them out")
    keys = list(param_counts)
    counts = np.array([int(param_counts[k]) for k in keys], dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return {k: 0.0 for k in keys}
    target_zeros = target_sparsity * total
    grid = np.asarray(table.sparsities, dtype=np.float64)
    low = {k: max(min_sparsity, table.existing.get(k, 0.0)) for k in keys}
    if len(grid) == 1:
        return _allocate_discrete(table, keys, counts, low, float(grid[0]), target_zeros)

    segments = []  # (slope, order, key, s_from, s_to, zeros)
    for order, (k, n) in enumerate(zip(keys, counts)):
        xs, ys = _curve(table, k, low[k], max_sparsity)
        hull = _lower_hull(xs * n, ys)
        for (x0, y0), (x1, y1) in zip(hull[:-1], hull[1:]):
            segments.append(((y1 - y0) / (x1 - x0), order, k, x0 / n, x1 / n, x1 - x0))
    result = dict(low)
    need = target_zeros - sum(low[k] * n for k, n in zip(keys, counts))
    for _, _, k, s0, s1, zeros in sorted(segments, key=lambda t: (t[0], t[1], t[3])):
        if need <= 0:
            break
        if zeros <= need:
            result[k] = s1
            need -= zeros
        else:
            result[k] = s0 + (s1 - s0) * need / zeros
            need = 0
    if need > 1e-6 * total:
        reach = sum(result[k] * n for k, n in zip(keys, counts)) / total
        raise OptionError(f"target sparsity {target_sparsity:g} is out of reach with "
                          f"max_sparsity {max_sparsity:g} per layer (at most {reach:.4f})")
    return {k: float(v) for k, v in result.items()}


def _curve(table: SensitivityTable, key: str, low: float, high: float
           ) -> Tuple[np.ndarray, np.ndarray]:
    """Sparsity/error points of one weight on [low, high]: measured, interpolated, extended."""
    grid = np.asarray(table.sparsities, dtype=np.float64)
    errs = np.maximum(np.asarray(table.errors[key], dtype=np.float64), 0.0)
    base = table.existing.get(key, 0.0)
    xs = np.concatenate([[base], grid[grid > base]])
    ys = np.concatenate([[0.0], errs[grid > base]])
    if high > xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        xs = np.append(xs, high)
        ys = np.append(ys, ys[-1] + max(slope, 0.0) * (high - xs[-2]))
    inside = (xs > low) & (xs < high)
    pts_x = np.concatenate([[low], xs[inside], [high]]) if high > low else np.array([low])
    pts_y = np.interp(pts_x, xs, ys)
    return pts_x, pts_y


def _lower_hull(xs: np.ndarray, ys: np.ndarray) -> List[Tuple[float, float]]:
    hull: List[Tuple[float, float]] = []
    for p in zip(xs.tolist(), ys.tolist()):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) <= 0:
                hull.pop()  # the middle point lies on or above the chord
            else:
                break
        if not hull or p[0] > hull[-1][0]:
            hull.append(p)
    return hull


def _allocate_discrete(table: SensitivityTable, keys: List[str], counts: np.ndarray,
                       low: Mapping[str, float], level: float, target_zeros: float
                       ) -> Dict[str, float]:
    result = dict(low)
    need = target_zeros - sum(low[k] * n for k, n in zip(keys, counts))
    options = []
    for order, (k, n) in enumerate(zip(keys, counts)):
        gain = (level - low[k]) * n
        if gain > 0:
            options.append((float(table.errors[k][0]) / gain, order, k, gain))
    for _, _, k, gain in sorted(options):
        if need <= 0:
            break
        result[k] = level
        need -= gain
    return {k: float(v) for k, v in result.items()}


# -- data-free guard --------------------------------------------------------------------------
#: Tensors up to this size are checked whole; bigger ones on evenly spaced rows and columns
#: first (what the guard costs must stay small next to pruning itself: ResNet-50 has 25 M weights).
_GUARD_FULL = 1 << 12
_GUARD_CONFIRM = 1 << 22  # a tensor whose samples look fixed is confirmed whole up to this


def looks_fixed(w: np.ndarray) -> Optional[str]:
    """Why ``w`` looks like a fixed operand rather than a learned weight, or None.

    Large tensors are screened on 6 evenly spaced rows and 6 columns; only a tensor whose
    samples look fixed is checked whole (up to 4 M elements; past that the samples decide).
    See :func:`_looks_fixed_whole` for the tests.
    """
    a = np.asarray(w)
    if a.size <= _GUARD_FULL or a.ndim == 0:
        return _looks_fixed_whole(a)
    m = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    r, c = m.shape
    rows = m[np.unique(np.linspace(0, r - 1, min(r, 6)).astype(int))]
    cols = m[:, np.unique(np.linspace(0, c - 1, min(c, 6)).astype(int))]
    if not np.isfinite(rows).all() or not np.isfinite(cols).all():
        return "holds NaN or infinity"
    if _looks_fixed_whole(rows) is None and _looks_fixed_whole(cols) is None:
        return None
    return _looks_fixed_whole(a) if a.size <= _GUARD_CONFIRM else (
        _looks_fixed_whole(rows) or _looks_fixed_whole(cols))


def _looks_fixed_whole(w: np.ndarray) -> Optional[str]:
    """The guard's tests on the whole tensor.

    Checks, on the tensor as a matrix ``[shape[0], rest]`` (and its transpose where direction
    matters): constant values; all integer-valued; at most one non-zero per row and per column
    (identity, permutation, one-hot, scaled selection); every row identical (one filter
    repeated per channel); at most 4 distinct values in a large tensor; orthogonal rows or
    columns of equal norm (DCT/DFT/Hadamard bases); every row a (windowed) sinusoid; every row
    an affine ramp. Learned weights essentially never meet any of these exactly.
    """
    a = np.asarray(w, dtype=np.float64)
    if a.size == 0:
        return None
    if not np.isfinite(a).all():
        return "holds NaN or infinity"
    flat = a.reshape(-1)
    if np.all(flat == flat[0]):
        return f"constant tensor (every value is {flat[0]:g})"
    # A quantized weight (integer dtype) is integer by construction: not the sign of a table.
    if a.size >= 4 and np.asarray(w).dtype.kind == "f" and np.all(flat == np.round(flat)):
        return "all values are integers (a ramp, index, mask or count table, not a learned weight)"
    m = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
    nz = m != 0
    if m.shape[0] > 1 and m.shape[1] > 1 and nz.sum(axis=1).max() <= 1 and \
            nz.sum(axis=0).max() <= 1:
        return "at most one non-zero per row and column (identity, permutation or one-hot)"
    if m.shape[0] > 1 and m.shape[1] > 1 and np.all(m == m[0]):
        return "every row is identical (one fixed filter repeated per channel)"
    # A learned tensor shows more than 4 values within its first few hundred: check those
    # first, so the full sort runs only for tensors that may really be a fixed pattern.
    if a.size >= 64 and np.unique(flat[:512]).size <= 4 and np.unique(flat).size <= 4:
        return f"only {np.unique(flat).size} distinct values in {a.size} (a fixed pattern)"
    for mat, side in ((m, "rows"), (m.T, "columns")):
        reason = _orthogonal(mat, side) or _sinusoidal(mat, side) or _affine(mat, side)
        if reason:
            return reason
    return None


def _orthogonal(m: np.ndarray, side: str) -> Optional[str]:
    r, c = m.shape
    if r < 4 or c < 4 or r > c:
        return None
    gram = m @ m.T
    norms = np.diag(gram)
    if norms.min() <= 0:
        return None
    scale = np.sqrt(np.outer(norms, norms))
    off = np.abs(gram / scale - np.eye(r)).max()
    if off < 1e-4 and norms.max() / norms.min() < 2.0 + 1e-6:
        return f"{side} are orthogonal with equal norms (a DCT/DFT/Hadamard-like basis)"
    return None


def _sinusoidal(m: np.ndarray, side: str) -> Optional[str]:
    r, c = m.shape
    if c < 48 or r < 2:
        return None  # too short for 40 spectrum bins to single out one lobe
    pad = 4 * c
    spectrum = np.abs(np.fft.rfft(m - m.mean(axis=1, keepdims=True), n=pad, axis=1)) ** 2
    energy = spectrum.sum(axis=1)
    live = energy > 1e-12 * energy.max()  # rows like sin(pi t) are zero up to round-off
    if live.sum() < 2:
        return None
    # A sinusoid's energy sits in one main lobe and its first side lobes: 40 bins of the 4x
    # padded spectrum hold >= 98% even unwindowed; a learned row spreads over all 2c+1.
    live_spec = spectrum[live]
    k = min(40, live_spec.shape[1])
    top = np.partition(live_spec, live_spec.shape[1] - k, axis=1)[:, -k:].sum(axis=1)
    if np.all(top / energy[live] > 0.97):
        return f"every one of its {side} is a (windowed) sinusoid (an STFT/DFT/DCT basis)"
    return None


def _affine(m: np.ndarray, side: str) -> Optional[str]:
    r, c = m.shape
    if c < 4:
        return None
    second = np.diff(m, n=2, axis=1)
    first = np.diff(m, axis=1)
    scale = np.abs(m).max()
    if scale > 0 and np.abs(second).max() <= 1e-6 * scale and np.abs(first).max() > 1e-6 * scale:
        return f"every one of its {side} is a linear ramp (decoding grid or anchor offsets)"
    return None
