"""Exact scalar folds: scalar ``Mul``/``Div``/``Add`` nodes moved into the weights and biases of
the weighted ops next to them (``--fold-scalars``, the :class:`FoldScalars` pass).

A graph optimization, not pruning: the folded model computes the same function up to float
rounding, with fewer elementwise nodes for onnxruntime to run (which does not fold these
itself: its Conv+Mul / Conv+Add fusions leave scalar operands alone). Models exported from
PaddlePaddle's PP-LCNet (PP-OCR det/rec, PicoDet) carry a scalar ``Mul`` + ``Add`` ("learnable
affine block") after most Convs and after most activations. Four rewrites, repeated until none
applies, each exact by construction:

- **after a weighted op**: ``y = W x + b`` followed by ``Mul(s)`` / ``Div(s)`` / ``Add(s)``
  becomes ``(s W) x + s b`` / ``W x + (b + s)`` (any padding: it acts on the op's output);
- **before weighted ops**: ``Mul(s)`` / ``Div(s)`` whose output every consumer reads as its
  activation operand scales each consumer's weight (zero padding scales to zero);
- a scalar ``Add(s)`` before weighted ops folds into their biases, ``b += s * rowsum(W)``, only
  where the registry's ``fold`` rule proves a constant input folds exactly (a Conv without
  padding); anything else stays;
- two scalar ``Mul``/``Div`` in a row merge into one ``Mul``.

Which inputs are weights, activations and biases, and when a constant folds exactly, come from
the op registry (``layout``, ``activation``, ``bias``, ``fold``); a weight is folded only when it
is a float tensor stored in the main graph and read by that node alone (it is rewritten in
place). Subgraphs are left as they are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.model import io as mio
from onnxprune.model.index import GraphIndex
from onnxprune.ops.registry import entry
from onnxprune.passes.base import Pass, PassRecord, PruneState

#: rewrite kinds, in the order the record lists them
KINDS = ("after", "before", "bias", "merge")


@dataclass
class FoldRecord(PassRecord):
    """How many scalar nodes each rewrite removed (``after``/``before``/``bias``/``merge``)."""

    folded: Dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Scalar:
    """A scalar elementwise node: ``y = x * value`` (Mul, Div as 1/s) or ``y = x + value``."""

    node: onnx.NodeProto
    data: str  # the non-constant input
    const: str  # the stored scalar's name
    value: float
    add: bool


def _scalar(index: GraphIndex, node: onnx.NodeProto) -> Optional[_Scalar]:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div", "Add") \
            or len(node.input) != 2 or len(node.output) != 1:
        return None
    sides = (1,) if node.op_type == "Div" else (1, 0)
    for k in sides:
        tensor = index.stored.get(node.input[k])
        if tensor is None or index.stored.get(node.input[1 - k]) is not None:
            continue
        # rank <= 1 so the broadcast never raises the output's rank; float only
        if len(tensor.dims) > 1 or int(np.prod(tensor.dims, dtype=np.int64)) != 1 or \
                tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            continue
        value = float(numpy_helper.to_array(tensor).reshape(()))
        if node.op_type == "Div":
            if value == 0.0 or not np.isfinite(1.0 / value):
                return None
            value = 1.0 / value
        if not np.isfinite(value):
            return None
        return _Scalar(node, node.input[1 - k], node.input[k], value, node.op_type == "Add")
    return None


@dataclass(frozen=True)
class _Weighted:
    """A weighted op's stored float weight (read by it alone), its layout and bias slot."""

    node: onnx.NodeProto
    index: int
    tensor: onnx.TensorProto
    layout: object
    bias: object  # BiasSlot or None


def _weighted(index: GraphIndex, node: onnx.NodeProto) -> Optional[_Weighted]:
    e = entry(node)
    if e is None or e.layout is None:
        return None
    for i, name in enumerate(node.input):
        tensor = index.stored.get(name) if name else None
        if tensor is None or tensor.data_type not in (onnx.TensorProto.FLOAT,
                                                      onnx.TensorProto.DOUBLE):
            continue
        layout = e.layout(node, i, tuple(tensor.dims))
        if layout is None or layout.view:
            continue
        if index.read_anywhere(name) != 1 or name in index.main.outputs:
            return None  # shared or a graph output: rewriting it in place would leak
        bias = e.bias(node, i) if e.bias is not None else None
        return _Weighted(node, i, tensor, layout, bias)
    return None


