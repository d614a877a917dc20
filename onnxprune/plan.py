"""The pruning plan: what a run decided, as a JSON artifact that ``onnxprune apply`` re-applies.

``--save-plan plan.json`` records, after the masking (or channel) pass and before dead channels
are removed: per pruned weight its pattern, sparsity, shape, the keep mask itself (``nonzero``
positions packed 8 per byte, base64; ``mask_sha256`` the digest of those packed bytes) and, for
``--pattern channel``, the channels removed and kept per channel group (with the group's size
and producers); the channel orders ``--permute`` applied before the N:M masks (per group: its
producers, size and order — the masks are recorded on the reordered weights); the options that decide how masks become a model (pattern, scope, resize, the
channel counts); the tool version; and a **graph fingerprint**: each weight's name, shape and
reading op type, the op types of the graph, and a sha256 over them.

:func:`apply_plan` re-applies a plan to a model of the same architecture — the same file, a
re-export after fine-tuning, an fp16 copy (element types are not part of the fingerprint): the
channels are first reordered as the plan's permutations say, the masks applied as they are
(``masks=``), then dead channels as the original run removed them;
channel plans remove exactly the recorded channels. It reproduces the *decisions*, not value
updates a calibrated run made (SparseGPT reconstruction, bias correction, refits): on the same
model with a non-calibrated criterion the output is byte for byte the pruned one. A model whose
weights differ (a missing weight, another shape or op) is refused with :class:`PlanMismatch`
naming the differences; other graph differences (an extra Cast) only add a note.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from onnxprune.errors import OnnxPruneError
from onnxprune.model import io as mio
from onnxprune.passes.base import Pass, PassRecord, PruneState

#: The plan file's format name and version (bumped when a key changes meaning).
PLAN_FORMAT = "onnxprune-plan"
PLAN_VERSION = 1
#: The :class:`~onnxprune.options.PruneOptions` fields a plan keeps to re-apply its masks.
APPLY_FIELDS = ("pattern", "sparsity", "scope", "resize", "round_to", "min_channels",
                "max_group_sparsity", "storage", "seed", "input_shapes")


class PlanMismatch(OnnxPruneError):
    """The model is not the architecture the plan was made for (exit 2)."""


# -- masks ---------------------------------------------------------------------------------------

def pack_mask(keep: np.ndarray) -> bytes:
    """A boolean keep mask, row-major, 8 per byte (numpy's ``packbits``, big bit order)."""
    return np.packbits(np.asarray(keep, dtype=bool).reshape(-1)).tobytes()


def unpack_mask(packed: bytes, shape) -> np.ndarray:
    numel = int(np.prod(shape, dtype=np.int64))
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=numel)
    return bits.astype(bool).reshape(tuple(shape))


# -- the fingerprint -----------------------------------------------------------------------------

