"""The input layer: a model's input signature, and the one loader that serves calibration and
validation alike (``.npz`` / ``.npy`` / folders of them / images / dicts of arrays / inputs
generated from the signature), with one check and one set of error messages.

* :mod:`~onnxprune.inputs.signature`: :class:`InputSpec`, ``--input-shape``, concrete shapes;
* :mod:`~onnxprune.inputs.generate`: seeded inputs from the signature;
* :mod:`~onnxprune.inputs.files`: reading array files safely (no pickles) and lazily;
* :mod:`~onnxprune.inputs.check`: the one shape/dtype check and coercion;
* :mod:`~onnxprune.inputs.images`: image preprocessing;
* :mod:`~onnxprune.inputs.dataset`: :func:`load_inputs` (one feed), :func:`load_calibration`
  and :class:`CalibrationSet` (samples in batches).
"""
