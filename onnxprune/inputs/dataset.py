"""The input layer's one loader: user data and generated inputs, served to calibration and
validation alike.

* :func:`load_inputs` gives validation one feed (``--inputs``: a ``.npz`` keyed by input name,
  a ``.npy`` for a one-input model, or a dict of arrays), or :func:`make_inputs` generates one;
* :func:`load_calibration` gives calibration a :class:`CalibrationSet` of samples (a ``.npz``,
  a folder of ``.npy``/``.npz`` files, or a folder of images with an :class:`ImagePreprocess`),
  and :func:`generated_calibration` a data-free one.

Every source is read by :mod:`onnxprune.inputs.files` and checked by
:mod:`onnxprune.inputs.check` (Polygraphy's data loader is the model: one loader, one
coerce/check step), so the same file gives the same arrays and the same messages wherever it
is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

from onnxprune.errors import InputDataError, OptionError
from onnxprune.inputs.files import (ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, Part, array_kind,
                                    arrays_part, file_part, read_headers)
from onnxprune.inputs.generate import make_inputs
from onnxprune.inputs.roles import input_roles
from onnxprune.inputs.images import ImagePreprocess, image_parts
from onnxprune.inputs.signature import (InputSpec, ModelOrPath, input_signature, model_proto,
                                        resolve_input_shapes)

__all__ = ["CalibrationSet", "load_calibration", "generated_calibration", "load_inputs",
           "load_samples"]


def load_inputs(source: Union[str, os.PathLike, Mapping[str, np.ndarray]], model: ModelOrPath,
                shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, np.ndarray]:
    """One feed for ``model`` from a user's ``.npz`` keyed by input name (a ``.npy`` for a
    one-input model), or from a dict of arrays.

    Every runtime input must be present and nothing else; each array must have the declared
    rank, the model's static dims, one size per shared symbolic dim, and the shape in
    ``shapes`` when given. Floats are cast to the input's float type and integers to its
    integer type when the values fit; any other dtype mismatch is an error. Raises
    :class:`InputDataError` naming the input and the expected shape/dtype.
    """
    specs = input_signature(model)
    if isinstance(source, Mapping):
        return arrays_part(source, specs, "the given inputs", samples=False, want=shapes).load()
    path = Path(source)
    if not path.is_file():
        raise InputDataError(f"input file '{path}' does not exist; pass a .npz with one array "
                             "per model input")
    return file_part(path, specs, samples=False, want=shapes).load()


def load_samples(source, model: ModelOrPath,
                 image_preprocess: Optional[ImagePreprocess] = None) -> "CalibrationSet":
    """Validation samples for ``model`` from ``--inputs``: a dict of arrays, a ``.npz`` (a
    ``.npy`` for a one-input model) or a folder, read as calibration sources are (axis 0 =
    samples; an array one rank lower is one sample) and served in batches.

    Arrays that are no model input (labels saved beside the inputs) are left out and listed in
    the set's ``ignored``; every model input must be there.
    """
    specs = input_signature(model_proto(model))
    if isinstance(source, CalibrationSet):
        return source
    if isinstance(source, Mapping):
        data = CalibrationSet(specs, [arrays_part(source, specs, "the given inputs",
                                                  samples=True, extra_ok=True)],
                              "the given inputs")
        if not all(str(k).startswith("arr_") for k in source):  # else mapped by position
            data.ignored = sorted(set(source) - {s.name for s in specs})
        return data
    path = Path(source)
    if not path.exists():
        raise InputDataError(f"input file '{path}' does not exist; pass a .npz with one array "
                             "per model input (axis 0 = samples)")
    if path.is_dir():
        return _load_folder(path, specs, image_preprocess)
    if any(s.dims is not None and len(s.dims) == 1 for s in specs):
        # a rank-1 input has no sample axis to split on: the file is one feed, as given
        feed = file_part(path, specs, samples=False, extra_ok=True)
        return _OneFeed(specs, [Part(1, lambda limit=None, start=0: feed.load(), path.name)],
                        str(path))
    part = file_part(path, specs, samples=True, single_ok=True, extra_ok=True)
    data = CalibrationSet(specs, [part], str(path))
    if array_kind(path) == "npz":
        keys = list(read_headers(path, "npz"))
        if not all(k.startswith("arr_") for k in keys):  # else mapped by position
            data.ignored = sorted(set(keys) - {s.name for s in specs})
    return data


class CalibrationSet:
    """Calibration samples checked against a model's inputs, served as feed dicts.

    Samples are read lazily, part by part (a file, an image), so a folder of images costs one
    batch of memory. ``data_free`` is True for generated inputs.

    >>> data = load_calibration("calib.npz", model)            # doctest: +SKIP
    >>> len(data), next(data.batches(8))["input"].shape        # doctest: +SKIP
    (256, (8, 3, 224, 224))
    """

    def __init__(self, inputs: Sequence[InputSpec], parts: Sequence[Part], source: str,
                 data_free: bool = False, batch_limit: Optional[int] = None) -> None:
        self.inputs = list(inputs)
        self._parts = list(parts)
        self.source = source
        self.data_free = data_free
        self.ignored: List[str] = []  # arrays in the source that are no model input
        #: the batch size the model actually runs at when its inputs leave axis 0 dynamic but
        #: its graph fixes it inside (a Reshape to a constant shape): set by
        #: :func:`onnxprune.runtime.session.fit_batch`, kept by :meth:`slice`.
        self.batch_limit = batch_limit

    @classmethod
    def from_arrays(cls, model, arrays: Mapping[str, np.ndarray],
                    label: str = "arrays") -> "CalibrationSet":
        """A set from in-memory arrays keyed by input name (axis 0 = samples), checked like
        an ``.npz``."""
        specs = input_signature(model_proto(model))
        return cls(specs, [arrays_part(arrays, specs, label, samples=True)], label)

    def __len__(self) -> int:
        return sum(p.count for p in self._parts)

    def __repr__(self) -> str:
        kind = "generated" if self.data_free else "calibration"
        return f"<CalibrationSet {len(self)} {kind} samples from {self.source}>"

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the model's inputs fix on axis 0 (None when it is dynamic), or the
        one :attr:`batch_limit` found the model runs at."""
        fixed = [s.dims[0] for s in self.inputs if s.dims and isinstance(s.dims[0], int)]
        fixed += [self.batch_limit] if self.batch_limit else []
        return min(fixed) if fixed else None

    def num_batches(self, batch_size: int) -> int:
        """Batches :meth:`batches` yields (more only where sample shapes change mid-way)."""
        fixed = self.fixed_batch
        if fixed is not None:
            return len(self) // fixed
        return -(-len(self) // batch_size)

    def take(self, n: int) -> "CalibrationSet":
        """The first ``n`` samples (all when there are fewer)."""
        return self.slice(0, n)

    def slice(self, start: int, stop: int) -> "CalibrationSet":
        """Samples ``start`` to ``stop`` (fewer when the set ends first); their sources read no
        more than those rows' worth."""
        parts: List[Part] = []
        offset = 0
        for part in self._parts:
            lo, hi = max(start - offset, 0), min(stop - offset, part.count)
            if lo < hi:
                parts.append(part if (lo, hi) == (0, part.count)
                             else Part(hi - lo, _window(part.load, lo, hi), part.label))
            offset += part.count
            if offset >= stop:
                break
        return CalibrationSet(self.inputs, parts, self.source, self.data_free, self.batch_limit)

    def pick(self, indices: Sequence[int]) -> "CalibrationSet":
        """The samples at ``indices``, in that order (a run of consecutive ones read as one
        window of its source)."""
        runs: List[List[int]] = []
        for i in (int(i) for i in indices):
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        parts = [p for lo, hi in runs for p in self.slice(lo, hi)._parts]
        return CalibrationSet(self.inputs, parts, self.source, self.data_free, self.batch_limit)

    def _chunks(self, size: int) -> Iterator[Part]:
        """The parts, those holding more than a few batches cut into windows of ``size``
        samples, so one batch of a large file is in memory at a time."""
        for part in self._parts:
            if part.count is None or part.count <= 4 * size:
                yield part
                continue
            for lo in range(0, part.count, size):
                hi = min(lo + size, part.count)
                yield Part(hi - lo, _window(part.load, lo, hi), part.label)

    def batches(self, batch_size: int = 8) -> Iterator[Dict[str, np.ndarray]]:
        """Feed dicts of ``batch_size`` samples (the last may be smaller).

        A model that fixes axis 0 gets batches of exactly that size; a remainder that cannot
        fill one is dropped. Samples whose non-batch dims differ (a folder of sequences of
        different lengths) are never concatenated: such a boundary ends a batch early. A scalar
        input (rank 0) holds one value for all samples and is fed as it is.
        """
        if batch_size < 1:
            raise OptionError(f"batch size must be a positive integer, got {batch_size}")
        fixed = self.fixed_batch
        size = fixed if fixed is not None else batch_size
        scalars = {s.name for s in self.inputs if s.dims is not None and len(s.dims) == 0}
        pending: List[Dict[str, np.ndarray]] = []
        pending_n = 0
        constants: Dict[str, np.ndarray] = {}

        def flush(n: int) -> Dict[str, np.ndarray]:
            nonlocal pending, pending_n
            merged = {k: (np.concatenate([p[k] for p in pending]) if len(pending) > 1
                          else pending[0][k]) for k in pending[0]}
            out = {k: v[:n] for k, v in merged.items()}
            rest = {k: v[n:] for k, v in merged.items()}
            pending_n -= n
            pending = [rest] if pending_n else []
            return {**out, **constants}

        for part in self._chunks(size):
            arrays = part.load()
            constants.update({k: arrays.pop(k) for k in scalars if k in arrays})
            if pending and not _same_sample_shape(pending[0], arrays):
                while pending_n:
                    n = min(size, pending_n)
                    if fixed is not None and n < fixed:
                        pending, pending_n = [], 0
                        break
                    yield flush(n)
            pending.append(arrays)
            pending_n += part.count
            while pending_n >= size:
                yield flush(size)
        if pending_n and fixed is None:
            yield flush(pending_n)


class _OneFeed(CalibrationSet):
    """One feed given whole (a model input without a sample axis): one batch, as given."""

    def batches(self, batch_size: int = 8) -> Iterator[Dict[str, np.ndarray]]:
        for part in self._parts:
            yield part.load()


def _window(loader: Callable[..., Dict[str, np.ndarray]], lo: int, hi: int):
    """``loader`` limited to its samples ``lo`` to ``hi`` (renumbered from 0): the source reads
    no more than those."""
    def load(limit: Optional[int] = None, start: int = 0) -> Dict[str, np.ndarray]:
        first = lo + start
        stop = hi if limit is None else min(hi, lo + limit)
        rows = stop - first
        return {k: v if v.ndim == 0 else v[:rows]
                for k, v in loader(stop, start=first).items()}
    return load


def _same_sample_shape(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return all(a[k].shape[1:] == b[k].shape[1:] for k in a)


def load_calibration(source: Union[str, os.PathLike], model, samples: Optional[int] = None,
                     image_preprocess: Optional[ImagePreprocess] = None) -> CalibrationSet:
    """Calibration inputs for ``model`` (a proto, handle or path) from ``source``.

    * ``data.npz``: one array per model input, keyed by input name (``np.savez(path, **feeds)``;
      unnamed ``arr_0, arr_1, ...`` map to the inputs in graph order), first axis = samples;
    * a folder of ``.npz`` files (same form, one sample or a batch each), or of ``.npy`` files
      for a one-input model; files are read in sorted name order;
    * a folder of images (PNG/JPEG/BMP, needs Pillow) for a one-input image model, with
      ``image_preprocess`` saying how pixels become the input.

    An array with the model input's rank is a batch (axis 0 = samples); in a folder, one rank
    lower is a single sample. Each file is checked as :mod:`onnxprune.inputs.check` says
    (sample mode): floats are cast to the input's float type and integers to its integer type;
    other dtype mismatches, wrong names, ranks, static dims or disagreeing shared dims raise
    :class:`InputDataError` naming the input. ``samples`` keeps the first ``samples``.
    """
    specs = input_signature(model_proto(model))
    if not specs:
        raise InputDataError("the model has no runtime inputs; calibration data cannot be fed")
    path = Path(source)
    if not path.exists():
        raise InputDataError(f"calibration source '{path}' does not exist; pass a .npz file or "
                             "a folder of .npy/.npz/image files")
    if path.is_dir():
        data = _load_folder(path, specs, image_preprocess)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        raise InputDataError(f"'{path}' is one image; pass the folder holding the calibration "
                             "images")
    else:
        data = CalibrationSet(specs, [file_part(path, specs, samples=True)], str(path))
    if samples is not None:
        if int(samples) < 1:
            raise OptionError(f"calibration samples must be a positive integer, got {samples}")
        data = data.take(int(samples))
    if len(data) == 0:
        raise InputDataError(f"calibration source '{path}' holds no samples")
    return data


def generated_calibration(model, n: int = 8, seed: int = 0,
                          shapes: Optional[Mapping[str, Sequence[int]]] = None) -> CalibrationSet:
    """``n`` seeded random samples from the model's input signature (data-free in effect).

    ``shapes`` gives the shape of one sample per input name (axis 0 included, usually 1);
    dynamic dims not given follow :func:`onnxprune.inputs.signature.resolve_input_shapes`.
    Values follow :func:`onnxprune.inputs.generate.make_inputs`: sample ``i`` of seed ``s`` is
    the feed ``make_inputs`` gives for seed ``s * 1_000_003 + i``. Statistics from these inputs
    describe the model on noise, not on its data: whoever uses them should report the run as
    data-free in effect.
    """
    proto = model_proto(model)
    if n < 1:
        raise OptionError(f"generated calibration needs at least 1 sample, got {n}")
    specs = input_signature(proto)
    resolved = resolve_input_shapes(proto, shapes, batch=1)
    roles = input_roles(proto, specs)
    parts = []
    for i in range(int(n)):
        def loader(limit=None, start=0, i=i):
            return make_inputs(proto, resolved, seed=seed * 1_000_003 + i, roles=roles)
        parts.append(Part(1, loader, f"generated #{i}"))
    return CalibrationSet(specs, parts, f"generated (seed {seed})", data_free=True)


def _load_folder(path: Path, specs: Sequence[InputSpec],
                 preprocess: Optional[ImagePreprocess]) -> CalibrationSet:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix.lower() in ARRAY_EXTENSIONS]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if arrays and images:
        raise InputDataError(f"calibration folder '{path}' mixes array files "
                             f"({arrays[0].name}) and images ({images[0].name}); keep one kind")
    if images:
        return CalibrationSet(specs, image_parts(path, images, specs, preprocess), str(path))
    if not arrays:
        raise InputDataError(f"calibration folder '{path}' has no .npy/.npz or image "
                             f"({', '.join(IMAGE_EXTENSIONS)}) files")
    parts = [file_part(p, specs, samples=True, single_ok=True) for p in arrays]
    return CalibrationSet(specs, parts, str(path))
