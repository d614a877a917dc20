"""``--target tensorrt`` with calibration data: :class:`SkipCostlySparse`, which leaves dense the
2:4 layers whose measured error is out of proportion to the MACs they would save.

:class:`~onnxprune.passes.weights.SelectWeights` already keeps only the weights TensorRT would
run sparse. Among those, a layer whose 2:4 mask alone costs a large share of the total output
error while holding a small share of the MACs buys little speed for much accuracy. This pass
prunes each such weight alone to 2:4 (magnitude masks, on the first calibration samples,
:func:`onnxprune.calibration.sensitivity.layer_sensitivity`), and drops from the selection each
weight whose error share exceeds ``ratio`` times its MAC share (``--sparse-error-ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from onnxprune.calibration.sensitivity import layer_sensitivity
from onnxprune.inputs.signature import resolve_input_shapes
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.registry import complete_types, macs_of
from onnxprune.ops.weights import Skipped
from onnxprune.passes.base import Pass, PassRecord
from onnxprune.passes.weights import satisfies_24


@dataclass
class TrimRecord(PassRecord):
    """Per measured weight: its MAC share, error share and whether it stays 2:4."""

    ratio: float = 0.0
    table: List[dict] = field(default_factory=list)


def weight_macs(handle, weights: Sequence, input_shapes: Optional[Mapping] = None
                ) -> Dict[str, int]:
    """MACs of the main-graph node(s) reading each weight (registry MAC formulas on the one
    shape inference); a weight whose node's shapes are unknown is left out."""
    resolved = resolve_input_shapes(handle.model, input_shapes, 1, require_all=False)
    shapes = infer_shapes(handle, resolved, keep_value_info=True, complete=complete_types).static()
    out: Dict[str, int] = {}
    for w in weights:
        total = 0
        for c in w.consumers:
            macs = macs_of(c.node, shapes)
            if macs is None:
                total = None
                break
            total += int(macs)
        if total:
            out[w.key] = total
    return out


class SkipCostlySparse(Pass):
    """Leave dense the 2:4 weights whose error share is above ``ratio`` × their MAC share."""

    name = "target-trim"
    requires = frozenset({"selection", "calibration"})
    ensures = frozenset({"target-trim"})

    def __init__(self, ratio: float = 4.0, samples: int = 16, input_shapes=None):
        self.ratio, self.samples, self.input_shapes = float(ratio), samples, input_shapes

    def run(self, state):
        plans = [p for p in state.plans if satisfies_24(p.pattern)]
        if len(plans) < 2 or state.calibration is None:
            return TrimRecord(summary="nothing to weigh (fewer than two 2:4 layers)",
                              ratio=self.ratio)
        weights = [p.weight for p in plans]
        macs = weight_macs(state.handle, weights, self.input_shapes)
        table = layer_sensitivity(state.handle, weights, state.calibration, plans[0].pattern,
                                  criterion="magnitude", samples=self.samples, seed=state.seed)
        errors = {k: float(v[0]) for k, v in table.errors.items()}
        keys = [w.key for w in weights if w.key in macs and w.key in errors]
        total_macs = sum(macs[k] for k in keys)
        total_err = sum(max(errors[k], 0.0) for k in keys)
        rows, dense = [], {}
        for key in keys:
            mac_share = macs[key] / total_macs if total_macs else 0.0
            err_share = max(errors[key], 0.0) / total_err if total_err > 0 else 0.0
            out_of_line = mac_share > 0 and err_share > self.ratio * mac_share
            rows.append({"weight": key, "MACs": macs[key], "MAC share": round(mac_share, 4),
                         "2:4 error": errors[key], "error share": round(err_share, 4),
                         "stays 2:4": not out_of_line})
            if out_of_line:
                dense[key] = (f"TensorRT could run it sparse, but its measured 2:4 error is out "
                              f"of proportion to the MACs it saves ({100 * err_share:.1f}% of the "
                              f"error for {100 * mac_share:.1f}% of the MACs, above "
                              f"--sparse-error-ratio {self.ratio:g}); stays dense "
                              "(--target tensorrt)")
        skipped = [Skipped(p.weight.name, dense[p.weight.key]) for p in state.plans
                   if p.weight.key in dense]
        state.plans = [p for p in state.plans if p.weight.key not in dense]
        summary = (f"{len(dense)} of {len(keys)} 2:4 layers left dense: error out of proportion "
                   f"to their MACs (ratio {self.ratio:g}, {table.samples} samples)")
        return TrimRecord(summary=summary, skipped=skipped, ratio=self.ratio, table=rows,
                          notes=[f"target tensorrt: {summary}"] if dense else [])


__all__ = ["SkipCostlySparse", "TrimRecord", "weight_macs"]
