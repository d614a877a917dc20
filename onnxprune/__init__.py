"""onnxprune: post-training pruning for ONNX models.

>>> import onnxprune
>>> result = onnxprune.prune("model.onnx", pattern="2:4")      # doctest: +SKIP
>>> result.model, result.report                                  # doctest: +SKIP
"""

__version__ = "0.1.0"

from onnxprune.errors import OnnxPruneError  # noqa: E402

__all__ = ["prune", "inspect", "build_passes", "PruneOptions", "PruneResult", "OnnxPruneError",
           "__version__"]


def __getattr__(name):
    # The API pulls in onnxruntime; import it on first use so `import onnxprune.model.io` stays light.
    if name in ("prune", "inspect", "build_passes", "PruneOptions", "PruneResult"):
        from onnxprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxprune' has no attribute '{name}'")
