"""The one image loader: every path that reads an image (``run``, ``heads``, jsonl rows, the evals,
the testbed) goes through :func:`load_image`, so every image reaches the model the same way.

What it does that a bare ``Image.open(p).convert("RGB")`` does not:

* applies the EXIF orientation (a phone photo taken upright is shown upright);
* scales 16-bit and 32-bit greyscale to 8 bits (PIL's ``convert`` clips them, so a 16-bit PNG
  would arrive all white) and float images from [0, 1];
* composites transparency on white (``convert`` would drop the alpha channel and show whatever
  colour the transparent pixels happen to hold);
* warns about extreme sizes (a side under 16 px, or an aspect ratio over 10:1), which the
  processor resizes into something the model has never seen;
* refuses URLs and unreadable files with one line naming the file and the fix.

Images already in memory take the same road: a PIL image (as ``Image.open`` gives it: 16-bit, EXIF,
alpha) through the same conversion, and arrays and tensors by these rules, so the processor always
receives 8-bit RGB and rescales it exactly once:

* layout ``H x W`` (greyscale), ``H x W x C`` or ``C x H x W`` with C in 1, 3, 4 (a torch tensor is read
  channels-first when its first dimension is 1, 3 or 4, as torchvision writes it; a numpy array
  channels-last when its last one is, as PIL and imageio write it);
* floats are values in [0, 1] (torchvision's ``to_tensor``), scaled by 255 here and not again by the
  processor; a float outside [0, 1] or not finite is refused rather than guessed at;
* integers up to 255 are 8-bit, uint16 or up to 65535 16-bit (scaled as a 16-bit PNG), booleans 0 or 255;
  negative or larger values, an empty array, or another shape are refused with one line.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, LvlmFixWarning

__all__ = ["ImageWarning", "check_image_file", "load_image", "to_rgb"]

MIN_SIDE = 16
MAX_ASPECT = 10.0


class ImageWarning(LvlmFixWarning):
    """An image that loads but is unlikely to be seen well by the model (e.g. 4000 x 50)."""


def load_image(source: Any) -> Image.Image:
    """An RGB PIL image from a file path, a PIL image, an array or a tensor, ready for a processor
    (see the module docstring for the rules).

    Raises:
        InputError: None, a URL, a missing file, a file that is not a readable image, or an array
            that is not an image by the rules.
    """
    if isinstance(source, Image.Image):
        return source if source.info.get(_DONE) and source.mode == "RGB" else to_rgb(source)
    if source is None:
        raise InputError("image is None; pass a PIL image, an image file path, an array or a tensor")
    if not isinstance(source, (str, Path)):
        return _from_array(source)
    path = _local_file(source)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, name=str(path))
    except _UNREADABLE as e:
        raise InputError(f"cannot read image {path}: {type(e).__name__}; pass a PNG or JPEG file") from None


def check_image_file(source: str | Path) -> Path:
    """Check that ``source`` is a local image file PIL can read whole (the pixels are decoded: a
    truncated JPEG passes a header check and fails only when a later batch reads it).

    Used to refuse a bad row of a batch before any work starts; :func:`load_image` reads it later.
    """
    path = _local_file(source)
    try:
        with Image.open(path) as image:
            image.load()
    except _UNREADABLE as e:
        raise InputError(f"cannot read image {path}: {type(e).__name__}; pass a PNG or JPEG file") from None
    return path


_UNREADABLE = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)
_DONE = "lvlm_fix_rgb"  # set in a converted image's info: converting it again would only repeat the warnings


def _from_array(source: Any) -> Image.Image:
    """A numpy array or torch tensor as an image, by the rules of the module docstring."""
    import numpy as np

    kind = type(source).__name__
    channels_first = False
    if hasattr(source, "detach") and hasattr(source, "cpu"):  # a torch tensor, without importing torch
        source = source.detach().cpu()
        if str(source.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            source = source.float()
        source = source.numpy()
        channels_first = True
    if not isinstance(source, np.ndarray):
        raise InputError(f"an image of type {kind} cannot be read; pass a PIL image, an image file path, a numpy "
                         "array or a torch tensor")
    a = source
    if a.ndim == 3 and channels_first and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    elif a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size == 0 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise InputError(f"the {kind} of shape {tuple(source.shape)} is not an image; give H x W, H x W x C or "
                         "C x H x W with C = 1, 3 or 4")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError(f"a float {kind} image must hold values in [0, 1] (it holds {np.nanmin(a):g} to "
                             f"{np.nanmax(a):g}); divide by 255, or pass uint8")
        a = (a.astype(np.float64) * 255).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        low, high = int(a.min()), int(a.max())
        if low < 0 or high > 65535:
            raise InputError(f"an integer {kind} image must hold values in 0..255 (8-bit) or 0..65535 (16-bit); it "
                             f"holds {low} to {high}")
        sixteen = a.dtype == np.uint16 or high > 255  # a uint16 array is 16-bit data even when dark
        scale = 255 / 65535 if sixteen else 1.0
        a = (a.astype(np.float64) * scale).round().astype(np.uint8)
    else:
        raise InputError(f"the {kind} of dtype {a.dtype} is not an image; pass uint8 values or floats in [0, 1]")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1] if a.ndim == 3 else 2]
    return to_rgb(Image.fromarray(np.ascontiguousarray(a), mode=mode), name=f"the {kind} image")


def _local_file(source: str | Path) -> Path:
    text = str(source)
    if "://" in text:
        raise InputError(f"image {text!r} is a URL; lvlm-fix reads local files: download it first (e.g. curl -O URL)")
    path = Path(text).expanduser()
    if not path.is_file():
        raise InputError(f"image not found: {path}; pass an existing image file")
    return path


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """``image`` upright, 8-bit, RGB, transparency on white (see the module docstring)."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _greyscale_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    rgb = image.convert("RGB") if image.mode != "RGB" else image.copy()  # a copy: the caller's image is not marked
    w, h = rgb.size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        warnings.warn(f"{name} is {w}x{h} pixels: the processor will resize it to the model's input size, which "
                      "distorts or loses detail; results on it may mean little", ImageWarning, stacklevel=3)
    rgb.info[_DONE] = True
    return rgb


def _greyscale_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer greyscale scaled by its bit depth, float greyscale from [0, 1] (or clipped)."""
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
    else:  # 16-bit data (also when PIL reads it as 32-bit "I"); 32-bit data beyond that
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 / 65535.0 if peak <= 65535 else 255.0 / (2**32 - 1)
    return Image.fromarray(np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8), mode="L")
