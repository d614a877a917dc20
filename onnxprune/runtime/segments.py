"""Running a model piece by piece over the calibration batches.

Layer-by-layer pruning needs the input of wave 1, then of wave 2, ... each time from the model
as pruned so far. Re-running the model from its inputs for every wave costs a model run per
wave and batch. :class:`SegmentRunner` runs each node once instead: a request for some tensors
executes only the nodes they need that have not run yet (a *segment*), fed from the tensors
earlier segments left *live* (read by a node that has not run), and keeps the new live ones for
later segments. Over a whole sequential pass that is one model run per batch, plus one small
session per segment.

It is exact provided no node that already ran reads a weight changed afterwards — which holds
when weights are pruned in waves (:func:`onnxprune.calibration.sequential.sequential_waves`): a wave's
inputs depend only on weights of earlier waves, and its own nodes run after it is pruned.

Live tensors for all batches are held in memory up to ``budget_bytes``; past it they go to
``.npy`` files in a temporary folder (read back one batch at a time).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import onnx

from onnxprune.inputs.dataset import CalibrationSet
from onnxprune.model.io import ModelHandle
from onnxprune.runtime.session import exposed_batches, part_session, run_calibration

__all__ = ["SegmentRunner"]

#: Bytes of live tensors (all batches) held in memory before they spill to disk.
DEFAULT_CACHE_BYTES = 2 << 30


class SegmentRunner:
    """Serve tensors of ``handle``'s main graph over ``data``'s batches, executing each node at
    most once (see the module doc). ``batches(names)`` yields one ``{name: array}`` per batch.
    """

    def __init__(self, handle: ModelHandle, data: CalibrationSet, batch_size: int = 8,
                 budget_bytes: int = DEFAULT_CACHE_BYTES):
        self.handle, self.data, self.batch_size = handle, data, batch_size
        self.budget = budget_bytes
        graph = handle.model.graph
        # Real inputs only: a weight listed as a graph input too (older exporters) is served by
        # its initializer, never fed.
        self.graph_inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
        index = handle.index  # weights change while it runs, the graph does not
        self.producer: Dict[str, int] = index.main.producers  # value -> node position
        self.reads: List[set] = index.main.reads  # per node: names_read
        self.pending: Dict[str, int] = {}  # tensor -> readers that have not run
        for names in self.reads:
            for name in names:
                self.pending[name] = self.pending.get(name, 0) + 1
        self.done = np.zeros(len(graph.node), dtype=bool)
        self.cache: Dict[str, List] = {}  # live tensor -> per batch: array or spilled path
        self.held = 0  # bytes of cached arrays in memory
        self.peak = 0  # most bytes held in memory at once
        self.runs = 0  # onnxruntime runs
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.from_scratch = False  # set once a value cannot be kept (a sequence, a map)

    def batches(self, names: Sequence[str]) -> Iterator[Dict[str, np.ndarray]]:
        names = list(dict.fromkeys(names))
        gone = [n for n in names if n in self.producer and self.done[self.producer[n]]
                and n not in self.cache]
        if gone or self.from_scratch:  # ran and let go (a weight shared across waves)
            yield from self._from_scratch(names)
            return
        segment = self._segment(names)
        if segment:
            try:
                self._execute(segment, names)
            except _NotATensor:  # keep going the slow way: every request from the inputs
                self.from_scratch = True
                self.close()
                yield from self._from_scratch(names)
                return
        for b, feed in enumerate(self.data.batches(self.batch_size)):
            yield {n: feed[n] if n not in self.producer else self._get(n, b) for n in names}

    def _from_scratch(self, names: Sequence[str]) -> Iterator[Dict[str, np.ndarray]]:
        for got in exposed_batches(self.handle, names, self.data, self.batch_size):
            self.runs += 1
            yield got

    def close(self) -> None:
        self.cache.clear()
        self.held = 0
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- planning ---------------------------------------------------------------------------
    def _segment(self, names: Sequence[str]) -> List[int]:
        """Indices of the nodes not yet run that ``names`` need (graph order)."""
        wanted = [n for n in names if n in self.producer and not self.done[self.producer[n]]]
        need = set()
        stack = [self.producer[n] for n in wanted]
        while stack:
            i = stack.pop()
            if i in need or self.done[i]:
                continue
            need.add(i)
            for name in self.reads[i]:
                j = self.producer.get(name)
                if j is not None and not self.done[j] and j not in need:
                    stack.append(j)
        return sorted(need)

    def _execute(self, segment: List[int], names: Sequence[str]) -> None:
        graph = self.handle.model.graph
        produced = {o for i in segment for o in graph.node[i].output if o}
        read = set().union(*(self.reads[i] for i in segment))
        cached_in = sorted(n for n in read if n in self.cache and n not in produced)
        missing = [n for n in read if n in self.producer and not self.done[self.producer[n]]
                   and n not in produced]
        if missing:  # cannot happen for a closed segment; guard against silent wrong results
            raise RuntimeError(f"segment reads {missing[:3]} that no node has produced")
        self.done[segment] = True
        for i in segment:
            for name in self.reads[i]:
                self.pending[name] -= 1
        live_after = {n for n in produced if self._live(n)}
        outputs = list(dict.fromkeys([n for n in names if n in produced] + sorted(live_after)))
        graph_in = [i.name for i in graph.input if i.name in read and i.name in self.graph_inputs]
        session = _segment_session(self.handle, [graph.node[i] for i in segment],
                                   {n: self._dtype(n) for n in cached_in}, graph_in, outputs)
        fresh: Dict[str, List] = {n: [] for n in outputs}
        for b, feed in enumerate(self.data.batches(self.batch_size)):
            inputs = {n: feed[n] for n in graph_in}
            inputs.update({n: self._get(n, b) for n in cached_in})
            for name, value in zip(outputs, run_calibration(session, outputs, inputs, feed)):
                fresh[name].append(self._store(value))
            self.runs += 1
        del session
        for name, values in fresh.items():
            self.cache[name] = values
        for name in list(self.cache):  # tensors no node left to run reads: let go
            if name not in names and not self._live(name):
                self._drop(name)

    def _live(self, name: str) -> bool:
        return self.pending.get(name, 0) > 0

    # -- storage ----------------------------------------------------------------------------
    def _store(self, value: np.ndarray):
        if not isinstance(value, np.ndarray):
            raise _NotATensor(type(value).__name__)
        if self.held + value.nbytes <= self.budget:
            self.held += value.nbytes
            self.peak = max(self.peak, self.held)
            return value
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxprune-acts-")
        path = Path(self._tmp.name) / f"{self.runs}-{id(value)}-{len(self.cache)}.npy"
        np.save(path, value)
        return path

    def _get(self, name: str, b: int) -> np.ndarray:
        value = self.cache[name][b]
        return np.load(value) if isinstance(value, Path) else value

    def _drop(self, name: str) -> None:
        for value in self.cache.pop(name):
            if isinstance(value, Path):
                value.unlink(missing_ok=True)
            else:
                self.held -= value.nbytes

    def _dtype(self, name: str) -> np.dtype:
        return np.asarray(self._get(name, 0)).dtype


class _NotATensor(Exception):
    """A value to keep between segments is not an array (onnxruntime returns sequences as
    lists): the runner falls back to computing every request from the graph inputs."""


def _segment_session(handle: ModelHandle, nodes: Sequence[onnx.NodeProto],
                     cached: Dict[str, np.dtype], graph_inputs: Sequence[str],
                     outputs: Sequence[str]):
    """A session of ``nodes`` alone: inputs are the cached tensors (typed by
    their arrays) and the graph inputs they read, outputs ``outputs``."""
    inputs = [vi for vi in handle.model.graph.input if vi.name in set(graph_inputs)]
    inputs += [onnx.helper.make_tensor_value_info(
        name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)
        for name, dtype in cached.items()]
    return part_session(handle, nodes, [onnx.ValueInfoProto(name=n) for n in outputs], inputs)
