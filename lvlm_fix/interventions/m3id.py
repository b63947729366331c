"""M3ID: Multi-Modal Mutual-Information Decoding (Favero et al., CVPR 2024).

"Conditioning dilution": as the generated text grows, the image's share of the context shrinks and
the model drifts toward its language prior. M3ID favours tokens with high pointwise mutual
information with the image, ``log p(y | v, x) - log p(y | x)``, with a weight that grows with the
step, and only when the model is unsure. With ``l_c`` the logits of the rows with their image,
``l_u`` those of the same rows without it, and ``t`` the index of the token being generated
(1 for the first)::

    w_t = exp(lambda * t) - 1                        (= (1 - gamma_t) / gamma_t, gamma_t = exp(-lambda t))
    g_t = [ max_k softmax(l_c)_k < alpha ]           (per row: the model is unsure)
    logits = l_c + g_t * w_t * (l_c - l_u)

There is no plausibility cut; the gate plays its part. The rows without image are the main rows
with their image tokens deleted (the rest of the prompt, template included, is kept), decoded
beside them with their own cache. Their logits are combined raw: ``l_c - l_u`` differs from the
log-probability difference by a per-row constant, so every decoding mode picks the same tokens.

No official code was released. The algorithm follows the paper's Algorithm 1 as described by a
third-party port (MitigV 0.1.7, whose docstrings cite it); the defaults are that port's, which it
names the paper's (``alpha = 0.3`` from the scan 0.2 / 0.3 / 0.5, ``lambda = 0.02`` from
0.001 / 0.02 / 0.03). The weight grows fast: 0.02 at t = 1, 1.72 at t = 50, 6.39 at t = 100, 53.6
at t = 200, so long captions turn to pure PMI decoding whenever the gate opens; ``max_weight``
(off by default) caps it. Deviations from that port: the no-image rows drop the image tokens only,
not the whitespace after the placeholder; batches, beams and sampling run inside ``generate()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._lazy import torch
from ..hooks.contrast import rows_without_images
from .base import param
from .contrastive import ContrastConfig, ContrastiveMethod
from .registry import register_method

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM

__all__ = ["M3ID", "M3IDConfig", "m3id_logits", "m3id_weight"]


def m3id_weight(step: int, lam: float, max_weight: float | None = None) -> float:
    """``w_t = exp(lambda t) - 1`` (computed with expm1), capped at ``max_weight`` when given."""
    w = math.expm1(lam * step)
    return w if max_weight is None else min(w, max_weight)


def m3id_logits(main: Tensor, contrast: Tensor, step: int, *, alpha: float, lam: float,
                max_weight: float | None = None) -> tuple[Tensor, Tensor]:
    """M3ID's logits and the gate ``[n]`` (True where the row's top-1 probability is below ``alpha``)."""
    top = main.amax(-1) - main.logsumexp(-1)  # log of the top-1 probability, unwarped
    gate = top < (math.log(alpha) if alpha > 0 else -math.inf)
    w = m3id_weight(step, lam, max_weight)
    return torch.where(gate[:, None], main + w * (main - contrast), main), gate


@dataclass(frozen=True, kw_only=True)
class M3IDConfig(ContrastConfig):
    """M3ID's parameters."""

    alpha: float = param(0.3, (
        "Gate: the correction applies to a row only when its top-1 probability (unwarped) is below alpha; 0 never "
        "applies it. Default 0.3 (source: M3ID paper's scan 0.2/0.3/0.5, as the third-party MitigV port states; "
        "no official code)."), lo=0.0, hi=1.0)
    lam: float = param(0.02, (
        "lambda, the growth of the PMI weight w_t = exp(lambda t) - 1 with the token index t; 0 installs nothing. "
        "Default 0.02 (source: M3ID paper's scan 0.001/0.02/0.03, as the MitigV port states)."), lo=0.0)
    max_weight: float | None = param(None, (
        "Cap on w_t (it reaches 53.6 at t = 200 with lambda 0.02). Default None, no cap (source: the paper, which has none)."),
        lo=0.0)

    @classmethod
    def noop(cls) -> M3IDConfig:
        """``lambda = 0``: ``w_t = 0`` and no contrast stream is installed."""
        return cls(lam=0.0)

    @classmethod
    def math_identity(cls) -> M3IDConfig:
        """The no-image stream runs and the gate never opens (``alpha = 0``)."""
        return cls(alpha=0.0)


@register_method
class M3ID(ContrastiveMethod):
    """M3ID: a growing, gated mutual-information bonus against the rows without the image."""

    name = "m3id"
    config_cls = M3IDConfig
    config: M3IDConfig
    contrast_kind = "no image"

    def contrast_active(self) -> bool:
        return self.config.lam != 0

    def bind(self, lvlm: LVLM) -> None:
        self.gate_open = None  # [n] steps at which each row's gate was open
        super().bind(lvlm)

    def contrast_rows(self, lvlm: LVLM, inputs: dict[str, Any]) -> dict[str, Any]:
        return rows_without_images(lvlm, inputs)

    def combine(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        c = self.config
        out, gate = m3id_logits(main, contrast, step, alpha=c.alpha, lam=c.lam, max_weight=c.max_weight)
        self.gate_open = gate.long() if step == 1 else self.gate_open + gate
        return out

    def report(self) -> dict[str, Any]:
        c = self.config
        return {"alpha": c.alpha, "lam": c.lam, "max_weight": c.max_weight, **self.stream_report(),
                "gate_open_steps": None if self.gate_open is None else self.gate_open.tolist()}