def _activation_of(w: _Weighted) -> Optional[int]:
    e = entry(w.node)
    act = e.activation(w.node, w.index, tuple(w.tensor.dims)) if e.activation else None
    return None if act is None or act.quantized else act.index


def _bias_tensor(handle: mio.ModelHandle, w: _Weighted) -> Tuple[Optional[onnx.TensorProto], bool]:
    """The weight's stored bias (None when absent) and whether it can be rewritten: stored,
    float, 1-D, one value per output row, read by this node alone."""
    index = handle.index
    if w.bias is None or w.bias.index is None:
        return None, False
    node = w.node
    name = node.input[w.bias.index] if len(node.input) > w.bias.index else ""
    if not name:
        return None, True
    tensor = index.stored.get(name)
    ok = (tensor is not None and len(tensor.dims) == 1 and index.read_anywhere(name) == 1
          and tensor.data_type == w.tensor.data_type and name not in index.main.outputs)
    return tensor, ok


def _rows(w: _Weighted) -> Optional[int]:
    """Output rows of the weight when they are the op's output channels (None: not known)."""
    if w.layout.group != 1 and w.layout.out_axis != 0:
        return None  # ConvTranspose with groups: its rows are Cout/g per group
    return w.layout.shape2d[0]


def _new_bias(handle: mio.ModelHandle, w: _Weighted, values: np.ndarray) -> None:
    graph = handle.model.graph
    taken = set(handle.index.stored) | {o for n in graph.node for o in n.output}
    base = f"{w.node.output[0]}_folded_bias"
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    dtype = onnx.helper.tensor_dtype_to_np_dtype(w.tensor.data_type)
    graph.initializer.append(numpy_helper.from_array(values.astype(dtype), name))
    while len(w.node.input) <= w.bias.index:
        w.node.input.append("")
    w.node.input[w.bias.index] = name
    if w.bias.beta_attr:
        for a in w.node.attribute:
            if a.name == w.bias.beta_attr:
                a.f = 1.0


def _fold_after(handle: mio.ModelHandle, s: _Scalar) -> bool:
    index = handle.index
    producer = index.producer(s.data)
    if producer is None or len(producer.output) != 1 or s.data in index.main.outputs \
            or len(index.readers(s.data)) != 1:
        return False
    w = _weighted(index, producer)
    if w is None or _activation_of(w) is None:
        return False
    bias, ok = _bias_tensor(handle, w)
    if s.add:
        rows = _rows(w)
        beta = w.bias.beta if w.bias is not None else 1.0
        if not ok or beta == 0 or (bias is None and rows is None):
            return False
        if bias is None:
            _new_bias(handle, w, np.full(rows, s.value / beta))
        else:
            handle.write(bias, handle.read(bias).astype(np.float64) + s.value / beta)
    else:
        if bias is not None and not ok:
            return False
        handle.write(w.tensor, handle.read(w.tensor).astype(np.float64) * s.value)
        if bias is not None:
            handle.write(bias, handle.read(bias).astype(np.float64) * s.value)
    producer.output[0] = s.node.output[0]
    return True


def _fold_before(handle: mio.ModelHandle, s: _Scalar) -> bool:
    index = handle.index
    out = s.node.output[0]
    if out in index.main.outputs:
        return False
    consumers = index.consumers(out)
    if not consumers or len(index.readers(out)) != len({id(n) for n, _ in consumers}):
        return False  # read inside a subgraph
    plans = []
    for node, k in consumers:
        w = _weighted(index, node)
        if w is None or _activation_of(w) != k or w.index == k:
            return False
        if s.add:
            e = entry(node)
            refusal = e.fold(node, w.index, tuple(w.tensor.dims)) if e.fold else "no fold rule"
            bias, ok = _bias_tensor(handle, w)
            if refusal is not None or not ok or (bias is None and _rows(w) is None) \
                    or w.bias.beta == 0:
                return False
            plans.append((w, bias))
        else:
            plans.append((w, None))
    if len({id(w.node) for w, _ in plans}) != len(plans):
        return False  # one node reads it twice
    for w, bias in plans:
        weight = handle.read(w.tensor).astype(np.float64)
        if s.add:
            shift = w.bias.scale * s.value * w.layout.to_2d(weight).sum(axis=1)
            if bias is None:
                _new_bias(handle, w, shift)
            else:
                handle.write(bias, handle.read(bias).astype(np.float64) + shift)
        else:
            handle.write(w.tensor, weight * s.value)
        w.node.input[_activation_of(w)] = s.data
    return True


