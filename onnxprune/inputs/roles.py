"""What each model input *is*, read from how the graph uses it: the roles of generated inputs.

Generated inputs (:mod:`onnxprune.inputs.generate`) are only useful when they are values the
model can meet. For integer inputs that means knowing what the integers are; this module owns
that decision, made once per model from the graph index (graph use first, the input's name
second):

* ``ids``: token ids, read as the indices of a ``Gather`` over an embedding table (through
  shape-only ops: Reshape, Unsqueeze, Flatten, Cast between integer types, ...): drawn from
  ``0 .. rows-1`` of that table (the smallest table when several read them). With no table in
  sight an integer input falls back to ``0 .. INT_HIGH-1`` with a note;
* ``mask``: an attention mask, an input turned into float and combined by ``Sub``/``Mul``/
  ``Add`` toward an additive mask, or compared / selected on (``Equal``, ``Not``, ``Where``),
  or (by name) one whose name contains ``mask``: all ones (attend everywhere) — or all zeros
  when a true value is what selects a ``Where``'s masking fill, or a zero what a ``Mul``
  with activations keeps (a padding mask, PyTorch's ``key_padding_mask``: ``ids == pad``),
  ``Not`` on the way counted;
* ``type``: token types / segments, ids into a table of at most 2 rows, or (by name) containing
  ``type`` or ``segment``: all zeros;
* ``position``: named ``position_ids``/``positions``: ``0, 1, 2, ...`` along the last axis;
* ``past``: a past key or value (rank 4, a dim or the name containing ``past``): its ``past``
  dims get length 1 (a zero-length input cannot pass the input check), values standard normal;
* ``plain``: everything else (floats: standard normal; integers with no table: ``0 .. 9``;
  ``uint8``: ``0 .. 255``; bool: fair coin flips).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx

from onnxprune.inputs.signature import FLOAT_TYPES, InputSpec, ModelOrPath, model_proto
from onnxprune.model.index import GraphIndex, attr

#: Integer inputs with no embedding table in sight are drawn from ``0..INT_HIGH-1``: small
#: enough to be valid token ids, class indices or gather positions in nearly every model.
INT_HIGH = 10
#: A symbolic dim whose name contains this is a past sequence length (KV cache).
PAST = "past"

#: Ops that carry integer ids (or a mask) on unchanged in meaning: followed when looking for
#: the op that finally reads them.
_CARRY = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose",
          "Slice", "Concat", "Tile", "Gather", "GatherND", "GatherElements"}
#: Ops an attention mask meets on its way to an additive mask.
_MASK_ARITH = {"Sub", "Mul", "Add", "Not", "Equal", "Where", "Less", "Greater", "And", "Or"}
#: Ops that hold a table's values on their way to a Gather (dequantization, casts).
_TABLE_PATH = {"Cast", "Mul", "DequantizeLinear", "Identity", "Transpose", "Reshape"}


@dataclass(frozen=True)
class InputRole:
    """What an input holds: ``kind`` (ids, mask, type, position, past, plain), ``high`` (ids:
    the exclusive upper bound of the values drawn), ``why`` (how it was decided, for the
    report) and ``fill`` (a mask's attend-everywhere value: 1, or 0 where true marks padding)."""

    kind: str
    high: Optional[int] = None
    why: str = ""
    fill: int = 1  # a mask's value that lets every position through

    def describe(self, name: str, shape: Sequence[int]) -> str:
        """One line for the report: what was generated for input ``name``."""
        dims = "x".join(str(d) for d in shape) or "()"
        what = {"ids": f"token ids in 0..{(self.high or INT_HIGH) - 1}",
                "mask": ("all ones (attend everywhere)" if self.fill else
                         "all zeros (nothing marked as padding)"), "type": "all zeros",
                "position": "0, 1, 2, ... along the last axis",
                "past": "standard normal with past length 1"}.get(self.kind, "random values")
        return f"{name} [{dims}]: {what} ({self.why})" if self.why else f"{name} [{dims}]: {what}"


def input_roles(model: ModelOrPath, specs: Optional[Sequence[InputSpec]] = None
                ) -> Dict[str, InputRole]:
    """The role of every runtime input of ``model`` (see the module docstring)."""
    from onnxprune.inputs.signature import input_signature

    proto = model_proto(model)
    specs = list(specs) if specs is not None else input_signature(proto)
    index = GraphIndex(proto)
    return {spec.name: _role(spec, index) for spec in specs}


def _role(spec: InputSpec, index: GraphIndex) -> InputRole:
    lowered = spec.name.lower()
    dims = spec.dims or ()
    if spec.elem_type in FLOAT_TYPES:
        if len(dims) == 4 and (PAST in lowered or any(isinstance(d, str) and PAST in d.lower()
                                                      for d in dims)):
            return InputRole("past", why="a past key/value (rank 4, 'past' in its name or dims)")
        return InputRole("plain")
    is_int = spec.dtype.kind in "iu" and spec.dtype != np.uint8
    is_bool = spec.elem_type == onnx.TensorProto.BOOL
    if not (is_int or is_bool):
        return InputRole("plain")
    tables, masky, hides = _uses(spec.name, index)
    if "position" in lowered and is_int:
        return InputRole("position", why="named as positions")
    if tables:
        rows = min(tables)
        if rows <= 2 or "type" in lowered or "segment" in lowered:
            return InputRole("type", why=f"indexes a table of {rows} rows" if rows <= 2
                             else "named as token types")
        return InputRole("ids", high=rows, why=f"indexes an embedding table of {rows} rows")
    if hides and all(hides):
        return InputRole("mask", fill=0, why="true marks padding: it selects a masking fill "
                         "or zeroes activations")
    if masky:
        return InputRole("mask", why="combined toward an additive mask")
    if "mask" in lowered:
        return InputRole("mask", why="named as a mask")
    if is_int and ("type" in lowered or "segment" in lowered):
        return InputRole("type", why="named as token types")
    if is_int:
        return InputRole("ids", high=INT_HIGH, why=f"no embedding table found: small range "
                         f"0..{INT_HIGH - 1}")
    return InputRole("plain")


def _uses(name: str, index: GraphIndex):
    """(row counts of the tables ``name`` indexes through Gather, whether it is used like a
    mask, the mask's polarities: True where a true/nonzero value *hides* a position), following
    it through shape-only ops, casts and ``Not``."""
    tables: List[int] = []
    masky = False
    hides: List[bool] = []
    seen, todo = set(), [(name, False, False)]
    while todo:
        value, as_float, negated = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        for node, slot in index.consumers(value):
            op = node.op_type
            if op in ("Gather", "GatherElements") and slot == 1 and not as_float:
                rows = _table_rows(node.input[0], index)
                if rows is not None and int(attr(node, "axis", 0)) == 0:
                    tables.append(rows)
            elif op == "Cast":
                to = int(attr(node, "to", 0))
                floaty = to in FLOAT_TYPES
                todo.extend((o, as_float or floaty, negated) for o in node.output)
            elif op == "Not":
                masky = True
                todo.extend((o, as_float, not negated) for o in node.output)
            elif op in _CARRY and (slot == 0 or op == "Concat"):
                todo.extend((o, as_float, negated) for o in node.output)
            elif op in _MASK_ARITH:
                masky = True
                if op == "Mul" and as_float and _constant(node.input[1 - slot], index) is None:
                    hides.append(negated)  # multiplies activations: a zero hides a position
                elif op == "Where" and slot == 0:
                    fill = _constant(node.input[1], index)
                    if fill is not None and fill.size and (fill <= MASK_FILL).all():
                        hides.append(not negated)  # the condition selects the -inf fill
    return tables, masky, hides


#: A ``Where`` branch at or below this is a masking fill (-1e4, -1e9, -inf, float min).
MASK_FILL = -1e4


def _constant(name: str, index: GraphIndex) -> Optional[np.ndarray]:
    stored = index.stored.get(name)
    if stored is None:
        return None
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(stored).astype(np.float64)
    except (ValueError, TypeError):
        return None


def _table_rows(name: str, index: GraphIndex, depth: int = 4) -> Optional[int]:
    """Row count of the stored table behind ``name`` (directly, or behind Cast / Mul by scale /
    DequantizeLinear): its largest rank-2 stored tensor's first dim."""
    stored = index.stored.get(name)
    if stored is not None:
        return int(stored.dims[0]) if len(stored.dims) == 2 else None
    node = index.producer(name)
    if node is None or depth == 0 or node.op_type not in _TABLE_PATH:
        return None
    found = [r for r in (_table_rows(i, index, depth - 1) for i in node.input if i)
             if r is not None]
    return max(found) if found else None

