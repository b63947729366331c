"""VCD: Visual Contrastive Decoding (Leng et al., CVPR 2024).

The image distorted with diffusion noise keeps the language prior and the co-occurrence bias but
loses the visual evidence, so tokens that stay likely under it are prior-driven. At every step,
with ``l`` the logits of the clean rows and ``l'`` those of the same rows with the noised image::

    logits = (1 + alpha) * l - alpha * l'
    logits[k] = -inf  where  p(k) < beta * max p          (adaptive plausibility, clean stream)

then ``generate()``'s own processors and, when sampling, its warpers (temperature, top-k, top-p)
run on the result, as in the release. The noise is the forward diffusion of DDPM applied to the
processor's normalised pixels: ``v' = sqrt(abar_t) v + sqrt(1 - abar_t) eps`` with
``beta_s = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5`` and ``abar_t = prod_{s<=t} (1 - beta_s)``;
at the default ``t = 500``, ``v' = 0.863 v + 0.505 eps``.

Differences from the release (DAMO-NLP-SG/VCD ``d6568ff``), all on purpose:

* Greedy decoding and beam search apply VCD too. The release replaces only the sampling loop:
  with ``do_sample=False`` it silently decodes without VCD, and it has no beam path.
* ``eps`` is seeded per image, from the image's pixels and ``noise_seed``, with a generator of its
  own: the same image gets the same noise whatever the batch, its position in it, or the beams;
  and the global RNG that sampling draws from is left untouched (the release draws ``eps`` from it,
  unseeded per sample). Images that are all zeros (a processor's padding) are not noised.
* Batches and beams are served by the contrast stream (the release's scripts run batch size 1).
* ``output_scores``/``output_logits`` record the contrasted logits, as the release does.

Defaults: ``alpha = 1`` and ``t = 500`` (the LLaVA-1.5 POPE script); ``beta = 0.1`` (the release's
parser and sampler default; its LLaVA POPE script passes 0.2). The paper's headline numbers come
from sampling (temperature 1, top-p 1, top-k 50 by the transformers default of its time) against
a sampling baseline.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from .base import param
from .contrastive import ContrastiveMethod, LinearContrastConfig, cut_param, strength_param
from .registry import register_method

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import Tensor

    from ..model import LVLM

__all__ = ["VCD", "VCDConfig", "NOISE_STEPS", "add_diffusion_noise", "noise_coefficients"]

NOISE_STEPS = 1000


def noise_coefficients(t: int, steps: int = NOISE_STEPS) -> tuple[float, float]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` of VCD's schedule at step ``t`` (0-based), in float64."""
    betas = torch.sigmoid(torch.linspace(-6, 6, steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[t]
    return math.sqrt(abar), math.sqrt(1 - abar)


def _images(pixel_values: Tensor, image_grid: Tensor | None) -> list[Tensor]:
    """``pixel_values`` split into one view per image (the unit VCD noises and seeds).

    Image tensors (``[..., C, H, W]``) give one ``[C, H, W]`` per image; flattened patches
    (``[patches, D]``) with an image grid (``[n, 3]``: frames, rows, columns) give one block of rows
    per image; anything else is one unit.
    """
    if pixel_values.dim() >= 4:
        return list(pixel_values.reshape(-1, *pixel_values.shape[-3:]).unbind(0))
    if pixel_values.dim() == 2 and image_grid is not None:
        return list(pixel_values.split(image_grid.prod(-1).tolist()))
    return [pixel_values]


def _image_seed(image: Tensor, noise_seed: int) -> int:
    digest = hashlib.blake2b(image.detach().float().cpu().numpy().tobytes(), digest_size=8,
                             key=noise_seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def add_diffusion_noise(pixel_values: Tensor, t: int, noise_seed: int = 0, image_grid: Tensor | None = None) -> Tensor:
    """``sqrt(abar_t) v + sqrt(1 - abar_t) eps`` per image, ``eps ~ N(0, I)`` from a generator seeded by the
    image's pixels and ``noise_seed`` (CPU, fp32, so the noise is the same on every device). All-zero images
    (padding) are returned as they are. The result has the input's dtype and device."""
    a, s = noise_coefficients(t)
    flat = pixel_values.reshape(-1, *pixel_values.shape[-3:]) if pixel_values.dim() >= 4 else pixel_values
    out = torch.empty_like(flat)
    parts = _images(out, image_grid)
    for src, dst in zip(_images(pixel_values, image_grid), parts):
        if not bool(src.any()):
            dst.copy_(src)
            continue
        gen = torch.Generator().manual_seed(_image_seed(src, noise_seed))
        eps = torch.randn(src.shape, generator=gen, dtype=torch.float32).to(src.device)
        dst.copy_(src.float() * a + eps * s)
    return out.view(pixel_values.shape)


@dataclass(frozen=True, kw_only=True)
class VCDConfig(LinearContrastConfig):
    """VCD's parameters (``noop``: ``alpha = beta = 0``; ``math_identity``: the clean image against itself)."""

    alpha: float = strength_param(1.0, main="image", contrast="noised image",
                                  source="VCD release, llava1.5_pope.bash cd_alpha=1")
    beta: float = cut_param(0.1, stream="clean-stream", source=(
        "VCD release, parser and sampler default cd_beta; its LLaVA POPE script passes 0.2"))
    noise_step: int = param(500, (
        "Diffusion step t of the noise (0..999): v' = sqrt(abar_t) v + sqrt(1 - abar_t) eps; 500 gives "
        "0.863 v + 0.505 eps, 999 gives 0.285 v + 0.959 eps. Default 500 (source: VCD release, "
        "llava1.5_pope.bash noise_step=500)."), lo=0, hi=NOISE_STEPS - 1)
    noise_seed: int = param(0, (
        "Seed of the noise, combined with each image's pixels (the same image always gets the same noise, in "
        "any batch). Default 0 (source: lvlm-fix; the release draws the noise from the global RNG)."))


@register_method
class VCD(ContrastiveMethod):
    """VCD: next-token logits contrasted with those of the diffusion-noised image."""

    name = "vcd"
    config_cls = VCDConfig
    config: VCDConfig
    contrast_kind = "noised image"
    changes_images = True

    def bind(self, lvlm: LVLM) -> None:
        self.kept: list[int] = []  # tokens surviving the plausibility cut at the first step, per row
        super().bind(lvlm)

    def contrast_pixels(self, pixel_values: Tensor, image_inputs: Mapping[str, Any]) -> Tensor:
        return add_diffusion_noise(pixel_values, self.config.noise_step, self.config.noise_seed,
                                   image_inputs.get("image_grid_thw"))

    def combine(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        out = super().combine(main, contrast, step)
        if step == 1:
            self.kept = torch.isfinite(out).sum(-1).tolist()
        return out

    def report(self) -> dict[str, Any]:
        a, s = noise_coefficients(self.config.noise_step)
        return {**super().report(), "noise": f"{a:.3f} v + {s:.3f} eps", "plausible_tokens_first_step": self.kept}
