"""Every option of a run, as one dataclass: the API takes it and the CLI is generated from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from onnxprune.inputs.images import ImagePreprocess
from onnxprune.errors import OptionError
from onnxprune.masking.criteria import get_criterion
from onnxprune.masking.patterns import parse_pattern
from onnxprune.passes.base import DEFAULT_MEMORY_BUDGET


@dataclass
class PruneOptions:
    """Every option of a run; the CLI's flags map one to one onto these fields.

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
    dims); ``max_error`` gates on the relative max error. ``search`` bisects for the highest
    sparsity (up to ``sparsity``, default 0.95) whose error stays within ``max_error``.
    ``memory_budget``: bytes of scores held across weights; past it scoring streams (two passes
    over the weights, memory bounded by the largest weight, for models of any size).
    """

    pattern: str = "unstructured"
    sparsity: Optional[Union[float, int]] = None
    criterion: str = "magnitude"
    scope: str = "local"
    op_types: Union[str, Sequence[str], None] = None
    include: Optional[str] = None
    exclude: Optional[str] = None
    config: Any = None
    min_sparsity: float = 0.0
    max_sparsity: float = 0.98
    scores: Optional[Dict[str, np.ndarray]] = None
    masks: Optional[Dict[str, np.ndarray]] = None
    guard_fixed: bool = True
    resize: Optional[bool] = None
    round_to: int = 1
    min_channels: int = 1
    max_group_sparsity: float = 0.9
    calibration: Any = None
    calibration_samples: int = 128
    image_preprocess: Optional[ImagePreprocess] = None
    refit: bool = False
    bias_correction: bool = True
    allocate: str = "auto"
    validate: bool = True
    compare: bool = True
    inputs: Any = None
    input_shapes: Optional[Dict[str, Sequence[int]]] = None
    max_error: Optional[float] = None
    search: bool = False
    seed: int = 0
    memory_budget: int = DEFAULT_MEMORY_BUDGET

    def __post_init__(self):
        if self.search and self.max_error is None:
            raise OptionError("--search looks for the highest sparsity within --max-error; "
                              "give --max-error")
        if self.scores and self.criterion == "magnitude":
            self.criterion = "scores"
        if self.criterion == "scores" and not self.scores:
            raise OptionError("criterion 'scores' needs scores={weight_name: array} (CLI: "
                              "--scores FILE.npz)")
        if self.allocate not in ("auto", "uniform", "sensitivity"):
            raise OptionError(f"allocate must be 'auto', 'uniform' or 'sensitivity', got "
                              f"'{self.allocate}'")
        if self.allocate == "sensitivity" and self.pattern == "channel":
            raise OptionError("--allocate sensitivity spreads a weight sparsity over layers; "
                              "channel pruning ranks channels per group (use --scope global to "
                              "let groups differ)")
        if self.refit and self.pattern != "channel":
            raise OptionError("--refit refits the consumers of removed channels; it needs "
                              "--pattern channel")
        crit = get_criterion(self.criterion)
        if crit.reconstructs and self.scope == "global":
            raise OptionError(f"criterion '{self.criterion}' prunes layer by layer; use "
                              "--scope local, or --allocate sensitivity to spread a target")

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
        """The options worth showing in a report (what differs from nothing)."""
        keep = ("pattern", "sparsity", "criterion", "scope", "op_types", "include", "exclude",
                "min_sparsity", "max_sparsity", "resize", "seed", "max_error",
                "calibration_samples", "search")
        out = {k: getattr(self, k) for k in keep if getattr(self, k) is not None}
        out["allocate"] = self.allocation
        if self.pattern == "channel":
            out.update(round_to=self.round_to, min_channels=self.min_channels, refit=self.refit)
        if isinstance(self.calibration, (str, os.PathLike)):
            out["calibration"] = str(self.calibration)
        return out
