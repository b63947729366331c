"""CARVE, Contrastive Attention Refinement for Visual Enhancement (Ge et al., arXiv 2509.06461).

An input-pixel method: the model's internals are read, never edited. Two greedy statistics
passes record, at every generation step ``t`` and read layer ``l``, the head-mean attention of
the last query over the image tokens: ``aQ`` for the question, ``aG`` for a general instruction
(both with the answer suffix). Then, per row::

    C[l, t] = aQ[l, t] / (aG[l, t] + lam)                for t < min(T_Q, T_G)
    S       = sum_t w_t sum_l resize_bilinear(C[l, t] on the patch grid -> image size)
    tau     = percentile(S, 100 (1 - top_percent));   M0 = [S >= tau]
    M       = the top max(min_regions, floor(top_percent * #components)) 4-connected components of
              M0, ranked by their sum of S
    refined = (image * M) cropped to bbox(M), resized by max(W / cw, H / ch) (LANCZOS)

and the answer is generated on the refined image (the paper's Alg. 1) or on [original, refined]
(the released code; ``inputs="both"``), with the question and the answer suffix (as the release
does in all three passes; ``suffix_in_answer=false`` answers the question as written).

Differences from the release (YuyaoGe/CARVE a1f0442), all deliberate:

* The two statistics passes run as 2 rows per sample of one batched, KV-cached greedy
  ``generate()`` (the release runs one uncached full forward per step and sample). Steps are still
  aligned by index and each row stops at its own EOS (the step that produced EOS counts, as in
  the release's loop). With ``fusion="first"`` only the prefill is needed, so the forward stops
  right after the deepest read layer; ``"full"`` and ``"last"`` need every layer, because each
  step's greedy token comes from the logits.
* Resizing is linear, so the weighted sum over layers and steps is taken on the patch grid and
  resized once (equal to resizing every map, up to float rounding).
* The patch grid comes from :mod:`lvlm_fix.layout` per row (the release hard-codes 24 x 24 for 576
  tokens and looks sizes up in a table that beats the real Qwen grid for 256 tokens).
* The paper calls K a maximum number of regions; the code (followed here) keeps
  ``max(K, floor(p * #components))``, so K is a minimum.
* ``fusion="last"`` is the paper's ``T_end`` (the last aligned step alone), which the release lacks.
* The refined size is ``floor(side * s)`` as in the release, with a 1e-6 tolerance so that float
  error in ``W / cw * cw`` cannot lose a pixel.
* The suffix is not appended a second time to a prompt that already ends with it (e.g. POPE's
  ``llava`` preset, whose question already asks for a single word or phrase).
* The default answers on the refined image alone, as the paper's Alg. 1 (``inputs="both"`` is the
  release's two-image prompt, which LLaVA-1.5 was not trained on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from .._lazy import torch
from ..errors import InputError
from ..extras import require
from ..hooks.plan import AttnContext, Participant, Plan, StopForward, TokenState
from .base import Generation, Inner, Intervention, MethodConfig, Stage, param, resolve_layers
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..layout import TokenGrid
    from ..model import LVLM

__all__ = ["Carve", "CarveConfig", "carve_default_layers", "carve_mask", "fuse_saliency", "grid_token_positions",
           "refine_image", "step_weights", "with_suffix"]

GENERAL_INSTRUCTION = "Write a general description of the image."
ANSWER_SUFFIX = " Answer the question using a single word or phrase."


def carve_default_layers(n_layers: int) -> list[int]:
    """The release's layers 20..25 of 32 scaled to ``n_layers`` (round half up)."""
    hi = min(math.floor(25 * n_layers / 32 + 0.5), n_layers - 1)
    lo = min(math.floor(20 * n_layers / 32 + 0.5), hi)
    return list(range(lo, hi + 1))


def with_suffix(prompt: str, suffix: str) -> str:
    """``prompt + suffix``, unless the prompt already ends with the suffix (compared without spaces)."""
    return prompt if not suffix.strip() or prompt.rstrip().endswith(suffix.strip()) else prompt + suffix


