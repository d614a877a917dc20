"""The op registry: what each op means (weight layout W[out, in], activation operand, bias slot,
channel rule, constant propagation and exact-fold condition, MAC formula), one entry per op in
:mod:`.registry`, filled by one file per op family (:mod:`.conv`, :mod:`.linear`, :mod:`.norm`,
:mod:`.elementwise`, :mod:`.shape`, :mod:`.pool`, :mod:`.reduce`, :mod:`.recurrent`,
:mod:`.quant`, :mod:`.attention`).
Importing the package loads every family file, so any lookup sees every entry."""

from onnxprune.ops import (conv, elementwise, linear, norm, pool, quant,  # noqa: F401
                           recurrent, reduce, shape)
from onnxprune.ops import attention  # noqa: F401

__all__ = ["attention", "conv", "elementwise", "linear", "norm", "pool", "quant", "recurrent",
           "reduce", "shape"]
