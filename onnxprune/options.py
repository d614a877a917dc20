"""Every option of a run, as one dataclass: the API takes it and the CLI is generated from it.

Each :class:`PruneOptions` field carries its command-line form in ``metadata``: a :class:`Flag`
(help text, flag name when not derived from the field's, the type click reads, choices read
from the registries, the parser from command-line text to the field's value), a
:class:`FlagGroup` (several flags building one value), or an API-only mark with the reason.
:mod:`onnxprune.cli` builds its click options from these in a loop, with the dataclass defaults,
so nothing is typed twice (OnnxSlim's argparser is the model). This module owns those
declarations and the text parsers; it never imports click.

One module (about 730 lines) on purpose: every option is defined once here, with its CLI
metadata and its cross-option checks, which is what the CLI and the API are generated from.
"""

from __future__ import annotations

import math
import os
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from onnxprune.inputs.images import ImagePreprocess
from onnxprune.errors import OptionError
from onnxprune.masking.criteria import criterion_names, get_criterion
from onnxprune.masking.patterns import NM, parse_pattern, pattern_help
from onnxprune.masking.scope import SCOPES
from onnxprune.ops.layouts import prunable_op_types
from onnxprune.ops.targets import TARGETS
from onnxprune.model.sparse import STORAGES
from onnxprune.passes.base import DEFAULT_MEMORY_BUDGET
from onnxprune.inputs.signature import parse_input_shapes

#: ``allocate``: how the sparsity target is spread over layers (see :attr:`PruneOptions.allocation`).
ALLOCATIONS = ("auto", "uniform", "sensitivity")
BN_MODES = ("none", "data", "match")  # --bn-reestimate (calibration/batchnorm.py)
CHANNEL_CRITERIA = ("norm", "reconstruction")  # --channel-criterion
DAMAGE_MODES = ("output", "refit", "metric", "metric-refit")  # --damage (channels/allocate.py)

#: The commands a flag can belong to.
COMMANDS = ("prune", "inspect")

Text = Union[str, Callable[[], str]]


# -- how a field appears on the command line ---------------------------------------------------

@dataclass(frozen=True)
class Flag:
    """One command-line flag of a field (or of a :class:`FlagGroup`).

    ``name``: ``--flag`` (default: the field's name with dashes), or ``--on/--off`` for a pair.
    ``type``: what click reads the text as (``str``, ``int``, ``float``, ``bool``, ``Path``).
    ``choices``: a callable reading them from their registry when the command is built.
    ``parse(value, flag)``: the value click read -> the field's value (files read, text split);
    it raises :class:`OptionError` naming ``flag``. ``switch``: a bare flag whose presence flips
    the field's default. ``show(default)``: the field's default as the flag takes it (MiB for
    bytes). ``help`` may be a callable read from a registry, like ``choices``.
    """

    help: Text
    name: Optional[str] = None
    type: type = str
    parse: Optional[Callable[[Any, str], Any]] = None
    choices: Optional[Callable[[], Sequence[str]]] = None
    switch: bool = False
    multiple: bool = False
    show: Optional[Callable[[Any], Any]] = None
    default_text: Optional[str] = None
    metavar: Optional[str] = None
    commands: Tuple[str, ...] = ("prune",)

    def decl(self, key: str) -> str:
        """The flag's declaration: ``name``, else ``--`` and ``key`` with dashes."""
        return self.name or "--" + key.replace("_", "-")

    def flag(self, key: str) -> str:
        """The flag as typed (the first of an on/off pair)."""
        return self.decl(key).split("/")[0]

    def help_text(self) -> str:
        return self.help() if callable(self.help) else self.help

    def cli_default(self, default: Any) -> Any:
        """What the flag holds when not given, for a field whose default is ``default``."""
        if self.switch:
            return False
        if self.multiple:
            return ()
        return self.show(default) if self.show else default

    def read(self, value: Any, key: str, default: Any) -> Any:
        """The value click read -> the field's value."""
        if self.switch:
            return (not default) if value else default
        return self.parse(value, self.flag(key)) if self.parse else value


@dataclass(frozen=True)
class FlagGroup:
    """Several flags that together give one field: ``build(**values)`` makes the value from
    what each flag read (None for a flag not given)."""

    flags: Mapping[str, Flag]
    build: Callable[..., Any]
    commands: Tuple[str, ...] = ("prune",)


def option(default: Any, help: Text, bounds: Optional[Tuple[float, float]] = None,
           **flag: Any) -> Any:
    """A field exposed on the command line as one :class:`Flag`. ``bounds=(lo, hi)``: a number
    field's closed range (checked by :meth:`PruneOptions.__post_init__`; NaN and infinity never
    pass)."""
    return _field(default, {"cli": Flag(help=help, **flag), "bounds": bounds})


