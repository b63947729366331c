"""ClearSight: Visual Amplification Fusion (VAF) (Yin, Si, Wang, CVPR 2025).

In a band of middle decoder layers, the pre-softmax attention logits ``z = q k^T / sqrt(d)`` of the
queries that come after the image are **multiplied**, key by key:

* ``z <- enh * z`` on the row's image keys (``enh = 1.15``: the image is "amplified");
* ``z <- sup * z`` on the row's system keys, every valid key before its first image token
  (``sup = 0.95``: the system prompt is "suppressed");
* other keys (the question, generated tokens) unchanged.

Every head; at the prefill the queries after the row's last image token, at each decode step the new
token. Image and system queries are never edited, so the prompt's KV up to the image end is the
model's own. This is a multiplication of **signed** logits, as released, not an additive log-bias:
``softmax`` sees ``exp(enh z)`` on an image key, so with ``enh > 1`` a key with a positive logit
gains weight and a key with a negative logit *loses* weight (``A' ~ exp(z) exp((enh - 1) z)``).

Defaults and sources (ustc-hyin/ClearSight ``5466c94``): ``enh = 1.15``, ``sup = 0.95``
(``infer_pope.sh``, README; the parser defaults are 1.0, a no-op); layers ``9 .. 14`` of 32
(``infer_pope.py``: ``i > 8 and i < 15``, the only released depth, LLaVA-1.5-7B).

Decisions against the release, all on purpose:

* The layout is read per row: system keys = the valid keys before the row's first image token,
  image keys = the row's image tokens, edited queries = those after its last image token (the
  release hard-codes 35 system tokens and 576 image tokens at positions 0..610 of a batch of one,
  which is the same set for LLaVA-1.5 with its ``vicuna_v1`` prompt). Left padding, other
  templates, other image-token counts and batches therefore work. A prompt with several images:
  every image token is an image key, the keys before the first image are the system keys, the
  text between images is neither. A row without an image token is not edited (there is no layout
  to read; the release would scale whatever sat at positions 0..610).
* Other depths: the default band is ``9 .. 14`` of 32 scaled to the model's depth ``L``:
  ``round(9 L / 32) .. round(15 L / 32) - 1`` (half up, at least one layer), so 32 layers give the
  release's 9..14, 40 layers 11..18, 28 layers 8..12. The paper reports other models but the release
  ships no layers for them; ``layers`` sets the band explicitly.
* The release scales before adding the causal mask; here the scores arrive masked, and only the
  entries a query may see are multiplied (never a masked dtype minimum), which is the same thing
  for every key an edited query sees.
* The attention of the edited layers runs in fp32 on lvlm-fix's eager path (the release: the
  model's fp16).

Composes with every method; two score edits compose in order (by name at the same order:
``clearsight+pai`` scales the logits, then PAI amplifies the scaled ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.plan import AttnContext, TokenState
    from ..model import LVLM

__all__ = ["ClearSight", "ClearSightConfig", "default_layers", "scale_logits"]


def default_layers(n_layers: int) -> list[int]:
    """The release's band ``9 .. 14`` of 32 layers at depth ``n_layers``.

    ``round(9 L / 32) .. round(15 L / 32) - 1``, half up, at least one layer: ``9..14`` for 32, ``11..18``
    for 40, ``8..12`` for 28, ``2..3`` for 8.
    """
    lo = math.floor(9 * n_layers / 32 + 0.5)
    hi = max(lo + 1, math.floor(15 * n_layers / 32 + 0.5))
    return list(range(min(lo, n_layers - 1), min(hi, n_layers)))


def scale_logits(scores: Tensor, image_keys: Tensor, system_keys: Tensor, queries: Tensor | None,
                 enh: float, sup: float) -> Tensor:
    """VAF's edit: ``z * enh`` on image keys, ``z * sup`` on system keys, in the chosen query rows.

    Args:
        scores: ``[b, h, q, k]`` pre-softmax logits, mask added (masked entries hold the dtype minimum).
        image_keys: ``[b, k]`` True at the row's image keys.
        system_keys: ``[b, k]`` True at the row's system keys (disjoint from the image keys).
        queries: ``[b, q]`` True at the query rows to edit; None: every row.
        enh, sup: the image-key and system-key factors.

    Returns:
        A new tensor; every other entry, and every masked one, is ``scores``' own.
    """
    factor = torch.where(image_keys, enh, torch.where(system_keys, sup, 1.0)).to(scores.dtype)  # [b, k]
    # A masked entry is left alone: a key hidden from the query (a window, padding) stays hidden,
    # and the minimum is never pushed to -inf.
    edit = scores > torch.finfo(scores.dtype).min / 2
    if queries is not None:
        edit = edit & queries[:, None, :, None]
    return torch.where(edit, scores * factor[:, None, None, :], scores)


@dataclass(frozen=True, kw_only=True)
class ClearSightConfig(MethodConfig):
    """ClearSight's (VAF's) parameters."""

    enh: float = param(1.15, (
        "Multiplies the pre-softmax logits (signed: a negative logit gets more negative) on the row's image keys, "
        "for queries after the image, in the edited layers. Default 1.15 (source: ClearSight release "
        "infer_pope.sh --enh-para and README; the parser default 1.0 is a no-op)."), lo=0.0)
    sup: float = param(0.95, (
        "Multiplies the pre-softmax logits on the row's system keys (the valid keys before its first image "
        "token), for queries after the image, in the edited layers. Default 0.95 (source: ClearSight release "
        "infer_pope.sh --sup-para and README; the parser default 1.0 is a no-op)."), lo=0.0)
    layers: tuple[int, ...] | None = param(None, (
        "Decoder layers edited, 0-based, negative counting from the end; [] for none. None: the release's 9..14 "
        "of 32 scaled to the depth L, round(9L/32) .. round(15L/32)-1 (40 layers: 11..18). Default None "
        "(source: ClearSight release infer_pope.py, layers i > 8 and i < 15 of LLaVA-1.5-7B)."))

    @classmethod
    def noop(cls) -> ClearSightConfig:
        """No layer: nothing is installed."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> ClearSightConfig:
        """``enh = sup = 1``: the layout is read and the logits multiplied by 1 (the release's own no-op)."""
        return cls(enh=1.0, sup=1.0)


