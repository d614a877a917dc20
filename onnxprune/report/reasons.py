"""What a "left alone" reason means for the user, in plain words.

The passes say *why* they left a weight unpruned or a channel group whole in their own terms
("Softmax 'sm' does not map axis 1 of 'y'"), where the fact is found (``ops/``, ``channels/``,
``masking/``, ``passes/``). This module owns the one translation the report applies to every such
reason: what the fact means, and what it does to the model ("…, so this group keeps all its
channels"). :func:`explain` is called once per entry when a report is built
(:mod:`onnxprune.report.build`, :mod:`onnxprune.report.inspect`), so the terminal, JSON and HTML
reports all show the same sentence.
"""

from __future__ import annotations

import re
from typing import List, Tuple

#: kind -> what leaving an item alone does to it
OUTCOME = {
    "weight": "this weight is kept as it was (not pruned)",
    "group": "this group keeps all its channels",
}

# Reasons that already say what happens to the item: their meaning is added, the outcome not.
_SAYS_OUTCOME = re.compile(r"stays dense|not pruned|left whole|nothing can be removed|"
                           r"prune it anyway|nothing to prune")

# (pattern on the reason, meaning; ``{op}`` is the op type the reason names, when it names one)
_MEANINGS: List[Tuple[str, "re.Pattern[str]", str]] = [
    ("group", re.compile(r"(?P<op>[\w.:]+) '[^']*' does not map axis"),
     "the {op} mixes or reads values across this axis, so removing channels would change what "
     "the {op} computes"),
    ("group", re.compile(r"graph output '[^']*' keeps its shape"),
     "these channels reach a model output, and removing some would change the output's shape "
     "that whoever runs the model expects"),
    ("group", re.compile(r"graph input '[^']*' keeps its shape"),
     "these channels come from a model input, whose shape is set by the data fed to the model"),
    ("group", re.compile(r"is read inside a subgraph"),
     "a tensor carrying these channels is used inside an If/Loop/Scan body, which the tool does "
     "not rewrite"),
    ("group", re.compile(r"no channel rule for"),
     "the tool does not know how this op passes channels through, so it cannot resize it "
     "safely"),
    ("group", re.compile(r"shape of '[^']*' unknown"),
     "the tool could not work out a tensor's shape (giving --input-shape may help)"),
    ("group", re.compile(r"cannot tell broadcast"),
     "without known shapes the tool cannot tell whether this axis is broadcast (giving "
     "--input-shape may help)"),
    ("group", re.compile(r"(?P<op>LayerNormalization) normalizes over axis"),
     "the {op} averages over these channels, so removing some would change its statistics"),
    ("group", re.compile(r"reshape"),
     "a Reshape merges or splits these channels with another axis, so they cannot be removed "
     "one by one"),
    ("group", re.compile(r"shape is computed at run time|'sizes' is not a constant"),
     "a target shape is computed while the model runs, so the tool cannot adjust it to fewer "
     "channels"),
    ("group", re.compile(r"its shape is read|is read by Shape"),
     "the model reads this tensor's size while it runs; removing channels would change that "
     "value"),
    ("group", re.compile(r"Slice \(opset<10\)"),
     "an old-style Slice (opset < 10) on the channel axis cannot be rewritten"),
    ("group", re.compile(r"computed in-graph, not a stored tensor"),
     "a per-channel operand is computed by the model rather than stored, so it cannot be cut to "
     "match"),
    ("group", re.compile(r"sizes differ|inconsistent sizes"),
     "tensors that must share a channel count disagree on it, so the tool does not touch them"),
    ("group", re.compile(r"is not selected"),
     "a weight that produces these channels is outside your selection, and removing channels "
     "would change that weight too"),
    ("group", re.compile(r"no weight produces these channels"),
     "there is no weight whose rows could be removed"),
    (None, re.compile(r"NaN or infinity"),
     "the values are not finite, so their importance cannot be measured"),
    ("weight", re.compile(r"\(quantized or integer\)"),
     "integer and quantized weights are kept exactly, so their quantization stays valid"),
    ("weight", re.compile(r"skipped by config rule"),
     "a rule in your --config file says to skip it"),
    ("weight", re.compile(r"looks like a fixed operand"),
     "it looks like a constant the model needs exactly (a ramp, a transform basis), not a "
     "learned weight"),
    ("weight", re.compile(r"used inside a subgraph"),
     "layer-by-layer pruning cannot collect its input from inside an If/Loop/Scan body"),
    ("weight", re.compile(r"input activation could not be collected"),
     "layer-by-layer pruning needs that input to reconstruct the layer"),
]


def meaning(kind: str, reason: str) -> str:
    """What ``reason`` means for the user (empty when no plainer words are known)."""
    for k, pattern, text in _MEANINGS:
        if k not in (None, kind):
            continue
        m = pattern.search(reason)
        if m is not None:
            op = m.groupdict().get("op") or "op"
            return text.format(op=op.split(":")[-1])
    return ""


def explain(kind: str, reason: str) -> str:
    """``reason`` followed by what it means and what happens to the item: ``kind`` is
    ``"weight"`` (a weight not pruned) or ``"group"`` (a channel group left whole).

    >>> explain("group", "Softmax 'sm' does not map axis 1 of 'y'")
    "Softmax 'sm' does not map axis 1 of 'y': the Softmax mixes or reads values across this \
axis, so removing channels would change what the Softmax computes; this group keeps all its \
channels"
    """
    if kind not in OUTCOME:
        raise ValueError(f"kind must be one of {sorted(OUTCOME)}, got {kind!r}")
    reason = str(reason).rstrip(". ")
    plain = meaning(kind, reason)
    if _SAYS_OUTCOME.search(reason):
        return f"{reason} ({plain})" if plain else reason
    return f"{reason}: {plain}; {OUTCOME[kind]}" if plain else f"{reason}; {OUTCOME[kind]}"


__all__ = ["OUTCOME", "explain", "meaning"]
