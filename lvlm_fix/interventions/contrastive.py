"""What every contrastive decoding method shares: :class:`ContrastiveMethod` and its configs.

A contrastive method decodes, beside ``generate()``, the same rows with another input (its
*contrast*: a noised image, a disturbed instruction, no image) and combines the two next-token
logits at every step. The mechanism is :class:`~lvlm_fix.hooks.contrast.ContrastStream`; this
module holds what the methods built on it would otherwise each write again:

* the config fields: ``null_contrast`` (:class:`ContrastConfig`, every such method), and the
  linear contrast's ``alpha`` and plausibility cut ``beta`` (:class:`LinearContrastConfig`);
* the class: ``bind`` hands the stream the config's ``null_contrast``; by default the method acts
  at :attr:`~lvlm_fix.interventions.base.Stage.LOGITS` and combines with the linear contrast
  (:func:`~lvlm_fix.hooks.contrast.linear_contrast`, VCD's and ICD's formula), which runs unless
  ``alpha = beta = 0``.

A method file keeps what is its own: the contrast input (``contrast_rows``, or ``changes_images``
and ``contrast_pixels``), ``contrast_kind``, its formula where it is not the linear contrast
(``combine`` and ``contrast_active``: M3ID, PAI's guidance), and its defaults with their sources
(a field redeclared in the method's config; :func:`strength_param` and :func:`cut_param` write the
help text of ``alpha`` and ``beta`` in the one wording).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..hooks.contrast import ContrastStream, linear_contrast
from .base import Intervention, MethodConfig, Stage, param

if TYPE_CHECKING:
    from torch import Tensor

    from ..model import LVLM

__all__ = ["ContrastConfig", "ContrastiveMethod", "LinearContrastConfig", "cut_param", "strength_param"]


def strength_param(default: float, *, main: str, contrast: str, source: str) -> Any:
    """The ``alpha`` field of a linear contrast: ``(1 + alpha) l(main) - alpha l(contrast)``."""
    return param(default, (
        f"Contrast strength: logits = (1 + alpha) l({main}) - alpha l({contrast}). 0 with beta 0 installs nothing. "
        f"Default {default} (source: {source})."), lo=0.0)


def cut_param(default: float, *, stream: str, source: str) -> Any:
    """The ``beta`` field: the adaptive plausibility cut on the ``stream`` (``"clean-stream"``, ...) probabilities."""
    return param(default, (
        f"Adaptive plausibility: tokens with {stream} probability below beta times the top one's get -inf, before "
        f"temperature/top-k/top-p. 0 cuts nothing. Default {default} (source: {source})."), lo=0.0, hi=1.0)


@dataclass(frozen=True, kw_only=True)
class ContrastConfig(MethodConfig):
    """Base of the configs of methods that decode a contrast stream: the field they all share."""

    null_contrast: bool = param(False, (
        "Give the contrast stream the main rows' own input instead of the method's contrast (noised image, "
        "disturbed instruction, no image). The stream still runs beside generate() with its own cache; with the "
        "plausibility cut off the combination then returns the main logits, i.e. vanilla decoding through the "
        "whole two-stream machinery: a check of the mechanism on a new model. Default False (source: lvlm-fix; not part "
        "of the method)."))


@dataclass(frozen=True, kw_only=True)
class LinearContrastConfig(ContrastConfig):
    """A linear contrast's parameters: ``alpha`` and the plausibility cut ``beta`` (VCD's and ICD's defaults)."""

    alpha: float = strength_param(1.0, main="main rows", contrast="contrast rows",
                                  source="VCD and ICD releases, cd_alpha")
    beta: float = cut_param(0.1, stream="main-stream", source="VCD and ICD releases, cd_beta")

    @classmethod
    def noop(cls) -> LinearContrastConfig:
        """``alpha = beta = 0``: no contrast stream is installed."""
        return cls(alpha=0.0, beta=0.0)

    @classmethod
    def math_identity(cls) -> LinearContrastConfig:
        """The stream runs on the main rows' own input, no cut: ``2 l - l = l`` exactly."""
        return cls(alpha=1.0, beta=0.0, null_contrast=True)


class ContrastiveMethod(Intervention, ContrastStream):
    """Base of the contrastive decoding methods (see the module docstring).

    A subclass declares ``name``, ``contrast_kind`` and its contrast input; with a config of its own
    (a :class:`ContrastConfig`), also its ``combine``, ``contrast_active`` and ``report`` unless the
    config is a :class:`LinearContrastConfig`.
    """

    stage = Stage.LOGITS
    config_cls = LinearContrastConfig
    config: ContrastConfig

    def bind(self, lvlm: LVLM) -> None:
        self.null_contrast = self.config.null_contrast
        super().bind(lvlm)

    def contrast_active(self) -> bool:
        return self.config.alpha != 0 or self.config.beta != 0

    def combine(self, main: Tensor, contrast: Tensor, step: int) -> Tensor:
        return linear_contrast(main, contrast, self.config.alpha, self.config.beta)

    def report(self) -> dict[str, Any]:
        return {"alpha": self.config.alpha, "beta": self.config.beta, **self.stream_report()}