def option_group(default: Any, group: FlagGroup) -> Any:
    """A field exposed on the command line as a :class:`FlagGroup`."""
    return _field(default, {"cli": group})


def api_only(default: Any, why: str) -> Any:
    """A field with no command-line flag (an API-only form, e.g. a callable); ``why`` records
    the reason in the metadata, where tests/test_options.py requires one."""
    return _field(default, {"cli": None, "api_only": why})


def _field(default: Any, metadata: dict) -> Any:
    return field(default=default, metadata=metadata)


def _check_bounds(f: Field, value: Any) -> None:
    """Raise when a number field's value is not a finite number within its ``bounds`` (whole
    numbers when both bounds are ints)."""
    bounds = f.metadata.get("bounds")
    if bounds is None or value is None:
        return
    flag = f.metadata["cli"].flag(f.name)
    want_int = all(isinstance(b, int) for b in bounds)
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and want_int and isinstance(value, (float, np.floating)):
        ok = float(value).is_integer()
    if ok:
        ok = math.isfinite(float(value)) and bounds[0] <= value <= bounds[1]
    if not ok:
        hi = "" if math.isinf(bounds[1]) else f" and at most {bounds[1]}"
        kind = "a whole number" if want_int else "a finite number"
        raise OptionError(f"{flag} must be {kind} at least {bounds[0]}{hi}, got {value!r}")


def cli_spec(f: Field) -> Union[Flag, FlagGroup, None]:
    """How field ``f`` appears on the command line; None when it is API-only."""
    return f.metadata["cli"]


def cli_fields(command: str = "prune"):
    """``(field, spec)`` for every field ``command`` exposes, in field order."""
    for f in fields(PruneOptions):
        spec = cli_spec(f)
        if spec is not None and command in spec.commands:
            yield f, spec


def from_cli(values: Mapping[str, Any], command: str = "prune") -> Dict[str, Any]:
    """The values click read (keyed by :func:`param_name`) -> :class:`PruneOptions` keywords."""
    out: Dict[str, Any] = {}
    for f, spec in cli_fields(command):
        if isinstance(spec, FlagGroup):
            out[f.name] = spec.build(**{k: flag.read(values[param_name(f, k)], k, None)
                                        for k, flag in spec.flags.items()})
        else:
            out[f.name] = spec.read(values[f.name], f.name, f.default)
    return out


def param_name(f: Field, key: Optional[str] = None) -> str:
    """The click parameter name of field ``f`` (or of flag ``key`` of its group)."""
    return f.name if key is None else f"{f.name}__{key}"


# -- parsers: command-line text -> field values --------------------------------------------------

def npz_arrays(path: Optional[str], flag: str) -> Optional[Dict[str, np.ndarray]]:
    """``FILE.npz`` -> ``{name: array}`` (None stays None)."""
    if path is None:
        return None
    from onnxprune.inputs.files import read_npz

    return read_npz(path, flag)


def numbers(sep: str = ",", kind: type = float) -> Callable[[Optional[str], str], Optional[tuple]]:
    """A parser for ``"0.5,0.5,0.5"`` (or ``"48x320"`` with ``sep="x"``) -> a tuple."""

    def parse(text: Optional[str], flag: str) -> Optional[tuple]:
        if text is None:
            return None
        try:
            return tuple(kind(v) for v in text.replace(" ", "").split(sep))
        except ValueError:
            raise OptionError(f"{flag} '{text}': expected numbers separated by '{sep}'") from None

    return parse


def _verdict(text: Optional[str]) -> Optional[str]:
    from onnxprune.report.compare import Thresholds

    if text is not None:
        Thresholds.parse(text)  # a bad piece is an error now, before any work
    return text


def _input_shapes(specs: Sequence[str], flag: str) -> Optional[Dict[str, Any]]:
    return parse_input_shapes(specs) or None


def _mib(mib: int, flag: str) -> int:
    return mib << 20


def _image_preprocess(**given: Any) -> Optional[ImagePreprocess]:
    """The flags given (not None) over :class:`ImagePreprocess`'s defaults; None when none is."""
    given = {k: v for k, v in given.items() if v is not None}
    return ImagePreprocess(**given) if given else None


def _image_default(name: str) -> str:
    value = next(f.default for f in fields(ImagePreprocess) if f.name == name)
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


