"""ONLY: one-layer intervention (Wan et al., "ONLY: One-Layer Intervention Sufficiently Mitigates
Hallucinations in Large Vision-Language Models", ICCV 2025).

One forward, no second stream: the model runs exactly as without ONLY (its own logits ``l``, its
KV cache), and beside it a side output is built from one layer's attention, at the last position:

1. **Head selection at layer l*** (default 0), from the attention row ``A`` of the forward's last
   query. Its keys are split per row into the *image* segment (the row's image tokens) and the
   *text* segment (every other valid key except the row's first one, the BOS, whose column is left
   as it is). In each segment, weights above the segment's ``mean + std`` (unbiased std) are set to
   0, without renormalising (``Ã``). Each segment's filtered weights, normalised to sum 1, give an
   entropy ``H = -Σ p log(p + 1e-6)`` (a segment with nothing left: ``H_text = 0``,
   ``H_image = +inf``); the head's text-to-visual entropy ratio is ``TVER = H_text / H_image``.
   Heads whose TVER is below the mean over the heads are zeroed.
2. ``a_cd = W_O(concat_h Ã'_h V_h)``: the layer's output projection of the filtered row, removed
   heads contributing nothing.
3. ``a_cd`` is carried to the last layer ``L-1``, which is rebuilt around it from that layer's own
   modules: ``r = 0.2 h_in + N_in(a_cd)`` (``h_in`` the residual stream entering the last layer),
   ``h_cd = r + MLP(N_post(r))``, and ``l_cd = W_U(N_f(h_cd) + 0.5 N_f(h_out))`` (``h_out`` the
   stream leaving it, ``N_f`` the final norm, ``W_U`` the unembedding).
4. Per row, with ``d = Σ_v |softmax(l) - softmax(l_cd)|`` (an L1 distance, twice the total variation):
   ``l + α₁ l_cd`` if ``d < γ`` (collaborative), else ``(1 + α₂) l - α₂ l_cd`` (contrastive); then the
   plausibility cut: tokens with ``l < max l + log β`` get ``-inf``. This replaces the forward's
   next-token logits (``edits_logits``), before ``generate()``'s processors and warpers, as the
   release combines before its ``logits_processor`` / ``logits_warper``.

Each forward (the prefill and every decode step) selects its heads afresh from its own last query
row; at decode steps the text segment holds the generated tokens too. Everything after layer l*'s
attention is position-wise, so computing the side output at the last position only is exact.

Defaults (official code ``zifuwan/ONLY`` at 109bffe, LLaVA-1.5 scripts): ``layers = [0]``
(``enhance_layer_index``, pope_eval.sh / chair_eval.sh), ``alpha_pos = 3`` (``ritual_alpha_pos``),
``alpha_neg = 1`` (``ritual_alpha_neg``), ``beta = 0.1`` (``ritual_beta``), ``gamma = 0.2``
(``js_gamma`` of the POPE script; the CHAIR script uses 0.25, the parsers 0.6 for POPE and 0.1 for
CHAIR: the scripts are what the paper's runs used); 0.2 and 0.5 are the release's constants
(modeling_llama.py, llava_llama.py).

Decisions against the release:

* **Layout from the model.** The release hard-codes LLaVA-1.5's layout (text keys ``[1, 35)`` and
  ``[611, k)``, image ``[35, 611)``) and the last layer as index 31. Here the image keys are each
  row's image tokens (left padding and variable image positions), the text keys the row's valid
  other keys minus its first one (``exclude_first_key``, the release's BOS exclusion; off for a
  model without a BOS), and the last layer ``L-1`` at any depth. The release on fewer than 32
  layers never runs its last-layer recipe (the side output is the attention output sent to the
  final norm), on more it runs it mid-stack; with ``layers = [31]`` of 32 it skips it: here the
  recipe always runs at ``L-1``, also when l* is ``L-1``.
* **Per row.** The release sums ``d`` over the batch and, at batch > 1, takes the batch indices
  for the removed heads' (``torch.where`` on ``[b, h]``): here the gate and the heads are per row,
  so a batch equals each row alone (the release runs batch 1 everywhere, where both agree).
* **Decoding.** The release patches sampling only (greedy or beam search with ONLY crash there);
  here the combination is the forward's logits, so greedy, sampling and beam search all decode it
  (greedy and beams are an extension). Sampling uses ``generate()``'s warpers as given (the
  release's scripts pass ``top_k=None``: plain multinomial at temperature 1; pass ``top_k=0``).
* **Precision.** The attention row is rounded to the model's dtype before filtering, as the
  release does; the statistics, ``Ã'V``, and the combination are then computed in fp32 (the
  release stays in fp16), the last-layer recipe in the model's dtype through its own modules.
* **Families.** The recipe rebuilds a pre-norm decoder layer (``N_in`` before the attention,
  ``N_post`` before the MLP). A layer with other norms (Gemma 3's four, which also scale the
  embeddings and soft-cap the logits) is refused at bind with one line.

Composition: ONLY reads the attention row and values that layer l* actually uses (after an
attention method composed at that layer), the residual stream as the composed methods leave it,
and edits the logits after the logits edits ordered before it. A contrast-stream method
(``vcd``, ``icd``, ``m3id``, ``pai`` with guidance) is refused by the plan: its contrast rows would
not get ONLY's edit. A forward that feeds several new tokens at a decode step (assisted decoding,
prompt lookup) is refused with one line: only the last position is rebuilt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..errors import ConfigError, LvlmFixError
from ..hooks.contrast import plausibility_cut
from ..hooks.unembed import project
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .dola import TALLY_EVERY
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.plan import AttnContext
    from ..model import LVLM

__all__ = ["ONLY", "ONLYConfig", "key_segments", "only_combine", "select_heads", "segment_entropy", "segment_filter"]

RESIDUAL_WEIGHT = 0.2  # weight of the stream entering the last layer in r (release: modeling_llama.py, hard-coded)
FINAL_WEIGHT = 0.5  # weight of the main stream's normed last state in l_cd (release: llava_llama.py, hard-coded)
ENTROPY_EPS = 1e-6  # log(p + eps) of the release's entropies (zeros are not renormalised away)


def segment_filter(probs: Tensor, segments: Tensor) -> Tensor:
    """``probs`` ``[b, h, k]`` with the weights of each segment's keys above that segment's ``mean + std``
    (unbiased, per row and head) set to 0; keys in no segment untouched.

    ``segments`` ``[b, s, k]`` (bool) holds ``s`` disjoint key sets per row, filtered each on its own in one
    pass. A segment of one key has no std (NaN) and an empty one no mean: nothing is filtered there, as
    ``torch.std`` gives the release.
    """
    return probs.masked_fill(_outliers(probs, segments)[1].any(2), 0.0)


def _outliers(probs: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, out)`` ``[b, h, s, k]``: each segment's weights (0 off the segment) and its outliers (above
    ``mean + std``). A weight off the segment is 0, never above a threshold (``mean, std >= 0``, NaN for
    one key or none), so ``x > threshold`` needs no ``& segment``."""
    seg = segments.unsqueeze(1)  # [b, 1, s, k]
    p = probs.unsqueeze(2)  # [b, h, 1, k]
    x = p * seg  # [b, h, s, k]
    n = seg.sum(-1, keepdim=True, dtype=probs.dtype)  # [b, 1, s, 1]
    mean = x.sum(-1, keepdim=True).div_(n)
    var = (p - mean).square_().mul_(seg).sum(-1, keepdim=True).div_(n - 1)
    return x, x > var.sqrt_().add_(mean)