# -- the math (pure) -------------------------------------------------------------------------------
def grid_token_positions(image_mask: Tensor, grids: list[TokenGrid]) -> tuple[Tensor, Tensor]:
    """Sequence positions of each row's grid tokens, vectorised over rows.

    Args:
        image_mask: ``[b, t]`` True at image tokens (padding-aware, as in ``TokenState``).
        grids: one :class:`~lvlm_fix.layout.TokenGrid` per row.

    Returns:
        ``(positions, valid)``, both ``[b, G]`` with ``G`` the largest grid: ``positions[r, i]`` is
        the sequence position of grid token ``i`` of row ``r`` (0 where ``valid`` is False).
    """
    b, t = image_mask.shape
    dev = image_mask.device
    offset = torch.tensor([g.offset for g in grids], device=dev)[:, None]
    size = torch.tensor([g.size for g in grids], device=dev)[:, None]
    rank = image_mask.long().cumsum(1) - 1  # index of each image token among the row's image tokens
    selected = image_mask & (rank >= offset) & (rank < offset + size)
    pos = torch.arange(t, device=dev).expand(b, t)
    order = torch.where(selected, pos, pos + t).sort(dim=1).values  # selected positions first, in order
    g_max = int(size.max())
    positions = order[:, :g_max]
    valid = torch.arange(g_max, device=dev)[None, :] < size
    return torch.where(valid, positions, torch.zeros_like(positions)), valid


def step_weights(t_q: Tensor, t_g: Tensor, n_steps: int, fusion: str) -> Tensor:
    """``[n_steps, n]`` weights ``w_t`` per row: zero outside ``t < min(T_Q, T_G)``.

    ``full``: ``w_t = t + 1`` on every aligned step (release v4); ``first``: step 0 only;
    ``last``: the last aligned step only (the paper's ``T_end``).
    """
    t_min = torch.minimum(t_q, t_g).clamp(min=1)  # [n]; every pass records at least the prefill
    t = torch.arange(n_steps, device=t_min.device)[:, None]
    if fusion == "full":
        return torch.where(t < t_min, t + 1.0, 0.0).double()
    if fusion == "first":
        return (t == 0).double().expand(n_steps, t_min.shape[0])
    return (t == t_min - 1).double()


def fuse_saliency(
    a_q: Tensor, a_g: Tensor, weights: Tensor, lam: float, grids: list[TokenGrid], sizes: list[tuple[int, int]]
) -> list[np.ndarray]:
    """CARVE's fused contrast map per row, at image resolution.

    Args:
        a_q, a_g: ``[layers, steps, n, G]`` head-mean attention of the last query on each row's grid
            tokens, for the question and the general instruction.
        weights: ``[steps, n]`` from :func:`step_weights`.
        lam: the ratio's regulariser.
        grids: each row's patch grid (its first ``rows * cols`` of the ``G`` entries are used).
        sizes: each row's image size ``(W, H)``.

    Returns:
        Per row, ``S`` as a float64 ``[H, W]`` array.
    """
    ratio = a_q.double() / (a_g.double() + lam)  # [l, t, n, G]
    fused = torch.einsum("ltng,tn->ng", ratio, weights.to(ratio)).cpu().numpy()  # sum_t w_t sum_l C[l, t]
    out = []
    for row, (grid, size) in enumerate(zip(grids, sizes)):
        m = fused[row, : grid.size].reshape(grid.rows, grid.cols).astype(np.float32)
        resized = Image.fromarray(m).resize(size, Image.BILINEAR)
        out.append(np.asarray(resized, dtype=np.float64))
    return out


def carve_mask(saliency: np.ndarray, top_percent: float, min_regions: int) -> tuple[np.ndarray, dict[str, int]]:
    """Threshold ``saliency`` at its ``100 (1 - top_percent)`` percentile and keep the strongest regions.

    Components are 4-connected (``scipy.ndimage.label``'s default), ranked by their sum of
    saliency; the top ``max(min_regions, floor(top_percent * #components))`` are kept.

    Returns:
        ``(mask, info)``: a ``uint8`` 0/1 array of ``saliency``'s shape, and
        ``{"components": n, "kept": k, "tau": threshold}``.
    """
    ndimage = require("scipy.ndimage", "CARVE")
    tau = np.percentile(saliency, (1.0 - top_percent) * 100)
    above = (saliency >= tau).astype(np.uint8)
    labeled, num = ndimage.label(above)
    if num == 0:
        return np.zeros_like(above), {"components": 0, "kept": 0, "tau": float(tau)}
    scores = ndimage.sum(saliency, labeled, range(1, num + 1))
    ranked = sorted(((i + 1, s) for i, s in enumerate(np.atleast_1d(scores))), key=lambda x: x[1], reverse=True)
    keep_count = max(min_regions, int(num * top_percent))
    keep = [rid for rid, _ in ranked[:keep_count]]
    mask = np.isin(labeled, keep).astype(np.uint8)
    return mask, {"components": int(num), "kept": len(keep), "tau": float(tau)}


