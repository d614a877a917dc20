"""The recurrent family: LSTM, GRU, RNN.

Each op's entry: MAC formula. (No channel rule yet: their tensors are frozen.)
"""

from __future__ import annotations

from typing import Optional

import onnx

from onnxprune.model.index import attr
from onnxprune.ops.registry import Shapes, define, numel, shape_in


def _recurrent_macs(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    # Per time step and batch row, every gate of every direction multiplies the input by W
    # [dirs, gates*H, I] and the hidden state by R [dirs, gates*H, H]: numel(W) + numel(R).
    # Element-wise gate math is not counted.
    x = shape_in(shapes, node, 0)
    w = shape_in(shapes, node, 1)
    r = shape_in(shapes, node, 2)
    if x is None or w is None or r is None or len(x) != 3:
        return None
    seq, batch = (x[1], x[0]) if attr(node, "layout", 0) else (x[0], x[1])
    return int(seq) * int(batch) * (numel(w) + numel(r))


define("LSTM", "GRU", "RNN", macs=_recurrent_macs)
