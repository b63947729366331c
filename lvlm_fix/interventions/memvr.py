"""MemVR: Memory-space Visual Retracing (Zou et al., "Look Twice Before You Answer", ICML 2025).

When the model is uncertain in a middle layer, the image is fed to it a second time, as a key-value
memory in that layer's feed-forward block ("look twice").

* **Trigger.** In every forward (the prefill and each decode step), after each decoder layer ``l``
  with ``s < l < e`` the residual stream leaving it is projected through the final norm and the
  unembedding at the forward's last position (the early exit), and its uncertainty is measured as
  the normalised entropy of the softmax over the top ``k`` logits,
  ``H = -sum_i p_i log p_i / log k``, in ``[0, 1]``. The first such layer with ``H > theta``
  triggers, at most one per forward and row.
* **Retracing.** The next layer, ``l + 1``, gets the image as a memory: its MLP output ``F(x)``
  (``x`` the MLP's input, the normed stream) becomes, at every position of the forward,
  ``(1 - alpha) F(x) + alpha (mean|F(x)| / mean|M(x)|) M(x)`` with ``M(x) = (x V^T) V``, ``V``
  (``[N, d]``) the row's visual tokens: the projected image features the decoder reads at the
  row's image positions (the residual stream entering layer 0 there), kept for the sequence.
  The means are over the forward's valid positions of the row and every hidden unit, so ``M`` is
  rescaled to the magnitude of the MLP output it is mixed with. ``M`` is computed in fp32.
  A prefill edit therefore reaches every prompt position of that layer (the KV cache of the later
  layers holds the retraced states); a decode step decides anew and edits its one position.

Defaults (official release ``1zhou-Wang/MemVR`` at ``de2e3cf``, LLaVA-1.5-7B, 32 layers):
``retracing_ratio = 0.12`` (what the LLaVA loaders run; README tip), ``entropy_threshold = 0.75``,
``starting_layer = 5`` and ``ending_layer = 16`` (both exclusive: triggers at layers 6..15, edits
at 7..16), top-10 entropy, no activation between the two products. On another depth ``L`` the
window keeps the release's proportions: ``s = floor(5 L / 32)``, ``e = ceil(16 L / 32)`` (5 and 16
at 32 layers; 1 and 4 at 8; 0 and 2 at 4, the smallest depth with a layer to trigger), and ``e``
must leave the next layer to edit (``e <= L - 1``).

Decisions against the release:

* Per row, at any batch: each row's entropy, trigger layer, visual tokens ``V`` and normalising
  means are its own, the means over its valid (non-padding) positions. The release asserts batch 1
  and, batched, would sum the entropy over rows, share the trigger, use the last row's image for
  every row and take the means over the whole batch.
* The release projects every layer of every forward through norm and unembedding; only those in
  the window before the row's trigger are ever read, so only those are computed (same result).
* The release builds its memory as ``c1 V`` and ``c2 V^T`` with ``c1, c2`` weight/feature scale
  ratios: without an activation they cancel exactly in the normalisation (kept out here, ``M`` in
  fp32 instead of the release's fp16 range guard). ``memory_activation="silu"`` is the release's
  Qwen-VL / GLM-4V variant, ``silu(c1 x V^T) V``, where ``c1 = mean|W_in| / mean|V|`` does not
  cancel; ``W_in`` there is the MLP's up projection, here every linear map of the MLP that reads
  the hidden state (gate and up together in a gated MLP). Those ports never switch their
  retracing on as released, and their early exit skips the final norm; the LLaVA path is followed.
* The release's CHAIR loader ignores its script's ``--retracing-ratio 0.31`` and runs 0.12, the
  default here; its ``range(31)`` leaves the ratio at 0 on layer 31 (an edit there changes
  nothing); here every layer of the window is edited with the same ratio.
* ``V`` holds all of a row's image tokens (several images, or an image's crops, alike); the release
  keeps the last image it encoded, one per row in its loaders.
* A row without image tokens has nothing to retrace: it is never projected nor edited. The entropy
  counts a top-``k`` probability that underflows to 0 as 0 (``0 log 0 = 0``; the release's NaN
  never triggers). On a model that caps its final logits (``final_logit_softcapping``), the early
  exit applies the same cap, so that ``H`` is measured on the logits the model would give.

Serves greedy decoding, sampling and beam search (each beam row decides on its own), left-padded
batches, static caches. Decoding that feeds several tokens to one decode forward (assisted
decoding, prompt lookup) is refused in one line: the trigger reads one position per forward.
Composes with every other in-plan method: attention and head edits change the stream it measures;
a contrast stream's rows run outside the plan and are not retraced, as they are not edited by the
attention methods; other MLP-output edits of the same layer see MemVR's output in composition order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import ConfigError, LvlmFixError
from ..hooks.unembed import project
from .base import Intervention, MethodConfig, Stage, param
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.plan import AttnContext, TokenState
    from ..model import LVLM

__all__ = ["MemVR", "MemVRConfig", "default_window", "retrace", "top_k_entropy"]


def default_window(n_layers: int) -> tuple[int, int]:
    """``(s, e)`` at the release's proportions: ``floor(5 L / 32)``, ``ceil(16 L / 32)`` ((5, 16) for 32 layers)."""
    return (5 * n_layers) // 32, -((-16 * n_layers) // 32)