def refine_image(image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """``image`` with every pixel outside ``mask`` black, cropped to the mask's bbox and magnified.

    The crop ``(cw, ch)`` is resized by ``s = max(W / cw, H / ch)`` with LANCZOS, so it covers the
    original size along at least one side. An empty mask keeps the whole frame (and is all black).

    Returns:
        ``(refined, bbox)`` with ``bbox = (x0, y0, x1, y1)``, exclusive ends.
    """
    rgb = image.convert("RGB")
    w, h = rgb.size
    masked = Image.fromarray((np.asarray(rgb) * mask[..., None]).astype(np.uint8))
    ys, xs = np.nonzero(mask)
    bbox = (0, 0, w, h) if len(ys) == 0 else (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    crop = masked.crop(bbox)
    cw, ch = crop.size
    s = max(w / cw, h / ch)
    size = (math.floor(cw * s + 1e-6), math.floor(ch * s + 1e-6))
    return crop.resize(size, Image.LANCZOS), bbox


# -- config --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CarveConfig(MethodConfig):
    """CARVE settings (YuyaoGe/CARVE a1f0442, version v4)."""

    instruction: str = param(GENERAL_INSTRUCTION, (
        "General instruction G of the contrast pass. Default 'Write a general description of the image.' "
        "(source: carve/attention.py GENERAL_INSTRUCTION; the best of 5 in paper App. D)."))
    suffix: str = param(ANSWER_SUFFIX, (
        "Appended to the question and to G in the statistics passes (and to the question in the final pass, "
        "see suffix_in_answer), unless the text already ends with it. Default ' Answer the question using a "
        "single word or phrase.' (source: carve/pipeline.py ANSWER_SUFFIX, _build_inputs)."))
    suffix_in_answer: bool = param(True, (
        "Also append the suffix to the question of the final pass, as the release does. Turn it off for "
        "open-ended prompts (captions): the suffix asks for a single word. Default True (source: "
        "carve/pipeline.py, the final pass uses Q + suffix)."))
    layers: tuple[int, ...] | None = param(None, (
        "Layers whose attention is read (negative counts from the end); [] for none (then no statistics pass "
        "runs and the input is left as it is). Default None: 20..25 of 32 scaled to the depth, rounded half up "
        "(source: carve/attention.py DEFAULT_LAYERS = range(20, 26))."))
    lam: float = param(1e-8, (
        "Regulariser lambda of the ratio aQ / (aG + lambda), > 0. Default 1e-8 (source: carve/pipeline.py; "
        "paper Thm. 3)."), lo=0.0, lo_open=True)
    top_percent: float = param(0.2, (
        "Fraction p of pixels above the threshold (tau = the 100(1-p) percentile of S); also sets the region "
        "count floor(p * #components). 1.0 keeps every pixel (the image is unchanged; the statistics passes "
        "still run). Default 0.2 (source: carve/masking.py create_attention_mask)."), lo=0.0, hi=1.0, lo_open=True)
    min_regions: int = param(3, (
        "K: keep at least this many connected regions (the code's max(K, floor(p * #components)); the paper "
        "calls K a maximum). Default 3 (source: carve/masking.py min_keep_regions)."), lo=1)
    fusion: Literal["full", "first", "last"] = param("full", (
        "Time fusion: full = every aligned step weighted t+1 (paper T_full), first = the prefill only "
        "(release v1-v3; the statistics passes then stop after the deepest read layer), last = the last aligned "
        "step (paper T_end). Default full (source: main.py version v4, carve/attention.py step_mode='all')."))
    stat_tokens: int = param(32, (
        "Max new tokens of each greedy statistics pass. Default 32 (source: carve/pipeline.py max_new_tokens)."),
        lo=1)
    inputs: Literal["refined", "both"] = param("refined", (
        "Images of the final pass: refined = the refined image alone (paper Alg. 1), both = [original, refined] "
        "(the released code; a 2-image prompt). Default refined (source: paper Alg. 1)."))

    @classmethod
    def noop(cls) -> CarveConfig:
        """No layer: no statistics pass; the image and the prompt go to generate() as given."""
        return cls(layers=())

    @classmethod
    def math_identity(cls) -> CarveConfig:
        """Both statistics passes run and the mask keeps every pixel; the question is answered as written."""
        return cls(top_percent=1.0, suffix_in_answer=False)


# -- the statistics recorder ---------------------------------------------------------------------
class ImageAttentionRecorder(Participant):
    """Records, per read layer and step, the head-mean attention of the last query on each row's grid tokens.

    ``maps[layer][step]`` is ``[b, G]`` (zeros past a row's grid and for keys a sliding window
    dropped). With ``stop_layer``, the prefill forward ends right after that layer (StopForward).
    """

    def __init__(self, layers: list[int], grids: list[TokenGrid], stop_layer: int | None = None) -> None:
        self.observed_layers = frozenset(layers)
        self.grids = grids
        self.stop_layer = stop_layer
        self.maps: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        self._pos: Tensor | None = None
        self._valid: Tensor | None = None

    def begin(self, tokens: TokenState) -> None:
        for steps in self.maps.values():
            steps.clear()
        self._pos, self._valid = grid_token_positions(tokens.image_mask[:, : tokens.prompt_len], self.grids)

    def observe(self, probs_last: Tensor, ctx: AttnContext) -> None:
        mean = probs_last.mean(1)  # [b, k], mean over heads
        k = mean.shape[-1]
        rel = self._pos.to(mean.device) - ctx.key_positions[0]  # key index of each grid token
        inside = (rel >= 0) & (rel < k) & self._valid.to(mean.device)
        self.maps[ctx.layer].append(mean.gather(1, rel.clamp(0, k - 1)) * inside)
        if ctx.layer == self.stop_layer and ctx.step == 0:
            raise StopForward

    def stacked(self) -> Tensor:
        """``[layers, steps, b, G]`` on the CPU, layers in increasing order."""
        return torch.stack([torch.stack(self.maps[layer]) for layer in sorted(self.maps)]).float().cpu()


# -- the intervention ----------------------------------------------------------------------------
@register_method
class Carve(Intervention):
    """CARVE: mask, crop and magnify the image where question-specific attention is high."""

    name = "carve"
    stage = Stage.INPUT
    config_cls = CarveConfig
    config: CarveConfig

    def __init__(self, config: CarveConfig | None = None) -> None:
        super().__init__(config)
        require("scipy.ndimage", "CARVE")  # now, so that building the method refuses before a model loads
        self._report: dict[str, Any] = {}

    @classmethod
    def prompts(cls) -> list[str]:
        c = cls.config_cls()
        return [c.instruction + c.suffix]

    def layers_on(self, lvlm: LVLM) -> dict[str, list[int]]:
        n = lvlm.num_layers
        return {"read_layers": sorted(resolve_layers(self.config.layers, carve_default_layers(n), n))}

    def generate(self, lvlm: LVLM, images: Any, prompts: Any, gen: dict[str, Any], inner: Inner, *,
                 system_prompt: str | None = None) -> Generation:
        """Refine each row's image, then answer with the methods of later stages (``inner``)."""
        c = self.config
        if not resolve_layers(c.layers, carve_default_layers(lvlm.num_layers), lvlm.num_layers):
            self._report = {"statistics_pass": "none (layers=[]): the input is unchanged"}
            out = inner(images, prompts, gen)
        else:
            new_images, artifacts = self.refine(lvlm, list(images), list(prompts), system_prompt=system_prompt)
            asked = [with_suffix(p, c.suffix) if c.suffix_in_answer else p for p in prompts]
            out = inner(new_images, asked, gen)
            out.artifacts[self.name] = artifacts
        out.report[self.name] = self.report()
        return out

    def refine(self, lvlm: LVLM, images: list[Any], prompts: list[str], *,
               system_prompt: str | None = None) -> tuple[list[Any], dict[str, Any]]:
        """Refine each row's image (the greedy statistics passes and the mask).

        Returns:
            ``(new_images, artifacts)``: per row the refined image (or ``[original, refined]`` with
            ``inputs="both"``); artifacts ``masks`` (PIL "L", 255 = kept), ``refined`` (PIL),
            ``bboxes`` (``(x0, y0, x1, y1)``) and ``saliency`` (float ``[H, W]`` arrays, S).
        """
        c = self.config
        originals = [self._single(im, r) for r, im in enumerate(images)]
        if len(originals) != len(prompts):
            raise InputError(f"got {len(originals)} images for {len(prompts)} prompts; give one image per prompt")
        refined, masks, bboxes, saliency = self._refine(lvlm, originals, prompts, system_prompt)
        new_images: list[Any] = refined if c.inputs == "refined" else [[o, r] for o, r in zip(originals, refined)]
        artifacts = {
            "masks": [Image.fromarray(m * 255) for m in masks],
            "refined": refined,
            "bboxes": bboxes,
            "saliency": saliency,
        }
        return new_images, artifacts

    @staticmethod
    def _single(image: Any, row: int) -> Image.Image:
        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise InputError(f"CARVE refines one image per row; row {row} has {len(image)}")
            image = image[0]
        if not isinstance(image, Image.Image):
            raise InputError(f"row {row}: CARVE needs a PIL image, got {type(image).__name__}")
        return image

    def _refine(self, lvlm: LVLM, originals: list[Image.Image], prompts: list[str], system_prompt: str | None):
        c = self.config
        n = len(originals)
        layers = sorted(resolve_layers(c.layers, carve_default_layers(lvlm.num_layers), lvlm.num_layers))
        rgb = [im.convert("RGB") for im in originals]
        # Rows [0, n): question + suffix; rows [n, 2n): general instruction + suffix, same images.
        texts = [with_suffix(p, c.suffix) for p in prompts] + [with_suffix(c.instruction, c.suffix)] * n
        batch = lvlm.encode(rgb + rgb, texts, system_prompt=system_prompt)
        from ..layout import image_token_grids  # model knowledge; imports torch, so not at module import

        grids = image_token_grids(lvlm, batch)
        first_only = c.fusion == "first"
        recorder = ImageAttentionRecorder(layers, grids, stop_layer=max(layers) if first_only else None)
        prompt_len = batch["input_ids"].shape[1]
        with Plan(lvlm, [recorder]).active(), torch.inference_mode():
            try:
                seq = lvlm.model.generate(
                    **batch, max_new_tokens=1 if first_only else c.stat_tokens, do_sample=False, num_beams=1
                )
            except StopForward:  # fusion="first": the prefill stopped after the deepest read layer
                seq = None
        maps = recorder.stacked()  # [l, t, 2n, G]
        if seq is None:
            lengths = torch.ones(2 * n, dtype=torch.long)
        else:
            from ..model import eos_token_ids, generated_lengths

            lengths = generated_lengths(seq, prompt_len, eos_token_ids(lvlm)).clamp(max=maps.shape[1])
        t_q, t_g = lengths[:n], lengths[n:]
        weights = step_weights(t_q, t_g, maps.shape[1], c.fusion)
        sizes = [im.size for im in rgb]
        saliency = fuse_saliency(maps[:, :, :n], maps[:, :, n:], weights, c.lam, grids[:n], sizes)
        refined, masks, bboxes, rows = [], [], [], []
        for r in range(n):  # PIL / scipy work per image
            mask, info = carve_mask(saliency[r], c.top_percent, c.min_regions)
            img, bbox = refine_image(rgb[r], mask)
            refined.append(img)
            masks.append(mask)
            bboxes.append(bbox)
            rows.append({
                "grid": [grids[r].rows, grids[r].cols],
                "steps": [int(t_q[r]), int(t_g[r])],
                "steps_fused": int((weights[:, r] > 0).sum()),
                **info,
                "bbox": list(bbox),
                "refined_size": list(img.size),
                "mask_fraction": round(float(mask.mean()), 4),
            })
        how = (f"prefill only, stopped after layer {max(layers)}" if first_only
               else f"greedy generate, up to {c.stat_tokens} tokens, KV cache, 2 rows per sample")
        self._report = {"layers": layers, "statistics_pass": how, "rows": rows}
        return refined, masks, bboxes, saliency

    def summarize(self, report: dict[str, Any]) -> str:
        rows = report.get("rows", [])
        if not rows or "kept" not in rows[0]:
            return report.get("statistics_pass", "")
        r = rows[0]
        return (f"kept {100 * r['mask_fraction']:.0f}% of the pixels in {r['kept']} of {r['components']} regions, "
                f"crop {r['bbox']} magnified to {r['refined_size'][0]}x{r['refined_size'][1]}"
                + (f" (row 1 of {len(rows)})" if len(rows) > 1 else ""))

    def report(self) -> dict[str, Any]:
        c = self.config
        return {"fusion": c.fusion, "inputs": c.inputs, "top_percent": c.top_percent, "min_regions": c.min_regions,
                "lam": c.lam, **self._report}