def segment_entropy(filtered: Tensor, segments: Tensor) -> Tensor:
    """``[b, h, s]``: ``-Σ p log(p + 1e-6)`` of each segment's filtered weights normalised to sum 1;
    NaN where nothing is left in the segment (the caller maps it, as the release does per segment)."""
    return _entropy(filtered[:, :, None] * segments[:, None])


def _entropy(x: Tensor) -> Tensor:
    """``[b, h, s]`` from each segment's filtered weights ``x`` ``[b, h, s, k]`` (0 off the segment)."""
    p = x / x.sum(-1, keepdim=True)
    return (p * torch.log(p + ENTROPY_EPS)).sum(-1).neg_()


def key_segments(key_valid: Tensor, image_keys: Tensor, exclude_first: bool) -> Tensor:
    """``[b, 2, k]``: each row's text keys (its valid non-image keys, less its first valid key, the BOS,
    when ``exclude_first``) and its image keys, the two segments of :func:`select_heads`."""
    image = image_keys & key_valid
    text = key_valid & ~image
    if exclude_first:
        text = text & (key_valid.cumsum(-1) != 1)
    return torch.stack([text, image], 1)


def select_heads(probs: Tensor, segments: Tensor) -> tuple[Tensor, Tensor]:
    """ONLY's filtered row and removed heads for the last query's row ``probs`` ``[b, h, k]``.

    Args:
        probs: the attention weights of the last query, per row and head.
        segments: ``[b, 2, k]`` the row's text keys and its image keys (:func:`key_segments`; disjoint,
            so filtering one never moves the other's statistics; a key in neither, the BOS or padding,
            keeps its weight).

    Returns:
        ``(kept, removed)``: ``kept`` ``[b, h, k]`` the weights with each segment outlier-filtered and
        the removed heads zeroed; ``removed`` ``[b, h]`` True where the head's TVER is below the
        row's mean TVER.
    """
    # One pass gives both the per-segment weights with their outliers zeroed (the entropies') and the
    # row with them zeroed (segment_filter's): the segments are disjoint.
    x, out = _outliers(probs, segments)
    filtered = probs.masked_fill(out.any(2), 0.0)
    h = _entropy(x.masked_fill_(out, 0.0))  # [b, h, 2]
    # Nothing left in a segment: H_text = 0, H_image = +inf (the release's nan_to_num per segment).
    h = torch.where(h.isnan(), _nan_fill(h.device), h)
    h_text, h_image = h.unbind(-1)
    tver = h_text / h_image  # [b, h]
    removed = tver < tver.mean(-1, keepdim=True)
    return filtered.masked_fill(removed[..., None], 0.0), removed


