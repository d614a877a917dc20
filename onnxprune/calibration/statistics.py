"""Calibration data and the per-layer activation statistics computed from it.

This module owns:

* **loading calibration inputs** (:func:`load_calibration`): an ``.npz`` with one array per model
  input, a folder of ``.npy``/``.npz`` files, or a folder of images with a declared
  :class:`ImagePreprocess`; checked against the model's input signature and served as feed dicts
  in batches by a :class:`CalibrationSet`. :func:`generated_calibration` makes seeded random
  inputs instead (the caller reports such a run as *data-free in effect*).
* **layer statistics** (:func:`collect_layer_stats`): for every prunable weight, the matrix ``X``
  its ``W[out, in]`` view multiplies (one row per sample and output position, columns in exactly
  the order of :meth:`Layout.to_2d`'s ``in``), reduced while streaming to
  ``in_sq_norms = sum_rows x_j**2`` (Wanda's ``||X_j||^2``), ``hessian = X^T X`` (SparseGPT,
  least-squares refits) and ``in_sums`` (means, bias correction), all in float64.

How ``X`` is formed, per op (the node's *activation* operand is the one that is not the weight):

* **Conv** ``[Cout, Cin/g, k...]``: im2col of the input honoring ``pads``/``auto_pad``
  (SAME_UPPER, SAME_LOWER, VALID), ``strides``, ``dilations`` and ``group``; columns ordered
  ``(k..., Cin/g)`` with the input channel innermost. With ``group > 1`` the rows of group ``i``
  only ever see group ``i``'s channels, so one ``[in, in]`` matrix cannot be exact for every
  row: ``group_hessians[i]`` (``[g, in, in]``) keeps each group's own ``X_i^T X_i`` (what
  :func:`onnxprune.calibration.reconstruct.sparsegpt_prune` wants, see :meth:`LayerStats.sparsegpt_hessian`)
  and ``hessian`` is their sum, i.e. ``X^T X`` of all groups' rows stacked.
* **ConvTranspose** ``[Cin, Cout/g, k...]`` (view: ``out = Cout/g``, ``in = (k..., Cin)``): the
  gather form of the transposed convolution (each output position reads the input positions its
  kernel taps land on; stride, dilation, pads, ``output_padding``, ``output_shape``/``auto_pad``
  honored). Row ``co`` of the view serves output channel ``co`` of every group, each time seeing
  only that group's input channels, so the exact ``H`` is ``X^T X`` with the cross-group blocks
  zeroed. Exact, not just norms.
* **Gemm**: the other operand, transposed per ``transA``/``transB`` so rows are samples.
* **MatMul** ``x @ W``: every leading dim of ``x`` flattened into rows; ``W @ x``: the rows are
  the columns of ``x``. A weight with batch dims (``[B, K, N]``) gets one ``H`` summed over the
  batch (exact when the activation broadcasts over ``B``, an average otherwise).

Activations are read by adding them as graph outputs of a copy of the model, run in
onnxruntime batch by batch. Layers are processed in *chunks* so that the activations exposed at
once stay under ``budget_bytes`` per batch (shapes from shape inference at the actual input
shapes); weights reading the same activation the same way (Q/K/V projections) share one
accumulator. The :class:`StatsRecord` says how many chunks and model runs it took and the peak
bytes held (exposed activations + im2col block + accumulators).

Weights used inside ``If``/``Loop``/``Scan`` bodies cannot have their activations exposed and
are listed in :attr:`StatsRecord.skipped` with a reason.
"""

from __future__ import annotations

import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from numpy.lib.stride_tricks import as_strided

from onnxprune.model.index import names_read
from onnxprune.errors import InputDataError, OptionError
from onnxprune.model.io import ModelHandle, iter_tensors, load
from onnxprune.ops.registry import ConvGeometry, activation_of
from onnxprune.runtime.validate import (InputSpec, input_signature, inputs_error, make_inputs, open_session,
                       resolve_input_shapes)
from onnxprune.model.weights import Weight

__all__ = ["ImagePreprocess", "CalibrationSet", "load_calibration", "generated_calibration",
           "LayerStats", "StatsRecord", "LayerStatsMap", "collect_layer_stats",
           "activation_rows"]

#: Activation bytes per batch exposed at once before a new chunk of layers starts.
DEFAULT_BUDGET_BYTES = 1 << 30
#: Bytes of one float64 im2col block (rows are streamed through in blocks of this size).
BLOCK_BYTES = 32 << 20
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
ARRAY_EXTENSIONS = (".npy", ".npz")

Progress = Callable[[int, int], None]  # (batches done, batches in total over all chunks)


