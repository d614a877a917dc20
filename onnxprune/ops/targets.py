"""What a deployment runtime can do with a pruned weight: the op facts behind ``--target``.

This module owns the rules; :mod:`onnxprune.report.targets` turns them into the report's table
and MAC fractions, and :class:`onnxprune.passes.weights.SelectWeights` uses them to leave dense
what TensorRT would not run sparse.

``tensorrt`` — 2:4 sparse tensor cores (Ampere and newer), as we read NVIDIA's guidance (the
TensorRT Developer Guide, "Structured Sparsity"; the NVIDIA blog "Accelerating Inference with
Sparsity Using the NVIDIA Ampere Architecture and NVIDIA TensorRT"; and the checks of NVIDIA's
ASP, ``apex/contrib/sparsity/asp.py``). TensorRT chooses sparse kernels per layer at build time
(``--sparsity=enable`` / ``BuilderFlag.SPARSE_WEIGHTS``), and only where they are faster than
dense ones. A Conv/Gemm/MatMul weight is **eligible** when every rule holds:

* the op is a convolution (``Conv``) or a fully connected / matrix multiply (``Gemm``,
  ``MatMul``); ``ConvTranspose`` (deconvolution) runs dense;
* the weight is a constant operand (a stored tensor); a MatMul whose operands are both computed
  at run time (attention scores) has none, and a batched (rank > 2) MatMul weight is a batched
  matrix multiply, not a fully connected layer;
* the convolution is not grouped or depthwise (``group == 1``);
* ``C`` — the input channels (per group), or the input features of Gemm/MatMul — is a multiple
  of 4, so that the 2:4 groups are 4 consecutive input channels at every kernel position (the
  ``W[out, in]`` view of :mod:`onnxprune.ops.layouts` keeps the channel innermost per kernel
  position, so a 2:4 mask there is exactly TensorRT's groups);
* the precision is fp16, bf16 or int8. ONNX files mostly store fp32 weights; TensorRT picks the
  precision when it builds the engine, so an fp32 weight is reported "eligible when built with
  fp16/int8" (``--fp16``/``--int8``); a float64 weight is not eligible.

An eligible weight is **likely to be picked** when it is large enough for the sparse kernel to
beat the dense one: ``K >= 256`` output channels and a reduction length ``C × kernel area >=
256`` (NVIDIA's guidance: large C and K, roughly 256 and up; a 3×3 kernel counts C×9), and when
its sizes fill the sparse tensor-core tiles without padding: ``K % 8 == 0`` and ``C % 16 == 0``
(ASP skips a layer failing these). Each verdict carries its reason in words.

``onnxruntime-cpu`` — onnxruntime's CPU kernels run unstructured, block and N:M zeros at dense
speed (measured 0.90–1.00× latency); only removing channels (``--pattern channel``) makes a
model faster there (benchmarks/latency.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import onnx

from onnxprune.model.index import node_label
from onnxprune.model.io import ModelHandle
from onnxprune.ops.layouts import prunable_op_types
from onnxprune.ops.weights import Skipped, Weight

#: The runtimes ``--target`` knows.
TARGETS = ("tensorrt", "onnxruntime-cpu")

#: Likely picked: at least this many output channels and this reduction length (C × kernel).
MIN_SPARSE_SIZE = 256
#: Sparse tensor-core tiles: output channels and input channels per group a multiple of these.
TILE_OUT, TILE_IN = 8, 16

#: Op types TensorRT's 2:4 sparse kernels take, and what TensorRT calls them.
_SPARSE_OPS = {"Conv": "convolution", "Gemm": "fully connected", "MatMul": "matrix multiply"}

#: What onnxruntime on CPU gains from each kind of pattern (the ``--target onnxruntime-cpu`` text).
ORT_CPU_NOTE = ("target onnxruntime-cpu: onnxruntime's CPU kernels compute zeros like any other "
                "value, so unstructured, block (NxM) and N:M zeros do not make the model faster "
                "there (measured 0.90–1.00× latency); only removing channels (--pattern channel) "
                "does, in proportion to the MACs removed")


@dataclass(frozen=True)
class SparseVerdict:
    """Whether TensorRT can run one Conv/Gemm/MatMul weight with 2:4 sparse kernels.

    ``name``: the weight's key (or, for a node with no constant weight, the node's label);
    ``nodes``: labels of the nodes reading it. ``eligible``: every structural rule holds (at the
    ``precision`` stated); ``picked``: eligible and large enough that TensorRT likely chooses a
    sparse kernel. ``reason``: why, in words. ``channels``: ``C`` (input channels per group, or
    input features), ``outputs``: ``K``, ``reduction``: ``C × kernel area``.
    """

    name: str
    op_type: str
    nodes: tuple
    eligible: bool
    picked: bool
    precision: str
    reason: str
    channels: Optional[int] = None
    outputs: Optional[int] = None
    reduction: Optional[int] = None
    is_weight: bool = True

    @property
    def dense_reason(self) -> str:
        """Why a ``--target tensorrt`` run leaves this weight dense (empty when picked)."""
        if self.picked:
            return ""
        if not self.eligible:
            return self.reason
        detail = self.reason.split("unlikely to be picked: ", 1)[-1]
        return "TensorRT would not run it sparse (too small to pay): " + detail


#: ONNX element type -> the precision TensorRT would run a sparse kernel of that weight in.
_PRECISIONS = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
               onnx.TensorProto.FLOAT: "fp16/int8 build", onnx.TensorProto.INT8: "int8"}


def tensorrt_verdict(weight: Weight) -> SparseVerdict:
    """The TensorRT 2:4 verdict of one prunable weight (see the module docstring's rules)."""
    layout = weight.layout
    nodes = tuple(node_label(c.node) for c in weight.consumers)
    rows, cols = layout.shape2d
    channels = int(layout.shape[layout.in_axis])
    kernel = cols // max(channels, 1)
    dims = dict(channels=channels, outputs=int(rows), reduction=int(cols))

    def no(reason: str, precision: str = "-") -> SparseVerdict:
        return SparseVerdict(weight.key, weight.op_type, nodes, False, False, precision,
                             "TensorRT would not run it sparse: " + reason, **dims)

    other = sorted({c.node.op_type for c in weight.consumers} - set(_SPARSE_OPS))
    if other:
        return no(f"{other[0]} runs dense (TensorRT's 2:4 kernels cover convolution, fully "
                  "connected and matrix multiply layers)")
    precision = _PRECISIONS.get(weight.tensor.data_type)
    if precision is None:
        return no(f"{weight.dtype} weight (sparse kernels run fp16, bf16 or int8)")
    if weight.op_type == "MatMul" and len(layout.shape) > 2:
        return no(f"a batched {len(layout.shape)}-D MatMul weight is a batched matrix multiply, "
                  "not a fully connected layer", precision)
    if layout.group > 1:
        if channels == 1:
            return no(f"depthwise convolution (group={layout.group}, one input channel per "
                      "group): no 4 input channels to group, and grouped convolutions run dense",
                      precision)
        return no(f"grouped convolution (group={layout.group}): sparse kernels take only "
                  "group=1 convolutions", precision)
    inputs = "input channels" if weight.op_type == "Conv" else "input features"
    if channels % 4:
        return no(f"C={channels} {inputs} is not a multiple of 4, so 2:4 groups of 4 consecutive "
                  f"input channels do not fit at every kernel position", precision)
    built = " when built with fp16/int8" if precision == "fp16/int8 build" else ""
    k = f"{channels}×{kernel}" if kernel > 1 else f"{channels}"
    small = []
    if rows < MIN_SPARSE_SIZE:
        small.append(f"K={rows} output channels < {MIN_SPARSE_SIZE}")
    if cols < MIN_SPARSE_SIZE:
        small.append(f"C×kernel={k}={cols} < {MIN_SPARSE_SIZE}" if kernel > 1
                     else f"C={cols} {inputs} < {MIN_SPARSE_SIZE}")
    if not small:
        if rows % TILE_OUT:
            small.append(f"K={rows} is not a multiple of {TILE_OUT} (tiles would be padded)")
        if channels % TILE_IN:
            small.append(f"C={channels} is not a multiple of {TILE_IN} (tiles would be padded)")
    if small:
        return SparseVerdict(
            weight.key, weight.op_type, nodes, True, False, precision,
            f"eligible{built}, but a sparse kernel is unlikely to be picked: "
            + "; ".join(small) + " (sparse kernels pay for large C and K, roughly 256 and up)",
            **dims)
    return SparseVerdict(weight.key, weight.op_type, nodes, True, True, precision,
                         f"eligible{built} and likely picked: K={rows}, "
                         + (f"C×kernel={k}={cols}" if kernel > 1 else f"C={cols}") + " "
                         f"(both ≥ {MIN_SPARSE_SIZE})", **dims)


def _operand_reason(handle: ModelHandle, node: onnx.NodeProto,
                    skipped: Dict[str, Skipped]) -> str:
    """Why a Conv/Gemm/MatMul node has no prunable weight: a stored operand onnxprune leaves
    alone (quantized, shared, ...) or no constant operand at all."""
    index = handle.index
    for name in node.input:
        seen = set()
        while name and name not in seen:  # back through Cast/DequantizeLinear/... to a store
            seen.add(name)
            if name in skipped:
                return ("TensorRT would not run it sparse here: onnxprune leaves its constant "
                        f"'{name}' alone ({skipped[name].reason})")
            if name in index.stored:
                break
            producer = index.producer(name)
            name = producer.input[0] if producer is not None and producer.input else ""
    return ("TensorRT would not run it sparse: no constant weight operand (both operands are "
            "computed while the model runs, as in attention); 2:4 kernels need a constant "
            "weight")


def tensorrt_eligibility(handle: ModelHandle, weights: Sequence[Weight],
                         skipped: Sequence[Skipped] = ()) -> List[SparseVerdict]:
    """One verdict per prunable weight (in ``weights`` order), then one per main-graph
    Conv/ConvTranspose/Gemm/MatMul node that reads none of them (an activation × activation
    MatMul, a quantized or otherwise skipped weight)."""
    verdicts = [tensorrt_verdict(w) for w in weights]
    covered = {label for v in verdicts for label in v.nodes}
    by_name = {s.name: s for s in skipped}
    ops = set(prunable_op_types())
    for node in handle.model.graph.node:
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        label = node_label(node)
        if label in covered:
            continue
        verdicts.append(SparseVerdict(label, node.op_type, (label,), False, False, "-",
                                      _operand_reason(handle, node, by_name), is_weight=False))
    return verdicts


__all__ = ["MIN_SPARSE_SIZE", "ORT_CPU_NOTE", "SparseVerdict", "TARGETS", "TILE_IN", "TILE_OUT",
           "tensorrt_eligibility", "tensorrt_verdict"]