_NAN_FILL: dict = {}


def _nan_fill(device: Any) -> Tensor:
    """``[0, +inf]`` on ``device``, made once (this runs at every forward)."""
    fill = _NAN_FILL.get(device)
    if fill is None:
        fill = _NAN_FILL[device] = torch.tensor([0.0, math.inf], device=device)
    return fill


def only_combine(main: Tensor, side: Tensor, alpha_pos: float, alpha_neg: float, gamma: float,
                 beta: float) -> tuple[Tensor, Tensor]:
    """The gated combination of the next-token logits ``main`` with ONLY's ``side`` (``[n, V]`` fp32).

    Returns ``(logits, collaborative)``: per row ``main + alpha_pos side`` where the L1 distance of
    the two distributions is below ``gamma`` (``collaborative`` ``[n]`` True), else
    ``(1 + alpha_neg) main - alpha_neg side``; tokens either input masks stay ``-inf``, then the cut
    (``main < max main + log beta`` get ``-inf``; ``beta = 0`` cuts nothing).
    """
    d = (main.softmax(-1) - side.softmax(-1)).abs().sum(-1, keepdim=True)
    collaborative = d < gamma
    # Per-row weights (1, alpha_pos) or (1 + alpha_neg, -alpha_neg): the same products and sums, in fewer ops.
    out = main * torch.where(collaborative, 1.0, 1.0 + alpha_neg) + side * torch.where(collaborative, alpha_pos,
                                                                                        -alpha_neg)
    # A token masked (-inf) in main or side gives -inf, NaN or +inf above: all become -inf (one op, where the
    # contrast methods' keep_masked takes several: this runs at every decode step).
    out = torch.nan_to_num(out, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    return plausibility_cut(out, main, beta), collaborative[:, 0]


@dataclass(frozen=True, kw_only=True)
class ONLYConfig(MethodConfig):
    """ONLY's parameters."""

    layers: tuple[int, ...] = param((0,), (
        "The decoder layer l* whose last attention row selects the heads, as a list of one (0-based, negative "
        "counting from the end); [] installs nothing. Default [0] (source: ONLY release, enhance_layer_index in "
        "pope_eval.sh and chair_eval.sh)."))
    alpha_pos: float = param(3.0, (
        "Collaborative weight: l + alpha_pos l_cd where the two distributions are closer than gamma. Default 3 "
        "(source: ONLY release, ritual_alpha_pos, parsers and scripts)."), lo=0.0)
    alpha_neg: float = param(1.0, (
        "Contrastive weight: (1 + alpha_neg) l - alpha_neg l_cd where they are gamma or further apart. Default 1 "
        "(source: ONLY release, ritual_alpha_neg, parsers and scripts)."), lo=0.0)
    gamma: float = param(0.2, (
        "Gate: the L1 distance sum|softmax(l) - softmax(l_cd)| (0..2) below which the combination is "
        "collaborative. Default 0.2 (source: ONLY release, js_gamma of pope_eval.sh; chair_eval.sh uses 0.25, "
        "the parsers 0.6 for POPE and 0.1 for CHAIR)."), lo=0.0, hi=2.0)
    beta: float = param(0.1, (
        "Plausibility cut: tokens whose main-stream probability is below beta times the top one's get -inf, "
        "before temperature/top-k/top-p; 0 cuts nothing. Default 0.1 (source: ONLY release, ritual_beta, "
        "parsers and scripts)."), lo=0.0, hi=1.0)
    exclude_first_key: bool = param(True, (
        "Leave each row's first valid key (the BOS) out of the text segment, its weight untouched. Default true "
        "(source: ONLY release, text keys from 1 in modeling_llama.py); false for a model without a BOS."))

    def validate(self) -> None:
        if len(self.layers) > 1:
            raise ConfigError(f"layers={list(self.layers)}: ONLY intervenes at one layer; give one, e.g. layers=[0]")

    @classmethod
    def noop(cls) -> ONLYConfig:
        """No layer: nothing is installed."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> ONLYConfig:
        """The side output is built and weighted by 0, without a cut: ``l + 0 l_cd = 1 l - 0 l_cd = l`` exactly."""
        return cls(alpha_pos=0.0, alpha_neg=0.0, beta=0.0)


@register_method
class ONLY(Intervention):
    """ONLY: a side output from one layer's low-TVER heads removed, gated against the next-token logits."""

    name = "only"
    stage = Stage.LOGITS
    config_cls = ONLYConfig
    config: ONLYConfig

    def bind(self, lvlm: LVLM) -> None:
        self.edits_logits = self.shares_unembedding = False
        self.value_layers = self.residual_layers = self.layer_output_layers = frozenset()
        if not self.config.layers:
            return
        n = lvlm.num_layers
        (self.at,) = resolve_layers(self.config.layers, (), n)
        self.last = n - 1
        self.n_in, self.n_post = lvlm.pre_norms(self.last)  # refuses a layer of another shape, in one line
        self._mlp, self.final_norm, self.lm_head = lvlm.mlp(self.last), lvlm.final_norm, lvlm.lm_head
        self.o_proj = lvlm.out_proj(self.at)
        self.value_layers = frozenset({self.at})
        self.residual_layers = self.layer_output_layers = frozenset({self.last})
        self.edits_logits = self.shares_unembedding = True
        self._shared: Tensor | None = None  # this forward's l_cd from the model's own lm_head call
        self._steps = 0
        self._collaborative = self._removed = self._rows = 0
        # Per-forward flags ([b, h] removed heads, [b] collaborative rows), summed in bulk (_tally) rather
        # than with two ops per forward each; tensors, so no device sync per step.
        self._pending_removed: list[Tensor] = []
        self._pending_collaborative: list[Tensor] = []

    def begin(self, tokens: Any) -> None:
        self._a_cd = self._h_in = self._h_out = self._segments = self._shared = None

    def segments(self, ctx: AttnContext) -> Tensor:
        """This forward's ``[b, 2, k]`` text and image keys: built at the prefill, then grown by one key per
        decode step (a generated token is text where it is valid), rather than rebuilt every step."""
        seg, k = self._segments, ctx.key_valid.shape[1]
        if seg is not None and ctx.step > 0 and seg.shape[2] == k - 1 and ctx.key_start == 0:
            new = torch.nn.functional.pad(ctx.key_valid[:, -1:], (0, 1)).unsqueeze(-1)  # [b, 2, 1]: text, not image
            seg = torch.cat([seg, new], -1)
        else:
            # The first valid key (the BOS) is left out only while it is among the keys (no sliding window).
            seg = key_segments(ctx.key_valid, ctx.image_keys, self.config.exclude_first_key and ctx.key_start == 0)
        self._segments = seg
        return seg

    def observe_values(self, probs_last: Tensor, values: Tensor, ctx: AttnContext) -> None:
        dtype, probs = values.dtype, probs_last
        if dtype != torch.float32:  # the release filters the softmax cast to the model's dtype (fp32: no cast)
            probs, values = probs.to(dtype).float(), values.float()
        kept, removed = select_heads(probs, self.segments(ctx))
        b, h, k = kept.shape
        heads = torch.matmul(kept.view(b, h, 1, k), values)  # [b, h, 1, d]: Ã'V per head
        self._a_cd = self.o_proj(heads.transpose(1, 2).reshape(b, 1, -1).to(dtype))  # [b, 1, D]
        self._pending_removed.append(removed)

    def residual(self, hidden: Tensor, ctx: AttnContext) -> None:
        self._h_in = hidden[:, -1:]

    def layer_output(self, hidden: Tensor, ctx: AttnContext) -> None:
        self._h_out = hidden[:, -1:]

    def side_row(self, main: Tensor | None = None) -> Tensor:
        """The row ``[n, D]`` whose unembedding is ``l_cd``: the last layer rebuilt around ``a_cd``, normed, plus
        ``FINAL_WEIGHT`` times the normed last layer's output ``main`` (normed here from the read when None)."""
        r = RESIDUAL_WEIGHT * self._h_in + self.n_in(self._a_cd)
        h_cd = r + self._mlp(self.n_post(r))
        if main is None:
            side, main = self.final_norm(torch.cat([h_cd, self._h_out], 1)).unbind(1)  # one norm call for both
        else:
            side = self.final_norm(h_cd)[:, 0]
        return side + FINAL_WEIGHT * main

    def unembed_rows(self, last: Tensor, ctx: AttnContext) -> Tensor | None:
        # lm_head's input at the last position is the final norm of the last layer's output: ONLY's main stream
        if self._a_cd is None or self._h_in is None:
            return None
        return self.side_row(last)

    def unembedded(self, logits: Tensor, ctx: AttnContext) -> None:
        self._shared = logits

    def side_logits(self) -> Tensor:
        """``l_cd`` ``[n, V]`` fp32 from this forward's reads: the shared projection's, else projected here."""
        out, self._shared = self._shared, None
        if out is None:
            out = project(self.lm_head, self.side_row())
        return out if out.dtype == torch.float32 else out.float()

    def logits(self, last: Tensor, ctx: AttnContext) -> Tensor:
        if ctx.step > 0 and ctx.q_len is not None and ctx.q_len > 1:
            raise LvlmFixError(f"only rebuilds the last position's logits, but a decode step fed {ctx.q_len} tokens "
                               "(assisted decoding or prompt lookup); decode one token per step")
        if self._a_cd is None or self._h_in is None or self._h_out is None:
            raise LvlmFixError("only's layer reads did not run in this forward; call the model with its input_ids "
                               "inside lvlm_fix.apply()")
        c = self.config
        out, collaborative = only_combine(last, self.side_logits(), c.alpha_pos, c.alpha_neg, c.gamma, c.beta)
        self._a_cd = self._h_in = self._h_out = None  # one forward's reads serve that forward only
        self._steps += 1
        self._rows += collaborative.shape[0]
        self._pending_collaborative.append(collaborative)
        if len(self._pending_collaborative) >= TALLY_EVERY:
            self._tally()
        return out

    def _tally(self) -> None:
        """Adds the pending per-forward flags to the running counts (tensors: no sync)."""
        if self._pending_removed:
            self._removed = self._removed + torch.cat([t.flatten() for t in self._pending_removed]).sum()
            self._pending_removed.clear()
        if self._pending_collaborative:
            self._collaborative = self._collaborative + torch.cat(self._pending_collaborative).sum()
            self._pending_collaborative.clear()

    def report(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {"layers": list(c.layers), "alpha_pos": c.alpha_pos, "alpha_neg": c.alpha_neg,
                               "gamma": c.gamma, "beta": c.beta}
        if self.edits_logits:
            self._tally()
            rows = self._rows
            out.update(select_layer=self.at, last_layer=self.last, forwards=self._steps,
                       collaborative_share=round(int(self._collaborative) / rows, 4) if rows else None,
                       removed_heads_mean=round(int(self._removed) / rows, 3) if rows else None)
        return out
