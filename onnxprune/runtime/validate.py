"""Validity of a model onnxprune produced: ``onnx.checker`` plus an onnxruntime session.

Running models and opening sessions live in :mod:`onnxprune.runtime.session`; inputs in
:mod:`onnxprune.inputs`; comparing outputs in :mod:`onnxprune.report.compare`.
"""

from __future__ import annotations

import onnx

from onnxprune.inputs.signature import ModelOrPath, model_proto
from onnxprune.runtime.session import InvalidOutputModel, error_text, model_source, ort_session

__all__ = ["check_valid", "InvalidOutputModel"]


def check_valid(model: ModelOrPath, full_check: bool = True, load: bool = True) -> None:
    """Raise :class:`InvalidOutputModel` unless the model passes ``onnx.checker`` (with strict
    shape inference when ``full_check``) and onnxruntime (CPU) can load it.

    Pass ``full_check=False`` for a model whose *input* already failed the full check: pruning
    cannot repair what the exporter wrote, so the output is held to the input's level.

    A path is checked as a file: the checker and onnxruntime read large and external-data
    models themselves, so **pass the saved path for large models**. A proto or handle is
    checked in memory when it has no external data and fits protobuf's 2 GiB limit; otherwise
    it is first written to a temporary folder (the checker resolves external data relative to
    the model file, so an in-memory proto cannot point it at the handle's folder).
    ``load=False``: the checker only (the caller opens the session it needs anyway).
    """
    with model_source(model, allow_external_folder=False) as (source, _):
        try:
            checked = model_proto(model) if isinstance(source, bytes) else source
            onnx.checker.check_model(checked, full_check=full_check)
        except Exception as exc:
            raise InvalidOutputModel("onnx.checker", error_text(exc)) from exc
        if load:
            ort_session(source, None)
