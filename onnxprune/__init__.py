"""onnxprune: post-training pruning for ONNX models.

>>> import onnxprune
>>> result = onnxprune.prune("model.onnx", pattern="2:4")      # doctest: +SKIP
>>> result.model, result.report                                  # doctest: +SKIP
"""

__version__ = "0.1.0"
