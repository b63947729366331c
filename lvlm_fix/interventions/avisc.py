"""AvisC: Attentional Vision Calibration (Woo et al., "Don't Miss the Forest for the Trees", arXiv 2405.17820).

A few image tokens draw most of the attention of the last query whatever the image shows
(*blind* tokens). AvisC decodes, beside the normal rows, the same rows in which every image token
*except* the blind ones is erased from the input embeddings, and contrasts the two as VCD does.
At the prefill, from the main rows' attention of the last prompt position ``A^l[h, -1, :]``:

1. layer weights ``w_l = sum_{k in image} mean_h A^l[h, -1, k]``, normalised over layers;
2. the top ``K`` layers by weight, ``K = 1 + #{j : cumsum(sorted w, descending)_j < layer_gamma}``;
3. per image token ``a_k = mean over those layers of mean_h A^l[h, -1, k]``;
4. ``tau = mean(a) + lamb * std(a)`` (unbiased std): blind tokens are ``a_k >= tau``;
5. the contrast rows are the main rows with the input embeddings of the image tokens with
   ``a_k < tau`` set to 0 (``masking_scheme``: zeros; ones, noise); their KV cache carries the
   edit to every later step;

then at every step ``logits = (1 + alpha) l - alpha l_blind``, with ``-inf`` where the main stream's
probability is below ``beta`` times the top one's, before ``generate()``'s processors and warpers.

Defaults: ``alpha = 1`` and ``beta = 0.1`` (the release's sampler and parser; its POPE runs use
alpha 1, its AMBER script 2.5); ``layer_gamma = 0.5`` (parser and every script); ``lamb = 1.0``
(the POPE, AMBER and MME scripts; the parser's default is 0.99); ``masking_scheme = "zeros"``.

Differences from the release (sangminwoo/AvisC ``772eba4``), all on purpose:

* Greedy decoding and beam search apply AvisC too. The release replaces only the sampling loop:
  with ``do_sample=False`` or beams it silently decodes without AvisC.
* Per row at any batch size. The release pools the layer weights, the mean and std of the
  threshold over the batch and edits row 0 alone, with every row's indices; it also reads the
  image at the fixed positions 35..610 (wrong under left padding). Here image positions come from
  each row's ``input_ids`` (left padding, any image-token count); rows expanded for beams or
  ``num_return_sequences`` carry their own (identical) selection.
* The attention read is the fp32 row of the attention the main rows use (the release reads its
  fp16 eager maps; with attention methods composed, this is the attention after their edits).
* The vision tower is not run again for the contrast rows: they reuse the main rows' image
  features, which is what the release's second pass recomputes; the edit acts after the
  projection, as the release's does.
* ``masking_scheme="noise"`` draws ``N(0, 1)`` per image from a generator seeded by that image's
  embeddings and ``noise_seed`` (the same image gets the same noise in any batch; the global RNG
  that sampling uses is untouched); the release draws from the global RNG, unseeded. An image is
  a run of consecutive image tokens.
* ``K`` is at most the number of layers (the release's ``topk`` fails when ``layer_gamma`` near 1
  counts every layer). A row without image tokens is not edited: its contrast equals its main
  rows, and the combination returns its logits unchanged.
* The release replaces contrast logits that hold a NaN by the main logits (an fp16 guard):
  kept behind ``release_compat`` (per row here).
* ``masking_scheme="keep"`` is lvlm-fix's own: the edit runs and writes the rows back, the
  identity check of the embedding edit. An unknown scheme is refused (the release falls back to
  zeros).

Composes with the methods of the other stages (the attention it reads is the one their edits
leave); a second contrast stream (``vcd+avisc``) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import LvlmFixError
from .base import param
from .contrastive import ContrastiveMethod, LinearContrastConfig, cut_param, strength_param
from .registry import register_method
from .vcd import _image_seed

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.plan import AttnContext, TokenState
    from ..model import LVLM

__all__ = ["AvisC", "AvisCConfig", "BlindSelection", "select_blind_tokens"]


@dataclass
class BlindSelection:
    """What the prefill's attention picked, per row (``b`` rows, ``L`` layers, ``k`` prompt positions)."""

    weights: Tensor  # [b, L] layer weights normalised over layers (0 for a row without image)
    layers: list[list[int]]  # per row: the chosen layers, heaviest first
    scores: list[Tensor]  # per row: a_k of its image tokens, in position order
    tau: list[float]  # per row: the threshold mean(a) + lamb * std(a) (nan without image)
    masked: Tensor  # [b, k] True at the image tokens whose embeddings the contrast rows edit (a_k < tau)

    @property
    def blind(self) -> list[int]:
        """Per row: how many image tokens are blind (kept in the contrast rows)."""
        return [len(s) - int(m.sum()) for s, m in zip(self.scores, self.masked)]


