"""An lvlm-fix method of your own: scale the attention that chosen heads pay to image tokens.

In the chosen heads of the chosen layers, every attention weight on an image token is multiplied
by ``factor`` and each row is renormalised to sum to 1. Register it by importing this file (the
decorator), through ``LVLM_FIX_PLUGINS=path/to/scale_image_attention.py``, or through an entry
point in the ``lvlm_fix.methods`` group; then ``lvlm-fix run --method scale_image_attention`` works.
"""

from __future__ import annotations

from dataclasses import dataclass

from lvlm_fix.errors import ConfigError
from lvlm_fix.interventions import Intervention, MethodConfig, Stage, param, register_method, resolve_layers


@dataclass(frozen=True, kw_only=True)
class ScaleImageAttentionConfig(MethodConfig):
    factor: float = param(2.0, "Multiplies the weights on image tokens before renormalising. Default 2.0 "
                               "(source: this example).", lo=0.0)
    layers: tuple[int, ...] = param((1,), "Decoder layers to edit. Default [1] (source: this example).")
    heads: tuple[int, ...] = param((0,), "Heads to edit in those layers. Default [0] (source: this example).", lo=0)

    @classmethod
    def noop(cls) -> ScaleImageAttentionConfig:
        return cls(layers=())  # no layer: nothing is installed

    @classmethod
    def math_identity(cls) -> ScaleImageAttentionConfig:
        return cls(factor=1.0)  # the edit runs and changes nothing


@register_method
class ScaleImageAttention(Intervention):
    """Scale the attention that chosen heads pay to image tokens (docs/adding-a-method.md)."""

    name = "scale_image_attention"
    stage = Stage.ATTENTION_WEIGHTS
    config_cls = ScaleImageAttentionConfig

    def bind(self, lvlm):
        self.eager_layers = resolve_layers(self.config.layers, (), lvlm.num_layers)
        if max(self.config.heads, default=0) >= lvlm.num_heads:
            raise ConfigError(f"heads={list(self.config.heads)}: the model has heads 0..{lvlm.num_heads - 1}")

    def post_softmax(self, probs, ctx):  # [batch, heads, queries, keys], rows sum to 1
        heads = list(self.config.heads)
        scale = 1 + (self.config.factor - 1) * ctx.image_keys[:, None, None, :].to(probs.dtype)  # [b, 1, 1, k]
        edited = probs[:, heads] * scale
        probs = probs.clone()
        probs[:, heads] = edited / edited.sum(-1, keepdim=True)
        return probs

    def report(self):
        return {"layers": sorted(self.eager_layers), "heads": list(self.config.heads), "factor": self.config.factor}
