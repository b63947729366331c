"""HGAI: heads-guided attention intervention, "Devils in Middle Layers of Large Vision-Language Models"
(Jiang, Chen, Zhu, Luo, Shen, Yang, CVPR 2025).

The paper finds that the middle layers ("visual information enrichment", 5..18 of LLaVA-1.5-7B)
decide whether an object is hallucinated, and that heads disagree there on where to look in the
image. HGAI pulls every head towards the image keys that the heads attend to on average: in the
edited layers, on the pre-softmax logits of the **last query row only** (the position that picks
the next token: the last prompt token at the prefill, the new token at each decode step),

    z[h, k] <- z[h, k] + alpha * mean_h' |z[h', k]|      for every image key k of the row, every head h.

The boost of a key is the same for every head (the head-mean of the absolute logits); other query
rows and keys are unchanged, so the prompt's KV is the model's own.

Defaults and sources (ZhangqiJiang07/middle_layers_indicating_hallucinations ``a0622a9``):
``alpha = 0.5`` (``chair_eval.py --alpha``, README); layers ``5 .. 18`` inclusive: the script's
``--guide-range 5,18`` is turned into ``[5, 19)`` by its ``end += 1`` and run as ``range(5, 19)``
(its output file names ``layers_5-19``); the README's "5-18 layers" agrees. A port that runs
``range(5, 18)`` (5..17) is one layer short; lvlm-fix follows the script, 5..18. Aggregation
"mean", the script's default (``--aggregation``; no other aggregation is offered).

Decisions against the release, all on purpose:

* Image keys are read per row from the input ids (the release sets one span, ``img_start``
  after BOS and the system prompt, ``img_end = img_start + 576``, for a batch of one). A row
  without an image token is not edited (the release would boost whatever text sat in that span).
* Other depths: the default is ``5 .. 18`` of 32 scaled to the depth ``L``: ``round(5 L / 32) ..
  round(19 L / 32) - 1`` (half up, at least one layer), so 32 layers give 5..18 and 40 layers
  6..23. The release ships LLaVA-1.5-7B's range only and calls it model-specific; ``layers`` sets
  it explicitly.
* Only unmasked image keys enter the mean and get the boost (a key hidden from the query by a
  window stays hidden; the release's image keys are always visible to the last query, so this is
  the same there).
* The attention of the edited layers runs in fp32 on lvlm-fix's eager path (the release: the
  model's fp16, its patched LLaMA forward).

Composes with every method; with PAI (also an edit of the last row's image logits) the two edits
apply in name order: HGAI's boost first, PAI's ``z + alpha |z|`` on the boosted logits.
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

__all__ = ["HGAI", "HGAIConfig", "default_layers", "guide_heads"]


def default_layers(n_layers: int) -> list[int]:
    """The release's ``5 .. 18`` of 32 layers at depth ``n_layers``.

    ``round(5 L / 32) .. round(19 L / 32) - 1``, half up, at least one layer: ``5..18`` for 32, ``6..23``
    for 40, ``1..4`` for 8.
    """
    lo = math.floor(5 * n_layers / 32 + 0.5)
    hi = max(lo + 1, math.floor(19 * n_layers / 32 + 0.5))
    return list(range(min(lo, n_layers - 1), min(hi, n_layers)))


def guide_heads(scores: Tensor, image_keys: Tensor, alpha: float) -> Tensor:
    """``z[h, k] += alpha * mean_h' |z[h', k]|`` on the last query row's image keys, in place.

    Args:
        scores: ``[b, h, q, k]`` pre-softmax logits, mask added (masked entries hold the dtype minimum).
        image_keys: ``[b, k]`` True at the row's image keys.
        alpha: the guidance strength.
    """
    last = scores[:, :, -1, :]  # [b, h, k], a view: edited in place
    # A key is masked for every head alike; a masked one is neither averaged nor boosted.
    keys = image_keys & (last > torch.finfo(last.dtype).min / 2).all(1)  # [b, k]
    boost = last.abs().mean(1).mul_(alpha).masked_fill_(~keys, 0.0)  # [b, k]: one boost per key, every head
    last.add_(boost[:, None, :])
    return scores


@dataclass(frozen=True, kw_only=True)
class HGAIConfig(MethodConfig):
    """HGAI's parameters."""

    alpha: float = param(0.5, (
        "Adds alpha times the head-mean of the absolute pre-softmax logits to every head's logit on each image "
        "key, last query row only, in the edited layers; 0 runs the edit and changes nothing. Default 0.5 "
        "(source: Devils-in-Middle-Layers release chair_eval.py --alpha and README)."), lo=0.0)
    layers: tuple[int, ...] | None = param(None, (
        "Decoder layers edited, 0-based, negative counting from the end; [] for none. None: the release's 5..18 "
        "of 32 scaled to the depth L, round(5L/32) .. round(19L/32)-1 (40 layers: 6..23). Default None "
        "(source: release chair_eval.py --guide-range 5,18 with end += 1, run as range(5, 19))."))

    @classmethod
    def noop(cls) -> HGAIConfig:
        """No layer: nothing is installed."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> HGAIConfig:
        """``alpha = 0``: the boost is computed and is exactly 0."""
        return cls(alpha=0.0)


@register_method
class HGAI(Intervention):
    """HGAI: the last query's image-key logits raised by alpha times their head-mean absolute value."""

    name = "hgai"
    stage = Stage.ATTENTION_SCORES
    config_cls = HGAIConfig
    config: HGAIConfig

    def __init__(self, config: HGAIConfig | None = None) -> None:
        super().__init__(config)
        self._image_count: Tensor | None = None  # [b] image tokens per row, for the report
        self.calls = 0

    def bind(self, lvlm: LVLM) -> None:
        n = lvlm.num_layers
        self.eager_layers = resolve_layers(self.config.layers, default_layers(n), n)

    def begin(self, tokens: TokenState) -> None:
        self._image_count = tokens.image_mask[:, : tokens.prompt_len].sum(1)
        self.calls = 0

    def edits(self, ctx: AttnContext) -> bool:
        # Only the forward's last query is edited: at a long prefill, the chunk that holds it.
        return ctx.has_last_query

    def pre_softmax(self, scores: Tensor, ctx: AttnContext) -> Tensor:
        if not ctx.has_last_query:
            return scores
        if not ctx.stats_pass:
            self.calls += 1
        return guide_heads(scores, ctx.image_keys, self.config.alpha)

    def report(self) -> dict[str, Any]:
        """Layers, alpha, per row of the last sequence its image keys; ``calls``: the (layer, forward)
        calls of the edit in that sequence."""
        out: dict[str, Any] = {"layers": sorted(self.eager_layers), "alpha": self.config.alpha, "calls": self.calls}
        if self._image_count is not None:
            out["image_keys"] = self._image_count.cpu().tolist()
        return out