IMAGE_FLAGS = FlagGroup(flags={
    "size": Flag("Images: resize to HxW (e.g. 48x320) [default: the model's static dims].",
                 name="--image-size", parse=numbers("x", int)),
    "scale": Flag("Images: pixel multiplier before mean/std.", name="--image-scale",
                  type=float, default_text="1/255"),
    "mean": Flag("Images: per-channel mean, e.g. 0.5,0.5,0.5.", name="--image-mean",
                 parse=numbers(), default_text=_image_default("mean")),
    "std": Flag("Images: per-channel std, e.g. 0.5,0.5,0.5.", name="--image-std",
                parse=numbers(), default_text=_image_default("std")),
    "layout": Flag("Images: the model input's layout.", name="--image-layout",
                   choices=lambda: ("NCHW", "NHWC"), default_text=_image_default("layout")),
    "channel_order": Flag("Images: channel order the mean/std are given in.",
                          name="--image-order", choices=lambda: ("RGB", "BGR"),
                          default_text=_image_default("channel_order")),
}, build=_image_preprocess)


def _one_of(name: str, value: Any, choices: Sequence[str]) -> None:
    """An option that takes one of ``choices``: an :class:`OptionError` naming them otherwise."""
    if value not in choices:
        raise OptionError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class PruneOptions:
    """Every option of a run. Each field's metadata declares its command-line flag (help, choices,
    parser; see :func:`option`), or that it is API-only (:func:`api_only`).

    Pattern and target: ``pattern`` is ``unstructured``/``1x1``, blocks ``NxM`` (``4x1`` = 4
    output channels × 1 input element), ``N:M`` (``2:4``) or ``channel``; ``sparsity`` the
    fraction of zeros in the selected weights counting zeros already there (default 0.5;
    implied by N:M; for ``channel`` the fraction of channels removed), or an int zero count.
    ``scope``: ``local`` (each weight reaches the target) or ``global`` (one threshold, each
    weight kept within ``min_sparsity``..``max_sparsity``).

    Criterion: ``magnitude``, ``l2``, ``random`` (seeded by ``seed``), ``scores`` (with
    ``scores={weight_name: array}``), ``wanda`` and ``sparsegpt`` (calibrated); ``masks=
    {weight_name: bool array}`` applies given keep-masks as they are.

    Selection: ``op_types``, ``include``/``exclude`` regexes on weight or node names, ``config``
    rules (a JSON/YAML file or an already-loaded list/dict). ``guard_fixed`` leaves alone
    constant operands that are not learned weights (ramps, DFT bases, identity matrices).

    Structure: ``resize`` (None = auto) removes channels physically — with ``channel`` the
    chosen ones (``round_to`` keeps counts at multiples, ``min_channels`` per group,
    ``max_group_sparsity`` caps groups under global scope), with other patterns those the masks
    leave dead (auto skips that for blocks and N:M, whose layout it would shift).

    Calibration: ``calibration`` (an .npz, a folder of .npy/.npz or images, a dict of arrays, or
    a CalibrationSet), ``calibration_samples``, ``image_preprocess``; ``refit`` refits the
    consumers of removed channels by least squares; ``allocate="sensitivity"`` spreads the
    target over layers by measured output error instead of uniformly (``"auto"``, the default,
    does so whenever calibration data is given for a pattern with a free sparsity, local scope
    and no search; ``"uniform"`` never); ``bias_correction``
    (on whenever calibration data is given) moves the mean that pruned weights carried into
    the layer's bias.

    Validation: onnx checker + onnxruntime, then original vs pruned outputs on ``inputs`` (an
    .npz path or dict) or inputs generated from the signature (``input_shapes`` fixes dynamic
    dims); ``max_error`` gates on the relative max error. ``eval_script``: the user's own metric
    (``"file.py:function"`` or a callable ``function(session) -> float``, higher is better; API
    ``evaluate=``), measured on the dense and the pruned model; ``min_metric`` and
    ``max_metric_drop`` (absolute, below the dense value) gate on it. ``search`` bisects for the
    highest sparsity (up to ``sparsity``, default 0.95) that keeps every bound given
    (``max_error``, ``min_metric``, ``max_metric_drop``).
    A run that prunes nothing (no new zero, no channel removed) returns normally with
    ``report.noop`` set and a note; the CLI exits 3 then unless ``allow_noop``.
    ``memory_budget``: bytes of scores held across weights; past it scoring streams (two passes
    over the weights, memory bounded by the largest weight, for models of any size).
    """

    pattern: str = option("unstructured", pattern_help)
    sparsity: Optional[Union[float, int]] = option(
        None, "Fraction of zeros in the selected weights, counting existing zeros "
              "[default: 0.5; implied by N:M].", type=float)
    criterion: str = option("magnitude", "Importance criterion.", choices=criterion_names)
    scope: str = option("local", "local: each weight reaches the target; global: one threshold "
                                 "across weights.", choices=lambda: SCOPES)
    op_types: Union[str, Sequence[str], None] = option(
        None, lambda: (f"Comma-separated op types to prune, of {', '.join(prunable_op_types())} "
                       "[default: all prunable]."))
    include: Optional[str] = option(None, "Regex: prune only weights/nodes whose name matches.")
    exclude: Optional[str] = option(None, "Regex: skip weights/nodes whose name matches.")
    config: Any = option(None, "JSON/YAML per-op rules (see README).", type=Path)
    min_sparsity: float = option(0.0, "Global scope: lower bound per weight.", type=float,
                                 bounds=(0.0, 1.0))
    max_sparsity: float = option(0.98, "Global scope: upper bound per weight.", type=float,
                                 bounds=(0.0, 1.0))
    scores: Optional[Dict[str, np.ndarray]] = option(
        None, ".npz of importance scores keyed by weight name (criterion 'scores').",
        parse=npz_arrays, metavar="FILE.npz")
    masks: Optional[Dict[str, np.ndarray]] = option(
        None, ".npz of keep-masks (1 = keep) keyed by weight name.", parse=npz_arrays,
        metavar="FILE.npz")
    guard_fixed: bool = option(
        True, "Also prune tensors that look like fixed operands (ramps, DFT bases, identity), "
              "which are left alone by default.", name="--prune-fixed", switch=True)
    resize: Optional[bool] = option(
        None, "Remove channels physically [default: yes for unstructured and channel, no for "
              "blocks and N:M, whose layout it would shift]. --no-resize keeps every shape "
              "(channel pattern: masks only).", name="--resize/--no-resize", type=bool)
    round_to: int = option(1, "Channel pattern: keep channel counts at multiples of this (8 or "
                              "16 pays off on CPUs).", type=int, bounds=(1, 1 << 20))
    min_channels: int = option(1, "Channel pattern: channels kept at least, per group.",
                               type=int, bounds=(1, 1 << 30))
    max_group_sparsity: float = option(
        0.9, "Channel pattern, global scope: fraction of a group's channels removed at most.",
        type=float, bounds=(0.0, 1.0))
    # -- channel permutation for N:M (passes/permute.py) --
    permute: Optional[bool] = option(
        None, "N:M patterns: reorder input channels (through their producers and every tensor "
              "tied to them, so the dense model computes the same function) so more magnitude, "
              "or calibrated saliency, survives the mask; a group is reordered only where more "
              "survives; the report shows the kept saliency before/after [default: on with "
              "--target tensorrt and an N:M pattern, else off].",
        name="--permute/--no-permute", type=bool)
    calibration: Any = option(
        None, "Calibration inputs: .npz (one array per input, axis 0 = samples), a folder of "
              ".npy/.npz, or a folder of images (see --image-*).")
    calibration_samples: int = option(128, "Calibration samples used at most.", type=int,
                                      bounds=(1, 1 << 40))
    image_preprocess: Optional[ImagePreprocess] = option_group(None, IMAGE_FLAGS)
    refit: bool = option(False, "Channel pattern: refit consumers of removed channels by least "
                                "squares on the calibration data.", switch=True)
    bias_correction: bool = option(
        True, "With calibration data: move each pruned layer's bias so its mean output stays "
              "the dense model's.", name="--bias-correction/--no-bias-correction", type=bool)
    allocate: str = option(
        "auto", "sensitivity: measure each layer's output error on the calibration data and "
                "spread the target where it hurts least; auto: sensitivity when --calibration "
                "is given for a free-sparsity pattern (local scope, no search), else uniform.",
        choices=lambda: ALLOCATIONS)
    # Allocation by measured cost (issue 14): per-group channel widths that meet a target.
    target_macs: Optional[float] = option(
        None, "Channel pattern: keep this fraction (0-1] of the model's MACs, each group's "
              "width chosen by least damage per MAC saved (instead of one --sparsity).",
        type=float)
    target_speedup: Optional[float] = option(
        None, "Channel pattern: the onnxruntime CPU speed-up wanted (>= 1), predicted from a "
              "per-layer timing table measured on this machine with --threads (cached in "
              "$ONNXPRUNE_CACHE, default ~/.cache/onnxprune); the report gives the predicted "
              "and the measured speed-up.", type=float)
    # Reconstruction after channel removal on real detectors (issue 14: H5).
    bn_reestimate: str = option(
        "none", "Channel pattern with --calibration: after channels are removed (and refit), "
                "re-estimate BatchNormalization from the calibration data: match = move each "
                "BN's scale and shift so every channel's output mean and std equal the dense "
                "model's; data = set its running mean and variance to the pruned input's "
                "(adaptive BN).", choices=lambda: BN_MODES)
    channel_criterion: str = option(
        "norm", "Channel pattern: how channels are ranked within a group: norm (weight norms, "
                "--criterion l1/l2) or reconstruction (with --calibration: the consumers' "
                "least-squares error when the channel is removed and the rest refit, from "
                "their input statistics; best with --refit).",
        choices=lambda: CHANNEL_CRITERIA)
    depth: bool = option(
        False, "With --target-macs/--target-speedup and --calibration: residual blocks (an Add "
               "of an identity path and a branch) compete with channel widths in the same "
               "allocation; a removed block's Add becomes the identity path, exactly.",
        switch=True)
    prune_stream: bool = option(
        False, "With --pattern channel: also remove channels of a residual stream that an RMSNorm "
               "reads (a transformer's model width: embedding columns, every block's input rows "
               "and output rows, the LM head's inputs). Off by default: a stream's few "
               "large channels carry much of the signal (flan-t5-small's decoder at 25 % with "
               "--criterion wanda --refit: 66 % top-1 agreement with the stream cut, 73 % kept).",
        switch=True)
    # Damage that predicts the refit model (issue 14, F3: allocation on real detectors).
    damage: str = option(
        "output", "With --target-macs/--target-speedup and --calibration: how a group's damage "
                  "is measured: output (the model's output error with the group's channels "
                  "masked alone) or refit (the same, its consumers refit by least squares from "
                  "the channels kept, as --refit does; use it with --refit), metric / "
                  "metric-refit (the same trials scored by --eval-script: the metric's drop "
                  "from the dense model's; one evaluation per group and level).",
        choices=lambda: DAMAGE_MODES)
    damage_stages: int = option(
        1, "With --damage measured (--calibration and a target): reach the allocation in this "
           "many steps, measuring every group's damage again after each on the model with the "
           "channels chosen so far removed (costs one more round of trials per step).",
        type=int)
    # Exact scalar folds (issue 14, F3: onnxruntime time outside the Convs).
    fold_scalars: bool = option(
        False, "After pruning, fold scalar Mul/Div/Add nodes into the weights and biases of "
               "the Convs/Gemms/MatMuls next to them where that is exact (after the op; a scale "
               "before it; a shift before an unpadded Conv) and merge scalar scales in a row: a "
               "graph optimization (the same outputs up to float rounding), reported on its "
               "own line.", switch=True)
    with_models: Tuple[Path, ...] = option(
        (), "A model that runs after the first one (its decoder), pruned or inspected "
            "together with it; repeat in the order they run, and give a file again for its "
            "next run (a decoder's next step, same weights). The widths one hands to the next "
            "and a state fed back (hidden_out -> hidden) shrink on both sides; each file is "
            "written as <stem>.pruned.onnx beside the output.",
        name="--with", type=Path, multiple=True, parse=lambda v, flag: tuple(v),
        metavar="MODEL", commands=COMMANDS)
    links: Tuple[str, ...] = option(
        (), "With --with: OUTPUT=INPUT, an output of one model that a later model (or the "
            "same one, at its next call) reads as INPUT; an earlier model's output first, so "
            "a name both output given twice is the link, then the state. Default: found by "
            "name (INPUT reads the output INPUT or INPUT_out; an input fed that way whose "
            "model also outputs INPUT_out is a state fed back).",
        name="--link", multiple=True, parse=lambda v, flag: tuple(v), metavar="OUTPUT=INPUT",
        commands=COMMANDS)
    validate: bool = option(True, "Skip checker, onnxruntime and comparison.",
                            name="--no-validate", switch=True)
    inputs: Any = option(
        None, "Validation samples: .npz keyed by input name (axis 0 = samples; other arrays such "
              "as labels are ignored), .npy or a folder. Default: calibration samples held out, "
              "else generated inputs (not an accuracy estimate).")
    validation_samples: int = option(
        32, "With --calibration and no --inputs: samples held out of the calibration data "
            "(taken after the ones it uses, at most half) to validate on.", type=int,
        bounds=(0, 1 << 62))
    input_shapes: Optional[Dict[str, Any]] = option(
        None, "Fix an input's dims for generated inputs, calibration, validation and MACs: "
              "NAME:1x3x224x224, or Polygraphy's NAME:[1,3,224,224] (several in one value, "
              "space-separated), or symbolic dims by name for every input declaring them: "
              "batch=1,sequence=32 (mix forms with ';').",
        name="--input-shape", parse=_input_shapes, multiple=True, commands=COMMANDS)
    max_error: Optional[float] = option(
        None, "Fail (exit 1, nothing written) if the relative max error of any output exceeds "
              "this.", type=float, bounds=(0.0, float("inf")))
    min_agreement: Optional[float] = option(
        None, "Fail (exit 1, nothing written) if the top-1 agreement of any class-score output "
              "with the original on the validation samples is below this (0-1).", type=float,
        bounds=(0.0, 1.0))
    verdict: Any = option(
        None, "Verdict thresholds, comma-separated MEASURE=OK/DEGRADED; the defaults are "
              "agreement=0.99/0.9 cosine=0.99/0.9 equal=0.99/0.9 scalar=0.01/0.1.",
        parse=lambda text, flag: _verdict(text), metavar="MEASURE=OK/DEGRADED,...")
    search: bool = option(False, "Find the highest sparsity (up to --sparsity, default 0.95) "
                                 "that keeps --max-error, --min-agreement, --min-metric and "
                                 "--max-metric-drop (those given).", switch=True)
    eval_script: Any = option(
        None, "Your own metric, higher is better: FILE.py:FUNCTION where FUNCTION(session) -> "
              "float takes an onnxruntime.InferenceSession and loads its own data; the report "
              "shows it for the dense and pruned models (API: evaluate=callable).",
        metavar="FILE.py:FUNCTION")
    min_metric: Optional[float] = option(
        None, "With --eval-script: fail (exit 1, nothing written) if the pruned model's metric "
              "is below this; with --search, the bound searched for.", type=float)
    max_metric_drop: Optional[float] = option(
        None, "With --eval-script: fail (exit 1, nothing written) if the pruned model's metric "
              "is more than this below the dense model's (absolute); with --search, the bound "
              "searched for.", type=float)
    allow_noop: bool = option(
        False, "Accept a run that prunes nothing (no new zero, no channel removed): exit 0 "
               "instead of 3. The model is written either way.", switch=True)
    seed: int = option(0, "Seed of the random criterion and of generated inputs.", type=int,
                       bounds=(0, 2**63 - 1))
    threads: Optional[int] = option(
        None, "onnxruntime threads per session (default: one per physical core). Results are "
              "the same for any count.", type=int, bounds=(1, 1024))
    # -- deployment target (issue 12: TensorRT 2:4 eligibility) --------------------------------
    target: Optional[str] = option(
        None, "Runtime the model is deployed on: tensorrt reports per Conv/Gemm/MatMul weight "
              "whether TensorRT can run it with 2:4 sparse kernels and the MAC fraction that "
              "can run sparse (with --pattern 2:4 only those layers are pruned, the rest stay "
              "dense); onnxruntime-cpu says what speeds that runtime up (channel removal only).",
        choices=lambda: TARGETS, commands=COMMANDS)
    sparse_error_ratio: float = option(
        4.0, "With --target tensorrt, a 2:4 pattern and --calibration: leave dense a layer "
             "whose measured 2:4 output error share exceeds this many times its MAC share "
             "(0: prune every layer TensorRT would pick).", type=float, bounds=(0.0, 1e9))
    memory_budget: int = option(
        DEFAULT_MEMORY_BUDGET, "MiB of scores held across weights; past it, scoring streams "
                               "(models of any size in bounded memory).",
        type=int, parse=_mib, show=lambda b: b >> 20, bounds=(1, 1 << 62))
    # -- deployment: sparse storage, the pruning plan, dry runs (issue 12) --------------------
    storage: str = option(
        "dense", "How to write weights: sparse writes each initializer with at least 50% zeros "
                 "as an ONNX sparse_initializer (values + int64 indices) when that is smaller; "
                 "onnxruntime loads it and computes the same outputs. sparse-compact uses "
                 "int8/16/32 indices (smaller; onnxruntime loads it, onnx.checker refuses it). "
                 "bitmask writes the nonzero values + 1 bit per element, expanded by standard "
                 "ops that onnxruntime folds into the dense weight at session start (smallest "
                 "from 50% zeros; valid for onnx.checker; opset 11+).",
        choices=lambda: STORAGES)
    save_plan: Optional[Path] = option(
        None, "Write what was decided (per weight: pattern, sparsity, keep mask; channels "
              "removed; options; a graph fingerprint) as JSON; re-apply it with 'onnxprune "
              "apply PLAN MODEL'.", type=Path, metavar="PLAN.json")
    dry_run: bool = option(False, "Prune in memory and print the report (the plan, params, "
                                  "MACs) without writing a model (--save-plan still writes the "
                                  "plan).", switch=True)

    def __post_init__(self):
        for f in fields(self):
            _check_bounds(f, getattr(self, f.name))
        self._check_metric()
        if self.scores and self.criterion == "magnitude":
            self.criterion = "scores"
        if self.criterion == "scores" and not self.scores:
            raise OptionError("criterion 'scores' needs scores={weight_name: array} (CLI: "
                              "--scores FILE.npz)")
        _one_of("storage", self.storage, STORAGES)
        _one_of("allocate", self.allocate, ALLOCATIONS)
        if self.allocate == "sensitivity" and self.pattern == "channel":
            raise OptionError("--allocate sensitivity spreads a weight sparsity over layers; "
                              "channel pruning ranks channels per group (use --scope global to "
                              "let groups differ)")
        if self.refit and self.pattern != "channel":
            raise OptionError("--refit refits the consumers of removed channels; it needs "
                              "--pattern channel")
        self._check_reconstruction()
        if self.links and not self.with_models:
            raise OptionError("--link names what one model hands to another: give the other "
                              "model with --with MODEL")
        if self.with_models and (self.masks is not None or self.scores is not None):
            raise OptionError("masks/scores name the weights of one model; with --with the "
                              "models are pruned as one: give patterns and sparsity instead")
        if self.target is not None:
            _one_of("target", self.target, TARGETS)
        if self.permute is None:  # on where it can pay: TensorRT runs N:M sparse
            self.permute = (self.target == "tensorrt" and self.masks is None
                            and self.scores is None
                            and isinstance(parse_pattern(self.pattern), NM))
        if self.permute:
            self._check_permute()
        if 0 < self.sparse_error_ratio < 1:
            raise OptionError("--sparse-error-ratio must be 0 (off) or at least 1 (an error share "
                              f"equal to the MAC share), got {self.sparse_error_ratio!r}")
        self._check_target()
        crit = get_criterion(self.criterion)
        if crit.reconstructs and self.scope == "global":
            raise OptionError(f"criterion '{self.criterion}' prunes layer by layer; use "
                              "--scope local, or --allocate sensitivity to spread a target")

    def _check_reconstruction(self) -> None:
        _one_of("bn_reestimate", self.bn_reestimate, BN_MODES)
        _one_of("channel_criterion", self.channel_criterion, CHANNEL_CRITERIA)
        _one_of("damage", self.damage, DAMAGE_MODES)
        if (isinstance(self.damage_stages, bool) or not isinstance(self.damage_stages, int)
                or not 1 <= self.damage_stages <= 10):
            raise OptionError(f"--damage-stages must be a whole number from 1 to 10, got "
                              f"{self.damage_stages!r}")
        flag = (f"--damage {self.damage}" if self.damage != "output" else
                "--damage-stages" if self.damage_stages != 1 else None)
        if flag and (self.target_macs is None and self.target_speedup is None
                     or self.calibration is None):
            raise OptionError(f"{flag} measures each channel group for an allocation; use it "
                              "with --target-macs or --target-speedup and --calibration")
        if self.damage.startswith("metric") and self.eval_script is None:
            raise OptionError(f"--damage {self.damage} scores trials with your metric; give "
                              "--eval-script FILE.py:FUNCTION")
        for flag, on in (("--bn-reestimate", self.bn_reestimate != "none"),
                         ("--channel-criterion reconstruction",
                          self.channel_criterion == "reconstruction")):
            if on and self.pattern != "channel":
                raise OptionError(f"{flag} works after channel removal; it needs "
                                  "--pattern channel")
            if on and self.calibration is None:
                raise OptionError(f"{flag} measures on calibration data; give --calibration")
        if self.depth and (self.target_macs is None and self.target_speedup is None
                           or self.pattern != "channel" or self.calibration is None):
            raise OptionError("--depth removes residual blocks inside a channel allocation; use "
                              "it with --pattern channel, --target-macs or --target-speedup, "
                              "and --calibration")

    def _check_permute(self) -> None:
        """--permute needs an N:M pattern (or config rules that may give one) and weights in
        the model's own channel order."""
        nm = isinstance(parse_pattern(self.pattern), NM)
        if not nm and self.config is None:
            raise OptionError(f"--permute reorders channels for N:M patterns; pattern "
                              f"'{self.pattern}' is not one (use e.g. --pattern 2:4)")
        for name, given in (("--scores", self.scores), ("--masks", self.masks)):
            if given is not None:
                raise OptionError(f"--permute cannot be used with {name}: those arrays are in the "
                                  "model's channel order; drop --permute or the arrays")

    def _check_target(self) -> None:
        """--target-macs/--target-speedup: one of them, for channel removal, in place of a
        sparsity (and of --scope global or --search, which spread a sparsity)."""
        given = [f for f, v in (("--target-macs", self.target_macs),
                                ("--target-speedup", self.target_speedup)) if v is not None]
        if not given:
            return
        flag = given[0]
        if len(given) > 1:
            raise OptionError("give either --target-macs or --target-speedup, not both")
        value = self.target_macs if self.target_speedup is None else self.target_speedup
        ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.number))
              and math.isfinite(float(value)))
        if self.target_macs is not None and not (ok and 0 < self.target_macs <= 1):
            raise OptionError(f"--target-macs must be in (0, 1] (the fraction of the MACs "
                              f"kept), got {value!r}")
        if self.target_speedup is not None and not (ok and self.target_speedup >= 1):
            raise OptionError(f"--target-speedup must be a finite number >= 1, got {value!r}")
        if self.pattern != "channel" or not self.channel_removal:
            raise OptionError(f"{flag} chooses how many channels each group keeps; use it with "
                              "--pattern channel (without --no-resize, --masks or --config)")
        clash = [f for f, bad in (("--sparsity", self.sparsity is not None),
                                  ("--scope global", self.scope == "global"),
                                  ("--search", self.search)) if bad]
        if clash:
            raise OptionError(f"{flag} chooses each group's width itself; drop {clash[0]}")

    def _check_metric(self) -> None:
        """The user's metric resolved (the script imported: its errors come before any work),
        its bounds finite and given with it, and --search given something to search for."""
        for name in ("min_metric", "max_metric_drop"):
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                    or not math.isfinite(float(value))):
                raise OptionError(f"{flag} must be a finite number, got {value!r}")
            if self.eval_script is None:
                raise OptionError(f"{flag} bounds the metric of --eval-script (API: evaluate=); "
                                  "give the script that measures it")
        if self.max_metric_drop is not None and self.max_metric_drop < 0:
            raise OptionError(f"--max-metric-drop must be at least 0, got {self.max_metric_drop!r}")
        if self.eval_script is not None:
            from onnxprune.runtime.evaluate import load_metric

            self.eval_script = load_metric(self.eval_script)
        if self.search and self.max_error is None and self.min_agreement is None \
                and self.min_metric is None and self.max_metric_drop is None:
            raise OptionError("--search looks for the highest sparsity that keeps a bound; give "
                              "--max-error or --min-agreement (outputs vs the dense model's), or "
                              "--eval-script with --min-metric or --max-metric-drop (your own "
                              "metric)")

    @property
    def channel_removal(self) -> bool:
        return (self.pattern == "channel" and self.resize is not False and self.masks is None
                and self.config is None)

    @property
    def allocation(self) -> str:
        """The allocation this run uses: ``"auto"`` resolved. Sensitivity when real calibration
        data is given and the sparsity is free to spread (a free-sparsity pattern, local scope,
        no config rules, masks, scores or search), else uniform."""
        if self.allocate != "auto":
            return self.allocate
        free = self.pattern != "channel" and parse_pattern(self.pattern).implied_sparsity is None
        spread = (self.calibration is not None and free and self.scope == "local"
                  and not self.search and self.config is None and self.masks is None
                  and self.scores is None)
        return "sensitivity" if spread else "uniform"

    @property
    def sequential(self) -> bool:
        """Prune layer by layer on calibration data (:class:`PruneSequentially`): whenever
        calibration is used with local scope and masks the pipeline chooses itself."""
        return (self.needs_calibration and self.scope == "local" and self.pattern != "channel"
                and self.masks is None and self.scores is None)

    @property
    def needs_calibration(self) -> bool:
        return (get_criterion(self.criterion).needs_activations or self.refit
                or self.allocation == "sensitivity" or self.calibration is not None)

    def summary(self) -> dict:
        """The options worth showing in a report, defaults resolved (``sparsity`` as used)."""
        keep = ("pattern", "sparsity", "criterion", "scope", "op_types", "include", "exclude",
                "min_sparsity", "max_sparsity", "resize", "seed", "max_error",
                "calibration_samples", "search", "target")
        used = {"sparsity": self.sparsity}
        if self.sparsity is None:  # the value actually used: implied by N:M, else 0.5
            implied = None if self.pattern == "channel" else \
                parse_pattern(self.pattern).implied_sparsity
            used["sparsity"] = 0.5 if implied is None else implied
        out = {k: used.get(k, getattr(self, k)) for k in keep if used.get(k, getattr(self, k))
               is not None}
        out["allocate"] = self.allocation
        if self.permute:
            out["permute"] = True
        if self.storage != "dense":
            out["storage"] = self.storage
        if self.eval_script is not None:
            out.update(eval_script=self.eval_script.source, **{
                k: getattr(self, k) for k in ("min_metric", "max_metric_drop")
                if getattr(self, k) is not None})
        if self.target_macs is not None or self.target_speedup is not None:
            out.pop("sparsity", None)
            out.update({k: getattr(self, k) for k in ("target_macs", "target_speedup")
                        if getattr(self, k) is not None})
        if self.pattern == "channel":
            out.update(round_to=self.round_to, min_channels=self.min_channels, refit=self.refit)
            out.update({k: getattr(self, k) for k, off in (("bn_reestimate", "none"),
                        ("channel_criterion", "norm"), ("depth", False),
                        ("prune_stream", False))
                        if getattr(self, k) != off})
        if self.fold_scalars:
            out["fold_scalars"] = True
        if isinstance(self.calibration, (str, os.PathLike)):
            out["calibration"] = str(self.calibration)
        return out