def select_blind_tokens(maps: Tensor, image: Tensor, layer_gamma: float, lamb: float) -> BlindSelection:
    """The blind-token selection from ``maps [L, b, k]`` (per layer, the head mean of the last query's
    attention over the prompt's keys) and ``image [b, k]`` (True at image tokens), row by row."""
    n_layers, b, _ = maps.shape
    weights = maps.new_zeros(b, n_layers)
    masked = torch.zeros_like(image, dtype=torch.bool)
    layers, scores, taus = [], [], []
    for r in range(b):
        idx = image[r].nonzero()[:, 0]
        if idx.numel() == 0:
            layers.append([])
            scores.append(maps.new_zeros(0))
            taus.append(float("nan"))
            continue
        att = maps[:, r, idx]  # [L, N]
        w = att.sum(-1)
        w = w / w.sum()
        k = min(n_layers, 1 + int((w.sort(descending=True).values.cumsum(0) < layer_gamma).sum()))
        top = w.topk(k).indices
        a = att[top].mean(0)
        tau = a.mean() + lamb * a.std()  # unbiased, as torch.std by default (the release's)
        masked[r, idx] = a < tau
        weights[r] = w
        layers.append(top.tolist())
        scores.append(a)
        taus.append(float(tau))
    return BlindSelection(weights=weights, layers=layers, scores=scores, tau=taus, masked=masked)


def _image_runs(positions: Tensor) -> list[Tensor]:
    """Sorted image-token positions of one row split into runs of consecutive positions (one per image)."""
    if positions.numel() == 0:
        return []
    breaks = (positions.diff() > 1).nonzero()[:, 0] + 1
    return list(positions.tensor_split(breaks.cpu()))


@dataclass(frozen=True, kw_only=True)
class AvisCConfig(LinearContrastConfig):
    """AvisC's parameters (``noop``: ``alpha = beta = 0``; ``math_identity``: the edit runs and keeps every row)."""

    alpha: float = strength_param(1.0, main="image", contrast="blind image tokens only", source=(
        "AvisC release, avisc_sample.py and pope_eval_llavab.py cd_alpha=1, the POPE runs; its AMBER script passes 2.5"))
    beta: float = cut_param(0.1, stream="main-stream", source="AvisC release, avisc_sample.py and its parser, cd_beta")
    layer_gamma: float = param(0.5, (
        "Share of the image attention that the chosen layers hold: the heaviest layers are taken until their "
        "cumulative share reaches it, plus one. Default 0.5 (source: AvisC release, pope_eval_llavab.py and every "
        "script, layer_gamma)."), lo=0.0, hi=1.0)
    lamb: float = param(1.0, (
        "Threshold tau = mean(a) + lamb * std(a) over a row's image tokens; tokens at or above it are blind and "
        "kept in the contrast rows, the others are erased. Default 1.0 (source: AvisC release, pope_eval_batch.sh, "
        "amber_eval.sh and mme_eval.sh lamb=1.0; the parser's default is 0.99)."))
    masking_scheme: Literal["zeros", "ones", "noise", "keep"] = param("zeros", (
        "What the contrast rows' non-blind image-token embeddings become: zeros, ones, noise (N(0, 1), seeded per "
        "image with noise_seed), or keep (written back unchanged: the identity check of the edit, lvlm-fix only). "
        "Default zeros (source: AvisC release, pope_eval_llavab.py masking_scheme)."))
    noise_seed: int = param(0, (
        "Seed of masking_scheme=noise, combined with each image's embeddings (the same image always gets the same "
        "noise, in any batch). Default 0 (source: lvlm-fix; the release draws from the global RNG)."))
    release_compat: bool = param(False, (
        "Replace a row's contrast logits by its main logits when they hold a NaN, as the release's fp16 guard does "
        "(that step then decodes without contrast). Default False (source: lvlm-fix; the release, "
        "avisc_sample.py, always guards, over the whole batch)."))

    @classmethod
    def math_identity(cls) -> AvisCConfig:
        """The selection and the embedding edit run, every row is written back: ``2 l - l = l``."""
        return cls(alpha=1.0, beta=0.0, masking_scheme="keep")


