"""PAI: Paying More Attention to Image (Liu, Zheng, Chen, ECCV 2024).

"Text inertia": an LVLM often writes the same description with or without the image. PAI has two
parts, each optional:

* **Attention amplification.** In layers ``2 .. L-1``, the pre-softmax attention logits that the
  newest query puts on the row's image tokens are pushed away from zero, keeping their sign:
  ``z <- z + alpha |z|`` (all heads; the last query row only: at the prefill the last prompt
  token, at each decode step the new token; other prompt rows are never edited).
* **Guidance against the text-only rows.** The same rows with their image tokens deleted are
  decoded beside the main rows (their own cache, attention not amplified, as in the release), and
  classifier-free guidance is applied to the next-token distribution with an adaptive
  plausibility cut::

      logits = gamma * log p(image) - (gamma - 1) * log p(no image)
      logits[k] = -inf  where  p(k) < beta * max p     (main stream, before the warpers)

  Inside ``generate()`` the guidance runs where the release runs its ``CFGLogits``, as a logits
  processor: after ``generate()``'s own processors (a repetition penalty, say) and any passed to
  it, on the processed main scores, before the sampling warpers; the text-only rows' logits are
  the model's own. In beam search the scores are the release's exactly; in greedy decoding and
  sampling they are shifted by a per-row constant (:func:`pai_guidance`), so that a null
  contrast returns the main logits exactly: the same probabilities, the same tokens. A forward's
  logits (a plain forward, ``output_logits``) hold the guidance of the raw logits, before any
  processor. ``gamma = 1`` runs no guidance (as the release, which then skips the cut too).

Decisions against the release (LALBJ/PAI ``9bbd8bd``):

* Release bug: with guidance on, the prefill is never amplified (the layers start in "guidance"
  mode and are switched back only after the first guidance call), so the first generated token,
  POPE's whole answer, gets guidance only. Here the prefill is amplified like every step;
  ``release_compat=true`` reproduces the release (no amplification at the prefill when guidance
  is on).
* The image keys come per row from the input ids (the release shares row 0's span with the
  batch), the text-only rows have their own attention mask (the release passes none), and under
  beam search their cache follows the beams (the release never reorders it).
* Layers: the release edits ``[2, 32)`` of 32; here ``[2, L)`` for any depth L, i.e. all but the
  first two, as the release does. Masked keys (padding, outside a sliding window) stay masked.

Defaults: ``alpha = 0.2`` (README and parsers), ``gamma = 1.1`` (README, every command; the parser
default is 2), ``beta = 0.1`` (hard-coded in the release's guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..hooks.contrast import plausibility_cut, rows_without_images
from .base import Stage, param, resolve_layers
from .contrastive import ContrastConfig, ContrastiveMethod
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.plan import AttnContext
    from ..model import LVLM

__all__ = ["PAI", "PAIConfig", "amplify_image_attention", "default_layers", "pai_guidance"]


def default_layers(n_layers: int) -> list[int]:
    """Layers ``2 .. L-1``: all but the first two (the release's ``[2, 32)`` on 32 layers)."""
    return list(range(2, n_layers))


def amplify_image_attention(scores: Tensor, image_keys: Tensor, alpha: float) -> Tensor:
    """``z <- z + alpha |z|`` on the last query row's image keys, in place.

    Args:
        scores: ``[b, h, q, k]`` pre-softmax logits, mask added (masked entries hold the dtype minimum).
        image_keys: ``[b, k]`` True at the row's image keys.
        alpha: the amplification.
    """
    last = scores[:, :, -1, :]  # [b, h, k], a view: edited in place
    unmasked = last > torch.finfo(last.dtype).min / 2  # a masked key must stay masked even for alpha >= 1
    boost = last.abs().mul_(alpha).masked_fill_(~(image_keys[:, None, :] & unmasked), 0.0)
    last.add_(boost)
    return scores


def pai_guidance(main: Tensor, text: Tensor, gamma: float, beta: float, *, log_probs: bool = False) -> Tensor:
    """PAI's guidance of ``main`` ``[n, V]`` (fp32) by the text-only rows' logits ``text``, with the cut.

    With ``s``, ``u`` the log-softmaxes of ``main`` and ``text``: ``log_probs=True`` gives the
    release's ``gamma (s - u) + u`` (its ``CFGLogits``, what beam search adds to the beams' scores);
    otherwise ``main + (gamma - 1) (s - u)``, the same up to a per-row constant (every token's
    probability is the same), which returns ``main`` exactly when ``text == main``. Tokens whose
    ``main`` probability is below ``beta`` times the top one's get ``-inf``.
    """
    s, u = main.log_softmax(-1), text.log_softmax(-1)
    out = gamma * (s - u) + u if log_probs else main + (gamma - 1.0) * (s - u)
    return plausibility_cut(out, main, beta)


@dataclass(frozen=True, kw_only=True)
class PAIConfig(ContrastConfig):
    """PAI's parameters."""

    alpha: float = param(0.2, (
        "Attention amplification z <- z + alpha|z| on the newest query's image keys, layers 2..L-1, all heads; "
        "0 edits no layer. Default 0.2 (source: PAI release README and parsers, --alpha)."), lo=0.0)
    gamma: float = param(1.1, (
        "Guidance: gamma log p(image) - (gamma - 1) log p(no image), after generate()'s processors; 1 runs no "
        "text-only stream and no cut. "
        "Default 1.1 (source: PAI release README, every command; the parser default is 2)."), lo=0.0)
    beta: float = param(0.1, (
        "Adaptive plausibility cut of the guidance: tokens with main-stream probability below beta times the top "
        "one's get -inf, before temperature/top-k/top-p; 0 cuts nothing. Default 0.1 (source: PAI release, CFG.py, "
        "hard-coded)."), lo=0.0, hi=1.0)
    layers: tuple[int, ...] | None = param(None, (
        "Decoder layers amplified, 0-based, negative counting from the end; [] for none. None: 2..L-1, all but "
        "the first two. Default None (source: PAI release, start_layer=2, end_layer=32 of 32)."))
    release_compat: bool = param(False, (
        "Reproduce the release's bug: with guidance on (gamma != 1), the prefill (the first generated token) is "
        "not amplified. Default False (source: lvlm-fix, which amplifies every step, as the paper describes)."))

    @classmethod
    def noop(cls) -> PAIConfig:
        """``alpha = 0`` and ``gamma = 1``: no layer edited, no text-only stream."""
        return cls(alpha=0.0, gamma=1.0)

    @classmethod
    def math_identity(cls) -> PAIConfig:
        """The guidance stream runs on the main rows themselves, no cut: ``l + (log p - log p) = l`` exactly."""
        return cls(alpha=0.0, gamma=2.0, beta=0.0, null_contrast=True)


@register_method
class PAI(ContrastiveMethod):
    """PAI: image-attention amplification and guidance against the rows without the image."""

    name = "pai"
    stage = Stage.ATTENTION_SCORES  # its guidance is a contrastive method's, at the logits
    config_cls = PAIConfig
    config: PAIConfig
    contrast_kind = "no image"
    combines_after_processors = True  # the release's guidance is a logits processor (CFGLogits)

    def contrast_active(self) -> bool:
        return self.config.gamma != 1

    def bind(self, lvlm: LVLM) -> None:
        n = lvlm.num_layers
        layers = resolve_layers(self.config.layers, default_layers(n), n)
        self.eager_layers = layers if self.config.alpha > 0 else frozenset()
        super().bind(lvlm)
        # The release's bug 1: guidance on leaves the prefill unamplified.
        self.skip_prefill = self.config.release_compat and self.contrast_on

    def edits(self, ctx: AttnContext) -> bool:
        # Only the forward's newest query is amplified: in a chunked prefill, the chunk that holds it.
        return ctx.has_last_query and not (self.skip_prefill and ctx.step == 0)

    def pre_softmax(self, scores: Tensor, ctx: AttnContext) -> Tensor:
        if not self.edits(ctx):
            return scores
        return amplify_image_attention(scores, ctx.image_keys, self.config.alpha)

    def contrast_rows(self, lvlm: LVLM, inputs: dict[str, Any]) -> dict[str, Any]:
        return rows_without_images(lvlm, inputs)

    def combine(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        return pai_guidance(main, contrast, self.config.gamma, self.config.beta)

    def combine_scores(self, scores: Tensor, contrast: Tensor, step: int, *, log_probs: bool) -> Tensor:
        return pai_guidance(scores, contrast, self.config.gamma, self.config.beta, log_probs=log_probs)

    def report(self) -> dict[str, Any]:
        c = self.config
        return {"alpha": c.alpha, "gamma": c.gamma, "beta": c.beta, "layers": sorted(self.eager_layers),
                "prefill_amplified": bool(self.eager_layers) and not self.skip_prefill, **self.stream_report()}