def top_k_entropy(logits: Tensor, k: int) -> Tensor:
    """Normalised entropy ``-sum p log p / log k`` of the softmax over each row's top ``k``: ``[n, V] -> [n]``."""
    p = logits.topk(k, dim=-1).values.softmax(-1)
    return -torch.special.xlogy(p, p).sum(-1) / math.log(k)


def retrace(out: Tensor, x: Tensor, memory: Tensor, valid: Tensor, ratio: float,
            in_scale: Tensor | None = None) -> Tensor:
    """``(1 - ratio) F + ratio (mean|F| / mean|M|) M`` per row, in fp32, returned in ``out``'s dtype.

    Args:
        out: ``[r, q, d]`` the MLP output ``F(x)``.
        x: ``[r, q, d]`` the MLP input.
        memory: ``[r, N, d]`` fp32, each row's visual tokens ``V`` (rows with fewer tokens padded with zeros,
            which add nothing to ``M``).
        valid: ``[r, q]`` the positions the means run over (padding left out).
        ratio: ``alpha``.
        in_scale: ``[r]`` ``c1`` of the SiLU variant, ``M = silu(c1 x V^T) V``; None: ``M = (x V^T) V``.
    """
    f = out.float()
    scores = x.float() @ memory.transpose(1, 2)  # [r, q, N]
    if in_scale is not None:
        scores = torch.nn.functional.silu(scores * in_scale[:, None, None])
    m = scores @ memory  # [r, q, d]
    w = valid[..., None].to(f.dtype)
    mean_f = (f.abs() * w).sum((1, 2))
    mean_m = (m.abs() * w).sum((1, 2))  # the same count divides both means: it cancels in their ratio
    # A memory that gives nothing (M = 0) adds nothing, where 0/0 would give NaN.
    scale = torch.where(mean_m > 0, mean_f / mean_m.clamp_min(torch.finfo(f.dtype).tiny), 0.0)
    return ((1.0 - ratio) * f + (ratio * scale)[:, None, None] * m).to(out.dtype)


@dataclass(frozen=True, kw_only=True)
class MemVRConfig(MethodConfig):
    """MemVR's parameters."""

    retracing_ratio: float = param(0.12, (
        "alpha: the retraced layer's MLP output becomes (1 - alpha) F(x) + alpha (mean|F|/mean|M|) M(x); 0 changes "
        "nothing. Default 0.12 (source: MemVR release, eval/llava_model_vqa_loader*.py, the value its LLaVA runs use, "
        "and README tip; the CHAIR script's 0.31 is ignored by its loader)."), lo=0.0, hi=1.0)
    entropy_threshold: float = param(0.75, (
        "theta: a layer triggers when the normalised top-k entropy of its early-exit logits exceeds it; the entropy "
        "lies in [0, 1], so a value below 0 triggers at the window's first layer and one above 1 never. "
        "Default 0.75 (source: MemVR release, every eval script)."))
    starting_layer: int | None = param(None, (
        "s: trigger layers l satisfy s < l < e (0-based; layer l + 1 is edited); -1 lets layer 0 trigger. None: "
        "floor(5 L / 32) of L layers. Default None, 5 on 32 layers (source: MemVR release, LLaVA eval scripts, "
        "--starting-layer 5)."), lo=-1)
    ending_layer: int | None = param(None, (
        "e: trigger layers l satisfy s < l < e, so layers s + 2 .. e may be edited; at most L - 1. None: "
        "ceil(16 L / 32) of L layers. Default None, 16 on 32 layers (source: MemVR release, eval scripts, "
        "--ending-layer 16)."), lo=0)
    entropy_top_k: int = param(10, (
        "How many of the early exit's largest logits the entropy is taken over (normalised by log k). Default 10 "
        "(source: MemVR release, memvr.py, hard-coded)."), lo=2)
    memory_activation: Literal["none", "silu"] = param("none", (
        "Between the memory's two products: none, M = (x V^T) V (the release's LLaVA path), or silu, "
        "M = silu(c1 x V^T) V with c1 = mean|W_in|/mean|V| (its Qwen-VL and GLM-4V ports). "
        "Default none (source: MemVR release, memvr.py LlamaMLP)."))

    @classmethod
    def noop(cls) -> MemVRConfig:
        """An empty window (no layer ``l`` with ``0 < l < 1``): nothing is installed."""
        return cls(starting_layer=0, ending_layer=1)

    @classmethod
    def math_identity(cls) -> MemVRConfig:
        """Every forward triggers at the window's first layer and retraces with ``alpha = 0``: ``F' = F`` exactly."""
        return cls(retracing_ratio=0.0, entropy_threshold=-1.0)

    def window(self, n_layers: int) -> tuple[int, int]:
        """``(s, e)`` on ``n_layers`` layers: the given bounds, the depth rule for those left None."""
        s, e = default_window(n_layers)
        return (s if self.starting_layer is None else self.starting_layer,
                e if self.ending_layer is None else self.ending_layer)