@register_method
class AvisC(ContrastiveMethod):
    """AvisC: next-token logits contrasted with those of the rows that keep only their blind image tokens."""

    name = "avisc"
    config_cls = AvisCConfig
    config: AvisCConfig
    contrast_kind = "blind image tokens only"
    edits_contrast_embeddings = True
    observe_at_decode = False  # the selection is made once, at the prefill: decode steps read no attention

    def bind(self, lvlm: LVLM) -> None:
        super().bind(lvlm)
        reads = self.contrast_on and not self.config.null_contrast
        self.observed_layers = frozenset(range(lvlm.num_layers)) if reads else frozenset()
        self._maps: dict[int, Tensor] = {}
        self._image: Tensor | None = None
        self.selection: BlindSelection | None = None

    def begin(self, tokens: TokenState) -> None:
        super().begin(tokens)
        self._maps = {}
        self._image = tokens.image_mask[:, : tokens.prompt_len] & tokens.valid[:, : tokens.prompt_len]
        self.selection = None

    def observe(self, probs_last: Tensor, ctx: AttnContext) -> None:
        if ctx.step != 0:  # another participant reads this layer at decode steps; the selection is the prefill's
            return
        b, _, k = probs_last.shape
        mean = probs_last.mean(1)  # [b, k], mean over heads
        full = mean.new_zeros(b, self._image.shape[1])
        if ctx.key_positions is None or k == full.shape[1]:
            full[:, :k] = mean
        else:  # a sliding window dropped the oldest keys: they got no attention
            full[:, ctx.key_positions.to(full.device)] = mean
        self._maps[ctx.layer] = full

    def _select(self) -> BlindSelection:
        missing = sorted(self.observed_layers - self._maps.keys())
        if missing:
            raise LvlmFixError(f"avisc read no prefill attention at layer {missing[0]}; generate from the prompt in "
                               "one forward (no prefill chunking)")
        maps = torch.stack([self._maps[i] for i in sorted(self._maps)])
        return select_blind_tokens(maps, self._image.to(maps.device), self.config.layer_gamma, self.config.lamb)

    def contrast_embeddings(self, embeds: Tensor) -> Tensor:
        self.selection = sel = self._select()
        self._maps = {}  # the maps served their purpose; free them
        masked = sel.masked.to(embeds.device)
        if tuple(masked.shape) != tuple(embeds.shape[:2]):
            raise LvlmFixError(f"avisc selected tokens for {tuple(masked.shape)} rows x positions but the contrast "
                               f"prefill embeds {tuple(embeds.shape[:2])}; call generate() with the prompt")
        out = embeds.clone()
        scheme = self.config.masking_scheme
        if scheme == "zeros":
            out[masked] = 0.0
        elif scheme == "ones":
            out[masked] = 1.0
        elif scheme == "keep":
            out[masked] = embeds[masked]
        else:
            image = self._image.to(embeds.device)
            for r in range(embeds.shape[0]):
                for run in _image_runs(image[r].nonzero()[:, 0]):
                    gen = torch.Generator().manual_seed(_image_seed(embeds[r, run], self.config.noise_seed))
                    noise = torch.randn((len(run), embeds.shape[-1]), generator=gen, dtype=torch.float32)
                    hit = masked[r, run]
                    out[r, run[hit]] = noise.to(embeds.device, embeds.dtype)[hit]
        return out

    def combine(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        if self.config.release_compat:
            contrast = torch.where(contrast.isnan().any(-1, keepdim=True), main, contrast)
        return super().combine(main, contrast, step)

    def report(self) -> dict[str, Any]:
        out = {**super().report(), "layer_gamma": self.config.layer_gamma, "lamb": self.config.lamb,
               "masking_scheme": self.config.masking_scheme}
        sel = self.selection
        if sel is not None:
            out.update(layers=sel.layers, image_tokens=[len(s) for s in sel.scores], blind_tokens=sel.blind,
                       tau=sel.tau)
        return out