def _merge(handle: mio.ModelHandle, s: _Scalar) -> bool:
    """``Mul/Div(Mul/Div(x, a), b)`` -> ``Mul(x, a*b)``: ``s`` is the second node."""
    index = handle.index
    first_node = index.producer(s.data)
    first = _scalar(index, first_node) if first_node is not None else None
    if first is None or first.add or s.add or s.data in index.main.outputs \
            or len(index.readers(s.data)) != 1:
        return False
    tensor = index.stored[s.const]
    value = np.asarray(first.value * s.value,
                       dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if index.read_anywhere(s.const) == 1 and s.const not in index.main.outputs:
        handle.write(tensor, value.reshape(tuple(tensor.dims)))
        const = s.const
    else:
        const = f"{s.node.output[0]}_merged_scale"
        handle.model.graph.initializer.append(
            numpy_helper.from_array(value.reshape(tuple(tensor.dims)), const))
    node = s.node
    node.op_type = "Mul"
    del node.input[:]
    node.input.extend([first.data, const])
    # the first node is now unread: it goes with the dead-node sweep
    return True


def _sweep(handle: mio.ModelHandle, candidates: Set[str]) -> None:
    """Remove the nodes and stored scalars the folds left unread."""
    graph = handle.model.graph
    changed = True
    while changed:
        changed = False
        index = handle.index
        for node in list(graph.node):
            outs = [o for o in node.output if o]
            if outs and all(o in candidates and not index.readers(o)
                            and o not in index.main.outputs for o in outs):
                candidates.update(i for i in node.input if i)
                graph.node.remove(node)
                handle.graph_changed()
                changed = True
                break
    index = handle.index
    keep = [t for t in graph.initializer
            if not (t.name in candidates and index.read_anywhere(t.name) == 0
                    and t.name not in index.main.outputs)]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
        handle.graph_changed()


def fold_scalars(handle: mio.ModelHandle) -> Dict[str, int]:
    """Apply the four exact rewrites (module doc) to ``handle``'s main graph until none applies;
    returns how many scalar nodes each kind removed."""
    counts: Counter = Counter()
    dead: Set[str] = set()
    progress = True
    while progress:
        progress = False
        for node in list(handle.index.nodes):
            index = handle.index
            s = _scalar(index, node)
            if s is None or not (index.readers(node.output[0])
                                 or node.output[0] in index.main.outputs):
                continue  # not scalar, or left unread by an earlier fold (swept below)
            if not s.add and _merge(handle, s):
                kind = "merge"
                dead.add(s.data)
            elif _fold_after(handle, s):
                kind = "after"
                dead.update((s.data, s.const))
                handle.model.graph.node.remove(node)
            elif _fold_before(handle, s):
                kind = "bias" if s.add else "before"
                dead.update((s.node.output[0], s.const))
            else:
                continue
            counts[kind] += 1
            handle.graph_changed()
            _sweep(handle, dead)  # an unread node would still count as a reader
            progress = True
            break
    return {k: counts[k] for k in KINDS if counts[k]}


class FoldScalars(Pass):
    """``--fold-scalars``: the exact scalar folds of :func:`fold_scalars`, run on the pruned
    model before it is validated (and timed)."""

    name = "fold-scalars"

    def run(self, state: PruneState) -> FoldRecord:
        folded = fold_scalars(state.handle)
        total = sum(folded.values())
        record = FoldRecord(folded=folded, modified=bool(total))
        if total:
            parts = ", ".join(f"{n} {_LABELS[k]}" for k, n in folded.items())
            record.summary = f"{total} scalar nodes folded"
            record.notes.append(
                f"fold-scalars: {total} scalar Mul/Div/Add nodes folded into weights and biases "
                f"({parts}); a graph optimization, not pruning: the same outputs up to float "
                "rounding")
        else:
            record.summary = "no scalar node to fold"
        return record


_LABELS = {"after": "after a weighted op", "before": "scales before one",
           "bias": "shifts into a bias", "merge": "merged scale pairs"}

__all__ = ["FoldRecord", "FoldScalars", "KINDS", "fold_scalars"]