# =============================================================================================
# calibration inputs
# =============================================================================================
@dataclass(frozen=True)
class ImagePreprocess:
    """How an image file becomes a model input: ``((pixels * scale) - mean) / std``.

    ``size`` is ``(H, W)`` after resizing (bilinear); None takes the model's static spatial
    dims. ``mean``/``std`` are per channel, in ``channel_order``. ``layout`` is the model
    input's: ``"NCHW"`` or ``"NHWC"``. A one-channel model input reads images as grayscale.
    """

    size: Optional[Tuple[int, int]] = None
    scale: float = 1.0 / 255.0
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channel_order: str = "RGB"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise OptionError(f"image layout must be NCHW or NHWC, got {self.layout!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise OptionError(f"image channel order must be RGB or BGR, got "
                              f"{self.channel_order!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise OptionError(f"image size must be (H, W) with positive ints, got {self.size}")
        if len(self.mean) != len(self.std) or any(s == 0 for s in self.std):
            raise OptionError("image mean and std need one value per channel and std must "
                              f"not be 0 (mean={self.mean}, std={self.std})")


@dataclass
class _Part:
    """A slice of the calibration data: ``count`` samples loaded on demand."""

    count: int
    load: Callable[[], Dict[str, np.ndarray]]  # name -> array with a leading sample axis
    label: str


class CalibrationSet:
    """Calibration samples checked against a model's inputs, served as feed dicts.

    Samples are read lazily, part by part (a file, an image), so a folder of images costs one
    batch of memory. ``data_free`` is True for generated inputs.

    >>> data = load_calibration("calib.npz", model)            # doctest: +SKIP
    >>> len(data), next(data.batches(8))["input"].shape        # doctest: +SKIP
    (256, (8, 3, 224, 224))
    """

    def __init__(self, inputs: Sequence[InputSpec], parts: Sequence[_Part], source: str,
                 data_free: bool = False) -> None:
        self.inputs = list(inputs)
        self._parts = list(parts)
        self.source = source
        self.data_free = data_free

    @classmethod
    def from_arrays(cls, model, arrays: Mapping[str, np.ndarray],
                    label: str = "arrays") -> "CalibrationSet":
        """A set from in-memory arrays keyed by input name (axis 0 = samples), checked like
        an ``.npz``."""
        specs = input_signature(_proto(model))
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        names = _map_names(Path(label), specs, list(arrays))
        arrays = {names[k]: v for k, v in arrays.items()}
        count, adds_axis = _check_arrays(Path(label), specs,
                                         {k: (v.shape, v.dtype) for k, v in arrays.items()},
                                         single_ok=False)
        conformed = {s.name: _conform(s, arrays[s.name], adds_axis[s.name], label)
                     for s in specs}
        return cls(specs, [_Part(count, lambda: conformed, label)], label)

    def __len__(self) -> int:
        return sum(p.count for p in self._parts)

    def __repr__(self) -> str:
        kind = "generated" if self.data_free else "calibration"
        return f"<CalibrationSet {len(self)} {kind} samples from {self.source}>"

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the model's inputs fix on axis 0 (None when it is dynamic)."""
        fixed = [s.dims[0] for s in self.inputs if s.dims and isinstance(s.dims[0], int)]
        return min(fixed) if fixed else None

    def num_batches(self, batch_size: int) -> int:
        """Batches :meth:`batches` yields (more only where sample shapes change mid-way)."""
        fixed = self.fixed_batch
        if fixed is not None:
            return len(self) // fixed
        return -(-len(self) // batch_size)

    def take(self, n: int) -> "CalibrationSet":
        """The first ``n`` samples (all when there are fewer)."""
        parts: List[_Part] = []
        left = int(n)
        for part in self._parts:
            if left <= 0:
                break
            if part.count <= left:
                parts.append(part)
            else:
                parts.append(_Part(left, _head(part.load, left), part.label))
            left -= part.count
        return CalibrationSet(self.inputs, parts, self.source, self.data_free)

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

        for part in self._parts:
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


def _head(loader: Callable[[], Dict[str, np.ndarray]], n: int):
    return lambda: {k: v[:n] for k, v in loader().items()}


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
    lower is a single sample. Floats are cast to the input's float type and integers to its
    integer type; other dtype mismatches, wrong names, ranks or static dims raise
    :class:`InputDataError` naming the input. ``samples`` keeps the first ``samples``.
    """
    specs = input_signature(_proto(model))
    if not specs:
        raise InputDataError("the model has no runtime inputs; calibration data cannot be fed")
    path = Path(source)
    if not path.exists():
        raise InputDataError(f"calibration source '{path}' does not exist; pass a .npz file or "
                             "a folder of .npy/.npz/image files")
    if path.is_dir():
        data = _load_folder(path, specs, image_preprocess)
    elif path.suffix.lower() == ".npz":
        data = CalibrationSet(specs, [_npz_part(path, specs, single_ok=False)], str(path))
    elif path.suffix.lower() == ".npy":
        data = CalibrationSet(specs, [_npy_part(path, specs, single_ok=False)], str(path))
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        raise InputDataError(f"'{path}' is one image; pass the folder holding the calibration "
                             "images")
    else:
        raise InputDataError(f"calibration source '{path}' is neither a .npz/.npy file nor a "
                             "folder; save inputs with np.savez(path, **{name: array})")
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
    dynamic dims not given follow :func:`onnxprune.runtime.validate.resolve_input_shapes`. Values follow
    :func:`onnxprune.runtime.validate.make_inputs`. Statistics from these inputs describe the model on
    noise, not on its data: whoever uses them should report the run as data-free in effect.
    """
    proto = _proto(model)
    if n < 1:
        raise OptionError(f"generated calibration needs at least 1 sample, got {n}")
    specs = input_signature(proto)
    resolved = resolve_input_shapes(proto, shapes, batch=1)
    parts = []
    for i in range(int(n)):
        def loader(i=i):
            return make_inputs(proto, resolved, seed=seed * 1_000_003 + i)
        parts.append(_Part(1, loader, f"generated #{i}"))
    return CalibrationSet(specs, parts, f"generated (seed {seed})", data_free=True)


def _proto(model) -> onnx.ModelProto:
    if isinstance(model, ModelHandle):
        return model.model
    if isinstance(model, onnx.ModelProto):
        return model
    return load(model).model


# -- arrays ----------------------------------------------------------------------------------
def _load_folder(path: Path, specs: Sequence[InputSpec],
                 preprocess: Optional[ImagePreprocess]) -> CalibrationSet:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    arrays = [p for p in files if p.suffix.lower() in ARRAY_EXTENSIONS]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if arrays and images:
        raise InputDataError(f"calibration folder '{path}' mixes array files "
                             f"({arrays[0].name}) and images ({images[0].name}); keep one kind")
    if images:
        return _image_set(path, images, specs, preprocess)
    if not arrays:
        raise InputDataError(f"calibration folder '{path}' has no .npy/.npz or image "
                             f"({', '.join(IMAGE_EXTENSIONS)}) files")
    parts = []
    for p in arrays:
        if p.suffix.lower() == ".npz":
            parts.append(_npz_part(p, specs, single_ok=True))
        else:
            parts.append(_npy_part(p, specs, single_ok=True))
    return CalibrationSet(specs, parts, str(path))


def _npy_part(path: Path, specs: Sequence[InputSpec], single_ok: bool) -> _Part:
    if len(specs) != 1:
        raise InputDataError(f"'{path}' is a .npy (one array) but the model has {len(specs)} "
                             f"inputs ({', '.join(s.name for s in specs)}); use .npz files "
                             "keyed by input name")
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputDataError(f"'{path}' is not a readable .npy file ({exc})") from None
    spec = specs[0]
    shapes = {spec.name: (tuple(header.shape), header.dtype)}
    count, adds_axis = _check_arrays(path, specs, shapes, single_ok)
    del header

    def loader():
        arr = np.load(path, allow_pickle=False)
        return {spec.name: _conform(spec, arr, adds_axis[spec.name], path)}

    return _Part(count, loader, path.name)


def _npz_part(path: Path, specs: Sequence[InputSpec], single_ok: bool) -> _Part:
    try:
        shapes = _npz_headers(path)
    except Exception as exc:
        raise InputDataError(f"'{path}' is not a readable .npz file ({exc}); save inputs with "
                             "np.savez(path, **{name: array})") from None
    names = _map_names(path, specs, list(shapes))
    shapes = {names[k]: v for k, v in shapes.items()}
    count, adds_axis = _check_arrays(path, specs, shapes, single_ok)
    by_input = {v: k for k, v in names.items()}

    def loader():
        with np.load(path, allow_pickle=False) as z:
            return {s.name: _conform(s, z[by_input[s.name]], adds_axis[s.name], path)
                    for s in specs}

    return _Part(count, loader, path.name)


def _npz_headers(path: Path) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in a .npz without decompressing the data."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            out[info.filename[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    return out


def _map_names(path: Path, specs: Sequence[InputSpec], keys: List[str]) -> Dict[str, str]:
    """Array key -> input name: by name, or positionally for ``arr_0, arr_1, ...``."""
    wanted = [s.name for s in specs]
    positional = [f"arr_{i}" for i in range(len(keys))]
    if sorted(keys) == sorted(positional) and not set(keys) & set(wanted):
        if len(keys) != len(specs):
            raise InputDataError(f"'{path}' holds {len(keys)} unnamed arrays but the model has "
                                 f"{len(specs)} inputs ({', '.join(wanted)}); save them by "
                                 "name: np.savez(path, **{name: array})")
        return {f"arr_{i}": wanted[i] for i in range(len(keys))}
    missing = [s for s in specs if s.name not in keys]
    extra = sorted(k for k in keys if k not in wanted)
    if missing:
        want = ", ".join(f"'{s.name}' {s.declared} {_type_name(s)}" for s in missing)
        raise InputDataError(f"'{path}' has no array for input(s) {want}; it holds "
                             f"{', '.join(repr(k) for k in keys) or 'nothing'}")
    if extra:
        raise InputDataError(f"'{path}' has array(s) {', '.join(repr(e) for e in extra)} that "
                             f"are not model inputs; the inputs are: {', '.join(wanted)}")
    return {k: k for k in keys}


def _check_arrays(path: Path, specs: Sequence[InputSpec],
                  shapes: Mapping[str, Tuple[Tuple[int, ...], np.dtype]],
                  single_ok: bool) -> Tuple[int, Dict[str, bool]]:
    """Validate shapes/dtypes; returns (samples in the file, which inputs need a batch axis)."""
    counts = {}
    adds_axis = {}
    for spec in specs:
        shape, dtype = shapes[spec.name]
        _check_dtype(path, spec, dtype)
        if spec.dims is None:  # no declared shape: trust the file, axis 0 = samples
            adds_axis[spec.name] = False
            counts[spec.name] = shape[0] if shape else 1
            continue
        rank = len(spec.dims)
        if rank == 0:
            if len(shape) != 0:
                raise InputDataError(f"input '{spec.name}' is a scalar; '{path}' gives shape "
                                     f"{_fmt(shape)}: give one value (a 0-d array), used for "
                                     "every sample")
            adds_axis[spec.name] = False
            continue
        if len(shape) == rank:
            sample_shape, n = shape[1:], shape[0]
            adds_axis[spec.name] = False
        elif single_ok and len(shape) == rank - 1:
            sample_shape, n = shape, 1
            adds_axis[spec.name] = True
        else:
            ranks = f"rank {rank}" + (f" (or {rank - 1} for one sample)" if single_ok else "")
            raise InputDataError(f"input '{spec.name}' in '{path}' has shape {_fmt(shape)}; "
                                 f"the model expects {spec.declared} {_type_name(spec)}, so "
                                 f"the array needs {ranks} with samples on axis 0")
        for axis, (declared, got) in enumerate(zip(spec.dims[1:], sample_shape), start=1):
            if isinstance(declared, int) and declared != got:
                raise InputDataError(f"input '{spec.name}' in '{path}' has shape "
                                     f"{_fmt(shape)}; the model expects {spec.declared} "
                                     f"(dim {axis} must be {declared})")
        counts[spec.name] = n
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{k}': {v}" for k, v in counts.items())
        raise InputDataError(f"'{path}' holds different sample counts per input ({detail}); "
                             "axis 0 of every array is the sample axis")
    if not counts:
        raise InputDataError(f"'{path}' gives only scalar inputs; calibration needs at least "
                             "one input with samples on axis 0")
    return next(iter(counts.values())), adds_axis


def _check_dtype(path, spec: InputSpec, dtype: np.dtype) -> None:
    target = spec.dtype
    if dtype == target:
        return
    if target.kind == "f" and dtype.kind == "f":
        return
    if target.kind in "iu" and dtype.kind in "iu":
        return
    raise InputDataError(f"input '{spec.name}' in '{path}' is {dtype}; the model expects "
                         f"{_type_name(spec)} {spec.declared}")


def _conform(spec: InputSpec, arr: np.ndarray, add_axis: bool, path) -> np.ndarray:
    if add_axis:
        arr = arr[None]
    if arr.dtype != spec.dtype:
        if spec.dtype.kind in "iu" and arr.size:
            info = np.iinfo(spec.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise InputDataError(f"input '{spec.name}' in '{path}' has values that do not "
                                     f"fit {spec.dtype}")
        arr = arr.astype(spec.dtype)
    return arr


def _type_name(spec: InputSpec) -> str:
    return onnx.TensorProto.DataType.Name(spec.elem_type).lower()


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "()"


# -- images ----------------------------------------------------------------------------------
def _image_set(folder: Path, files: List[Path], specs: Sequence[InputSpec],
               pre: Optional[ImagePreprocess]) -> CalibrationSet:
    try:
        import PIL.Image  # noqa: F401 - optional dependency, checked before any work
    except ImportError:
        raise OptionError(f"calibration folder '{folder}' holds images; reading them needs "
                          "Pillow: pip install pillow") from None
    if len(specs) != 1:
        raise InputDataError(f"calibration images fit a one-input model; this one has "
                             f"{len(specs)} inputs ({', '.join(s.name for s in specs)}); "
                             "save .npz files keyed by input name instead")
    if pre is None:
        raise OptionError(f"calibration folder '{folder}' holds images: declare how they are "
                          "preprocessed (ImagePreprocess: size, scale, mean, std, layout, "
                          "channel order)")
    spec = specs[0]
    if spec.dtype.kind != "f":
        raise InputDataError(f"input '{spec.name}' is {_type_name(spec)}; calibration images "
                             "are preprocessed to floats, so they need a float input")
    dims = spec.dims
    if dims is not None and len(dims) != 4:
        raise InputDataError(f"input '{spec.name}' has rank {len(dims)} {spec.declared}; "
                             "images need a rank-4 NCHW or NHWC input")
    c_axis, hw_axes = (1, (2, 3)) if pre.layout == "NCHW" else (3, (1, 2))
    channels = dims[c_axis] if dims is not None and isinstance(dims[c_axis], int) else len(pre.mean)
    if channels not in (1, 3) or len(pre.mean) not in (1, channels):
        raise InputDataError(f"input '{spec.name}' {spec.declared} has {channels} channels in "
                             f"layout {pre.layout}; images give 1 (gray) or 3, with one mean/std "
                             f"each (got {len(pre.mean)})")
    size = pre.size
    if size is None:
        hw = [dims[a] if dims is not None else None for a in hw_axes]
        if not all(isinstance(d, int) for d in hw):
            raise OptionError(f"input '{spec.name}' {spec.declared} has dynamic height/width; "
                              "give the image size in ImagePreprocess(size=(H, W))")
        size = (int(hw[0]), int(hw[1]))
    else:
        for axis, want in zip(hw_axes, size):
            if dims is not None and isinstance(dims[axis], int) and dims[axis] != want:
                raise InputDataError(f"image size {size[0]}x{size[1]} does not fit input "
                                     f"'{spec.name}' {spec.declared}")
    parts = [_Part(1, (lambda p=p: {spec.name: _read_image(p, pre, size, channels, spec)}),
                   p.name) for p in files]
    return CalibrationSet(specs, parts, str(folder))


def _read_image(path: Path, pre: ImagePreprocess, size: Tuple[int, int], channels: int,
                spec: InputSpec) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except Exception as exc:
        raise InputDataError(f"calibration image '{path}' cannot be read ({exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pre.channel_order == "BGR" and channels == 3:
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(pre.mean, dtype=np.float32)
    std = np.asarray(pre.std, dtype=np.float32)
    pixels = (pixels * np.float32(pre.scale) - mean) / std
    if pre.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None], dtype=spec.dtype)


# =============================================================================================
# layer statistics
# =============================================================================================
@dataclass
class LayerStats:
    """What calibration says about the input ``X`` of one weight's ``W[out, in]`` view.

    ``X`` has one row per (sample, output position) and one column per ``in`` entry, in
    :meth:`Layout.to_2d` order. All sums are float64 over every row seen.
    """

    in_sq_norms: np.ndarray  # [in]  sum_rows x_j^2, so ||X_j||_2 = sqrt(in_sq_norms)
    hessian: Optional[np.ndarray]  # [in, in]  X^T X (None when not asked for)
    count: int  # rows of X
    in_sums: np.ndarray  # [in]  sum_rows x_j (means for bias correction)
    group_hessians: Optional[np.ndarray] = None  # [g, in, in] grouped Conv: rows of group i
    group_sums: Optional[np.ndarray] = None  # [g, in]  sum over group i's rows (g = 1 too)
    group_rows: int = 0  # rows of X each group's sums are over
    # Paired with a reference model fed the same inputs (collect_layer_stats(reference=...)):
    # X_ref is the reference model's X, row for row.
    ref_sums: Optional[np.ndarray] = None  # [g, in]  sum over group i's rows of X_ref
    cross: Optional[np.ndarray] = None  # [g, in, in]  X_i^T X_ref_i (with the Hessian)

    @property
    def in_norms(self) -> np.ndarray:
        """``||X_j||_2`` per input column (what the Wanda criterion takes)."""
        return np.sqrt(self.in_sq_norms)

    @property
    def in_mean(self) -> np.ndarray:
        return self.in_sums / max(self.count, 1)

    @property
    def sparsegpt_hessian(self) -> Optional[np.ndarray]:
        """The Hessian to give :func:`onnxprune.calibration.reconstruct.sparsegpt_prune`: per row group
        (``[g, in, in]``) for a grouped Conv, else ``[in, in]``."""
        return self.group_hessians if self.group_hessians is not None else self.hessian

    @property
    def nbytes(self) -> int:
        arrays = (self.in_sq_norms, self.hessian, self.in_sums, self.group_hessians,
                  self.group_sums, self.ref_sums, self.cross)
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass
class StatsRecord:
    """What :func:`collect_layer_stats` did."""

    samples: int = 0
    batch_size: int = 0
    chunks: List[List[str]] = field(default_factory=list)  # weight keys per chunk
    model_runs: int = 0  # onnxruntime runs (batches x chunks)
    peak_bytes: int = 0  # exposed activations + im2col block + accumulators, at most
    budget_bytes: int = DEFAULT_BUDGET_BYTES
    seconds: float = 0.0
    data_free: bool = False
    skipped: Dict[str, str] = field(default_factory=dict)  # weight key -> why no stats


class LayerStatsMap(dict):
    """``{weight.key: LayerStats}`` with the run's :class:`StatsRecord` as ``.record``."""

    record: StatsRecord


class _Extractor:
    """Turns one node's activation batch into row blocks of ``X`` (``[G, rows, in]``)."""

    groups = 1  # G: row groups with separate Hessians (grouped Conv)
    col_groups = 1  # ConvTranspose: channel groups whose cross blocks of H are zero
    col_group_of: Optional[np.ndarray] = None

    def __init__(self, activation: str, in_dim: int) -> None:
        self.activation = activation
        self.in_dim = in_dim

    @property
    def signature(self) -> tuple:
        return (type(self).__name__, self.activation, self.in_dim)

    def blocks(self, x: np.ndarray, block_bytes: int, dtype=np.float64) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def moments(self, x: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
        """``(sums [G, in], squared sums [G, in], rows per group)`` of ``X`` for this batch
        without forming ``X``, or None where there is no shortcut (then blocks are summed)."""
        return None


class _MatrixExtractor(_Extractor):
    """Gemm/MatMul: the activation is (a transpose of) X itself."""

    def __init__(self, activation: str, in_dim: int, rows_last: bool) -> None:
        super().__init__(activation, in_dim)
        self.rows_last = rows_last  # True: X is the activation's last-two-axes transpose

    @property
    def signature(self) -> tuple:
        return super().signature + (self.rows_last,)

    def blocks(self, x: np.ndarray, block_bytes: int, dtype=np.float64) -> Iterator[np.ndarray]:
        if x.ndim == 1:
            x = x[None, :]  # a vector operand is one row, on either side
        elif self.rows_last:
            x = np.swapaxes(x, -1, -2)
        if x.shape[-1] != self.in_dim:
            raise InputDataError(f"activation '{self.activation}' has shape {x.shape}; the "
                                 f"weight reads {self.in_dim} input columns")
        x2 = x.reshape(-1, self.in_dim) if x.flags.c_contiguous else None
        if x2 is None:
            x2 = np.ascontiguousarray(x).reshape(-1, self.in_dim)
        step = max(1, block_bytes // (np.dtype(dtype).itemsize * self.in_dim))
        for r0 in range(0, x2.shape[0], step):
            yield x2[r0:r0 + step].astype(dtype)[None]


class _ConvExtractor(_Extractor):
    """Conv (and, with ``transpose``, ConvTranspose): im2col in layout column order."""

    def __init__(self, activation: str, geometry: ConvGeometry, wshape: Tuple[int, ...]) -> None:
        transpose = geometry.transpose
        self.transpose = transpose
        self.kernel = geometry.kernel
        nd = len(self.kernel)
        self.nd = nd
        self.group = geometry.group
        self.strides = geometry.strides
        self.dilations = geometry.dilations
        self.pads = geometry.pads
        self.auto_pad = geometry.auto_pad
        self.output_padding = geometry.output_padding
        self.output_shape = geometry.output_shape
        k = int(np.prod(self.kernel))
        if transpose:
            self.cin = int(wshape[0])  # all input channels, every group
            self.cg = self.cin
            in_dim = k * self.cin
            self.col_groups = self.group
            self.col_group_of = np.tile(np.arange(self.cin) // (self.cin // self.group), k)
        else:
            self.cg = int(wshape[1])
            self.cin = self.cg * self.group
            in_dim = k * self.cg
            self.groups = self.group
        super().__init__(activation, in_dim)

    @property
    def signature(self) -> tuple:
        return super().signature + (self.transpose, self.kernel, self.group, self.strides,
                                    self.dilations, self.pads, self.auto_pad,
                                    self.output_padding, self.output_shape)

    # -- geometry: per spatial axis (pad_begin, pad_end, out) ---------------------------------
    def _conv_geometry(self, spatial: Sequence[int]) -> List[Tuple[int, int, int]]:
        geo = []
        for i, size in enumerate(spatial):
            k, s, d = self.kernel[i], self.strides[i], self.dilations[i]
            span = (k - 1) * d + 1
            if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = -(-size // s)
                total = max(0, (out - 1) * s + span - size)
                begin = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                end = total - begin
            elif self.auto_pad == "VALID":
                begin = end = 0
                out = (size - span) // s + 1
            else:
                begin, end = self.pads[i], self.pads[i + self.nd]
                out = (size + begin + end - span) // s + 1
            geo.append((begin, end, out))
        return geo

    def _transpose_geometry(self, spatial: Sequence[int]) -> List[Tuple[int, int, int]]:
        geo = []
        out_shape = self.output_shape[-self.nd:] if self.output_shape else None
        for i, size in enumerate(spatial):
            k, s, d = self.kernel[i], self.strides[i], self.dilations[i]
            op = self.output_padding[i]
            full = s * (size - 1) + op + (k - 1) * d + 1
            if out_shape is not None or self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = int(out_shape[i]) if out_shape is not None else size * s
                total = full - out
                # ONNX: SAME_UPPER puts the odd pad at the end, anything else at the start.
                if self.auto_pad == "SAME_UPPER":
                    begin = total // 2
                else:
                    begin = total - total // 2
                end = total - begin
            elif self.auto_pad == "VALID":
                begin = end = 0
                out = full
            else:
                begin, end = self.pads[i], self.pads[i + self.nd]
                out = full - begin - end
            geo.append((begin, end, out))
        return geo

    def blocks(self, x: np.ndarray, block_bytes: int, dtype=np.float64) -> Iterator[np.ndarray]:
        if x.ndim != self.nd + 2 or x.shape[1] != self.cin:
            raise InputDataError(f"activation '{self.activation}' has shape {x.shape}; the "
                                 f"weight expects [N, {self.cin}, {self.nd} spatial dims]")
        if self.transpose:
            yield from self._transpose_blocks(x, block_bytes, dtype)
        else:
            yield from self._conv_blocks(x, block_bytes, dtype)

    def moments(self, x: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
        # Column (kernel offset k, channel j of group g) of im2col sums one strided slice of the
        # padded input: no im2col copy, one slice per kernel offset.
        if self.transpose:
            return None
        if x.ndim != self.nd + 2 or x.shape[1] != self.cin:
            return None  # blocks() raises the proper error
        geo = self._conv_geometry(x.shape[2:])
        out = [o for _, _, o in geo]
        sums = np.zeros((self.cin, int(np.prod(self.kernel))))
        sq = np.zeros_like(sums)
        rows = x.shape[0] * int(np.prod(out)) if min(out) >= 1 else 0
        if rows:
            # Summing over samples first commutes with the slicing: per offset the work is
            # C x positions, not N x C x positions.
            xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(b, e) for b, e, _ in geo])
            total, total_sq = xp.sum(axis=0), np.square(xp).sum(axis=0)  # [C, *padded]
            spatial = tuple(range(1, 1 + self.nd))
            for k, offset in enumerate(np.ndindex(*self.kernel)):
                index = (slice(None),) + tuple(
                    slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in
                    zip(offset, self.dilations, self.strides, out))
                sums[:, k] = total[index].sum(axis=spatial)
                sq[:, k] = total_sq[index].sum(axis=spatial)
        # [C, K] -> [G, (K, cg)] with the channel innermost, as to_2d orders the columns
        def cols(a):
            return a.reshape(self.group, self.cg, -1).transpose(0, 2, 1).reshape(self.group, -1)
        return cols(sums), cols(sq), rows

    def _windows(self, xp: np.ndarray, out: Sequence[int], strides: Sequence[int]
                 ) -> np.ndarray:
        """[N, C, *out, *kernel] view of padded ``xp``."""
        st = xp.strides
        shape = xp.shape[:2] + tuple(out) + self.kernel
        strides_ = (st[0], st[1]) + tuple(st[2 + i] * strides[i] for i in range(self.nd)) + \
            tuple(st[2 + i] * self.dilations[i] for i in range(self.nd))
        return as_strided(xp, shape, strides_, writeable=False)

    def _conv_blocks(self, x: np.ndarray, block_bytes: int, dtype) -> Iterator[np.ndarray]:
        geo = self._conv_geometry(x.shape[2:])
        out = [o for _, _, o in geo]
        if min(out) < 1:
            return
        xp = np.pad(x, [(0, 0), (0, 0)] + [(b, e) for b, e, _ in geo])
        v = self._windows(xp, out, self.strides)  # [N, C, *O, *K]
        n = x.shape[0]
        v = v.reshape((n, self.group, self.cg) + v.shape[2:])
        nd = self.nd
        # -> [g, N, *O, *K, cg]: rows (N, *O), columns (*K, cg) with the channel innermost.
        v = v.transpose((1, 0) + tuple(range(3, 3 + 2 * nd)) + (2,))
        yield from _row_blocks(v, self.groups, self.in_dim, block_bytes, dtype)

    def _transpose_blocks(self, x: np.ndarray, block_bytes: int, dtype
                          ) -> Iterator[np.ndarray]:
        # Output p reads input q = (p + pad_begin - k*d) / s where integral: a stride-1
        # correlation of the zero-upsampled input, placed at offset (k-1)*d - pad_begin, with
        # the kernel flipped (window tap k' is kernel index k-1-k').
        geo = self._transpose_geometry(x.shape[2:])
        out = [o for _, _, o in geo]
        if min(out) < 1:
            return
        n = x.shape[0]
        lengths = [o + (k - 1) * d for o, k, d in zip(out, self.kernel, self.dilations)]
        u = np.zeros((n, self.cin) + tuple(lengths), dtype=x.dtype)
        dst, src = [slice(None), slice(None)], [slice(None), slice(None)]
        for i, (begin, _, _) in enumerate(geo):
            s, size = self.strides[i], x.shape[2 + i]
            offset = (self.kernel[i] - 1) * self.dilations[i] - begin
            q0 = (-offset + s - 1) // s if offset < 0 else 0  # first q with q*s+offset >= 0
            q1 = min(size, (lengths[i] - 1 - offset) // s + 1)
            if q1 <= q0:
                return  # no input position reaches the output: X is all zeros
            t0 = q0 * s + offset
            dst.append(slice(t0, t0 + (q1 - q0 - 1) * s + 1, s))
            src.append(slice(q0, q1))
        u[tuple(dst)] = x[tuple(src)]
        v = self._windows(u, out, (1,) * self.nd)  # [N, Cin, *O, *K']
        v = v[(slice(None), slice(None)) + (slice(None),) * self.nd +
              (slice(None, None, -1),) * self.nd]
        v = v.transpose((0,) + tuple(range(2, 2 + 2 * self.nd)) + (1,))[None]
        yield from _row_blocks(v, 1, self.in_dim, block_bytes, dtype)


def _row_blocks(v: np.ndarray, groups: int, in_dim: int, block_bytes: int, dtype
                ) -> Iterator[np.ndarray]:
    """Copy row blocks of the view ``v`` ``[G, N, *O, *cols]`` into ``dtype`` ``[G, rows, in]``."""
    n = v.shape[1]
    nd = (v.ndim - 2) // 2 if v.ndim > 3 else 0
    out_shape = v.shape[2:2 + nd] if nd else ()
    per_sample = int(np.prod(out_shape, dtype=np.int64)) if nd else 1
    rows_per_block = max(1, block_bytes // (np.dtype(dtype).itemsize * in_dim * groups))
    if per_sample <= rows_per_block:
        step = max(1, rows_per_block // per_sample)
        for n0 in range(0, n, step):
            chunk = v[:, n0:n0 + step]
            buf = np.empty(chunk.shape, dtype=dtype)
            buf[...] = chunk
            yield buf.reshape(groups, -1, in_dim)
        return
    per_row0 = per_sample // out_shape[0]
    step = max(1, rows_per_block // per_row0)
    for i in range(n):
        for o0 in range(0, out_shape[0], step):
            chunk = v[:, i:i + 1, o0:o0 + step]
            buf = np.empty(chunk.shape, dtype=dtype)
            buf[...] = chunk
            yield buf.reshape(groups, -1, in_dim)


class _Accumulator:
    """Streaming float64 sums for one extractor signature."""

    def __init__(self, extractor: _Extractor, want_hessian: bool, paired: bool = False) -> None:
        g, d = extractor.groups, extractor.in_dim
        self.extractor = extractor
        self.sq = np.zeros((g, d))
        self.sums = np.zeros((g, d))
        self.h = np.zeros((g, d, d)) if want_hessian else None
        self.ref_sums = np.zeros((g, d)) if paired else None
        self.cross = np.zeros((g, d, d)) if paired and want_hessian else None
        self.rows = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.sq, self.sums, self.h, self.ref_sums, self.cross)
                   if a is not None)

    def add(self, block: np.ndarray, ref_block: Optional[np.ndarray] = None) -> None:
        """One row block of ``X`` (and, paired, the same rows of the reference's ``X``)."""
        if self.ref_sums is not None:
            self.ref_sums += ref_block.sum(axis=1, dtype=np.float64)
            if self.cross is not None:
                self.cross += np.matmul(block.transpose(0, 2, 1), ref_block)
        # Block products may be float32 (precision="float32"); sums across blocks are float64.
        self.sums += block.sum(axis=1, dtype=np.float64)
        if self.h is None:
            self.sq += np.einsum("gri,gri->gi", block, block, dtype=np.float64)
        elif block.shape[0] == 1:
            b = block[0]
            self.h[0] += b.T @ b  # numpy turns a.T @ a into one symmetric rank-k update
        else:
            self.h += np.matmul(block.transpose(0, 2, 1), block)
        self.rows += block.shape[0] * block.shape[1]

    def add_moments(self, sums: np.ndarray, sq: np.ndarray, rows: int,
                    ref_sums: Optional[np.ndarray] = None) -> None:
        """What :meth:`add` gathers without a Hessian, from :meth:`_Extractor.moments`."""
        self.sums += sums
        self.sq += sq
        if self.ref_sums is not None:
            self.ref_sums += ref_sums
        self.rows += rows * sums.shape[0]

    def finish(self) -> LayerStats:
        ex = self.extractor
        h, cross = self.h, self.cross
        if h is not None:
            sq = np.einsum("gii->gi", h).sum(axis=0)
            if ex.col_group_of is not None and ex.col_groups > 1:
                same = ex.col_group_of[:, None] == ex.col_group_of[None, :]
                h = h * same[None]
                cross = cross * same[None] if cross is not None else None
        else:
            sq = self.sq.sum(axis=0)
        count = self.rows
        if ex.col_groups > 1:
            count *= ex.col_groups  # each output position is a row once per channel group
        total = h.sum(axis=0) if h is not None else None
        groups = h if (h is not None and h.shape[0] > 1) else None
        return LayerStats(in_sq_norms=sq, hessian=total, count=count,
                          in_sums=self.sums.sum(axis=0), group_hessians=groups,
                          group_sums=self.sums, group_rows=self.rows // self.sums.shape[0],
                          ref_sums=self.ref_sums, cross=cross)


def _extractor_for(weight: Weight, consumer) -> Tuple[Optional[_Extractor], str]:
    node, index = consumer.node, consumer.input_index
    act = activation_of(node, index, weight.shape)
    if act is None:
        return None, f"no activation rule for {node.op_type} input {index}"
    name = node.input[act.index]
    if act.conv is not None:
        return _ConvExtractor(name, act.conv, weight.shape), ""
    return _MatrixExtractor(name, weight.layout.shape2d[1], act.rows_last), ""


def activation_rows(weight: Weight, activation: np.ndarray, consumer: int = 0) -> np.ndarray:
    """``X`` (float64 ``[G, rows, in]``) for one activation batch of ``weight``'s consumer.

    The matrix :func:`collect_layer_stats` reduces; ``X[g] @ W2d[rows of group g].T``
    reproduces the node's output (before bias) position by position. Meant for tests and
    debugging: it holds the whole im2col of the batch.
    """
    ex, why = _extractor_for(weight, weight.consumers[consumer])
    if ex is None:
        raise ValueError(why)
    blocks = list(ex.blocks(np.asarray(activation), 1 << 62))
    return np.concatenate(blocks, axis=1)


def collect_layer_stats(handle, weights: Sequence[Weight], data: CalibrationSet,
                        want_hessian: bool = True, batch_size: int = 8,
                        progress: Optional[Progress] = None,
                        budget_bytes: int = DEFAULT_BUDGET_BYTES,
                        precision: str = "float64", reference=None,
                        runners: Optional[Sequence] = None) -> LayerStatsMap:
    """``{weight.key: LayerStats}`` from running ``data`` through the model as it is now.

    The model is read from ``handle`` in its current state (weights already pruned upstream
    count), so calling this layer group by layer group gives SparseGPT's sequential inputs.
    Weights whose activation cannot be reached (used only inside subgraphs) are left out and
    listed in ``result.record.skipped``. ``progress(done, total)`` is called after each batch.

    Activations exposed in one pass stay under ``budget_bytes`` per batch (estimated by shape
    inference at the first batch's shapes); more layers mean more passes over the data, never
    more memory. ``result.record`` says how many chunks and runs it took and the peak bytes.

    ``precision="float32"`` computes each im2col block's ``X_b^T X_b`` in float32 (about 2x
    faster for wide Conv inputs, ~1e-6 relative error per block) while the sums across blocks
    stay float64; the default does everything in float64.

    ``reference`` (a model with the same graph, e.g. the dense original) is run on the same
    inputs alongside: each weight's stats then also hold the reference's sums and, with the
    Hessian, the cross moment ``X^T X_ref`` — what a layer needs to reproduce the reference's
    outputs from the inputs it now gets (:func:`onnxprune.calibration.reconstruct.asymmetric_target`).

    ``runners`` (one per model: ``handle``'s, then the reference's) serve the activations
    instead of a session per chunk: :class:`onnxprune.runtime.segments.SegmentRunner` runs only the
    nodes not run before (layer-by-layer pruning).
    """
    if precision not in ("float64", "float32"):
        raise OptionError(f"precision must be 'float64' or 'float32', got {precision!r}")
    block_dtype = np.dtype(precision)
    handle = load(handle)
    ref = load(reference) if reference is not None else None
    started = time.perf_counter()
    record = StatsRecord(samples=len(data), batch_size=batch_size, budget_bytes=budget_bytes,
                         data_free=data.data_free)
    main = handle.model.graph.name or "main"
    graph_inputs = {i.name for i in handle.model.graph.input}
    constants = {t.name for t in handle.model.graph.initializer} | {
        o for n in handle.model.graph.node if n.op_type == "Constant" for o in n.output}

    # One accumulator per distinct (activation, extraction) pair; weights map onto them.
    extractors: Dict[tuple, _Extractor] = {}
    weight_sigs: Dict[str, List[tuple]] = {}
    for weight in weights:
        sigs = []
        for consumer in weight.consumers:
            if consumer.graph != main:
                record.skipped[weight.key] = (f"read by '{consumer.node_name}' inside a subgraph "
                                              f"({consumer.graph}); its input cannot be exposed")
                sigs = []
                break
            ex, why = _extractor_for(weight, consumer)
            if ex is None:
                record.skipped[weight.key] = why
                sigs = []
                break
            if ex.activation in constants:
                record.skipped[weight.key] = (f"its input '{ex.activation}' is a constant, not "
                                              "an activation")
                sigs = []
                break
            extractors.setdefault(ex.signature, ex)
            sigs.append(ex.signature)
        if sigs:
            weight_sigs[weight.key] = sigs

    result = LayerStatsMap()
    result.record = record
    if not weight_sigs:
        record.seconds = time.perf_counter() - started
        return result

    first = next(data.batches(batch_size))
    act_names = list(dict.fromkeys(ex.activation for ex in extractors.values()))
    sizes, types = _infer_activations(handle.model, act_names, first)
    del first
    if ref is not None:  # both models' activations are held at once
        sizes = {n: 2 * b for n, b in sizes.items()}
    chunks = _chunk(list(weight_sigs.items()), extractors, sizes, graph_inputs, budget_bytes)
    record.chunks = [keys for keys, _ in chunks]

    total = data.num_batches(batch_size) * len(chunks)
    done = 0
    accumulators: Dict[tuple, _Accumulator] = {}
    held = 0  # bytes of accumulators alive
    finished: Dict[tuple, LayerStats] = {}
    for keys, sigs in chunks:
        accs = {s: accumulators.setdefault(s, _Accumulator(extractors[s], want_hessian,
                                                           paired=ref is not None))
                for s in sigs}
        held = sum(a.nbytes for a in accumulators.values()) + \
            sum(st.nbytes for st in finished.values())
        names = list(dict.fromkeys(extractors[s].activation for s in sigs))
        exposed = [n for n in names if n not in graph_inputs]
        models = [handle] if ref is None else [handle, ref]
        if runners is not None:
            sources = [runner.batches(names) for runner in runners[:len(models)]]
        else:
            sources = [_session_batches(h, exposed, names, types, data, batch_size,
                                        graph_inputs) for h in models]
        for outs in zip(*sources):
            batch_bytes = sum(v.nbytes for got in outs for v in got.values())
            block_peak = 0
            for s, acc in accs.items():
                ex = extractors[s]
                quick = None if want_hessian else [ex.moments(got[ex.activation])
                                                   for got in outs]
                if quick is not None and all(m is not None for m in quick):
                    acc.add_moments(*quick[0], *([quick[1][0]] if len(quick) > 1 else []))
                    continue
                streams = [ex.blocks(got[ex.activation], BLOCK_BYTES, block_dtype)
                           for got in outs]
                for blocks in zip(*streams):  # the same rows of both models, block by block
                    block_peak = max(block_peak, sum(b.nbytes for b in blocks))
                    acc.add(*blocks)
            record.peak_bytes = max(record.peak_bytes, held + batch_bytes + block_peak)
            record.model_runs += len(models)
            done += 1
            if progress is not None:
                progress(done, max(total, done))
            del outs
        del sources
        for s in sigs:
            finished[s] = accumulators.pop(s).finish()
        for key in keys:  # every signature of these keys is finished (this or an earlier chunk)
            result[key] = _combine([finished[s] for s in weight_sigs[key]])
    record.seconds = time.perf_counter() - started
    return result


def run_calibration(session, names: Sequence[str], feed: Mapping[str, np.ndarray],
                    batch: Optional[Mapping[str, np.ndarray]] = None) -> list:
    """``session.run(names, feed)``; when onnxruntime fails, an :class:`InputDataError` naming the
    calibration batch (``batch``, the graph inputs; ``feed`` when not given) and what to do."""
    try:
        return session.run(list(names), dict(feed))
    except Exception as exc:
        raise inputs_error("the calibration inputs", batch if batch is not None else feed, exc,
                           "give real inputs with --calibration, or the sizes the model was "
                           "exported for with --input-shape NAME:DIMS") from None


def _session_batches(handle: ModelHandle, exposed: Sequence[str], names: Sequence[str],
                     types: Mapping[str, int], data: CalibrationSet, batch_size: int,
                     graph_inputs) -> Iterator[Dict[str, np.ndarray]]:
    """``{name: array}`` per batch from one session exposing ``exposed`` (graph inputs are
    taken from the feed)."""
    session = _exposing_session(handle, exposed, types) if exposed else None
    for feed in data.batches(batch_size):
        got = dict(zip(exposed, run_calibration(session, exposed, feed))) if session else {}
        got.update({n: feed[n] for n in names if n in graph_inputs})
        yield got


def _combine(parts: List[LayerStats]) -> LayerStats:
    """Stats of a weight read by several nodes: the rows of all of them stacked."""
    if len(parts) == 1:
        return parts[0]

    def add(attr):
        values = [getattr(p, attr) for p in parts]
        return None if any(v is None for v in values) else sum(values[1:], values[0].copy())

    return LayerStats(in_sq_norms=add("in_sq_norms"), hessian=add("hessian"),
                      count=sum(p.count for p in parts), in_sums=add("in_sums"),
                      group_hessians=add("group_hessians"), group_sums=add("group_sums"),
                      group_rows=sum(p.group_rows for p in parts),
                      ref_sums=add("ref_sums"), cross=add("cross"))


def _chunk(items: List[Tuple[str, List[tuple]]], extractors: Mapping[tuple, _Extractor],
           sizes: Mapping[str, int], graph_inputs, budget: int
           ) -> List[Tuple[List[str], List[tuple]]]:
    """Group weights (graph order) so each chunk exposes at most ``budget`` bytes per batch.

    Each accumulator is computed in exactly one chunk: a weight whose activation was already
    assigned (a K projection after its Q) joins the current chunk at no cost.
    """
    chunks: List[Tuple[List[str], List[tuple]]] = []
    keys: List[str] = []
    sigs: List[tuple] = []
    names: set = set()
    assigned: set = set()
    used = 0
    for key, wsigs in items:
        todo = [s for s in dict.fromkeys(wsigs) if s not in assigned]
        new = {extractors[s].activation for s in todo} - names - set(graph_inputs)
        cost = sum(sizes.get(n, 0) for n in new)
        if keys and todo and used + cost > budget:
            chunks.append((keys, sigs))
            keys, sigs, names, used = [], [], set(), 0
            new = {extractors[s].activation for s in todo} - set(graph_inputs)
            cost = sum(sizes.get(n, 0) for n in new)
        keys.append(key)
        sigs.extend(todo)
        assigned.update(todo)
        names |= new
        used += cost
    if keys:
        chunks.append((keys, sigs))
    return chunks


def _infer_activations(model: onnx.ModelProto, names: Sequence[str],
                       feed: Mapping[str, np.ndarray]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(bytes for one batch, ONNX element type) of each named activation, from one shape
    inference at ``feed``'s concrete shapes.

    An activation whose size stays unknown is taken to be as large as the largest known one;
    one whose type stays unknown is exposed untyped (onnxruntime fills the type in).
    """
    skeleton = _skeleton(model)
    for vi in skeleton.graph.input:
        if vi.name in feed and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            shape.Clear()
            shape.SetInParent()
            for d in np.shape(feed[vi.name]):
                shape.dim.add().dim_value = int(d)
    del skeleton.graph.value_info[:]
    try:
        graph = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False).graph
    except Exception:
        graph = skeleton.graph
    wanted = set(names)
    known: Dict[str, int] = {}
    types: Dict[str, int] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        tt = vi.type.tensor_type
        if vi.name not in wanted or not tt.elem_type:
            continue
        types[vi.name] = tt.elem_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d < 0 for d in dims):
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        known[vi.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    fallback = max(list(known.values()) + [1])
    return {n: known.get(n, fallback) for n in names}, types


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference: large tensors keep dims and type but lose their bytes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in iter_tensors(copy.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) > 256:
            for name in ("float_data", "int32_data", "int64_data", "double_data",
                         "uint64_data", "raw_data"):
                t.ClearField(name)
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value="__onnxprune_stripped__")
    return copy


def _exposing_session(handle: ModelHandle, names: Sequence[str], types: Mapping[str, int]):
    """An onnxruntime session whose outputs are exactly ``names`` (intermediate tensors).

    Only the requested tensors are outputs, and the nodes they do not depend on are left out
    of the session (onnxruntime runs every node of a graph, needed or not): exposing an early
    layer's input costs only the part of the model before it.
    """
    outputs = [onnx.helper.make_tensor_value_info(name, types[name], None)
               if types.get(name) else onnx.ValueInfoProto(name=name) for name in names]
    graph = handle.model.graph
    needed = _needed_nodes(graph, names)
    nodes = [graph.node[i] for i in needed] if len(needed) < len(graph.node) else None
    return _part_session(handle, nodes, outputs)


def _part_session(handle: ModelHandle, nodes: Optional[Sequence[onnx.NodeProto]],
                  outputs: Sequence, inputs: Optional[Sequence] = None):
    """A session of the handle's main graph cut down to ``nodes`` (None: all of them), with
    ``outputs`` (ValueInfoProtos) and, when given, ``inputs`` in place of the graph's (a piece
    fed at its cut points: the full graph's ``value_info`` is dropped with them). The handle's
    proto is changed only while the session is built; its initializers, external data
    included, serve as they are."""
    graph = handle.model.graph
    fields = {"output": list(outputs)}
    if nodes is not None:
        fields["node"] = list(nodes)
    if inputs is not None:
        fields.update(input=list(inputs), value_info=[])
    saved = {}
    for name, items in fields.items():  # detached copies: the fields are cleared below
        saved[name] = [_copy(m) for m in getattr(graph, name)]
        fields[name] = [_copy(m) for m in items]
    try:
        for name, items in fields.items():
            del getattr(graph, name)[:]
            getattr(graph, name).extend(items)
        return open_session(handle)
    finally:
        for name, items in saved.items():
            del getattr(graph, name)[:]
            getattr(graph, name).extend(items)


def _copy(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _needed_nodes(graph: onnx.GraphProto, names: Sequence[str]) -> List[int]:
    """Indices (in graph order) of the nodes that ``names`` depend on. A node with subgraphs
    needs every name its bodies read (outer-scope values included)."""
    wanted = set(names)
    keep = []
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if not any(o in wanted for o in node.output):
            continue
        keep.append(i)
        wanted |= names_read(node)
    return keep[::-1]
