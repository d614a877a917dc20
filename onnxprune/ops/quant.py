"""The quantization family: QuantizeLinear, DequantizeLinear.

Each op's entry: how a stored weight passes through it. A float weight in a QDQ model reaches
its Conv through QuantizeLinear -> DequantizeLinear; a zero quantizes to the zero point and
dequantizes back to exactly 0, so masks survive it. (No channel rule yet: frozen.)
"""

from __future__ import annotations

from onnxprune.ops.registry import define, unchanged_step

define("QuantizeLinear", "DequantizeLinear", weight_step=unchanged_step)
