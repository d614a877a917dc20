"""Images as model inputs: how pixels become an input (:class:`ImagePreprocess`) and reading
a folder of image files (PNG/JPEG/BMP, via Pillow, an optional dependency) one file at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from onnxprune.errors import InputDataError, OptionError
from onnxprune.inputs.files import Part
from onnxprune.inputs.signature import InputSpec, type_name


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


def image_parts(folder: Path, files: List[Path], specs: Sequence[InputSpec],
                pre: Optional[ImagePreprocess]) -> List[Part]:
    """One :class:`Part` per image file (read when loaded), for a one-input float model."""
    try:
        import PIL.Image  # optional dependency, checked before any work
        del PIL
    except ImportError:
        raise OptionError(f"calibration folder '{folder}' holds images; reading them needs "
                          "Pillow: pip install onnxprune[images]") from None
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
        raise InputDataError(f"input '{spec.name}' is {type_name(spec)}; calibration images "
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
    def loader(path: Path):
        return lambda limit=None, start=0: {spec.name: _read_image(path, pre, size, channels,
                                                                  spec)}

    return [Part(1, loader(p), p.name) for p in files]


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
