"""Errors a user can act on.

Every error onnxprune raises for bad input is an :class:`OnnxPruneError`. The CLI prints its
message on one line and exits with code 2; anything else is a bug in onnxprune and keeps its trace.
Messages name the file, tensor or node at fault and say what to do next.
"""


class OnnxPruneError(Exception):
    """Base class: a problem with the user's input or options, not a bug in onnxprune."""

    exit_code = 2


class ModelLoadError(OnnxPruneError):
    """The model file is missing, unreadable, not ONNX, truncated or invalid."""


class PatternError(OnnxPruneError):
    """An unknown or malformed sparsity pattern, or a sparsity that conflicts with it."""


class OptionError(OnnxPruneError):
    """An option value is out of range or conflicts with another option."""


class ConfigError(OnnxPruneError):
    """The per-op config file is unreadable or has unknown keys."""


class SelectionError(OnnxPruneError):
    """Nothing prunable was selected (no weights, or a regex that matches nothing)."""


class OutputError(OnnxPruneError):
    """The output path is the input, exists without --force, or is not writable."""


class InputDataError(OnnxPruneError):
    """Inputs or calibration data do not match the model's input signature."""


class ValidationFailed(OnnxPruneError):
    """The pruned model is valid but misses a gate the user set (--max-error, --min-agreement,
    --min-metric, --max-metric-drop) or its outputs are broken (inf/nan, another shape):
    nothing is written, exit 1."""

    exit_code = 1
