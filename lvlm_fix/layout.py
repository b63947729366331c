"""Image-token layout: which of a row's image tokens form a spatial patch grid, and its shape.

Methods that map attention over image tokens back onto pixels (CARVE) need, per batch row, the
``(rows, cols)`` grid of the image's tokens in row-major order and where that grid starts among
the row's image tokens. That is architecture knowledge, so it lives here (keyed by
``config.model_type``) and not in the method files.

Per family (one image per row; the grid always describes the row's first image):

* ``llava``: ``(image_size / patch_size)^2`` tokens, a square grid (24 x 24 for LLaVA-1.5); with
  ``vision_feature_select_strategy="full"`` the CLS token comes first and is skipped (offset 1).
  The HF CLIP processor resizes the short side and centre-crops, so for a non-square image the
  grid covers the centre square; like CARVE's release, callers stretch it over the whole image.
* ``llava_next``: anyres packs the base-resolution view first, then the high-resolution tiles
  with newline tokens. The grid is the base view: the first ``(image_size / patch_size)^2`` image
  tokens (24 x 24 for LLaVA-NeXT-7B), a resize of the whole image to a square.
* ``qwen2_vl`` / ``qwen2_5_vl``: from ``image_grid_thw`` (patches) and the vision tower's
  ``spatial_merge_size``: ``(h / merge, w / merge)``, all of the image's tokens (CARVE's
  ``image_grid_thw[1:] / 2``). The processor keeps the aspect ratio, so the grid covers the image.
* ``idefics3`` / ``smolvlm``: ``image_seq_len`` tokens per view, a square grid of side
  ``sqrt(image_seq_len)``. With image splitting the row holds the tiles first and the global
  (whole-image) view last; the grid is that global view, i.e. the last ``image_seq_len`` tokens.
* ``gemma3``: ``mm_tokens_per_image`` tokens (256 = 16 x 16), the whole image resized to a square.
* other types: the row's image tokens if their count is a perfect square.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import LvlmFixError

if TYPE_CHECKING:
    from .model import LVLM

__all__ = ["TokenGrid", "image_token_grids"]


@dataclass(frozen=True)
class TokenGrid:
    """The patch grid of one row's image.

    Attributes:
        rows, cols: grid shape; token ``r * cols + c`` of the grid is patch ``(r, c)``.
        offset: index, among the row's image tokens (in sequence order), of the grid's first token.
    """

    rows: int
    cols: int
    offset: int = 0

    @property
    def size(self) -> int:
        return self.rows * self.cols


def image_token_grids(lvlm: LVLM, batch: Any) -> list[TokenGrid]:
    """Per row of ``batch`` (as made by :meth:`LVLM.encode`), the grid of its (first) image.

    Raises:
        LvlmFixError: a row without image tokens, or a layout that does not fit the row.
    """
    counts = (batch["input_ids"] == lvlm.image_token_id).sum(1).tolist()
    for r, n in enumerate(counts):
        if n == 0:
            raise LvlmFixError(f"row {r} of the batch has no image tokens; an image grid needs an image per row")
    layout = _LAYOUTS.get(lvlm.adapter.model_type, _square)
    grids = layout(lvlm, batch, counts)
    for r, (g, n) in enumerate(zip(grids, counts)):
        if g.rows < 1 or g.cols < 1 or g.offset < 0 or g.offset + g.size > n:
            raise LvlmFixError(
                f"row {r}: a {g.rows}x{g.cols} image grid at offset {g.offset} does not fit its {n} image tokens "
                f"({lvlm.adapter.model_type}); the processor settings may not match the model config"
            )
    return grids


# -- per family ----------------------------------------------------------------------------------
def _vision(lvlm: LVLM) -> Any:
    return lvlm.model.config.vision_config


def _llava(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid]:
    v = _vision(lvlm)
    side = v.image_size // v.patch_size
    cls = 1 if getattr(lvlm.model.config, "vision_feature_select_strategy", "default") == "full" else 0
    return [TokenGrid(side, side, cls) for _ in counts]


def _llava_next(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid]:
    v = _vision(lvlm)
    side = v.image_size // v.patch_size
    return [TokenGrid(side, side, 0) for _ in counts]  # the base view comes first


def _qwen(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid]:
    thw = batch.get("image_grid_thw") if hasattr(batch, "get") else None
    if thw is None:
        raise LvlmFixError("the batch has no image_grid_thw; encode it with the model's processor (lvlm.encode)")
    merge = int(_vision(lvlm).spatial_merge_size)
    thw = thw.tolist()
    grids, k = [], 0
    for r, n in enumerate(counts):
        if k >= len(thw):
            raise LvlmFixError(f"row {r}: image_grid_thw has no entry left for this row's image")
        t, h, w = thw[k]
        grids.append(TokenGrid(h // merge, w // merge, 0))
        used = 0
        while used < n and k < len(thw):  # consume every image of this row
            t, h, w = thw[k]
            used += t * h * w // merge**2
            k += 1
    return grids


def _idefics(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid]:
    n = int(getattr(lvlm.processor, "image_seq_len", 0) or 0)
    if n <= 0:  # fall back to the model config: (image_size / patch)^2 / scale_factor^2
        c = lvlm.model.config
        n = (c.vision_config.image_size // c.vision_config.patch_size) ** 2 // c.scale_factor**2
    side = math.isqrt(n)
    # Tiles first, the global view last: the grid is the last n image tokens of the row.
    return [TokenGrid(side, side, max(count - n, 0)) for count in counts]


def _gemma3(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid]:
    side = math.isqrt(int(lvlm.model.config.mm_tokens_per_image))
    return [TokenGrid(side, side, 0) for _ in counts]


def _square(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid]:
    grids = []
    for r, n in enumerate(counts):
        side = math.isqrt(n)
        if side * side != n:
            raise LvlmFixError(
                f"row {r}: cannot lay out {n} image tokens of a {lvlm.adapter.model_type!r} model as a grid; "
                "add the architecture to lvlm_fix.layout"
            )
        grids.append(TokenGrid(side, side, 0))
    return grids


_LAYOUTS: dict[str, Callable[[Any, Any, list[int]], list[TokenGrid]]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "idefics3": _idefics,
    "smolvlm": _idefics,
    "gemma3": _gemma3,
}
