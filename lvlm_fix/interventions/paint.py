"""PAINT: Paying Attention to INformed Tokens (arXiv 2501.12206).

PAI boosts the attention that the newest query pays to *all* image tokens; PAINT boosts two
informed subsets of them, chosen per image from the vision tower's own CLS attention:

* **local** tokens: the top ``local_ratio`` of patches by the CLS row of ViT layer
  ``local_layer`` (0: the first layer, grounded object detail), summed over heads;
* **summary** tokens: the upper outliers of the CLS row of ViT layer ``summary_layer`` (-2: the
  penultimate, whose output LLaVA-1.5 feeds the LLM), i.e. the patches whose head-summed CLS
  attention exceeds ``Q3 + 1.5 (Q3 - Q1)`` over the image's patches (Tukey's IQR rule); register-like
  patches that aggregate the image;
* the two sets are made disjoint: ``Local = Local0 \\ Summary``.

In every forward, in the decoder layers ``layers`` (default 2 .. L-1), all heads, only the
**last query row** (the last prompt token at the prefill, the new token at each decode step),
before the softmax::

    z[k] <- z[k] + alpha |z[k]|   for the keys of local tokens
    z[k] <- z[k] + beta  |z[k]|   for the keys of summary tokens

(positive logits grow by 1 + margin, negative ones shrink toward 0 by 1 - margin). Patch ``j`` of
the tower is the row's ``j``-th image token (after the CLS token when the model keeps it).

**How the CLS attention is read.** The vision tower keeps its own attention implementation:
forward hooks on the ``q_proj`` / ``k_proj`` of the two chosen ViT layers take their outputs, and
the CLS query's attention row ``softmax(q_cls k^T * scale)`` is recomputed from them (one
``[b, heads, 1 + N]`` row per layer, instead of the release's full attention maps of every layer
from an eager tower). The tower runs only at the prefill; the token sets are then fixed per row
for the whole generation.

Differences from the release (hasanar1f/PAINT ``2a9e8f8``, ``modPAI/``), all deliberate:

* **batched** (release bug 6): the token sets are computed per row; the release takes them from
  batch element 0 and shares them across the batch;
* **the prefill is edited** (release bug 5): with PAI's guidance on (every released run, γ 1.1),
  the release's layers stay in "cfg" mode for the first forward, so the first generated token gets
  no boost. lvlm-fix edits the prefill's last row, the paper's intent; ``release_compat=true``
  skips the prefill's edit to reproduce the released runs;
* the summary set is exactly the IQR outliers; the release takes the top ``int(N * count / N)``
  scores, the same set unless float rounding of ``N * (count / N)`` drops one;
* the edit is computed in fp32 on the eager path (the release edits fp16 logits);
* **head-specific modulation** (release bug 1: described in the v1 abstract, absent from the
  code) is offered as ``head_modulation="image_attention"``, off by default since no released run
  has it. The paper gives no formula; lvlm-fix's reading: in each edited row, head ``h``'s margins
  are multiplied by ``s_h / mean_h s_h``, where ``s_h`` is that head's attention mass on the
  image (before the edit) — heads that look at the image get more, the layer's mean margin stays;
* **the spatial stream** (release bug 2: its scores are row sums of a softmax, all ≈ 1, over 577
  positions with CLS included) is offered with the evident fix: a patch's spatial score is the
  attention it *receives* in ViT layer ``local_layer``, averaged over heads and all queries; the
  top ``spatial_ratio`` of patches join the local set before the summary set is removed (as in the
  release). Off by default (``spatial_ratio=0``, the release's default).

PAI's logit guidance (``γ·log p(y|v,x) − (γ−1)·log p(y|x)``, used by every released PAINT run with
γ = 1.1) is not part of PAINT: compose it, ``paint+pai`` with PAI's attention margin at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._lazy import torch
from ..errors import ConfigError, LvlmFixError
from ..hooks.plan import AttnContext, TokenState
from .base import Intervention, MethodConfig, Stage, param, resolve_layers
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..hooks.capture import HookSet
    from ..hooks.plan import Plan
    from ..model import LVLM

__all__ = ["IQR_WHISKER", "ClsAttention", "Paint", "PaintConfig", "cls_attention_row", "default_layers", "iqr_outliers",
           "margin_edit", "select_tokens", "spatial_scores", "vision_cls_attention"]

IQR_WHISKER = 1.5  # Tukey's rule: outliers lie above Q3 + 1.5 IQR (clip_encoder.py get_top_ratio)


def default_layers(n_layers: int) -> list[int]:
    """Layers ``2 .. L-1``: every layer but the first two (the release's ``[2, 32)`` of 32)."""
    return list(range(2, n_layers))


# -- the math (pure) -------------------------------------------------------------------------------
def iqr_outliers(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Upper outliers per row: ``scores > Q3 + 1.5 (Q3 - Q1)``.

    Quartiles are linearly interpolated (numpy's ``percentile`` default, as the release uses).

    Args:
        scores: ``[b, n]``.

    Returns:
        ``(mask [b, n] bool, threshold [b])``.
    """
    x = scores.float()
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], device=x.device), dim=-1)
    upper = q3 + IQR_WHISKER * (q3 - q1)
    return x > upper[:, None], upper


def _top_mask(scores: Tensor, count: int) -> Tensor:
    """``[b, n]`` True at each row's ``count`` largest entries."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, scores.topk(count, dim=-1).indices, True)
    return mask


def select_tokens(local_scores: Tensor, summary_scores: Tensor, local_ratio: float,
                  spatial: Tensor | None = None, spatial_ratio: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """PAINT's two token sets per row, from CLS attention over the ``n`` patches.

    Args:
        local_scores: ``[b, n]`` CLS attention in the local layer (summed over heads).
        summary_scores: ``[b, n]`` CLS attention in the summary layer (summed over heads).
        local_ratio: the top ``int(n * local_ratio)`` patches by ``local_scores`` are local.
        spatial: ``[b, n]`` spatial scores (see :func:`spatial_scores`), or None.
        spatial_ratio: the top ``int(n * spatial_ratio)`` patches by ``spatial`` join the local set.

    Returns:
        ``(local, summary, threshold)``: two disjoint ``[b, n]`` masks (summary = the IQR outliers
        of ``summary_scores``; local = the top patches minus the summary ones) and each row's
        outlier threshold ``[b]``.
    """
    n = local_scores.shape[-1]
    local = _top_mask(local_scores.float(), int(n * local_ratio))
    if spatial is not None and spatial_ratio > 0:
        local |= _top_mask(spatial.float(), int(n * spatial_ratio))
    summary, threshold = iqr_outliers(summary_scores)
    return local & ~summary, summary, threshold


def spatial_scores(queries: Tensor, keys: Tensor, head_dim: int, scale: float) -> Tensor:
    """The attention each patch receives in one ViT layer, averaged over heads and all queries.

    Args:
        queries, keys: the layer's ``q_proj`` / ``k_proj`` outputs, ``[b, 1 + n, d]`` (CLS first).

    Returns:
        ``[b, n]``, patches only (the column means of the layer's attention map, CLS column dropped).
    """
    b, t, _ = keys.shape
    q = queries.float().view(b, t, -1, head_dim).transpose(1, 2)
    k = keys.float().view(b, t, -1, head_dim).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * scale).softmax(-1)  # [b, h, t, t]
    return probs.mean(dim=(1, 2))[:, 1:]


def margin_edit(row: Tensor, margin: Tensor) -> Tensor:
    """``z + m |z|`` where the margin ``m`` is positive, ``z`` elsewhere (so masked entries stay as they are).

    Args:
        row: pre-softmax scores, any shape.
        margin: broadcastable to ``row``; 0 leaves the entry untouched.
    """
    return torch.where(margin > 0, row + margin * row.abs(), row)


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PaintConfig(MethodConfig):
    """PAINT's parameters (hasanar1f/PAINT 2a9e8f8, modPAI/)."""

    alpha: float = param(0.7, (
        "Margin on the local tokens: z <- z + alpha |z| on their keys, in the last query row. Default 0.7 "
        "(source: modPAI/chair_eval.py --alpha; the release's CHAIR script passes 0.9, which collapses the "
        "captions to about 6 words, and its POPE commands 0.5)."), lo=0.0)
    beta: float = param(0.3, (
        "Margin on the summary tokens: z <- z + beta |z|. Default 0.3 (source: modPAI/chair_eval.py --beta)."),
        lo=0.0)
    local_ratio: float = param(0.25, (
        "Fraction of the patches taken as local tokens (top CLS attention in local_layer), before the summary "
        "tokens are removed. Default 0.25, i.e. 144 of 576 (source: clip_encoder.py local_token_ratio; the "
        "release's --top_token_ratio flag is parsed but never used)."), lo=0.0, hi=1.0)
    spatial_ratio: float = param(0.0, (
        "Fraction of the patches added to the local tokens by the spatial stream: the patches that receive the "
        "most attention in local_layer (averaged over heads and queries). 0 turns the stream off. Default 0 "
        "(source: clip_encoder.py spatial_token_ratio=0; the release's spatial scores are degenerate, so lvlm-fix "
        "uses received attention)."), lo=0.0, hi=1.0)
    local_layer: int = param(0, (
        "ViT layer whose CLS attention picks the local tokens, negative from the end. Default 0, the first "
        "(source: clip_encoder.py vit_attn[0])."))
    summary_layer: int = param(-2, (
        "ViT layer whose CLS attention picks the summary tokens (IQR outliers), negative from the end. Default "
        "-2, the penultimate: LLaVA-1.5's feature layer (source: clip_encoder.py vit_attn[-2])."))
    layers: tuple[int, ...] | None = param(None, (
        "Decoder layers edited, 0-based, negative from the end; [] for none (the method then installs nothing). "
        "Default None: 2 .. L-1 (source: modPAI/chair_eval.py start_layer=2, end_layer=32)."))
    head_modulation: Literal["off", "image_attention"] = param("off", (
        "Per-head margins: image_attention multiplies a head's margins by its image-attention mass in the "
        "edited row over the mean of the layer's heads (lvlm-fix's reading of the v1 abstract's 'head-specific "
        "modulation by measured visual sensitivity', which the release does not implement). Default off "
        "(source: release, every head gets the same margins)."))
    release_compat: bool = param(False, (
        "Skip the edit at the prefill, as every released run does (with PAI's guidance on, the release's first "
        "forward runs unedited: bug 5), so the first generated token gets no boost. Default False: the "
        "prefill's last row is edited (source: paper intent)."))

    @classmethod
    def noop(cls) -> PaintConfig:
        """No layer: no eager layer and no vision-tower hook."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> PaintConfig:
        """``alpha = beta = 0``: tokens are selected from the tower's CLS attention and every edit adds 0."""
        return cls(alpha=0.0, beta=0.0)


# -- the vision tower's CLS attention (where PAINT reads its token sets) ---------------------------
@dataclass(frozen=True)
class ClsAttention:
    """Where a vision tower's CLS query attends, found from the model's structure.

    Attributes:
        attentions: per ViT layer, its attention module (with ``q_proj``, ``k_proj``, ``head_dim``
            and ``scale``), in layer order.
        num_patches: patch tokens per image; the tower's sequence is the CLS token (position 0)
            then the patches in row-major order.
    """

    attentions: tuple[Any, ...]
    num_patches: int


_CLS_PARAMETERS = ("class_embedding", "cls_token")  # CLIP, ViT / DINO naming of the learned CLS token


def vision_cls_attention(model: torch.nn.Module) -> ClsAttention:
    """The vision tower of ``model`` and its per-layer attention modules, if it has a CLS token.

    Derived, not looked up by model name: the tower is the outermost module whose ``config`` is
    the model's ``vision_config``; it has a CLS token when it owns a learned class embedding; its
    layers are its module list of ``vision_config.num_hidden_layers`` entries; each layer's
    attention is the first submodule with ``q_proj`` and ``k_proj``.

    Raises:
        LvlmFixError: no vision tower, no CLS token, or no readable attention projections.
    """
    kind = getattr(model.config, "model_type", "?")
    vision_config = getattr(model.config, "vision_config", None)
    tower = next((m for m in model.modules() if vision_config is not None
                  and getattr(m, "config", None) is vision_config), None)
    if tower is None:
        raise LvlmFixError(f"cannot find the vision tower of this {kind!r} model (no module carries its vision_config)")
    if not any(name.rsplit(".", 1)[-1] in _CLS_PARAMETERS for name, _ in tower.named_parameters()):
        raise LvlmFixError(f"the vision tower of this {kind!r} model has no CLS token "
                           f"({type(tower).__name__}); CLS attention cannot be read from it")
    depth = getattr(vision_config, "num_hidden_layers", None)
    layers = next((m for m in tower.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth), None)
    attentions = []
    for layer in layers if layers is not None else ():
        attn = next((m for m in layer.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")
                     and hasattr(m, "head_dim") and hasattr(m, "scale")), None)
        attentions.append(attn)
    if not attentions or any(a is None for a in attentions):
        raise LvlmFixError(f"cannot read the q/k projections of the vision tower of this {kind!r} model "
                           f"({type(tower).__name__})")
    side = vision_config.image_size // vision_config.patch_size
    return ClsAttention(tuple(attentions), side * side)


def cls_attention_row(attention: Any, queries: Tensor, keys: Tensor) -> Tensor:
    """The CLS query's attention row of one ViT layer, recomputed from its projections' outputs.

    Args:
        attention: the layer's attention module (for ``head_dim`` and ``scale``).
        queries: the output of its ``q_proj`` (``[b, n, d]``; only position 0, CLS, is used).
        keys: the output of its ``k_proj`` (``[b, n, d]``).

    Returns:
        ``softmax(q_cls k^T * scale)`` in fp32, ``[b, heads, n]`` (a ViT's attention is
        bidirectional and unmasked, so the row is exactly what the layer computed).
    """
    b, n, _ = keys.shape
    hd = attention.head_dim
    q = queries[:, :1].float().view(b, 1, -1, hd).transpose(1, 2)  # [b, h, 1, hd]
    k = keys.float().view(b, n, -1, hd).transpose(1, 2)  # [b, h, n, hd]
    return (q @ k.transpose(-1, -2) * attention.scale).softmax(-1)[:, :, 0]


# -- the intervention ----------------------------------------------------------------------------
@register_method
class Paint(Intervention):
    """PAINT: boost the last query's pre-softmax attention on informed image tokens (local, summary)."""

    name = "paint"
    stage = Stage.ATTENTION_SCORES
    config_cls = PaintConfig
    config: PaintConfig

    def __init__(self, config: PaintConfig | None = None) -> None:
        super().__init__(config)
        self._vision: ClsAttention | None = None
        self._vit_layers: tuple[int, int] = (0, 0)
        self._outputs: dict[tuple[int, str], Tensor] = {}  # a ViT layer's q / k projections, until both are read
        self._cls: dict[int, Tensor] = {}  # ViT layer -> [images, n] head-summed CLS row over the patches
        self._spatial: Tensor | None = None
        self._masks: tuple[Tensor, Tensor] | None = None  # local, summary: [images, n], from the last tower pass
        self._fresh = False  # the masks come from a tower pass no sequence has used yet
        self._offsets: list[int] = []
        self._tokens: TokenState | None = None
        self._weights: Tensor | None = None  # [rows, prompt_len]: the margin of each prompt key
        self._rows: list[dict[str, Any]] = []
        self._edits = 0
        self._prefill_edited = False

    # -- plan callbacks ----------------------------------------------------------------------------
    def bind(self, lvlm: LVLM) -> None:
        c = self.config
        self.eager_layers = resolve_layers(c.layers, default_layers(lvlm.num_layers), lvlm.num_layers)
        self._image_token_id = lvlm.image_token_id
        self._masks, self._fresh = None, False  # nothing carries over from an earlier call
        if not self.eager_layers:
            return
        self._vision = vision_cls_attention(lvlm.model)
        depth = len(self._vision.attentions)
        layers = []
        for field, i in (("local_layer", c.local_layer), ("summary_layer", c.summary_layer)):
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise ConfigError(f"paint: {field}={i} is beyond the vision tower's depth; valid ViT layers are "
                                  f"0..{depth - 1} (or -{depth}..-1)")
            layers.append(j)
        self._vit_layers = (layers[0], layers[1])

    def install(self, plan: Plan, hooks: HookSet) -> None:
        """Forward hooks on the q / k projections of the two ViT layers (the tower keeps its attention)."""
        if not self.eager_layers:
            return
        spatial_layer = self._vit_layers[0] if self.config.spatial_ratio > 0 else None
        for i in sorted(set(self._vit_layers)):
            attn = self._vision.attentions[i]
            hooks.forward(attn.q_proj, self._projection_hook(plan, i, "q", full=i == spatial_layer))
            hooks.forward(attn.k_proj, self._projection_hook(plan, i, "k", full=True))

    def before_prefill(self, lvlm: LVLM, model_kwargs: dict[str, Any]) -> None:
        if self.eager_layers:
            self._offsets = self._patch_offsets(lvlm, model_kwargs["input_ids"])

    def begin(self, tokens: TokenState) -> None:
        self._tokens = tokens
        self._weights = None

    def edits(self, ctx: AttnContext) -> bool:
        # Only the forward's last query row is edited: in a chunked prefill, the chunk that holds it.
        return ctx.has_last_query and not (self.config.release_compat and ctx.step == 0)

    def pre_softmax(self, scores: Tensor, ctx: AttnContext) -> Tensor:
        weights = self._key_weights()
        if weights is None or not self.edits(ctx):
            return scores
        qi = scores.shape[2] - 1  # the forward's last query is the last row of this (its) chunk
        prompt_len = weights.shape[1]
        if ctx.key_start == 0:
            cols = slice(0, min(prompt_len, scores.shape[-1]))
            w = weights[:, cols]
        else:  # keys are a window of positions: map each back to its prompt position
            pos = ctx.key_positions.to(weights.device)
            cols = slice(None)
            w = weights[:, pos.clamp(max=prompt_len - 1)] * (pos < prompt_len)
        w = w.to(scores.device)[:, None, :]  # [b, 1, k]
        if self.config.head_modulation == "image_attention":
            w = w * self._head_factors(scores[:, :, qi], ctx)[..., None]
        scores[:, :, qi, cols] = margin_edit(scores[:, :, qi, cols], w)
        if not ctx.stats_pass:  # a column-statistics pass sees this chunk again for the edit
            self._edits += 1
            self._prefill_edited |= ctx.step == 0
        return scores

    @staticmethod
    def _head_factors(row: Tensor, ctx: AttnContext) -> Tensor:
        """``[b, h]``: each head's image-attention mass in ``row`` over the mean of the heads (1 without image)."""
        mass = (row.softmax(-1) * ctx.image_keys[:, None, :].to(row.dtype)).sum(-1)  # [b, h]
        mean = mass.mean(-1, keepdim=True)
        return torch.where(mean > 0, mass / mean.clamp_min(torch.finfo(mass.dtype).tiny), torch.ones_like(mass))

    def report(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {"layers": sorted(self.eager_layers), "alpha": c.alpha, "beta": c.beta}
        if self.eager_layers:
            out.update(vit_layers={"local": self._vit_layers[0], "summary": self._vit_layers[1]},
                       head_modulation=c.head_modulation, prefill_edited=self._prefill_edited,
                       edited_forwards=self._edits, images=self._rows)
        return out

    # -- the vision tower's CLS attention ------------------------------------------------------------
    def _patch_offsets(self, lvlm: LVLM, input_ids: Tensor) -> list[int]:
        """Per row, the index among its image tokens of patch 0; the row's image tokens must be the tower's patches."""
        from ..layout import image_token_grids  # imports torch: not at module import

        n = self._vision.num_patches
        counts = (input_ids == self._image_token_id).sum(1).tolist()
        if not any(counts):
            return []
        grids = image_token_grids(lvlm, {"input_ids": input_ids})
        for r, (g, count) in enumerate(zip(grids, counts)):
            if g.size != n or count != g.offset + n:
                raise LvlmFixError(
                    f"paint maps the vision tower's {n} patches one to one onto a row's image tokens (one image per "
                    f"row, as LLaVA-1.5); row {r} has {count} image tokens ({lvlm.adapter.model_type}), so this "
                    "model's image tokens are not the tower's patches in order")
        return [g.offset for g in grids]

    def _projection_hook(self, plan: Plan, layer: int, which: str, full: bool):
        def hook(module: Any, args: tuple, output: Tensor) -> None:
            if not plan.is_current():  # another stream's tower pass (e.g. a contrast stream)
                return
            self._outputs[(layer, which)] = output if full else output[:, :1]
            if (layer, "q") in self._outputs and (layer, "k") in self._outputs:
                self._read_layer(layer)

        return hook

    def _read_layer(self, layer: int) -> None:
        attn = self._vision.attentions[layer]
        queries, keys = self._outputs.pop((layer, "q")), self._outputs.pop((layer, "k"))
        self._cls[layer] = cls_attention_row(attn, queries, keys).sum(1)[:, 1:]  # [images, n], summed over heads
        if self.config.spatial_ratio > 0 and layer == self._vit_layers[0]:
            self._spatial = spatial_scores(queries, keys, attn.head_dim, attn.scale)
        if all(i in self._cls for i in self._vit_layers):
            self._select()

    def _select(self) -> None:
        c = self.config
        local_layer, summary_layer = self._vit_layers
        local, summary, threshold = select_tokens(self._cls[local_layer], self._cls[summary_layer], c.local_ratio,
                                                  self._spatial, c.spatial_ratio)
        self._cls.clear()
        self._masks, self._fresh, self._spatial = (local, summary), True, None
        self._rows = [{"local": int(lo.sum()), "summary": int(su.sum()), "summary_threshold": round(float(th), 6),
                       "summary_patches": su.nonzero().flatten().tolist()}
                      for lo, su, th in zip(local.cpu(), summary.cpu(), threshold.cpu())]

    def _key_weights(self) -> Tensor | None:
        """``[rows, prompt_len]``: the margin of each prompt position (alpha local, beta summary, 0 elsewhere).

        Built at the sequence's first edited layer from the newest tower pass (``generate()`` encodes the
        images before the prefill; a plain forward, inside it), which it then consumes. Rows of a beam
        search or of ``num_return_sequences`` are the images' rows repeated in order.
        """
        if self._weights is None and self._fresh and self._tokens is not None and self._offsets:
            self._fresh = False
            local, summary = self._masks
            t = self._tokens
            rows, images = t.image_mask.shape[0], local.shape[0]
            if rows % images:
                raise LvlmFixError(f"paint reads one image per row: the vision tower ran {images} images for "
                                   f"{rows} rows")
            local, summary = (m.repeat_interleave(rows // images, dim=0) for m in (local, summary))
            c = self.config
            image = t.image_mask[:, : t.prompt_len].to(local.device)
            offset = torch.tensor(self._offsets, device=local.device)[:, None]
            rank = image.long().cumsum(1) - 1 - offset  # patch index of each image token
            n = local.shape[1]
            inside = image & (rank >= 0) & (rank < n)
            idx = rank.clamp(0, n - 1)
            margin = c.alpha * local.gather(1, idx).float() + c.beta * summary.gather(1, idx).float()
            self._weights = margin * inside
        return self._weights
