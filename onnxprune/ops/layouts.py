"""The logical view of a weight: every prunable weight seen as a 2-D matrix ``W[out, in]``.

This module holds the :class:`Layout` type and its lookup; each op's layout rule is the
``layout`` field of its registry entry (:mod:`onnxprune.ops.registry`), in its family file
(:mod:`onnxprune.ops.conv`, :mod:`onnxprune.ops.linear`). Patterns, criteria, reconstruction and
channel resizing all go through :class:`Layout`; nothing else in onnxprune transposes a raw
Conv/Gemm/MatMul weight by hand.

``in`` is the reduction axis. For Conv the input channel is innermost at each kernel position,
so that N:M groups are the 4 consecutive input channels TensorRT counts at each (cout, kh, kw).

A layout rule receives the node, the input index of the tensor and the tensor's shape and
returns a :class:`Layout`, or ``None`` when that input is not a prunable weight (a bias, a shape
operand, a 1-D vector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxprune.ops.registry import field_of, op_types_with

LayoutRule = Callable[[onnx.NodeProto, int, Tuple[int, ...]], Optional["Layout"]]


def prunable_op_types() -> Tuple[str, ...]:
    """Op types that have a weight layout (the default ``--op-types``)."""
    return op_types_with("layout")


@dataclass(frozen=True)
class Layout:
    """How a raw weight array of ``shape`` maps to ``W[out, in]``.

    ``perm`` reorders the raw axes to ``[out axes..., in axes...]``; the first ``n_out`` permuted
    axes flatten into ``out`` and the rest into ``in``. ``out_axis``/``in_axis`` are the raw axes
    that hold output and input *channels* (what channel pruning slices); ``group`` is the Conv
    group count (1 elsewhere).
    """

    op_type: str
    shape: Tuple[int, ...]
    perm: Tuple[int, ...]
    n_out: int
    out_axis: int
    in_axis: int
    group: int = 1
    #: How the stored tensor becomes what the consumer sees, when it passes a Reshape or a
    #: Transpose on the way: ``(("reshape", new_shape) | ("transpose", perm), ...)`` applied in
    #: order to the stored array of shape ``source_shape`` (empty: seen as stored).
    view: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
    source_shape: Optional[Tuple[int, ...]] = None

    @property
    def stored_shape(self) -> Tuple[int, ...]:
        """The shape of the tensor as stored."""
        return self.source_shape if self.view else self.shape

    def _view_shapes(self) -> list:
        shapes = [self.stored_shape]
        for op, arg in self.view:
            shapes.append(arg if op == "reshape" else tuple(shapes[-1][i] for i in arg))
        return shapes

    @property
    def kernel_positions(self) -> bool:
        """True when ``in`` spans kernel positions as well as channels (Conv, ConvTranspose):
        the columns are ``(k..., channel)`` with the channel innermost."""
        return len(self.perm) - self.n_out > 1

    @property
    def shape2d(self) -> Tuple[int, int]:
        permuted = [self.shape[p] for p in self.perm]
        rows = int(np.prod(permuted[: self.n_out], dtype=np.int64))
        cols = int(np.prod(permuted[self.n_out :], dtype=np.int64))
        return rows, cols

    def to_2d(self, arr: np.ndarray) -> np.ndarray:
        """Raw weight -> ``W[out, in]`` (a view where numpy can, else a copy)."""
        if self.view and tuple(arr.shape) == self.stored_shape:
            for op, arg in self.view:
                arr = arr.reshape(arg) if op == "reshape" else arr.transpose(arg)
        if tuple(arr.shape) != self.shape:
            raise ValueError(f"array shape {arr.shape} does not match layout shape {self.shape}")
        return arr.transpose(self.perm).reshape(self.shape2d)

    def from_2d(self, w2d: np.ndarray) -> np.ndarray:
        """``W[out, in]`` -> raw weight layout (inverse of :meth:`to_2d`)."""
        permuted_shape = [self.shape[p] for p in self.perm]
        inverse = np.argsort(self.perm)
        raw = w2d.reshape(permuted_shape).transpose(inverse)
        shapes = self._view_shapes()
        for i in reversed(range(len(self.view))):
            op, arg = self.view[i]
            raw = raw.reshape(shapes[i]) if op == "reshape" else raw.transpose(np.argsort(arg))
        return np.ascontiguousarray(raw)

    def same_view(self, other: "Layout") -> bool:
        """True when two consumers see the same tensor as the same ``W[out, in]``."""
        return ((self.shape, self.perm, self.n_out, self.view)
                == (other.shape, other.perm, other.n_out, other.view))


def layout_for(node: onnx.NodeProto, input_index: int, shape: Sequence[int]) -> Optional[Layout]:
    """The layout of ``node``'s input ``input_index`` with ``shape``, or None if not a weight."""
    rule = field_of(node, "layout")
    if rule is None:
        return None
    shape = tuple(int(d) for d in shape)
    if any(d <= 0 for d in shape):
        return None
    return rule(node, input_index, shape)
