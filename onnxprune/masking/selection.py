"""Which weights are pruned, and how: op types, name regexes and per-op config rules.

The result is one :class:`LayerPlan` per selected weight: its pattern, target sparsity, criterion
and sparsity bounds. A config file (JSON or YAML) is either a list of rules or a mapping with
``defaults`` and ``rules``::

    defaults: {pattern: 4x1, sparsity: 0.8}
    rules:
      - op_names: ["backbone.*"]          # regexes on the weight name or a consumer node name
        pattern: "2:4"
      - op_types: [Gemm]
        sparsity: 0.5
      - op_names: ["head.*"]
        skip: true

The first rule that matches a weight decides; keys it leaves out come from ``defaults``, then from
the command line / API arguments. A sparsity is inherited only by a pattern that takes one: an
N:M pattern fixes its own (``2:4`` is 50 %), so the rule above prunes ``backbone.*`` 2:4 although
the defaults say 0.8; a sparsity set at the same level as such a pattern, or above it, is an error
naming the level (``config rule 0 sparsity``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from onnxprune.errors import ConfigError, OptionError, PatternError, SelectionError
from onnxprune.ops.layouts import prunable_op_types
from onnxprune.ops.registry import op_key
from onnxprune.masking.patterns import Pattern, parse_pattern
from onnxprune.ops.weights import Skipped, Weight

RULE_KEYS = {"op_names", "op_types", "pattern", "sparsity", "criterion", "min_sparsity",
             "max_sparsity", "skip"}
SETTING_KEYS = {"pattern", "sparsity", "criterion", "min_sparsity", "max_sparsity"}


@dataclass
class LayerPlan:
    """How one weight is pruned."""

    weight: Weight
    pattern: Pattern
    sparsity: float
    criterion: str
    min_sparsity: float = 0.0
    max_sparsity: float = 0.98


@dataclass
class Rule:
    op_names: List[re.Pattern] = field(default_factory=list)
    op_types: List[str] = field(default_factory=list)
    settings: Dict[str, Any] = field(default_factory=dict)
    skip: bool = False

    def matches(self, weight: Weight) -> bool:
        if self.op_types and not any(op_key(c.node) in self.op_types for c in weight.consumers):
            return False
        if self.op_names:
            names = [weight.name] + [c.node_name for c in weight.consumers]
            if not any(rx.search(n) for rx in self.op_names for n in names):
                return False
        return True


@dataclass
class Config:
    defaults: Dict[str, Any] = field(default_factory=dict)
    rules: List[Rule] = field(default_factory=list)


def load_config(source: Union[str, Path, dict, list, None]) -> Config:
    """Parse a config file path, or an already-loaded dict/list (the Python API accepts both)."""
    if source is None:
        return Config()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        text = path.read_text()
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            raise ConfigError(f"config file '{path}' is not valid "
                              f"{'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                              f"{str(exc).splitlines()[0]}") from None
        where = str(path)
    else:
        data, where = source, "config"
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a list of rules or a mapping with 'defaults' and "
                          "'rules'")
    unknown = set(data) - {"defaults", "rules"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; use 'defaults' "
                          "and 'rules'")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - SETTING_KEYS:
        raise ConfigError(f"{where}: 'defaults' may only set {sorted(SETTING_KEYS)}")
    rules = []
    for i, raw in enumerate(data.get("rules") or []):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: rule {i} is not a mapping")
        bad = set(raw) - RULE_KEYS
        if bad:
            raise ConfigError(f"{where}: rule {i} has unknown key(s) {sorted(bad)}; allowed: "
                              f"{sorted(RULE_KEYS)}")
        names = raw.get("op_names") or []
        types = raw.get("op_types") or []
        if isinstance(names, str):
            names = [names]
        if isinstance(types, str):
            types = [types]
        rules.append(Rule([_compile(n, f"{where}: rule {i} op_names") for n in names],
                          list(types), {k: raw[k] for k in SETTING_KEYS if k in raw},
                          bool(raw.get("skip", False))))
    return Config(dict(defaults), rules)


def _compile(regex: str, where: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise OptionError(f"{where}: invalid regex '{regex}': {exc}") from None


def parse_op_types(op_types: Union[str, Sequence[str], None]) -> Tuple[str, ...]:
    """``"Conv,Gemm"`` or a list -> validated tuple; None -> every op type with a layout."""
    known = prunable_op_types()
    if op_types is None:
        return known
    if isinstance(op_types, str):
        op_types = [t.strip() for t in op_types.split(",") if t.strip()]
    bad = [t for t in op_types if t not in known]
    if bad:
        raise OptionError(f"--op-types: {', '.join(bad)} cannot be pruned; choose from "
                          f"{', '.join(known)}")
    return tuple(op_types)


def check_sparsity(value: Union[float, int], pattern: Pattern, where: str = "--sparsity") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{where} must be a number in [0, 1) or a zero count, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise OptionError(f"{where}={value} is outside [0, 1): it is the fraction of weights set "
                          "to zero (0.8 = 80 % zeros)")
    if isinstance(value, int) and value < 0:
        raise OptionError(f"{where}={value}: a zero count cannot be negative")
    implied = pattern.implied_sparsity
    if implied is not None and isinstance(value, float) and abs(value - implied) > 1e-9:
        raise PatternError(f"pattern {pattern.spec} implies sparsity {implied:g}; "
                           f"{where}={value:g} conflicts with it (drop {where})")


def select(weights: Sequence[Weight], *, pattern: str, sparsity: Optional[Union[float, int]],
           criterion: str, op_types=None, include: Optional[str] = None,
           exclude: Optional[str] = None, config: Union[str, Path, dict, list, None] = None,
           min_sparsity: float = 0.0, max_sparsity: float = 0.98
           ) -> Tuple[List[LayerPlan], List[Skipped]]:
    """Plans for the selected weights, and those deselected by a config ``skip`` rule.

    Raises :class:`SelectionError` when nothing is selected, naming the filter to relax.
    An int ``sparsity`` (API only) is a total count of zeros across the selected weights.
    """
    cfg = load_config(config)
    types = parse_op_types(op_types)
    inc = _compile(include, "--include") if include else None
    exc = _compile(exclude, "--exclude") if exclude else None
    if not weights:
        raise SelectionError("the model has no prunable weights (no Conv/ConvTranspose/Gemm/"
                             "MatMul with a constant float weight); nothing to prune")
    run = {"pattern": pattern, "sparsity": sparsity, "criterion": criterion,
           "min_sparsity": min_sparsity, "max_sparsity": max_sparsity}

    def names(w: Weight) -> List[str]:
        return [w.name] + [c.node_name for c in w.consumers]

    chosen = [w for w in weights if any(op_key(c.node) in types for c in w.consumers)]
    if not chosen:
        raise SelectionError(f"no weight feeds the op types {', '.join(types)}; the model's "
                             "prunable ops are "
                             f"{', '.join(sorted({w.op_type for w in weights}))}")
    if inc is not None:
        chosen = [w for w in chosen if any(inc.search(n) for n in names(w))]
        if not chosen:
            raise SelectionError(f"--include '{include}' matches no prunable weight or node name;"
                                 f" names look like '{weights[0].name}' / "
                                 f"'{weights[0].consumers[0].node_name}'")
    if exc is not None:
        chosen = [w for w in chosen if not any(exc.search(n) for n in names(w))]
        if not chosen:
            raise SelectionError(f"--exclude '{exclude}' removes every selected weight; nothing "
                                 "left to prune")
    plans: List[LayerPlan] = []
    skipped: List[Skipped] = []
    patterns: Dict[str, Pattern] = {}
    for w in chosen:
        rule_index = next((i for i, rule in enumerate(cfg.rules) if rule.matches(w)), None)
        if rule_index is not None and cfg.rules[rule_index].skip:
            skipped.append(Skipped(w.name, f"skipped by config rule {rule_index}"))
            continue
        levels = [("sparsity", run), ("config defaults sparsity", cfg.defaults)]
        if rule_index is not None:
            levels.append((f"config rule {rule_index} sparsity", cfg.rules[rule_index].settings))
        settings = resolve_settings(levels)
        spec = str(settings["pattern"])
        pat = patterns.get(spec) or patterns.setdefault(spec, parse_pattern(spec))
        target, where = sparsity_for(pat, levels)
        check_sparsity(target, pat, where)
        for bound in ("min_sparsity", "max_sparsity"):
            b = settings[bound]
            if not isinstance(b, (int, float)) or not 0.0 <= float(b) <= 1.0:
                raise OptionError(f"{bound}={b!r} must be in [0, 1]")
        misfit = _nm_misfit(w, pat)
        if misfit is not None:
            skipped.append(Skipped(w.name, misfit))
            continue
        plans.append(LayerPlan(w, pat, target, str(settings["criterion"]),
                               float(settings["min_sparsity"]), float(settings["max_sparsity"])))
    if not plans:
        raise nothing_pruned("every selected weight was left alone, nothing to prune", skipped)
    _counts_to_fractions(plans)
    return plans, skipped


def resolve_settings(levels: Sequence[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """Each setting from the last of ``levels`` (the run's options, the config's defaults, the
    matching rule) that gives it (a None value gives nothing)."""
    settings: Dict[str, Any] = {}
    for _, level in levels:
        settings.update({k: v for k, v in level.items() if v is not None})
    return settings


def sparsity_for(pattern: Pattern, levels: Sequence[Tuple[str, Dict[str, Any]]]
                 ) -> Tuple[Union[float, int], str]:
    """The target sparsity of a weight pruned with ``pattern`` (resolved from ``levels``), and
    the name of the level that set it, for messages.

    A sparsity is inherited from a level below the one that set the pattern only when the
    pattern takes one: an N:M pattern fixes its own, so the run's ``--sparsity`` (or the
    config's defaults) never reaches a rule that sets ``pattern: "2:4"``. A sparsity given at
    the pattern's level or above is the user's word for that weight and is checked against the
    pattern (an error naming the level when they conflict)."""
    pattern_level = max((i for i, (_, level) in enumerate(levels)
                         if level.get("pattern") is not None), default=0)
    given = [(i, name, level["sparsity"]) for i, (name, level) in enumerate(levels)
             if level.get("sparsity") is not None]
    implied = pattern.implied_sparsity
    if given:
        i, name, value = given[-1]
        if implied is None or i >= pattern_level:
            return value, name
    return (implied if implied is not None else 0.5), levels[pattern_level][0]


def _nm_misfit(weight: Weight, pattern: Pattern) -> Optional[str]:
    """Why an N:M pattern cannot be laid on this convolution as sparse kernels read it, or None.

    N:M groups run over ``m`` consecutive input channels at one kernel position; with a channel
    count that is not a multiple of ``m`` the groups would straddle kernel positions, a layout
    no sparse kernel reads (a first conv over RGB or grayscale input, typically)."""
    m = getattr(pattern, "m", None)
    if m is None or not weight.layout.kernel_positions or weight.layout.view:
        return None
    channels = weight.shape[weight.layout.in_axis]
    if channels % m == 0:
        return None
    return (f"{pattern.spec} needs input channels in multiples of {m} per kernel position; "
            f"this {weight.op_type} has {channels}, so it stays dense")


def _counts_to_fractions(plans: List[LayerPlan]) -> None:
    """An int sparsity is a total zero count over the weights that carry it: turn it into the
    equivalent fraction so that local and global scopes treat it alike."""
    counted = [p for p in plans if isinstance(p.sparsity, int) and not isinstance(p.sparsity, bool)]
    if not counted:
        return
    total = sum(p.weight.numel for p in counted)
    count = counted[0].sparsity
    if count >= total:
        raise OptionError(f"sparsity count {count} is not below the {total} selected weights")
    for p in counted:
        p.sparsity = count / total


def nothing_pruned(what: str, skipped: Sequence[Any]) -> SelectionError:
    """The error for a run where every weight was left alone: ``what`` happened, then the
    reasons (``Skipped`` records), the most common first, each with how many weights it
    stopped and one of their names, so the user sees why without the report."""
    by_reason: Dict[str, List[str]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s.name)
    ranked = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    shown = "; ".join(f"{names[0]}: {reason}" if len(names) == 1 else
                      f"{len(names)} weights (e.g. {names[0]}): {reason}"
                      for reason, names in ranked[:3])
    more = f"; and {len(ranked) - 3} other reasons" if len(ranked) > 3 else ""
    return SelectionError(f"{what} ({shown}{more})" if shown else what)