def fingerprint(handle: mio.ModelHandle) -> Dict[str, Any]:
    """Weights (name -> shape, reading op type) and op-type counts of the model in ``handle``,
    with a sha256 over them."""
    from onnxprune.ops.weights import find_weights

    weights = {w.key: {"shape": list(w.shape), "op": w.op_type}
               for w in find_weights(handle)[0]}
    ops = dict(sorted(Counter(n.op_type for n in handle.model.graph.node).items()))
    digest = hashlib.sha256(json.dumps([ops, weights], sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "op_types": ops, "weights": weights}


def mismatches(plan: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """What in the planned weights the model ``current`` (a :func:`fingerprint`) lacks or has
    otherwise: empty when the plan applies."""
    problems = []
    have = current["weights"]
    wanted = dict(plan["weights"])
    for group in plan.get("channels", []) + plan.get("permutations", []):  # producers too
        for name in group["producers"]:
            wanted.setdefault(name, plan["graph"]["weights"].get(name, {}))
    for key, entry in wanted.items():
        was = plan["graph"]["weights"].get(key, entry)
        if key not in have:
            problems.append(f"weight '{key}' is missing")
        elif list(have[key]["shape"]) != list(was.get("shape", have[key]["shape"])):
            problems.append(f"weight '{key}' has shape {have[key]['shape']}, the plan "
                            f"{was['shape']}")
        elif was.get("op") and have[key]["op"] != was["op"]:
            problems.append(f"weight '{key}' is read by {have[key]['op']}, in the plan by "
                            f"{was['op']}")
    return problems


# -- recording -----------------------------------------------------------------------------------

@dataclass
class PlanRecord(PassRecord):
    """The plan as a JSON-ready dict (weights and channel groups; the run's options and the
    fingerprint are added when it is written)."""

    plan: Dict[str, Any] = field(default_factory=dict)


class RecordPlan(Pass):
    """Record what the pruning pass before it decided (for ``--save-plan`` and ``--dry-run``):
    each pruned weight's keep mask, and the channels a channel pass removed per group."""

    name = "record-plan"
    requires = frozenset({"masks"})

    def __init__(self, input_shapes=None):
        self.input_shapes = input_shapes

    def run(self, state):
        from onnxprune.passes.permute import PermuteRecord
        from onnxprune.passes.structure import ChannelRecord

        record = PlanRecord()
        weights: Dict[str, Any] = {}
        by_key = {w.key: w for w in state.weights}
        for key, layer in state.layers.items():
            w = by_key.get(key)
            if w is None or layer.shape_after not in (None, layer.shape):
                continue  # resized by a channel pass: its groups say what happened
            keep = state.handle.read(w.tensor) != 0
            packed = pack_mask(keep)
            weights[key] = {"name": w.name, "pattern": layer.pattern, "criterion": layer.criterion,
                            "shape": list(layer.shape),
                            "sparsity": round(1 - int(keep.sum()) / max(1, keep.size), 6),
                            "mask_sha256": hashlib.sha256(packed).hexdigest(),
                            "mask": base64.b64encode(packed).decode("ascii")}
        channels = []
        removed = {int(k): v for r in state.records if isinstance(r, ChannelRecord)
                   for k, v in r.removed.items()}
        original = mio.load(state.original)
        if removed:
            from onnxprune.channels.graph import build_channel_graph

            graph = build_channel_graph(original, self.input_shapes)
            for gid, units in sorted(removed.items()):
                group = graph.groups[gid]
                gone = sorted(int(u) for u in units)
                channels.append({"group": gid, "producers": list(group.producers),
                                 "size": group.size, "removed": gone,
                                 "kept": sorted(set(range(group.size)) - set(gone))})
        permutations = [{"group": gid, "producers": producers, "size": size, "order": order}
                        for r in state.records if isinstance(r, PermuteRecord)
                        for gid, (producers, size, order) in sorted(r.orders.items())]
        record.plan = {"graph": fingerprint(original), "weights": weights, "channels": channels,
                       "permutations": permutations}
        record.summary = (f"{len(weights)} weight masks, {len(channels)} channel groups "
                          "recorded")
        return record


def plan_of(state: PruneState, options) -> Optional[Dict[str, Any]]:
    """The whole plan of a finished run (None when no :class:`RecordPlan` ran)."""
    records = [r for r in state.records if isinstance(r, PlanRecord)]
    if not records:
        return None
    plan = {"format": PLAN_FORMAT, "plan_version": PLAN_VERSION, "tool_version": _version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "options": _jsonable({k: getattr(options, k) for k in APPLY_FIELDS}),
            "summary": _jsonable(options.summary())}
    plan.update(records[-1].plan)
    return plan


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxprune")
    except Exception:  # run from a source tree
        from onnxprune import __version__

        return __version__


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_plan(plan: Dict[str, Any], path: Path, force: bool) -> Path:
    """Write ``plan`` as JSON atomically."""
    from onnxprune.model.output import write_atomic

    text = json.dumps(plan, indent=1, sort_keys=False) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(Path(path), write, force, "plan")


def summary_rows(plan: Dict[str, Any]) -> List[dict]:
    """The plan as report rows: one per weight mask and per channel group."""
    rows = [{"weight": k, "pattern": v["pattern"], "sparsity": v["sparsity"],
             "kept": f"mask sha256 {v['mask_sha256'][:16]}"} for k, v in plan["weights"].items()]
    rows += [{"weight": ", ".join(g["producers"][:3]), "pattern": "channel",
              "sparsity": round(len(g["removed"]) / max(1, g["size"]), 6),
              "kept": f"{len(g['kept'])} of {g['size']} channels"}
             for g in plan["channels"]]
    rows += [{"weight": ", ".join(g["producers"][:3]), "pattern": "permutation",
              "sparsity": 0.0, "kept": f"{g['size']} channels reordered"}
             for g in plan.get("permutations", [])]
    return rows


def predicted_latency(macs_before: Optional[int], macs_after: Optional[int], pattern: str) -> str:
    """The latency class a dry run predicts, in words: what the MAC change means on onnxruntime
    CPU (only removed structure is faster there; its latency followed 0.6-0.97 of the MAC
    reduction on the CNNs in benchmarks/latency.md) and where N:M zeros could pay instead."""
    if not macs_before or not macs_after:
        return ("predicted latency: unknown (MACs could not be counted; give --input-shape for "
                "dynamic dims)")
    ratio = macs_before / macs_after
    if ratio < 1.02:
        line = ("predicted latency: no change on onnxruntime CPU (zeros are still computed; "
                "only removed channels make it faster: --pattern channel)")
    else:
        lo, hi = max(1.0, 0.6 * ratio), 0.97 * ratio
        mid = (lo + hi) / 2
        size = "small" if mid < 1.1 else "moderate" if mid < 1.5 else "large"
        line = (f"predicted latency: {size} speed-up on onnxruntime CPU, about ×{lo:.2f}-"
                f"×{hi:.2f} for MACs ×{1 / ratio:.2f} (CPU latency followed 0.6-0.97 of the MAC "
                "reduction on the benchmarked CNNs; --target-speedup measures it on this "
                "machine)")
    if ":" in pattern:
        line += ("; N:M zeros can pay on TensorRT's sparse tensor cores: --target tensorrt "
                 "lists the layers it would run sparse")
    return line


# -- applying ------------------------------------------------------------------------------------

def load_plan(path) -> Dict[str, Any]:
    """Read and check a plan file (:class:`PlanMismatch` for anything that is not one)."""
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanMismatch(f"plan file '{path}' does not exist; write one with --save-plan"
                           ) from None
    except (OSError, ValueError, UnicodeError) as exc:
        raise PlanMismatch(f"'{path}' is not a readable plan ({exc}); write one with "
                           "--save-plan") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise PlanMismatch(f"'{path}' is not an onnxprune plan (no \"format\": "
                           f"\"{PLAN_FORMAT}\"); write one with --save-plan")
    if plan.get("plan_version") != PLAN_VERSION:
        raise PlanMismatch(f"'{path}' is plan version {plan.get('plan_version')}; this "
                           f"onnxprune reads version {PLAN_VERSION}")
    return plan


def planned_group(graph, g: Dict[str, Any], what: str):
    """The channel group a plan entry ``g`` names (same id, size and producers) in ``graph``;
    :class:`PlanMismatch` when this model has no such group."""
    gid = g["group"]
    have = graph.groups[gid] if 0 <= gid < len(graph.groups) else None
    if have is None or have.size != g["size"] or list(have.producers) != g["producers"]:
        raise PlanMismatch(f"channel group {gid} ({', '.join(g['producers'][:3])}, "
                           f"{g['size']} channels) that the plan {what} is not in this model's "
                           "channel graph as the plan has it")
    return have


class ApplyPermutations(Pass):
    """Reorder channels as a plan records (``--permute``), before its masks are applied."""

    name = "permute"
    requires = frozenset({"selection"})
    ensures = frozenset({"permutation"})

    def __init__(self, groups: List[Dict[str, Any]], input_shapes=None):
        self.groups = groups
        self.input_shapes = input_shapes

    def run(self, state):
        from onnxprune.channels.graph import build_channel_graph
        from onnxprune.channels.permute import permute_channels

        graph = build_channel_graph(state.handle, self.input_shapes)
        perms = {}
        for g in self.groups:
            group = planned_group(graph, g, "reorders")
            order = np.asarray(g["order"], dtype=np.int64)
            if sorted(order.tolist()) != list(range(group.size)):
                raise PlanMismatch(f"the plan's order for channel group {g['group']} is not a "
                                   f"permutation of its {group.size} channels")
            perms[group.id] = order
        permute_channels(state.handle, graph, perms)
        record = PassRecord(summary=f"{len(perms)} channel groups reordered as planned")
        record.modified = bool(perms)
        return record


class ApplyChannels(Pass):
    """Remove exactly the channels a plan records, group by group (the channel pass's masking
    and resize, without its selection)."""

    name = "channels"
    requires = frozenset({"selection"})
    ensures = frozenset({"masks", "channels"})

    def __init__(self, groups: List[Dict[str, Any]], input_shapes=None):
        self.groups = groups
        self.input_shapes = input_shapes

    def run(self, state):
        from onnxprune.channels.graph import build_channel_graph
        from onnxprune.channels.resize import mask_channels, resize_channels
        from onnxprune.passes.structure import ChannelRecord, _record_shapes, _snapshot

        record = ChannelRecord()
        before = _snapshot(state)
        graph = build_channel_graph(state.handle, self.input_shapes)
        removed = {}
        for g in self.groups:
            removed[planned_group(graph, g, "prunes").id] = list(g["removed"])
        mask_channels(state.handle, removed, graph)
        resize_channels(state.handle, graph, removed)
        record.resized = _record_shapes(state, record, before, "channel", "plan")
        record.removed = {str(k): v for k, v in removed.items() if v}
        record.channels_removed = sum(len(v) for v in removed.values())
        record.groups_pruned = len(record.removed)
        record.modified = record.channels_removed > 0
        record.summary = (f"{record.channels_removed} channels removed from "
                          f"{record.groups_pruned} groups as planned")
        record.notes.append(f"plan: {record.summary}")
        return record


def apply_plan(plan_path, model: mio.ModelLike, output=None, force: bool = False,
               validate: bool = True, track=None, storage: Optional[str] = None,
               inputs=None):
    """Re-apply the plan at ``plan_path`` to ``model``; returns the
    :class:`~onnxprune.api.PruneResult` (written to ``output`` when given). Raises
    :class:`PlanMismatch` when the model's weights are not the plan's."""
    from onnxprune import api
    from onnxprune.options import PruneOptions
    from onnxprune.passes.base import Pipeline, no_progress
    from onnxprune.passes.structure import PruneChannels
    from onnxprune.report.build import count_macs_or_error
    from onnxprune.runtime.session import session_threads

    plan = load_plan(plan_path)
    o = dict(plan["options"])
    names = [v.get("name", k) for k, v in plan["weights"].items()] + \
        [p for g in plan["channels"] for p in g["producers"]]
    masks = {k: unpack_mask(base64.b64decode(v["mask"]), v["shape"])
             for k, v in plan["weights"].items()}
    include = "^(?:" + "|".join(re.escape(n) for n in dict.fromkeys(names)) + ")$" \
        if names else "^$"
    opts = PruneOptions(pattern=o["pattern"], sparsity=o["sparsity"], scope="local",
                        resize=o["resize"], round_to=o["round_to"],
                        min_channels=o["min_channels"], seed=o["seed"],
                        storage=storage or o.get("storage", "dense"), include=include,
                        masks=masks or None, validate=validate, inputs=inputs,
                        input_shapes=o.get("input_shapes"),
                        allocate="uniform")
    start = time.perf_counter()
    state = PruneState.from_model(model, seed=opts.seed, track=track or no_progress)
    current = fingerprint(state.handle)
    problems = mismatches(plan, current)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)"
                                           if len(problems) > 5 else "")
        raise PlanMismatch(f"the model does not match the plan's graph: {shown}; apply the "
                           "plan to the architecture it was made for")
    out = None
    if output is not None:
        out = mio.resolve_output(state.handle.path, output, force,
                                 external=mio.needs_external(state.handle),
                                 reads=mio.input_files(state.handle) + [Path(plan_path)])
    size_before = state.handle.file_size()
    passes = api.build_passes(opts).passes
    passes = [ApplyChannels(plan["channels"], opts.input_shapes)
              if isinstance(p, PruneChannels) else p for p in passes]
    if plan.get("permutations"):  # reorder right after the selection, before any mask
        at = next(i for i, p in enumerate(passes) if "selection" in p.ensures) + 1
        passes.insert(at, ApplyPermutations(plan["permutations"], opts.input_shapes))
    macs_before = count_macs_or_error(state.model, opts.input_shapes, None)
    with session_threads(opts.threads):
        Pipeline(passes).run(state)
    notes = [f"plan {plan_path} applied (made by onnxprune {plan.get('tool_version')}): "
             f"{len(plan['weights'])} weight masks, {len(plan['channels'])} channel groups"
             + (f", {len(plan['permutations'])} channel orders"
                if plan.get("permutations") else "")]
    if current["sha256"] != plan["graph"]["sha256"]:
        diff = {k for k in set(current["op_types"]) | set(plan["graph"]["op_types"])
                if current["op_types"].get(k) != plan["graph"]["op_types"].get(k)}
        notes.append("the graph differs from the plan's outside the planned weights (op types "
                     f"{', '.join(sorted(diff)) or 'the same'}; other weights): applied by "
                     "weight name")
    run = api._Run(state, opts, out, size_before, macs_before, time.perf_counter() - start)
    return api._finish(run, output, force, notes=notes)


__all__ = ["APPLY_FIELDS", "ApplyChannels", "PLAN_FORMAT", "PLAN_VERSION", "PlanMismatch",
           "PlanRecord", "RecordPlan", "apply_plan", "fingerprint", "load_plan", "mismatches",
           "pack_mask", "plan_of", "summary_rows", "unpack_mask", "write_plan"]
