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
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, LvlmFixWarning

__all__ = ["ImageWarning", "check_image_file", "load_image", "to_rgb"]

MIN_SIDE = 16
MAX_ASPECT = 10.0


class ImageWarning(LvlmFixWarning):
    """An image that loads but is unlikely to be seen well by the model (e.g. 4000 x 50)."""


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a file path (or an image already loaded), ready for a processor.

    Raises:
        InputError: a URL, a missing file, or a file that is not a readable image.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = _local_file(source)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, name=str(path))
    except _UNREADABLE as e:
        raise InputError(f"cannot read image {path}: {type(e).__name__}; pass a PNG or JPEG file") from None


def check_image_file(source: str | Path) -> Path:
    """Check, without decoding the pixels, that ``source`` is a local image file PIL can open.

    Used to refuse a bad row of a batch before any work starts; :func:`load_image` reads it later.
    """
    path = _local_file(source)
    try:
        with Image.open(path) as image:
            image.verify()
    except _UNREADABLE as e:
        raise InputError(f"cannot read image {path}: {type(e).__name__}; pass a PNG or JPEG file") from None
    return path


_UNREADABLE = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


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
    rgb = image.convert("RGB") if image.mode != "RGB" else image
    w, h = rgb.size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        warnings.warn(f"{name} is {w}x{h} pixels: the processor will resize it to the model's input size, which "
                      "distorts or loses detail; results on it may mean little", ImageWarning, stacklevel=3)
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