@register_method
class ClearSight(Intervention):
    """ClearSight (VAF): image-key logits times enh, system-key logits times sup, for queries after the image."""

    name = "clearsight"
    stage = Stage.ATTENTION_SCORES
    config_cls = ClearSightConfig
    config: ClearSightConfig

    def __init__(self, config: ClearSightConfig | None = None) -> None:
        super().__init__(config)
        self._first_image: Tensor | None = None  # [b] position of each row's first image token
        self._has_image: Tensor | None = None  # [b]
        self._image_count: Tensor | None = None  # [b] image tokens per row, for the report
        self._valid: Tensor | None = None  # [b, prompt] non-padding prompt tokens, for the report
        self.calls = 0

    def bind(self, lvlm: LVLM) -> None:
        n = lvlm.num_layers
        self.eager_layers = resolve_layers(self.config.layers, default_layers(n), n)

    def begin(self, tokens: TokenState) -> None:
        image = tokens.image_mask[:, : tokens.prompt_len]
        self._has_image = image.any(1)
        self._first_image = image.int().argmax(1)  # 0 for a row without image: it then has no system key
        self._image_count = image.sum(1)
        self._valid = tokens.valid[:, : tokens.prompt_len].clone()
        self.calls = 0

    def edits(self, ctx: AttnContext) -> bool:
        # At the prefill only queries after the image are edited: a long prompt's chunks of system and
        # image queries stay on sdpa.
        return ctx.step != 0 or bool(ctx.queries_after_image.any())

    def pre_softmax(self, scores: Tensor, ctx: AttnContext) -> Tensor:
        first = self._first_image.to(scores.device)
        # Keys by absolute position, so that a cache that dropped its oldest keys (a window) maps right.
        system = ctx.key_valid & (ctx.key_positions[None, :] < first[:, None])
        queries = ctx.queries_after_image if ctx.step == 0 else None  # a decode query is after the image
        if not ctx.stats_pass:
            self.calls += 1
        return scale_logits(scores, ctx.image_keys, system, queries, self.config.enh, self.config.sup)

    def report(self) -> dict[str, Any]:
        """Layers, factors, and per row of the last sequence its system and image keys; ``calls``:
        the (layer, forward, query chunk) calls of the edit in that sequence."""
        out: dict[str, Any] = {"layers": sorted(self.eager_layers), "enh": self.config.enh, "sup": self.config.sup,
                               "calls": self.calls}
        if self._first_image is not None:
            positions = torch.arange(self._valid.shape[1], device=self._valid.device)
            system = (self._valid & (positions[None, :] < self._first_image[:, None])).sum(1)
            out["system_keys"] = system.cpu().tolist()
            out["image_keys"] = self._image_count.cpu().tolist()
        return out
