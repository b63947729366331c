"""Image-token layout: which of a row's image tokens form a spatial patch grid, and its shape.

Methods and figures that map something over image tokens back onto pixels (CARVE's masks, the
``heads`` sink figure) need, per batch row, the ``(rows, cols)`` grid of the image's tokens in
row-major order and where that grid starts among the row's image tokens. It is read from what the
processor produced for *this* batch and from the model config, never guessed from a token count
alone when the processor says more. The first rule that applies wins (one image per row; the grid
describes the row's first image):

* ``token_grid`` of the adapter (``wrap(..., adapter={"token_grid": (rows, cols, offset)})``): a
  grid the user declares for a family the rules below do not know; the same for every row.
* ``image_grid_thw`` in the batch (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, PaddleOCR-VL, ... any
  family whose processor returns it): ``(h / merge, w / merge)`` with the vision config's merge
  size, all of the image's tokens. The processor keeps the aspect ratio, so portrait and landscape
  images get their own grids.
* ``image_sizes`` in the batch, no anyres pinpoints (Pixtral: Mistral3, LightOnOCR): the image's
  resized ``(H / patch / merge, W / patch / merge)``; Pixtral's row-break tokens are not image
  tokens, so the grid is the row's image tokens in order.
* anyres (``image_grid_pinpoints`` in the config: LLaVA-NeXT and relatives): the base view, a
  resize of the whole image to a square, which comes first: ``(image_size / patch)^2`` tokens.
  The high-resolution tiles and their newline tokens follow it.
* Idefics3 / SmolVLM (the processor's ``image_seq_len``): ``image_seq_len`` tokens per view, a
  square; with image splitting the row holds the tiles first and the global (whole-image) view
  last, and the grid is that global view, i.e. the last ``image_seq_len`` tokens.
* ``mm_tokens_per_image`` in the config (Gemma 3): that many tokens, a square, the whole image.
* LLaVA with ``vision_feature_select_strategy="full"``: the CLS token comes first and is skipped.
* otherwise: the row's image tokens when their count is a perfect square (a square ViT patch
  grid, e.g. LLaVA-1.5's 24 x 24), else a clear error naming the family and the count.

Where the processor centre-crops (the CLIP processor of LLaVA), the grid covers the centre square;
callers stretch it over the whole image, as CARVE's release does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
    counts = lvlm.image_token_mask(batch["input_ids"]).sum(1).tolist()
    for r, n in enumerate(counts):
        if n == 0:
            raise LvlmFixError(f"row {r} of the batch has no image tokens; an image grid needs an image per row")
    grids = next(g for rule in _RULES if (g := rule(lvlm, batch, counts)) is not None)
    for r, (g, n) in enumerate(zip(grids, counts)):
        if g.rows < 1 or g.cols < 1 or g.offset < 0 or g.offset + g.size > n:
            raise LvlmFixError(
                f"row {r}: a {g.rows}x{g.cols} image grid at offset {g.offset} does not fit its {n} image tokens "
                f"({lvlm.adapter.model_type}); the processor settings may not match the model config"
            )
    return grids


# -- rules, in order ------------------------------------------------------------------------------
def _declared(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    grid = lvlm.adapter.token_grid
    return None if grid is None else [TokenGrid(*grid) for _ in counts]


def _vision(lvlm: LVLM) -> Any:
    return getattr(lvlm.model.config, "vision_config", None) or lvlm.model.config


def _merge_size(lvlm: LVLM, batch: Any = None) -> int:
    sizes = batch.get("image_merge_sizes") if hasattr(batch, "get") else None  # per image (VideoLLaMA3)
    if sizes is not None:
        return int(sizes.flatten()[0])
    v = _vision(lvlm)
    merge = getattr(v, "spatial_merge_size", None) or getattr(v, "merge_size", None) or \
        getattr(lvlm.model.config, "spatial_merge_size", None) or getattr(v, "merge_kernel_size", None) or 1
    return int(merge[0] if isinstance(merge, (list, tuple)) else merge)


def _from_grid_thw(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    thw = batch.get("image_grid_thw") if hasattr(batch, "get") else None
    if thw is None:
        return None
    merge = _merge_size(lvlm, batch)
    thw = thw.tolist()
    one_each = len(thw) == len(counts)  # one image per row; otherwise rows hold several, in order
    grids, k = [], 0
    for r, n in enumerate(counts):
        if k >= len(thw):
            raise LvlmFixError(f"row {r}: image_grid_thw has no entry left for this row's image")
        t, h, w = thw[k]
        grids.append(TokenGrid(h // merge, w // merge, 0))
        used = 0
        while k < len(thw) and (used == 0 or (not one_each and used < n)):  # consume this row's images
            t, h, w = thw[k]
            used += t * h * w // merge**2
            k += 1
        if used != n:
            raise LvlmFixError(
                f"row {r}: its {n} image tokens are not whole image_grid_thw grids ({used} cells): the "
                f"{lvlm.adapter.model_type!r} processor adds separator tokens whose places lvlm_fix.layout does not know")
    return grids


def _from_image_sizes(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    sizes = batch.get("image_sizes") if hasattr(batch, "get") else None
    if sizes is None or getattr(lvlm.model.config, "image_grid_pinpoints", None):
        return None
    patch = getattr(_vision(lvlm), "patch_size", None)
    if not isinstance(patch, int):
        return None
    step = patch * _merge_size(lvlm)
    sizes = sizes.tolist()
    if len(sizes) != len(counts):  # one image per row is what this rule reads
        return None
    return [TokenGrid(int(h) // step, int(w) // step, 0) for h, w in sizes]


def _anyres_base_view(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    v = _vision(lvlm)
    if not getattr(lvlm.model.config, "image_grid_pinpoints", None) or not hasattr(v, "image_size"):
        return None
    side = v.image_size // v.patch_size
    return [TokenGrid(side, side, 0) for _ in counts]  # the base view comes first


def _idefics_global_view(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    c = lvlm.model.config
    if c.model_type not in _GLOBAL_VIEW_LAST:
        return None
    n = int(getattr(lvlm.processor, "image_seq_len", 0) or 0)
    if n <= 0:  # no processor: (image_size / patch)^2 / scale_factor^2 from the config
        n = (c.vision_config.image_size // c.vision_config.patch_size) ** 2 // c.scale_factor**2
    if n <= 0 or math.isqrt(n) ** 2 != n:
        return None
    side = math.isqrt(n)
    # Tiles first, the global view last: the grid is the last n image tokens of the row.
    return [TokenGrid(side, side, max(count - n, 0)) for count in counts]


def _tokens_per_image(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    n = getattr(lvlm.model.config, "mm_tokens_per_image", None)
    if not isinstance(n, int) or math.isqrt(n) ** 2 != n:
        return None
    side = math.isqrt(n)
    return [TokenGrid(side, side, 0) for _ in counts]


def _not_spatial(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    why = _NOT_SPATIAL.get(lvlm.adapter.model_type)
    if why is not None:
        raise LvlmFixError(f"the image tokens of a {lvlm.adapter.model_type!r} model are not a patch grid: {why}")
    return None


def _square(lvlm: LVLM, batch: Any, counts: list[int]) -> list[TokenGrid] | None:
    full = getattr(lvlm.model.config, "vision_feature_select_strategy", "default") == "full"
    cls = 1 if full and getattr(_vision(lvlm), "model_type", "") in _CLS_TOWERS else 0  # "full" keeps CLIP's CLS
    grids = []
    for r, n in enumerate(counts):
        side = math.isqrt(n - cls)
        if side * side != n - cls:
            keys = sorted(k for k in batch if k not in ("input_ids", "attention_mask")) if hasattr(batch, "keys") else []
            raise LvlmFixError(
                f"row {r}: cannot lay out the {n} image tokens of a {lvlm.adapter.model_type!r} model as a grid: they "
                f"are not a square, and its processor's output ({', '.join(keys) or 'no image tensors'}) does not "
                "give the grid; lvlm_fix.layout reads image_grid_thw, image_sizes, anyres pinpoints, image_seq_len "
                "and mm_tokens_per_image"
            )
        grids.append(TokenGrid(side, side, cls))
    return grids


# Vision towers that prepend a class token to their patch tokens.
_CLS_TOWERS = frozenset({"clip_vision_model"})
# Families whose processor puts the whole-image view after its tiles.
_GLOBAL_VIEW_LAST = frozenset({"idefics3", "smolvlm"})
# Families whose image tokens are learned queries, not patches, whatever their count.
_NOT_SPATIAL = {
    "idefics2": "they are the latents of a perceiver resampler",
    "aria": "they are the queries of a cross-attention projector",
}

_RULES: tuple[Callable[[Any, Any, list[int]], list[TokenGrid] | None], ...] = (
    _declared, _from_grid_thw, _from_image_sizes, _anyres_base_view, _idefics_global_view, _tokens_per_image, _not_spatial,
    _square,
)
