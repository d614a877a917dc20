"""The op registry: what each op means (weight layout W[out, in], activation operand, bias slot,
channel rule, constant propagation, MAC formula), one entry per op in :mod:`.registry`, filled
by one file per op family. Importing the package loads every family file, so any lookup sees
every entry."""

from onnxprune.ops import conv, linear, recurrent  # noqa: F401  (the families fill the registry)

__all__ = ["conv", "linear", "recurrent"]