@register_method
class MemVR(Intervention):
    """MemVR: an uncertain middle layer arms the next one, whose MLP reads the image tokens as a memory."""

    name = "memvr"
    stage = Stage.MLP_OUTPUTS
    config_cls = MemVRConfig
    config: MemVRConfig

    def bind(self, lvlm: LVLM) -> None:
        c = self.config
        n = lvlm.num_layers
        s, e = c.window(n)
        if e > n - 1 and e > s + 1:
            raise ConfigError(f"ending_layer={e}: a trigger at layer l < {e} retraces layer l + 1, and the model's "
                              f"last layer is {n - 1}; give ending_layer <= {n - 1}")
        self.window = (s, e)
        self.trigger_layers = list(range(max(s + 1, 0), e))
        edited = frozenset(l + 1 for l in self.trigger_layers)
        self.mlp_layers = edited
        # Layer 0's input holds the image features (read at the prefill); layer l + 1's input is layer l's output.
        self.residual_layers = edited | {0} if edited else frozenset()
        self._first_read = min(edited, default=None)
        vocab = lvlm.lm_head.weight.shape[0]
        if c.entropy_top_k > vocab:
            raise ConfigError(f"entropy_top_k={c.entropy_top_k} is larger than the vocabulary ({vocab}); "
                              f"give entropy_top_k <= {vocab}")
        self._norm, self._head = lvlm.final_norm, lvlm.lm_head
        self._softcap = getattr(lvlm.text_config, "final_logit_softcapping", None)
        self._lvlm = lvlm
        self._w_in: dict[int, float] = {}  # mean|W_in| per edited layer (SiLU variant), read on first use
        self._tokens: TokenState | None = None
        self._memory: Tensor | None = None  # [b, N, d] fp32
        self._v_mean: Tensor | None = None  # [b] mean|V| per row (SiLU variant)
        self._pending: Tensor | None = None  # rows not yet triggered in this forward
        self._armed: tuple[int, Tensor] | None = None  # (layer, rows) to retrace
        self.retraced: dict[int, int] = {}  # edited layer -> (row, forward) pairs retraced
        self.forwards = 0  # (row, forward) pairs measured

    def check_generate(self, generation_config: Any, model_kwargs: dict[str, Any]) -> None:
        if self.mlp_layers and getattr(generation_config, "prompt_lookup_num_tokens", None):
            lookup = generation_config.prompt_lookup_num_tokens
            raise LvlmFixError(_MULTI_TOKEN.format(f"prompt_lookup_num_tokens={lookup}"))

    def begin(self, tokens: TokenState) -> None:
        self._tokens = tokens
        self._memory = self._v_mean = self._pending = self._armed = None

    def end(self) -> None:
        self._tokens = self._memory = self._v_mean = self._pending = self._armed = None

    def residual(self, hidden: Tensor, ctx: AttnContext) -> None:
        if ctx.layer == 0:
            if ctx.step == 0:
                self._keep_visual_tokens(hidden)
            return
        if ctx.layer == self._first_read:  # a new forward: every row with an image is measured again
            if ctx.step > 0 and ctx.q_len > 1:
                raise LvlmFixError(_MULTI_TOKEN.format(f"a decode forward of {ctx.q_len} tokens"))
            self._pending, self._armed = self._rows_with_image, None
            self.forwards += int(self._pending.numel())
        rows = self._pending
        if rows is None or not rows.numel():
            return
        last = hidden[:, -1]
        h = last if rows.numel() == last.shape[0] else last.index_select(0, rows)
        logits = project(self._head, self._norm(h)).float()
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        fire = top_k_entropy(logits, self.config.entropy_top_k) > self.config.entropy_threshold
        armed = rows[fire]
        if armed.numel():
            self._armed = (ctx.layer, armed)
            self._pending = rows[~fire]
            self.retraced[ctx.layer] = self.retraced.get(ctx.layer, 0) + int(armed.numel())

    def mlp_output(self, out: Tensor, x: Tensor, ctx: AttnContext) -> Tensor | None:
        if self._armed is None or self._armed[0] != ctx.layer:
            return None
        rows = self._armed[1]
        self._armed = None
        valid = self._tokens.valid[:, ctx.query_positions.to(self._tokens.valid.device)].to(out.device)
        all_rows = rows.numel() == out.shape[0]
        pick = (lambda t: t) if all_rows else (lambda t: t.index_select(0, rows))
        in_scale = None
        if self.config.memory_activation == "silu":
            in_scale = self._mean_w_in(ctx.layer) / pick(self._v_mean)
        new = retrace(pick(out), pick(x), pick(self._memory), pick(valid), self.config.retracing_ratio, in_scale)
        return new if all_rows else out.index_copy(0, rows, new)

    # -- helpers -----------------------------------------------------------------------------------
    def _keep_visual_tokens(self, hidden: Tensor) -> None:
        """``V`` per row: the stream entering layer 0 at the row's image positions, zero-padded to the longest."""
        mask = self._tokens.image_mask[:, : hidden.shape[1]].to(hidden.device)
        counts = mask.sum(1)
        b, n, d = hidden.shape[0], int(counts.max()) if mask.numel() else 0, hidden.shape[-1]
        memory = hidden.new_zeros(b, n, d, dtype=torch.float32)
        # Row r's image tokens go, in order, to slots 0..count_r - 1.
        slot = mask.long().cumsum(1) - 1
        r, p = mask.nonzero(as_tuple=True)
        memory[r, slot[r, p]] = hidden[r, p].float()
        self._memory = memory
        self._rows_with_image = (counts > 0).nonzero().flatten()
        if self.config.memory_activation == "silu":
            self._v_mean = memory.abs().sum((1, 2)) / (counts.clamp_min(1) * d)

    def _mean_w_in(self, layer: int) -> float:
        """``mean|W_in|`` of ``layer``'s MLP: every linear map reading the hidden state (the SiLU variant's ``c1``)."""
        if layer not in self._w_in:
            d = self._lvlm.hidden_size
            weights = [m.weight for m in self._lvlm.mlp(layer).modules()
                       if isinstance(m, torch.nn.Linear) and m.in_features == d]
            if not weights:
                raise LvlmFixError(f"memory_activation='silu' needs the MLP of layer {layer} to read the hidden state "
                                   "through linear maps; use memory_activation='none'")
            total = sum(float(w.detach().float().abs().sum()) for w in weights)
            self._w_in[layer] = total / sum(w.numel() for w in weights)
        return self._w_in[layer]

    def summarize(self, report: dict[str, Any]) -> str:
        s, e = report["window"]
        done = sum(report["retraced"].values())
        if not report["edited_layers"]:
            return f"empty window (s={s}, e={e}): nothing retraced"
        where = ", ".join(f"L{k}: {v}" for k, v in report["retraced"].items()) or "none"
        return (f"retraced {done} of {report['forwards']} row-forwards (theta {report['entropy_threshold']:g}, "
                f"alpha {report['retracing_ratio']:g}); by edited layer: {where}")

    def report(self) -> dict[str, Any]:
        """The window, and how many (row, forward) pairs each layer retraced, over the plan's calls."""
        c = self.config
        return {"window": list(self.window), "trigger_layers": self.trigger_layers,
                "edited_layers": sorted(self.mlp_layers), "retracing_ratio": c.retracing_ratio,
                "entropy_threshold": c.entropy_threshold, "memory_activation": c.memory_activation,
                "forwards": self.forwards, "retraced": {str(k): v for k, v in sorted(self.retraced.items())}}


_MULTI_TOKEN = ("memvr decides once per forward from its last position, and {} would feed several tokens to one "
                "decode forward; decode one token per step (drop assisted decoding / prompt lookup)")
