"""Passes: each a step of the pipeline that declares what it requires and ensures and returns a typed record.

``base`` holds the infrastructure (:class:`Pass`, :class:`PruneState`, :class:`Pipeline`,
:class:`PipelineError`, records); one module per pass family: ``weights`` (FindWeights,
SelectWeights), ``masking`` (ScoreWeights, ApplyMasks), ``calibrated`` (Calibrate, CorrectBias,
AllocateBySensitivity), ``sequential`` (PruneSequentially), ``structure`` (PruneChannels,
RemoveDeadChannels), ``validate`` (Validate). The names are importable from here too; they load
on first use, so importing :mod:`onnxprune.passes.base` alone stays light.
"""

_HOMES = {
    "Pass": "base", "PassRecord": "base", "PassResult": "base", "Pipeline": "base",
    "PipelineError": "base", "PruneState": "base", "check_pipeline": "base",
    "FindWeights": "weights", "SelectWeights": "weights",
    "ScoreWeights": "masking", "ApplyMasks": "masking",
    "Calibrate": "calibrated", "CorrectBias": "calibrated", "AllocateBySensitivity": "calibrated",
    "PruneSequentially": "sequential",
    "PruneChannels": "structure", "RemoveDeadChannels": "structure",
    "Validate": "validate",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"onnxprune.passes.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'onnxprune.passes' has no attribute '{name}'")
